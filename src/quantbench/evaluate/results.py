"""What an evaluation produced (:class:`Outcome`) and its provenance: content hashes of data files and
checkpoints, library versions, and the command line that reproduces the result."""

from __future__ import annotations

import hashlib
import platform
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any


@dataclass
class Outcome:
    """A benchmark's score as a fraction (or perplexity), with what produced it."""

    score: float
    stderr: float | None
    items: int
    task: str
    task_version: str
    details: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)  # every metric,filter lm-eval reported (fractions)


VERSIONED = ("quantbench", "lm_eval", "transformers", "torch", "datasets", "compressed-tensors", "vllm")


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_hash(model_dir: str | Path) -> str:
    """A stable hash of a model directory: sha256 over each file's relative path and content sha256.

    Independent of file dates, permissions and the directory's own path.
    """
    root = Path(model_dir)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(root).as_posix()}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def versions() -> dict[str, str | None]:
    """Versions of the libraries that shape a score (None: not installed), and Python's."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def reproduce_command(options: Mapping[str, Any]) -> str:
    """``quantbench evaluate`` with ``options`` (flag name without dashes -> value; None values left out)."""
    argv = ["quantbench", "evaluate"]
    for flag, value in options.items():
        if value is not None:
            argv += [f"--{flag}", str(value)]
    return shlex.join(argv)
