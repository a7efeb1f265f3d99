"""Move the next block to the compute device while the current one is being quantized.

The layer-by-layer pipelines hold one block on the GPU at a time; copying a block of an 8B model
(~390 MB from pageable host memory) takes a few tenths of a second on the virtualised H100/H200 this was
measured on, next to about 1.5 s of the block's own GPU work. :class:`BlockPrefetcher` copies block ``i + 1`` in a background thread
on its own CUDA stream while block ``i`` computes: the compute stream waits for that copy before the block
is used, and the copied tensors are marked as used by the compute stream so that the caching allocator
never hands their memory out while queued kernels still read it. One extra block is on the device.

On the CPU (or when the blocks already live on the device) the moves are no-ops in the same thread order.
"""

from __future__ import annotations

import itertools
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType

import torch
from torch import nn


def home_device(module: nn.Module) -> torch.device:
    """Where ``module``'s parameters live (its first parameter's device)."""
    return next(module.parameters()).device


class BlockPrefetcher:
    """``take(i)`` returns block ``i``'s home after it is on ``device``, and starts moving block ``i + 1``.

    Use as a context manager; the caller moves each block back home when done with it. A block fetched
    ahead but never taken (the caller stopped early) is moved back on exit.
    """

    def __init__(self, blocks: nn.ModuleList, device: torch.device) -> None:
        self.blocks = blocks
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.consumer = torch.cuda.current_stream(device) if device.type == "cuda" else None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="block-prefetch")
        self.pending: dict[int, Future] = {}

    def _fetch(self, block: nn.Module) -> tuple[torch.device, torch.cuda.Event | None]:
        home = home_device(block)
        if self.stream is None:
            block.to(self.device)
            return home, None
        with torch.cuda.stream(self.stream):
            block.to(self.device, non_blocking=True)
            for tensor in itertools.chain(block.parameters(), block.buffers()):
                tensor.record_stream(self.consumer)
            copied = torch.cuda.Event()
            copied.record(self.stream)
        return home, copied

    def take(self, index: int) -> torch.device:
        """Block ``index``'s home device, once the block is usable on the compute device."""
        future = self.pending.pop(index, None) or self.pool.submit(self._fetch, self.blocks[index])
        home, copied = future.result()
        if index + 1 < len(self.blocks):
            self.pending[index + 1] = self.pool.submit(self._fetch, self.blocks[index + 1])
        if copied is not None:
            self.consumer.wait_event(copied)
        return home

    def __enter__(self) -> BlockPrefetcher:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        try:
            for index, future in self.pending.items():
                home, copied = future.result()
                if copied is not None:
                    copied.synchronize()
                self.blocks[index].to(home)
        finally:
            self.pending.clear()
            self.pool.shutdown()
