"""Preflight of a quantize or evaluate job: before it loads the model, check free disk for its output and
host memory for the model, and stop naming what is short and by how much.

Needs come from the model's safetensors headers (:mod:`quantbench.checkpoint.weightfiles`; no tensor is read, and a
corrupt file fails here already), measured against what the machine has now (:func:`free_disk`,
:func:`available_memory`, which honours a cgroup limit such as a SLURM job's). The needs, estimates:

* quantize: host memory for the model in BF16 (the pipeline holds it there), plus the calibration
  activations when they live in host memory (on the CPU, or offloaded: the inputs and the reference
  outputs of one layer, BF16); disk for the checkpoint and the per-layer progress beside it
  (:mod:`quantbench.quant.resume`), less what that progress already holds. Block weights are counted at the
  scheme's bits (plus scales), everything else at BF16.
* evaluate: on the CPU through the hf backend, host memory for the model in the backend's dtype
  (quantized weights as int8 codes plus their dequantized copy, or the codes alone where W8A8 multiplies
  them); on GPUs the weights go to the
  devices and host memory is not checked. Disk: room for the result file.

:class:`Headroom` adds bytes that must stay free beyond the need (a shared scratch disk, other jobs on
the node).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from quantbench.checkpoint.weightfiles import DTYPE_BYTES, TensorEntry, model_tensors
from quantbench.quant.schemes import Scheme
from quantbench.util.errors import QuantbenchError

GIB = 2**30
RESULT_BYTES = 2**20  # an evaluation's result JSON, generously
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
BLOCK = re.compile(r"(?:^|\.)(?:layers|blocks)\.\d+\.")  # decoder layers, vision blocks: what schemes quantize


@dataclass(frozen=True)
class Headroom:
    """Bytes that must stay free beyond a job's need: on the output's disk, and of host memory."""

    disk_bytes: int = 0
    memory_bytes: int = 0


@dataclass(frozen=True)
class Requirement:
    """One resource a job needs (bytes) against what the machine has (bytes)."""

    what: str
    need: int
    have: int

    @property
    def short_by(self) -> int:
        return max(0, self.need - self.have)


def _gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB"


def check_requirements(requirements: list[Requirement], job: str) -> None:
    """Raise one error naming every requirement that is not met, with the need, what there is, and the gap."""
    short = [r for r in requirements if r.short_by]
    if short:
        lines = "; ".join(
            f"{r.what}: need {_gib(r.need)}, have {_gib(r.have)}, short by {_gib(r.short_by)}" for r in short
        )
        raise QuantbenchError(f"{job} cannot run here: {lines}. Free some, or run it where there is more")


def free_disk(path: str | Path) -> int:
    """Free bytes (for this user) on the file system that ``path`` is or would be created on."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _cgroup_memory() -> int | None:
    """Memory this process's cgroup may still use (limit - usage + reclaimable file cache), None if unlimited."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            base, files = Path("/sys/fs/cgroup") / path.lstrip("/"), ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        try:
            limit = (base / files[0]).read_text().strip()
            if limit == "max" or int(limit) >= 2**60:
                continue
            usage = int((base / files[1]).read_text())
            stat = dict(row.split() for row in (base / "memory.stat").read_text().splitlines())
        except (OSError, ValueError):
            continue
        return int(limit) - usage + int(stat.get(files[2], 0))
    return None


def available_memory() -> int:
    """Host memory this process can still get: the kernel's MemAvailable, or less under a cgroup limit."""
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    available = int(meminfo["MemAvailable"].split()[0]) * 1024
    limited = _cgroup_memory() if Path("/proc/self/cgroup").exists() else None
    return available if limited is None else min(available, limited)


def _numel(entry: TensorEntry) -> int:
    return math.prod(entry.shape)


def _hidden_size(model_dir: Path) -> int:
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return int(config.get("hidden_size") or config.get("text_config", {}).get("hidden_size") or 0)


def checkpoint_bytes(tensors: dict[str, TensorEntry], scheme: Scheme) -> tuple[int, int]:
    """Estimated bytes of the checkpoint of ``scheme`` for a model of ``tensors``: (all, the blocks' share)."""
    weights = scheme.weights
    total = blocks = 0
    for name, entry in tensors.items():
        numel = _numel(entry)
        in_block = bool(BLOCK.search(name))
        if in_block and weights is not None and entry.dtype in FLOAT_DTYPES and len(entry.shape) >= 2:
            per_scale = weights.group_size if weights.strategy == "group" else entry.shape[-1]
            nbytes = numel * weights.num_bits // 8 + (numel // per_scale) * 4 * (1 + (not weights.symmetric))
        else:
            nbytes = numel * 2 if entry.dtype in FLOAT_DTYPES else entry.nbytes
        total += nbytes
        blocks += nbytes if in_block else 0
    return total, blocks


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def quantize_requirements(
    model_dir: str | Path,
    scheme: Scheme,
    out_dir: str | Path,
    *,
    progress_dir: Path | None,
    host_activations: tuple[int, int] | None,
    headroom: Headroom = Headroom(),
) -> list[Requirement]:
    """What quantizing ``model_dir`` into ``out_dir`` needs (module docstring). ``progress_dir``: where per-layer
    progress is kept (None: not kept); ``host_activations``: (samples, tokens per sample) of calibration data
    whose activations live in host memory, or None."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    tensors = model_tensors(model_dir)
    memory = sum(_numel(e) * 2 if e.dtype in FLOAT_DTYPES else e.nbytes for e in tensors.values())
    what_memory = "host memory for the model in BF16"
    if host_activations is not None:
        samples, tokens = host_activations
        memory += 2 * samples * tokens * _hidden_size(model_dir) * 2
        what_memory += " and the calibration activations"
    disk, in_blocks = checkpoint_bytes(tensors, scheme)
    what_disk = f"free disk at {out_dir.parent} for the checkpoint"
    if progress_dir is not None:
        disk += max(0, in_blocks - _tree_bytes(progress_dir))
        what_disk += " and its per-layer progress"
    return [
        Requirement(what_memory, memory + headroom.memory_bytes, available_memory()),
        Requirement(what_disk, disk + headroom.disk_bytes, free_disk(out_dir.parent)),
    ]


def evaluate_requirements(
    model_dir: str | Path, out_path: str | Path, *, host_dtype_bytes: int | None, headroom: Headroom = Headroom()
) -> list[Requirement]:
    """What evaluating ``model_dir`` into ``out_path`` needs; ``host_dtype_bytes``: bytes per value of the dtype
    the model computes in when it lives in host memory (None: it lives on GPUs)."""
    out_path = Path(out_path)
    requirements = [
        Requirement(
            f"free disk at {out_path.parent} for the result",
            RESULT_BYTES + headroom.disk_bytes,
            free_disk(out_path.parent),
        )
    ]
    if host_dtype_bytes is not None:
        memory = 0
        integer_matmuls = _w8a8_int(Path(model_dir))
        for name, entry in model_tensors(model_dir).items():
            codes = _numel(entry) * (8 if name.endswith(".weight_packed") else 1)
            if integer_matmuls and name.endswith(".weight") and entry.dtype == "I8":
                memory += codes  # W8A8 multiplies the int8 codes themselves: no dequantized copy
            elif name.endswith(".weight_packed") or (name.endswith(".weight") and DTYPE_BYTES[entry.dtype] == 1):
                memory += codes * (1 + host_dtype_bytes)  # int8 codes and the dequantized weight
            else:
                memory += _numel(entry) * host_dtype_bytes if entry.dtype in FLOAT_DTYPES else entry.nbytes
        requirements.insert(
            0,
            Requirement(
                f"host memory for the model ({host_dtype_bytes}-byte values)",
                memory + headroom.memory_bytes,
                available_memory(),
            ),
        )
    return requirements


def _w8a8_int(model_dir: Path) -> bool:
    """Whether every config group of a quantized checkpoint runs W8A8 integer matmuls (int8 weights and inputs)."""
    from quantbench.checkpoint.load import parse_config_groups
    from quantbench.quant.linear import is_w8a8_int

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    qconfig = config.get("quantization_config")
    if qconfig is None:
        return False
    return all(is_w8a8_int(weights, inputs) for _, weights, inputs in parse_config_groups(qconfig, model_dir))
