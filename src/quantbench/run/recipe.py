"""The recipe that made the published cells, as data, and the settings of a run that depart from it.

A recipe file (``resources/published/angelslim-recipe.yaml``: AngelSlim at 4cc21d9, ``docs/fidelity.md``
gives each value's source) holds what quantbench can select: the calibration stream of text and of
image-text sets, per model and scheme the calibration samples, tokens and data, scheme fields (dotted
keys of :meth:`quantbench.quant.schemes.Scheme.to_dict`), and the departures that no option selects, with the
tables and schemes they concern. :func:`departures` compares a run config's table with it, for the comparison report.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from quantbench.run.config import CalibrationSet, RunConfig, TableConfig
from quantbench.util.errors import QuantbenchError

EXPERTS_KEY = "calibration.experts"  # a scheme field that matters for mixture-of-experts models only


@dataclass(frozen=True)
class FixedDeparture:
    """A departure no option selects, concerning the rows of ``schemes`` in ``tables`` (empty: all)."""

    text: str
    tables: tuple[str, ...] = ()
    schemes: tuple[str, ...] = ()

    def concerns(self, table: str, rows: tuple[tuple[str, str], ...]) -> bool:
        """Whether ``table`` with ``rows`` (model, scheme) has a row this departure concerns."""
        in_table = not self.tables or table in self.tables
        return in_table and (not self.schemes or any(scheme in self.schemes for _, scheme in rows))


@dataclass(frozen=True)
class Recipe:
    """A published recipe (module docstring)."""

    name: str
    streams: Mapping[str, Mapping[str, str]]
    schemes: Mapping[str, Mapping[str, Any]]
    moe_models: frozenset[str]
    calibration: Mapping[str, Mapping[str, tuple[int, int, str]]]
    fixed: tuple[FixedDeparture, ...]


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe file; a missing file or key is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise QuantbenchError(f"recipe file {path} does not exist; set compare.recipe to a recipe YAML")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    missing = [k for k in ("recipe", "streams", "schemes", "calibration") if k not in raw]
    if missing:
        raise QuantbenchError(f"{path}: missing key(s) {missing}")
    try:
        calibration = {
            model: {scheme: (int(n), int(length), str(data)) for scheme, (n, length, data) in row.items()}
            for model, row in raw["calibration"].items()
        }
        fixed = tuple(
            FixedDeparture(str(item["text"]), tuple(item.get("tables", ())), tuple(item.get("schemes", ())))
            for item in raw.get("fixed", [])
        )
    except (TypeError, ValueError, KeyError) as exc:
        raise QuantbenchError(
            f"{path}: calibration rows are [samples, tokens, data]; fixed items {{text, tables, schemes}} ({exc!r})"
        ) from None
    return Recipe(
        str(raw["recipe"]), raw["streams"], raw["schemes"], frozenset(raw.get("moe_models", [])), calibration, fixed
    )


def _flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _data_name(calib: CalibrationSet) -> str:
    """How a recipe names a set's data: the JSONL's file name, or ``dataset:split`` of a Hub set."""
    return f"{calib.hub.dataset}:{calib.hub.split}" if calib.hub is not None else calib.path.name


def departures(run: RunConfig, table: TableConfig, recipe: Recipe) -> list[str]:
    """One line per setting of ``table``'s rows that departs from ``recipe``: the setting, the run's value, the
    recipe's, and the rows concerned; then the recipe's fixed departures for the table."""
    found: dict[tuple[str, str, str], list[str]] = {}
    rows = run.table_rows(table)

    def differ(setting: str, ours: Any, theirs: Any, row: str) -> None:
        if ours != theirs:
            found.setdefault((setting, str(ours), str(theirs)), []).append(row)

    for model, name in rows:
        row = f"{model} {name}"
        scheme = run.schemes[name].to_dict()
        fields = _flat(scheme)
        for key, theirs in _flat(recipe.schemes.get(name, {})).items():
            if key != EXPERTS_KEY or model in recipe.moe_models:
                differ(f"scheme {key}", fields.get(key), theirs, row)
        calib = run.calibration_of(model, name)
        expected = recipe.calibration.get(model, {}).get(name)
        if calib is None or expected is None:
            continue
        n, length, data = expected
        differ("calibration data", _data_name(calib), data, row)
        differ("calibration samples", calib.num_samples, n, row)
        differ("calibration tokens per sample", calib.max_seq_len, length, row)
        stream = recipe.streams["image-text" if calib.hub is not None or calib.images else "text"]
        for key, theirs in stream.items():
            differ(f"calibration {key}", getattr(calib.stream, key), theirs, row)
    lines = [
        f"{setting}: {ours} (recipe: {theirs}) -- {', '.join(rows)}" for (setting, ours, theirs), rows in found.items()
    ]
    lines += [fixed.text for fixed in recipe.fixed if fixed.concerns(table.name, rows)]
    return lines
