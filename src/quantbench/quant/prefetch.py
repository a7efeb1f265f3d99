"""Move blocks between host and compute device while other blocks are being quantized.

The layer-by-layer pipelines hold one block on the GPU at a time; a block of an 8B model is ~390 MB in
bf16 and ~200 MB quantized, whose copy takes a fraction of the block's own GPU work, so copies can hide
behind compute (timings: ``benchmarks/RESULTS.md``). :class:`BlockPrefetcher` copies in two background
threads, each with its own CUDA stream:

- ``take(i)`` waits for block ``i`` and starts copying block ``i + 1`` in: the compute stream waits for
  that copy before the block is used, and the copied tensors are marked as used by the compute stream so
  that the caching allocator never hands their memory out while queued kernels still read it;
- ``put_back(i, home)`` moves a finished block home after the work queued on the compute stream so far
  (the copy stream waits for that work); the main thread goes on with block ``i + 1`` meanwhile, the
  Future returned tells when the block is home, and leaving the context waits until every block is.
  Copies in and copies home run concurrently, so a slow copy home (pageable host memory is page-faulted
  in as it is written) never delays the next fetch.

Copies go through pinned buffers (:class:`PinnedStaging`, two per direction), never straight between
pageable memory and the device: the driver stages such copies itself, synchronously, which slows the
compute launched meanwhile by as much as the background copy saves (``benchmarks/RESULTS.md``). Up to two
extra blocks are on the device at times. On the CPU (or when the blocks already live on the device) the
moves are plain synchronous calls in the same order.
"""

from __future__ import annotations

import itertools
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType

import torch
from torch import nn

STAGING_BYTES = 64 * 2**20  # size of each of the two pinned buffers


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's memory as a flat uint8 tensor (a view)."""
    return tensor.reshape(-1).view(torch.uint8)


class PinnedStaging:
    """Copies between pageable host memory and a CUDA device through two pinned buffers, in turns.

    The device side of each chunk is an asynchronous copy on ``stream``; the pageable side is a CPU copy in
    the calling thread, into or out of one buffer while the device copies the other. An event per buffer
    records its last device copy, so a buffer is refilled only after the device has read it.
    """

    def __init__(self, stream: torch.cuda.Stream, chunk_bytes: int = STAGING_BYTES) -> None:
        self.stream = stream
        self.buffers = [torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.copied = [torch.cuda.Event(), torch.cuda.Event()]
        self.turn = 0

    def _chunks(self, nbytes: int) -> list[tuple[int, int, int]]:
        """``(buffer, start, end)`` byte ranges of a copy, alternating buffers."""
        size = self.buffers[0].numel()
        chunks = []
        for start in range(0, nbytes, size):
            chunks.append((self.turn, start, min(start + size, nbytes)))
            self.turn ^= 1
        return chunks

    def to_device(self, src: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A copy of host tensor ``src`` on ``device``, complete once the work queued on ``stream`` is."""
        with torch.cuda.stream(self.stream):
            dst = torch.empty(src.shape, dtype=src.dtype, device=device)
        source, target = _bytes(src.contiguous()), _bytes(dst)
        for i, start, end in self._chunks(source.numel()):
            self.copied[i].synchronize()  # the device has read this buffer's previous chunk
            self.buffers[i][: end - start].copy_(source[start:end])
            with torch.cuda.stream(self.stream):
                target[start:end].copy_(self.buffers[i][: end - start], non_blocking=True)
                self.copied[i].record(self.stream)
        return dst

    def to_host(self, src: torch.Tensor) -> torch.Tensor:
        """A copy of device tensor ``src`` in new pageable host memory, after the work queued on ``stream``."""
        dst = torch.empty(src.shape, dtype=src.dtype)
        with torch.cuda.stream(self.stream):
            source = _bytes(src.contiguous())
        target = _bytes(dst)
        waiting: tuple[int, int, int] | None = None
        for chunk in [*self._chunks(source.numel()), None]:
            if chunk is not None:
                i, start, end = chunk
                with torch.cuda.stream(self.stream):
                    self.buffers[i][: end - start].copy_(source[start:end], non_blocking=True)
                    self.copied[i].record(self.stream)
            if waiting is not None:  # empty the other buffer while this chunk travels
                j, first, last = waiting
                self.copied[j].synchronize()
                target[first:last].copy_(self.buffers[j][: last - first])
            waiting = chunk
        return dst


def already_home() -> Future[None]:
    """A done Future, as :meth:`BlockPrefetcher.put_back` returns for a block that is home at once."""
    home: Future[None] = Future()
    home.set_result(None)
    return home


def home_device(module: nn.Module) -> torch.device:
    """Where ``module``'s parameters live (its first parameter's device)."""
    return next(module.parameters()).device


class BlockPrefetcher:
    """``take(i)`` returns block ``i``'s home after it is on ``device``, and starts moving block ``i + 1``.

    Use as a context manager; the caller moves each block back home when done with it. A block fetched
    ahead but never taken (the caller stopped early) is moved back on exit.
    """

    def __init__(self, blocks: nn.ModuleList, device: torch.device, *, staging_bytes: int = STAGING_BYTES) -> None:
        self.blocks = blocks
        self.device = device
        cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.return_stream = torch.cuda.Stream(device) if cuda else None
        self.consumer = torch.cuda.current_stream(device) if cuda else None
        self.staging = PinnedStaging(self.stream, staging_bytes) if cuda else None
        self.return_staging = PinnedStaging(self.return_stream, staging_bytes) if cuda else None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="block-prefetch")
        self.return_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="block-return")
        self.pending: dict[int, Future] = {}
        self.returning: list[Future] = []

    def _fetch(self, block: nn.Module) -> tuple[torch.device, torch.cuda.Event | None]:
        home = home_device(block)
        if self.stream is None:
            block.to(self.device)
            return home, None
        with torch.cuda.stream(self.stream):
            block._apply(
                lambda t: self.staging.to_device(t, self.device) if t.device.type == "cpu" else t.to(self.device)
            )
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

    def _return(self, block: nn.Module, ready: torch.cuda.Event) -> None:
        self.return_stream.wait_event(ready)
        block._apply(lambda t: self.return_staging.to_host(t) if t.is_cuda else t)
        # every chunk was waited for: the device tensors dropped here are no longer read

    def put_back(self, index: int, home: torch.device) -> Future[None]:
        """Move block ``index`` to ``home`` once the compute stream's work queued so far is done, in the
        background when ``home`` is the CPU; the Future returned is done once the block is home."""
        if self.stream is None or home.type != "cpu":
            self.blocks[index].to(home)
            return already_home()
        ready = torch.cuda.Event()
        ready.record(self.consumer)
        self.returning.append(self.return_pool.submit(self._return, self.blocks[index], ready))
        return self.returning[-1]

    def __enter__(self) -> BlockPrefetcher:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        try:
            for future in self.returning:
                future.result()
            for index, future in self.pending.items():
                home, copied = future.result()
                if copied is not None:
                    copied.synchronize()
                self.blocks[index].to(home)
        finally:
            self.pending.clear()
            self.returning.clear()
            self.pool.shutdown()
            self.return_pool.shutdown()
