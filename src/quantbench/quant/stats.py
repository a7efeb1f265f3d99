"""What a quantization run reports: per layer and per shared-input group, errors, timings and fallbacks."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class GroupStats:
    """One group of linears quantized together (they share an input): tokens seen, time, fallbacks taken."""

    linears: tuple[str, ...]
    tokens: int = 0
    seconds: float = 0.0
    fallbacks: list[str] = field(default_factory=list)
    search_error: float | None = None  # AWQ, chosen scales: the linears' relative output error (angelslim: the block's)


@dataclass
class LayerStats:
    """One block: relative output error of the quantized block vs the unquantized one, per module too."""

    name: str
    seconds: float = 0.0
    rel_error: float | None = None
    module_errors: dict[str, float] = field(default_factory=dict)  # on the first calibration chunk only
    groups: list[GroupStats] = field(default_factory=list)
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)  # MoE: real tokens routed to each expert


@dataclass
class QuantStats:
    """A whole run. Relative errors are ``sum |y_q - y|^2 / sum |y|^2`` over non-padding calibration tokens."""

    scheme: str
    algorithm: str
    device: str
    seconds: float = 0.0
    calibration_tokens: int = 0
    layers: list[LayerStats] = field(default_factory=list)

    @property
    def fallbacks(self) -> list[str]:
        """Every fallback taken, prefixed by the linears it concerns."""
        return [
            f"{', '.join(g.linears)}: {note}" for layer in self.layers for g in layer.groups for note in g.fallbacks
        ]

    def to_dict(self, *, timings: bool = True) -> dict[str, Any]:
        """Plain data for JSON; without ``timings`` it is reproducible byte for byte (for provenance)."""
        out = asdict(self)
        out["fallbacks"] = self.fallbacks
        if not timings:
            _drop_key(out, "seconds")
        return out


def _drop_key(obj: Any, key: str) -> None:
    if isinstance(obj, dict):
        obj.pop(key, None)
        for value in obj.values():
            _drop_key(value, key)
    elif isinstance(obj, list):
        for value in obj:
            _drop_key(value, key)
