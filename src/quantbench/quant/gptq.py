"""GPTQ: quantize a weight column by column, pushing each column's error onto the columns not yet done.

The solver follows Frantar et al. (2022): with ``H = sum x^T x`` of the layer's input (float32), damped by
``dampening * mean(diag(H))``, the upper Cholesky factor ``U`` of ``H^-1`` gives each column's error
feedback. Columns are processed in blocks of ``block_size`` with lazy batch updates of the rest.

- Group parameters always belong to the *contiguous* groups of the original column layout, so the
  checkpoint needs no runtime ``g_idx``. Each group's min-max parameters are fixed when the first of its
  columns is reached, from its columns as updated by every column done so far (columns in later blocks
  get the pending lazy update first). act-order processes columns by descending ``diag(H)``; a group's
  columns are then spread over the whole pass, and its parameters are still fixed at its first one.
- Channel and tensor parameters are min-max of the original weight.
- Dead inputs (``diag(H) == 0``: the channel was always zero) get ``H_jj = 1``: they take no error and pass
  none on, so they round to nearest.
- A failed Cholesky raises the damping tenfold, up to ``MAX_DAMPENING`` (recorded as a fallback).

Rounding uses :func:`qdq.round_to_codes` and :func:`qdq.codes_to_values` with the stored-dtype scales, so
dequantizing the returned codes reproduces exactly the weights the solver settled on.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from quantbench.errors import QuantbenchError
from quantbench.quant import gptq_kernel, qdq
from quantbench.quant.linear import QuantLinear
from quantbench.schemes import GPTQParams, QuantArgs, Scheme

log = logging.getLogger(__name__)

MAX_DAMPENING = 1.0  # the largest damping (fraction of mean(diag(H))) tried before giving up


@dataclass
class GPTQResult:
    """Codes and stored parameters of one solved weight, and what the solver had to do to get them."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    dampening: float
    dead_columns: int
    notes: list[str] = field(default_factory=list)


def _inverse_cholesky(hessian: torch.Tensor, dampening: float, notes: list[str]) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, raising ``damp`` tenfold on failure.

    Each intermediate ``[in, in]`` matrix is dropped as soon as the next exists (at most two alive).
    """
    mean_diag = hessian.diagonal().mean()
    damp = dampening
    while damp <= MAX_DAMPENING * (1 + 1e-9):
        damped = hessian.clone()
        damped.diagonal().add_(damp * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        if info == 0:
            inverse = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if info == 0:
                return upper, damp
        notes.append(f"Cholesky failed at dampening {damp:g}; raised to {damp * 10:g}")
        damp *= 10
    raise QuantbenchError(
        f"the Hessian stays singular up to dampening {MAX_DAMPENING:g}; check the calibration data "
        "(too few tokens, or activations that overflow)"
    )


@contextmanager
def _cpu_single_thread(device: torch.device) -> Iterator[None]:
    """On CPU, run the column loop's many tiny ops on one thread: handing each to a pool costs more than it saves."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _param_columns(param: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Float32 ``[out or 1, len(index)]``: the stored parameter (per-tensor ``[1]``, per-channel ``[out, 1]``,
    ``[out, G]``) of parameter column ``index[k]`` for each ``k``."""
    return param.float().reshape(-1, param.shape[-1])[:, index]


def _quantize_columns(
    w_block: torch.Tensor,
    err_block: torch.Tensor,
    codes_block: torch.Tensor,
    u_block: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    first: int,
    last: int,
    args: QuantArgs,
) -> None:
    """Columns ``first:last`` of a block, in place: codes into ``codes_block``, each column's error (over the
    diagonal of ``u_block``) into ``err_block``, and that error pushed onto the block's later columns.

    ``scales``/``zeros`` hold each column's parameters per row. :mod:`quant.gptq_kernel` is the same loop
    as one CUDA kernel.
    """
    for i in range(first, last):
        column = w_block[:, i]
        s = scales[:, i]
        z = 0.0 if zeros is None else zeros[:, i]
        q = qdq.round_to_codes(column, s, z, args)
        codes_block[:, i] = q
        err = (column - qdq.codes_to_values(q, s, z)) / u_block[i, i]
        w_block[:, i:].addr_(err, u_block[i, i:], alpha=-1.0)
        err_block[:, i] = err


def _current_columns(
    w: torch.Tensor,
    w_block: torch.Tensor,
    err_done: torch.Tensor,
    upper_done: torch.Tensor,
    start: int,
    positions: torch.Tensor,
    inside: int,
) -> torch.Tensor:
    """The weights at processing ``positions`` (ascending, none processed yet) as updated by every column done so far.

    The first ``inside`` positions lie in the current block, up to date in ``w_block``; later ones still owe
    the block's pending lazy update ``err_done @ upper_done[:, positions]``. Plain slicing (``inside`` is
    known on the host) keeps this free of host synchronisation.
    """
    current = torch.empty(w.shape[0], positions.numel(), dtype=w.dtype, device=w.device)
    current[:, :inside] = w_block[:, positions[:inside] - start]
    if inside < positions.numel():
        later = positions[inside:]
        current[:, inside:] = w[:, later] - err_done @ upper_done[:, later]
    return current


def gptq_solve(weight: torch.Tensor, hessian: torch.Tensor, args: QuantArgs, params: GPTQParams) -> GPTQResult:
    """Quantize ``weight [out, in]`` against ``hessian [in, in]``; scales come out in the weight's storage dtype."""
    with _cpu_single_thread(weight.device):
        return _solve(weight, hessian, args, params)


def _solve(weight: torch.Tensor, hessian: torch.Tensor, args: QuantArgs, params: GPTQParams) -> GPTQResult:
    out_features, in_features = weight.shape
    sdtype = qdq.scale_dtype(args, weight.dtype)
    notes: list[str] = []
    if not torch.isfinite(hessian).all():
        raise QuantbenchError("the Hessian has NaN/Inf entries: the calibration activations overflowed")
    w = weight.float().clone()
    h = hessian.float().clone()
    diag = h.diagonal().clone()
    dead = diag <= 0
    h.diagonal()[dead] = 1.0

    grouped = args.strategy == "group"
    group = args.group_size if grouped else in_features
    if params.act_order:
        perm = torch.argsort(diag, descending=True, stable=True)
        w, h = w[:, perm], h[perm][:, perm]
    else:
        perm = torch.arange(in_features, device=w.device)
    column_group = perm // group  # processing position -> group of the original column
    if grouped:  # parameters fixed when a group's first column is reached, from the weights as updated so far
        scale = torch.empty(out_features, in_features // group, dtype=sdtype, device=w.device)
        zero_point = None if args.symmetric else torch.empty(scale.shape, dtype=torch.int8, device=w.device)
        # group -> processing positions of its columns, ascending (min-max parameters ignore column order)
        positions = torch.argsort(perm).reshape(-1, group).sort(dim=1).values
        positions_host = positions.tolist()  # the one host synchronisation for the group schedule
        group_start = {columns[0]: g for g, columns in enumerate(positions_host)}
    else:
        scale, zero_point = qdq.weight_qparams(w, args, sdtype)
        group_start = {}
    upper, damp = _inverse_cholesky(h, params.dampening, notes)
    del h

    codes = torch.empty_like(w)
    quantize_columns = gptq_kernel.quantize_columns if gptq_kernel.available(w.device) else _quantize_columns
    for start in range(0, in_features, params.block_size):
        end = min(start + params.block_size, in_features)
        w_block = w[:, start:end].clone()
        err_block = torch.zeros_like(w_block)
        u_block = upper[start:end, start:end]
        scales = torch.empty_like(w_block)
        zeros = None if zero_point is None else torch.empty_like(w_block)
        # stretches of columns, cut where a group's parameters are fixed (at its first column)
        cuts = [start] + [col for col in range(start + 1, end) if col in group_start] + [end]
        for first, last in zip(cuts, cuts[1:]):
            if first in group_start:
                g = group_start[first]
                inside = bisect.bisect_left(positions_host[g], end)
                current = _current_columns(w, w_block, err_block[:, : first - start], upper[start:first], start, positions[g], inside)
                s, z = qdq.weight_qparams(current, args, sdtype)
                scale[:, g : g + 1] = s
                if zero_point is not None:
                    zero_point[:, g : g + 1] = z
            index = column_group[first:last]
            scales[:, first - start : last - start] = _param_columns(scale, index)
            if zeros is not None:
                zeros[:, first - start : last - start] = _param_columns(zero_point, index)
            quantize_columns(w_block, err_block, codes[:, start:end], u_block, scales, zeros, first - start, last - start, args)
        w[:, end:].addmm_(err_block, upper[start:end, end:], alpha=-1.0)

    codes = codes[:, torch.argsort(perm)]
    if dead.any():
        notes.append(f"{int(dead.sum())} input channel(s) never active: rounded to nearest")
    return GPTQResult(codes.to(torch.int8), scale, zero_point, damp, int(dead.sum()), notes)


def gptq_quantize_linears(
    linears: Sequence[nn.Linear],
    hessian: torch.Tensor,
    scheme: Scheme,
    *,
    input_scale: torch.Tensor | None = None,
) -> tuple[list[QuantLinear], list[str]]:
    """Solve linears that share one input (and so one Hessian); return their QuantLinear replacements and notes.

    With channel or group parameters the weights are stacked row-wise and solved once (rows are independent
    given H); a per-tensor scale belongs to each weight, so those are solved one by one.
    """
    args, params = scheme.weights, scheme.gptq
    if args is None:
        raise ValueError(f"scheme {scheme.name} quantizes no weights")
    if args.strategy == "tensor":
        parts = [(linear, gptq_solve(linear.weight.data, hessian, args, params), slice(None)) for linear in linears]
        scale_rows = False
    else:
        result = gptq_solve(torch.cat([linear.weight.data for linear in linears]), hessian, args, params)
        bounds = torch.tensor([0] + [linear.out_features for linear in linears]).cumsum(0).tolist()
        parts = [(linear, result, slice(lo, hi)) for linear, lo, hi in zip(linears, bounds, bounds[1:])]
        scale_rows = True
    modules = []
    for linear, result, rows in parts:
        modules.append(
            QuantLinear.from_weight(
                linear.weight.data,
                result.codes[rows],
                result.scale[rows] if scale_rows else result.scale,
                None if result.zero_point is None else result.zero_point[rows],
                weight_args=args,
                input_args=scheme.input_activations,
                input_scale=input_scale,
                bias=None if linear.bias is None else linear.bias.data,
            )
        )
    notes = list(dict.fromkeys(note for _, result, _ in parts for note in result.notes))
    return modules, notes
