"""Shared pytest fixtures."""

import json
from dataclasses import dataclass
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


@dataclass(frozen=True)
class HeldoutSplit:
    """The fixtures' held-out Gutenberg text split in two: calibration records and evaluation texts.

    Calibration takes the even records of ``data/calib/gutenberg_heldout.jsonl``; evaluation every 18th odd
    record (spanning all five held-out books), so no evaluated text is calibrated on.
    """

    calibration_file: Path
    eval_texts: list[str]


@pytest.fixture(scope="session")
def heldout_split(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> HeldoutSplit:
    records = (shared_dir / "data" / "calib" / "gutenberg_heldout.jsonl").read_text(encoding="utf-8").splitlines()
    calib_file = tmp_path_factory.mktemp("calib") / "even.jsonl"
    calib_file.write_text("\n".join(records[0::2]) + "\n", encoding="utf-8")
    return HeldoutSplit(calib_file, [json.loads(line)["text"] for line in records[1::2][::18]])
