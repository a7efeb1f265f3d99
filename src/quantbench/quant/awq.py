"""AWQ: scale each input channel before round-to-nearest, with scales searched on the calibration data.

For each smoothing mapping (``prev`` -> ``linears`` that share one input) the scale candidates follow the
AutoAWQ formulation, which llm-compressor also uses by default ("duo scaling"):

- ``x_mean[c]``: mean ``|x_c|`` of the linears' shared input over non-padding calibration tokens;
- ``w_mean[c]``: over every output row of every linear of the mapping, the mean of ``|W[r, c]|`` divided
  by the largest ``|W|`` of its quantization group;
- for ``r`` in ``{0, 1/n, ..., (n-1)/n}`` (``n = grid_size``): ``s = x_mean^r / (w_mean^(1-r) + 1e-4)``
  (``s = x_mean^r`` without duo scaling), clamped at ``1e-4`` and divided by ``sqrt(max(s) * min(s))``;
  ``s = 1`` (plain round-to-nearest) is always a candidate too, so smoothing never loses on the loss.

Each candidate replaces every weight of the mapping by ``Q(W * s) / s`` and is scored by the squared error
of the *concatenated outputs of the mapping's linears* over all non-padding calibration tokens. That error
is the exact quadratic form ``sum_j tr(dW_j H dW_j^T)`` of the input Hessian ``H = sum x^T x``, so no
candidate needs a forward pass. (AutoAWQ scores the parent module's output instead, e.g. the attention
or MLP output, with a forward pass per candidate. On the tinyqwen3-dense fixture the linear-output loss
gave a slightly lower held-out perplexity at a tenth of the time; on an 8B model the forward passes would
cost about 20x a calibration forward per layer.)

The winner is folded into ``prev`` (a norm's weight, or the previous linear's output rows and bias) and
multiplied into the linears' input columns; the model's function is unchanged up to rounding. Then the
weights are rounded to nearest, optionally after a clipping search: per (row, group), the min-max range
shrunk by ``k / clip_grid`` for ``k < clip_max_shrink * clip_grid`` that minimises that group's own output
error ``dw H_gg dw^T`` (the group's diagonal Hessian block: all calibration tokens).
Norms must compute ``weight * f(x)`` (Qwen, Llama); others (Gemma's ``1 + weight``) are refused.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from quantbench.errors import QuantbenchError
from quantbench.quant import qdq
from quantbench.quant.linear import QuantLinear
from quantbench.schemes import AWQParams, QuantArgs, Scheme

log = logging.getLogger(__name__)


def check_foldable(module: nn.Module, name: str) -> None:
    """Refuse a ``prev`` module that AWQ cannot fold scales into: it must be a Linear or compute ``weight * f(x)``."""
    if isinstance(module, nn.Linear):
        return
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or getattr(module, "bias", None) is not None:
        raise QuantbenchError(f"{name} ({type(module).__name__}) is neither a Linear nor a bias-free norm; AWQ cannot fold into it")
    probe = torch.randn(2, weight.numel(), generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    original = weight.data
    with torch.no_grad():
        once = module(probe).float()
        weight.data = original * 2
        twice = module(probe).float()
        weight.data = original
    if not torch.allclose(twice, 2 * once, rtol=1e-2, atol=1e-3):
        raise QuantbenchError(
            f"{name} ({type(module).__name__}) does not compute weight * f(x) (e.g. a Gemma-style `1 + weight` "
            "RMSNorm); AWQ scales cannot be folded into it"
        )


def weight_magnitude(weights: Sequence[torch.Tensor], args: QuantArgs) -> torch.Tensor:
    """Per input channel, the mean over all rows of ``|W|`` relative to its quantization group's max ``|W|``."""
    stacked = torch.cat([w.float() for w in weights]).abs()
    grouped = qdq.grouped_view(stacked, args)
    relative = grouped / (grouped.amax(dim=-1, keepdim=True) + 1e-6)
    return relative.reshape(stacked.shape).mean(dim=0)


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor, params: AWQParams) -> list[torch.Tensor]:
    """The scale vectors the grid search tries: ``s = 1`` first, then one per grid ratio."""
    candidates = [torch.ones_like(x_mean)]
    for step in range(params.grid_size):
        ratio = step / params.grid_size
        scales = x_mean.pow(ratio)
        if params.duo_scaling:
            scales = scales / (w_mean.pow(1 - ratio) + 1e-4)
        scales = scales.clamp(min=1e-4)
        scales = scales / (scales.max() * scales.min()).sqrt()
        if torch.isfinite(scales).all():
            candidates.append(scales)
    return candidates


def _scaled_fake_quant(weight: torch.Tensor, scales: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """``Q(W * s) / s`` in the weight's dtype: the weight a candidate scale leaves the linear with."""
    scaled = (weight.float() * scales).to(weight.dtype)
    s, z = qdq.weight_qparams(scaled, args)
    return (qdq.fake_quantize_weight(scaled, s, z, args).float() / scales).to(weight.dtype)


@contextmanager
def _tf32_matmuls() -> Iterator[None]:
    """Float32 matmuls on TF32 tensor cores (CUDA; the CPU ignores the setting), restored afterwards."""
    previous = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = previous


def _quadratic_loss(deltas: Sequence[torch.Tensor], hessian: torch.Tensor) -> float:
    """``sum_j tr(dW_j H dW_j^T)``: the summed squared output error of linears with input Hessian H.

    ``d @ H`` is most of AWQ's time (21 candidates x [out, in] x [in, in] per mapping); on CUDA it runs in
    TF32 (10-bit mantissa inputs, float32 sums), several times faster than float32. The loss only ranks
    candidates, and its rounding error, averaged over millions of products, is far below their gaps.
    """
    with _tf32_matmuls():
        return float(sum(((d @ hessian) * d).sum() for d in deltas))


@torch.no_grad()
def search_scales(
    linears: Sequence[nn.Linear], x_mean: torch.Tensor, hessian: torch.Tensor, args: QuantArgs, params: AWQParams
) -> tuple[torch.Tensor, float]:
    """The best smoothing scales for ``linears`` (sharing an input with ``hessian``) and their relative error.

    The error is ``sum_j tr(dW_j H dW_j^T) / sum_j tr(W_j H W_j^T)``: the linears' summed output error
    over the calibration tokens relative to their outputs (biases cancel in the error and are left out).
    """
    weights = [linear.weight.data.float() for linear in linears]
    reference = _quadratic_loss(weights, hessian)
    w_mean = weight_magnitude(weights, args)
    best_loss, best = float("inf"), torch.ones_like(x_mean)
    for scales in candidate_scales(x_mean, w_mean, params):
        deltas = [_scaled_fake_quant(linear.weight.data, scales, args).float() - w for linear, w in zip(linears, weights)]
        loss = _quadratic_loss(deltas, hessian)
        if loss < best_loss:
            best_loss, best = loss, scales
    return best, best_loss / max(reference, 1e-30)


@torch.no_grad()
def apply_scales(prev: nn.Module, linears: Sequence[nn.Linear], scales: torch.Tensor) -> None:
    """Fold ``scales`` into ``prev``'s output (norm weight, or linear rows and bias) and into ``linears``' inputs."""
    if isinstance(prev, nn.Linear):
        prev.weight.data = (prev.weight.float() / scales[:, None]).to(prev.weight.dtype)
        if prev.bias is not None:
            prev.bias.data = (prev.bias.float() / scales).to(prev.bias.dtype)
    else:
        prev.weight.data = (prev.weight.float() / scales).to(prev.weight.dtype)
    for linear in linears:
        linear.weight.data = (linear.weight.float() * scales).to(linear.weight.dtype)


def clip_qparams(
    weight: torch.Tensor, hessian: torch.Tensor, args: QuantArgs, params: AWQParams
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per (row, group) shrunk min-max parameters minimising each group's output error ``dw H_gg dw^T``."""
    out_features, in_features = weight.shape
    w = qdq.grouped_view(weight.float(), args)  # [out, groups, width]
    groups, width = w.shape[1], w.shape[2]
    blocks = hessian.reshape(groups, width, groups, width).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    w_min, w_max = w.amin(dim=-1), w.amax(dim=-1)
    sdtype = qdq.scale_dtype(args, weight.dtype)
    best_err = torch.full((out_features, groups), float("inf"), device=weight.device)
    best_scale = best_zp = None
    for step in range(max(1, int(params.clip_max_shrink * params.clip_grid))):
        factor = 1 - step / params.clip_grid
        scale, zp = qdq.qparams_from_minmax(w_min * factor, w_max * factor, args, sdtype)
        s = scale.float()[..., None]
        z = 0.0 if zp is None else zp.float()[..., None]
        delta = qdq.codes_to_values(qdq.round_to_codes(w, s, z, args), s, z) - w
        err = torch.einsum("ogk,gkl,ogl->og", delta, blocks, delta)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = scale if best_scale is None else torch.where(better, scale, best_scale)
        if zp is not None:
            best_zp = zp if best_zp is None else torch.where(better, zp, best_zp)
    shape = qdq.scale_shape(out_features, in_features, args)
    return best_scale.reshape(shape), None if best_zp is None else best_zp.reshape(shape)


def awq_quantize_linear(
    linear: nn.Linear,
    scheme: Scheme,
    *,
    hessian: torch.Tensor | None = None,
    input_scale: torch.Tensor | None = None,
) -> QuantLinear:
    """Round ``linear``'s (smoothed) weight to nearest; with ``hessian`` and a per-row strategy, clip-search first."""
    args = scheme.weights
    if args is None:
        raise ValueError(f"scheme {scheme.name} quantizes no weights")
    weight = linear.weight.data
    if hessian is not None and args.strategy in ("channel", "group"):
        scale, zero_point = clip_qparams(weight, hessian, args, scheme.awq)
    else:
        scale, zero_point = qdq.weight_qparams(weight, args)
    return QuantLinear.from_weight(
        weight,
        qdq.quantize_weight(weight, scale, zero_point, args),
        scale,
        zero_point,
        weight_args=args,
        input_args=scheme.input_activations,
        input_scale=input_scale,
        bias=None if linear.bias is None else linear.bias.data,
    )
