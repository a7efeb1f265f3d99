"""AWQ pieces on synthetic layers: scale search, folding, clipping search, and the norms it refuses."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from quantbench.quant import awq, qdq
from quantbench.quant.algorithms import AWQParams
from quantbench.quant.schemes import QuantArgs
from quantbench.util.errors import QuantbenchError

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
    assert _rtn_loss(weight * scales, (flat.T @ flat) / (scales[:, None] * scales[None, :])) <= _rtn_loss(
        weight, flat.T @ flat
    )


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


def _tiny_qwen3_layer(dtype: torch.dtype = torch.float64):
    """A random Qwen3 decoder layer (128 wide, 4 heads of 32, 2 kv heads), salient inputs and their rotary embeddings."""
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RotaryEmbedding

    config = Qwen3Config(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                         num_hidden_layers=1, attn_implementation="eager")  # fmt: skip
    torch.manual_seed(7)
    layer = Qwen3DecoderLayer(config, 0).to(dtype).eval()
    for module in layer.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.1)
    layer.input_layernorm.weight.data = torch.rand(128, dtype=dtype) + 0.5
    x = _salient_inputs(seed=8, tokens=2 * 48).reshape(2, 48, 128).to(dtype)
    positions = torch.arange(48)[None].expand(2, -1)
    return layer, x, Qwen3RotaryEmbedding(config)(x, positions)


@pytest.mark.slow
def test_angelslim_search_picks_the_grid_point_with_least_attention_output_error() -> None:
    """Brute force by folding: each grid candidate folded into a copy of the layer (norm / s, q/k/v * s), q/k/v
    rounded, the attention run on the norm's output; the search's choice is the one with the least error."""
    import copy

    from quantbench.quant.capture import ModuleCall
    from quantbench.quant.schemes import parse_scheme

    layer, x, position_embeddings = _tiny_qwen3_layer()
    scheme = parse_scheme("A", {"weights": INT4_ASYM.to_dict(), "algorithm": "awq", "awq": {"style": "angelslim"}})
    qkv = ("q_proj", "k_proj", "v_proj")
    with torch.no_grad():
        normed = layer.input_layernorm(x)
        reference = layer.self_attn(normed, position_embeddings, None)[0]
        x_mean = normed.abs().reshape(-1, 128).mean(0)
        brute = []
        for step in range(20):
            scales = x_mean.pow(step / 20).clamp(min=1e-4)
            scales = scales / (scales.max() * scales.min()).sqrt()
            candidate = copy.deepcopy(layer)
            linears = [getattr(candidate.self_attn, n) for n in qkv]
            awq.apply_scales(candidate.input_layernorm, linears, scales)
            for linear in linears:
                s, z = qdq.weight_qparams(linear.weight.data, INT4_ASYM)
                linear.weight.data = qdq.fake_quantize_weight(linear.weight.data, s, z, INT4_ASYM)
            out = candidate.self_attn(candidate.input_layernorm(x), position_embeddings, None)[0]
            brute.append((float((out - reference).square().sum()), scales))
        call = ModuleCall((), {"hidden_states": normed, "position_embeddings": position_embeddings, "attention_mask": None},
                          torch.ones(2, 48, dtype=torch.bool))  # fmt: skip
        weights = [getattr(layer.self_attn, n).weight.data.clone() for n in qkv]
        found, rel = awq.search_block_scales(layer.self_attn, [call], [getattr(layer.self_attn, n) for n in qkv], x_mean,
                                             scheme, torch.device("cpu"))  # fmt: skip
    losses = [loss for loss, _ in brute]
    best = min(range(20), key=losses.__getitem__)
    assert best > 0 and max(losses) > 1.5 * losses[best]  # the grid matters here, and ratio 0 (RTN) is not best
    torch.testing.assert_close(found, brute[best][1])
    assert rel == pytest.approx(losses[best] / float(reference.square().sum()), rel=1e-3)
    assert all(torch.equal(getattr(layer.self_attn, n).weight.data, w) for n, w in zip(qkv, weights))  # restored


def test_angelslim_mappings_keep_norms_and_split_routed_experts_from_the_shared_mlp() -> None:
    from quantbench.model.architectures import ARCHITECTURES

    stack = ARCHITECTURES["hunyuan_v1_moe"].language  # templated names suffice: prev types and the experts path matter
    prevs = [nn.Linear(4, 4) if m.prev.endswith("_proj") else Qwen3RMSNorm(4) for m in stack.smooth]
    kept = awq.angelslim_mappings(stack.smooth, prevs, stack.experts)
    assert [(m.prev, m.linears) for m in kept] == [
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("post_attention_layernorm", ("mlp.shared_mlp.gate_proj", "mlp.shared_mlp.up_proj")),
        ("post_attention_layernorm", ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj")),
    ]
    assert kept[0].block == "self_attn" and kept[1].block == kept[2].block == "mlp"
