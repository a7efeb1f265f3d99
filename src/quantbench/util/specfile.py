"""Reading specs-as-data YAML files (schemes, benchmarks): one section per file, dataclasses with keyed errors."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from quantbench.util.errors import QuantbenchError


def read_section(path: str | Path, key: str) -> Mapping[str, Any]:
    """The top-level mapping ``key`` of the YAML file ``path`` (e.g. ``schemes:`` of config/schemes.yaml)."""
    path = Path(path)
    if not path.is_file():
        raise QuantbenchError(f"{key} file {path} does not exist; pass the path to config/{key}.yaml")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data.get(key), Mapping):
        raise QuantbenchError(f"{path}: expected a top-level '{key}:' mapping")
    return data[key]


def build_spec(cls: type, raw: Any, where: str) -> Any:
    """``cls(**raw)`` for a dataclass, with unknown keys and bad values reported as errors naming ``where``."""
    if not isinstance(raw, Mapping):
        raise QuantbenchError(f"{where}: expected a mapping, got {type(raw).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise QuantbenchError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(known)}")
    try:
        return cls(**raw)
    except (TypeError, ValueError) as exc:
        raise QuantbenchError(f"{where}: {exc}") from exc


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    """A spec field's check (in ``__post_init__``): ``value`` must be one of ``allowed`` (:func:`build_spec`
    reports the ValueError under the field's key)."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
