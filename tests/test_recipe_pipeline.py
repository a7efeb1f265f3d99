"""The published recipe's quantization options on the trained fixtures and on synthetic GPTQ layers, each against
a reference computed here from its definition: pads counted in the static scales, full-precision propagation,
routed-only expert statistics with the parent maximum, GPTQ's zeroed dead columns and additive damping retries.
Each option changes what it should and nothing else."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from quantbench.calibration.samples import Calibration, tokenize_calibration
from quantbench.calibration.stream import StreamSpec
from quantbench.model.experts import ExpertList, unfuse_experts
from quantbench.quant import qdq
from quantbench.quant.algorithms import GPTQParams
from quantbench.quant.gptq import gptq_solve
from quantbench.quant.linear import QuantLinear
from quantbench.quant.quantize import quantize_model
from quantbench.quant.schemes import CalibrationParams, QuantArgs, Scheme, load_schemes
from quantbench.util.errors import QuantbenchError

REPO = Path(__file__).resolve().parents[1]
SCHEMES = load_schemes(REPO / "config" / "schemes.yaml")
FP8 = SCHEMES["FP8-Static"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _fixture(shared_dir: Path, name: str, layers: int, *, spiky_pad: bool = False) -> nn.Module:
    """A fixture cut to its first ``layers`` layers, in float32. ``spiky_pad``: the pad token's embedding
    becomes one large coordinate, so that pad positions carry the largest activations (on the trained
    fixture they never do: counting them moves no absmax, docs/fidelity.md)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(shared_dir / "models" / name, dtype=torch.float32).eval()
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    if "layer_types" in model.config.to_dict():
        model.config.layer_types = model.config.layer_types[:layers]
    if spiky_pad:
        with torch.no_grad():
            row = model.model.embed_tokens.weight[model.config.pad_token_id]
            row.zero_()[7] = 4.0
    return model


def _texts(shared_dir: Path, tmp_path: Path, chars: list[int]) -> Path:
    records = (shared_dir / "data" / "calib" / "gutenberg_heldout.jsonl").read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["text"][:n] for line, n in zip(records[::2], chars)]
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def _scales(model: nn.Module) -> dict[str, float]:
    return {
        n: float(m.input_scale)
        for n, m in model.named_modules()
        if isinstance(m, QuantLinear) and m.input_scale is not None
    }


def _observed_scales(model: nn.Module, calibration: Calibration) -> dict[str, float]:
    """absmax / 448 of every target linear's input in one unquantized forward of the whole model over the positions
    the calibration's statistics count (what the published recipe's observers record)."""
    maxima: dict[str, torch.Tensor] = {}
    inputs = calibration.model_inputs(0, calibration.num_samples, "cpu")
    mask = calibration.statistics_mask(0, calibration.num_samples)

    def observe(name: str):
        def hook(_module, args):
            x = args[0]
            rows = x[mask] if x.shape[:-1] == mask.shape else x.reshape(-1, x.shape[-1])
            maxima[name] = torch.maximum(maxima.get(name, torch.tensor(0.0)), rows.abs().max())

        return hook

    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and ".layers." in n and not n.endswith("mlp.gate")
    ]
    handles = [model.get_submodule(n).register_forward_pre_hook(observe(n)) for n in names]
    with torch.no_grad():
        model(**inputs, use_cache=False)
    for handle in handles:
        handle.remove()
    return {n: float(qdq.static_input_scale(v, FP8.input_activations)) for n, v in maxima.items()}


@pytest.fixture(scope="module")
def dense(shared_dir: Path, tmp_path_factory) -> dict:
    """Four prose samples of different lengths, padded to the longest (masked) or to 64 tokens (unmasked, counted),
    on the dense fixture with a spiky pad embedding."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(shared_dir / "models" / "tinyqwen3-dense")
    path = _texts(shared_dir, tmp_path_factory.mktemp("dense"), [60, 110, 160, 90])
    calibs = {
        padding: tokenize_calibration(tokenizer, path, 4, 64, stream=StreamSpec(selection="first-n", padding=padding))
        for padding in ("longest", "max-length-unmasked")
    }
    runs = {}
    for padding, calib in calibs.items():
        for propagation in ("quantized", "full-precision"):
            model = _fixture(shared_dir, "tinyqwen3-dense", 2, spiky_pad=True)
            scheme = dataclasses.replace(FP8, calibration=CalibrationParams(propagation=propagation))
            quantize_model(model, scheme, calib, device="cpu")
            runs[padding, propagation] = model
    observed = {
        p: _observed_scales(_fixture(shared_dir, "tinyqwen3-dense", 2, spiky_pad=True), c) for p, c in calibs.items()
    }
    return {"calibs": calibs, "runs": runs, "observed": observed}


def test_counted_pads_change_the_static_scales_as_one_unmasked_forward_observes_them(dense):
    longest, padded = dense["calibs"]["longest"], dense["calibs"]["max-length-unmasked"]
    assert longest.input_ids.shape[1] < 64 and padded.num_tokens == 4 * 64 > longest.num_tokens
    masked_scales = _scales(dense["runs"]["longest", "full-precision"])
    padded_scales = _scales(dense["runs"]["max-length-unmasked", "full-precision"])
    # full-precision propagation: every layer's scales are those an observer records in one unquantized forward,
    # over the real tokens (with the mask) or over every position (no mask, pads counted)
    assert masked_scales == pytest.approx(dense["observed"]["longest"], rel=1e-6)
    assert padded_scales == pytest.approx(dense["observed"]["max-length-unmasked"], rel=1e-6)
    # right padding and causal attention leave the real tokens' activations as they were: counting the pads
    # can only raise a maximum, and the spiky pad raises it where its activations are the largest
    assert all(padded_scales[n] >= masked_scales[n] * (1 - 1e-6) for n in masked_scales)
    raised = [n for n in masked_scales if padded_scales[n] > masked_scales[n] * 1.01]
    assert raised, "counting the pads changed no static scale"
    print(
        f"\npads counted: {len(raised)} of {len(masked_scales)} input scales up by >1%, largest x"
        f"{max(padded_scales[n] / masked_scales[n] for n in raised):.3f}"
    )


def test_padding_changes_no_fp8_weight(dense):
    a, b = dense["runs"]["longest", "quantized"], dense["runs"]["max-length-unmasked", "quantized"]
    for (name, qa), (_, qb) in zip(
        ((n, m) for n, m in a.named_modules() if isinstance(m, QuantLinear)),
        ((n, m) for n, m in b.named_modules() if isinstance(m, QuantLinear)),
    ):
        assert torch.equal(qa.weight_codes.view(torch.uint8), qb.weight_codes.view(torch.uint8)), name
        assert torch.equal(qa.weight_scale, qb.weight_scale), name


def test_full_precision_propagation_changes_only_the_later_layers(dense):
    for padding in ("longest", "max-length-unmasked"):
        quantized = _scales(dense["runs"][padding, "quantized"])
        full = _scales(dense["runs"][padding, "full-precision"])
        first = [n for n in full if n.startswith("model.layers.0.")]
        later = [n for n in full if n.startswith("model.layers.1.")]
        assert {n: quantized[n] for n in first} == {n: full[n] for n in first}
        assert any(quantized[n] != full[n] for n in later)
        # the quantized model's layer-1 inputs are the quantized layer 0's outputs: not what the observer saw
        assert [quantized[n] for n in later] != pytest.approx([dense["observed"][padding][n] for n in later], rel=1e-6)


@pytest.fixture(scope="module")
def moe(shared_dir: Path, tmp_path_factory) -> dict:
    """The MoE fixture cut to 3 layers on 3 x 24 real tokens (no padding): the router sends layer 2's expert 4 nothing."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(shared_dir / "models" / "tinyqwen3-moe")
    path = _texts(shared_dir, tmp_path_factory.mktemp("moe"), [600, 600, 600])
    calib = tokenize_calibration(tokenizer, path, 3, 24, stream=StreamSpec(selection="first-n"))
    assert calib.num_tokens == 72
    out = {"calib": calib}
    for experts in ("all-tokens", "routed"):
        model = _fixture(shared_dir, "tinyqwen3-moe", 3)
        stats = quantize_model(
            model, dataclasses.replace(FP8, calibration=CalibrationParams(experts=experts)), calib, device="cpu"
        )
        out[experts] = (model, stats)
    reference = _fixture(shared_dir, "tinyqwen3-moe", 3)
    unfuse_experts(reference, [f"model.layers.{i}.mlp.experts" for i in range(3)])
    out["observed"] = _observed_scales(reference, calib)  # the plain routed forward: each expert on its own tokens
    return out


def _expert_scales(scales: dict[str, float], layer: int, linear: str) -> list[float]:
    return [scales[f"model.layers.{layer}.mlp.experts.{e}.{linear}"] for e in range(8)]


def test_routed_expert_statistics_follow_the_router(moe):
    all_tokens, routed = (_scales(moe[k][0]) for k in ("all-tokens", "routed"))
    # all tokens: the experts' gate/up share one input, one scale; routed: each expert its own tokens' maximum
    assert len(set(_expert_scales(all_tokens, 0, "gate_proj"))) == 1
    layer0 = [n for n in routed if n.startswith("model.layers.0.mlp.experts.")]
    assert {n: routed[n] for n in layer0} == pytest.approx({n: moe["observed"][n] for n in layer0}, rel=1e-6)
    gate = _expert_scales(routed, 0, "gate_proj")  # the largest input reaches two experts (top-2): the others are lower
    assert max(gate) == pytest.approx(all_tokens["model.layers.0.mlp.experts.0.gate_proj"], rel=1e-6) and min(
        gate
    ) < 0.6 * max(gate)
    # nothing else: layer 0's attention and the FP8 weights are the same either way
    attention = [n for n in routed if n.startswith("model.layers.0.self_attn.")]
    assert {n: routed[n] for n in attention} == {n: all_tokens[n] for n in attention}
    for (name, a), (_, b) in zip(
        *(
            ((n, m) for n, m in moe[k][0].named_modules() if isinstance(m, QuantLinear))
            for k in ("all-tokens", "routed")
        )
    ):
        assert torch.equal(a.weight_codes.view(torch.uint8), b.weight_codes.view(torch.uint8)), name


def test_an_expert_no_token_reached_takes_the_largest_scale_of_the_other_experts(moe):
    _, stats = moe["routed"]
    counts = stats.layers[2].expert_tokens["model.layers.2.mlp.experts"]
    assert counts[4] == 0 and sum(counts) == 2 * 72
    routed = _scales(moe["routed"][0])
    for linear in ("gate_proj", "up_proj", "down_proj"):
        scales = _expert_scales(routed, 2, linear)
        others = [s for e, s in enumerate(scales) if e != 4]
        assert scales[4] == max(others), linear
    assert sum("the router sent it no calibration token" in note for note in stats.fallbacks) == 2  # gate/up, down
    assert "model.layers.2.mlp.experts.4.gate_proj" not in stats.layers[2].module_errors  # it never ran


def test_routed_gptq_solves_each_expert_on_its_own_tokens(moe, shared_dir):
    gptq = dataclasses.replace(
        SCHEMES["INT4-GPTQ"], weights=dataclasses.replace(SCHEMES["INT4-GPTQ"].weights, group_size=64)
    )
    model = _fixture(shared_dir, "tinyqwen3-moe", 3)
    stats = quantize_model(
        model, dataclasses.replace(gptq, calibration=CalibrationParams(experts="routed")), moe["calib"], device="cpu"
    )
    assert any(
        "no calibration tokens: GPTQ replaced by round-to-nearest" in f and "layers.2.mlp.experts.4." in f
        for f in stats.fallbacks
    )
    # layer 0, expert 3: the Hessian of the tokens the router sent it, from a plain routed forward
    reference = _fixture(shared_dir, "tinyqwen3-moe", 3)
    unfuse_experts(reference, ["model.layers.0.mlp.experts"])
    experts: ExpertList = reference.get_submodule("model.layers.0.mlp.experts")
    rows: list[torch.Tensor] = []
    handle = experts[3].gate_proj.register_forward_pre_hook(
        lambda _m, args: rows.append(args[0].reshape(-1, args[0].shape[-1]))
    )
    with torch.no_grad():
        reference(**moe["calib"].model_inputs(0, 3, "cpu"), use_cache=False)
    handle.remove()
    x = torch.cat(rows)
    assert x.shape[0] == stats.layers[0].expert_tokens["model.layers.0.mlp.experts"][3]
    weight = torch.cat([experts[3].gate_proj.weight, experts[3].up_proj.weight])
    solved = gptq_solve(weight, x.T @ x, gptq.weights, gptq.params)
    every = gptq_solve(weight, _all_rows_hessian(reference, moe), gptq.weights, gptq.params)
    got = torch.cat(
        [model.get_submodule(f"model.layers.0.mlp.experts.3.{n}").weight_codes for n in ("gate_proj", "up_proj")]
    )
    agree, agree_all = (float((got == r.codes).float().mean()) for r in (solved, every))
    print(
        f"\nrouted GPTQ codes agree with the routed-Hessian solve {agree:.4f}, with the all-token one {agree_all:.4f}"
    )
    assert agree > 0.99 and agree_all < agree - 0.05


def _all_rows_hessian(model: nn.Module, moe: dict) -> torch.Tensor:
    """``X^T X`` of layer 0's MoE input over every calibration token (what all-token statistics give every expert)."""
    rows: list[torch.Tensor] = []
    handle = model.get_submodule("model.layers.0.post_attention_layernorm").register_forward_hook(
        lambda _m, _a, out: rows.append(out.reshape(-1, out.shape[-1]))
    )
    with torch.no_grad():
        model(**moe["calib"].model_inputs(0, 3, "cpu"), use_cache=False)
    handle.remove()
    x = torch.cat(rows)
    return x.T @ x


INT4 = QuantArgs(type="int", num_bits=4, strategy="group", group_size=32, symmetric=True)


def test_zeroed_dead_columns_change_those_columns_only():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(512, 64, generator=gen) * torch.linspace(0.5, 2.0, 64)
    x[:, 5] = 0.0  # never active
    weight = torch.randn(16, 64, generator=gen)
    weight[:, 5] = 0.1 * weight[:, 5]  # not a group's extreme, so the group parameters stay the same
    rounded = gptq_solve(weight, x.T @ x, INT4, GPTQParams(dead_columns="round"))
    zeroed = gptq_solve(weight, x.T @ x, INT4, GPTQParams(dead_columns="zero"))
    assert torch.equal(rounded.scale, zeroed.scale)
    assert torch.equal(zeroed.codes[:, 5], torch.zeros(16, dtype=torch.int8))
    assert torch.equal(rounded.codes[:, 5], qdq.quantize_weight(weight, rounded.scale, None, INT4)[:, 5])
    assert (rounded.codes[:, 5] != 0).any()
    others = torch.arange(64) != 5
    assert torch.equal(rounded.codes[:, others], zeroed.codes[:, others])
    assert zeroed.notes == ["1 input channel(s) never active: weight columns zeroed"]
    # where a dead column holds a group's largest weight, zeroing it first also shrinks that group's scale
    weight[0, 5] = 10.0
    shrunk = gptq_solve(weight, x.T @ x, INT4, GPTQParams(dead_columns="zero"))
    expected = qdq.weight_qparams(torch.where(others, weight, 0.0), INT4)[0]
    assert (
        torch.equal(shrunk.scale, expected)
        and shrunk.scale[0, 0] < gptq_solve(weight, x.T @ x, INT4, GPTQParams()).scale[0, 0]
    )


def test_additive_damping_retries_accumulate_as_the_published_solver_does():
    weight = torch.randn(4, 2, generator=torch.Generator().manual_seed(4))
    args = QuantArgs(type="int", num_bits=8, strategy="channel")
    indefinite = torch.tensor([[1.0, 1.05], [1.05, 1.0]])  # eigenvalue -0.05
    # the published loop: H += p * mean(diag(H)) with p = 0.01, 0.02, 0.03, ..., on the already damped H
    damped, fraction, attempts = indefinite.clone(), 0.01, 0
    while True:
        damped.diagonal().add_(fraction * damped.diagonal().mean())
        attempts += 1
        if torch.linalg.cholesky_ex(damped).info == 0:
            break
        fraction += 0.01
    expected = float(damped[0, 0] - 1.0)  # total damping, as a fraction of the original mean diagonal (1)
    added = gptq_solve(weight, indefinite, args, GPTQParams(damping_retry="add"))
    multiplied = gptq_solve(weight, indefinite, args, GPTQParams(damping_retry="multiply"))
    assert (
        attempts == 3
        and added.dampening == pytest.approx(expected, rel=1e-6)
        and expected == pytest.approx(0.061106, rel=1e-4)
    )
    assert multiplied.dampening == pytest.approx(0.1) and len(added.notes) == 2 and "(add)" in added.notes[0]
    # the same solution as a single damping of that size
    assert torch.equal(added.codes, gptq_solve(weight, indefinite, args, GPTQParams(dampening=added.dampening)).codes)
    with pytest.raises(QuantbenchError, match="singular up to dampening 1"):
        gptq_solve(weight, torch.tensor([[1.0, 3.0], [3.0, 1.0]]), args, GPTQParams(damping_retry="add"))


def test_routed_statistics_are_refused_for_awq(moe, shared_dir):
    awq = dataclasses.replace(
        SCHEMES["INT4-AWQ"],
        weights=dataclasses.replace(SCHEMES["INT4-AWQ"].weights, group_size=64),
        calibration=CalibrationParams(experts="routed"),
    )
    with pytest.raises(QuantbenchError, match="calibration.experts 'routed' applies to static input scales and GPTQ"):
        quantize_model(_fixture(shared_dir, "tinyqwen3-moe", 1), awq, moe["calib"], device="cpu")


def test_schemes_carry_the_calibration_params_only_when_they_calibrate():
    assert "calibration" not in SCHEMES["FP8-Dynamic"].to_dict() and SCHEMES["INT4-GPTQ"].to_dict()["calibration"] == {
        "propagation": "quantized",
        "experts": "all-tokens",
    }
    assert Scheme(name="BF16").to_dict().get("calibration") is None


def test_routed_calibration_runs_each_expert_on_its_real_tokens_only():
    gen = torch.Generator().manual_seed(3)

    def linear(n_in: int, n_out: int) -> nn.Linear:
        module = nn.Linear(n_in, n_out, bias=False)
        module.weight.data = torch.randn(n_out, n_in, generator=gen)
        return module

    from quantbench.model.experts import ExpertMLP

    experts = ExpertList([ExpertMLP(linear(8, 6), linear(8, 6), linear(6, 8), nn.SiLU()) for _ in range(4)])
    hidden = torch.randn(10, 8, generator=gen)
    top_k = torch.tensor([[0, 1], [1, 2], [0, 2], [3, 1], [0, 1], [2, 3], [3, 0], [1, 2], [3, 3], [3, 2]])
    weights = torch.rand(10, 2, generator=gen)
    real = torch.tensor([True] * 7 + [False] * 3)  # the last three tokens are padding
    seen: dict[int, torch.Tensor] = {}
    for e, expert in enumerate(experts):
        expert.gate_proj.register_forward_pre_hook(lambda _m, args, e=e: seen.__setitem__(e, args[0]))
    with torch.no_grad():
        plain = experts(hidden, top_k, weights)  # the routed forward, every token
        experts.routed, experts.routed_only, experts.token_mask = torch.zeros(4, dtype=torch.long), True, real[None, :]
        seen.clear()
        routed = experts(hidden, top_k, weights)
    for e in range(4):
        chosen = ((top_k == e).any(dim=1) & real).nonzero().flatten()
        assert torch.equal(seen[e], hidden[chosen]), e
    assert experts.routed.tolist() == [4, 4, 3, 3]  # real tokens only (with the pads: 4, 6, 5, 5)
    # the real tokens' outputs are the routed forward's (up to the matmuls' row count), the pads get none
    assert torch.allclose(routed[real], plain[real], rtol=1e-5, atol=1e-5) and (routed[~real] == 0).all()
