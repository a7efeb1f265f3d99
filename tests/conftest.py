"""Shared pytest fixtures, where the fixture files live, and the rules that keep the suite from going quietly green.

Fixture files: the repository ships the dense fixture model (``resources/models/tinyqwen3-dense``), the two
ShareGPT calibration sets and every 9th record of the held-out book text byte for byte as ``../shared`` holds
them (``tests/test_fixture_copies.py`` checks), so tests that need only those run on a clean clone. The rest of
``../shared`` (the MoE fixture, the full held-out text and benchmark files, the published page) is only there:
without it those tests skip, and under CI (``CI=true``) they fail, so CI cannot pass with a third of the suite
unrun.

Triton kernels: tests marked ``kernel`` run on CUDA with Triton or on Triton's CPU interpreter
(``TRITON_INTERPRET=1``) and skip elsewhere; ``--require-kernels`` (the Makefile's interpreter rerun) turns that
skip into a failure, so a Triton that fails to import cannot pass as "all skipped".
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
RESOURCES = REPO / "resources"


def in_ci() -> bool:
    """Whether the suite runs under CI (``CI`` set to true, as CI services and ``.ci/run`` set it)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--require-kernels",
        action="store_true",
        help="fail (instead of skip) the tests marked `kernel` when no Triton kernel can run here",
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kernel") is None:
        return
    import torch

    from quantbench.quant.triton_support import available, triton

    device = torch.device("cuda" if torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ else "cpu")
    if available(device):
        return
    why = "Triton is not installed" if triton is None else f"no Triton kernel runs on {device} here"
    reason = f"{why}: kernel tests need Triton with a CUDA device, or TRITON_INTERPRET=1 on CPU"
    if item.config.getoption("--require-kernels"):
        pytest.fail(f"{reason} (--require-kernels)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only shared data folder, ``../shared`` from the repository root; skip when absent, fail under CI."""
    if not SHARED.is_dir():
        reason = f"shared data folder {SHARED} is absent (expected at ../shared from the repository root)"
        if in_ci():
            pytest.fail(f"{reason}; CI=true requires it", pytrace=False)
        pytest.skip(reason)
    return SHARED


@pytest.fixture(scope="session")
def dense_model_dir() -> Path:
    """The dense fixture model the demo ships: 12.6M-parameter Qwen3, 6 layers (``resources/README.md``)."""
    return RESOURCES / "models" / "tinyqwen3-dense"


@pytest.fixture(scope="session")
def book_chunks_file() -> Path:
    """64 ~2,000-character chunks of five public-domain books the fixture models were not trained on."""
    return RESOURCES / "calib" / "gutenberg_heldout_demo.jsonl"


@pytest.fixture(scope="session")
def sharegpt_file() -> Path:
    """AngelSlim's 256 ShareGPT conversations (``{conversations: [{from, value}]}``), the Hunyuan rows' set."""
    return RESOURCES / "calib" / "sharegpt_gpt4_256.jsonl"


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
