"""The comparison report: every published cell, its reproduction, the difference and the flag."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pandas as pd
import pytest

from quantbench.report.cells import collect_filter_scores
from quantbench.report.compare import compare_cells, compare_filters, render_markdown, render_plot, write_comparison
from quantbench.report.tables import load_long_csv
from quantbench.util.errors import QuantbenchError

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
    flagged = {
        (m, s, b) for m, s, b, f in zip(result["model"], result["scheme"], result["benchmark"], result["flagged"]) if f
    }
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


def test_a_relabelled_column_is_compared_on_the_benchmark_it_came_from():
    """The page prints OlympiadBench's numbers under CEVAL: they meet the reproduced OlympiadBench cells."""
    published = long([(T, "A", "BF16", "CEVAL", "82.70"), (T, "A", "BF16", "MMLU", "87.30")])
    reproduced = long(
        [(T, "A", "BF16", "OlympiadBench", 82.2), (T, "A", "BF16", "CEVAL", 20.0), (T, "A", "BF16", "AIME2024", 90.0)]
    )
    labels = {"OlympiadBench": "CEVAL", "AIME2024": "MMLU"}
    result = compare_cells(published, reproduced, table=T, tolerance=1.0, page_labels=labels)
    assert list(zip(result["benchmark"], result["page_label"], result["status"])) == [
        ("OlympiadBench", "CEVAL", "ok"),
        ("AIME2024", "MMLU", "beyond tolerance"),
    ]
    assert result["difference"].round(6).tolist() == [-0.5, 2.7]
    md = render_markdown(result, table=T, tolerance=1.0)
    assert "| A | BF16 | OlympiadBench (page: CEVAL) | 82.70 | 82.20 | -0.50 | ok |" in md
    # without the labels, the page's CEVAL cell meets the reproduced CEVAL cell
    plain = compare_cells(published, reproduced, table=T, tolerance=1.0)
    assert plain["benchmark"].tolist() == plain["page_label"].tolist() == ["CEVAL", "MMLU"]
    assert "| A | BF16 | CEVAL | 82.70 | 20.00 | -62.70 | **beyond tolerance** |" in render_markdown(
        plain, table=T, tolerance=1.0
    )


def result_json(path: Path, model: str, scheme: str, scores: dict[str, float], filter_: str = "strict-match") -> Path:
    """A result file as the evaluate step writes it (the fields the comparison reads)."""
    record = {
        "model": model,
        "scheme": scheme,
        "benchmark": "GSM8K",
        "score": scores[f"exact_match,{filter_}"],
        "scores": scores,
        "spec": {"lm_eval": {"metric": "exact_match", "filter": filter_}},
    }
    path.write_text(json.dumps(record), encoding="utf-8")
    return path


def test_the_report_says_per_row_which_gsm8k_filter_is_closer(tmp_path):
    def both(strict: float, flexible: float) -> dict[str, float]:
        return {"exact_match,strict-match": strict, "exact_match,flexible-extract": flexible}

    files = [
        result_json(tmp_path / "a.json", "A", "BF16", both(39.6, 40.2)),
        result_json(tmp_path / "b.json", "B", "BF16", both(70.0, 71.5)),
        result_json(tmp_path / "c.json", "B", "INT4-AWQ", both(65.5, 66.5)),
        result_json(tmp_path / "d.json", "A", "FP8-Static", {"exact_match,strict-match": 1.0}),  # one filter: no row
    ]
    scores = collect_filter_scores(T, files)
    assert len(scores) == 6 and scores.loc[scores["reported"], "filter"].unique().tolist() == ["strict-match"]
    comparison = compare_cells(PUBLISHED, REPRODUCED, table=T, tolerance=1.0)
    filters = compare_filters(comparison, scores)
    # published 40.00, 70.25, 66.00: |39.6-40| = 0.4 > |40.2-40| = 0.2; |70-70.25| = 0.25 < 1.25; 0.5 = 0.5
    assert filters.values.tolist() == [
        ["A", "BF16", "GSM8K", 40.0, "strict-match", 39.6, 40.2, "flexible-extract"],
        ["B", "BF16", "GSM8K", 70.25, "strict-match", 70.0, 71.5, "strict-match"],
        ["B", "INT4-AWQ", "GSM8K", 66.0, "strict-match", 65.5, 66.5, "tie"],
    ]
    paths = {k: tmp_path / f"x.{k}" for k in ("csv", "md", "png")}
    write_comparison(
        PUBLISHED,
        REPRODUCED,
        table=T,
        tolerance=1.0,
        csv_path=paths["csv"],
        md_path=paths["md"],
        png_path=paths["png"],
        filter_scores=scores,
    )
    md = paths["md"].read_text().splitlines()
    section = md[md.index("## Which filter is closer to the published number") :]
    assert section[2] == (
        "The table reports one filter per benchmark (GSM8K: strict-match); the results record every filter. "
        "Closer to the page: strict-match in 1, flexible-extract in 1 row(s); equally close in 1."
    )
    assert section[4] == "| Model | Quantization | Benchmark | Published | strict-match | flexible-extract | Closer |"
    assert section[6] == "| A | BF16 | GSM8K | 40.00 | 39.60 | 40.20 | flexible-extract |"
    assert "## Which filter" not in render_markdown(comparison, table=T, tolerance=1.0)
