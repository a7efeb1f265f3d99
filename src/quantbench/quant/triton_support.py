"""Whether this process can run the project's Triton kernels, and the Triton modules when it can.

Triton is optional: CPU-only torch ships without it, and then every kernel's torch twin runs instead.
``TRITON_INTERPRET=1`` (set before Triton is imported) runs kernels on CPU tensors, which is how the
kernels are tested on machines without a GPU.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch ships without Triton
    triton = None
    tl = None


def available(device: torch.device) -> bool:
    """Whether a kernel can run for tensors on ``device`` (CUDA with Triton, or Triton's interpreter on CPU)."""
    if triton is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
