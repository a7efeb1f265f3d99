"""Load a model directory (plain Hugging Face or quantbench's compressed-tensors export) for evaluation.

A compressed-tensors checkpoint (config.json carries a ``quantization_config``) is rebuilt as a model
that simulates its scheme as vLLM serves it (:mod:`quantbench.checkpoint.serving`): the skeleton is built from the
config with parameters on the meta device, every module the config groups target (their ``targets`` minus
``ignore``, matched with compressed-tensors' own rules) becomes a :class:`QuantLinear` holding the stored
codes, scales, zero points and static input scales (int4 unpacked), and the remaining tensors are loaded as
stored. Each tensor is read once, straight onto ``device``. A MoE checkpoint whose expert quantization
vLLM refuses is refused here too.

Before any tensor is read, every weight file's header is checked (:mod:`quantbench.checkpoint.weightfiles`: a
truncated or corrupt shard fails naming the file), and the tensors stored for each quantized module are
checked against what its config group's args store (names, dtypes, shapes), so a ``quantization_config``
that disagrees with its tensors fails naming the file and the tensor.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from compressed_tensors.utils.match import match_named_modules
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from quantbench.checkpoint.export import (
    QUANT_METHOD,
    checkpoint_format,
    decompress_quantized_linear,
    stored_linear_layout,
)
from quantbench.checkpoint.serving import check_fused_moe
from quantbench.checkpoint.weightfiles import TensorEntry, model_tensors
from quantbench.model.architectures import block_list, experts_paths, replace_module, stacks_of
from quantbench.model.experts import unfuse_experts
from quantbench.model.vlm import is_image_text_model
from quantbench.quant.linear import QuantLinear, share_input_quantization
from quantbench.quant.schemes import QuantArgs
from quantbench.util.errors import QuantbenchError

log = logging.getLogger(__name__)

# QuantizationArgs keys compressed-tensors may write that do not change what the stored tensors mean.
_NEUTRAL_ARG_KEYS = {"observer", "observer_kwargs", "scale_dtype", "zp_dtype"}


def load_model(
    path: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.bfloat16
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the model and tokenizer in ``path`` onto ``device``, in eval mode.

    ``dtype`` is the dtype of unquantized tensors and of computation; quantized modules keep their
    stored codes and scales and dequantize to the input's dtype. Vision-language models load as
    transformers' image-text-to-text class; their processor comes from :func:`quantbench.model.vlm.load_processor`.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise QuantbenchError(f"{path} is not a model directory (no config.json)")
    config = AutoConfig.from_pretrained(path)
    tensors = model_tensors(path)  # every file checked before a tensor is read: a truncated shard fails here, named
    if getattr(config, "quantization_config", None) is None:
        model = _auto_class(config).from_pretrained(path, dtype=dtype).to(device)
    else:
        model = _load_quantized(path, config, tensors, device=device, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


def _auto_class(config: PretrainedConfig) -> type:
    """transformers' auto class of the model: image-text-to-text for vision-language models, else causal LM."""
    return AutoModelForImageTextToText if is_image_text_model(config) else AutoModelForCausalLM


def _quant_args(raw: dict[str, Any] | None, where: str) -> QuantArgs | None:
    if raw is None:
        return None
    known = {f.name for f in fields(QuantArgs)}
    unsupported = {k: v for k, v in raw.items() if k not in known | _NEUTRAL_ARG_KEYS and v not in (None, False)}
    if unsupported:
        raise QuantbenchError(f"{where}: unsupported quantization args {unsupported}; quantbench cannot simulate them")
    try:
        return QuantArgs(**{k: v for k, v in raw.items() if k in known and v is not None})
    except (TypeError, ValueError) as exc:
        raise QuantbenchError(f"{where}: {exc}") from exc


def parse_config_groups(qconfig: dict[str, Any], path: Path) -> list[tuple[list[str], QuantArgs, QuantArgs | None]]:
    """``(targets, weight args, input args)`` of each config group, checked against what quantbench simulates."""
    where = f"{path}/config.json quantization_config"
    if qconfig.get("quant_method") != QUANT_METHOD:
        raise QuantbenchError(f"{where}: quant_method {qconfig.get('quant_method')!r} is not {QUANT_METHOD!r}")
    if qconfig.get("quantization_status") != "compressed":
        raise QuantbenchError(f"{where}: quantization_status must be 'compressed' (a saved, compressed checkpoint)")
    groups = []
    for name, group in (qconfig.get("config_groups") or {}).items():
        weights = _quant_args(group.get("weights"), f"{where}.config_groups.{name}.weights")
        inputs = _quant_args(group.get("input_activations"), f"{where}.config_groups.{name}.input_activations")
        if weights is None or group.get("output_activations") is not None:
            raise QuantbenchError(f"{where}.config_groups.{name}: only weight (+ input) quantization is supported")
        fmt = group.get("format") or qconfig.get("format")
        if fmt != checkpoint_format(weights):
            raise QuantbenchError(
                f"{where}.config_groups.{name}: format {fmt!r} is not supported for these weights "
                f"(quantbench reads {checkpoint_format(weights)!r})"
            )
        groups.append((list(group["targets"]), weights, inputs))
    if not groups or qconfig.get("kv_cache_scheme") is not None:
        raise QuantbenchError(f"{where}: need at least one config group and no kv_cache_scheme")
    return groups


def _read_checkpoint(entries: dict[str, TensorEntry], device: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checked checkpoint (:func:`quantbench.checkpoint.weightfiles.model_tensors`), on ``device``."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted({entry.file for entry in entries.values()}):
        with safe_open(file, framework="pt", device=str(device)) as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a Mapping
                tensors[key] = handle.get_tensor(key)
    return tensors


def _check_stored_linear(
    name: str, stored: dict[str, TensorEntry], linear: nn.Linear, weights: QuantArgs, inputs: QuantArgs | None
) -> None:
    """Refuse a quantized linear whose stored tensors are not what its config group's args store (names, dtypes, shapes)."""
    layout = stored_linear_layout(
        linear.out_features, linear.in_features, weights, inputs, bias=linear.bias is not None
    )
    args = f"weights {weights.to_dict()}, input_activations {None if inputs is None else inputs.to_dict()}"
    any_file = next(iter(stored.values())).file
    for key in sorted(layout.keys() - stored.keys()):
        raise QuantbenchError(
            f"{any_file}: tensor {name}.{key} is missing, but the quantization_config ({args}) stores it for "
            f"{name}; the config disagrees with the tensors (it holds {sorted(stored)})"
        )
    for key in sorted(stored.keys() - layout.keys()):
        raise QuantbenchError(
            f"{stored[key].file}: tensor {name}.{key} is stored, but the quantization_config ({args}) has no place "
            f"for it; the config disagrees with the tensors"
        )
    for key, (dtypes, shape) in layout.items():
        entry = stored[key]
        if entry.dtype not in dtypes or entry.shape != shape:
            raise QuantbenchError(
                f"{entry.file}: tensor {name}.{key} is {entry.dtype} {list(entry.shape)}, but the quantization_config "
                f"({args}) stores {'/'.join(sorted(dtypes))} {list(shape)}; the config disagrees with the tensors"
            )


def _by_module(tensors: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{module name: {local name: value}}`` of ``{full tensor name: value}``."""
    by_module: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        module_name, _, local = key.rpartition(".")
        by_module.setdefault(module_name, {})[local] = value
    return by_module


def _build_skeleton(config: PretrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    """The model of ``config`` with parameters on the meta device and buffers (rotary tables) computed.

    MoE experts are unfused to one linear per expert, the layout the checkpoint stores.
    """
    config = copy.deepcopy(config)
    del config.quantization_config
    with init_empty_weights(include_buffers=False):
        model = _auto_class(config).from_config(config, dtype=dtype)
    unfuse_experts(model, experts_paths(model))
    return model


def _load_quantized(
    path: Path, config: PretrainedConfig, entries: dict[str, TensorEntry], *, device: str, dtype: torch.dtype
) -> PreTrainedModel:
    qconfig = config.quantization_config
    qconfig = qconfig if isinstance(qconfig, dict) else qconfig.to_dict()
    groups = parse_config_groups(qconfig, path)
    model = _build_skeleton(config, dtype)
    if experts_paths(model):
        for _, weights, inputs in groups:
            check_fused_moe(weights, inputs, f"{path}: the experts' quantization_config")
    ignore = qconfig.get("ignore") or []

    assigned: dict[str, tuple[QuantArgs, QuantArgs | None]] = {}
    for targets, weights, inputs in groups:
        for name, module in match_named_modules(model, targets, ignore):
            if not isinstance(module, nn.Linear) or name in assigned:
                problem = "by two config groups" if name in assigned else f"but is a {type(module).__name__}"
                raise QuantbenchError(
                    f"{path}: module {name} is targeted {problem}; quantbench simulates one scheme per Linear only"
                )
            assigned[name] = (weights, inputs)

    stored_entries = _by_module(entries)
    stored = {name for name, local in stored_entries.items() if "weight_scale" in local}
    if stored != set(assigned):
        raise QuantbenchError(
            f"{path}: the modules with stored scales differ from those the quantization_config targets "
            f"(only stored: {sorted(stored - set(assigned))[:5]}, only targeted: {sorted(set(assigned) - stored)[:5]})"
        )
    for name, (weights, inputs) in assigned.items():
        _check_stored_linear(name, stored_entries[name], model.get_submodule(name), weights, inputs)
    by_module = _by_module(_read_checkpoint(entries, device))

    state: dict[str, torch.Tensor] = {}
    for name, (weights, inputs) in assigned.items():
        linear = model.get_submodule(name)
        buffers = decompress_quantized_linear(by_module.pop(name), weights)
        if "bias" in buffers:
            buffers["bias"] = buffers["bias"].to(dtype)
        quantized = QuantLinear(
            linear.in_features,
            linear.out_features,
            weight_args=weights,
            input_args=inputs,
            bias=linear.bias is not None,
            dtype=dtype,
            device="meta",
        )
        replace_module(model, name, quantized)
        state.update((f"{name}.{key}", value) for key, value in buffers.items())
    for module_name, local in by_module.items():
        prefix = f"{module_name}." if module_name else ""
        state.update((prefix + key, t.to(dtype) if t.is_floating_point() else t) for key, t in local.items())

    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unexpected or left_on_meta:
        raise QuantbenchError(
            f"{path}: checkpoint does not fit the {type(model).__name__} of its config "
            f"(unexpected tensors: {unexpected[:5]}, not in checkpoint: {left_on_meta[:5]})"
        )
    log.debug("loaded %d quantized modules from %s (tied/missing: %s)", len(assigned), path, missing)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    share_input_quantizations(model)
    return model.to(device)


def share_input_quantizations(model: PreTrainedModel) -> int:
    """Let the quantized linears of each shared-input group of a dense block (q/k/v; gate/up) quantize
    their common input once (:func:`quantbench.quant.linear.share_input_quantization`); how many groups do."""
    try:
        stacks = stacks_of(model)
    except QuantbenchError:  # an architecture quantbench has no mapping for: every linear quantizes its own input
        return 0
    shared = 0
    for stack in stacks:
        if stack.experts is not None:  # experts read different tokens
            continue
        for block in block_list(model, stack):
            for names in stack.groups:
                shared += share_input_quantization([block.get_submodule(n) for n in names])
    return shared
