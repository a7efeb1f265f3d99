"""Tables: the published page's four eval-rst grids reproduced from its CSV, docutils validity, CLI."""

from __future__ import annotations

import io
import math
import re
import subprocess
import sys
from pathlib import Path

import docutils.core
import pandas as pd
import pytest
import yaml
from docutils import nodes

from quantbench.report.tables import (
    TableSpec,
    load_long_csv,
    render_rst_table,
    table_specs,
    wide_table,
    write_tables,
)
from quantbench.run.config import load_run_config
from quantbench.util.errors import QuantbenchError

SEED_NAMES = [
    "table-Hunyuan-Instruct-performance",
    "table-qwen3-performance",
    "table-qwen2.5vl-performance",
    "table-other-performance",
]
MALFORMED = "table-qwen2.5vl-performance"
HUNYUAN = "table-Hunyuan-Instruct-performance"
REPO = Path(__file__).resolve().parents[1]


# --- helpers -------------------------------------------------------------------------------------


def page_tables(shared_dir: Path) -> dict[str, list[str]]:
    """Each eval-rst block of the published page as lines, from `.. table::` to the last grid line."""
    text = (shared_dir / "seed" / "000_cba7e93356a1724f.txt").read_text(encoding="utf-8")
    blocks = re.findall(r"```\{eval-rst\}\n(.*?)```", text, flags=re.S)
    return {re.search(r":name: (\S+)", block).group(1): block.rstrip("\n").splitlines() for block in blocks}


def parse_grid(lines: list[str]) -> list[tuple[int, int, str, int]]:
    """Cells of a grid table as (row, column, text, rowspan), header row 0.

    Column boundaries are any '+' or '|', so it also reads the page's malformed Qwen2.5VL grid
    (a short model cell, separators starting with '|'). A separator part of spaces continues the
    cell above it (row span); a part of '-' or '=' closes it.
    """
    grid = [line.strip() for line in lines if line.lstrip().startswith(("+", "|"))]
    ncols = grid[0].count("+") - 1
    open_cells: list[dict | None] = [None] * ncols
    cells, row = [], 0
    for line in grid[1:]:
        parts = re.split(r"[+|]", line)[1:-1]
        assert len(parts) == ncols, line
        if all(re.fullmatch(r" +|-+|=+", part) for part in parts) and re.search(r"[-=]", line):
            for col, part in enumerate(parts):
                if part.strip():
                    cells.append(open_cells[col])
                    open_cells[col] = None
                else:
                    open_cells[col]["rowspan"] += 1
            row += 1
        else:
            for col, part in enumerate(parts):
                if open_cells[col] is None:
                    open_cells[col] = {"row": row, "col": col, "text": [], "rowspan": 1}
                if part.strip():
                    open_cells[col]["text"].append(part.strip())
    assert all(cell is None for cell in open_cells), "grid not closed"
    return sorted((c["row"], c["col"], " ".join(c["text"]), c["rowspan"]) for c in cells)


def publish(rst: str) -> tuple[nodes.document, str]:
    """Parse ``rst`` inside a minimal document; return the doctree and every message docutils reported."""
    stream = io.StringIO()
    document = docutils.core.publish_doctree(
        "Results\n=======\n\n" + rst,
        settings_overrides={"warning_stream": stream, "report_level": 1, "halt_level": 5},
    )
    return document, stream.getvalue()


def body_entries(document: nodes.document) -> list[list[nodes.entry]]:
    rows = (row for row in document.findall(nodes.row) if isinstance(row.parent, nodes.tbody))
    return [list(row.findall(nodes.entry)) for row in rows]


@pytest.fixture(scope="module")
def seed(shared_dir: Path) -> tuple[pd.DataFrame, dict[str, str], dict[str, list[str]]]:
    frame = load_long_csv(shared_dir / "reference" / "seed_tables.csv")
    rendered = {spec.name: render_rst_table(wide_table(frame, spec), name=spec.name) for spec in table_specs(frame)}
    return frame, rendered, page_tables(shared_dir)


# --- the published page --------------------------------------------------------------------------


def test_seed_tables_in_page_order(seed):
    frame, rendered, page = seed
    assert len(frame) == 445
    assert list(rendered) == list(page) == SEED_NAMES


@pytest.mark.parametrize("name", SEED_NAMES)
def test_seed_round_trip_cell_for_cell(seed, name):
    frame, rendered, page = seed
    expected = parse_grid(page[name])
    assert parse_grid(rendered[name].splitlines()) == expected
    assert expected[:2] == [(0, 0, "Model", 1), (0, 1, "Quantization", 1)]
    cells = frame[frame["table"] == name]
    model_spans = [(text, span) for row, col, text, span in expected if col == 0 and row > 0]
    assert model_spans == list(cells.groupby("model", sort=False)["scheme"].nunique().items())


def test_seed_value_cells_match_csv(seed):
    """Every value cell of the rendered grids, row by row, is the CSV's value as printed."""
    frame, rendered, _ = seed
    grids = [parse_grid(rendered[name].splitlines()) for name in SEED_NAMES]
    values = [text for grid in grids for row, col, text, _ in grid if row > 0 and col > 1]
    assert values == frame["value"].tolist()
    assert (len(values), values.count("-")) == (445, 32)


@pytest.mark.parametrize("name", [n for n in SEED_NAMES if n != MALFORMED])
def test_seed_round_trip_line_for_line(seed, name):
    _, rendered, page = seed
    assert rendered[name] == "\n".join(page[name]) + "\n"


def test_malformed_page_table_is_written_well_formed(seed):
    """The Qwen2.5VL grid differs from the page exactly where the page is broken, and nowhere else."""
    _, rendered, page = seed
    mine, theirs = rendered[MALFORMED].splitlines(), page[MALFORMED]
    assert len(mine) == len(theirs) == 63
    differing = {i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b.rstrip(" ")}
    model_rows = {i for i, line in enumerate(theirs) if line.startswith("   | Qwen2.5VL-")}
    pipe_separators = {i for i, line in enumerate(theirs) if line.startswith("   |                   +")}
    assert (len(model_rows), len(pipe_separators)) == (4, 3)
    assert differing == model_rows | pipe_separators
    assert mine[7] == "   | Qwen2.5VL-3B      | BF16             | 47.11    | 78.57      | 80.32        |"
    assert mine[22] == "   +                   +------------------+----------+------------+--------------+"
    assert not any(line.endswith(" ") for line in mine)
    assert "Malformed table" in publish("\n".join(theirs) + "\n")[1]


@pytest.mark.parametrize("name", SEED_NAMES)
def test_seed_tables_parse_cleanly_with_spans(seed, name):
    frame, rendered, _ = seed
    document, messages = publish(rendered[name])
    assert messages == ""
    assert not list(document.findall(nodes.system_message))
    (table,) = document.findall(nodes.table)
    assert table["ids"] == [name.lower().replace(".", "-")] and table["align"] == "center"
    cells = frame[frame["table"] == name]
    schemes_per_model = cells.groupby("model", sort=False)["scheme"].nunique().tolist()
    first_entries = [row[0] for row in body_entries(document) if len(row) == 2 + cells["benchmark"].nunique()]
    assert [entry.get("morerows", 0) + 1 for entry in first_entries] == schemes_per_model


def test_hunyuan_table_as_published_and_with_its_true_benchmarks(seed):
    """config/seed.yaml's Hunyuan table, from the page's cells filed under the benchmarks they came from (as the
    workflow's results are): with the page's labels it is the page's block byte for byte; with its own labels
    the same cells sit under the true benchmarks' headers."""
    frame, _, page = seed
    run = load_run_config(yaml.safe_load((REPO / "config" / "seed.yaml").read_text(encoding="utf-8")), base_dir=REPO)
    table = run.table(HUNYUAN)
    benchmark_of = {label: benchmark for benchmark, label in table.published_labels.items()}
    results = frame.assign(
        benchmark=[benchmark_of.get(b, b) if t == HUNYUAN else b for t, b in zip(frame["table"], frame["benchmark"])]
    )

    def render(as_published: bool) -> str:
        spec = TableSpec(
            name=HUNYUAN,
            rows=run.table_rows(table),
            benchmarks=table.benchmarks,
            labels=table.headers(as_published=as_published),
        )
        return render_rst_table(wide_table(results, spec), name=HUNYUAN)

    assert render(as_published=True) == "\n".join(page[HUNYUAN]) + "\n"
    corrected = render(as_published=False).splitlines()
    assert corrected[4:8] == [
        "   +-----------------------+--------------+---------------+-----------+---------+--------------+",
        "   | Model                 | Quantization | OlympiadBench | AIME 2024 | DROP    | GPQA-Diamond |",
        "   +=======================+==============+===============+===========+=========+==============+",
        "   | Hunyuan-A13B-Instruct | BF16         | 82.70         | 87.30     | 91.10   | 71.20        |",
    ]
    ours, theirs = parse_grid(corrected), parse_grid(page[HUNYUAN])
    assert [c for c in ours if c[0] > 0] == [c for c in theirs if c[0] > 0]  # every body cell in place
    assert publish("\n".join(corrected) + "\n")[1] == ""


def test_column_labels_must_name_the_tables_benchmarks_and_differ():
    with pytest.raises(QuantbenchError, match=r"labels given for \['Y'\], which are not its benchmarks"):
        TableSpec(name="t", rows=[("a", "BF16")], benchmarks=["X"], labels={"Y": "y"})
    with pytest.raises(QuantbenchError, match="lists column label 'Z' twice"):
        TableSpec(name="t", rows=[("a", "BF16")], benchmarks=["X", "Y"], labels={"X": "Z", "Y": "Z"})
    with pytest.raises(QuantbenchError, match=r"\['model'\] clash with row labels"):
        TableSpec(name="t", rows=[("a", "BF16")], benchmarks=["X"], labels={"X": "model"})


# --- rendering rules ------------------------------------------------------------------------------


def test_missing_cell_is_a_bare_dash_which_docutils_reads_as_an_empty_bullet_list():
    frame = pd.DataFrame(
        [("t", "m", "BF16", "MMLU", 41.0), ("t", "m", "BF16", "GSM8K", math.nan)],
        columns=["table", "model", "scheme", "benchmark", "value"],
    )
    (spec,) = table_specs(frame)
    rst = render_rst_table(wide_table(frame, spec), name="t")
    assert "   | m                 | BF16         | 41.00   | -       |\n" in rst
    document, messages = publish(rst)
    assert messages == ""
    (row,) = body_entries(document)
    assert [entry.astext() for entry in row] == ["m", "BF16", "41.00", ""]
    (bullets,) = row[3].children
    assert isinstance(bullets, nodes.bullet_list) and bullets["bullet"] == "-"
    assert len(bullets.children) == 1 and not bullets.children[0].children


CJK_RST = """\
.. table::
   :align: center
   :name: cjk

   +---------------------------+--------------+----------+
   | Model                     | Quantization | 中文理解 |
   +===========================+==============+==========+
   | 通义千问-72B-指令微调版本 | BF16         | 1.50     |
   +                           +--------------+----------+
   |                           | INT4-AWQ     | -        |
   +---------------------------+--------------+----------+
   | 通义千问-7B               | BF16         | 82.70    |
   +---------------------------+--------------+----------+
"""


def test_cjk_cells_count_wide_characters_twice():
    frame = pd.DataFrame(
        {
            "table": ["cjk"] * 3,
            "model": ["通义千问-72B-指令微调版本", "通义千问-7B", "通义千问-72B-指令微调版本"],
            "scheme": ["BF16", "BF16", "INT4-AWQ"],
            "benchmark": ["中文理解"] * 3,
            "value": [1.5, "82.70", "-"],
        }
    )
    (spec,) = table_specs(frame)
    rst = render_rst_table(wide_table(frame, spec), name=spec.name)
    assert rst == CJK_RST
    document, messages = publish(rst)
    assert messages == ""
    assert [[e.astext() for e in row] for row in body_entries(document)] == [
        ["通义千问-72B-指令微调版本", "BF16", "1.50"],
        ["INT4-AWQ", ""],
        ["通义千问-7B", "BF16", "82.70"],
    ]


def test_explicit_spec_orders_rows_and_columns_and_fills_unrun_cells():
    frame = pd.DataFrame(
        {
            "table": ["t", "t", "t", "t", "other"],
            "model": ["a", "a", "b", "zz", "a"],
            "scheme": ["BF16", "BF16", "BF16", "BF16", "BF16"],
            "benchmark": ["MMLU", "GSM8K", "MMLU", "MMLU", "MMLU"],
            "value": [41.234, 12.0, math.nan, 3.0, 99.0],
        }
    )
    rows = [("b", "BF16"), ("a", "BF16"), ("a", "INT4-GPTQ")]
    spec = TableSpec(name="t", rows=rows, benchmarks=["GSM8K", "MMLU", "CEVAL"])
    wide = wide_table(frame, spec)
    assert list(wide.columns) == ["model", "scheme", "GSM8K", "MMLU", "CEVAL"]
    assert wide.values.tolist() == [
        ["b", "BF16", "-", "-", "-"],
        ["a", "BF16", "12.00", "41.23", "-"],
        ["a", "INT4-GPTQ", "-", "-", "-"],
    ]


def test_first_seen_order_keeps_each_models_rows_together():
    frame = pd.DataFrame(
        {
            "table": ["t"] * 4,
            "model": ["a", "b", "a", "b"],
            "scheme": ["BF16", "BF16", "FP8", "INT4"],
            "benchmark": ["X", "X", "Y", "X"],
            "value": ["1", "2", "3", "4"],
        }
    )
    (spec,) = table_specs(frame)
    assert spec.rows == (("a", "BF16"), ("a", "FP8"), ("b", "BF16"), ("b", "INT4"))
    assert spec.benchmarks == ("X", "Y")


def test_spec_rejects_split_model_rows():
    with pytest.raises(QuantbenchError, match="rows of model 'a' are not contiguous"):
        TableSpec(name="t", rows=[("a", "BF16"), ("b", "BF16"), ("a", "FP8")], benchmarks=["X"])


# --- input errors ---------------------------------------------------------------------------------


def write_csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "results.csv"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("table,model,scheme,benchmark\nt,m,BF16,X\n", r"missing the column\(s\) \['value'\]"),
        (
            "table,model,scheme,benchmark,value\nt,m,BF16,X,1.00\nt,m,FP8,X,2\nt,m,BF16,X,1.0\n",
            r"line 4 \(table='t', model='m', scheme='BF16', benchmark='X'\) repeats the cell of "
            r".*line 2 .*'1.0' vs '1.00'",
        ),
        (
            "table,model,scheme,benchmark,value\nt,m,BF16,X,1\nt,m,FP8,X,n/a\n",
            r"line 3 .*scheme='FP8'.*'n/a' is neither a number nor '-'",
        ),
        ("table,model,scheme,benchmark,value\nt,m,BF16,X,\n", r"line 2 .*value '' is neither a number"),
        ("table,model,scheme,benchmark,value\nt,,BF16,X,1\n", r"line 2 .*has an empty model"),
        ("table,model,scheme,benchmark,value\nt,m,BF16,X,inf\n", r"line 2 .*not a finite number"),
    ],
)
def test_bad_csv_names_the_row(tmp_path, text, message):
    with pytest.raises(QuantbenchError, match=message):
        load_long_csv(write_csv(tmp_path, text))


def test_identical_duplicates_are_one_cell(tmp_path):
    text = "table,model,scheme,benchmark,value\nt,m,BF16,X,82.70\nt,m,BF16,X,82.70\n"
    frame = load_long_csv(write_csv(tmp_path, text))
    assert frame.values.tolist() == [["t", "m", "BF16", "X", "82.70"]]


def test_missing_csv_file(tmp_path):
    with pytest.raises(QuantbenchError, match="does not exist"):
        load_long_csv(tmp_path / "nope.csv")


# --- the command ----------------------------------------------------------------------------------

DEMO_CSV = """\
table,model,scheme,benchmark,value
demo,tiny-dense,BF16,MMLU,41.20
demo,tiny-moe,BF16,MMLU,38.5
demo,tiny-dense,INT4-GPTQ,MMLU,40.05
demo,tiny-dense,BF16,GSM8K,12.00
demo,tiny-moe,BF16,GSM8K,-
other,tiny-dense,BF16,CEVAL,30.00
"""

DEMO_RST = """\
.. table::
   :align: center
   :name: demo

   +-------------------+--------------+---------+---------+
   | Model             | Quantization | MMLU    | GSM8K   |
   +===================+==============+=========+=========+
   | tiny-dense        | BF16         | 41.20   | 12.00   |
   +                   +--------------+---------+---------+
   |                   | INT4-GPTQ    | 40.05   | -       |
   +-------------------+--------------+---------+---------+
   | tiny-moe          | BF16         | 38.5    | -       |
   +-------------------+--------------+---------+---------+
"""

DEMO_CSV_WIDE = """\
model,scheme,MMLU,GSM8K
tiny-dense,BF16,41.20,12.00
tiny-dense,INT4-GPTQ,40.05,-
tiny-moe,BF16,38.5,-
"""

DEMO_MD = """\
| Model      | Quantization | MMLU  | GSM8K |
|------------|--------------|-------|-------|
| tiny-dense | BF16         | 41.20 | 12.00 |
| tiny-dense | INT4-GPTQ    | 40.05 | -     |
| tiny-moe   | BF16         | 38.5  | -     |
"""


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "quantbench.cli", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_cli_tabulate_writes_rst_csv_md(tmp_path):
    out = tmp_path / "tables"
    result = run_cli("tabulate", "--from-csv", str(write_csv(tmp_path, DEMO_CSV)), "--out", str(out))
    assert result.returncode == 0, result.stderr
    names = ["demo.rst", "demo.csv", "demo.md", "other.rst", "other.csv", "other.md"]
    assert result.stdout.splitlines() == [str(out / name) for name in names]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    assert (out / "demo.rst").read_bytes() == DEMO_RST.encode()
    assert (out / "demo.csv").read_bytes() == DEMO_CSV_WIDE.encode()
    assert (out / "demo.md").read_bytes() == DEMO_MD.encode()
    assert (out / "other.csv").read_bytes() == b"model,scheme,CEVAL\ntiny-dense,BF16,30.00\n"


def test_cli_user_error_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "tables"
    bad = write_csv(tmp_path, DEMO_CSV + "other,tiny-dense,BF16,CEVAL,31.00\n")
    result = run_cli("tabulate", "--from-csv", str(bad), "--out", str(out))
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {bad} line 8 (table='other', model='tiny-dense'")
    assert "repeats the cell of" in result.stderr and result.stdout == ""
    assert not out.exists()


def test_write_tables_matches_cli_bytes(tmp_path):
    paths = write_tables(load_long_csv(write_csv(tmp_path, DEMO_CSV)), tmp_path / "lib")
    assert [p.name for p in paths][:3] == ["demo.rst", "demo.csv", "demo.md"]
    assert paths[0].read_text(encoding="utf-8") == DEMO_RST
