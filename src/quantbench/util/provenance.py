"""Provenance facts for outputs: file hashes and the versions of the packages that produced them."""

from __future__ import annotations

import hashlib
import platform
from importlib import metadata
from pathlib import Path
from typing import BinaryIO

# Packages whose versions decide what a quantized checkpoint contains and how it loads.
TRACKED_PACKAGES = ("quantbench", "torch", "transformers", "compressed-tensors", "safetensors")


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of the bytes of ``path``."""
    return sha256_stream(Path(path).open("rb"))


def sha256_stream(handle: BinaryIO, *, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of what is left to read in ``handle``, read in chunks; closes it."""
    digest = hashlib.sha256()
    with handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    """Installed versions of :data:`TRACKED_PACKAGES` (``"not installed"`` when absent) and of Python."""
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
