"""Mixture-of-experts quantization on the trained MoE fixture (tinyqwen3-moe: 6 layers, 8 experts, top-2, a
peaked router): every expert quantized and calibrated, perplexity, and the per-expert checkpoint read back by
the runtime, by compressed-tensors' own decompressors and by transformers.

The fixture's experts have 192 input features to down_proj, not a multiple of the page's int4 group size
128, so the INT4 schemes run here with group_size 64 (same code path; the real models' 768, 1536 and 3072
are multiples of 128). Perplexity is measured on held-out Gutenberg text (8,192 tokens, 512-token windows).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from quantbench.calibration.samples import tokenize_calibration
from quantbench.checkpoint.export import WEIGHTS_FILE, checkpoint_format, quantized_modules, save_quantized
from quantbench.checkpoint.load import load_model
from quantbench.evaluate.perplexity import wikitext_perplexity
from quantbench.model.experts import ExpertList, calibrate_all_experts, unfuse_experts
from quantbench.quant.linear import QuantLinear
from quantbench.quant.quantize import quantize_model
from quantbench.quant.schemes import Scheme, load_schemes
from quantbench.quant.stats import QuantStats

REPO = Path(__file__).resolve().parents[1]
LAYERS, EXPERTS, TOP_K = 6, 8, 2
CALIB_SAMPLES, CALIB_TOKENS = 16, 256
EVAL_TOKENS, EVAL_WINDOW = 8192, 512
PAGE_SCHEMES = ("FP8-Static", "FP8-Dynamic", "INT8-Dynamic", "INT4-GPTQ", "INT4-AWQ")

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def _scheme(name: str) -> Scheme:
    scheme = load_schemes(REPO / "config" / "schemes.yaml")[name]
    if scheme.weights is not None and scheme.weights.group_size:
        scheme = dataclasses.replace(scheme, weights=dataclasses.replace(scheme.weights, group_size=64))
    return scheme


@pytest.fixture(scope="module")
def env(shared_dir: Path, heldout_split) -> dict:
    from transformers import AutoTokenizer

    model_dir = shared_dir / "models" / "tinyqwen3-moe"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    calibration = tokenize_calibration(tokenizer, heldout_split.calibration_file, CALIB_SAMPLES, CALIB_TOKENS, seed=0)
    return {
        "model_dir": model_dir,
        "tokenizer": tokenizer,
        "calibration": calibration,
        "texts": heldout_split.eval_texts,
    }


def _fresh(env: dict, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(env["model_dir"], dtype=dtype).eval()


@pytest.fixture(scope="module")
def quantized(env: dict) -> Callable[[str], tuple[nn.Module, QuantStats, float]]:
    """(model, statistics, held-out perplexity) per scheme, computed once."""
    cache: dict[str, tuple[nn.Module, QuantStats, float]] = {}

    def get(name: str) -> tuple[nn.Module, QuantStats, float]:
        if name not in cache:
            model = _fresh(env)
            stats = quantize_model(model, _scheme(name), env["calibration"], device="cpu")
            ppl = wikitext_perplexity(
                model, env["tokenizer"], env["texts"], seq_len=EVAL_WINDOW, max_tokens=EVAL_TOKENS
            ).perplexity
            print(f"\n{name}: held-out perplexity {ppl:.3f}")
            cache[name] = (model, stats, ppl)
        return cache[name]

    return get


def test_unfused_experts_compute_what_the_fused_module_computes(env: dict) -> None:
    model = _fresh(env)
    ids = env["calibration"].input_ids[:2, :64]
    mask = env["calibration"].attention_mask[:2, :64].bool()
    with torch.no_grad():
        fused = model(ids).logits
        assert unfuse_experts(model, [f"model.layers.{i}.mlp.experts" for i in range(LAYERS)]) == LAYERS
        routed = model(ids).logits
        experts = [layer.mlp.experts for layer in model.model.layers]
        for module in experts:
            module.routed = torch.zeros(EXPERTS, dtype=torch.long)
        with calibrate_all_experts(experts, mask):
            every_expert = model(ids).logits
    assert torch.equal(routed, fused)
    torch.testing.assert_close(every_expert, routed, rtol=1e-5, atol=1e-5)
    counts = torch.stack([module.routed for module in experts])
    assert counts.sum(dim=1).tolist() == [int(mask.sum()) * TOP_K] * LAYERS
    assert isinstance(model.model.layers[0].mlp.experts, ExpertList)
    assert type(model.model.layers[0].mlp.experts[3].down_proj) is nn.Linear


@pytest.mark.parametrize("name", PAGE_SCHEMES)
def test_every_expert_is_quantized_and_calibrated(env: dict, quantized, name: str) -> None:
    model, stats, _ = quantized(name)
    original = _fresh(env)
    expert_modules = {n: m for n, m in model.named_modules() if ".mlp.experts." in n and n.endswith("_proj")}
    assert len(expert_modules) == LAYERS * EXPERTS * 3
    assert all(type(m) is QuantLinear for m in expert_modules.values()), "an expert weight was left in BF16"
    hidden = torch.randn(64, 384, generator=torch.Generator().manual_seed(0))
    for ours, theirs in zip(model.model.layers, original.model.layers):
        if _scheme(name).algorithm != "awq":  # routers untouched, bit for bit
            assert torch.equal(ours.mlp.gate.weight, theirs.mlp.gate.weight)
        with torch.no_grad():  # AWQ scales the router's inputs with the norm it folds into: the same logits
            expected = theirs.mlp.gate(theirs.post_attention_layernorm(hidden))[0]
            logits = ours.mlp.gate(ours.post_attention_layernorm(hidden))[0]
        assert float((logits - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
    tokens = env["calibration"].num_tokens
    if not _scheme(name).needs_calibration:
        assert stats.calibration_tokens == 0
        return
    assert stats.fallbacks == []
    for layer in stats.layers:
        (routed,) = layer.expert_tokens.values()
        assert len(routed) == EXPERTS and sum(routed) == tokens * TOP_K
        expert_groups = [g for g in layer.groups if any(".mlp.experts." in n for n in g.linears)]
        assert len(expert_groups) == 1 + EXPERTS  # all gate/up share one input; one down_proj each
        assert all(g.tokens == tokens for g in expert_groups), "an expert got statistics from fewer tokens"
        errors = [v for n, v in layer.module_errors.items() if ".mlp.experts." in n]
        assert len(errors) == EXPERTS * 3 and all(0 < e < 0.2 for e in errors)
    # the router really is peaked: the least used expert of some layer gets under a third of a fair share
    fair = tokens * TOP_K / EXPERTS
    assert min(min(next(iter(layer.expert_tokens.values()))) for layer in stats.layers) < fair / 3


@pytest.mark.parametrize("name", ["FP8-Static", "FP8-Dynamic", "INT8-Dynamic"])
def test_8bit_schemes_within_2_percent_of_bf16(quantized, name: str) -> None:
    base, ppl = quantized("BF16")[2], quantized(name)[2]
    assert abs(ppl / base - 1) < 0.02, (name, ppl, base)


@pytest.mark.parametrize("name", ["INT4-GPTQ", "INT4-AWQ"])
def test_int4_data_aware_beats_round_to_nearest(quantized, name: str) -> None:
    base, rtn, ppl = (quantized(n)[2] for n in ("BF16", "INT4-RTN", name))
    assert base < ppl < rtn, (name, base, ppl, rtn)


@pytest.mark.parametrize("name", ["FP8-Static", "INT8-Dynamic", "INT4-GPTQ", "INT4-AWQ"])
def test_checkpoint_round_trips_per_expert(env: dict, quantized, name: str, tmp_path: Path) -> None:
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    model, _, _ = quantized(name)
    scheme = _scheme(name)
    out = save_quantized(model, env["tokenizer"], scheme, tmp_path / name, provenance={})
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["ignore"] == [f"model.layers.{i}.mlp.gate" for i in range(LAYERS)] + ["lm_head"]

    runtime, _ = load_model(out, dtype=torch.float32)
    ids = env["calibration"].input_ids[:2, :64]
    with torch.no_grad():
        assert torch.equal(runtime(ids).logits, model(ids).logits)

    # compressed-tensors' own decompressor, on each per-expert module's stored tensors
    compressor = BaseCompressor.get_value_from_registry(checkpoint_format(scheme.weights))
    ct_scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(**scheme.weights.to_dict()),
        input_activations=None
        if scheme.input_activations is None
        else QuantizationArgs(**scheme.input_activations.to_dict()),
    )
    stored: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(out / WEIGHTS_FILE, framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118
            module, _, local = key.rpartition(".")
            stored.setdefault(module, {})[local] = handle.get_tensor(key)
    ours = quantized_modules(runtime)
    experts = [n for n in ours if ".mlp.experts." in n]
    assert len(experts) == LAYERS * EXPERTS * 3
    assert {"model.layers.5.mlp.experts.7.gate_proj", "model.layers.0.mlp.experts.0.down_proj"} <= set(experts)
    for module_name in experts:
        decompressed = compressor.decompress(stored[module_name], ct_scheme)["weight"]
        assert torch.equal(decompressed.float(), ours[module_name].dequantized_weight(torch.float32)), module_name


def test_transformers_loads_the_per_expert_checkpoint_into_fused_experts(env: dict, quantized, tmp_path: Path) -> None:
    """transformers (compressed-tensors decompression at load) re-fuses the stored experts: same weights."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model, _, _ = quantized("INT4-GPTQ")
    out = save_quantized(model, env["tokenizer"], _scheme("INT4-GPTQ"), tmp_path / "gptq", provenance={})
    hf = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    runtime, _ = load_model(out, dtype=torch.float32)
    for i in range(LAYERS):
        fused, ours = hf.model.layers[i].mlp.experts, runtime.model.layers[i].mlp.experts
        for e in range(EXPERTS):
            gate_up = torch.cat(
                [ours[e].gate_proj.dequantized_weight(torch.float32), ours[e].up_proj.dequantized_weight(torch.float32)]
            )
            assert torch.equal(fused.gate_up_proj[e], gate_up)
            assert torch.equal(fused.down_proj[e], ours[e].down_proj.dequantized_weight(torch.float32))


def test_checkpoint_provenance_reports_the_routed_tokens(env: dict, tmp_path: Path) -> None:
    """`quantbench_provenance.json` of a quantized MoE checkpoint holds each layer's routed-token counts."""
    from quantbench.checkpoint.export import PROVENANCE_FILE
    from quantbench.quant.quantize import quantize_checkpoint

    out = quantize_checkpoint(
        env["model_dir"], _scheme("FP8-Static"), tmp_path / "ckpt", calibration=env["calibration"], device="cpu"
    )
    layers = json.loads((out / PROVENANCE_FILE).read_text())["quantization"]["layers"]
    assert [list(layer["expert_tokens"]) for layer in layers] == [
        [f"model.layers.{i}.mlp.experts"] for i in range(LAYERS)
    ]
    counts = [next(iter(layer["expert_tokens"].values())) for layer in layers]
    assert all(len(c) == EXPERTS and sum(c) == env["calibration"].num_tokens * TOP_K for c in counts)
