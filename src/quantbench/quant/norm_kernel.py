"""RMSNorm in one pass on CUDA, for the calibration passes of the layer-by-layer pipeline.

transformers' RMSNorm (Qwen2, Qwen3, Hunyuan, the Qwen2.5-VL vision blocks) upcasts its input to float32
and makes about six passes over it (cast, square, mean, scale, cast back, weight), so a decoder layer's four
norms take a noticeable share of its calibration pass (``benchmarks/bench_norm.py``; ``benchmarks/RESULTS.md``).
Here one program normalises whole rows with one read and one write:
``weight * to_dtype(x * rsqrt(mean(x^2) + eps))``, the same formula in the same dtypes, with the rounding to
the input dtype before the weight multiply.

Only the order of the float32 sum of squares differs from torch's reduction, so an output differs from the
module's own by at most one unit in the last place, and rarely (``benchmarks/bench_norm.py`` counts how often).
The pipeline's passes and the hf backend's decode steps (:mod:`quantbench.evaluate.generation`) use it
through :func:`fused_rms_norms`; loglikelihood scoring runs the model's own code.
A norm class is fused only after the kernel reproduced its own forward on its first input (so a variant
such as ``(1 + weight)`` scaling keeps its own forward); inputs the kernel does not take (another dtype
than the weight's, non-contiguous) go to the module's forward too.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from quantbench.quant.triton_support import available, tl, triton

__all__ = ["fused_rms_norms", "is_rms_norm", "rms_norm"]

log = logging.getLogger(__name__)

ELEMENTS_PER_PROGRAM = 4096  # rows of a narrow norm (per attention head) share a program up to this many elements
CHECK_RTOL = 2.0**-6  # the first-input check: two bfloat16 units in the last place
_verified: dict[type, bool] = {}  # norm class -> whether the kernel reproduced its forward

if triton is not None:
    from quantbench.quant.qdq_kernel import round_to_bf16  # defined only where Triton is

    @triton.jit
    def _rms_norm_kernel(
        x_ptr, w_ptr, out_ptr, rows, eps,
        WIDTH: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, BF16: tl.constexpr,
    ):  # fmt: skip
        r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        c = tl.arange(0, BLOCK)
        ok = (r < rows)[:, None] & (c < WIDTH)[None, :]
        offsets = r[:, None] * WIDTH + c[None, :]
        x = tl.load(x_ptr + offsets, mask=ok, other=0.0)
        x32 = x.to(tl.float32)
        variance = tl.sum(x32 * x32, axis=1) * (1.0 / WIDTH)  # torch's mean multiplies by 1/n too
        normed = x32 * tl.math.rsqrt(variance + eps)[:, None]
        if BF16:  # round explicitly (Triton's interpreter casts to bfloat16 by truncation); the casts are then exact
            normed = round_to_bf16(normed)
        normed = normed.to(x.dtype).to(tl.float32)
        y = tl.load(w_ptr + c, mask=c < WIDTH, other=0.0).to(tl.float32)[None, :] * normed
        if BF16:
            y = round_to_bf16(y)
        tl.store(out_ptr + offsets, y.to(x.dtype), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x * rsqrt(mean(x^2, -1) + eps)).to(x.dtype)`` over the last dimension, the mean in float32.

    Needs :func:`available` for ``x.device``, a contiguous ``x`` and ``weight`` of ``x``'s dtype.
    """
    width = x.shape[-1]
    if not x.is_contiguous() or weight.dtype != x.dtype or weight.shape != (width,):
        raise ValueError("rms_norm needs a contiguous input and a weight of its dtype and last dimension")
    out = torch.empty_like(x)
    rows = x.numel() // width
    block = triton.next_power_of_2(width)
    per_program = max(1, ELEMENTS_PER_PROGRAM // block)
    _rms_norm_kernel[(triton.cdiv(rows, per_program),)](
        x,
        weight.contiguous(),
        out,
        rows,
        float(eps),
        WIDTH=width,
        BLOCK=block,
        ROWS=per_program,
        BF16=x.dtype == torch.bfloat16,
    )
    return out


def _epsilon(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def is_rms_norm(module: nn.Module) -> bool:
    """Whether ``module`` looks like transformers' RMSNorm: a class named ``*RMSNorm`` with a 1-D weight and an epsilon."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__.endswith("RMSNorm")
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 1
        and _epsilon(module) is not None
    )


def _fused_forward(module: nn.Module, original, *args: Any, **kwargs: Any) -> torch.Tensor:  # noqa: ANN001 - a bound forward
    if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
        return original(*args, **kwargs)
    x, weight = args[0], module.weight
    if x.dtype != weight.dtype or not x.is_contiguous() or x.shape[-1] != weight.shape[0] or not available(x.device):
        return original(x)
    kind = type(module)
    if kind not in _verified:
        expected = original(x)
        got = rms_norm(x, weight, _epsilon(module))
        _verified[kind] = expected.dtype == got.dtype and torch.allclose(got, expected, rtol=CHECK_RTOL, atol=0.0)
        if not _verified[kind]:
            log.warning("%s computes another formula than the fused RMSNorm; it keeps its own forward", kind.__name__)
        return expected
    if not _verified[kind]:
        return original(x)
    return rms_norm(x, weight, _epsilon(module))


@contextmanager
def fused_rms_norms(module: nn.Module) -> Iterator[None]:
    """Within the context, the RMSNorm submodules of ``module`` (:func:`is_rms_norm`) run :func:`rms_norm` where it can.

    Does nothing where Triton does not run. The modules get their class's forward back on exit.
    """
    norms = [m for m in module.modules() if is_rms_norm(m)] if triton is not None else []
    for norm in norms:
        norm.forward = functools.partial(_fused_forward, norm, norm.forward)
    try:
        yield
    finally:
        for norm in norms:
            del norm.forward
