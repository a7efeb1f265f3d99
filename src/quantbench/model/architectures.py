"""Per-architecture mapping, as data keyed by ``config.model_type``: where the blocks are and what they hold.

For each module group a scheme can target (``language``: the decoder layers; ``vision``: the vision
tower's blocks) a :class:`BlockStack` names the ``nn.ModuleList`` of blocks and, relative to one block:

- ``groups``: the target linears, grouped by the input they share (q/k/v; gate/up), in execution order.
  Statistics (Hessians, activation ranges) are gathered once per group.
- ``smooth``: AWQ's smoothing mappings: scales folded into ``prev`` (a norm's weight or a linear's output
  rows) and divided out of the input columns of ``linears``, which must be one of the ``groups``; ``block``
  names the module (attention, MLP) whose output AngelSlim's AWQ style scores, ``unquantized`` the other
  readers of ``prev``'s output (MoE routers), whose input columns take the scales too.
- ``clip_skip``: linears AWQ's clipping search leaves alone (q/k: their error acts through the softmax).
- ``keep``: modules a block holds that stay unquantized (MoE routers); the checkpoint's ``ignore`` names
  them, since vLLM builds them as linears.
- ``experts``: a mixture-of-experts block's experts module, unfused to one linear per expert
  (:mod:`quantbench.model.experts`). Names may then hold ``*`` (every expert, in one group or mapping: the
  experts' gate/up read the same input) or ``{e}`` (one group or mapping per expert: its down_proj);
  :meth:`BlockStack.for_block` expands them for a block's number of experts.
- ``packed``: the blocks take every image's tokens packed into ``[tokens, hidden]`` (no padding) and
  keyword arguments that differ from block to block (a vision tower's windowed or full attention
  spans), so calibration captures each block's own arguments.

Every other ``nn.Linear`` found in a block is an error, so a new architecture variant never silently
keeps linears in BF16. lm_head, embeddings and norms live outside the blocks and are never targets.
The functions below find a model's stacks, blocks, experts and kept modules, and swap a module by name.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn
from transformers import PretrainedConfig

from quantbench.util.errors import QuantbenchError


@dataclass(frozen=True)
class SmoothMapping:
    """One AWQ smoothing pair: ``prev``'s output is the shared input of ``linears`` (and of ``unquantized``)."""

    prev: str
    linears: tuple[str, ...]
    block: str | None = None  # the module holding ``linears`` whose output a block-output loss measures
    unquantized: tuple[str, ...] = ()  # modules also reading ``prev``'s output that stay unquantized (routers)


@dataclass(frozen=True)
class BlockStack:
    """A stack of identical blocks (decoder layers, vision blocks) and the role of each linear in a block."""

    path: str
    groups: tuple[tuple[str, ...], ...]
    smooth: tuple[SmoothMapping, ...] = ()
    clip_skip: tuple[str, ...] = ()
    keep: tuple[str, ...] = ()
    experts: str | None = None
    packed: bool = False

    def __post_init__(self) -> None:
        for mapping in self.smooth:
            if mapping.linears not in self.groups or not set(mapping.unquantized) <= set(self.keep):
                raise ValueError(
                    f"smoothing mapping {mapping} does not feed one of the groups {self.groups} (or reaches modules not kept)"
                )
        templated = any("*" in n or "{e}" in n for names in self.groups for n in names)
        if templated and self.experts is None:
            raise ValueError(f"{self.path}: per-expert names need the experts module's path")

    def for_block(self, block: nn.Module, block_name: str) -> BlockStack:
        """This stack with per-expert names expanded for ``block``'s number of experts (itself without experts)."""
        if self.experts is None:
            return self
        try:
            num = len(block.get_submodule(self.experts))
        except (AttributeError, TypeError):
            raise QuantbenchError(
                f"{block_name}.{self.experts} is not a list of experts (mixed dense/MoE layers, or fused experts "
                "not unfused by quantbench.model.experts.unfuse_experts)"
            ) from None
        experts = range(num)
        return replace(
            self,
            groups=tuple(g for group in self.groups for g in _expand(group, experts)),
            smooth=tuple(
                replace(m, prev=t[0], linears=t[1:])
                for m in self.smooth
                for t in _expand((m.prev, *m.linears), experts)
            ),
        )

    @property
    def targets(self) -> tuple[str, ...]:
        """Every target linear of a block, in execution order."""
        return tuple(name for group in self.groups for name in group)


def _expand(names: tuple[str, ...], experts: range) -> list[tuple[str, ...]]:
    """Names with ``{e}``: one tuple per expert; else one tuple with each ``*`` name repeated for every expert."""
    if any("{e}" in n for n in names):
        return [tuple(n.format(e=e) for n in names) for e in experts]
    return [tuple(x for n in names for x in ([n.replace("*", str(e)) for e in experts] if "*" in n else [n]))]


@dataclass(frozen=True)
class Architecture:
    """The block stacks of one architecture, per target group."""

    language: BlockStack
    vision: BlockStack | None = None

    def stack(self, group: str, model_type: str) -> BlockStack:
        """The stack of target group ``group`` ('language' or 'vision')."""
        stack = getattr(self, group, None)
        if stack is None:
            raise QuantbenchError(
                f"model type {model_type!r} has no {group!r} blocks; drop {group!r} from the scheme's targets"
            )
        return stack


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")


def _decoder(path: str) -> BlockStack:
    """A dense pre-norm decoder layer: q/k/v/o attention and a gated (SwiGLU) MLP."""
    return BlockStack(
        path=path,
        groups=(_QKV, ("self_attn.o_proj",), _GATE_UP, ("mlp.down_proj",)),
        smooth=(
            SmoothMapping("input_layernorm", _QKV, block="self_attn"),
            SmoothMapping("self_attn.v_proj", ("self_attn.o_proj",)),
            SmoothMapping("post_attention_layernorm", _GATE_UP, block="mlp"),
            SmoothMapping("mlp.up_proj", ("mlp.down_proj",)),
        ),
        clip_skip=("self_attn.q_proj", "self_attn.k_proj"),
    )


def _moe_decoder(path: str, *, router: str, shared_expert: str | None = None) -> BlockStack:
    """A pre-norm decoder layer whose MLP is routed experts (``mlp.experts``), optionally plus a shared expert.

    Every expert's gate/up (and the shared expert's) read the post-attention norm's output, as does the router:
    one group, one AWQ mapping, one Hessian. Each expert's down_proj reads its own input.
    """
    dense = _decoder(path)
    shared_in = (f"{shared_expert}.gate_proj", f"{shared_expert}.up_proj") if shared_expert else ()
    mlp_in = (*shared_in, "mlp.experts.*.gate_proj", "mlp.experts.*.up_proj")
    expert_down = ("mlp.experts.{e}.down_proj",)
    shared_down = ((f"{shared_expert}.down_proj",),) if shared_expert else ()
    shared_smooth = (SmoothMapping(f"{shared_expert}.up_proj", shared_down[0]),) if shared_expert else ()
    return BlockStack(
        path=path,
        groups=(_QKV, ("self_attn.o_proj",), mlp_in, expert_down, *shared_down),
        smooth=(
            *dense.smooth[:2],
            SmoothMapping("post_attention_layernorm", mlp_in, block="mlp", unquantized=(router,)),
            SmoothMapping("mlp.experts.{e}.up_proj", expert_down),
            *shared_smooth,
        ),
        clip_skip=dense.clip_skip,
        keep=(router,),
        experts="mlp.experts",
    )


_DENSE = Architecture(language=_decoder("model.layers"))

ARCHITECTURES: dict[str, Architecture] = {
    "llama": _DENSE,
    "mistral": _DENSE,
    "qwen2": _DENSE,
    "qwen3": _DENSE,
    "hunyuan_v1_dense": _DENSE,
    "qwen3_moe": Architecture(language=_moe_decoder("model.layers", router="mlp.gate")),
    "hunyuan_v1_moe": Architecture(
        language=_moe_decoder("model.layers", router="mlp.gate.wg", shared_expert="mlp.shared_mlp")
    ),
    "qwen2_5_vl": Architecture(
        language=_decoder("model.language_model.layers"),
        vision=BlockStack(
            path="model.visual.blocks",
            groups=(("attn.qkv",), ("attn.proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
            packed=True,
        ),
    ),
}


def get_architecture(config: PretrainedConfig) -> Architecture:
    """The mapping for ``config.model_type``, or an error listing the supported types."""
    model_type = getattr(config, "model_type", None)
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise QuantbenchError(
            f"model type {model_type!r} has no architecture mapping; supported: {', '.join(sorted(ARCHITECTURES))} "
            "(add one to quantbench.model.architectures.ARCHITECTURES)"
        ) from None


def block_list(model: nn.Module, stack: BlockStack) -> nn.ModuleList:
    """The ``nn.ModuleList`` of blocks at ``stack.path`` in ``model``."""
    try:
        blocks = model.get_submodule(stack.path)
    except AttributeError:
        raise QuantbenchError(
            f"{type(model).__name__} has no module {stack.path!r}; the architecture mapping is wrong"
        ) from None
    if not isinstance(blocks, nn.ModuleList):
        raise QuantbenchError(
            f"{stack.path!r} in {type(model).__name__} is a {type(blocks).__name__}, not a ModuleList"
        )
    return blocks


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Swap the submodule at dotted path ``name`` of ``root`` for ``new`` (a linear for its quantized twin)."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def stacks_of(model: nn.Module) -> list[BlockStack]:
    """Every block stack of ``model``'s architecture that the model holds (a VLM's text-only twin has no vision)."""
    architecture = get_architecture(model.config)
    stacks = [architecture.language, architecture.vision]
    return [s for s in stacks if s is not None and _has_module(model, s.path)]


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def experts_paths(model: nn.Module) -> list[str]:
    """Full names of the experts module of every MoE block of ``model`` (empty for dense models)."""
    return [
        f"{stack.path}.{index}.{stack.experts}"
        for stack in stacks_of(model)
        if stack.experts is not None
        for index in range(len(block_list(model, stack)))
    ]


def kept_modules(model: nn.Module) -> list[str]:
    """Full names of the modules the blocks of ``model`` keep unquantized (routers)."""
    return [
        f"{stack.path}.{index}.{name}"
        for stack in stacks_of(model)
        for index in range(len(block_list(model, stack)))
        for name in stack.keep
    ]


def check_block(block: nn.Module, stack: BlockStack, block_name: str) -> None:
    """Fail unless every target is an ``nn.Linear`` and every ``nn.Linear`` is a target or kept.

    ``stack`` is expanded for the block (:meth:`BlockStack.for_block`). Also refuses parameters of rank > 2
    (fused experts left fused).
    """
    for name in stack.targets:
        try:
            module = block.get_submodule(name)
        except AttributeError:
            raise QuantbenchError(f"{block_name} has no module {name!r}; the architecture mapping is wrong") from None
        if not isinstance(module, nn.Linear):
            raise QuantbenchError(f"{block_name}.{name} is a {type(module).__name__}, expected nn.Linear")
    covered = set(stack.targets) | set(stack.keep)
    stray = [name for name, module in block.named_modules() if isinstance(module, nn.Linear) and name not in covered]
    if stray:
        raise QuantbenchError(
            f"{block_name} holds linear(s) {stray} that the architecture mapping neither quantizes nor keeps; "
            "extend quantbench.model.architectures"
        )
    fused = [name for name, param in block.named_parameters() if param.dim() > 2]
    if fused:
        raise QuantbenchError(
            f"{block_name} holds fused (rank > 2) weights {fused}; the architecture mapping must name its experts "
            "module so quantbench unfuses them"
        )
