"""Compare reproduced cells with published ones: per cell the published value, the reproduced value, their
difference and a flag beyond a tolerance; written as CSV, Markdown and a plot per table.

Both sides are long frames (``table, model, scheme, benchmark, value``; :mod:`quantbench.report.tables`). Every
published cell with a number is one row of the comparison, in the published order. Its status is

* ``ok``: reproduced, and ``|reproduced - published| <= tolerance``;
* ``beyond tolerance``: reproduced, and the difference is larger;
* ``not reproduced``: no reproduced value (the job did not run, or failed).

Only ``ok`` rows are unflagged. Published ``-`` cells have nothing to compare and are left out, as are
reproduced cells the page did not publish. Differences are ``reproduced - published`` in the benchmark's
unit (points for percentages).

Where the page prints a benchmark under another label (``page_labels``: benchmark -> the page's label, e.g.
the Hunyuan table's OlympiadBench column labelled CEVAL), the published cell is compared with the
reproduced cell of the benchmark it came from, and the row keeps the page's label (``page_label``).

Where a benchmark's results record several filters of its metric (GSM8K: strict-match, flexible-extract),
:func:`compare_filters` says per row which filter's score is closer to the published number; the
Markdown report lists it under the comparison.

The Markdown report also lists the settings of the run that depart from the recipe that made the
published cells (:func:`quantbench.run.recipe.departures`), when given.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from quantbench.report.tables import MISSING
from quantbench.util.errors import QuantbenchError
from quantbench.util.io import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

COLUMNS = (
    "table",
    "model",
    "scheme",
    "benchmark",
    "page_label",
    "published",
    "reproduced",
    "difference",
    "status",
    "flagged",
)
OK, BEYOND, NOT_REPRODUCED = "ok", "beyond tolerance", "not reproduced"
TIE = "tie"  # two filters equally close to the published number
# The published values have two decimals: a difference within this of the tolerance counts as equal to it.
EPSILON = 1e-9


def compare_cells(
    published: pd.DataFrame,
    reproduced: pd.DataFrame,
    *,
    table: str,
    tolerance: float,
    page_labels: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """The comparison rows (:data:`COLUMNS`) of ``table``: one per published cell with a number.

    ``page_labels``: benchmark -> the label the published page prints for it, where they differ.
    """
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise QuantbenchError(f"compare.tolerance must be a number >= 0, got {tolerance!r}")
    keys = ["model", "scheme", "benchmark"]
    ours = {
        tuple(row[:3]): float(row[3])
        for row in reproduced.loc[reproduced["table"] == table, [*keys, "value"]].itertuples(index=False, name=None)
        if str(row[3]).strip() != MISSING
    }
    cells = published.loc[(published["table"] == table) & (published["value"].astype(str).str.strip() != MISSING)]
    if cells.empty:
        raise QuantbenchError(
            f"the published results have no cell of table {table!r}; check compare.published and the table's name"
        )
    benchmark_of = {label: benchmark for benchmark, label in (page_labels or {}).items()}
    rows = []
    for model, scheme, label, value in cells[[*keys, "value"]].itertuples(index=False, name=None):
        benchmark = benchmark_of.get(label, label)
        theirs = float(value)
        mine = ours.get((model, scheme, benchmark))
        if mine is None:
            rows.append((table, model, scheme, benchmark, label, theirs, math.nan, math.nan, NOT_REPRODUCED, True))
            continue
        difference = mine - theirs
        status = OK if abs(difference) <= tolerance + EPSILON else BEYOND
        rows.append((table, model, scheme, benchmark, label, theirs, mine, difference, status, status != OK))
    return pd.DataFrame(rows, columns=list(COLUMNS))


def compare_filters(comparison: pd.DataFrame, filters: pd.DataFrame) -> pd.DataFrame:
    """Per compared cell whose result records several filters (``filters``: rows of
    :data:`quantbench.report.cells.FILTER_SCORE_COLUMNS`): each filter's score, which one the table reports, and
    the filter closer to the published number (``tie`` when equally close).

    Columns: model, scheme, benchmark, published, reported (the table's filter), one per filter, closer.
    """
    cells = comparison[["model", "scheme", "benchmark", "published"]].itertuples(index=False, name=None)
    published = {(model, scheme, benchmark): value for model, scheme, benchmark, value in cells}
    names = list(dict.fromkeys(filters["filter"]))
    rows = []
    for key, cell in filters.groupby(["model", "scheme", "benchmark"], sort=False):
        if key not in published:
            continue
        values = dict(zip(cell["filter"], cell["value"]))
        distances = {name: abs(value - published[key]) for name, value in values.items()}
        best = min(distances.values())
        closest = [name for name, distance in distances.items() if distance <= best + EPSILON]
        reported = cell.loc[cell["reported"], "filter"]
        rows.append(
            (
                *key,
                published[key],
                reported.iloc[0] if len(reported) else MISSING,
                *(values.get(name, math.nan) for name in names),
                closest[0] if len(closest) == 1 else TIE,
            )
        )
    return pd.DataFrame(rows, columns=["model", "scheme", "benchmark", "published", "reported", *names, "closer"])


def summary(comparison: pd.DataFrame, tolerance: float) -> str:
    """One line: how many published cells were compared, reproduced, and flagged."""
    counts = comparison["status"].value_counts()
    return (
        f"{len(comparison)} published cells: {counts.get(OK, 0)} within ±{tolerance:g}, "
        f"{counts.get(BEYOND, 0)} beyond, {counts.get(NOT_REPRODUCED, 0)} not reproduced"
    )


def _number(value: float, signed: bool = False) -> str:
    if math.isnan(value):
        return MISSING
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def render_departures(recipe: str, departures: Sequence[str]) -> list[str]:
    """Markdown lines: the settings that depart from ``recipe``, the recipe that made the published cells."""
    lines = [
        "## Settings that depart from the published recipe",
        "",
        f"The published cells were made by {recipe}; docs/fidelity.md gives each setting's source and effect.",
        "",
    ]
    return lines + ([f"- {line}" for line in departures] or ["- none"]) + [""]


def render_markdown(
    comparison: pd.DataFrame,
    *,
    table: str,
    tolerance: float,
    filters: pd.DataFrame | None = None,
    recipe: str = "",
    departures: Sequence[str] = (),
) -> str:
    """A Markdown report: a heading, the summary line, the departures from ``recipe`` (when given) and one table
    row per published cell (its benchmark, and the page's label where that differs); then, for ``filters``
    (:func:`compare_filters`), the closer filter."""
    lines = [
        f"# {table}: reproduced vs published",
        "",
        summary(comparison, tolerance) + ".",
        "",
        *(render_departures(recipe, departures) if recipe else []),
        "| Model | Quantization | Benchmark | Published | Reproduced | Difference | Status |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for row in comparison.itertuples(index=False):
        status = f"**{row.status}**" if row.flagged else row.status
        benchmark = row.benchmark if row.page_label == row.benchmark else f"{row.benchmark} (page: {row.page_label})"
        lines.append(
            f"| {row.model} | {row.scheme} | {benchmark} | {_number(row.published)} | "
            f"{_number(row.reproduced)} | {_number(row.difference, signed=True)} | {status} |"
        )
    if filters is not None and not filters.empty:
        lines += ["", *_filter_section(filters)]
    return "\n".join(lines) + "\n"


def _filter_section(filters: pd.DataFrame) -> list[str]:
    names = list(filters.columns[5:-1])
    reported = ", ".join(f"{b}: {f}" for b, f in dict.fromkeys(zip(filters["benchmark"], filters["reported"])))
    counts = filters["closer"].value_counts()
    lines = [
        "## Which filter is closer to the published number",
        "",
        f"The table reports one filter per benchmark ({reported}); the results record every filter. Closer to "
        f"the page: {', '.join(f'{name} in {counts.get(name, 0)}' for name in names)} row(s); equally close in "
        f"{counts.get(TIE, 0)}.",
        "",
        "| Model | Quantization | Benchmark | Published | " + " | ".join(names) + " | Closer |",
        "|---|---|---|---:|" + "---:|" * len(names) + "---|",
    ]
    for row in filters.itertuples(index=False, name=None):
        model, scheme, benchmark, published, _, *values, closer = row
        cells = " | ".join(_number(value) for value in values)
        lines.append(f"| {model} | {scheme} | {benchmark} | {_number(published)} | {cells} | {closer} |")
    return lines


def render_csv(comparison: pd.DataFrame) -> str:
    """The comparison as CSV (empty reproduced/difference where not reproduced)."""
    return comparison.to_csv(index=False, lineterminator="\n", float_format="%.4f")


def render_plot(comparison: pd.DataFrame, *, table: str, tolerance: float) -> bytes:
    """A PNG: one panel per benchmark, one bar per (model, scheme) row showing reproduced - published.

    The tolerance band is shaded; bars beyond it are red, cells not reproduced are marked with an x at 0.
    """
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(dict.fromkeys(zip(comparison["model"], comparison["scheme"])))
    benchmarks = list(dict.fromkeys(comparison["benchmark"]))
    position = {row: i for i, row in enumerate(rows)}
    fig, axes = plt.subplots(
        1, len(benchmarks), sharey=True, squeeze=False, figsize=(2.6 * len(benchmarks) + 2.4, 0.24 * len(rows) + 1.4)
    )
    largest = comparison["difference"].abs().max(skipna=True)
    limit = max(tolerance * 2, 0.0 if pd.isna(largest) else float(largest) * 1.1, 0.5)
    for ax, benchmark in zip(axes[0], benchmarks):
        cells = comparison[comparison["benchmark"] == benchmark]
        ys = [position[(m, s)] for m, s in zip(cells["model"], cells["scheme"])]
        done = cells["status"] != NOT_REPRODUCED
        ax.axvspan(-tolerance, tolerance, color="0.9", zorder=0)
        ax.axvline(0, color="0.5", linewidth=0.8)
        ax.barh(
            [y for y, d in zip(ys, done) if d],
            cells.loc[done, "difference"],
            color=["tab:red" if f else "tab:blue" for f in cells.loc[done, "flagged"]],
            height=0.7,
        )
        ax.scatter([0] * int((~done).sum()), [y for y, d in zip(ys, done) if not d], marker="x", color="tab:red")
        ax.set_xlim(-limit, limit)
        ax.set_title(benchmark, fontsize=9)
        ax.set_xlabel("reproduced - published", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_yticks(range(len(rows)), [f"{m} {s}" for m, s in rows])
    axes[0][0].set_ylim(len(rows) - 0.5, -0.5)  # first row on top
    fig.suptitle(f"{table} (band: ±{tolerance:g}; red: flagged, x: not reproduced)", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def write_comparison(
    published: pd.DataFrame,
    reproduced: pd.DataFrame,
    *,
    table: str,
    tolerance: float,
    csv_path: str | Path,
    md_path: str | Path,
    png_path: str | Path,
    page_labels: Mapping[str, str] | None = None,
    filter_scores: pd.DataFrame | None = None,
    recipe: str = "",
    departures: Sequence[str] = (),
) -> pd.DataFrame:
    """Compare ``table`` and write its CSV, Markdown and PNG (atomically); return the comparison.

    ``page_labels``: see :func:`compare_cells`; ``filter_scores``: every filter's score of the reproduced
    cells (:func:`quantbench.report.cells.collect_filter_scores`), for the Markdown's filter section; ``recipe``,
    ``departures``: the recipe that made the published cells and the run's settings that depart from it.
    """
    comparison = compare_cells(published, reproduced, table=table, tolerance=tolerance, page_labels=page_labels)
    filters = None if filter_scores is None else compare_filters(comparison, filter_scores)
    atomic_write_text(csv_path, render_csv(comparison))
    markdown = render_markdown(
        comparison, table=table, tolerance=tolerance, filters=filters, recipe=recipe, departures=departures
    )
    atomic_write_text(md_path, markdown)
    atomic_write_bytes(png_path, render_plot(comparison, table=table, tolerance=tolerance))
    log.info("%s: %s", table, summary(comparison, tolerance))
    return comparison
