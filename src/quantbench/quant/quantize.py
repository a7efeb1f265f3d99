"""Quantize a model under a scheme, in memory (:func:`quantize_model`) or checkpoint to checkpoint (:func:`quantize_checkpoint`).

After :func:`quantize_model` every target linear of the scheme's module groups is a
:class:`~quantbench.quant.linear.QuantLinear` and every other module is untouched (lm_head, embeddings,
norms, routers) but for the scheme's ``dtype``, which the whole model is cast to first; fused MoE experts
are first split into one linear per expert (:mod:`quantbench.model.experts`), after checking that vLLM serves the
scheme on experts (:func:`quantbench.checkpoint.serving.check_fused_moe`). Data-free schemes (round-to-nearest weights,
dynamic activations) never look at calibration data; the others run the sequential pipeline of
:mod:`quantbench.quant.sequential`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch
from torch import nn

from quantbench.calibration.samples import Calibration, load_calibration
from quantbench.checkpoint.export import CheckpointExport
from quantbench.checkpoint.load import load_model
from quantbench.checkpoint.preflight import Headroom, check_requirements, quantize_requirements
from quantbench.checkpoint.serving import check_fused_moe
from quantbench.model.architectures import block_list, experts_paths, get_architecture
from quantbench.model.experts import unfuse_experts
from quantbench.model.vlm import is_image_text_model, load_processor
from quantbench.quant.linear import QuantLinear
from quantbench.quant.resume import LayerProgress, partial_dir, run_identity
from quantbench.quant.schemes import Scheme
from quantbench.quant.sequential import PipelineOptions, quantize_blocks_data_free, quantize_blocks_sequential
from quantbench.quant.stats import QuantStats
from quantbench.util.errors import QuantbenchError
from quantbench.util.provenance import sha256_file

log = logging.getLogger(__name__)

# Target groups in the order their blocks are quantized: the vision tower first, so that the language
# layers calibrate on the image tokens of the quantized tower, as they will be served. With full-precision
# propagation the order is reversed, so that each stack calibrates on an unquantized upstream.
UPSTREAM_FIRST = ("vision", "language")


def resolve_device(device: str | torch.device) -> torch.device:
    """``'auto'`` is the first CUDA device when there is one, else the CPU; anything else as given."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise QuantbenchError(f"device {device!r} asked for but CUDA is not available; use --device cpu")
    return resolved


def quantize_model(
    model: nn.Module,
    scheme: Scheme,
    calibration: Calibration | None = None,
    *,
    device: str | torch.device = "auto",
    options: PipelineOptions | None = None,
    progress: LayerProgress | None = None,
    export: CheckpointExport | None = None,
) -> QuantStats:
    """Quantize ``model`` in place under ``scheme``; return per-layer statistics.

    Layers visit ``device`` one at a time; the model stays where it was. ``calibration`` is required when
    the scheme needs data and ignored otherwise (unless ``options.measure_data_free``). ``progress``
    saves each quantized block and restores those an interrupted run saved (:mod:`quantbench.quant.resume`).
    ``export`` writes the weight files of the blocks as they are finished (one stack of blocks; with more,
    it writes them all once :meth:`CheckpointExport.finish` is called).
    On an error the model is left partly quantized: load it again before retrying.
    """
    options = options or PipelineOptions()
    compute = resolve_device(device)
    stats = QuantStats(scheme=scheme.name, algorithm=scheme.algorithm, device=str(compute))
    if scheme.is_baseline:
        return stats
    if scheme.needs_calibration and calibration is None:
        raise QuantbenchError(f"scheme {scheme.name} needs calibration data; pass a calibration set (--calib)")
    use_data = scheme.needs_calibration or (options.measure_data_free and calibration is not None)
    if use_data and calibration.num_tokens == 0:
        raise QuantbenchError("the calibration set has no real tokens (its attention mask is all zero)")
    architecture = get_architecture(model.config)
    start = time.perf_counter()
    experts = experts_paths(model)
    if experts and "language" in scheme.targets:
        check_fused_moe(
            scheme.weights, scheme.input_activations, f"scheme {scheme.name} on the experts of {experts[0]}"
        )
    if scheme.dtype is not None:
        cast_model(model, getattr(torch, scheme.dtype))
    if unfuse_experts(model, experts):
        log.info("experts unfused to one linear per expert")
    order = UPSTREAM_FIRST if scheme.calibration.propagation == "quantized" else UPSTREAM_FIRST[::-1]
    stacks = [architecture.stack(group, model.config.model_type) for group in sorted(scheme.targets, key=order.index)]
    if export is not None and len(stacks) == 1:
        # the capture of a later stack would move the blocks of an earlier one to the device for a while
        export.start(block_list(model, stacks[0]))
    home = export.block_home if export is not None else None
    for stack in stacks:
        if use_data and stack.packed and not calibration.has_images:
            if scheme.needs_calibration:
                raise QuantbenchError(
                    f"scheme {scheme.name} needs image activations for the vision blocks, but the calibration set "
                    "has no images; calibrate from image-text records (a JSONL with 'image', `quantbench calibrate`)"
                )
            stats.layers += quantize_blocks_data_free(model, stack, scheme, compute, progress, home)
        elif use_data:
            stats.layers += quantize_blocks_sequential(
                model, stack, scheme, calibration, compute, options, progress, home
            )
            stats.calibration_tokens = calibration.num_tokens
        else:
            stats.layers += quantize_blocks_data_free(model, stack, scheme, compute, progress, home)
    stats.seconds = time.perf_counter() - start
    if stats.fallbacks:
        log.warning("%s: %d fallback(s) taken (see the statistics)", scheme.name, len(stats.fallbacks))
    return stats


def cast_model(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast ``model``'s floating-point tensors to ``dtype`` and record it in its config (and sub-configs), which
    the checkpoint writes (vLLM serves ``dtype: auto`` in the config's dtype). Before quantization only."""
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise QuantbenchError("cast the model before quantizing it; quantized modules keep their stored dtypes")
    model.to(dtype)
    configs = [model.config] + [getattr(model.config, key, None) for key in getattr(model.config, "sub_configs", {})]
    for config in configs:
        if config is not None:
            config.dtype = dtype
    log.info("model cast to %s for quantization and export", dtype)


def quantize_checkpoint(
    model_dir: str | Path,
    scheme: Scheme,
    out_dir: str | Path,
    *,
    calibration: Calibration | str | Path | None = None,
    device: str | torch.device = "auto",
    seed: int = 0,
    options: PipelineOptions | None = None,
    resume: bool = True,
    headroom: Headroom = Headroom(),
) -> Path:
    """Load ``model_dir``, quantize it under ``scheme`` and write the compressed-tensors checkpoint to ``out_dir``.

    ``calibration`` is a :class:`Calibration` or the path of a file written by ``quantbench calibrate``.
    Before the model is loaded, free disk and host memory are checked (:mod:`quantbench.checkpoint.preflight`; ``headroom``:
    what must stay free beyond the need). With ``resume``, every quantized layer is saved in
    ``<out_dir>.partial`` as it is finished, a rerun after an interruption continues from the last saved layer
    (to the same bytes), and the directory is removed once the checkpoint is written (:mod:`quantbench.quant.resume`).
    """
    torch.manual_seed(seed)
    options = options or PipelineOptions()
    compute = resolve_device(device)
    calibration_file = None
    if isinstance(calibration, (str, Path)):
        calibration_file = Path(calibration)
        calibration = load_calibration(calibration_file)
    on_host = (
        calibration is not None and scheme.needs_calibration and (compute.type == "cpu" or options.offload_activations)
    )
    check_requirements(
        quantize_requirements(
            model_dir,
            scheme,
            out_dir,
            progress_dir=partial_dir(out_dir) if resume else None,
            host_activations=tuple(calibration.input_ids.shape) if on_host else None,
            headroom=headroom,
        ),
        f"quantize {model_dir} under {scheme.name}",
    )
    model, tokenizer = load_model(model_dir)
    if calibration is not None:
        calibration.check_tokenizer(tokenizer)
    progress = None
    if resume and not scheme.is_baseline:
        identity = run_identity(model_dir, scheme, calibration, seed=seed, options=options, device=compute)
        progress = LayerProgress(partial_dir(out_dir), identity)
    # an image-text model's checkpoint carries its whole processor (image processor, chat template)
    processor = load_processor(model_dir) if is_image_text_model(model.config) else tokenizer
    with CheckpointExport(model, out_dir) as export:  # the weight files are written as the blocks are finished
        with progress or contextlib.nullcontext():
            stats = quantize_model(
                model, scheme, calibration, device=device, options=options, progress=progress, export=export
            )
        provenance = {
            "model": str(model_dir),
            "seed": seed,
            "calibration": None,
            "quantization": stats.to_dict(timings=False),
        }
        if stats.calibration_tokens:
            provenance["calibration"] = dict(calibration.metadata)
            if calibration_file is not None:
                provenance["calibration"]["file_sha256"] = sha256_file(calibration_file)
        export.finish(processor, scheme, provenance=provenance)
    if progress is not None:
        progress.remove()
    return Path(out_dir)
