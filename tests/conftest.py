"""Shared pytest fixtures."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only shared data folder, ``../shared`` from the repository root; skip when absent."""
    path = Path(__file__).resolve().parents[1].parent / "shared"
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} is absent (expected at ../shared from the repository root)")
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's model work on one torch thread, then restore the count.

    On a small shared machine two spinning threads per process are several times slower than one.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
