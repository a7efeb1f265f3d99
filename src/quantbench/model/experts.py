"""Mixture-of-experts layers as one ``nn.Linear`` per expert, and a calibration mode that reaches every expert.

transformers 5 stores the experts of a MoE layer fused: ``gate_up_proj [E, 2I, H]`` (each expert's gate
rows, then its up rows) and ``down_proj [E, H, I]``, run by a module called as
``experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])`` that sums the chosen experts'
outputs weighted by the router. Hub checkpoints and vLLM name one Linear per expert
(``experts.<e>.{gate,up,down}_proj``). :func:`unfuse_experts` replaces the fused module by an
:class:`ExpertList` of :class:`ExpertMLP` with the same forward and exactly those names, so that the
quantizers, the checkpoint writer and the runtime treat experts as ordinary linears.

In calibration mode (:func:`calibrate_all_experts`) every expert runs on every token, so that each
expert's statistics cover all calibration tokens however peaked the router is, while the layer's output
still combines the router's choices only (the same sum as the routed forward); the real tokens the
router sent to each expert are counted. With the list's ``routed_only`` set (the published recipe's
statistics), calibration mode runs each expert on the real tokens the router sent it and no others, as
the routed forward does; :func:`per_expert_groups` then gives each expert's linears their own statistics.

Experts quantized with per-tensor fp8 inputs run as vLLM's fused MoE runs them
(:func:`quantbench.checkpoint.serving.moe_input_args`): one input scale for the gate/up projections of every expert
(dynamic: the largest ``|x|`` over all the layer's tokens; static: the largest stored scale), one for
every down_proj (over all routed rows, or the largest stored scale). The calibration mode keeps each
expert's own scales.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from quantbench.checkpoint.serving import moe_input_args
from quantbench.model.architectures import replace_module
from quantbench.quant.qdq import FP8_MAX
from quantbench.util.errors import QuantbenchError

FUSED_PARAMETERS = ("gate_up_proj", "down_proj")


class ExpertMLP(nn.Module):
    """One expert: ``down_proj(act(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear, act_fn: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ExpertList(nn.ModuleList):
    """The experts of one MoE layer, called like transformers' fused experts module."""

    def __init__(self, experts: list[ExpertMLP]) -> None:
        super().__init__(experts)
        self.token_mask: torch.Tensor | None = None  # set in calibration mode: which of the T tokens are real
        self.routed: torch.Tensor | None = None  # calibration mode, when set: real tokens routed to each expert
        self.routed_only = False  # calibration mode runs each expert on its routed real tokens only

    @classmethod
    def from_fused(cls, fused: nn.Module, where: str) -> ExpertList:
        """Per-expert linears holding copies of ``fused``'s slices (same device and dtype)."""
        extra = sorted(name for name, _ in fused.named_parameters() if name not in FUSED_PARAMETERS)
        if extra or not all(isinstance(getattr(fused, n, None), nn.Parameter) for n in FUSED_PARAMETERS):
            raise QuantbenchError(
                f"{where} ({type(fused).__name__}) is not a fused experts module of the known layout "
                f"(gate_up_proj [E, 2I, H] and down_proj [E, H, I], no other parameters; found extra {extra})"
            )
        gate_up, down = fused.gate_up_proj, fused.down_proj
        num, double, hidden = gate_up.shape
        if gate_up.dim() != 3 or double % 2 or tuple(down.shape) != (num, hidden, double // 2):
            raise QuantbenchError(
                f"{where}: fused expert shapes gate_up_proj {tuple(gate_up.shape)} and down_proj "
                f"{tuple(down.shape)} are not [E, 2I, H] and [E, H, I]"
            )
        inter = double // 2

        def linear(weight: torch.Tensor) -> nn.Linear:
            module = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta", dtype=weight.dtype)
            module.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
            return module

        return cls(
            [
                ExpertMLP(linear(gate_up[e, :inter]), linear(gate_up[e, inter:]), linear(down[e]), fused.act_fn)
                for e in range(num)
            ]
        )

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        real = None
        if self.token_mask is not None:
            real = self.token_mask.reshape(-1)
            if real.numel() != hidden_states.shape[0]:
                raise QuantbenchError(
                    f"expert input of {hidden_states.shape[0]} tokens does not match the token mask {tuple(self.token_mask.shape)}"
                )
            if self.routed is not None:
                self.routed += torch.bincount(top_k_index[real].reshape(-1), minlength=len(self)).cpu()
            if not self.routed_only:
                return self._forward_all(hidden_states, top_k_index, top_k_weights, out)
        elif moe_input_args(self[0].gate_proj) is not None:
            return self._forward_fused(hidden_states, top_k_index, top_k_weights, out)
        for e in torch.unique(top_k_index).tolist():
            chosen = top_k_index == e
            tokens, slot = torch.where(chosen if real is None else chosen & real[:, None])
            if tokens.numel() == 0:  # only padding chose it: the expert is not run (nor observed)
                continue
            contribution = self[e](hidden_states[tokens]) * top_k_weights[tokens, slot, None]
            out.index_add_(0, tokens, contribution.to(out.dtype))
        return out

    def _forward_fused(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor:
        """The routed forward with vLLM's per-tensor fp8 input scales shared by the layer's experts (module docstring)."""
        if hidden_states.shape[0] == 0:
            return out
        dynamic = moe_input_args(self[0].gate_proj).dynamic
        gate_up_scale = _amax_scale(hidden_states) if dynamic else _largest(e.gate_proj.input_scale for e in self)
        routed = []
        for e in torch.unique(top_k_index).tolist():
            tokens, slot = torch.where(top_k_index == e)
            expert, x = self[e], hidden_states[tokens]
            routed.append(
                (e, tokens, slot, expert.act_fn(expert.gate_proj(x, gate_up_scale)) * expert.up_proj(x, gate_up_scale))
            )
        down_scale = (
            _amax_scale(*(h for *_, h in routed)) if dynamic else _largest(e.down_proj.input_scale for e in self)
        )
        for e, tokens, slot, h in routed:
            contribution = self[e].down_proj(h, down_scale) * top_k_weights[tokens, slot, None]
            out.index_add_(0, tokens, contribution.to(out.dtype))
        return out

    def _forward_all(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor:
        """Calibration: every expert on every token (the hooks see them all); the output uses the router's choices."""
        for e, expert in enumerate(self):
            weight = (top_k_weights * (top_k_index == e)).sum(dim=-1)
            out.add_((expert(hidden_states) * weight[:, None]).to(out.dtype))
        return out


def _amax_scale(*rows: torch.Tensor) -> torch.Tensor:
    """A dynamic per-tensor fp8 scale over all of ``rows`` (non-empty): ``max |x| / 448`` in float32, 1 where all are 0."""
    scale = torch.stack([r.abs().amax().float() for r in rows]).amax().reshape(1) / FP8_MAX
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _largest(scales: Iterable[torch.Tensor]) -> torch.Tensor:
    """The largest of the experts' stored static input scales (vLLM takes the max over a layer's experts)."""
    return torch.stack([s.reshape(()) for s in scales]).amax().reshape(1)


def unfuse_experts(model: nn.Module, paths: list[str]) -> int:
    """Replace the fused experts module at each of ``paths`` (when still fused) by an :class:`ExpertList`.

    Returns how many modules were replaced. Works on meta tensors too (a runtime skeleton).
    """
    replaced = 0
    for path in paths:
        module = model.get_submodule(path)
        if isinstance(module, ExpertList):
            continue
        replace_module(model, path, ExpertList.from_fused(module, path))
        replaced += 1
    return replaced


def per_expert_groups(
    groups: Sequence[tuple[str, ...]], experts: str
) -> list[tuple[tuple[str, ...], tuple[str, ...] | None]]:
    """``groups`` (a block's shared-input groups) with the linears of the experts module ``experts`` split into one
    group per expert, each paired with its parent key: its names with the expert number replaced by ``*``,
    shared by the same linears of every expert (what the published recipe's parent observer collects over).
    Linears outside the experts (a shared expert) keep their group, without a parent.
    """
    prefix = f"{experts}."
    out: list[tuple[tuple[str, ...], tuple[str, ...] | None]] = []
    for group in groups:
        others: list[str] = []
        by_expert: dict[str, list[str]] = {}
        for name in group:
            index, _, _ = name[len(prefix) :].partition(".")
            if name.startswith(prefix) and index.isdigit():
                by_expert.setdefault(index, []).append(name)
            else:
                others.append(name)
        if others:
            out.append((tuple(others), None))
        for index, names in by_expert.items():
            out.append((tuple(names), tuple(n.replace(f"{prefix}{index}.", f"{prefix}*.", 1) for n in names)))
    return out


@contextmanager
def calibrate_all_experts(experts: list[ExpertList], mask: torch.Tensor) -> Iterator[None]:
    """Calibration mode for ``experts`` on a chunk whose real tokens are ``mask [batch, seq]``: every expert on
    every token, or each on its routed real tokens where a list's ``routed_only`` is set (module docstring).

    Routed tokens are added to each list's ``routed`` counts when the caller has set them (zeros).
    """
    for module in experts:
        module.token_mask = mask
    try:
        yield
    finally:
        for module in experts:
            module.token_mask = None
