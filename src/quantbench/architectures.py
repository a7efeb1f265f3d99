"""Per-architecture mapping, as data keyed by ``config.model_type``: where the blocks are and what they hold.

For each module group a scheme can target (``language``: the decoder layers; ``vision``: the vision
tower's blocks) a :class:`BlockStack` names the ``nn.ModuleList`` of blocks and, relative to one block:

- ``groups``: the target linears, grouped by the input they share (q/k/v; gate/up), in execution order.
  Statistics (Hessians, activation ranges) are gathered once per group.
- ``smooth``: AWQ's smoothing mappings: scales folded into ``prev`` (a norm's weight or a linear's output
  rows) and divided out of the input columns of ``linears``, which must be one of the ``groups``.
- ``clip_skip``: linears AWQ's clipping search leaves alone (q/k: their error acts through the softmax).
- ``keep``: linears a block holds that stay unquantized (MoE routers).

Every other ``nn.Linear`` found in a block is an error, so a new architecture variant never silently
keeps linears in BF16. lm_head, embeddings and norms live outside the blocks and are never targets.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig

from quantbench.errors import QuantbenchError


@dataclass(frozen=True)
class SmoothMapping:
    """One AWQ smoothing pair: ``prev``'s output is the shared input of ``linears``."""

    prev: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class BlockStack:
    """A stack of identical blocks (decoder layers, vision blocks) and the role of each linear in a block."""

    path: str
    groups: tuple[tuple[str, ...], ...]
    smooth: tuple[SmoothMapping, ...] = ()
    clip_skip: tuple[str, ...] = ()
    keep: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for mapping in self.smooth:
            if mapping.linears not in self.groups:
                raise ValueError(f"smoothing mapping {mapping} does not feed one of the groups {self.groups}")

    @property
    def targets(self) -> tuple[str, ...]:
        """Every target linear of a block, in execution order."""
        return tuple(name for group in self.groups for name in group)


@dataclass(frozen=True)
class Architecture:
    """The block stacks of one architecture, per target group."""

    language: BlockStack
    vision: BlockStack | None = None

    def stack(self, group: str, model_type: str) -> BlockStack:
        """The stack of target group ``group`` ('language' or 'vision')."""
        stack = getattr(self, group, None)
        if stack is None:
            raise QuantbenchError(f"model type {model_type!r} has no {group!r} blocks; drop {group!r} from the scheme's targets")
        return stack


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")


def _decoder(path: str) -> BlockStack:
    """A dense pre-norm decoder layer: q/k/v/o attention and a gated (SwiGLU) MLP."""
    return BlockStack(
        path=path,
        groups=(_QKV, ("self_attn.o_proj",), _GATE_UP, ("mlp.down_proj",)),
        smooth=(
            SmoothMapping("input_layernorm", _QKV),
            SmoothMapping("self_attn.v_proj", ("self_attn.o_proj",)),
            SmoothMapping("post_attention_layernorm", _GATE_UP),
            SmoothMapping("mlp.up_proj", ("mlp.down_proj",)),
        ),
        clip_skip=("self_attn.q_proj", "self_attn.k_proj"),
    )


_DENSE = Architecture(language=_decoder("model.layers"))

ARCHITECTURES: dict[str, Architecture] = {
    "llama": _DENSE,
    "mistral": _DENSE,
    "qwen2": _DENSE,
    "qwen3": _DENSE,
    "hunyuan_v1_dense": _DENSE,
    "qwen2_5_vl": Architecture(
        language=_decoder("model.language_model.layers"),
        vision=BlockStack(
            path="model.visual.blocks",
            groups=(("attn.qkv",), ("attn.proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
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
            "(add one to quantbench.architectures.ARCHITECTURES)"
        ) from None


def block_list(model: nn.Module, stack: BlockStack) -> nn.ModuleList:
    """The ``nn.ModuleList`` of blocks at ``stack.path`` in ``model``."""
    try:
        blocks = model.get_submodule(stack.path)
    except AttributeError:
        raise QuantbenchError(f"{type(model).__name__} has no module {stack.path!r}; the architecture mapping is wrong") from None
    if not isinstance(blocks, nn.ModuleList):
        raise QuantbenchError(f"{stack.path!r} in {type(model).__name__} is a {type(blocks).__name__}, not a ModuleList")
    return blocks


def check_block(block: nn.Module, stack: BlockStack, block_name: str) -> None:
    """Fail unless every target is an ``nn.Linear`` and every ``nn.Linear`` is a target or kept.

    Also refuses parameters of rank > 2 (fused MoE experts), which the mapping does not describe yet.
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
            "extend quantbench.architectures"
        )
    fused = [name for name, param in block.named_parameters() if param.dim() > 2]
    if fused:
        raise QuantbenchError(f"{block_name} holds fused (rank > 2) weights {fused} that the mapping does not describe")
