"""Int8 weights with int8 activations (INT8-Dynamic): the simulation computes what vLLM's W8A8 CUDA kernels compute.

Activation codes are ``round(x * (127 / amax))`` with both operations in float32 (vLLM's
``dynamic_scaled_int8_quant``), products of the codes are summed exactly, and the scales are applied in float32
(weight scale first, then the token's) before one rounding to the model's dtype (cutlass ``ScaledEpilogue``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantbench.quant import qdq
from quantbench.quant.linear import QuantLinear, is_w8a8_int
from quantbench.quant.schemes import QuantArgs

INT8_TOKEN = QuantArgs(type="int", num_bits=8, strategy="token", symmetric=True, dynamic=True)
INT8_CHANNEL = QuantArgs(type="int", num_bits=8, strategy="channel", symmetric=True)


def _cuda_codes(row: list[float]) -> list[int]:
    """vLLM's CUDA kernel, operation by operation in numpy float32: inv = 127 / amax; code = rint(x * inv)."""
    x = np.array(row, dtype=np.float32)
    inv = np.float32(127.0) / np.abs(x).max()
    return np.clip(np.rint(x * inv), -128, 127).astype(int).tolist()


def test_dynamic_codes_round_ties_as_the_cuda_kernel() -> None:
    """bf16 tokens put many values exactly on a half step of ``127 / amax``; their rounding depends on the form
    of the arithmetic. These two rows round up in vLLM's CUDA form and down in the division form."""
    rows = [[2.296875, 1.1484375, -1.1484375], [2.734375, 1.3671875, 0.0]]
    codes, scales = qdq.int_activation_codes(torch.tensor(rows, dtype=torch.bfloat16), INT8_TOKEN)
    assert codes.tolist() == [_cuda_codes(r) for r in rows] == [[127, 64, -64], [127, 64, 0]]
    division_form = torch.round(torch.tensor(rows) / (torch.tensor(rows).abs().amax(-1, keepdim=True) / 127))
    assert division_form[:, 1].tolist() == [63, 63]
    assert scales.flatten().tolist() == [np.float32(r[0]) / np.float32(127) for r in rows]
    zero_codes, zero_scale = qdq.int_activation_codes(torch.zeros(1, 4, dtype=torch.bfloat16), INT8_TOKEN)
    assert zero_codes.abs().sum() == 0 and zero_scale.item() == 0.0


def test_w8a8_layer_sums_codes_exactly_and_scales_once() -> None:
    """Sums of code products beyond 2**24 (a float32 matmul rounds them) stay exact; the output is
    ``bf16(s_token * (s_channel * sum))`` bit for bit, the cutlass epilogue's order."""
    torch.manual_seed(0)
    weight = torch.randn(24, 4096, dtype=torch.bfloat16)
    weight[0] = 1.0  # one channel of equal codes: its sums reach 127 * 127 * 4096 > 2**24
    scale, _ = qdq.weight_qparams(weight, INT8_CHANNEL)
    codes = qdq.quantize_weight(weight, scale, None, INT8_CHANNEL)
    layer = QuantLinear.from_weight(weight, codes, scale, None, weight_args=INT8_CHANNEL, input_args=INT8_TOKEN)
    assert is_w8a8_int(layer.weight_args, layer.input_args)
    x = torch.randn(2, 3, 4096, dtype=torch.bfloat16)
    x[0, 0] = 1.0
    x_codes, x_scales = qdq.int_activation_codes(x, INT8_TOKEN)
    sums = x_codes.reshape(-1, 4096).to(torch.int64) @ codes.to(torch.int64).t()
    assert sums.abs().max() > 2**24 and sums[0, 0] == 127 * 127 * 4096
    expected = (x_scales.reshape(-1, 1) * (scale.float().reshape(1, -1) * sums.float())).to(torch.bfloat16)
    got = layer(x).reshape(-1, 24)
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))
    # the simulation before: qdq(x) and the dequantized weight rounded to bf16, then a bf16 matmul
    before = torch.nn.functional.linear(
        qdq.quantize_dequantize_activation(x, INT8_TOKEN), layer.dequantized_weight(torch.bfloat16)
    )
    assert (before.reshape(-1, 24) != expected).float().mean() > 0.1


@pytest.mark.parametrize("bias", [False, True])
def test_w8a8_bias_is_added_in_float32_before_the_rounding(bias: bool) -> None:
    torch.manual_seed(1)
    weight = torch.randn(16, 64, dtype=torch.bfloat16)
    scale, _ = qdq.weight_qparams(weight, INT8_CHANNEL)
    codes = qdq.quantize_weight(weight, scale, None, INT8_CHANNEL)
    b = torch.randn(16, dtype=torch.bfloat16) if bias else None
    layer = QuantLinear.from_weight(weight, codes, scale, None, weight_args=INT8_CHANNEL, input_args=INT8_TOKEN, bias=b)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    x_codes, x_scales = qdq.int_activation_codes(x, INT8_TOKEN)
    y = x_scales * (scale.float().reshape(1, -1) * (x_codes @ codes.float().t()))
    if bias:
        y = y + b.float()
    assert torch.equal(layer(x), y.to(torch.bfloat16))


def test_other_int8_activation_layouts_keep_the_fake_quantized_matmul() -> None:
    """Int8 activations with int4 group weights have no W8A8 kernel: such a layer quantize-dequantizes its input."""
    int4 = QuantArgs(type="int", num_bits=4, strategy="group", group_size=32, symmetric=True)
    assert not is_w8a8_int(int4, INT8_TOKEN) and not is_w8a8_int(INT8_CHANNEL, None)
    assert is_w8a8_int(QuantArgs(type="int", num_bits=8, strategy="tensor", symmetric=True), INT8_TOKEN)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's torch._int_mm path")
@pytest.mark.parametrize("rows", [1, 8, 16, 17, 64])
def test_w8a8_on_cuda_equals_the_exact_cpu_result(rows: int) -> None:
    """On CUDA, few rows (decoding) are padded to what ``torch._int_mm`` takes; every row count gives the CPU's
    exact integer result bit for bit, sums beyond 2**24 included."""
    torch.manual_seed(2)
    weight = torch.randn(64, 4096, dtype=torch.bfloat16)
    weight[0] = 1.0
    scale, _ = qdq.weight_qparams(weight, INT8_CHANNEL)
    codes = qdq.quantize_weight(weight, scale, None, INT8_CHANNEL)
    layer = QuantLinear.from_weight(weight, codes, scale, None, weight_args=INT8_CHANNEL, input_args=INT8_TOKEN)
    x = torch.randn(rows, 4096, dtype=torch.bfloat16)
    x[0] = 1.0
    expected = layer(x)
    got = layer.to("cuda")(x.cuda()).cpu()
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))
