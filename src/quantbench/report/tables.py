"""Benchmark tables: long-format results -> wide tables -> eval-rst grid, CSV and Markdown files.

The input is a *long* frame, one cell per row, with the columns ``table, model, scheme, benchmark,
value`` (``../shared/reference/seed_tables.csv`` is one). A :class:`TableSpec` fixes which
(model, scheme) rows and which benchmark columns a table shows and in what order; by default
(:func:`table_specs`) the order is first-seen. :func:`wide_table` turns the long frame into the
table's cells as text, and the renderers write them out.

Layout of the eval-rst grid, matching the published page (``../shared/seed/000_*.txt``) line for line:

* A ``.. table::`` directive with ``:align: center`` and ``:name: <table>``, a blank line, then the
  grid indented by three spaces.
* Columns ``Model | Quantization | <benchmarks...>``; the header row is closed by a ``=`` rule.
* The model cell spans its scheme rows: inside a model's block each scheme row is closed by a
  separator that leaves the model column blank (``+   +----+----+``); a full rule closes the block.
  Every model block of every well-formed table on the page does exactly this, so there is no other
  row style to choose. (Rows with no separator line between them would not be separate rows at all:
  docutils merges such lines into one multi-line cell, e.g. a scheme cell reading "BF16 FP8".)
  The page's Qwen2.5VL table starts three of its blocks with a ``|   +----`` line; that is one of
  the defects that make docutils reject it ("Malformed table"), and it is written here in the
  same ``+   +----`` form as every other block.
* A column's width is ``max(display width of its header and cells, minimum) + 2`` spaces of padding,
  with a minimum of 17 for the Model column and 7 for every other column. This reproduces all four
  tables of the page (e.g. CEVAL: max(5, 5, 7) + 2 = 9; Qwen3's Model: max(5, 15, 17) + 2 = 19).
  Display width counts East-Asian wide and full-width characters as two columns, by the same rule
  docutils applies (``docutils.utils.column_width``), so tables with Chinese text stay well-formed.
* Numbers are written with two decimals; text values (from a CSV) are kept exactly as printed.

Missing cells are written as a bare ``-``, byte-identical to the page. To docutils (and Sphinx) a
lone ``-`` is an empty bullet list: the entry becomes ``<bullet_list bullet="-"><list_item/>`` with
no text, which is also how the published page renders its gaps. Escaping it as ``\\-`` would render
a literal dash but would no longer reproduce the page, so the page's convention is kept; the CSV
and Markdown files beside the rst carry the same ``-``.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from docutils.utils import column_width

from quantbench.util.errors import QuantbenchError
from quantbench.util.io import atomic_write_text

logger = logging.getLogger(__name__)

LONG_COLUMNS = ("table", "model", "scheme", "benchmark", "value")
KEY_COLUMNS = LONG_COLUMNS[:-1]
MISSING = "-"
MODEL_HEADER = "Model"
SCHEME_HEADER = "Quantization"
MODEL_MIN_WIDTH = 17
MIN_WIDTH = 7
INDENT = "   "


@dataclass(frozen=True)
class TableSpec:
    """What one table shows: its name, its (model, scheme) rows and its benchmark columns, in order.

    A row or column with no result renders as ``-`` cells, so a spec built from the config shows
    every planned cell whether it has run yet or not. A model's rows must be contiguous (its cell
    spans them). ``labels`` gives a column a header other than its benchmark's name (e.g. the label a
    published page prints for it).
    """

    name: str
    rows: tuple[tuple[str, str], ...]
    benchmarks: tuple[str, ...]
    labels: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rows = tuple(tuple(row) for row in self.rows)
        if any(len(row) != 2 for row in rows):
            raise QuantbenchError(f"table {self.name!r}: each row must be a (model, scheme) pair, got {self.rows!r}")
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "benchmarks", tuple(self.benchmarks))
        object.__setattr__(self, "labels", dict(self.labels))
        if (
            not self.name
            or self.name.startswith(".")
            or any(c in self.name for c in "/\\")
            or any(c.isspace() for c in self.name)
        ):
            raise QuantbenchError(
                f"table name {self.name!r} is not usable as a file name and rst :name:; "
                "use a non-empty name without whitespace, slashes or a leading dot"
            )
        if not self.rows:
            raise QuantbenchError(f"table {self.name!r} has no (model, scheme) rows; list at least one")
        if not self.benchmarks:
            raise QuantbenchError(f"table {self.name!r} has no benchmark columns; list at least one")
        _require_unique(self.name, "row", self.rows)
        _require_unique(self.name, "benchmark", self.benchmarks)
        unknown = sorted(set(self.labels) - set(self.benchmarks))
        if unknown:
            raise QuantbenchError(f"table {self.name!r}: labels given for {unknown}, which are not its benchmarks")
        reserved = {"model", "scheme"} & (set(self.benchmarks) | set(self.headers))
        if reserved:
            raise QuantbenchError(f"table {self.name!r}: benchmark name(s) {sorted(reserved)} clash with row labels")
        _require_unique(self.name, "column label", self.headers)
        closed: set[str] = set()
        for (model, _), (previous, _) in zip(self.rows[1:], self.rows[:-1]):
            if model != previous:
                closed.add(previous)
                if model in closed:
                    raise QuantbenchError(
                        f"table {self.name!r}: the rows of model {model!r} are not contiguous; "
                        "list all schemes of a model together"
                    )

    @property
    def headers(self) -> tuple[str, ...]:
        """The benchmark columns' header labels, in order."""
        return tuple(self.labels.get(benchmark, benchmark) for benchmark in self.benchmarks)


def _require_unique(table: str, what: str, items: Sequence[Hashable]) -> None:
    seen: set[Hashable] = set()
    for item in items:
        if item in seen:
            raise QuantbenchError(f"table {table!r} lists {what} {item!r} twice; list it once")
        seen.add(item)


def format_value(value: object) -> str:
    """Text of one cell: numbers with two decimals, numeric strings as printed, ``-`` when missing.

    ``None``, NaN and the string ``-`` are missing. Raises ``ValueError`` for anything else that is
    not a finite number or a numeric string.
    """
    if value is None or value is pd.NA:
        return MISSING
    if isinstance(value, str):
        text = value.strip()
        if text == MISSING:
            return MISSING
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"value {value!r} is neither a number nor {MISSING!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"value {value!r} is not a finite number")
        return text
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if math.isnan(value):
            return MISSING
        if math.isinf(value):
            raise ValueError(f"value {value!r} is not a finite number")
        return f"{value:.2f}"
    raise ValueError(f"value {value!r} of type {type(value).__name__} is neither a number nor {MISSING!r}")


def _check_long_frame(frame: pd.DataFrame, describe: Callable[[int], str]) -> pd.DataFrame:
    """Validate a long frame; return it with keys as stripped text and values formatted as cell text.

    ``describe(i)`` names the i-th row (positional) in error messages.
    """
    missing = [column for column in LONG_COLUMNS if column not in frame.columns]
    if missing:
        raise QuantbenchError(
            f"results are missing the column(s) {missing} (found {list(frame.columns)}); "
            f"a long-format table needs the columns {list(LONG_COLUMNS)}"
        )
    records = []
    first_row: dict[tuple[str, ...], int] = {}
    for i, row in enumerate(frame[list(LONG_COLUMNS)].itertuples(index=False, name=None)):
        keys = tuple("" if pd.isna(v) else str(v).strip() for v in row[:-1])
        empty = [column for column, key in zip(KEY_COLUMNS, keys) if not key]
        if empty:
            raise QuantbenchError(f"{describe(i)} has an empty {', '.join(empty)}; fill it in")
        try:
            text = format_value(row[-1])
        except ValueError as exc:
            raise QuantbenchError(f"{describe(i)}: {exc}; write a number or {MISSING!r} for a missing cell") from None
        if keys in first_row:
            j = first_row[keys]
            if records[j][-1] != text:
                raise QuantbenchError(
                    f"{describe(i)} repeats the cell of {describe(j)} with a different value "
                    f"({text!r} vs {records[j][-1]!r}); keep one of them"
                )
        else:
            first_row[keys] = i
        records.append((*keys, text))
    checked = pd.DataFrame.from_records(records, columns=list(LONG_COLUMNS))
    return checked.drop_duplicates(subset=list(KEY_COLUMNS), ignore_index=True)


def _describe_frame_row(frame: pd.DataFrame) -> Callable[[int], str]:
    def describe(i: int) -> str:
        row = frame.iloc[i]
        cell = ", ".join(f"{column}={row[column]!r}" for column in KEY_COLUMNS if column in frame.columns)
        return f"row {i} ({cell})"

    return describe


def load_long_csv(path: str | os.PathLike) -> pd.DataFrame:
    """Read and validate a long-format CSV (``table, model, scheme, benchmark, value``).

    Every field is read as text, so values keep their printed form ('82.70' stays '82.70').
    Returns a frame with exactly the long columns, one row per distinct cell, in file order.
    Errors name the file and line: missing columns, empty keys, a value that is neither a number
    nor '-', and one cell given twice with different values.
    """
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except FileNotFoundError:
        raise QuantbenchError(f"results CSV {path} does not exist; pass the path of a long-format CSV") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise QuantbenchError(f"cannot read {path} as a UTF-8 CSV ({exc}); fix the file") from None

    def describe(i: int) -> str:
        row = frame.iloc[i]
        cell = ", ".join(f"{column}={row[column]!r}" for column in KEY_COLUMNS)
        return f"{path} line {i + 2} ({cell})"

    return _check_long_frame(frame, describe)


def _first_seen(values: pd.Series) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))


def table_specs(frame: pd.DataFrame) -> list[TableSpec]:
    """One spec per table of a long frame, all in first-seen order.

    Tables, models, and benchmarks appear in the order they are first seen; the schemes of a
    model in the order they are first seen for that model (so each model's rows stay together).
    """
    return _specs(_check_long_frame(frame, _describe_frame_row(frame)))


def _specs(checked: pd.DataFrame) -> list[TableSpec]:
    specs = []
    for name in _first_seen(checked["table"]):
        cells = checked[checked["table"] == name]
        rows = tuple(
            (model, scheme)
            for model in _first_seen(cells["model"])
            for scheme in _first_seen(cells.loc[cells["model"] == model, "scheme"])
        )
        specs.append(TableSpec(name=name, rows=rows, benchmarks=_first_seen(cells["benchmark"])))
    return specs


def wide_table(frame: pd.DataFrame, spec: TableSpec) -> pd.DataFrame:
    """The cells of ``spec``'s table as text: columns ``model, scheme`` and one per benchmark, headed by its
    label (``spec.headers``), one row per spec row.

    Cells absent from ``frame`` are ``-``. Cells of ``frame`` outside the spec (another table, or a
    row or benchmark the spec does not list) are left out.
    """
    return _wide(_check_long_frame(frame, _describe_frame_row(frame)), spec)


def _wide(checked: pd.DataFrame, spec: TableSpec) -> pd.DataFrame:
    cells = checked[checked["table"] == spec.name]
    lookup = {
        (model, scheme, benchmark): text
        for model, scheme, benchmark, text in cells[["model", "scheme", "benchmark", "value"]].itertuples(
            index=False, name=None
        )
    }
    shown = {(model, scheme, benchmark) for model, scheme in spec.rows for benchmark in spec.benchmarks}
    left_out = len(lookup.keys() - shown)
    if left_out:
        logger.info("table %s: %d result cell(s) lie outside its rows and columns", spec.name, left_out)
    records = [
        (model, scheme, *(lookup.get((model, scheme, benchmark), MISSING) for benchmark in spec.benchmarks))
        for model, scheme in spec.rows
    ]
    return pd.DataFrame.from_records(records, columns=["model", "scheme", *spec.headers])


def _text_grid(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Header labels and body rows (all text) of a wide table."""
    header = [MODEL_HEADER, SCHEME_HEADER, *map(str, table.columns[2:])]
    body = [[str(cell) for cell in row] for row in table.itertuples(index=False, name=None)]
    return header, body


def _pad(text: str, width: int) -> str:
    return text + " " * (width - column_width(text))


def render_rst_table(table: pd.DataFrame, *, name: str) -> str:
    """The eval-rst ``.. table::`` block (ending in a newline) for a wide table from :func:`wide_table`."""
    header, body = _text_grid(table)
    minimums = [MODEL_MIN_WIDTH] + [MIN_WIDTH] * (len(header) - 1)
    widths = [
        max(minimum, column_width(label), *(column_width(row[k]) for row in body))
        for k, (minimum, label) in enumerate(zip(minimums, header))
    ]

    def rule(char: str, span_model: bool = False) -> str:
        first = " " * (widths[0] + 2) if span_model else char * (widths[0] + 2)
        return INDENT + "+" + "+".join([first, *(char * (w + 2) for w in widths[1:])]) + "+"

    def line(cells: Sequence[str]) -> str:
        return INDENT + "|" + "|".join(f" {_pad(cell, w)} " for cell, w in zip(cells, widths)) + "|"

    lines = [".. table::", f"{INDENT}:align: center", f"{INDENT}:name: {name}", "", rule("-"), line(header), rule("=")]
    for k, row in enumerate(body):
        same_model_next = k + 1 < len(body) and body[k + 1][0] == row[0]
        shown = row if k == 0 or body[k - 1][0] != row[0] else ["", *row[1:]]
        lines += [line(shown), rule("-", span_model=same_model_next)]
    return "\n".join(lines) + "\n"


def render_markdown_table(table: pd.DataFrame) -> str:
    """A GitHub pipe table of a wide table; the model is repeated on each of its rows (Markdown has no spans)."""
    header, body = _text_grid(table)
    rows = [[cell.replace("|", "\\|") for cell in row] for row in [header, *body]]
    widths = [max(column_width(row[k]) for row in rows) for k in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "|" + "|".join(f" {_pad(cell, w)} " for cell, w in zip(cells, widths)) + "|"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(rows[0]), rule, *map(line, rows[1:])]) + "\n"


def render_csv_table(table: pd.DataFrame) -> str:
    """The wide table as CSV text (columns ``model, scheme, *benchmarks``; missing cells ``-``)."""
    return table.to_csv(index=False, lineterminator="\n")


def write_tables(
    frame: pd.DataFrame, out_dir: str | os.PathLike, specs: Sequence[TableSpec] | None = None
) -> list[Path]:
    """Write ``<table>.rst``, ``<table>.csv`` and ``<table>.md`` for each spec into ``out_dir``, atomically.

    ``specs`` default to :func:`table_specs` of ``frame`` (every table, first-seen order).
    Returns the written paths in order (rst, csv, md per table).
    """
    out_dir = Path(out_dir)
    checked = _check_long_frame(frame, _describe_frame_row(frame))
    specs = _specs(checked) if specs is None else specs
    names = [spec.name for spec in specs]
    if len(set(names)) < len(names):
        raise QuantbenchError(f"table names {names} repeat; give each table its own name")
    written = []
    for spec in specs:
        table = _wide(checked, spec)
        for suffix, text in (
            (".rst", render_rst_table(table, name=spec.name)),
            (".csv", render_csv_table(table)),
            (".md", render_markdown_table(table)),
        ):
            written.append(atomic_write_text(out_dir / f"{spec.name}{suffix}", text))
        logger.info("table %s: %d rows x %d benchmarks", spec.name, len(spec.rows), len(spec.benchmarks))
    return written
