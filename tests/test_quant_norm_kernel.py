"""The fused RMSNorm kernel against transformers' RMSNorm, and its swap into a block for the pipeline's passes.

Marked ``kernel``: runs on a CUDA machine with Triton, or on CPU under Triton's interpreter (``TRITON_INTERPRET=1``
set before pytest starts); skipped otherwise (CPU-only torch ships without Triton), failed with ``--require-kernels``.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn
from transformers import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RMSNorm, Qwen3RotaryEmbedding

from quantbench.quant import norm_kernel

DEVICE = torch.device("cuda" if torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ else "cpu")
pytestmark = pytest.mark.kernel


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The input shapes :func:`norm_kernel.rms_norm` ran on (the real kernel, counted on its way in)."""
    calls: list[tuple[int, ...]] = []
    kernel = norm_kernel.rms_norm

    def counted(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return kernel(x, weight, eps)

    monkeypatch.setattr(norm_kernel, "rms_norm", counted)
    return calls


def _norm(width: int, dtype: torch.dtype, seed: int) -> Qwen3RMSNorm:
    norm = Qwen3RMSNorm(width, eps=1e-6)
    norm.weight.data = 1 + torch.randn(width, generator=torch.Generator().manual_seed(seed))
    return norm.to(DEVICE, dtype)


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(
        torch.randn(*shape[:-1], 1, generator=g) * 2
    )  # rows over many scales
    return x.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(3, 97, 4096), (3, 97, 8, 128), (5, 40)], ids=["hidden", "heads", "narrow-odd"])
def test_rms_norm_is_the_module_formula_up_to_the_sum_order(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    norm = _norm(shape[-1], dtype, seed=0)
    x = _inputs(shape, dtype, seed=1)
    expected = norm(x)
    got = norm_kernel.rms_norm(x, norm.weight, norm.variance_epsilon)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    # only the float32 sum of squares is added in another order, which moves the normalised value by about a
    # float32 rounding: a 16-bit output rarely differs, by one unit in its last place (two after the weight)
    eps = torch.finfo(dtype).eps
    if dtype != torch.float32:
        assert (got != expected).float().mean() < 2e-3
    bound = (4 if dtype == torch.float32 else 2) * eps * expected.abs().float() + torch.finfo(dtype).tiny
    assert ((got.float() - expected.float()).abs() <= bound).all()


def test_fused_norms_in_a_decoder_layer_and_restored_after(kernel_calls: list[tuple[int, ...]]) -> None:
    config = Qwen3Config(
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_hidden_layers=1,
    )
    torch.manual_seed(2)
    exact = Qwen3DecoderLayer(config, 0).to(DEVICE).eval()
    for module in exact.modules():
        if isinstance(module, Qwen3RMSNorm):
            module.weight.data.normal_(1.0, 0.3)
    layer = copy.deepcopy(exact).to(torch.bfloat16)
    hidden = torch.randn(2, 64, 256, device=DEVICE)
    position_ids = torch.arange(64, device=DEVICE)[None].expand(2, -1)
    embeddings = Qwen3RotaryEmbedding(config).to(DEVICE)(hidden, position_ids)

    def run(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        out = module(hidden.to(dtype), position_embeddings=tuple(e.to(dtype) for e in embeddings), attention_mask=None)
        return (out[0] if isinstance(out, tuple) else out).float()

    with torch.no_grad():
        truth, own = run(exact, torch.float32), run(layer, torch.bfloat16)
        norms = [m for m in layer.modules() if norm_kernel.is_rms_norm(m)]
        assert len(norms) == 4  # input, post-attention, q and k norms
        with norm_kernel.fused_rms_norms(layer):
            assert all("forward" in vars(m) for m in norms)
            fused = run(layer, torch.bfloat16)
        assert len(kernel_calls) == 4  # every norm of the layer ran the kernel
        assert not any("forward" in vars(m) for m in norms)
    assert norm_kernel._verified[Qwen3RMSNorm]
    # in bfloat16 the layer is as far from its float32 result with fused norms as with its own
    own_error, fused_error = ((t - truth).norm() / truth.norm() for t in (own, fused))
    assert 0 < fused_error < 1.05 * own_error, (fused_error, own_error)


class OffsetRMSNorm(nn.Module):
    """A Gemma-style norm, scaling by ``1 + weight``: named like the others, but another formula."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width))
        self.eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight.float())).to(x.dtype)


def test_a_norm_of_another_formula_keeps_its_own_forward(kernel_calls: list[tuple[int, ...]]) -> None:
    norm = OffsetRMSNorm(128).to(DEVICE, torch.bfloat16)
    x = _inputs((16, 128), torch.bfloat16, seed=3)
    expected = norm(x)
    assert norm_kernel.is_rms_norm(norm)
    with norm_kernel.fused_rms_norms(norm):
        first, second = norm(x), norm(x)
    assert norm_kernel._verified[OffsetRMSNorm] is False
    assert kernel_calls == [(16, 128)]  # the first call's check only
    assert torch.equal(first, expected) and torch.equal(second, expected)


def test_calls_the_kernel_does_not_take_go_to_the_module(kernel_calls: list[tuple[int, ...]]) -> None:
    norm = _norm(256, torch.bfloat16, seed=4)
    x = _inputs((4, 8, 256), torch.bfloat16, seed=5)
    expected = norm(x)
    with norm_kernel.fused_rms_norms(norm):
        by_keyword = norm(hidden_states=x)  # the kernel takes one positional input
        strided = norm(x.transpose(0, 1))  # and contiguous rows
        other_dtype = norm(x.float())  # of the weight's dtype
        assert kernel_calls == []
        norm(x)
        assert kernel_calls == [(4, 8, 256)]
    assert torch.equal(by_keyword, expected)
    assert torch.equal(strided, Qwen3RMSNorm.forward(norm, x.transpose(0, 1)))
    assert torch.equal(other_dtype, Qwen3RMSNorm.forward(norm, x.float()))
