"""Recorded module calls: stop a forward pass at a module, keep its inputs, and replay them later.

The sequential pipeline needs the exact inputs a decoder layer receives, keyword arguments included
(position embeddings, attention mask). A forward pre-hook that records the
call and raises a private exception gets them without knowing how the model builds them, and without
running anything after that module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class _StopForward(Exception):
    """Raised by a capture hook to end the forward pass once the module's inputs are recorded."""


@dataclass
class ModuleCall:
    """One recorded call of a module on one calibration chunk, with the chunk's token mask ``[batch, seq]``."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    mask: torch.Tensor


def to_device(obj: Any, device: torch.device | str, memo: dict[int, torch.Tensor] | None = None) -> Any:
    """``obj`` with every tensor inside (tuples, lists, dicts) moved to ``device``.

    With ``memo`` (tensor id -> moved tensor, kept by the caller while the originals live), a tensor met
    again, here or in an earlier call, is moved once and shared.
    """
    if isinstance(obj, torch.Tensor):
        if memo is None:
            return obj.to(device, non_blocking=True)
        if id(obj) not in memo:
            memo[id(obj)] = obj.to(device, non_blocking=True)
        return memo[id(obj)]
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(item, device, memo) for item in obj)
    if isinstance(obj, dict):
        return {key: to_device(value, device, memo) for key, value in obj.items()}
    return obj


def replay(module: nn.Module, call: ModuleCall, device: torch.device) -> torch.Tensor:
    """Run ``module`` on a recorded call (moved to ``device``); the first output when it returns a tuple."""
    out = module(*to_device(call.args, device), **to_device(call.kwargs, device))
    return out[0] if isinstance(out, tuple) else out


def capture_calls(modules: Sequence[nn.Module], run: Callable[[], Any]) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """Run ``run()`` until the last of ``modules`` is first called; return each module's first call (args, kwargs).

    Blocks of one stack may get different keyword arguments (a vision tower's windowed and full attention
    spans), which this records, at the cost of running every module but the last.
    """
    captured: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}
    last = len(modules) - 1

    def hook_of(index: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            captured.setdefault(index, (args, kwargs))
            if index == last:
                raise _StopForward

        return hook

    handles = [module.register_forward_pre_hook(hook_of(i), with_kwargs=True) for i, module in enumerate(modules)]
    try:
        run()
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [type(modules[i]).__name__ for i in range(len(modules)) if i not in captured]
    if missing:
        raise RuntimeError(f"the forward pass never reached {missing[0]}")
    return [captured[i] for i in range(len(modules))]


def capture_call(module: nn.Module, run: Callable[[], Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Run ``run()`` until ``module`` is first called; return that call's positional and keyword arguments."""
    return capture_calls([module], run)[0]
