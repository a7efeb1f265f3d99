"""The architecture mapping on tiny random-init models of every supported model type (no files needed)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    Qwen2_5_VLForConditionalGeneration,
)

from quantbench.calibration.samples import Calibration
from quantbench.checkpoint.export import save_quantized
from quantbench.checkpoint.load import load_model
from quantbench.model.architectures import ARCHITECTURES
from quantbench.quant import gptq
from quantbench.quant.linear import QuantLinear
from quantbench.quant.quantize import quantize_model
from quantbench.quant.schemes import load_schemes
from quantbench.util.errors import QuantbenchError

REPO = Path(__file__).resolve().parents[1]
SCHEMES = load_schemes(REPO / "config" / "schemes.yaml")
TEXT = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
# kv heads == heads lets AWQ fold v -> o; fewer kv heads (GQA) makes it skip that mapping
DENSE = {
    "llama": dict(num_key_value_heads=4),
    "mistral": dict(num_key_value_heads=2),
    "qwen2": dict(num_key_value_heads=4),  # q/k/v carry biases: v's bias is folded too
    "qwen3": dict(num_key_value_heads=2, head_dim=32),
    "hunyuan_v1_dense": dict(num_key_value_heads=4, head_dim=32),
}


def _calibration(vocab: int) -> Calibration:
    ids = torch.randint(0, vocab, (4, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    return Calibration(ids, mask, {})


@cache
def _tokenizer() -> PreTrainedTokenizerBase:
    """Any tokenizer, for checkpoints of the random-init models (the demo model's, in the repository)."""
    return AutoTokenizer.from_pretrained(REPO / "resources" / "models" / "tinyqwen3-dense")


def _linears(model: nn.Module) -> dict[str, str]:
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))}


# mixture-of-experts layers: 4 experts, top-2 (Hunyuan adds a shared expert and routes with a Linear `mlp.gate.wg`)
MOE = {
    "qwen3_moe": dict(
        num_key_value_heads=2, head_dim=32, moe_intermediate_size=128, num_experts=4, num_experts_per_tok=2
    ),
    "hunyuan_v1_moe": dict(num_key_value_heads=4, head_dim=32, num_experts=4, moe_topk=2),
}
MOE_LINEARS = {"qwen3_moe": 4 + 4 * 3, "hunyuan_v1_moe": 4 + 4 * 3 + 3}  # per layer: attention, experts, shared expert
ROUTER = {"qwen3_moe": "mlp.gate", "hunyuan_v1_moe": "mlp.gate.wg"}


def test_every_model_type_is_tested() -> None:
    assert set(DENSE) | set(MOE) | {"qwen2_5_vl"} == set(ARCHITECTURES)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(DENSE))
def test_awq_quantizes_every_decoder_linear(model_type: str) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **TEXT, **DENSE[model_type])).eval()
    calibration = _calibration(256)
    with torch.no_grad():
        expected = model(calibration.input_ids[:1]).logits
    stats = quantize_model(model, SCHEMES["INT4-AWQ"], calibration, device="cpu")
    kinds = _linears(model)
    assert [n for n, k in kinds.items() if k == "Linear"] == ["lm_head"]
    assert sum(k == "QuantLinear" for k in kinds.values()) == 14
    assert stats.fallbacks == [] and stats.calibration_tokens == 92
    folded_into_v = [layer.groups[1].search_error is not None for layer in stats.layers]
    assert folded_into_v == [DENSE[model_type]["num_key_value_heads"] == 4] * 2
    with torch.no_grad():
        logits = model(calibration.input_ids[:1]).logits
    assert torch.isfinite(logits).all()
    assert float((logits - expected).norm() / expected.norm()) < 0.3


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["INT4-AWQ", "INT4-GPTQ", "FP8-Dynamic"])
@pytest.mark.parametrize("model_type", sorted(MOE))
def test_moe_layers_quantize_every_expert_and_reload(model_type: str, scheme: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **TEXT, **MOE[model_type])).eval()
    calibration = _calibration(256)
    with torch.no_grad():
        expected = model(calibration.input_ids[:1]).logits
    stats = quantize_model(model, SCHEMES[scheme], calibration, device="cpu")
    kinds = _linears(model)
    kept = {f"model.layers.{i}.{ROUTER[model_type]}" for i in range(2)} & set(kinds)  # Hunyuan's router is a Linear
    assert {n for n, k in kinds.items() if k == "Linear"} == {"lm_head"} | kept
    assert sum(k == "QuantLinear" for k in kinds.values()) == 2 * MOE_LINEARS[model_type]
    assert stats.fallbacks == []
    if SCHEMES[scheme].needs_calibration:
        assert [sum(next(iter(layer.expert_tokens.values()))) for layer in stats.layers] == [92 * 2] * 2
    with torch.no_grad():
        logits = model(calibration.input_ids[:1]).logits
    assert float((logits - expected).norm() / expected.norm()) < 0.3

    out = save_quantized(model, _tokenizer(), SCHEMES[scheme], tmp_path / "ckpt", provenance={})
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert ignore == [f"model.layers.{i}.{ROUTER[model_type]}" for i in range(2)] + ["lm_head"]
    runtime, _ = load_model(out, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(runtime(calibration.input_ids[:1]).logits, logits)


@pytest.mark.slow
def test_gptq_solves_experts_in_row_chunks_with_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """The experts' shared-input group is solved in chunks of at most gptq.MAX_ROWS rows: same codes."""
    config = AutoConfig.for_model("qwen3_moe", **TEXT, **MOE["qwen3_moe"])
    results = []
    for max_rows in (gptq.MAX_ROWS, 200):  # 200 rows: q+k | v, one 128-row expert linear a chunk
        monkeypatch.setattr(gptq, "MAX_ROWS", max_rows)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        quantize_model(model, SCHEMES["INT4-GPTQ"], _calibration(256), device="cpu")
        results.append({n: m.weight_codes for n, m in model.named_modules() if isinstance(m, QuantLinear)})
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])


def _tiny_qwen2_5_vl() -> nn.Module:
    config = AutoConfig.for_model(
        "qwen2_5_vl",
        text_config=dict(**TEXT, num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]}),
        vision_config=dict(
            depth=2, hidden_size=128, intermediate_size=256, num_heads=2, out_hidden_size=128, fullatt_block_indexes=[1]
        ),
    )
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration._from_config(config).eval()


def test_vision_blocks_are_targets_of_vit_schemes_only() -> None:
    model = _tiny_qwen2_5_vl()
    quantize_model(model, SCHEMES["INT8-Dynamic-ViT"], None, device="cpu")
    kinds = _linears(model)
    assert sorted(n for n, k in kinds.items() if k == "Linear") == [
        "lm_head",
        "model.visual.merger.mlp.0",
        "model.visual.merger.mlp.2",
    ]
    assert sum(k == "QuantLinear" and n.startswith("model.visual.blocks.") for n, k in kinds.items()) == 10
    assert sum(k == "QuantLinear" and n.startswith("model.language_model.layers.") for n, k in kinds.items()) == 14

    model = _tiny_qwen2_5_vl()
    stats = quantize_model(model, SCHEMES["INT4-GPTQ"], _calibration(256), device="cpu")  # text through the VLM
    kinds = _linears(model)
    assert all((k == "QuantLinear") == n.startswith("model.language_model.") for n, k in kinds.items())
    assert len(stats.layers) == 2 and all(layer.rel_error > 0 for layer in stats.layers)

    with pytest.raises(QuantbenchError, match="vision blocks, but the calibration set has no images"):
        quantize_model(_tiny_qwen2_5_vl(), SCHEMES["FP8-Static-ViT"], _calibration(256), device="cpu")


def test_unknown_or_unmapped_models_are_refused() -> None:
    gemma = AutoModelForCausalLM.from_config(AutoConfig.for_model("gemma", **TEXT, num_key_value_heads=4, head_dim=32))
    with pytest.raises(QuantbenchError, match="model type 'gemma' has no architecture mapping"):
        quantize_model(gemma, SCHEMES["INT8-Dynamic"], None, device="cpu")
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **TEXT, num_key_value_heads=4))
    model.model.layers[1].mlp.extra_proj = nn.Linear(128, 128)  # a linear the mapping does not know
    with pytest.raises(QuantbenchError, match=r"model.layers.1 holds linear\(s\) \['mlp.extra_proj'\]"):
        quantize_model(model, SCHEMES["INT8-Dynamic"], None, device="cpu")
