"""GPTQ: quantize a weight column by column, pushing each column's error onto the columns not yet done.

The solver follows Frantar et al. (2022): with ``H = sum x^T x`` of the layer's input (float32), damped by
``dampening * mean(diag(H))``, the upper Cholesky factor ``U`` of ``H^-1`` gives each column's error
feedback (computed from one factorisation of ``H`` in reversed column order). Columns are processed in
blocks of ``block_size`` with lazy batch updates of the rest.

- Scale and zero point (per tensor, channel or contiguous group) are min-max of the *original* weight,
  fixed before the first column, as llm-compressor 0.14 does by default (``actorder: static``). act-order
  processes columns by descending ``diag(H)`` with those parameters, so the checkpoint keeps plain
  contiguous groups and needs no runtime ``g_idx``; every block of columns is one kernel launch.
- Dead inputs (``diag(H) == 0``: the channel was always zero) get ``H_jj = 1``: they take no error and pass
  none on, so they round to nearest; with ``dead_columns: zero`` (the published recipe's) their weight
  columns are zeroed first, before the group parameters are taken.
- A failed Cholesky raises the damping tenfold (``damping_retry: multiply``), or (``add``, the published
  recipe's) adds 0.01 to the fraction and damps the already damped matrix by it again; either up to
  ``MAX_DAMPENING`` of the original mean diagonal (recorded as a fallback).

Rounding uses :func:`qdq.round_to_codes` and :func:`qdq.codes_to_values` with the stored-dtype scales, so
dequantizing the returned codes reproduces exactly the weights the solver settled on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from quantbench.quant import gptq_kernel, qdq
from quantbench.quant.algorithms import GPTQParams
from quantbench.quant.linear import QuantLinear
from quantbench.quant.schemes import QuantArgs, Scheme
from quantbench.util.errors import QuantbenchError

log = logging.getLogger(__name__)

MAX_DAMPENING = 1.0  # the largest damping (fraction of mean(diag(H))) tried before giving up
TRIANGULAR_BLOCK = 1024  # widths up to this are inverted by one triangular solve, wider ones by halves
MAX_ROWS = 32768  # weight rows solved in one call (the experts of a MoE layer share one Hessian)


@dataclass
class GPTQResult:
    """Codes and stored parameters of one solved weight, and what the solver had to do to get them."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    dampening: float
    dead_columns: int
    notes: list[str] = field(default_factory=list)


def _inverse_cholesky(
    hessian: torch.Tensor, dampening: float, retry: str, notes: list[str]
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + d * I)^-1`` (``U^T U`` is the inverse), where ``d`` starts at
    ``dampening * mean(diag H)`` and grows on failure as ``retry`` says; returns ``U`` and ``d / mean(diag H)``.

    ``multiply``: the fraction times 10. ``add``: the fraction plus 0.01, taken of the mean diagonal of the
    already damped matrix and added to it (so the damping accumulates).

    With ``J`` the reversal of the column order and ``J H J = L L^T``, ``U = J L^-1 J``: one factorisation
    and one triangular inverse, half the float32 work of factorising ``H``, inverting it and factorising
    the inverse. Each intermediate ``[in, in]`` matrix is dropped as soon as the next exists.
    """
    mean_diag = hessian.diagonal().mean()
    fraction, added = dampening, mean_diag * 0
    while True:
        added = added + fraction * (mean_diag + added) if retry == "add" else fraction * mean_diag
        effective = float(added / mean_diag) if retry == "add" else fraction
        if effective > MAX_DAMPENING * (1 + 1e-9):
            break
        damped = hessian.flip(0, 1)
        damped.diagonal().add_(added)
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        if info == 0:
            inverse = _inverse_lower(lower)
            del lower
            if torch.isfinite(inverse.diagonal()).all():
                return inverse.flip(0, 1), effective
        fraction = fraction + 0.01 if retry == "add" else fraction * 10
        notes.append(f"Cholesky failed at dampening {effective:g}; retried with fraction {fraction:g} ({retry})")
    raise QuantbenchError(
        f"the Hessian stays singular up to dampening {MAX_DAMPENING:g}; check the calibration data "
        "(too few tokens, or activations that overflow)"
    )


def _inverse_lower(lower: torch.Tensor) -> torch.Tensor:
    """Inverse of a lower-triangular matrix, in place of ``lower``'s storage where possible.

    ``[[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]]``, by halves down to :data:`TRIANGULAR_BLOCK`
    (one triangular solve against the identity there): n^3/3 multiply-adds, mostly in two large matrix
    products per level, where one triangular solve against the whole identity takes n^3.
    """
    n = lower.shape[0]
    if n <= TRIANGULAR_BLOCK:
        identity = torch.eye(n, dtype=lower.dtype, device=lower.device)
        return torch.linalg.solve_triangular(lower, identity, upper=False)
    half = n // 2
    inverse = torch.zeros_like(lower)
    inverse[:half, :half] = _inverse_lower(lower[:half, :half])
    inverse[half:, half:] = _inverse_lower(lower[half:, half:])
    inverse[half:, :half] = -inverse[half:, half:] @ (lower[half:, :half] @ inverse[:half, :half])
    return inverse


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


def _quantize_columns(
    w_block: torch.Tensor,
    err_block: torch.Tensor,
    codes_block: torch.Tensor,
    u_block: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    args: QuantArgs,
) -> None:
    """Every column of a block in order, in place: codes into ``codes_block``, each column's error (over the
    diagonal of ``u_block``) into ``err_block``, and that error pushed onto the block's later columns.

    ``scales``/``zeros`` hold each column's parameters per row. :mod:`quant.gptq_kernel` is the same loop
    as one CUDA kernel.
    """
    for i in range(w_block.shape[1]):
        column = w_block[:, i]
        s = scales[:, i]
        z = 0.0 if zeros is None else zeros[:, i]
        q = qdq.round_to_codes(column, s, z, args)
        codes_block[:, i] = q
        err = (column - qdq.codes_to_values(q, s, z)) / u_block[i, i]
        w_block[:, i:].addr_(err, u_block[i, i:], alpha=-1.0)
        err_block[:, i] = err


def gptq_solve(weight: torch.Tensor, hessian: torch.Tensor, args: QuantArgs, params: GPTQParams) -> GPTQResult:
    """Quantize ``weight [out, in]`` against ``hessian [in, in]``; scales come out in the weight's storage dtype."""
    with _cpu_single_thread(weight.device):
        return _solve(weight, hessian, args, params)


def _solve(weight: torch.Tensor, hessian: torch.Tensor, args: QuantArgs, params: GPTQParams) -> GPTQResult:
    in_features = weight.shape[1]
    sdtype = qdq.scale_dtype(args, weight.dtype)
    notes: list[str] = []
    if not torch.isfinite(hessian).all():
        raise QuantbenchError("the Hessian has NaN/Inf entries: the calibration activations overflowed")
    w = weight.float().clone()
    h = hessian.float().clone()
    diag = h.diagonal().clone()
    dead = diag <= 0
    h.diagonal()[dead] = 1.0
    if params.dead_columns == "zero":
        w[:, dead] = 0.0

    scale, zero_point = qdq.weight_qparams(w, args, sdtype)  # the original weight's, before any column moves
    group = args.group_size if args.strategy == "group" else in_features
    if params.act_order:
        perm = torch.argsort(diag, descending=True, stable=True)
        w, h = w[:, perm], h[perm][:, perm]
    else:
        perm = torch.arange(in_features, device=w.device)
    column_param = perm // group  # processing position -> its column of the stored parameters
    upper, damp = _inverse_cholesky(h, params.dampening, params.damping_retry, notes)
    del h
    # float32 [out or 1, parameter columns]: per-tensor [1], per-channel [out, 1] or per-group [out, G] parameters
    scale_columns = scale.float().reshape(-1, scale.shape[-1])
    zero_columns = None if zero_point is None else zero_point.float().reshape(-1, zero_point.shape[-1])

    codes = torch.empty_like(w)
    quantize_columns = gptq_kernel.quantize_columns if gptq_kernel.available(w.device) else _quantize_columns
    for start in range(0, in_features, params.block_size):
        end = min(start + params.block_size, in_features)
        w_block = w[:, start:end].clone()
        err_block = torch.zeros_like(w_block)
        index = column_param[start:end]
        scales = scale_columns[:, index].expand_as(w_block).contiguous()
        zeros = None if zero_columns is None else zero_columns[:, index].expand_as(w_block).contiguous()
        quantize_columns(w_block, err_block, codes[:, start:end], upper[start:end, start:end], scales, zeros, args)
        w[:, end:].addmm_(err_block, upper[start:end, end:], alpha=-1.0)

    codes = codes[:, torch.argsort(perm)]
    if dead.any():
        treated = "weight columns zeroed" if params.dead_columns == "zero" else "rounded to nearest"
        notes.append(f"{int(dead.sum())} input channel(s) never active: {treated}")
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
    given H), in runs of at most :data:`MAX_ROWS` rows; a per-tensor scale belongs to each weight, so those are
    solved one by one.
    """
    if scheme.weights is None:
        raise ValueError(f"scheme {scheme.name} quantizes no weights")
    modules: list[QuantLinear] = []
    notes: list[str] = []
    for chunk in _row_chunks(linears, MAX_ROWS):
        solved, found = _solve_linears(chunk, hessian, scheme, input_scale)
        modules += solved
        notes += [note for note in found if note not in notes]
    return modules, notes


def _row_chunks(linears: Sequence[nn.Linear], max_rows: int) -> Iterator[list[nn.Linear]]:
    """Consecutive runs of ``linears`` of at most ``max_rows`` output rows (a single larger linear alone)."""
    chunk: list[nn.Linear] = []
    rows = 0
    for linear in linears:
        if chunk and rows + linear.out_features > max_rows:
            yield chunk
            chunk, rows = [], 0
        chunk.append(linear)
        rows += linear.out_features
    if chunk:
        yield chunk


def _solve_linears(
    linears: Sequence[nn.Linear], hessian: torch.Tensor, scheme: Scheme, input_scale: torch.Tensor | None
) -> tuple[list[QuantLinear], list[str]]:
    """:func:`gptq_quantize_linears` for one run of rows."""
    args, params = scheme.weights, scheme.params
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
