"""AWQ: scale each input channel before round-to-nearest, with scales searched on the calibration data.

Two styles, picked by the scheme (``awq.style``); both fold the winning scales into ``prev`` (a norm's
weight, or the previous linear's output rows and bias) and multiply them into the linears' input columns,
which leaves the model's function unchanged up to rounding, then round the weights to nearest.

**quantbench** (the default). For each smoothing mapping (``prev`` -> ``linears`` that share one input) the
scale candidates follow the AutoAWQ formulation, which llm-compressor also uses by default ("duo scaling"):

- ``x_mean[c]``: mean ``|x_c|`` of the linears' shared input over non-padding calibration tokens;
- ``w_mean[c]``: over every output row of every linear of the mapping, the mean of ``|W[r, c]|`` divided
  by the largest ``|W|`` of its quantization group;
- for ``r`` in ``{0, 1/n, ..., (n-1)/n}`` (``n = grid_size``): ``s = x_mean^r / (w_mean^(1-r) + 1e-4)``
  (``s = x_mean^r`` without duo scaling), clamped at ``1e-4`` and divided by ``sqrt(max(s) * min(s))``;
  ``s = 1`` (plain round-to-nearest) is always a candidate too, so smoothing never loses on the loss.

Each candidate replaces every weight of the mapping by ``Q(W * s) / s`` and is scored by the squared error
of the *concatenated outputs of the mapping's linears* over all non-padding calibration tokens. That error
is the exact quadratic form ``sum_j tr(dW_j H dW_j^T)`` of the input Hessian ``H = sum x^T x``, so no
candidate needs a forward pass. (AutoAWQ and AngelSlim score the parent module's output instead, e.g. the
attention or MLP output, with a forward pass per candidate: the ``angelslim`` style below, several times
slower; docs/fidelity.md compares the two on the fixtures.) Every mapping is searched and folded in turn, v->o and
up->down included; a MoE router reading the folded norm's output (the mapping's ``unquantized``) takes the
scales into its input columns too, so routing is unchanged. Then the weights are rounded to nearest,
optionally after a clipping search: per (row, group), the min-max range shrunk by ``k / clip_grid`` for
``k < clip_max_shrink * clip_grid`` that minimises that group's own output error ``dw H_gg dw^T`` (the
group's diagonal Hessian block: all calibration tokens).

**angelslim**: AWQ as AngelSlim ran it at commit 4cc21d9 (``compressor/quant/modules/awq/``):

- only mappings whose ``prev`` is a norm are used (norm -> q/k/v, norm -> gate/up): AngelSlim searches
  v->o and up->down too but its ``apply_scale`` folds only into modules named ``*norm*``, so those scales
  never reach the weights and are not searched here;
- candidates ``s = x_mean^r`` on the same grid, no weight term, clamped and normalised as above;
- each candidate sets the linears' weights to ``Q(W * s)`` and runs the mapping's ``block`` (the attention
  or the MLP module) on its recorded inputs divided by ``s``: the loss is the squared error of the block's
  output against the unquantized block's (one forward per candidate and chunk). ``x_mean`` and the loss
  cover the tokens the calibration set marks real: with AngelSlim's padded, unmasked samples, every position;
- every mapping of a block is searched on the block's original weights, then all are folded; a norm
  mapping feeding routed experts and other linears (Hunyuan-A13B's shared MLP) is searched and folded as
  two mappings, the others' first, both into the norm, as AngelSlim does (``auto_scale.py``). Neither
  compensates the router, which reads the folded norm's output: its logits see ``x / s`` (in the search too);
- block i+1 calibrates on block i's full-precision outputs (AngelSlim quantizes only after the last block);
- no clipping. AngelSlim's rounding (asymmetric min-max without 0 forced into the range, fp16 weights)
  is the scheme's ``rounding`` and ``dtype``, so that each can be compared on its own.

Norms must compute ``weight * f(x)`` (Qwen, Llama); others (Gemma's ``1 + weight``) are refused.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from quantbench.model.architectures import BlockStack, SmoothMapping
from quantbench.quant import qdq
from quantbench.quant.algorithms import AWQParams
from quantbench.quant.capture import ModuleCall, replay, to_device
from quantbench.quant.linear import QuantLinear
from quantbench.quant.schemes import QuantArgs, Rounding, Scheme
from quantbench.util.errors import QuantbenchError

if TYPE_CHECKING:
    from quantbench.quant.sequential import Group

log = logging.getLogger(__name__)


def check_foldable(module: nn.Module, name: str) -> None:
    """Refuse a ``prev`` module that AWQ cannot fold scales into: it must be a Linear or compute ``weight * f(x)``."""
    if isinstance(module, nn.Linear):
        return
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or getattr(module, "bias", None) is not None:
        raise QuantbenchError(
            f"{name} ({type(module).__name__}) is neither a Linear nor a bias-free norm; AWQ cannot fold into it"
        )
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


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, params: AWQParams) -> list[torch.Tensor]:
    """The scale vectors the grid search tries: ``s = 1`` first, then one per grid ratio (``w_mean``: duo scaling only)."""
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


def _fake_quant_scaled(weight: torch.Tensor, scales: torch.Tensor, args: QuantArgs, rounding: Rounding) -> torch.Tensor:
    """``Q(W * s)`` in the weight's dtype: the weight a candidate scale gives the linear before the fold."""
    scaled = (weight.float() * scales).to(weight.dtype)
    s, z = qdq.weight_qparams(scaled, args, rounding=rounding)
    return qdq.fake_quantize_weight(scaled, s, z, args, rounding)


def _scaled_fake_quant(weight: torch.Tensor, scales: torch.Tensor, args: QuantArgs, rounding: Rounding) -> torch.Tensor:
    """``Q(W * s) / s`` in the weight's dtype: the weight a candidate scale leaves the linear with."""
    return (_fake_quant_scaled(weight, scales, args, rounding).float() / scales).to(weight.dtype)


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
    linears: Sequence[nn.Linear],
    x_mean: torch.Tensor,
    hessian: torch.Tensor,
    args: QuantArgs,
    params: AWQParams,
    rounding: Rounding = qdq.COMPRESSED_TENSORS,
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
        deltas = [
            _scaled_fake_quant(linear.weight.data, scales, args, rounding).float() - w
            for linear, w in zip(linears, weights)
        ]
        loss = _quadratic_loss(deltas, hessian)
        if loss < best_loss:
            best_loss, best = loss, scales
    return best, best_loss / max(reference, 1e-30)


def angelslim_mappings(
    mappings: Sequence[SmoothMapping], prevs: Sequence[nn.Module], experts: str | None
) -> list[SmoothMapping]:
    """The mappings AngelSlim's AWQ applies: those whose ``prev`` (``prevs``, in order) is not a Linear, a mapping
    feeding routed experts (under ``experts``) and other linears split in two, the others first."""
    kept = []
    for mapping, prev in zip(mappings, prevs):
        if isinstance(prev, nn.Linear):
            continue
        if mapping.block is None:
            raise QuantbenchError(
                f"AWQ mapping {mapping.prev} -> {mapping.linears} names no block for AngelSlim's "
                "block-output loss; set its block in quantbench.model.architectures"
            )
        routed = tuple(n for n in mapping.linears if experts is not None and n.startswith(f"{experts}."))
        others = tuple(n for n in mapping.linears if n not in routed)
        kept += [replace(mapping, linears=part) for part in (others, routed) if part]
    return kept


def _divided_call(call: ModuleCall, scales: torch.Tensor, device: torch.device) -> ModuleCall:
    """``call`` on ``device`` with its hidden states (first positional argument, or ``hidden_states``) divided by ``scales``."""
    args, kwargs = to_device(call.args, device), to_device(call.kwargs, device)
    if args:
        args = (args[0] / scales.to(args[0].dtype), *args[1:])
    else:
        kwargs["hidden_states"] = kwargs["hidden_states"] / scales.to(kwargs["hidden_states"].dtype)
    return ModuleCall(args, kwargs, call.mask)


def _squared_error(output: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum |output - reference|^2`` over the real tokens of ``mask [batch, seq]`` (float32)."""
    diff = (output.float() - reference.float()).reshape(mask.numel(), -1)
    return diff[mask.reshape(-1).to(diff.device)].square().sum()


@torch.no_grad()
def search_block_scales(
    block: nn.Module,
    calls: Sequence[ModuleCall],
    linears: Sequence[nn.Linear],
    x_mean: torch.Tensor,
    scheme: Scheme,
    device: torch.device,
) -> tuple[torch.Tensor, float]:
    """AngelSlim's search (module docstring): the candidate minimising ``block``'s output error, and that error
    relative to the block's output (``sum |dy|^2 / sum |y|^2`` over the real tokens of ``calls``).

    ``block`` (the attention or MLP module holding ``linears``) is replayed on its recorded ``calls`` with the
    inputs divided by each candidate; the linears' weights are restored afterwards.
    """
    originals = [linear.weight.data for linear in linears]
    reference = [replay(block, call, device) for call in calls]
    ref_norm = float(sum(_squared_error(y, torch.zeros_like(y), call.mask) for y, call in zip(reference, calls)))
    best_loss, best = float("inf"), torch.ones_like(x_mean)
    try:
        for scales in candidate_scales(x_mean, None, scheme.params):
            for linear, weight in zip(linears, originals):
                linear.weight.data = _fake_quant_scaled(weight, scales, scheme.weights, scheme.rounding)
            errors = [
                _squared_error(replay(block, _divided_call(call, scales, device), device), y, call.mask)
                for call, y in zip(calls, reference)
            ]
            loss = float(torch.stack(errors).sum())  # one host sync per candidate
            if loss < best_loss:
                best_loss, best = loss, scales
    finally:
        for linear, weight in zip(linears, originals):
            linear.weight.data = weight
    return best, best_loss / max(ref_norm, 1e-30)


@torch.no_grad()
def apply_scales(
    prev: nn.Module, linears: Sequence[nn.Linear], scales: torch.Tensor, unquantized: Sequence[nn.Module] = ()
) -> None:
    """Fold ``scales`` into ``prev``'s output (norm weight, or linear rows and bias) and into the input columns of
    ``linears`` and of ``unquantized`` (other readers of ``prev``'s output that stay unquantized: MoE routers)."""
    if isinstance(prev, nn.Linear):
        prev.weight.data = (prev.weight.float() / scales[:, None]).to(prev.weight.dtype)
        if prev.bias is not None:
            prev.bias.data = (prev.bias.float() / scales).to(prev.bias.dtype)
    else:
        prev.weight.data = (prev.weight.float() / scales).to(prev.weight.dtype)
    for linear in (*linears, *unquantized):
        linear.weight.data = (linear.weight.float() * scales).to(linear.weight.dtype)


def clip_qparams(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    args: QuantArgs,
    params: AWQParams,
    rounding: Rounding = qdq.COMPRESSED_TENSORS,
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
        scale, zp = qdq.qparams_from_minmax(w_min * factor, w_max * factor, args, sdtype, rounding)
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
        scale, zero_point = clip_qparams(weight, hessian, args, scheme.params, scheme.rounding)
    else:
        scale, zero_point = qdq.weight_qparams(weight, args, rounding=scheme.rounding)
    return QuantLinear.from_weight(
        weight,
        qdq.quantize_weight(weight, scale, zero_point, args, scheme.rounding),
        scale,
        zero_point,
        weight_args=args,
        input_args=scheme.input_activations,
        input_scale=input_scale,
        bias=None if linear.bias is None else linear.bias.data,
    )


@dataclass(frozen=True)
class Smoothing:
    """AWQ's smoothing of one block (the sequential pipeline's step b): the mappings it searches and folds."""

    mappings: tuple[SmoothMapping, ...]
    block_loss: bool  # the ``angelslim`` style: candidates scored on the output of each mapping's ``block``

    @classmethod
    def for_block(cls, block: nn.Module, name: str, stack: BlockStack, scheme: Scheme) -> Smoothing:
        """The stack's mappings that apply to ``block`` (a linear ``prev`` must match the inputs' width), or, for
        the ``angelslim`` style, those AngelSlim applies (:func:`angelslim_mappings`)."""
        mappings = []
        for mapping in stack.smooth:
            prev = block.get_submodule(mapping.prev)
            width = block.get_submodule(mapping.linears[0]).in_features
            if isinstance(prev, nn.Linear) and prev.out_features != width:
                log.debug(
                    "%s: skip AWQ mapping %s -> %s (%d outputs feed %d inputs)",
                    name,
                    mapping.prev,
                    mapping.linears,
                    prev.out_features,
                    width,
                )
                continue
            check_foldable(prev, f"{name}.{mapping.prev}")
            mappings.append(mapping)
        block_loss = scheme.params.style == "angelslim"
        if block_loss:
            mappings = angelslim_mappings(mappings, [block.get_submodule(m.prev) for m in mappings], stack.experts)
        return cls(tuple(mappings), block_loss)

    @property
    def linears(self) -> set[str]:
        """The linears whose input the scales divide (their groups need the input's mean ``|x|``)."""
        return {n for m in self.mappings for n in m.linears}

    @property
    def recorded(self) -> list[str]:
        """The modules whose calls the block's calibration pass records for the search (the block-output loss)."""
        return list(dict.fromkeys(m.block for m in self.mappings)) if self.block_loss else []

    def apply(
        self,
        block: nn.Module,
        groups: Sequence[Group],
        scheme: Scheme,
        recorded: dict[str, list[ModuleCall]],
        device: torch.device,
    ) -> None:
        """Search, fold and record the scales of each mapping, in order (``block_loss``: every mapping searched on
        the original weights, on the ``recorded`` calls of its block, then all folded)."""
        group_of = {n: g for g in groups for n in g.names}
        searched = []
        for mapping in self.mappings:
            group = group_of[mapping.linears[0]]
            if group.stats.tokens == 0:
                group.report.fallbacks.append("no calibration tokens: AWQ smoothing skipped (plain round-to-nearest)")
                continue
            start = time.perf_counter()
            linears = [block.get_submodule(n) for n in mapping.linears]
            if self.block_loss:
                found, error = search_block_scales(
                    block.get_submodule(mapping.block),
                    recorded[mapping.block],
                    linears,
                    group.stats.mean_abs(),
                    scheme,
                    device,
                )
                searched.append((mapping, group, found))
            else:
                found, error = search_scales(
                    linears, group.stats.mean_abs(), group.stats.hessian, scheme.weights, scheme.params, scheme.rounding
                )
                routers = [block.get_submodule(n) for n in mapping.unquantized]
                apply_scales(block.get_submodule(mapping.prev), linears, found, routers)
                group.stats.divide(found)
            group.report.search_error = max(error, group.report.search_error or 0.0)  # a group's worst mapping
            group.report.seconds += time.perf_counter() - start
        for mapping, group, found in searched:  # AngelSlim folds after all searches, routers left as they are
            apply_scales(block.get_submodule(mapping.prev), [block.get_submodule(n) for n in mapping.linears], found)
            group.stats.divide(found)
