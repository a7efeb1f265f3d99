"""The layer-by-layer pipeline: quantize one block at a time on the calibration activations it really sees.

1. Capture the inputs of block 0 (hidden states and the keyword arguments the model passes: position
   embeddings, attention mask) for each chunk of calibration samples, by stopping the model's forward at
   block 0 (:func:`capture.capture_call`). Only the modules outside the blocks visit the compute device.
   Calibration chunks carry their images (a VLM's language layers see image tokens). A packed stack (a
   vision tower: patches ``[tokens, C]``, no padding) runs through to its last block once per chunk to
   record each block's own keyword arguments (windowed or full attention), and masks no token.
2. For each block i, on the compute device (the rest of the model stays where it was; block i+1 is
   copied there meanwhile, :mod:`quant.prefetch`):
   a. run the unquantized block on every chunk, keeping its outputs (the reference) while hooks feed one
      :class:`InputStats` per shared-input group (what the scheme's algorithm asks for, :mod:`quant.algorithms`:
      Hessian, |x| sums; ranges for static input scales; padding never counted), and record the calls of the
      modules the algorithm's smoothing replays (AWQ's ``angelslim`` style: its block-output loss);
   b. the algorithm's smoothing, if it has one (AWQ: search and fold scales, mapping by mapping, :mod:`quant.awq`);
   c. quantize every group with the algorithm (RTN, GPTQ per group, AWQ's rounding) and swap each target for
      its QuantLinear;
   d. run the quantized block on the same inputs: its outputs become block i+1's inputs (or, with the
      scheme's ``calibration.propagation: full-precision``, the unquantized outputs of step a do, as one
      unquantized forward of the whole model would give, and as AngelSlim's AWQ propagated), and the
      differences to the reference give the block's relative output error (each module's, against its
      unquantized weight, on the first chunk: a sample that costs one extra matmul per module).

"Real tokens" are the calibration's statistics mask (:meth:`Calibration.statistics_mask`): the non-padding
tokens, or every position when the calibration stream counts pads.

Mixture-of-experts blocks run their experts in calibration mode during steps a and d
(:func:`quantbench.model.experts.calibrate_all_experts`): every expert sees every calibration token, so each one
gets statistics (and an error) on all of them, while the block's output keeps the router's choices; the
real tokens the router sent to each expert are reported per layer. With ``calibration.experts: routed``
each expert sees only the tokens routed to it, its linears get statistics of their own
(:func:`quantbench.model.experts.per_expert_groups`), and an expert linear that saw none takes the largest input
absmax of the same linear of the layer's other experts (static input scales; GPTQ falls back to RTN).

On CUDA the blocks' RMSNorms run as one fused kernel during these passes (:mod:`quant.norm_kernel`).
Activations of the current block live on the compute device, or in CPU memory with
``offload_activations``. Schemes without data (RTN, dynamic activations) skip all of this and round
block by block (:func:`quantize_blocks_data_free`) unless asked to measure their errors.

Given a :class:`quant.resume.LayerProgress`, both save every quantized block, and a rerun restores the
saved blocks and, instead of quantizing them again, replays them (step d alone) to rebuild the activations.
Given ``block_home``, both report each block once it is final, with a Future done once it is back in its
home memory (a :class:`quantbench.checkpoint.export.CheckpointExport` writes it meanwhile).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from quantbench.calibration.samples import Calibration
from quantbench.model.architectures import BlockStack, block_list, check_block, replace_module, stacks_of
from quantbench.model.experts import ExpertList, calibrate_all_experts, per_expert_groups
from quantbench.quant import qdq
from quantbench.quant.algorithms import Algorithm, get_algorithm
from quantbench.quant.capture import ModuleCall, capture_call, capture_calls, replay, to_device
from quantbench.quant.linear import QuantLinear
from quantbench.quant.norm_kernel import fused_rms_norms
from quantbench.quant.observers import InputStats
from quantbench.quant.prefetch import BlockPrefetcher, already_home
from quantbench.quant.resume import LayerProgress
from quantbench.quant.rtn import rtn_quantize_linear
from quantbench.quant.schemes import Scheme
from quantbench.quant.stats import GroupStats, LayerStats
from quantbench.util.errors import QuantbenchError

log = logging.getLogger(__name__)

BlockHome = Callable[[nn.Module, Future[None]], None]  # (final block, done once it is home)


@dataclass(frozen=True)
class PipelineOptions:
    """How the pipeline runs (never what it computes): chunking, where activations live, extra measuring."""

    chunk_size: int = 8  # calibration samples per forward call
    offload_activations: bool = False  # keep cached activations in CPU memory instead of on the compute device
    measure_data_free: bool = False  # run the calibration pipeline for data-free schemes too, to report errors


@dataclass
class Group:
    """One shared-input group of a block during its quantization."""

    names: tuple[str, ...]
    stats: InputStats
    report: GroupStats
    parent: tuple[str, ...] | None = None  # routed expert statistics: the key its siblings in other experts share
    seen: torch.Tensor | None = None
    mask: torch.Tensor | None = (
        None  # the chunk's real tokens; None when every token is real (or rows come pre-selected)
    )

    def observe(self, _module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        """Forward pre-hook of every member: the first call of a chunk feeds the statistics.

        Members share one input: the same tensor, or a view of it (a MoE layer's experts get the tokens
        flattened to ``[tokens, hidden]``).
        """
        x = args[0]
        if self.seen is None:
            self.stats.update(
                x.reshape(-1, x.shape[-1]) if self.mask is None else x[_token_mask(x, self.mask, self.names[0])]
            )
            self.seen = x
        elif x.data_ptr() != self.seen.data_ptr() or x.numel() != self.seen.numel():
            raise QuantbenchError(f"{', '.join(self.names)} do not share one input; the architecture mapping is wrong")


@dataclass
class _ErrorMeter:
    """Forward hook of a quantized module: its output error vs the unquantized weight on the same input."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    mask: torch.Tensor | None = None
    err: list[torch.Tensor] = field(default_factory=list)
    ref: list[torch.Tensor] = field(default_factory=list)

    def measure(self, _module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        reference = F.linear(args[0], self.weight, self.bias)
        _accumulate_error(output, reference, self.mask, self.err, self.ref)

    def relative(self) -> float | None:
        """The relative error, or None when the module never ran (a routed expert no token chose)."""
        return _ratio(self.err, self.ref) if self.err else None


def _token_mask(x: torch.Tensor, mask: torch.Tensor, name: str) -> torch.Tensor:
    """``mask [batch, seq]`` shaped like the token dimensions of ``x``: ``[batch, seq, ...]`` or flattened ``[tokens, ...]``."""
    if x.shape[:-1] == mask.shape:
        return mask
    if x.dim() == 2 and x.shape[0] == mask.numel():
        return mask.reshape(-1)
    raise QuantbenchError(f"{name} got input {tuple(x.shape)} not shaped like the tokens {tuple(mask.shape)}")


def _accumulate_error(
    output: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor, err: list[torch.Tensor], ref: list[torch.Tensor]
) -> None:
    """Append the squared error and squared reference norm over the real tokens of ``mask [batch, seq]`` (every row: None)."""
    mask = (
        torch.ones(output.shape[:-1], dtype=torch.bool, device=output.device)
        if mask is None
        else _token_mask(output, mask, "output")
    )
    err.append(
        torch.where(mask, torch.linalg.vector_norm(output - reference, dim=-1, dtype=torch.float32), 0).square().sum()
    )
    ref.append(torch.where(mask, torch.linalg.vector_norm(reference, dim=-1, dtype=torch.float32), 0).square().sum())


def _ratio(err: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    return float(torch.stack(err).sum() / torch.stack(ref).sum().clamp(min=1e-30))


@contextmanager
def _hooks(handles: list[torch.utils.hooks.RemovableHandle]) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _recorder(calls: list, storage: torch.device) -> Callable[..., None]:
    """A forward pre-hook (``with_kwargs``) appending each call's ``(args, kwargs)``, moved to ``storage``."""

    def record(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append((to_device(args, storage), to_device(kwargs, storage)))

    return record


def _store(tensor: torch.Tensor, storage: torch.device) -> torch.Tensor:
    """``tensor`` on ``storage``; GPU activations offloaded to the CPU go to pinned memory (fast copies back)."""
    if storage.type == "cpu" and tensor.is_cuda:
        return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor)
    return tensor.to(storage)


@contextmanager
def _outside_blocks_on(
    model: nn.Module, blocks: nn.ModuleList, device: torch.device, keep_away: Sequence[nn.Module] = ()
) -> Iterator[None]:
    """Move every parameter and buffer outside ``blocks`` and ``keep_away`` (and the output head) to ``device`` for a while."""
    inside = {id(m) for stay in (blocks, *keep_away) for m in stay.modules()}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = inside | ({id(head)} if head is not None else set())
    moved: list[tuple[nn.Module, str, str, torch.Tensor]] = []
    for module in model.modules():
        if id(module) in skip:
            continue
        for kind in ("_parameters", "_buffers"):
            for key, tensor in getattr(module, kind).items():
                if tensor is not None and tensor.device != device:
                    moved.append((module, kind, key, tensor.data if kind == "_parameters" else tensor))
                    _set_tensor(module, kind, key, tensor, device)
    try:
        yield
    finally:  # forward passes leave these tensors unchanged: put the originals back instead of copying back
        for module, kind, key, original in moved:
            if kind == "_parameters":
                module._parameters[key].data = original
            else:
                module._buffers[key] = original


def _set_tensor(module: nn.Module, kind: str, key: str, tensor: torch.Tensor, device: torch.device) -> None:
    if kind == "_parameters":
        tensor.data = tensor.data.to(device)  # keeps the Parameter object (and weight tying)
    else:
        module._buffers[key] = tensor.to(device)


def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, calibration: Calibration, device: torch.device, options: PipelineOptions
) -> list[ModuleCall]:
    """The inputs of ``blocks[0]`` for each chunk of calibration samples (hidden states as the only positional)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layer_types = set(getattr(config, "layer_types", None) or ())
    if len(layer_types) > 1:
        raise QuantbenchError(
            f"layers of different attention types {sorted(layer_types)} get different masks; the sequential "
            "pipeline reuses block 0's and supports one type only"
        )
    storage = torch.device("cpu") if options.offload_activations else device
    calls = []
    with _outside_blocks_on(model, blocks, device):
        for start in range(0, calibration.num_samples, options.chunk_size):
            inputs = calibration.model_inputs(start, start + options.chunk_size, device)
            args, kwargs = capture_call(blocks[0], lambda inputs=inputs: model(**inputs, use_cache=False))
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            mask = calibration.statistics_mask(start, start + options.chunk_size).to(device)
            calls.append(ModuleCall((_store(hidden, storage),), to_device(kwargs, storage), mask))
    return calls


def capture_packed_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    calibration: Calibration,
    device: torch.device,
    options: PipelineOptions,
    keep_away: Sequence[nn.Module] = (),
) -> tuple[list[ModuleCall], list[list[dict]]]:
    """Inputs of a packed stack (a vision tower, ``BlockStack.packed``) for each chunk of calibration samples with images.

    Returns block 0's calls, whose token mask is all true over the chunk's packed tokens, and the keyword
    arguments of every block per chunk (``[block][chunk]``), since they differ between blocks (tensors
    they share are stored once). ``keep_away``: modules the forward never reaches before the stack's last
    block (the language layers), left where they are.
    """
    if not calibration.has_images:
        raise QuantbenchError(
            "the vision blocks take images, but the calibration set has none; calibrate from an image-text set"
        )
    storage = torch.device("cpu") if options.offload_activations else device
    calls: list[ModuleCall] = []
    per_block: list[list[dict]] = [[] for _ in blocks]
    with _outside_blocks_on(model, blocks, device, keep_away):
        for start in range(0, calibration.num_samples, options.chunk_size):
            inputs = calibration.model_inputs(start, start + options.chunk_size, device)
            if "pixel_values" not in inputs:
                continue
            recorded = capture_calls(list(blocks), lambda inputs=inputs: model(**inputs, use_cache=False))
            args, kwargs = recorded[0]
            hidden = args[0] if args else kwargs["hidden_states"]
            stored: dict[int, torch.Tensor] = {}
            for index, (_, block_kwargs) in enumerate(recorded):
                kept = {k: v for k, v in block_kwargs.items() if k != "hidden_states"}
                per_block[index].append(to_device(kept, storage, memo=stored))
            mask = torch.ones(hidden.shape[0], dtype=torch.bool, device=device)
            calls.append(ModuleCall((_store(hidden, storage),), per_block[0][-1], mask))
    return calls, per_block


def _check_weights(block: nn.Module, name: str, stack: BlockStack, scheme: Scheme) -> None:
    """The architecture check, group sizes that divide the inputs, no NaN/Inf in a target weight (rounding
    would silently hide it)."""
    check_block(block, stack, name)
    group_size = scheme.weights.group_size if scheme.weights.strategy == "group" else None
    for target in stack.targets:
        linear = block.get_submodule(target)
        if group_size and linear.in_features % group_size:
            raise QuantbenchError(
                f"{name}.{target} has {linear.in_features} input features, not a multiple of scheme {scheme.name}'s "
                f"group_size {group_size}; use a group_size that divides it"
            )
        if not torch.isfinite(linear.weight).all():
            raise QuantbenchError(f"{name}.{target}.weight holds NaN/Inf; the checkpoint is damaged")


def _check_finite(group: Group) -> None:
    stats = group.stats
    for value in (stats.hessian, stats.absmax, stats.abs_sum):
        if value is not None and not torch.isfinite(value).all():
            raise QuantbenchError(
                f"calibration activations entering {', '.join(group.report.linears)} contain NaN/Inf; "
                "the model overflows in its dtype on this data (check the weights, or quantize in float32)"
            )


def _static_input_scale(group: Group, scheme: Scheme) -> torch.Tensor | None:
    inputs = scheme.input_activations
    if inputs is None or inputs.dynamic:
        return None
    if group.stats.tokens == 0 and group.stats.absmax.max() == 0:
        group.report.fallbacks.append("no calibration tokens reached this input: static input scale set to 1")
    return qdq.static_input_scale(group.stats.absmax.max(), inputs)


def _plan_groups(
    block: nn.Module,
    name: str,
    stack: BlockStack,
    scheme: Scheme,
    algorithm: Algorithm,
    smoothed: set[str],
    device: torch.device,
    routed: bool,
) -> list[Group]:
    """One :class:`Group` per shared-input group (with ``routed``, per expert), collecting what the scheme's
    algorithm needs (``smoothed``: the linears its smoothing scales) and, for static input scales, the ranges."""
    static = scheme.input_activations is not None and not scheme.input_activations.dynamic
    planned = per_expert_groups(stack.groups, stack.experts) if routed else [(names, None) for names in stack.groups]
    groups = []
    for names, parent in planned:
        needs = algorithm.statistics(scheme, smoothed=names[0] in smoothed)
        stats = InputStats.create(
            block.get_submodule(names[0]).in_features,
            device,
            hessian=needs.hessian,
            absmax=static,
            abs_sum=needs.abs_sum,
        )
        groups.append(Group(names, stats, GroupStats(tuple(f"{name}.{n}" for n in names)), parent))
    return groups


def _adopt_parent_maxima(groups: list[Group]) -> None:
    """Routed expert statistics: an expert group that saw no token takes the largest input absmax of its
    siblings (the same linears of the layer's other experts), as the published recipe's parent observer gives."""
    families: dict[tuple[str, ...], list[Group]] = {}
    for group in groups:
        if group.parent is not None and group.stats.absmax is not None:
            families.setdefault(group.parent, []).append(group)
    for family in families.values():
        seen = [g.stats.absmax for g in family if g.stats.tokens]
        if not seen:
            continue
        parent = torch.stack(seen).amax(dim=0)
        for group in family:
            if not group.stats.tokens:
                group.stats.absmax.copy_(parent)
                group.report.fallbacks.append(
                    "the router sent it no calibration token: static input scale from the other experts' maximum"
                )


def _quantize_group(block: nn.Module, group: Group, stack: BlockStack, scheme: Scheme) -> dict[str, QuantLinear]:
    """Quantize one group's linears with the scheme's algorithm (which may fall back, e.g. when it saw no tokens)."""
    start = time.perf_counter()
    linears = [block.get_submodule(n) for n in group.names]
    modules = get_algorithm(scheme.algorithm).quantize_group(
        group, linears, scheme, stack, _static_input_scale(group, scheme)
    )
    group.report.seconds += time.perf_counter() - start
    group.report.tokens = group.stats.tokens
    for note in group.report.fallbacks:
        log.warning("%s: %s", ", ".join(group.report.linears), note)
    return dict(zip(group.names, modules))


def _quantize_block(
    block: nn.Module,
    name: str,
    stack: BlockStack,
    calls: list[ModuleCall],
    scheme: Scheme,
    device: torch.device,
    storage: torch.device,
) -> LayerStats:
    """Steps a-d of the module docstring for one block; ``calls`` are updated to the next block's inputs."""
    start = time.perf_counter()
    stack = stack.for_block(block, name)
    _check_weights(block, name, stack, scheme)
    experts: list[ExpertList] = [] if stack.experts is None else [block.get_submodule(stack.experts)]
    routed = bool(experts) and scheme.calibration.experts == "routed"
    algorithm = get_algorithm(scheme.algorithm)
    smoothing = algorithm.smoothing(block, name, stack, scheme, routed=routed)
    for module in experts:
        module.routed = torch.zeros(len(module), dtype=torch.long)
        module.routed_only = routed
    groups = _plan_groups(
        block, name, stack, scheme, algorithm, smoothing.linears if smoothing else set(), device, routed
    )

    handles = [block.get_submodule(n).register_forward_pre_hook(g.observe) for g in groups for n in g.names]
    recorded: dict[str, list] = {path: [] for path in (smoothing.recorded if smoothing else ())}
    for path, calls_of in recorded.items():
        handles.append(
            block.get_submodule(path).register_forward_pre_hook(_recorder(calls_of, storage), with_kwargs=True)
        )
    reference = []
    with _hooks(handles):
        for call in calls:
            mask = call.mask.to(device)
            every_token_real = bool(call.mask.all())  # then the hooks take the rows without indexing (no sync)
            for group in groups:  # a routed expert is called on its chosen real rows only
                group.seen, group.mask = None, None if every_token_real or group.parent else mask
            with calibrate_all_experts(experts, mask):
                reference.append(_store(replay(block, call, device), storage))
    expert_tokens = {}
    for module in experts:
        expert_tokens[f"{name}.{stack.experts}"] = counts = module.routed.tolist()
        module.routed = None
        if idle := [e for e, n in enumerate(counts) if n == 0]:
            how = "scales from the other experts" if routed else "calibrated on all tokens"
            log.info(
                "%s.%s: the router chose expert(s) %s for no calibration token (%s)", name, stack.experts, idle, how
            )
    for group in groups:
        group.seen = group.mask = None
        _check_finite(group)
    if routed:
        _adopt_parent_maxima(groups)

    recorded = {path: [ModuleCall(*c, call.mask) for c, call in zip(got, calls)] for path, got in recorded.items()}
    if smoothing:
        smoothing.apply(block, groups, scheme, recorded, device)
    del recorded
    meters: dict[str, _ErrorMeter] = {}
    for group in groups:
        for module_name, quantized in _quantize_group(block, group, stack, scheme).items():
            original = block.get_submodule(module_name)
            meters[module_name] = _ErrorMeter(
                original.weight.data, None if original.bias is None else original.bias.data
            )
            replace_module(block, module_name, quantized)
        group.stats = None  # free the Hessians before the propagation pass

    err, ref = [], []
    preselected = {n for g in groups if g.parent for n in g.names}  # routed experts' rows are all real
    full_precision = scheme.calibration.propagation == "full-precision"
    for index, (call, expected) in enumerate(zip(calls, reference)):
        mask = call.mask.to(device)
        handles = []
        if index == 0:  # each module's error (an extra unquantized matmul) on the first chunk only; the block's on all
            for module_name, meter in meters.items():
                meter.mask = None if module_name in preselected else mask
                handles.append(block.get_submodule(module_name).register_forward_hook(meter.measure))
        with _hooks(handles), calibrate_all_experts(experts, mask):
            out = replay(block, call, device)
        _accumulate_error(out, expected.to(device), mask, err, ref)
        calls[index] = ModuleCall((expected if full_precision else _store(out, storage),), call.kwargs, call.mask)
    rel_error = _ratio(err, ref)  # waits for the block's queued GPU work, so the time below includes it
    for module in experts:
        module.routed_only = False
    module_errors = {f"{name}.{n}": m.relative() for n, m in meters.items()}
    return LayerStats(
        name=name,
        seconds=time.perf_counter() - start,
        rel_error=rel_error,
        module_errors={key: value for key, value in module_errors.items() if value is not None},
        groups=[g.report for g in groups],
        expert_tokens=expert_tokens,
    )


def _replay_block(
    block: nn.Module, name: str, stack: BlockStack, calls: list[ModuleCall], device: torch.device, storage: torch.device
) -> None:
    """Step d alone, for a block restored by a resumed run: its outputs become the next block's inputs."""
    stack = stack.for_block(block, name)
    experts: list[ExpertList] = [] if stack.experts is None else [block.get_submodule(stack.experts)]
    for index, call in enumerate(calls):
        with calibrate_all_experts(experts, call.mask.to(device)):
            out = replay(block, call, device)
        calls[index] = ModuleCall((_store(out, storage),), call.kwargs, call.mask)


def quantize_blocks_sequential(
    model: nn.Module,
    stack: BlockStack,
    scheme: Scheme,
    calibration: Calibration,
    device: torch.device,
    options: PipelineOptions,
    progress: LayerProgress | None = None,
    block_home: BlockHome | None = None,
) -> list[LayerStats]:
    """Quantize every block of ``stack`` in order on propagated calibration activations (module docstring).

    With ``progress``, blocks saved by an interrupted run are restored and replayed instead of quantized,
    and each newly quantized block is saved (:mod:`quant.resume`). ``block_home``: module docstring.
    """
    blocks = block_list(model, stack)
    storage = torch.device("cpu") if options.offload_activations else device
    layers = progress.restore(blocks, stack, scheme) if progress is not None else []
    restored = len(layers)
    if restored == len(blocks):
        for block in blocks:
            if block_home is not None:
                block_home(block, already_home())
        return layers
    with torch.no_grad():
        if stack.packed:
            others = [block_list(model, other) for other in stacks_of(model) if other.path != stack.path]
            calls, block_kwargs = capture_packed_inputs(model, blocks, calibration, device, options, others)
        else:
            calls, block_kwargs = capture_block_inputs(model, blocks, calibration, device, options), None
    with BlockPrefetcher(blocks, device) as prefetcher:
        for index, block in enumerate(tqdm(blocks, desc=f"{scheme.name}: {stack.path}", unit="block")):
            name = f"{stack.path}.{index}"
            home = prefetcher.take(index)
            if block_kwargs is not None:
                for call, kwargs in zip(calls, block_kwargs[index]):
                    call.kwargs = kwargs
            try:
                with torch.no_grad(), fused_rms_norms(block):
                    if index < restored:
                        _replay_block(block, name, stack, calls, device, storage)
                    else:
                        layers.append(_quantize_block(block, name, stack, calls, scheme, device, storage))
                if progress is not None and index < restored:
                    progress.check(stack.path, index, calls)
                elif progress is not None:
                    progress.save(stack.path, index, block, layers[index], calls)
            finally:
                returned = prefetcher.put_back(index, home)
            if block_home is not None:
                block_home(block, returned)
    return layers


def quantize_blocks_data_free(
    model: nn.Module,
    stack: BlockStack,
    scheme: Scheme,
    device: torch.device,
    progress: LayerProgress | None = None,
    block_home: BlockHome | None = None,
) -> list[LayerStats]:
    """Round every target of ``stack`` to nearest, block by block on ``device``, without any forward pass.

    With ``progress``, blocks saved by an interrupted run are restored, and each new one is saved.
    ``block_home``: module docstring.
    """
    blocks = block_list(model, stack)
    layers = progress.restore(blocks, stack, scheme) if progress is not None else []
    for block in blocks[: len(layers)]:  # restored: they never leave home
        if block_home is not None:
            block_home(block, already_home())
    with BlockPrefetcher(blocks, device) as prefetcher:
        todo = range(len(layers), len(blocks))
        for index in tqdm(
            todo, desc=f"{scheme.name}: {stack.path}", unit="block", initial=todo.start, total=len(blocks)
        ):
            block = blocks[index]
            start = time.perf_counter()
            name = f"{stack.path}.{index}"
            home = prefetcher.take(index)
            expanded = stack.for_block(block, name)
            try:
                _check_weights(block, name, expanded, scheme)
                with torch.no_grad():
                    for target in expanded.targets:
                        replace_module(block, target, rtn_quantize_linear(block.get_submodule(target), scheme))
                groups = [GroupStats(tuple(f"{name}.{n}" for n in names)) for names in expanded.groups]
                layers.append(LayerStats(name=name, seconds=time.perf_counter() - start, groups=groups))
                if progress is not None:
                    progress.save(stack.path, index, block, layers[index], None)
            finally:
                returned = prefetcher.put_back(index, home)
            if block_home is not None:
                block_home(block, returned)
    return layers
