"""FP8 checkpoints as vLLM serves them (quantbench.checkpoint.serving): AngelSlim's FP8-Dynamic layout written, dense
inputs quantized per token, MoE experts sharing per-tensor input scales, and the MoE layouts vLLM refuses.

The references are written out by hand here (fp8 quantize-dequantize as ``clamp(x / s) -> e4m3 -> * s``),
on the trained fixtures cut to one layer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantbench.calibration.samples import tokenize_calibration
from quantbench.checkpoint.export import save_quantized
from quantbench.checkpoint.load import load_model
from quantbench.quant import qdq
from quantbench.quant.linear import QuantLinear
from quantbench.quant.quantize import quantize_model
from quantbench.quant.schemes import QuantArgs, load_schemes, parse_scheme
from quantbench.util.errors import QuantbenchError

REPO = Path(__file__).resolve().parents[1]
SCHEMES = load_schemes(REPO / "config" / "schemes.yaml")
FP8_TENSOR = QuantArgs(type="float", num_bits=8, strategy="tensor")
FP8_TENSOR_DYNAMIC = QuantArgs(type="float", num_bits=8, strategy="tensor", dynamic=True)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _qdq(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp8 e4m3 quantize-dequantize of ``x`` with a (broadcastable) float32 ``scale``."""
    return ((x.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


@pytest.fixture(scope="module")
def moe_dir(shared_dir: Path) -> Path:
    return shared_dir / "models" / "tinyqwen3-moe"


def _fixture(model_dir: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:1]
    return model


def test_dense_dynamic_fp8_inputs_written_per_tensor_run_per_token() -> None:
    """vLLM's CompressedTensorsW8A8Fp8 quantizes dynamic inputs per token whatever strategy the config names."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 128, generator=gen)
    scale, _ = qdq.weight_qparams(weight, FP8_TENSOR)
    linear = QuantLinear.from_weight(weight, qdq.quantize_weight(weight, scale, None, FP8_TENSOR), scale, None,
                                     weight_args=FP8_TENSOR, input_args=FP8_TENSOR_DYNAMIC)  # fmt: skip
    x = torch.randn(3, 10, 128, generator=gen)
    x[0, 0] *= 1e4  # one loud token: per tensor, the others' values fall into e4m3's subnormal range
    with torch.no_grad():
        out = linear(x)
    w = linear.dequantized_weight(torch.float32)
    per_token = F.linear(_qdq(x, x.abs().amax(dim=-1, keepdim=True) / 448), w)
    per_tensor = F.linear(_qdq(x, x.abs().amax() / 448), w)
    assert torch.equal(out, per_token)
    exact = F.linear(x, w)
    quiet = torch.ones(3, 10, dtype=torch.bool)
    quiet[0, 0] = False
    assert (per_tensor - exact)[quiet].abs().mean() > 1.2 * (per_token - exact)[quiet].abs().mean()
    assert linear.input_args == FP8_TENSOR_DYNAMIC  # the checkpoint keeps the written layout


def test_fp8_dynamic_checkpoint_is_written_as_angelslim_wrote_it(dense_model_dir: Path, tmp_path: Path) -> None:
    """config/schemes.yaml's FP8-Dynamic: weights per tensor, inputs per tensor and dynamic (AngelSlim's save.py)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy

    model = _fixture(dense_model_dir)
    scheme = SCHEMES["FP8-Dynamic"]
    quantize_model(model, scheme, device="cpu")
    out = save_quantized(model, _tokenizer(dense_model_dir), scheme, tmp_path / "fp8", provenance={})
    group = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert group["input_activations"] == {"type": "float", "num_bits": 8, "strategy": "tensor", "symmetric": True,
                                          "group_size": None, "dynamic": True}  # fmt: skip
    assert group["weights"] == {"type": "float", "num_bits": 8, "strategy": "tensor", "symmetric": True,
                                "group_size": None, "dynamic": False}  # fmt: skip
    assert QuantizationArgs(**group["input_activations"]).strategy == QuantizationStrategy.TENSOR


def _tokenizer(model_dir: Path):  # noqa: ANN202 - a transformers tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _routed(mlp: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _, weights, index = mlp.gate(hidden)
    return weights, index


def _fused_moe_reference(
    mlp: nn.Module, hidden: torch.Tensor, gate_up_scale: Callable, down_scale: Callable
) -> torch.Tensor:
    """The MoE block by hand: an expert's gate/up inputs ``x`` quantized with ``gate_up_scale(x)``, every
    down_proj input with ``down_scale(all routed intermediates)``."""
    weights, index = _routed(mlp, hidden)
    intermediates = []
    for e, expert in enumerate(mlp.experts):
        tokens, slot = torch.where(index == e)
        if tokens.numel():
            x = _qdq(hidden[tokens], gate_up_scale(hidden[tokens]))
            gate = F.linear(x, expert.gate_proj.dequantized_weight(torch.float32))
            up = F.linear(x, expert.up_proj.dequantized_weight(torch.float32))
            intermediates.append((expert, tokens, slot, expert.act_fn(gate) * up))
    scale = down_scale([h for *_, h in intermediates])
    out = torch.zeros_like(hidden)
    for expert, tokens, slot, h in intermediates:
        down = F.linear(_qdq(h, scale), expert.down_proj.dequantized_weight(torch.float32))
        out.index_add_(0, tokens, down * weights[tokens, slot, None])
    return out


def test_moe_fp8_dynamic_experts_share_per_tensor_scales_as_vllms_fused_moe(moe_dir: Path, tmp_path: Path) -> None:
    """One dynamic scale over all the layer's tokens for gate/up, one over all routed rows for down_proj
    (vLLM's W8A8 FP8 fused-MoE method with tensor/tensor dynamic inputs); the checkpoint round-trips."""
    model = _fixture(moe_dir)
    quantize_model(model, SCHEMES["FP8-Dynamic"], device="cpu")
    mlp = model.model.layers[0].mlp
    hidden = torch.randn(96, 384, generator=torch.Generator().manual_seed(1))
    hidden[5] *= 50.0  # a loud token sets the shared scale
    with torch.no_grad():
        out = mlp.experts(hidden, *reversed(_routed(mlp, hidden)))
        routed_rows = lambda rows: torch.stack([h.abs().amax() for h in rows]).amax() / 448  # noqa: E731
        expected = _fused_moe_reference(mlp, hidden, lambda _x: hidden.abs().amax() / 448, routed_rows)
        per_token = _fused_moe_reference(mlp, hidden, lambda x: x.abs().amax(dim=-1, keepdim=True) / 448, routed_rows)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert (out - per_token).abs().amax() > 100 * (
        out - expected
    ).abs().amax()  # per-token gate/up inputs compute otherwise

    out_dir = save_quantized(model, _tokenizer(moe_dir), SCHEMES["FP8-Dynamic"], tmp_path / "moe", provenance={})
    runtime, _ = load_model(out_dir, dtype=torch.float32)
    ids = torch.randint(0, 1000, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(runtime(ids).logits, model(ids).logits)

    config = json.loads((out_dir / "config.json").read_text())  # the same experts written per token: refused
    config["quantization_config"]["config_groups"]["group_0"]["input_activations"]["strategy"] = "token"
    (out_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantbenchError, match="vLLM would refuse this MoE checkpoint"):
        load_model(out_dir, dtype=torch.float32)


def test_moe_fp8_static_experts_use_the_largest_stored_scale(moe_dir: Path, heldout_split) -> None:
    """vLLM keeps one static input scale per MoE layer for gate/up and one for down_proj: the experts' largest."""
    model = _fixture(moe_dir)
    calibration = tokenize_calibration(_tokenizer(moe_dir), heldout_split.calibration_file, 8, 128, seed=0)
    quantize_model(model, SCHEMES["FP8-Static"], calibration, device="cpu")
    experts = model.model.layers[0].mlp.experts
    down_scales = torch.stack([e.down_proj.input_scale for e in experts])
    assert down_scales.amax() > 1.2 * down_scales.amin()  # the experts' own scales differ: the max matters
    mlp = model.model.layers[0].mlp
    hidden = torch.randn(96, 384, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = mlp.experts(hidden, *reversed(_routed(mlp, hidden)))
        gate_up = torch.stack([e.gate_proj.input_scale for e in experts]).amax()
        expected = _fused_moe_reference(mlp, hidden, lambda _x: gate_up, lambda _rows: down_scales.amax())
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_moe_layouts_vllm_refuses_are_refused_at_quantize_time(moe_dir: Path, dense_model_dir: Path) -> None:
    token = {"type": "float", "num_bits": 8, "strategy": "token", "symmetric": True, "dynamic": True}
    per_token = parse_scheme("FP8-Dynamic-token", {"weights": FP8_TENSOR.to_dict(), "input_activations": token})
    with pytest.raises(QuantbenchError, match=r"weights 'tensor' with dynamic inputs 'token'; vLLM would refuse"):
        quantize_model(_fixture(moe_dir), per_token, device="cpu")
    quantize_model(_fixture(dense_model_dir), per_token, device="cpu")  # dense layers take it
    channel = parse_scheme(
        "W8A8-channel-token", {"weights": {**FP8_TENSOR.to_dict(), "strategy": "channel"}, "input_activations": token}
    )
    quantize_model(_fixture(moe_dir), channel, device="cpu")  # vLLM's other fp8 MoE layout
