"""The comparison report: every published cell, its reproduction, the difference and the flag."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import pandas as pd
import pytest

from quantbench.compare import compare_cells, render_markdown, render_plot, write_comparison
from quantbench.errors import QuantbenchError
from quantbench.tables import load_long_csv

REPO = Path(__file__).resolve().parents[1]
T = "table-x"


def long(rows):
    return pd.DataFrame(rows, columns=["table", "model", "scheme", "benchmark", "value"])


# Published cells as a long CSV prints them (text, '-' for none).
PUBLISHED = long(
    [
        (T, "A", "BF16", "MMLU", "50.00"),
        (T, "A", "BF16", "GSM8K", "40.00"),
        (T, "A", "FP8-Static", "MMLU", "49.50"),
        (T, "A", "FP8-Static", "GSM8K", "-"),
        (T, "B", "BF16", "MMLU", "60.00"),
        (T, "B", "BF16", "GSM8K", "70.25"),
        (T, "B", "INT4-AWQ", "MMLU", "58.00"),
        (T, "B", "INT4-AWQ", "GSM8K", "66.00"),
        ("table-y", "A", "BF16", "MMLU", "50.00"),
    ]
)
# Reproduced scores as result JSONs give them (floats), with known offsets from the published ones.
REPRODUCED = long(
    [
        (T, "A", "BF16", "MMLU", 50.0),  # 0: ok
        (T, "A", "BF16", "GSM8K", 40.9),  # +0.9: ok
        (T, "A", "FP8-Static", "MMLU", 48.5),  # -1.0, exactly the tolerance: ok
        (T, "A", "FP8-Static", "GSM8K", 12.0),  # published '-': not compared
        (T, "B", "BF16", "MMLU", 61.01),  # +1.01: flagged
        (T, "B", "BF16", "GSM8K", 67.25),  # -3.0: flagged
        (T, "B", "INT4-AWQ", "MMLU", 58.3),  # +0.3: ok
        # (B, INT4-AWQ, GSM8K) not reproduced: flagged
        ("table-y", "A", "BF16", "MMLU", 10.0),  # another table
    ]
)


def test_flags_exactly_the_cells_beyond_tolerance_or_missing():
    result = compare_cells(PUBLISHED, REPRODUCED, table=T, tolerance=1.0)
    assert list(zip(result["model"], result["scheme"], result["benchmark"])) == [
        ("A", "BF16", "MMLU"),
        ("A", "BF16", "GSM8K"),
        ("A", "FP8-Static", "MMLU"),
        ("B", "BF16", "MMLU"),
        ("B", "BF16", "GSM8K"),
        ("B", "INT4-AWQ", "MMLU"),
        ("B", "INT4-AWQ", "GSM8K"),
    ]
    flagged = {(m, s, b) for m, s, b, f in zip(result["model"], result["scheme"], result["benchmark"], result["flagged"]) if f}
    assert flagged == {("B", "BF16", "MMLU"), ("B", "BF16", "GSM8K"), ("B", "INT4-AWQ", "GSM8K")}
    assert list(result["status"]) == ["ok", "ok", "ok", "beyond tolerance", "beyond tolerance", "ok", "not reproduced"]
    assert result["difference"].iloc[:6].round(6).tolist() == [0.0, 0.9, -1.0, 1.01, -3.0, 0.3]
    assert result["published"].tolist()[:2] == [50.0, 40.0] and math.isnan(result["reproduced"].iloc[6])
    # a tighter tolerance flags more; a looser one only the missing cell
    assert compare_cells(PUBLISHED, REPRODUCED, table=T, tolerance=0.5)["flagged"].sum() == 5
    assert compare_cells(PUBLISHED, REPRODUCED, table=T, tolerance=5.0)["flagged"].sum() == 1


def test_markdown_and_csv(tmp_path):
    paths = {k: tmp_path / f"x.{k}" for k in ("csv", "md", "png")}
    write_comparison(
        PUBLISHED, REPRODUCED, table=T, tolerance=1.0, csv_path=paths["csv"], md_path=paths["md"], png_path=paths["png"]
    )
    md = paths["md"].read_text().splitlines()
    assert md[0] == f"# {T}: reproduced vs published"
    assert md[2] == "7 published cells: 4 within ±1, 2 beyond, 1 not reproduced."
    assert "| B | BF16 | GSM8K | 70.25 | 67.25 | -3.00 | **beyond tolerance** |" in md
    assert "| B | INT4-AWQ | GSM8K | 66.00 | - | - | **not reproduced** |" in md
    assert "| A | FP8-Static | MMLU | 49.50 | 48.50 | -1.00 | ok |" in md
    back = pd.read_csv(paths["csv"])
    assert back["flagged"].sum() == 3 and back.loc[4, "difference"] == -3.0 and pd.isna(back.loc[6, "reproduced"])
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_is_a_deterministic_png_sized_by_the_table():
    small = render_plot(compare_cells(PUBLISHED, REPRODUCED, table=T, tolerance=1.0), table=T, tolerance=1.0)
    again = render_plot(compare_cells(PUBLISHED, REPRODUCED, table=T, tolerance=1.0), table=T, tolerance=1.0)
    assert small == again
    width, height = struct.unpack(">II", small[16:24])  # IHDR
    assert (width, height) == (760, 236)  # 2 benchmarks: (2.6 x 2 + 2.4) x 100; 4 rows: (0.24 x 4 + 1.4) x 100


def test_the_published_numbers_match_themselves():
    published = load_long_csv(REPO / "resources" / "published" / "seed_tables.csv")
    reproduced = published[published["value"] != "-"].assign(value=lambda f: f["value"].astype(float))
    total = 0
    for table in dict.fromkeys(published["table"]):
        result = compare_cells(published, reproduced, table=table, tolerance=0.0)
        assert not result["flagged"].any() and (result["difference"] == 0).all()
        total += len(result)
    assert total == 445 - 32  # every published number; the page's 32 '-' cells have none


def test_bad_inputs_are_clear_errors():
    with pytest.raises(QuantbenchError, match=r"compare.tolerance must be a number >= 0"):
        compare_cells(PUBLISHED, REPRODUCED, table=T, tolerance=-1)
    with pytest.raises(QuantbenchError, match=r"no cell of table 'table-z'"):
        compare_cells(PUBLISHED, REPRODUCED, table="table-z", tolerance=1.0)
    assert "0 beyond" in render_markdown(
        compare_cells(PUBLISHED, PUBLISHED[PUBLISHED["value"] != "-"], table=T, tolerance=0.0), table=T, tolerance=0.0
    )
