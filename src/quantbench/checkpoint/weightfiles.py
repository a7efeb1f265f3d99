"""The safetensors files of a model directory, checked from their headers before any tensor is loaded.

A safetensors file is an 8-byte little-endian header length, a JSON header (per tensor: dtype, shape and
the byte range of its data) and the data. :func:`read_header` refuses a file whose header cannot be
parsed or whose byte ranges do not tile the data that follows (a truncated download or copy, a file
overwritten in the middle); :func:`model_tensors` does that for every file of a directory (one
``model.safetensors``, or the shards a ``model.safetensors.index.json`` names, each tensor where the
index says it is). :func:`verify_hub_blobs` hashes files that a Hugging Face cache stores under their
SHA-256, which also catches flipped bytes inside the data. Every error names the file and, where there
is one, the tensor.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from quantbench.util.errors import QuantbenchError
from quantbench.util.provenance import sha256_file

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip
SHA256_NAME = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a safetensors header describes it, and the file that holds it."""

    file: Path
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]


def _corrupt(path: Path, problem: str) -> QuantbenchError:
    return QuantbenchError(f"{path}: {problem}; the file is truncated or corrupt: download, copy or export it again")


def read_header(path: str | Path) -> dict[str, TensorEntry]:
    """The tensors of safetensors file ``path`` by name, after checking that the file holds exactly their data."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
            if length is None or length > min(MAX_HEADER_BYTES, size - 8):
                raise _corrupt(path, f"no complete safetensors header ({size} bytes in all)")
            raw = handle.read(length)
    except OSError as exc:
        raise QuantbenchError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise _corrupt(path, "its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    header.pop("__metadata__", None)
    tensors: dict[str, TensorEntry] = {}
    ranges = []
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, f"tensor {name!r} has no dtype, shape and data_offsets in the header") from None
        if dtype not in DTYPE_BYTES:
            raise _corrupt(path, f"tensor {name!r} has unknown dtype {dtype!r}")
        tensors[name] = TensorEntry(path, dtype, shape)
        if end - begin != tensors[name].nbytes:
            raise _corrupt(
                path, f"tensor {name!r} ({dtype} {list(shape)}) spans {end - begin} bytes, not {tensors[name].nbytes}"
            )
        ranges.append((begin, end, name))
    data = size - 8 - length
    offset = 0
    for begin, end, name in sorted(ranges):
        if begin != offset:
            raise _corrupt(path, f"tensor {name!r} starts at data byte {begin}, expected {offset}")
        offset = end
    if offset != data:
        raise _corrupt(path, f"its header describes {offset} bytes of tensor data but the file holds {data}")
    return tensors


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of ``model_dir``: the shards its index names (each must exist), or its one file."""
    model_dir = Path(model_dir)
    index = model_dir / WEIGHTS_INDEX_FILE
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise QuantbenchError(f"{index} is not a safetensors index (JSON with a weight_map)") from None
        missing = [name for name in names if not (model_dir / name).is_file()]
        if missing:
            raise QuantbenchError(f"{index} names shard(s) {missing} that {model_dir} does not hold; download it again")
        return [model_dir / name for name in names]
    if (model_dir / WEIGHTS_FILE).is_file():
        return [model_dir / WEIGHTS_FILE]
    raise QuantbenchError(f"{model_dir} holds no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}")


def model_tensors(model_dir: str | Path) -> dict[str, TensorEntry]:
    """Every tensor of the model in ``model_dir`` by name, each file checked (:func:`read_header`), and each
    tensor in the shard the index names."""
    model_dir = Path(model_dir)
    tensors: dict[str, TensorEntry] = {}
    for path in weight_files(model_dir):
        for name, entry in read_header(path).items():
            if name in tensors:
                raise QuantbenchError(f"tensor {name!r} is stored twice, in {tensors[name].file} and {path}")
            tensors[name] = entry
    index = model_dir / WEIGHTS_INDEX_FILE
    if index.is_file():
        for name, filename in json.loads(index.read_text(encoding="utf-8"))["weight_map"].items():
            if name not in tensors or tensors[name].file.name != filename:
                raise QuantbenchError(f"{index} places tensor {name!r} in {filename}, whose header does not hold it")
    return tensors


def verify_hub_blobs(model_dir: str | Path) -> int:
    """Hash every file of ``model_dir`` that links to a Hugging Face cache blob named by its SHA-256 (LFS files:
    the weights) and compare; returns how many were checked."""
    linked = [
        p for p in sorted(Path(model_dir).rglob("*")) if p.is_symlink() and SHA256_NAME.fullmatch(p.resolve().name)
    ]
    for path in tqdm(linked, desc="verify", unit="file"):
        blob = path.resolve()
        digest = sha256_file(blob)
        if digest != blob.name:
            raise QuantbenchError(
                f"{path}: its content hashes to {digest}, not to the SHA-256 {blob.name} the Hub recorded; the cached "
                f"file {blob} is corrupt: delete it and download again"
            )
    return len(linked)
