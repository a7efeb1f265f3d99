"""Provenance facts for outputs: file hashes and the versions of the packages that produced them."""

from __future__ import annotations

import hashlib
import platform
from importlib import metadata
from pathlib import Path

# Packages whose versions decide what a quantized checkpoint contains and how it loads.
TRACKED_PACKAGES = ("quantbench", "torch", "transformers", "compressed-tensors", "safetensors")


def sha256_file(path: str | Path, *, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of the bytes of ``path``, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
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
