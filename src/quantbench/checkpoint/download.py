"""Fetch a model into the results tree: copy a local directory, or snapshot a Hub repo at a pinned revision.

The Hub path is ``huggingface_hub.snapshot_download`` into the Hugging Face cache: it honours
``HF_HOME``/``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` (served from the cache), and reads the token from the
environment or the cached login, never from arguments, so no token lands in Snakemake params or logs.
``results/models/{model}/`` then holds links to the cached files, so a 470 GB model is stored once.

Weights are checked before the output appears (:mod:`quantbench.checkpoint.weightfiles`): every safetensors header
and index of a local copy or a snapshot, and every cached weight file against the SHA-256 the Hub
recorded for it (a full read, about as long as copying the files once). A revision the Hub does not
have fails naming the repo and the revision.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from quantbench.checkpoint.weightfiles import model_tensors, verify_hub_blobs
from quantbench.util.errors import QuantbenchError
from quantbench.util.io import atomic_dir

log = logging.getLogger(__name__)

# Files a causal LM checkpoint needs; other repo content (e.g. original/ consolidated weights) is skipped.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py", "*.tiktoken"]


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a local directory, or a Hub repository at a pinned revision."""

    path: Path | None = None
    repo: str | None = None
    revision: str | None = None

    @classmethod
    def from_dict(cls, raw: Mapping[str, str]) -> ModelSource:
        """Inverse of :meth:`to_dict`."""
        if "path" in raw:
            return cls(path=Path(raw["path"]))
        return cls(repo=raw["repo"], revision=raw.get("revision"))

    def to_dict(self) -> dict[str, str]:
        """Plain form for Snakemake ``params:`` and provenance."""
        if self.path is not None:
            return {"path": str(self.path)}
        out = {"repo": str(self.repo)}
        if self.revision:
            out["revision"] = self.revision
        return out


def fetch_model(source: ModelSource, out_dir: str | Path) -> Path:
    """Materialise the model of ``source`` at ``out_dir`` (atomically: all files or nothing)."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        if source.path is not None:
            _copy_local(source.path, tmp)
        else:
            _snapshot(source.repo, source.revision, tmp)
    return out_dir


def _copy_local(src: Path, dst: Path) -> None:
    if not (src / "config.json").is_file():
        raise QuantbenchError(f"model path {src} is not a Hugging Face model directory (no config.json)")
    model_tensors(src)
    log.info("copying %s", src)
    for item in sorted(src.iterdir()):
        if item.is_dir():
            shutil.copytree(item, dst / item.name)
        else:
            shutil.copy2(item, dst / item.name)
            (dst / item.name).chmod(0o644)


def _snapshot(repo: str | None, revision: str | None, dst: Path) -> None:
    """Download into the Hugging Face cache (shared, resumable) and link the snapshot's files into ``dst``."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if not revision:
        log.warning("hub model %s has no pinned revision; the result is not reproducible", repo)
    log.info("downloading %s@%s", repo, revision or "main")
    try:
        snapshot = Path(snapshot_download(repo_id=repo, revision=revision, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError as exc:
        raise QuantbenchError(
            f"cannot fetch {repo}@{revision or 'main'}: the Hub is unreachable (or HF_HUB_OFFLINE=1) and the "
            f"revision is not in the local cache ({exc.__class__.__name__}); connect, or pre-download it with "
            f"`hf download {repo} --revision {revision or 'main'}`"
        ) from None
    except RevisionNotFoundError:
        raise QuantbenchError(
            f"hub repo {repo} has no revision {revision!r}; pin a commit hash, branch or tag the repo has "
            "(its revision in the config's models section)"
        ) from None
    except (RepositoryNotFoundError, HFValidationError) as exc:
        raise QuantbenchError(f"hub repo {repo!r} not found or not accessible: {exc}") from None
    if not (snapshot / "config.json").is_file():
        raise QuantbenchError(f"hub repo {repo}@{revision} has no config.json: not a model checkpoint")
    model_tensors(snapshot)
    log.info("%d cached weight file(s) match the Hub's hashes", verify_hub_blobs(snapshot))
    for item in sorted(snapshot.rglob("*")):
        if item.is_file():
            target = dst / item.relative_to(snapshot)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(item.resolve())
