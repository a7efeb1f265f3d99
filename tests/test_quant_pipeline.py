"""The whole quantizer on the trained fixture (tinyqwen3-dense): perplexity, per-layer errors, structure,
padding, planted degenerate channels and determinism.

Perplexity (``quantbench.evaluate.perplexity``, 512-token windows) is measured on WikiText-2 test and on
held-out Gutenberg chunks that no calibration sample comes from (calibration takes the even records of
the held-out file; evaluation every 18th odd record, which spans all five books). WikiText-2 is far out of
the fixture's training domain (perplexity ~420): there INT4 round-to-nearest moves perplexity by less than
the noise between methods, so the INT4 comparison uses the held-out text, where quantization error shows.
Each scheme is quantized and evaluated once per session (module-scoped cache).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from quantbench.calibration.samples import Calibration, tokenize_calibration
from quantbench.evaluate.perplexity import read_rows, wikitext_perplexity
from quantbench.quant.linear import QuantLinear
from quantbench.quant.quantize import quantize_model
from quantbench.quant.schemes import Scheme, load_schemes
from quantbench.quant.sequential import PipelineOptions
from quantbench.quant.stats import QuantStats
from quantbench.util.errors import QuantbenchError

REPO = Path(__file__).resolve().parents[1]
CALIB_SAMPLES, CALIB_TOKENS = 16, 256
EVAL_WINDOW = 512
EVAL_TOKENS = {"wikitext": 4096, "heldout": 8192}
SMALL_LAYERS = 2  # the padding, determinism and planted-channel tests cut the fixture to its first two layers
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Run:
    """One scheme applied to a fresh copy of the fixture, with its statistics and perplexities."""

    model: nn.Module
    stats: QuantStats
    perplexity: dict[str, float]


@pytest.fixture(scope="module")
def env(shared_dir: Path, heldout_split) -> dict:
    from transformers import AutoTokenizer

    model_dir = shared_dir / "models" / "tinyqwen3-dense"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return {
        "model_dir": model_dir,
        "tokenizer": tokenizer,
        "schemes": load_schemes(REPO / "config" / "schemes.yaml"),
        "calibration": tokenize_calibration(
            tokenizer, heldout_split.calibration_file, CALIB_SAMPLES, CALIB_TOKENS, seed=0
        ),
        "wikitext": read_rows(shared_dir / "data" / "wikitext2" / "test.jsonl"),
        "heldout": heldout_split.eval_texts,
    }


def _fresh_model(env: dict, layers: int | None = None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(env["model_dir"], dtype=torch.float32).eval()
    if layers is not None:
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
        model.config.layer_types = model.config.layer_types[:layers]
    return model


@pytest.fixture(scope="module")
def run(env: dict) -> Callable[[str], Run]:
    """Quantize a scheme once (measuring INT4-RTN's per-layer errors too) and evaluate it on ``texts`` once each."""
    cache: dict[str, Run] = {}

    def get(name: str, texts: tuple[str, ...] = ()) -> Run:
        if name not in cache:
            model = _fresh_model(env)
            options = PipelineOptions(measure_data_free=name == "INT4-RTN")
            stats = quantize_model(model, env["schemes"][name], env["calibration"], device="cpu", options=options)
            cache[name] = Run(model, stats, {})
        result = cache[name]
        for key in texts:
            if key not in result.perplexity:
                result.perplexity[key] = wikitext_perplexity(
                    result.model, env["tokenizer"], env[key], seq_len=EVAL_WINDOW, max_tokens=EVAL_TOKENS[key]
                ).perplexity
                print(
                    f"\n{name}: {key} perplexity {result.perplexity[key]:.3f} (quantized in {result.stats.seconds:.1f} s)"
                )
        return result

    return get


@pytest.mark.slow
@pytest.mark.parametrize("name", ["FP8-Static", "FP8-Dynamic", "INT8-Dynamic"])
def test_8bit_schemes_within_2_percent_of_bf16(run: Callable[[str], Run], name: str) -> None:
    base, quantized = (run(n, ("wikitext",)).perplexity["wikitext"] for n in ("BF16", name))
    assert quantized < base * 1.02, (base, quantized)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["INT4-GPTQ", "INT4-AWQ"])
def test_int4_data_aware_beats_round_to_nearest(run: Callable[[str], Run], name: str) -> None:
    base, rtn, quantized = (run(n, ("heldout",)).perplexity["heldout"] for n in ("BF16", "INT4-RTN", name))
    assert quantized - base < 0.9 * (rtn - base), (base, rtn, quantized)  # recovers over 10% of RTN's loss


@pytest.mark.parametrize(("name", "ratio"), [("INT4-GPTQ", 0.7), ("INT4-AWQ", 0.95)])
def test_layer_output_error_below_rtn_on_every_layer(run: Callable[[str], Run], name: str, ratio: float) -> None:
    rtn, quantized = run("INT4-RTN").stats, run(name).stats
    assert len(rtn.layers) == len(quantized.layers) == 6
    for a, b in zip(rtn.layers, quantized.layers):
        assert a.name == b.name and 0 < b.rel_error < ratio * a.rel_error, (a.name, a.rel_error, b.rel_error)
        assert len(b.module_errors) == 7 and all(0 < e < 0.05 for e in b.module_errors.values())


def test_targets_replaced_everything_else_untouched(env: dict, run: Callable[[str], Run]) -> None:
    original = _fresh_model(env)
    for name in ("INT4-GPTQ", "INT4-AWQ", "FP8-Static"):
        model = run(name).model
        kinds = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))}
        assert sorted(n for n, k in kinds.items() if k == "QuantLinear") == sorted(
            f"model.layers.{i}.{'self_attn' if t in TARGETS[:4] else 'mlp'}.{t}" for i in range(6) for t in TARGETS
        )
        assert [n for n, k in kinds.items() if k == "Linear"] == ["lm_head"]
        assert torch.equal(model.model.embed_tokens.weight, original.model.embed_tokens.weight)
        assert torch.equal(model.model.norm.weight, original.model.norm.weight)
    # FP8-Static's input scales are absmax / 448 of real activations: finite, positive and not the fallback 1
    scales = [m.input_scale for m in run("FP8-Static").model.modules() if isinstance(m, QuantLinear)]
    assert all(torch.isfinite(s).all() and 0 < float(s) < 1 for s in scales)


def test_data_free_schemes_never_run_the_model(env: dict) -> None:
    model = _fresh_model(env)
    calls = []
    model.model.embed_tokens.register_forward_hook(lambda *args: calls.append(1))
    stats = quantize_model(model, env["schemes"]["INT8-Dynamic"], env["calibration"], device="cpu")
    assert calls == [] and stats.calibration_tokens == 0
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 42
    with pytest.raises(QuantbenchError, match="needs calibration data"):
        quantize_model(_fresh_model(env), env["schemes"]["INT4-GPTQ"], None, device="cpu")


def _small_calibration(env: dict, pad_id: int) -> Calibration:
    """Eight samples of different lengths (so with padding), the padding filled with ``pad_id``."""
    base = env["calibration"]
    lengths = torch.tensor([64, 17, 40, 64, 5, 33, 64, 50])
    ids = base.input_ids[:8, :64].clone()
    mask = (torch.arange(64)[None, :] < lengths[:, None]).long()
    ids[mask == 0] = pad_id
    return Calibration(ids, mask, dict(base.metadata))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["INT4-GPTQ", "FP8-Static", "INT4-AWQ"])
def test_padding_never_counts_and_runs_are_deterministic(env: dict, name: str) -> None:
    scheme: Scheme = env["schemes"][name]
    options = PipelineOptions(chunk_size=4)
    results = []
    for pad_id in (0, 0, 1234):
        model = _fresh_model(env, SMALL_LAYERS)
        stats = quantize_model(model, scheme, _small_calibration(env, pad_id), device="cpu", options=options)
        assert stats.calibration_tokens == 337
        results.append({k: v for k, v in model.state_dict().items() if ".layers." in k})
    first, again, other_padding = results
    assert first.keys() == again.keys() == other_padding.keys()
    for key in first:
        assert torch.equal(first[key], again[key]), key  # same inputs, same seed: identical tensors
        assert torch.equal(first[key], other_padding[key]), key  # what the padding holds does not matter


@pytest.mark.slow
def test_planted_zero_and_constant_channels_keep_scales_finite(env: dict) -> None:
    calibration = _small_calibration(env, 0)
    for name in ("INT4-GPTQ", "INT4-AWQ", "FP8-Static", "INT8-Dynamic"):
        model = _fresh_model(env, SMALL_LAYERS)
        layer = model.model.layers[1]
        with torch.no_grad():
            layer.input_layernorm.weight[7] = 0.0  # an input channel of q/k/v that is always zero
            layer.post_attention_layernorm.weight[9] = 0.0  # the same for gate/up
            layer.self_attn.q_proj.weight[3] = 0.0  # an all-zero output channel
            layer.mlp.up_proj.weight[:, 11] = 0.0  # an all-zero input column
            layer.mlp.down_proj.weight[5] = 0.02  # a constant output channel
            layer.mlp.gate_proj.weight[:, 12] = -0.03  # a constant input column
        stats = quantize_model(model, env["schemes"][name], calibration, device="cpu")
        for module_name, module in model.named_modules():
            if isinstance(module, QuantLinear):
                for buffer in ("weight_scale", "input_scale"):
                    value = getattr(module, buffer)
                    if value is not None:
                        assert torch.isfinite(value.float()).all() and (value.float() > 0).all(), (
                            name,
                            module_name,
                            buffer,
                        )
                assert torch.isfinite(module.dequantized_weight(torch.float32)).all()
        if name == "INT4-GPTQ":
            notes = [note for note in stats.fallbacks if "never active" in note]
            assert len(notes) == 2 and "layers.1.self_attn.q_proj" in notes[0]
        with torch.no_grad():
            logits = model(env["calibration"].input_ids[:1, :32]).logits
        assert torch.isfinite(logits).all()


def test_activations_that_overflow_or_never_come_are_reported(env: dict) -> None:
    model = _fresh_model(env, SMALL_LAYERS)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0] = 3e38  # finite, but its outputs overflow float32
    with pytest.raises(
        QuantbenchError, match="entering model.layers.1.self_attn.q_proj, .*k_proj, .*v_proj contain NaN/Inf"
    ):
        quantize_model(model, env["schemes"]["INT4-GPTQ"], _small_calibration(env, 0), device="cpu")
    model = _fresh_model(env, SMALL_LAYERS)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 4] = float("nan")
    with pytest.raises(QuantbenchError, match=r"model.layers.1.mlp.up_proj.weight holds NaN/Inf"):
        quantize_model(model, env["schemes"]["INT8-Dynamic"], None, device="cpu")
    empty = _small_calibration(env, 0)
    empty.attention_mask.zero_()
    with pytest.raises(QuantbenchError, match="no real tokens"):
        quantize_model(_fresh_model(env, SMALL_LAYERS), env["schemes"]["FP8-Static"], empty, device="cpu")


@pytest.mark.parametrize(
    ("name", "fallback"),
    [
        ("INT4-GPTQ", "no calibration tokens: GPTQ replaced by round-to-nearest"),
        ("FP8-Static", "static input scale set to 1"),
    ],
)
def test_a_group_that_saw_no_tokens_falls_back_and_says_so(env: dict, name: str, fallback: str) -> None:
    """A group no token reached (an MoE expert the router never chose) gets round-to-nearest, counted."""
    from quantbench.model.architectures import get_architecture
    from quantbench.quant.observers import InputStats
    from quantbench.quant.sequential import Group, _quantize_group
    from quantbench.quant.stats import GroupStats

    model, scheme = _fresh_model(env, 1), env["schemes"][name]
    block, stack = model.model.layers[0], get_architecture(model.config).language
    names = stack.groups[2]  # gate/up
    stats = InputStats.create(384, torch.device("cpu"), hessian=True, absmax=True, abs_sum=True)
    group = Group(names, stats, GroupStats(names))
    modules = _quantize_group(block, group, stack, scheme)
    assert sorted(modules) == sorted(names)
    for module in modules.values():
        assert torch.isfinite(module.weight_scale.float()).all() and (module.weight_scale.float() > 0).all()
    assert len(group.report.fallbacks) == 1 and fallback in group.report.fallbacks[0] and group.report.tokens == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the tiled Hessian runs on CUDA only")
@pytest.mark.parametrize("width", [4096, 6144])
def test_tiled_hessian_is_the_whole_product_bit_for_bit(width: int) -> None:
    """Hessians of multiples of HESSIAN_TILE columns are built by upper tiles and mirrored: the same matrix."""
    from quantbench.quant.observers import HESSIAN_TILE, accumulate_hessian

    assert width % HESSIAN_TILE == 0
    g = torch.Generator(device="cuda").manual_seed(width)
    tiled = torch.zeros(width, width, device="cuda")
    whole = torch.zeros(width, width, device="cuda")
    for _ in range(3):  # several updates: the lower tiles follow the accumulated upper ones
        rows = torch.randn(4096, width, device="cuda", generator=g) * torch.exp(
            torch.randn(width, device="cuda", generator=g)
        )
        rows = rows.to(torch.bfloat16)
        accumulate_hessian(tiled, rows)
        whole.add_(torch.mm(rows.t(), rows, out_dtype=torch.float32))
    assert torch.equal(tiled, whole)
