"""Statistics of a linear layer's input over the non-padding calibration tokens.

One :class:`InputStats` serves every linear that reads the same input tensor (q/k/v; gate/up), so a
Hessian is accumulated once per input, not once per module. What is kept is asked for up front:

- ``hessian``: ``sum x^T x`` in float32 (GPTQ; AWQ's quadratic losses), one matmul per chunk;
- ``absmax``: per-channel ``max |x|`` (static input scales are its maximum);
- ``abs_sum``: per-channel ``sum |x|`` (AWQ's activation magnitude).

All three transform exactly when the input is divided channel-wise by AWQ's smoothing scales, which
:meth:`InputStats.divide` applies, so statistics gathered once stay valid after smoothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

HESSIAN_TILE = 2048  # on CUDA, Hessians of widths that are multiples of this (from two tiles up) are built by tiles


def accumulate_hessian(hessian: torch.Tensor, rows: torch.Tensor) -> None:
    """``hessian += rows^T rows`` in float32, for ``rows [n, in]``.

    On CUDA, bf16/fp16 rows are multiplied on tensor cores with float32 output: their products are exact
    in float32 and accumulate in float32, the same arithmetic as upcasting first, at a fraction of the cost.
    A width of several :data:`HESSIAN_TILE` columns is computed by tiles: the diagonal and upper ones, each
    lower tile then the transpose of its upper twin, which skips almost half the products. Each tile's values
    are bit for bit the whole product's and the whole product is exactly symmetric, so the result is the same
    matrix (``benchmarks/bench_hessian.py`` checks both on a GPU; ``benchmarks/RESULTS.md`` records it).
    """
    if rows.is_cuda and rows.dtype in (torch.bfloat16, torch.float16):
        width = rows.shape[1]
        if width % HESSIAN_TILE or width < 2 * HESSIAN_TILE:
            hessian.add_(torch.mm(rows.t(), rows, out_dtype=torch.float32))
            return
        tiles = [slice(start, start + HESSIAN_TILE) for start in range(0, width, HESSIAN_TILE)]
        for i, a in enumerate(tiles):
            for b in tiles[i:]:
                hessian[a, b] += torch.mm(rows[:, a].t(), rows[:, b], out_dtype=torch.float32)
                if b != a:
                    hessian[b, a] = hessian[a, b].t()
    else:
        rows = rows.float()
        hessian.addmm_(rows.t(), rows)


@dataclass
class InputStats:
    """Running statistics of one input tensor ``x [..., in]`` over its non-padding rows."""

    in_features: int
    hessian: torch.Tensor | None = None
    absmax: torch.Tensor | None = None
    abs_sum: torch.Tensor | None = None
    tokens: int = 0

    @classmethod
    def create(
        cls,
        in_features: int,
        device: torch.device,
        *,
        hessian: bool = False,
        absmax: bool = False,
        abs_sum: bool = False,
    ) -> InputStats:
        """Empty statistics keeping the named quantities."""

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.float32, device=device)

        return cls(
            in_features,
            hessian=zeros(in_features, in_features) if hessian else None,
            absmax=zeros(in_features) if absmax else None,
            abs_sum=zeros(in_features) if abs_sum else None,
        )

    def update(self, rows: torch.Tensor) -> None:
        """Add the rows ``[n, in]`` of real tokens."""
        if rows.shape[-1] != self.in_features:
            raise ValueError(f"expected rows with {self.in_features} features, got shape {tuple(rows.shape)}")
        if rows.shape[0] == 0:
            return
        self.tokens += int(rows.shape[0])
        if self.hessian is not None:
            accumulate_hessian(self.hessian, rows)
        if self.absmax is not None or self.abs_sum is not None:
            magnitude = rows.abs()
            if self.absmax is not None:  # a maximum is exact in the input's dtype: no float32 copy of the rows
                torch.maximum(self.absmax, magnitude.amax(dim=0).float(), out=self.absmax)
            if self.abs_sum is not None:
                self.abs_sum.add_(magnitude.float().sum(dim=0))

    def mean_abs(self) -> torch.Tensor:
        """Per-channel mean ``|x|`` (zeros when no token was seen)."""
        if self.abs_sum is None:
            raise ValueError("abs_sum was not collected")
        return self.abs_sum / max(self.tokens, 1)

    def divide(self, scales: torch.Tensor) -> None:
        """Turn these into the statistics of ``x / scales`` (per input channel), exactly."""
        scales = scales.float()
        if self.hessian is not None:
            self.hessian.div_(scales[:, None] * scales[None, :])
        if self.absmax is not None:
            self.absmax.div_(scales)
        if self.abs_sum is not None:
            self.abs_sum.div_(scales)
