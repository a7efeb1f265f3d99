"""AWQ's two styles on the trained fixtures (tinyqwen3-dense cut to two layers; tinyqwen3-moe cut to one): what the
``angelslim`` style changes against the ``quantbench`` style, and what it leaves alone.

- AngelSlim folds only the norm mappings: o_proj and down_proj are plain round-to-nearest of the original
  weights (bit for bit), where quantbench's up->down mapping changes down_proj;
- AngelSlim feeds block i+1 the full-precision outputs of block i; quantbench the quantized ones;
- AngelSlim leaves a MoE router reading the folded norm as it is (its search scores the routing it
  disturbs, and on the MoE fixture keeps s = 1); quantbench scales its input columns too (routing kept);
- the seed's INT4-AWQ (AngelSlim's rounding, fp16) writes fp16 tensors and AngelSlim's min-max parameters.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from quantbench.calibration.samples import tokenize_calibration
from quantbench.checkpoint.export import save_quantized
from quantbench.quant import qdq
from quantbench.quant.linear import QuantLinear
from quantbench.quant.quantize import quantize_model
from quantbench.quant.rtn import rtn_quantize_linear
from quantbench.quant.schemes import Scheme, load_schemes, parse_scheme

REPO = Path(__file__).resolve().parents[1]
CALIB_SAMPLES, CALIB_TOKENS = 8, 128

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def _styles(group_size: int) -> dict[str, Scheme]:
    """config/schemes.yaml's INT4-AWQ in either style (the fixtures' MoE experts need group 64); the angelslim
    style propagates full-precision outputs, as AngelSlim's AWQ did (and config/seed.yaml selects)."""
    weights = {**load_schemes(REPO / "config" / "schemes.yaml")["INT4-AWQ"].weights.to_dict(), "group_size": group_size}
    propagation = {"quantbench": "quantized", "angelslim": "full-precision"}
    return {
        style: parse_scheme(
            style,
            {
                "weights": weights,
                "algorithm": "awq",
                "awq": {"style": style},
                "calibration": {"propagation": propagation[style]},
            },
        )
        for style in ("quantbench", "angelslim")
    }


@pytest.fixture(scope="module")
def env(shared_dir: Path, heldout_split) -> dict:
    from transformers import AutoTokenizer

    out = {}
    for fixture, layers in (("tinyqwen3-dense", 2), ("tinyqwen3-moe", 1)):
        model_dir = shared_dir / "models" / fixture
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        calibration = tokenize_calibration(
            tokenizer, heldout_split.calibration_file, CALIB_SAMPLES, CALIB_TOKENS, seed=0
        )
        out[fixture] = {"model_dir": model_dir, "layers": layers, "tokenizer": tokenizer, "calibration": calibration}
    return out


def _fresh(env: dict, fixture: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    entry = env[fixture]
    model = AutoModelForCausalLM.from_pretrained(entry["model_dir"], dtype=torch.float32).eval()
    model.model.layers = model.model.layers[: entry["layers"]]
    model.config.num_hidden_layers = entry["layers"]
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[: entry["layers"]]
    return model


@pytest.fixture(scope="module")
def quantized(env: dict) -> Callable[[str, str], tuple[nn.Module, list[torch.Tensor]]]:
    """(model, hidden-state inputs block 1 was calibrated on, one per chunk) per fixture and style, computed once."""
    cache: dict[tuple[str, str], tuple[nn.Module, list[torch.Tensor]]] = {}

    def get(fixture: str, style: str) -> tuple[nn.Module, list[torch.Tensor]]:
        if (fixture, style) not in cache:
            model, seen = _fresh(env, fixture), []
            scheme = _styles(64 if "moe" in fixture else 128)[style]
            handle = model.model.layers[-1].register_forward_pre_hook(
                lambda _m, a, k: seen.append((a[0] if a else k["hidden_states"]).clone()), with_kwargs=True
            )
            quantize_model(model, scheme, env[fixture]["calibration"], device="cpu")
            handle.remove()
            cache[(fixture, style)] = (model, seen)
        return cache[(fixture, style)]

    return get


def _codes(module: QuantLinear) -> tuple[torch.Tensor, ...]:
    return module.weight_codes, module.weight_scale, module.weight_zero_point


def test_angelslim_leaves_o_and_down_proj_as_round_to_nearest_of_the_original(env: dict, quantized) -> None:
    original = _fresh(env, "tinyqwen3-dense")
    scheme = _styles(128)["angelslim"]
    styles = {style: quantized("tinyqwen3-dense", style)[0] for style in ("quantbench", "angelslim")}
    folds = []
    for i, layer in enumerate(original.model.layers):
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            rtn = _codes(rtn_quantize_linear(layer.get_submodule(name), scheme))
            ours = _codes(styles["angelslim"].model.layers[i].get_submodule(name))
            assert all(torch.equal(a, b) for a, b in zip(ours, rtn)), f"layer {i} {name}"
        for norm, name in (("input_layernorm", "self_attn.q_proj"), ("post_attention_layernorm", "mlp.gate_proj")):
            folded = not torch.equal(
                styles["angelslim"].model.layers[i].get_submodule(norm).weight, layer.get_submodule(norm).weight
            )
            rtn = _codes(rtn_quantize_linear(layer.get_submodule(name), scheme))[0]
            assert torch.equal(_codes(styles["angelslim"].model.layers[i].get_submodule(name))[0], rtn) != folded
            folds.append(folded)
    assert any(folds)  # the search did not just pick s = 1 everywhere
    # quantbench's up->down mapping rescales down_proj's input columns (GQA leaves v->o out in both styles)
    downs = [_codes(styles["quantbench"].model.layers[i].mlp.down_proj)[0] for i in range(2)]
    rtns = [_codes(rtn_quantize_linear(layer.mlp.down_proj, scheme))[0] for layer in original.model.layers]
    assert not any(torch.equal(a, b) for a, b in zip(downs, rtns))
    for model in styles.values():  # outside the blocks nothing changes
        assert torch.equal(model.model.embed_tokens.weight, original.model.embed_tokens.weight)
        assert torch.equal(model.model.norm.weight, original.model.norm.weight)


def test_angelslim_calibrates_each_block_on_full_precision_outputs(env: dict, quantized) -> None:
    from quantbench.quant.capture import capture_call

    original, calibration = _fresh(env, "tinyqwen3-dense"), env["tinyqwen3-dense"]["calibration"]
    expected = []
    with torch.no_grad():
        for start in range(0, calibration.num_samples, 8):
            inputs = calibration.model_inputs(start, start + 8, torch.device("cpu"))
            args, kwargs = capture_call(
                original.model.layers[1], lambda inputs=inputs: original(**inputs, use_cache=False)
            )
            expected.append(args[0] if args else kwargs["hidden_states"])
    fp_seen = quantized("tinyqwen3-dense", "angelslim")[1]
    q_seen = quantized("tinyqwen3-dense", "quantbench")[1]
    assert len(fp_seen) >= len(expected)  # the reference pass comes first; the search replays only sub-modules
    for got, want, quantized_input in zip(fp_seen, expected, q_seen):
        assert torch.equal(got, want)
        mask = calibration.attention_mask[: want.shape[0]].bool()
        rel = float((quantized_input - want)[mask].square().sum() / want[mask].square().sum())
        assert 1e-5 < rel < 0.05  # quantbench's block 1 saw block 0's quantized outputs


def test_moe_router_reads_the_folded_norm_only_in_the_angelslim_style(env: dict, quantized) -> None:
    """quantbench scales the router's input columns with the norm it folds into (routing kept up to rounding).
    AngelSlim leaves the router alone, so a folded scale reaches its logits, and its search scores that: on this
    fixture every smoothing candidate then loses to s = 1 and the experts are not smoothed at all."""
    from quantbench.model.experts import unfuse_experts
    from quantbench.quant.capture import capture_call

    model = _fresh(env, "tinyqwen3-moe")
    original = model.model.layers[0]
    hidden = torch.randn(256, 384, generator=torch.Generator().manual_seed(0))
    quantbench = quantized("tinyqwen3-moe", "quantbench")[0].model.layers[0]
    angelslim = quantized("tinyqwen3-moe", "angelslim")[0].model.layers[0]
    with torch.no_grad():
        expected = original.mlp.gate(original.post_attention_layernorm(hidden))[0]
        kept = quantbench.mlp.gate(quantbench.post_attention_layernorm(hidden))[0]
    assert not torch.equal(quantbench.post_attention_layernorm.weight, original.post_attention_layernorm.weight)
    assert not torch.equal(quantbench.mlp.gate.weight, original.mlp.gate.weight)
    assert float((kept - expected).abs().max()) < 1e-5 * float(expected.abs().max())
    assert torch.equal(angelslim.mlp.gate.weight, original.mlp.gate.weight)
    assert torch.equal(angelslim.post_attention_layernorm.weight, original.post_attention_layernorm.weight)

    # why: the MoE block's output error at r = 0.5 with the router reading x / s, and with the router compensated
    unfuse_experts(model, ["model.layers.0.mlp.experts"])
    inputs = env["tinyqwen3-moe"]["calibration"].model_inputs(0, CALIB_SAMPLES, torch.device("cpu"))
    args = _styles(64)["angelslim"].weights
    with torch.no_grad():
        x = capture_call(original.mlp, lambda: model(**inputs, use_cache=False))[0][0]
        mask, reference = inputs["attention_mask"].bool(), original.mlp(x)
        x_mean = x[mask].abs().mean(0)
        scales = x_mean.sqrt() / (x_mean.max() * x_mean.min()).sqrt().sqrt()
        losses = {}
        for compensated in (False, True):
            mlp = copy.deepcopy(original.mlp)
            for linear in (w for expert in mlp.experts for w in (expert.gate_proj, expert.up_proj)):
                s, z = qdq.weight_qparams(linear.weight * scales, args)
                linear.weight.data = qdq.fake_quantize_weight(linear.weight * scales, s, z, args)
            if compensated:
                mlp.gate.weight.data = mlp.gate.weight * scales
            losses[compensated] = float((mlp(x / scales) - reference)[mask].square().sum())
    assert losses[False] > 2 * losses[True], losses


def test_seed_awq_writes_fp16_and_angelslim_minmax_parameters(env: dict, tmp_path: Path) -> None:
    seed = yaml.safe_load((REPO / "config" / "seed.yaml").read_text(encoding="utf-8"))
    scheme = load_schemes(REPO / "config" / "schemes.yaml", seed["scheme_overrides"])["INT4-AWQ"]
    assert scheme.params.style == "angelslim" and scheme.dtype == "float16"
    fixture = env["tinyqwen3-dense"]
    model, original = _fresh(env, "tinyqwen3-dense"), _fresh(env, "tinyqwen3-dense")
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers, model.config.layer_types = 1, model.config.layer_types[:1]
    quantize_model(model, scheme, fixture["calibration"], device="cpu")
    o_proj = model.model.layers[0].self_attn.o_proj
    assert o_proj.weight_scale.dtype == torch.float16 and model.model.embed_tokens.weight.dtype == torch.float16
    weight = original.model.layers[0].self_attn.o_proj.weight.data.half()  # AngelSlim's pseudo_quantize_tensor, in fp16
    grouped = weight.float().reshape(weight.shape[0], -1, 128)
    w_min, w_max = grouped.amin(-1), grouped.amax(-1)
    scale = ((w_max - w_min).clamp(min=1e-5) / 15).half()
    zero = torch.round(-w_min / scale.float()).clamp(0, 15)
    codes = (torch.round((weight.reshape(grouped.shape) / scale[..., None]).float()) + zero[..., None]).clamp(0, 15)
    assert torch.equal(o_proj.weight_scale, scale)
    assert torch.equal(o_proj.weight_zero_point.int() + 8, zero.int())  # compressed-tensors' signed zero point
    assert torch.equal(o_proj.weight_codes.int() + 8, codes.reshape(weight.shape).int())
    out = save_quantized(model, fixture["tokenizer"], scheme, tmp_path / "awq", provenance={})
    config = json.loads((out / "config.json").read_text())
    assert (
        config["dtype"] == "float16"
        and config["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] is False
    )
    assert json.loads((out / "quantbench_provenance.json").read_text())["scheme"]["awq"]["style"] == "angelslim"
