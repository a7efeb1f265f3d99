"""The Triton column kernel of GPTQ against the torch loop it replaces on CUDA.

Marked ``kernel``: runs on a CUDA machine with Triton, or on CPU under Triton's interpreter (``TRITON_INTERPRET=1``
set before pytest starts); skipped otherwise (CPU-only torch ships without Triton), failed with ``--require-kernels``.
"""

from __future__ import annotations

import os

import pytest
import torch

from quantbench.quant import gptq, gptq_kernel
from quantbench.quant.algorithms import GPTQParams
from quantbench.quant.schemes import QuantArgs

pytestmark = pytest.mark.kernel
DEVICE = torch.device("cuda" if torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ else "cpu")

INT4_GROUP = QuantArgs(type="int", num_bits=4, strategy="group", group_size=32, symmetric=True)
INT4_ASYM = QuantArgs(type="int", num_bits=4, strategy="group", group_size=32, symmetric=False)
INT8_CHANNEL = QuantArgs(type="int", num_bits=8, strategy="channel", symmetric=True)


def _problem(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and the Hessian of heavy-tailed activations (some channels 30x the others)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g) * 0.02
    x = torch.randn(8 * cols, cols, generator=g) * torch.where(torch.rand(cols, generator=g) < 0.05, 30.0, 1.0)
    return weight.to(DEVICE), (x.t() @ x).to(DEVICE)


@pytest.mark.parametrize("args", [INT4_GROUP, INT4_ASYM, INT8_CHANNEL], ids=["int4-sym", "int4-asym", "int8-channel"])
def test_block_matches_torch_loop(args: QuantArgs) -> None:
    """One block of 60 columns (not a power of two): same codes (ties at an ulp aside), errors and updated weights."""
    rows, width = 300, 60
    weight, hessian = _problem(rows, width, seed=1)
    upper = torch.linalg.cholesky(
        torch.cholesky_inverse(
            torch.linalg.cholesky(hessian + 0.01 * hessian.diagonal().mean() * torch.eye(width, device=DEVICE))
        ),
        upper=True,
    )
    g = torch.Generator().manual_seed(2)
    scales = (torch.rand(rows, width, generator=g) * 0.004 + 0.001).to(DEVICE)
    zeros = None if args.symmetric else torch.randint(-3, 3, (rows, width), generator=g).float().to(DEVICE)
    outputs = []
    for run in (gptq._quantize_columns, gptq_kernel.quantize_columns):
        w_block, err, codes = (
            weight.clone(),
            torch.zeros(rows, width, device=DEVICE),
            torch.full((rows, width), 99.0, device=DEVICE),
        )
        run(w_block, err, codes, upper, scales, zeros, args)
        outputs.append((w_block, err, codes))
    (w_ref, err_ref, codes_ref), (w_k, err_k, codes_k) = outputs
    assert (codes_k != 99).all()  # every column written
    same_rows = (codes_k == codes_ref).all(dim=1)
    assert same_rows.float().mean() >= 0.99
    # the kernel may fuse w - e * u into one multiply-add: an error near zero (w close to the grid) then
    # differs by a few ulps of the largest errors (measured on the H100: 1.2e-6 where the largest is 1.6)
    err_tolerance = 1e-5 * float(err_ref.abs().max())
    torch.testing.assert_close(err_k[same_rows], err_ref[same_rows], rtol=1e-4, atol=err_tolerance)
    torch.testing.assert_close(w_k[same_rows], w_ref[same_rows], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("act_order", [True, False])
def test_solve_matches_torch_loop(act_order: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole solve: codes agree on >= 99.9% of weights and the output error tr(dW H dW^T) within 0.5%."""
    weight, hessian = _problem(96, 256, seed=3)
    params = GPTQParams(dampening=0.01, block_size=64, act_order=act_order)
    kernel = gptq.gptq_solve(weight, hessian, INT4_GROUP, params)
    monkeypatch.setattr(gptq_kernel, "available", lambda device: False)
    reference = gptq.gptq_solve(weight, hessian, INT4_GROUP, params)

    def loss(result: gptq.GPTQResult) -> float:
        scale = result.scale.float().repeat_interleave(INT4_GROUP.group_size, dim=1)
        delta = result.codes.float() * scale - weight
        return float(((delta @ hessian) * delta).sum())

    assert (kernel.codes == reference.codes).float().mean() >= 0.999
    assert loss(kernel) == pytest.approx(loss(reference), rel=5e-3)
