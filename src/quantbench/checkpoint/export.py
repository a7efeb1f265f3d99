"""The compressed-tensors checkpoint format: write a quantized model, and map its tensors back to QuantLinear.

What :func:`save_quantized` writes into ``out_dir`` (vLLM and transformers + compressed-tensors load it):

- ``config.json`` with a minimal ``quantization_config``: one config group whose ``targets`` is ``["Linear"]``
  and whose ``ignore`` lists, by exact name, every ``nn.Linear`` left unquantized (``lm_head`` included)
  and every MoE router (vLLM builds routers as linears even where transformers does not), so the
  quantized set is exactly the model's QuantLinear modules. MoE experts are stored one linear per
  expert (``mlp.experts.<e>.gate_proj`` ...), as Hub checkpoints and vLLM name them. ``weights`` / ``input_activations`` are
  the scheme's args (field for field compressed-tensors' ``QuantizationArgs``).
- safetensors weights (``model.safetensors``, or numbered shards of about 1 GiB, each hashed while the next is
  written, plus ``model.safetensors.index.json``).
  Per quantized module ``m``, by format:

  ``float-quantized`` (fp8 weights)  ``m.weight`` float8_e4m3fn, ``m.weight_scale`` float32
  ``int-quantized`` (int8 weights)   ``m.weight`` int8, ``m.weight_scale`` in the model dtype
  ``pack-quantized`` (int4 weights)  ``m.weight_packed`` int32 ``[out, in/8]`` (codes + 8, eight per word,
                                     low nibble first along the input dimension), ``m.weight_shape`` int64
                                     ``[2]``, ``m.weight_scale`` in the model dtype

  plus ``m.weight_zero_point`` for asymmetric weights only (int4: int32 ``[out/8, groups]``, packed the
  same way along the *output* dimension, as compressed-tensors' PackedQuantizationCompressor and vLLM do),
  ``m.input_scale`` float32 ``[1]`` for static activations, and ``m.bias`` when present.
  Every other tensor stays in its model dtype; a tied output embedding is not written.
- tokenizer files, ``generation_config.json`` and ``quantbench_provenance.json`` (the caller's facts, the
  scheme, package versions and the SHA-256 of every other file; no wall-clock time, so exporting the same
  model twice gives byte-identical files).

:class:`CheckpointExport` writes the same files while the model is still being quantized: the weight files
block by block as the quantization finishes them, the rest once it is done (:func:`save_quantized` is that
with nothing left to wait for).

The tensor layout is defined here once, in both directions: :func:`compress_quantized_linear` for export and
:func:`decompress_quantized_linear` for the runtime loader. Both work on one named linear's tensors, so a
caller that holds experts as fused 3-D tensors can export them under per-expert names.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from quantbench.checkpoint.weightfiles import WEIGHTS_FILE, WEIGHTS_INDEX_FILE
from quantbench.model.architectures import kept_modules
from quantbench.quant import qdq
from quantbench.quant.linear import QuantLinear
from quantbench.quant.schemes import QuantArgs, Scheme
from quantbench.util.errors import QuantbenchError
from quantbench.util.io import atomic_dir, atomic_write_json
from quantbench.util.provenance import package_versions, sha256_file, sha256_stream

log = logging.getLogger(__name__)

QUANT_METHOD = "compressed-tensors"
CONFIG_GROUP = "group_0"
LINEAR_TARGET = "Linear"
PROVENANCE_FILE = "quantbench_provenance.json"
SAFETENSORS_METADATA = {"format": "pt"}
DEFAULT_MAX_SHARD_BYTES = (
    2**30
)  # small shards: each is hashed while the next is written, so only the last one's hash waits
PACK_FACTOR = 8  # int4 codes per int32 word
COMPRESS_AHEAD = 16  # modules compressed ahead of the one being written


def checkpoint_format(args: QuantArgs) -> str:
    """The compressed-tensors format name for weights quantized with ``args``."""
    if args.type == "float":
        return "float-quantized"
    return "pack-quantized" if args.num_bits == 4 else "int-quantized"


# --- int4 packing -----------------------------------------------------------------------------------


def pack_int4(codes: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Pack int8 codes in [-8, 7] of a 2-D tensor into int32, eight per word along ``dim``.

    Each code is stored as ``code + 8`` (0..15); the first code of a run of eight takes the lowest nibble.
    The result has ``shape[dim] / 8`` along ``dim``. Sizes that are not a multiple of 8 are rejected.
    """
    if codes.dtype != torch.int8 or codes.dim() != 2:
        raise ValueError(f"pack_int4 expects a 2-D int8 tensor, got {codes.dim()}-D {codes.dtype}")
    if dim not in (0, 1):
        raise ValueError(f"pack_int4 packs along dim 0 or 1, got {dim}")
    if codes.shape[dim] % PACK_FACTOR:
        raise QuantbenchError(
            f"cannot pack int4 codes of shape {tuple(codes.shape)} along dim {dim}: size {codes.shape[dim]} is "
            f"not a multiple of {PACK_FACTOR}; leave this module unquantized (add it to the scheme's ignore) "
            "or use an 8-bit scheme"
        )
    if codes.numel():
        low, high = torch.aminmax(codes)
        if low < -8 or high > 7:
            raise ValueError(f"int4 codes must lie in [-8, 7], got [{int(low)}, {int(high)}]")
    if dim == 0:
        codes = codes.t()
    # code + 8 (0..15) is the low nibble of the code's byte with bit 3 flipped; the high nibble is dropped below
    values = (codes.contiguous().view(torch.uint8) ^ 8).reshape(codes.shape[0], -1, 2)
    # one byte per two codes, the first in the low nibble; four bytes read as a little-endian int32 word
    # put code k of a run of eight at bits 4k..4k+3 (every platform torch runs on is little-endian)
    words = ((values[..., 0] & 0xF) | (values[..., 1] << 4)).view(torch.int32)
    return (words.t() if dim == 0 else words).contiguous()


def unpack_int4(packed: torch.Tensor, shape: tuple[int, int], dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 codes of the original 2-D ``shape``."""
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError(f"unpack_int4 expects a 2-D int32 tensor, got {packed.dim()}-D {packed.dtype}")
    expected = list(shape)
    expected[dim] = shape[dim] // PACK_FACTOR
    if shape[dim] % PACK_FACTOR or list(packed.shape) != expected:
        raise QuantbenchError(
            f"packed int4 tensor of shape {tuple(packed.shape)} does not hold codes of shape {tuple(shape)} "
            f"packed along dim {dim}; the checkpoint is corrupt or was written by another tool"
        )
    words = (packed.t() if dim == 0 else packed).contiguous().view(torch.uint8)  # little-endian, as in pack_int4
    nibbles = torch.stack((words & 0xF, words >> 4), dim=-1).reshape(words.shape[0], -1)
    codes = nibbles.to(torch.int8) - 8
    return (codes.t() if dim == 0 else codes).contiguous()


# --- one linear's tensors ---------------------------------------------------------------------------


def compress_quantized_linear(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    weight_args: QuantArgs,
    *,
    input_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The checkpoint tensors (local names: ``weight``/``weight_packed``, ...) of one quantized linear."""
    if (weight_args.type == "int" and not weight_args.symmetric) != (zero_point is not None):
        raise ValueError("asymmetric integer weights need a zero point; other weights must have none")
    tensors: dict[str, torch.Tensor] = {"weight_scale": scale}
    if checkpoint_format(weight_args) == "pack-quantized":
        tensors["weight_packed"] = pack_int4(codes, dim=1)
        tensors["weight_shape"] = torch.tensor(codes.shape, dtype=torch.int64)
        if zero_point is not None:
            tensors["weight_zero_point"] = pack_int4(zero_point, dim=0)
    else:
        tensors["weight"] = codes
        if zero_point is not None:
            tensors["weight_zero_point"] = zero_point
    if input_scale is not None:
        tensors["input_scale"] = input_scale
    if bias is not None:
        tensors["bias"] = bias
    return {name: t.detach().contiguous() for name, t in tensors.items()}


FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})  # safetensors names


def stored_linear_layout(
    out_features: int, in_features: int, weight_args: QuantArgs, input_args: QuantArgs | None, *, bias: bool
) -> dict[str, tuple[frozenset[str], tuple[int, ...]]]:
    """What :func:`compress_quantized_linear` stores for one linear: local name -> (allowed safetensors dtypes,
    shape). Scales and biases may be in any float dtype (that of the exported model)."""
    scale = qdq.scale_shape(out_features, in_features, weight_args)
    scale_dtypes = frozenset({"F32"}) if weight_args.type == "float" else FLOAT_DTYPES
    layout = {"weight_scale": (scale_dtypes, scale)}
    asymmetric = weight_args.type == "int" and not weight_args.symmetric
    if checkpoint_format(weight_args) == "pack-quantized":
        layout["weight_packed"] = (frozenset({"I32"}), (out_features, in_features // PACK_FACTOR))
        layout["weight_shape"] = (frozenset({"I64"}), (2,))
        if asymmetric:
            layout["weight_zero_point"] = (frozenset({"I32"}), (scale[0] // PACK_FACTOR, *scale[1:]))
    else:
        layout["weight"] = (
            frozenset({"F8_E4M3"} if weight_args.type == "float" else {"I8"}),
            (out_features, in_features),
        )
        if asymmetric:
            layout["weight_zero_point"] = (frozenset({"I8"}), scale)
    if input_args is not None and not input_args.dynamic:
        layout["input_scale"] = (frozenset({"F32"}), (1,))
    if bias:
        layout["bias"] = (FLOAT_DTYPES, (out_features,))
    return layout


def decompress_quantized_linear(tensors: Mapping[str, torch.Tensor], weight_args: QuantArgs) -> dict[str, torch.Tensor]:
    """Inverse of :func:`compress_quantized_linear`: QuantLinear buffer names to tensors.

    Returns ``weight_codes``, ``weight_scale`` and, when stored, ``weight_zero_point``, ``input_scale``
    and ``bias``.
    """
    out = {"weight_scale": tensors["weight_scale"]}
    if checkpoint_format(weight_args) == "pack-quantized":
        shape = tuple(int(v) for v in tensors["weight_shape"].tolist())
        out["weight_codes"] = unpack_int4(tensors["weight_packed"], shape, dim=1)
        if "weight_zero_point" in tensors:
            zp_shape = (shape[0], tensors["weight_scale"].shape[-1])
            out["weight_zero_point"] = unpack_int4(tensors["weight_zero_point"], zp_shape, dim=0)
    else:
        out["weight_codes"] = tensors["weight"]
        if "weight_zero_point" in tensors:
            out["weight_zero_point"] = tensors["weight_zero_point"]
    for name in ("input_scale", "bias"):
        if name in tensors:
            out[name] = tensors[name]
    return out


# --- model-level ------------------------------------------------------------------------------------


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    """The model's QuantLinear modules by name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def quantization_config(model: nn.Module, scheme: Scheme) -> dict[str, Any]:
    """The ``quantization_config`` entry of config.json for ``model`` quantized under ``scheme``.

    Raises when the model holds no QuantLinear or one whose args differ from the scheme's.
    """
    if scheme.weights is None:
        raise QuantbenchError(f"scheme {scheme.name} quantizes nothing; save the baseline with save_pretrained")
    modules = quantized_modules(model)
    if not modules:
        raise QuantbenchError(f"the model holds no quantized linear; quantize it with scheme {scheme.name} first")
    for name, module in modules.items():
        if module.weight_args != scheme.weights or module.input_args != scheme.input_activations:
            raise QuantbenchError(
                f"{name} was quantized with other args than scheme {scheme.name} "
                f"(weights {module.weight_args}, inputs {module.input_args}); export with the scheme used"
            )
    kept = set(kept_modules(model))
    ignore = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) or name in kept]
    group: dict[str, Any] = {"targets": [LINEAR_TARGET], "weights": scheme.weights.to_dict()}
    if scheme.input_activations is not None:
        group["input_activations"] = scheme.input_activations.to_dict()
    return {
        "quant_method": QUANT_METHOD,
        "format": checkpoint_format(scheme.weights),
        "quantization_status": "compressed",
        "config_groups": {CONFIG_GROUP: group},
        "ignore": ignore,
    }


def _tied_output_key(model: PreTrainedModel) -> str | None:
    """State-dict key of the output embedding when it is tied to the input embedding, else None."""
    if not getattr(
        model.config, "tie_word_embeddings", False
    ):  # where transformers reads it (a VLM's text config lacks it)
        return None
    output, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    if output is None:
        return None
    if output.weight.data_ptr() != inputs.weight.data_ptr():
        raise QuantbenchError(
            "config.tie_word_embeddings is true but the output embedding is not the input embedding; "
            "set tie_word_embeddings to false in the model config before exporting"
        )
    return next(name for name, m in model.named_modules() if m is output) + ".weight"


def _final(_module: nn.Module) -> None:
    """The ``ready`` of a model whose every module is final: nothing to wait for."""


def checkpoint_tensors(
    model: PreTrainedModel, workers: Executor, ready: Callable[[nn.Module], None] = _final
) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """Yield ``(module name, {full tensor name: tensor})`` for every tensor the checkpoint holds, in module order.

    Modules are compressed (int4 packing) on ``workers`` up to :data:`COMPRESS_AHEAD` modules ahead of the
    one yielded, so that packing overlaps what the caller does with the tensors (writing them).
    ``ready(module)`` returns once ``module`` and everything in it is final; the walk reads a module's
    children only after that.
    """
    tied = _tied_output_key(model)
    pending: deque[tuple[str, Future[dict[str, torch.Tensor]]]] = deque()
    for name, module in model.named_modules():
        ready(module)
        pending.append((name, workers.submit(module_tensors, name, module, tied)))
        if len(pending) > COMPRESS_AHEAD:
            yield from _nonempty(*pending.popleft())
    for name, tensors in pending:
        yield from _nonempty(name, tensors)


def _nonempty(name: str, tensors: Future[dict[str, torch.Tensor]]) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    if result := tensors.result():
        yield name, result


def module_tensors(name: str, module: nn.Module, tied: str | None) -> dict[str, torch.Tensor]:
    """``{full tensor name: tensor}`` of the checkpoint tensors ``module`` itself holds (not its children's);
    ``tied``: the output embedding's key when it is tied to the input embedding (not written)."""
    prefix = f"{name}." if name else ""
    if isinstance(module, QuantLinear):
        try:
            local = compress_quantized_linear(
                module.weight_codes,
                module.weight_scale,
                module.weight_zero_point,
                module.weight_args,
                input_scale=module.input_scale,
                bias=module.bias,
            )
        except QuantbenchError as exc:
            raise QuantbenchError(f"{name}: {exc}") from exc
    else:
        local = {key: t.detach().contiguous() for key, t in module.named_parameters(recurse=False)}
        local.update(
            (key, t.contiguous())
            for key, t in module.named_buffers(recurse=False)
            if t is not None and key not in module._non_persistent_buffers_set
        )
        local = {key: t for key, t in local.items() if prefix + key != tied}
    return {prefix + key: t for key, t in local.items()}


def _write_weights(
    model: PreTrainedModel,
    out_dir: Path,
    max_shard_bytes: int,
    workers: Executor,
    ready: Callable[[nn.Module], None] = _final,
) -> dict[str, Future[str]]:
    """Write the checkpoint tensors as one safetensors file, or shards plus an index, names sorted per file.

    Modules are compressed on ``workers`` ahead of the writing; each shard is written as soon as it is full,
    so at most one shard of packed tensors is held at a time, and hashed on ``workers`` meanwhile.
    ``ready``: as in :func:`checkpoint_tensors`. Returns the SHA-256 (pending) of each weights file by name.
    """
    written: list[tuple[Path, list[str], Future[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        part = out_dir / f".shard-{len(written):05d}.part"
        save_file(dict(sorted(shard.items())), part, metadata=SAFETENSORS_METADATA)
        written.append((part, list(shard), workers.submit(sha256_stream, part.open("rb"))))  # open now: renamed later
        shard.clear()

    for _, tensors in tqdm(checkpoint_tensors(model, workers, ready), desc="export", unit="module"):
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if shard and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        shard.update(tensors)
        size += nbytes
        total += nbytes
    flush()
    if len(written) == 1:
        part, _, digest = written[0]
        part.rename(out_dir / WEIGHTS_FILE)
        return {WEIGHTS_FILE: digest}
    weight_map, digests = {}, {}
    for i, (part, names, digest) in enumerate(written, start=1):
        filename = f"model-{i:05d}-of-{len(written):05d}.safetensors"
        part.rename(out_dir / filename)
        weight_map.update(dict.fromkeys(names, filename))
        digests[filename] = digest
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_json(out_dir / WEIGHTS_INDEX_FILE, index)
    return digests


class CheckpointExport:
    """Writes ``model``'s checkpoint into ``out_dir`` (as :func:`save_quantized`), the weight files while the
    model's blocks are still being quantized, so that the writing overlaps the quantization:

        with CheckpointExport(model, out_dir) as export:
            stats = quantize_model(model, scheme, calibration, export=export)
            export.finish(tokenizer, scheme, provenance={...})

    :meth:`start` (the quantization calls it once the model is cast and its blocks are known) starts a thread
    that writes the weight files as :func:`save_quantized` does, in module order, and waits at each block
    given to ``start`` until :meth:`block_home` reports it quantized and back where it lives. It also waits
    for the first of them before writing anything: capturing the first block's inputs moves the modules
    outside the blocks to the device for a while. The files are the same bytes as when everything is
    written after the quantization, since the shards are cut in the same order. At the end only the last
    shard, the small files and the hashes remain to write.

    ``out_dir`` appears only when :meth:`finish` returned and the context is left without an error; on an
    error (the quantization's, or the writing thread's, raised by :meth:`block_home` or :meth:`finish`)
    the temporary directory is removed. A temporary directory left by a killed export of the same output
    is removed on entering.
    """

    def __init__(self, model: PreTrainedModel, out_dir: str | Path, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.model = model
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._exits = ExitStack()
        self._blocks: dict[int, threading.Event] = {}  # id(block) -> set once block_home reported it
        self._homes: dict[int, Future[None]] = {}
        self._aborted = False
        self._weights: Future[dict[str, Future[str]]] | None = None
        self._finished = False

    def __enter__(self) -> CheckpointExport:
        for stale in self.out_dir.parent.glob(f".{self.out_dir.name}.*.tmp"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        self._tmp = self._exits.enter_context(atomic_dir(self.out_dir))
        # packing (torch) and hashing (hashlib) release the GIL: both run on worker threads
        self._workers = self._exits.enter_context(ThreadPoolExecutor(max_workers=os.cpu_count() or 1))
        self._writer = self._exits.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="export"))
        return self

    def start(self, blocks: Sequence[nn.Module] = ()) -> None:
        """Start writing the weight files; ``blocks``: the model's blocks still to be quantized, first one first."""
        if self._weights is not None:
            raise RuntimeError("the export has already started")
        self._blocks = {id(block): threading.Event() for block in blocks}
        first = blocks[0] if blocks else None
        self._weights = self._writer.submit(self._write_weights, first)

    def block_home(self, block: nn.Module, home: Future[None]) -> None:
        """Block ``block`` is quantized and will not change again; ``home`` is done once it is back where it
        lives. Raises the writing thread's error, if it failed, so that the quantization stops early."""
        if self._weights is not None and self._weights.done():
            self._weights.result()
        if (event := self._blocks.get(id(block))) is not None:
            self._homes[id(block)] = home
            event.set()

    def _ready(self, module: nn.Module) -> None:
        if (event := self._blocks.get(id(module))) is None:
            return
        event.wait()
        if self._aborted:
            raise RuntimeError("export stopped: the quantization failed")
        self._homes[id(module)].result()

    def _write_weights(self, first: nn.Module | None) -> dict[str, Future[str]]:
        if first is not None:
            self._ready(first)
        return _write_weights(self.model, self._tmp, self.max_shard_bytes, self._workers, self._ready)

    def finish(self, tokenizer: PreTrainedTokenizerBase, scheme: Scheme, *, provenance: Mapping[str, Any]) -> None:
        """Write the rest of the checkpoint of ``model`` quantized under ``scheme`` (arguments as
        :func:`save_quantized`'s) once the weight files are written; the directory appears on leaving the context."""
        provenance = dict(provenance)
        scheme_dict = scheme.to_dict()
        if "versions" in provenance or "files" in provenance or provenance.get("scheme", scheme_dict) != scheme_dict:
            raise ValueError("provenance keys 'scheme', 'versions' and 'files' are filled in by save_quantized")
        config = copy.deepcopy(self.model.config)
        config.quantization_config = quantization_config(self.model, scheme)
        if self._weights is None:
            self.start()
        if unreported := sum(not event.is_set() for event in self._blocks.values()):
            raise RuntimeError(f"{unreported} block(s) given to start() were never reported by block_home()")
        digests = self._weights.result()
        tmp = self._tmp
        config.save_pretrained(tmp)
        if self.model.can_generate() and self.model.generation_config is not None:
            self.model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for path in tmp.iterdir():
            if path.is_file() and path.name not in digests:
                digests[path.name] = self._workers.submit(sha256_file, path)
        files = {name: digests[name].result() for name in sorted(digests)}
        provenance.update(scheme=scheme_dict, versions=package_versions(), files=files)
        atomic_write_json(tmp / PROVENANCE_FILE, provenance)
        self._finished = True
        log.info("wrote %s checkpoint of scheme %s to %s", checkpoint_format(scheme.weights), scheme.name, self.out_dir)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if exc_type is not None or not self._finished:  # release a writer waiting for a block that will not come
            self._aborted = True
            for event in self._blocks.values():
                event.set()
        if exc_type is None and not self._finished:
            error = RuntimeError("CheckpointExport left without finish(): the checkpoint is incomplete")
            self._exits.__exit__(RuntimeError, error, None)  # removes the temporary directory
            raise error
        self._exits.__exit__(exc_type, exc, traceback)


def save_quantized(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    scheme: Scheme,
    out_dir: str | Path,
    *,
    provenance: Mapping[str, Any],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write ``model`` (holding QuantLinear modules) as a compressed-tensors checkpoint in ``out_dir``.

    ``provenance`` holds the caller's facts (calibration set and its hash, seed, command, ...); the
    scheme, package versions and file hashes are added here. The directory appears only when complete.
    """
    with CheckpointExport(model, out_dir, max_shard_bytes=max_shard_bytes) as export:
        export.finish(tokenizer, scheme, provenance=provenance)
    return Path(out_dir)
