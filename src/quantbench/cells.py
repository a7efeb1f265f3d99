"""Collect per-cell evaluation results (one JSON per model, scheme, benchmark) into the long table frame."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from quantbench.errors import QuantbenchError
from quantbench.tables import LONG_COLUMNS


def collect_cells(table: str, result_files: Iterable[str | Path]) -> pd.DataFrame:
    """One long-format row (table, model, scheme, benchmark, value) per result file; value is its ``score``."""
    rows = []
    for path in result_files:
        try:
            result = json.loads(Path(path).read_text(encoding="utf-8"))
            rows.append((table, result["model"], result["scheme"], result["benchmark"], float(result["score"])))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise QuantbenchError(f"result file {path} is unreadable or lacks model/scheme/benchmark/score: {exc}") from exc
    return pd.DataFrame(rows, columns=list(LONG_COLUMNS))
