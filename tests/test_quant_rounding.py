"""Weight rounding conventions (``scheme.rounding``): compressed-tensors' against AngelSlim's, formula by formula."""

from __future__ import annotations

import pytest
import torch

from quantbench.quant import qdq
from quantbench.quant.schemes import QuantArgs, Rounding, parse_scheme
from quantbench.util.errors import QuantbenchError

INT8_CHANNEL = QuantArgs(type="int", num_bits=8, strategy="channel", symmetric=True)
INT4_ASYM = QuantArgs(type="int", num_bits=4, strategy="group", group_size=32, symmetric=False)
ANGELSLIM_INT8 = Rounding(symmetric_scale="qmax", divide_in="weight_dtype")
ANGELSLIM_AWQ = Rounding(asymmetric_range="minmax", divide_in="weight_dtype")


def _bf16_weight(rows: int = 256, cols: int = 512, seed: int = 0) -> torch.Tensor:
    return (torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02).to(torch.bfloat16)


def test_angelslim_int8_weights_are_absmax_over_127_divided_in_bf16() -> None:
    """AngelSlim 4cc21d9 (quant_func.quantize_weight_int): scale = absmax / 127 in bf16, codes = round(w / scale)
    with the division done on bf16 tensors; compressed-tensors: absmax / 127.5, codes from the exact quotient."""
    w = _bf16_weight()
    scale, zp = qdq.weight_qparams(w, INT8_CHANNEL, rounding=ANGELSLIM_INT8)
    codes = qdq.quantize_weight(w, scale, zp, INT8_CHANNEL, ANGELSLIM_INT8)
    absmax = w.abs().amax(dim=1, keepdim=True)  # exact in bf16
    assert zp is None and scale.dtype == torch.bfloat16
    assert torch.equal(scale, absmax / 127)  # a bf16 division, as AngelSlim's scales.div_(127)
    assert torch.equal(codes, torch.round(w / scale).clamp(-128, 127).to(torch.int8))  # w.div_(scales).round_()

    ct_scale, _ = qdq.weight_qparams(w, INT8_CHANNEL)
    ct_codes = qdq.quantize_weight(w, ct_scale, None, INT8_CHANNEL)
    assert torch.equal(ct_scale, (absmax.float() / 127.5).to(torch.bfloat16))
    assert torch.equal(ct_codes, torch.round(w.float() / ct_scale.float()).clamp(-128, 127).to(torch.int8))
    # each knob on its own: the bf16 quotient moves codes by one step, the divisor changes every scale
    float32_codes = qdq.quantize_weight(w, scale, None, INT8_CHANNEL, Rounding(symmetric_scale="qmax"))
    moved = (codes != float32_codes).float().mean()
    assert 0.02 < moved < 0.2 and (codes.int() - float32_codes.int()).abs().max() == 1
    # absmax/127 and absmax/127.5 are 0.4% apart, about one bf16 step: in bf16 they often round alike
    larger = (scale.float() > ct_scale.float()).float().mean()
    assert (scale.float() >= ct_scale.float()).all() and 0.3 < larger < 0.9, larger

    def mse(c: torch.Tensor, s: torch.Tensor) -> float:
        return float((c.float() * s.float() - w.float()).square().mean())

    assert mse(codes, scale) > 1.05 * mse(float32_codes, scale)  # rounding a rounded quotient costs accuracy


def test_minmax_range_is_not_forced_to_include_zero() -> None:
    """AngelSlim's pseudo_quantize_tensor: scale (max - min) / 15 over the group's own range (floored at 1e-5),
    zero point -round(min / scale) clamped to the code range; compressed-tensors widens the range to include 0.
    The two differ only for groups of one sign: near 0 the raw range is a little finer, farther than half a
    step from 0 the clamped zero point leaves part of the group outside the representable values."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(4, 64, generator=gen)  # rows 0, 1: mixed signs
    w[2, :32] = torch.rand(32, generator=gen) + 0.02  # one sign, its minimum below half a step:
    w[2, 0] = 0.01
    w[2, 32:] = 0.7  # a constant group
    w[3, :32] = torch.rand(32, generator=gen) + 5.0  # [5, 6): one sign, far from 0
    w[3, 32:] = -torch.rand(32, generator=gen) - 5.0
    minmax = Rounding(asymmetric_range="minmax")
    grouped = w.reshape(4, 2, 32)
    w_min, w_max = grouped.amin(-1), grouped.amax(-1)
    scale, zp = qdq.weight_qparams(w, INT4_ASYM, rounding=minmax)
    expected = (w_max - w_min).clamp(min=1e-5) / 15
    assert torch.equal(scale, expected)
    assert torch.equal(zp.float(), torch.round(-8 - w_min / expected).clamp(-8, 7))
    assert scale[2, 1] == pytest.approx(1e-5 / 15)  # the constant group: AngelSlim's floor
    ct_scale, ct_zp = qdq.weight_qparams(w, INT4_ASYM)
    zero = torch.zeros(())
    assert torch.equal(ct_scale, (torch.maximum(w_max, zero) - torch.minimum(w_min, zero)) / 15)
    assert torch.equal(scale[:2], ct_scale[:2]) and torch.equal(zp[:2], ct_zp[:2])  # mixed signs: the same
    err = (qdq.fake_quantize_weight(w, scale, zp, INT4_ASYM, minmax) - w).reshape(4, 2, 32).abs()
    ct_err = (qdq.fake_quantize_weight(w, ct_scale, ct_zp, INT4_ASYM) - w).reshape(4, 2, 32).abs()
    assert err[2, 0].amax() <= scale[2, 0] / 2 + 1e-6 and scale[2, 0] < ct_scale[2, 0]
    assert err[2, 0].square().sum() < ct_err[2, 0].square().sum()
    assert err[3].amin() > 4.0 and ct_err[3].amax() <= ct_scale[3].amax() / 2 + 1e-6


def test_rounding_is_refused_where_it_does_not_apply() -> None:
    int4 = {"type": "int", "num_bits": 4, "strategy": "group", "group_size": 128, "symmetric": True}
    with pytest.raises(QuantbenchError, match="rounding: applies to integer weights rounded by rtn or awq"):
        parse_scheme("G", {"weights": int4, "algorithm": "gptq", "rounding": {"symmetric_scale": "qmax"}})
    with pytest.raises(QuantbenchError, match="symmetric_scale must be one of"):
        parse_scheme("R", {"weights": int4, "rounding": {"symmetric_scale": "127"}})
    with pytest.raises(QuantbenchError, match="dtype"):
        parse_scheme("R", {"weights": int4, "dtype": "half"})
    scheme = parse_scheme("R", {"weights": int4, "rounding": {"divide_in": "weight_dtype"}, "dtype": "float16"})
    assert scheme.to_dict()["rounding"] == {
        "symmetric_scale": "half_range",
        "asymmetric_range": "with_zero",
        "divide_in": "weight_dtype",
    }
    assert "rounding" not in parse_scheme("D", {"weights": int4}).to_dict()  # defaults leave the params as they were
