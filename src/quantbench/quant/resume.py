"""Per-layer progress of a quantization run, kept beside its output so that a killed run resumes.

A run that writes its checkpoint to ``out`` keeps its progress in ``out.partial/`` (:func:`partial_dir`),
a sibling: ``out`` itself appears only once complete (:func:`quantbench.util.io.atomic_dir`), and a workflow
manager that deletes the outputs of a failed job leaves the sibling alone. The directory holds

- ``identity.json``: what the run quantizes (:func:`run_identity`: the model's files, the scheme, the
  calibration samples, seed, pipeline options, compute device and package versions). A directory
  whose identity differs from the new run's is discarded, with a log line naming what changed;
- ``<stack>.<index:05d>.safetensors`` per finished block, written atomically once the block is
  quantized (in a background thread, so that the next block does not wait for the disk): the block's
  tensors, its quantized linears in the checkpoint layout of :mod:`quantbench.checkpoint.export` (int4 packed),
  and as metadata the block's statistics, the names of its quantized linears and a checksum of the
  calibration activations it passed on to the next block.

A rerun restores the finished blocks (:meth:`LayerProgress.restore`), captures block 0's calibration
inputs again and replays the restored blocks on them, on the same device and through the same code as
the first run's propagation pass, which gives the same bits: the checksums check that
(:meth:`LayerProgress.check`), and a mismatch (a nondeterministic kernel) is logged. Activations are never
stored: up to gigabytes per layer, they cost more to write every layer than the replay costs once. The
caller removes the directory after the checkpoint is written (:meth:`LayerProgress.remove`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from quantbench.calibration.samples import Calibration
from quantbench.checkpoint.export import decompress_quantized_linear, module_tensors
from quantbench.model.architectures import BlockStack, replace_module
from quantbench.quant.capture import ModuleCall
from quantbench.quant.linear import QuantLinear
from quantbench.quant.schemes import Scheme
from quantbench.quant.stats import GroupStats, LayerStats
from quantbench.util.errors import QuantbenchError
from quantbench.util.io import atomic_write_json
from quantbench.util.provenance import package_versions, sha256_file

log = logging.getLogger(__name__)

IDENTITY_FILE = "identity.json"
STATE_FORMAT = 1
HASHED_FILE_BYTES = 16 * 2**20  # model files up to this size are hashed; larger ones are named by size and time


def partial_dir(out_dir: str | Path) -> Path:
    """Where a run writing ``out_dir`` keeps its progress: the sibling ``<out_dir>.partial``."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".partial")


# --- identity -----------------------------------------------------------------------------------------


def model_fingerprint(model_dir: str | Path) -> dict[str, str]:
    """Per file of ``model_dir``: its SHA-256 when small, else its size and what names its content.

    Weight files are too large to hash on every run: a Hugging Face cache link names its blob (the
    file's SHA-256 for LFS files); a plain file is named by size and modification time (copies keep it).
    """
    model_dir = Path(model_dir)
    out = {}
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        name = path.relative_to(model_dir).as_posix()
        size = path.stat().st_size
        if size <= HASHED_FILE_BYTES:
            out[name] = sha256_file(path)
        elif path.is_symlink():
            out[name] = f"{size} bytes, blob {path.resolve().name}"
        else:
            out[name] = f"{size} bytes, mtime_ns {path.stat().st_mtime_ns}"
    return out


def calibration_digest(calibration: Calibration | None) -> str | None:
    """SHA-256 of the calibration samples (token ids, masks, images) and their metadata."""
    if calibration is None:
        return None
    digest = hashlib.sha256(json.dumps(calibration.metadata, sort_keys=True).encode())
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "images_per_sample"):
        tensor = getattr(calibration, key)
        if tensor is not None:
            digest.update(f"{key}{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def run_identity(
    model_dir: str | Path,
    scheme: Scheme,
    calibration: Calibration | None,
    *,
    seed: int,
    options: Any,
    device: torch.device,
) -> dict[str, Any]:
    """Everything that decides the bits of a run's quantized layers (``options``: a dataclass of pipeline options)."""
    # CPU kernels may split their sums by thread: the thread count is part of what decides the bits there
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    identity = {
        "format": STATE_FORMAT,
        "model": model_fingerprint(model_dir),
        "scheme": scheme.to_dict(),
        "calibration": calibration_digest(calibration),
        "seed": seed,
        "options": asdict(options),
        "device": f"{device} ({device_name})",
        "versions": package_versions(),
    }
    return json.loads(json.dumps(identity, sort_keys=True))  # as it reads back from JSON


# --- block state --------------------------------------------------------------------------------------


def activation_checksum(calls: list[ModuleCall]) -> str:
    """A checksum of the hidden states in ``calls``: per chunk, the sum of its elements' bit patterns."""
    sums = []
    for call in calls:
        hidden = call.args[0]
        bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[hidden.element_size()]
        sums.append(hidden.view(bits).sum(dtype=torch.int64))
    return ",".join(str(v) for v in torch.stack(sums).tolist())


def _block_tensors(block: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The block's tensors on the CPU (quantized linears in the checkpoint layout), and its quantized linears' names."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in block.named_modules():
        tensors.update(module_tensors(name, module, tied=None))
    quantized = [name for name, module in block.named_modules() if isinstance(module, QuantLinear)]
    return {key: t.to("cpu") for key, t in tensors.items()}, quantized


def _stats_from_dict(raw: dict[str, Any]) -> LayerStats:
    groups = [GroupStats(**{**g, "linears": tuple(g["linears"])}) for g in raw.pop("groups")]
    return LayerStats(**raw, groups=groups)


def _restore_block(block: nn.Module, path: Path, scheme: Scheme) -> tuple[LayerStats, str | None]:
    """Put the quantized block stored in ``path`` into ``block`` (its unquantized twin); its stats and checksum."""
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata()
            stored = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a Mapping
        quantized = json.loads(metadata["quantized"])
        stats = _stats_from_dict(json.loads(metadata["stats"]))
    except (SafetensorError, KeyError, TypeError, ValueError, OSError) as exc:
        raise QuantbenchError(
            f"cannot read the saved layer {path} ({exc}); delete {path.parent} to start over"
        ) from None
    state = {}
    for name in quantized:
        prefix = f"{name}."
        local = {key.rpartition(".")[2]: stored.pop(key) for key in [k for k in stored if k.rpartition(".")[0] == name]}
        linear = block.get_submodule(name)
        module = QuantLinear(
            linear.in_features,
            linear.out_features,
            weight_args=scheme.weights,
            input_args=scheme.input_activations,
            bias=linear.bias is not None,
            dtype=linear.weight.dtype,
            device=linear.weight.device,
        )
        replace_module(block, name, module)
        state.update((prefix + key, value) for key, value in decompress_quantized_linear(local, scheme.weights).items())
    state.update(stored)
    try:
        block.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise QuantbenchError(
            f"the saved layer {path} does not fit the model ({exc}); delete {path.parent} to start over"
        ) from None
    return stats, metadata.get("checksum") or None


class LayerProgress:
    """The progress directory of one run (module docstring). Use as a context manager: leaving it waits
    for the last layer's write."""

    def __init__(self, directory: str | Path, identity: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.identity = identity
        self._checksums: dict[tuple[str, int], str | None] = {}
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-progress")
        self._pending: Future | None = None
        self._open()

    def _open(self) -> None:
        identity_file = self.directory / IDENTITY_FILE
        if self.directory.exists():
            try:
                found = json.loads(identity_file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                found, reason = None, f"its {IDENTITY_FILE} is unreadable ({exc.__class__.__name__})"
            else:
                changed = sorted(k for k in {*found, *self.identity} if found.get(k) != self.identity.get(k))
                reason = f"it was written for other inputs (changed: {', '.join(changed)})"
            if found == self.identity:
                layers = sorted(p.name for p in self.directory.glob("*.safetensors"))
                log.info("resuming from %s: %d quantized layer(s) saved", self.directory, len(layers))
                return
            log.warning("discarding the saved progress in %s: %s", self.directory, reason)
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True)
        atomic_write_json(identity_file, self.identity)

    def _layer_file(self, stack_path: str, index: int) -> Path:
        return self.directory / f"{stack_path}.{index:05d}.safetensors"

    def finished(self, stack_path: str) -> int:
        """How many blocks of the stack at ``stack_path`` are saved, counted from block 0."""
        pattern = re.compile(re.escape(stack_path) + r"\.(\d{5})\.safetensors")
        saved = {int(m.group(1)) for p in self.directory.iterdir() if (m := pattern.fullmatch(p.name))}
        count = 0
        while count in saved:
            count += 1
        return count

    def restore(self, blocks: nn.ModuleList, stack: BlockStack, scheme: Scheme) -> list[LayerStats]:
        """Put every saved block of ``stack`` into ``blocks`` (where they live); their statistics, in order."""
        layers = []
        for index in range(min(self.finished(stack.path), len(blocks))):
            stats, checksum = _restore_block(blocks[index], self._layer_file(stack.path, index), scheme)
            self._checksums[(stack.path, index)] = checksum
            layers.append(stats)
        if layers:
            log.info("%s: blocks 0-%d restored from %s", stack.path, len(layers) - 1, self.directory)
        return layers

    def check(self, stack_path: str, index: int, calls: list[ModuleCall]) -> None:
        """Compare the activations a restored block passed on now with those it passed on when it was quantized."""
        recorded = self._checksums.get((stack_path, index))
        if recorded is not None and activation_checksum(calls) != recorded:
            log.warning(
                "%s.%d: the replayed block's outputs differ from the first run's (a nondeterministic kernel on this "
                "device); the resumed checkpoint will not be byte-identical to an uninterrupted run's",
                stack_path,
                index,
            )

    def save(
        self, stack_path: str, index: int, block: nn.Module, stats: LayerStats, calls: list[ModuleCall] | None
    ) -> None:
        """Save quantized block ``index`` (``calls``: the activations it passed on, None for data-free schemes).

        The tensors are copied to the CPU here; the file is written in the background, after the previous one.
        """
        tensors, quantized = _block_tensors(block)
        metadata = {
            "quantized": json.dumps(quantized),
            "stats": json.dumps(asdict(stats)),
            "checksum": activation_checksum(calls) if calls else "",
        }
        self.wait()
        self._pending = self._writer.submit(self._write, self._layer_file(stack_path, index), tensors, metadata)

    @staticmethod
    def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)

    def wait(self) -> None:
        """Wait until the layers saved so far are on disk (raises what a write raised)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def remove(self) -> None:
        """Delete the progress directory (the run's checkpoint is written)."""
        self.wait()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> LayerProgress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        try:
            self.wait()
        finally:
            self._writer.shutdown()
