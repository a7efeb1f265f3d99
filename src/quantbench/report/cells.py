"""Collect per-cell evaluation results (one JSON per model, scheme, benchmark) into the long table frame, and
the scores of every filter a cell's metric was reported under (GSM8K's strict-match and flexible-extract)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from quantbench.report.tables import LONG_COLUMNS
from quantbench.util.errors import QuantbenchError

FILTER_SCORE_COLUMNS = ("table", "model", "scheme", "benchmark", "filter", "reported", "value")


def collect_cells(table: str, result_files: Iterable[str | Path]) -> pd.DataFrame:
    """One long-format row (table, model, scheme, benchmark, value) per result file; value is its ``score``."""
    rows = []
    for path in result_files:
        try:
            result = json.loads(Path(path).read_text(encoding="utf-8"))
            rows.append((table, result["model"], result["scheme"], result["benchmark"], float(result["score"])))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise QuantbenchError(
                f"result file {path} is unreadable or lacks model/scheme/benchmark/score: {exc}"
            ) from exc
    return pd.DataFrame(rows, columns=list(LONG_COLUMNS))


def collect_filter_scores(table: str, result_files: Iterable[str | Path]) -> pd.DataFrame:
    """The scores of every filter of each cell's metric (:data:`FILTER_SCORE_COLUMNS`; ``reported``: the
    filter the table shows), for the cells whose result records more than one; other cells give no rows."""
    rows = []
    for path in result_files:
        result = json.loads(Path(path).read_text(encoding="utf-8"))
        settings = (result.get("spec") or {}).get("lm_eval") or {}
        metric = settings.get("metric")
        by_filter = {
            key.split(",", 1)[1]: value
            for key, value in (result.get("scores") or {}).items()
            if key.split(",", 1)[0] == metric
        }
        if len(by_filter) > 1:
            rows += [
                (table, result["model"], result["scheme"], result["benchmark"], name, name == settings["filter"], value)
                for name, value in by_filter.items()
            ]
    return pd.DataFrame(rows, columns=list(FILTER_SCORE_COLUMNS))
