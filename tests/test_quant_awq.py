"""AWQ pieces on synthetic layers: scale search, folding, clipping search, and the norms it refuses."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from quantbench.errors import QuantbenchError
from quantbench.quant import awq, qdq
from quantbench.schemes import AWQParams, QuantArgs

INT4_ASYM = QuantArgs(type="int", num_bits=4, strategy="group", group_size=32, symmetric=False)


def _salient_inputs(seed: int = 0, tokens: int = 1024, width: int = 128) -> torch.Tensor:
    """Activations where a few channels are 20x larger than the rest, the case AWQ is made for."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=gen)
    x[:, [3, 40, 77, 100]] *= 20.0
    return x


def _rtn_loss(weight: torch.Tensor, hessian: torch.Tensor) -> float:
    scale, zp = qdq.weight_qparams(weight, INT4_ASYM)
    delta = qdq.fake_quantize_weight(weight, scale, zp, INT4_ASYM) - weight
    return float(((delta @ hessian) * delta).sum())


class OnePlusRMSNorm(nn.Module):
    """Gemma-style RMSNorm, ``x_normed * (1 + weight)``: scales cannot be folded into its weight."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


def test_foldable_norms_and_refusals() -> None:
    awq.check_foldable(Qwen3RMSNorm(16), "input_layernorm")
    awq.check_foldable(nn.Linear(16, 16), "v_proj")
    with pytest.raises(QuantbenchError, match="1 \\+ weight"):
        awq.check_foldable(OnePlusRMSNorm(16), "model.layers.0.input_layernorm")
    with pytest.raises(QuantbenchError, match="bias-free norm"):
        awq.check_foldable(nn.LayerNorm(16), "model.layers.0.norm")


def test_search_beats_rtn_with_salient_channels_and_never_loses() -> None:
    x = _salient_inputs()
    hessian = x.T @ x
    linear = nn.Linear(128, 64, bias=False)
    torch.nn.init.normal_(linear.weight, generator=torch.Generator().manual_seed(1))
    weight = linear.weight.data.clone()
    scales, rel = awq.search_scales([linear], x.abs().mean(0), hessian, INT4_ASYM, AWQParams())
    assert torch.equal(linear.weight.data, weight)  # the search leaves the weights as it found them
    assert scales[[3, 40, 77, 100]].min() > scales.median()  # salient channels get the larger scales
    rtn = _rtn_loss(weight, hessian)
    chosen = _rtn_loss(weight * scales, hessian / (scales[:, None] * scales[None, :]))
    assert rel == pytest.approx(chosen / float(((weight @ hessian) * weight).sum()), rel=1e-3)
    assert chosen < 0.8 * rtn
    # on inputs without salient channels the identity candidate keeps AWQ from doing worse than RTN
    flat = torch.randn(1024, 128, generator=torch.Generator().manual_seed(2))
    scales, _ = awq.search_scales([linear], flat.abs().mean(0), flat.T @ flat, INT4_ASYM, AWQParams())
    assert _rtn_loss(weight * scales, (flat.T @ flat) / (scales[:, None] * scales[None, :])) <= _rtn_loss(weight, flat.T @ flat)


def test_folding_keeps_the_function() -> None:
    torch.manual_seed(3)
    norm, linears = Qwen3RMSNorm(128), [nn.Linear(128, 64), nn.Linear(128, 32)]
    norm.weight.data = torch.rand(128) + 0.5
    x = _salient_inputs(seed=4, tokens=64)
    before = [linear(norm(x)) for linear in linears]
    scales = torch.rand(128) * 4 + 0.25
    awq.apply_scales(norm, linears, scales)
    for linear, expected in zip(linears, before):
        torch.testing.assert_close(linear(norm(x)), expected, rtol=1e-4, atol=1e-4)
    prev, nxt = nn.Linear(16, 128), nn.Linear(128, 8)
    expected = nxt(prev(x[:, :16]))
    awq.apply_scales(prev, [nxt], scales)
    torch.testing.assert_close(nxt(prev(x[:, :16])), expected, rtol=1e-4, atol=1e-4)


def test_clip_search_lowers_group_error_and_keeps_scales_finite() -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(512, 128, generator=gen)
    hessian = x.T @ x
    weight = torch.randn(64, 128, generator=gen)
    weight[0] = 0.0  # all-zero row
    weight[1] = -0.5  # constant row
    params = AWQParams(clip_search=True)
    scale, zp = awq.clip_qparams(weight, hessian, INT4_ASYM, params)
    assert torch.isfinite(scale.float()).all() and (scale.float() > 0).all()
    clipped = qdq.fake_quantize_weight(weight, scale, zp, INT4_ASYM) - weight
    plain_scale, plain_zp = qdq.weight_qparams(weight, INT4_ASYM)
    plain = qdq.fake_quantize_weight(weight, plain_scale, plain_zp, INT4_ASYM) - weight

    def group_errors(delta: torch.Tensor) -> torch.Tensor:  # [rows, groups]: each group's own output error
        d = delta.reshape(64, 4, 32)
        blocks = torch.stack([hessian[g * 32 : (g + 1) * 32, g * 32 : (g + 1) * 32] for g in range(4)])
        return torch.einsum("ogk,gkl,ogl->og", d, blocks, d)

    assert (group_errors(clipped) <= group_errors(plain) * (1 + 1e-5) + 1e-6).all()
    assert group_errors(clipped).sum() < 0.97 * group_errors(plain).sum()


def test_candidates_are_finite_for_zero_and_constant_channels() -> None:
    x_mean = torch.rand(64) + 0.1
    x_mean[0] = 0.0  # a channel that was never active
    w_mean = torch.rand(64)
    w_mean[1] = 0.0  # an all-zero weight column
    candidates = awq.candidate_scales(x_mean, w_mean, AWQParams(grid_size=20))
    assert len(candidates) == 21 and torch.equal(candidates[0], torch.ones(64))
    assert all(torch.isfinite(c).all() and (c > 0).all() for c in candidates)
