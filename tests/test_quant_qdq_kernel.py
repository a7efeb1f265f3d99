"""The fused activation kernel against the torch functions, bit for bit: :func:`qdq.quantize_dequantize_activation`
for fp8, :func:`qdq.int_activation_codes` (codes and scales) for integers.

Marked ``kernel``: runs on a CUDA machine with Triton, or on CPU under Triton's interpreter (``TRITON_INTERPRET=1``
set before pytest starts); skipped otherwise (CPU-only torch ships without Triton), failed with ``--require-kernels``.
"""

from __future__ import annotations

import os

import pytest
import torch

from quantbench.quant import qdq, qdq_kernel
from quantbench.quant.linear import QuantLinear
from quantbench.quant.schemes import QuantArgs

DEVICE = torch.device("cuda" if torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ else "cpu")
pytestmark = pytest.mark.kernel

INT8_TOKEN = QuantArgs(type="int", num_bits=8, strategy="token", symmetric=True, dynamic=True)
FP8_TOKEN = QuantArgs(type="float", num_bits=8, strategy="token", symmetric=True, dynamic=True)
FP8_STATIC = QuantArgs(type="float", num_bits=8, strategy="tensor", symmetric=True, dynamic=False)
INT8_STATIC = QuantArgs(type="int", num_bits=8, strategy="tensor", symmetric=True, dynamic=False)
ALL_ARGS = [INT8_TOKEN, FP8_TOKEN, FP8_STATIC, INT8_STATIC]
IDS = ["int8-token", "fp8-token", "fp8-static", "int8-static"]


def _activations(rows: int, width: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Heavy-tailed rows over many magnitudes, plus an all-zero row and a row of one outlier."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=g) * torch.exp(torch.randn(rows, 1, generator=g) * 3)
    x = x * torch.where(torch.rand(width, generator=g) < 0.02, 50.0, 1.0)
    x[0] = 0.0
    x[1] = torch.randn(width, generator=g) * 1e-3
    x[1, width // 2] = 1e4
    return x.to(dtype)


def _assert_bitwise_equal(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.isfinite(got).all()
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[got.dtype]
    mismatched = int((got.view(bits) != expected.view(bits)).sum())  # -0.0 and 0.0 differ too
    assert mismatched == 0, f"{mismatched} of {got.numel()} values differ"


def _assert_same_quantization(x: torch.Tensor, args: QuantArgs, scale: torch.Tensor | None) -> None:
    if args.type == "float":
        _assert_bitwise_equal(
            qdq_kernel.fake_quantize_activation(x, args, scale), qdq.quantize_dequantize_activation(x, args, scale)
        )
        return
    codes, scales = qdq_kernel.int_activation_codes(x, args, scale)
    expected_codes, expected_scales = qdq.int_activation_codes(x, args, scale)
    assert codes.dtype == torch.int8 and torch.equal(codes.float(), expected_codes)
    _assert_bitwise_equal(scales.expand_as(expected_scales), expected_scales)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("args", ALL_ARGS, ids=IDS)
def test_matches_torch_path(args: QuantArgs, dtype: torch.dtype) -> None:
    """Rows wider than one loop step (5000 > 4096) and a batch dimension: every value identical."""
    x = _activations(12, 5000, dtype, seed=1).reshape(3, 4, 5000).to(DEVICE)
    scale = qdq.static_input_scale(x.float().abs().amax() * 0.5, args) if not args.dynamic else None  # half clips
    _assert_same_quantization(x, args, scale)


@pytest.mark.parametrize("args", [FP8_STATIC, INT8_STATIC], ids=["fp8", "int8"])
def test_ties_round_half_to_even(args: QuantArgs) -> None:
    """Quotients exactly between two codes go to the even one, as torch rounds (scale 1); e4m3 subnormals
    (steps of 2**-9 below 2**-6) too, and tiny negatives keep their sign as -0.0."""
    x = torch.tensor(
        [[1.0625, 1.1875, -1.0625, 2.5, 3.5, -2.5, 0.5, 1.5, 600.0, -600.0, 3 * 2**-10, -1e-10]], device=DEVICE
    )
    scale = torch.ones(1, device=DEVICE)
    expected = qdq.quantize_dequantize_activation(x, args, scale)
    if args.type == "float":  # e4m3 steps of 1/8 on [1, 2), 1/4 on [2, 4); +-448 saturates
        assert expected.tolist() == [[1.0, 1.25, -1.0, 2.5, 3.5, -2.5, 0.5, 1.5, 448.0, -448.0, 2**-8, 0.0]]
        assert str(expected[0, -1].item()) == "-0.0"
    else:
        assert expected.tolist() == [[1.0, 1.0, -1.0, 2.0, 4.0, -2.0, 0.0, 2.0, 127.0, -128.0, 0.0, 0.0]]
    _assert_same_quantization(x, args, scale)


def test_dynamic_int8_ties_round_as_vllms_cuda_kernel() -> None:
    """bf16 tokens whose halves sit on a code's half step: the kernel rounds ``x * (127 / amax)`` as vLLM's
    CUDA kernel does, which differs from rounding ``x / (amax / 127)``."""
    x = torch.tensor(
        [[2.296875, 1.1484375, -1.1484375], [2.734375, 1.3671875, 0.0], [0.0, 0.0, 0.0]],
        dtype=torch.bfloat16,
        device=DEVICE,
    )
    codes, scales = qdq_kernel.int_activation_codes(x, INT8_TOKEN)
    assert codes.tolist() == [[127, 64, -64], [127, 64, 0], [0, 0, 0]]
    assert scales.flatten().tolist() == [
        torch.tensor(v / 127, dtype=torch.float32).item() for v in (2.296875, 2.734375, 0.0)
    ]
    _assert_same_quantization(x, INT8_TOKEN, None)


def test_quant_linear_uses_kernel_with_same_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """A QuantLinear with dynamic int8 inputs gives the same output through the kernel and the torch path."""
    torch.manual_seed(0)
    weight = torch.randn(48, 300, dtype=torch.bfloat16, device=DEVICE) * 0.02
    w_args = QuantArgs(type="int", num_bits=8, strategy="channel", symmetric=True)
    scale, _ = qdq.weight_qparams(weight, w_args)
    layer = QuantLinear.from_weight(
        weight, qdq.quantize_weight(weight, scale, None, w_args), scale, None, weight_args=w_args, input_args=INT8_TOKEN
    )
    x = _activations(20, 300, torch.bfloat16, seed=2).reshape(4, 5, 300).to(DEVICE)
    calls = []
    real = qdq_kernel.int_activation_codes
    monkeypatch.setattr(qdq_kernel, "int_activation_codes", lambda *a: calls.append(1) or real(*a))
    fused = layer(x)
    assert calls == [1]
    monkeypatch.setattr(qdq_kernel, "available", lambda device: False)
    _assert_bitwise_equal(fused, layer(x))
    assert calls == [1]


def test_dynamic_tensor_scales_stay_on_torch() -> None:
    args = QuantArgs(type="int", num_bits=8, strategy="tensor", symmetric=True, dynamic=True)
    assert not qdq_kernel.supports(args)
    with pytest.raises(ValueError, match="does not cover"):
        qdq_kernel.int_activation_codes(torch.ones(2, 16, device=DEVICE), args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("per_tensor", [False, True], ids=["per-channel-token", "per-tensor"])
def test_w8a8_epilogue_matches_torch_path(dtype: torch.dtype, bias: bool, per_tensor: bool) -> None:
    """scale_int_sums equals scaled_int_matmul's float32 epilogue bit for bit: int32 sums beyond 2**24 (their
    float32 rounding), strided rows (a slice of padded sums), a width beyond one block, optional bias."""
    g = torch.Generator().manual_seed(3)
    padded = torch.randint(-(2**26), 2**26, (9, 1500), generator=g, dtype=torch.int32)
    sums = padded[:5]  # rows of a padded product, as decoding gives them
    scale = torch.rand(1 if per_tensor else 5, 1, generator=g) * 1e-2
    weight_scale = (torch.rand(1 if per_tensor else 1500, 1, generator=g) * 1e-3).to(torch.bfloat16)
    b = torch.randn(1500, generator=g).to(torch.bfloat16) if bias else None
    expected = scale.float().reshape(-1, 1) * (weight_scale.float().reshape(1, -1) * sums.float())
    expected = (expected + b.float() if bias else expected).to(dtype)
    got = qdq_kernel.scale_int_sums(
        sums.to(DEVICE), scale.to(DEVICE), weight_scale.to(DEVICE), None if b is None else b.to(DEVICE), dtype
    )
    _assert_bitwise_equal(got.cpu(), expected)
