"""GPTQ's column loop on CUDA: one Triton kernel runs a block of columns for every row at once.

The loop of :func:`quantbench.quant.gptq._quantize_columns` issues about ten tiny tensor operations per
weight column; on a GPU each is a kernel launch, so an 8B model's ~900k columns would cost about a minute
of launch overhead alone. Rows are independent given the Hessian, so here each program keeps a tile of
``BLOCK_ROWS`` rows of the current block in registers and walks the block's columns itself: round to
codes, error over the diagonal of the inverse-Hessian factor, rank-1 update of the columns to the right.
The block width is a compile-time constant (a solve has one, plus a narrower last block at most).

The arithmetic is the torch loop's: divisions are IEEE round-to-nearest (``div_rn``) and rounding is
half-to-even like ``torch.round`` (the 1.5 * 2**23 trick, exact for the clamped range). Only the update
``w - e * u`` may be fused into one multiply-add, so codes can differ from the torch loop's where a value
lies within an ulp of a rounding boundary (the tests bound how often, and the resulting error).

Triton is optional (:mod:`quant.triton_support`): without it :func:`available` is false and the torch loop
runs; ``TRITON_INTERPRET=1`` runs the kernel on CPU tensors, for tests on machines without a GPU.
"""

from __future__ import annotations

import torch

from quantbench.quant.schemes import QuantArgs
from quantbench.quant.triton_support import available, tl, triton

__all__ = ["BLOCK_ROWS", "available", "quantize_columns"]

BLOCK_ROWS = 16


if triton is not None:

    @triton.jit
    def _columns_kernel(
        w_ptr, err_ptr, codes_ptr, upper_ptr, scale_ptr, zero_ptr,
        rows,
        stride_w, stride_err, stride_codes, stride_upper, stride_upper_col, stride_scale, stride_zero,
        qmin, qmax,
        WIDTH: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
    ):  # fmt: skip
        r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        c = tl.arange(0, BLOCK_COLS)
        row_ok = r < rows
        col_ok = c < WIDTH
        tile_ptrs = w_ptr + r[:, None] * stride_w + c[None, :]
        tile_ok = row_ok[:, None] & col_ok[None, :]
        tile = tl.load(tile_ptrs, mask=tile_ok, other=0.0)
        for i in range(WIDTH):
            column = tl.sum(tl.where(c[None, :] == i, tile, 0.0), axis=1)
            s = tl.load(scale_ptr + r * stride_scale + i, mask=row_ok, other=1.0)
            if HAS_ZERO:
                z = tl.load(zero_ptr + r * stride_zero + i, mask=row_ok, other=0.0)
            else:
                z = tl.zeros_like(s)
            v = tl.math.div_rn(column, s) + z
            v = tl.minimum(tl.maximum(v, qmin - 1.0), qmax + 1.0)
            q = (v + 12582912.0) - 12582912.0  # 1.5 * 2**23: rounds |v| < 2**22 half-to-even
            q = tl.minimum(tl.maximum(q, qmin), qmax)
            e = tl.math.div_rn(column - (q - z) * s, tl.load(upper_ptr + i * stride_upper + i * stride_upper_col))
            u = tl.load(upper_ptr + i * stride_upper + c * stride_upper_col, mask=col_ok & (c >= i), other=0.0)
            tile = tile - e[:, None] * u[None, :]
            tl.store(codes_ptr + r * stride_codes + i, q, mask=row_ok)
            tl.store(err_ptr + r * stride_err + i, e, mask=row_ok)
        tl.store(tile_ptrs, tile, mask=tile_ok)


def quantize_columns(
    w_block: torch.Tensor,
    err_block: torch.Tensor,
    codes_block: torch.Tensor,
    u_block: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    args: QuantArgs,
) -> None:
    """Every column of a block, in place: the contract of :func:`quantbench.quant.gptq._quantize_columns`.

    All tensors are float32, with unit stride along columns except ``u_block``; ``scales``/``zeros`` hold each column's
    parameters per row (``[rows, width]``).
    """
    rows, width = w_block.shape
    for t in (w_block, err_block, codes_block, scales) + (() if zeros is None else (zeros,)):
        if t.dtype != torch.float32 or t.stride(-1) != 1:
            raise ValueError("quantize_columns needs float32 tensors with unit column stride (u_block: any strides)")
    if u_block.dtype != torch.float32:
        raise ValueError("quantize_columns needs a float32 u_block")
    grid = (triton.cdiv(rows, BLOCK_ROWS),)
    _columns_kernel[grid](
        w_block, err_block, codes_block, u_block, scales, scales if zeros is None else zeros,
        rows,
        w_block.stride(0), err_block.stride(0), codes_block.stride(0), u_block.stride(0), u_block.stride(1), scales.stride(0),
        scales.stride(0) if zeros is None else zeros.stride(0),
        float(args.qmin), float(args.qmax),
        WIDTH=width, HAS_ZERO=zeros is not None, BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLS=triton.next_power_of_2(width),
    )  # fmt: skip
