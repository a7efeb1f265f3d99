"""BlockPrefetcher on CUDA: blocks reach the device in turn and go home, in the background, with the changes
made to them on the device (the copy home waits for the work queued before ``put_back``), through pinned
buffers smaller than the tensors (so in several chunks) and for every dtype a quantized block holds.

CUDA only: on the CPU the moves are plain synchronous calls, which the pipeline tests run.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantbench.quant.prefetch import BlockPrefetcher

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(512, 384).to(torch.bfloat16)
        self.register_buffer("codes", torch.randint(-128, 128, (300, 257), dtype=torch.int8))
        self.register_buffer("fp8", torch.randn(129, 65).to(torch.float8_e4m3fn))
        self.register_buffer("scale", torch.rand(7))


def test_blocks_go_home_with_device_side_updates() -> None:
    torch.manual_seed(0)
    blocks = nn.ModuleList(_Block() for _ in range(5))
    expected = []
    for index, block in enumerate(blocks):
        state = {k: v.clone() for k, v in block.state_dict().items()}
        state["linear.weight"] = (state["linear.weight"].float() * (index + 2)).to(torch.bfloat16)
        expected.append(state)
    device = torch.device("cuda")
    with BlockPrefetcher(blocks, device, staging_bytes=40_000) as prefetcher:
        for index, block in enumerate(blocks):
            home = prefetcher.take(index)
            assert home.type == "cpu" and all(t.is_cuda for t in block.state_dict().values())
            torch.cuda._sleep(20_000_000)  # ~10 ms of queued work on the compute stream before the update
            block.linear.weight.data.mul_(index + 2)
            prefetcher.put_back(index, home)
    for block, state in zip(blocks, expected):
        got = block.state_dict()
        assert all(t.device.type == "cpu" for t in got.values())
        for key, value in state.items():
            assert got[key].dtype == value.dtype
            assert torch.equal(got[key].view(torch.uint8), value.view(torch.uint8)), key
