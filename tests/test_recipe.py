"""The published recipe as data and the comparison report's list of the settings that depart from it."""

from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd
import pytest
import yaml

from quantbench.report.compare import write_comparison
from quantbench.run.config import load_run_config
from quantbench.run.recipe import departures, load_recipe
from quantbench.util.errors import QuantbenchError

REPO = Path(__file__).resolve().parents[1]
SEED = yaml.safe_load((REPO / "config" / "seed.yaml").read_text(encoding="utf-8"))
RECIPE = load_recipe(REPO / SEED["compare"]["recipe"])


def _departures(config: dict, table: str) -> list[str]:
    run = load_run_config(config, base_dir=REPO)
    return departures(run, run.table(table), RECIPE)


def test_each_departure_is_named_with_both_values_and_its_rows():
    config = copy.deepcopy(SEED)
    del config["scheme_overrides"]["INT4-GPTQ"]  # quantbench's GPTQ edge cases and all-token expert statistics
    config["calibration_sets"]["sharegpt-qwen3-128"]["padding"] = "longest"
    config["models"]["Qwen3-8B"]["calibration"]["INT4-AWQ"] = "sharegpt-qwen3"  # 256 samples where 128 were taken
    config["models"]["Qwen2.5VL-7B"]["calibration"] = "chartqa-train"
    qwen3 = _departures(config, "table-qwen3-performance")
    gptq_rows = "Qwen3-1.7B INT4-GPTQ, Qwen3-4B INT4-GPTQ, Qwen3-8B INT4-GPTQ, Qwen3-14B INT4-GPTQ, Qwen3-32B INT4-GPTQ, QwQ-32B INT4-GPTQ"
    padded_rows = (
        "Qwen3-1.7B INT4-GPTQ, Qwen3-4B INT4-GPTQ, Qwen3-8B INT4-GPTQ, Qwen3-14B INT4-GPTQ, Qwen3-14B INT4-AWQ, "
        "Qwen3-32B INT4-GPTQ, Qwen3-32B INT4-AWQ, QwQ-32B INT4-GPTQ, QwQ-32B INT4-AWQ"
    )
    assert qwen3[:4] == [
        f"scheme gptq.dead_columns: round (recipe: zero) -- {gptq_rows}",
        f"scheme gptq.damping_retry: multiply (recipe: add) -- {gptq_rows}",
        f"calibration padding: longest (recipe: max-length-unmasked) -- {padded_rows}",
        "calibration samples: 256 (recipe: 128) -- Qwen3-8B INT4-AWQ",
    ]
    assert all("calibration.experts" not in line for line in qwen3)  # GPTQ has no MoE row in this table
    assert qwen3[4:] == [
        f.text
        for f in RECIPE.fixed
        if f.concerns("table-qwen3-performance", (("m", "INT4-AWQ"), ("m", "FP8-Dynamic"), ("m", "INT8-Dynamic")))
    ]
    vl = _departures(config, "table-qwen2.5vl-performance")
    rows = "Qwen2.5VL-7B FP8-Static, Qwen2.5VL-7B FP8-Static-ViT, Qwen2.5VL-7B INT4-GPTQ, Qwen2.5VL-7B INT4-AWQ"
    assert vl[2:7] == [  # after the two GPTQ lines
        f"calibration data: HuggingFaceM4/ChartQA:train (recipe: HuggingFaceM4/ChartQA:test) -- {rows}",
        f"calibration samples: 256 (recipe: 128) -- {rows}",
        f"calibration selection: shuffle (recipe: first-n) -- {rows}",
        f"calibration format: quantbench (recipe: angelslim) -- {rows}",
        f"calibration padding: longest (recipe: max-length-masked) -- {rows}",
    ]


def test_moe_rows_report_the_expert_statistics():
    config = copy.deepcopy(SEED)
    del config["scheme_overrides"]["FP8-Static"]
    lines = _departures(config, "table-qwen3-performance")
    assert (
        "scheme calibration.experts: all-tokens (recipe: routed) -- Qwen3-30B-A3B FP8-Static, Qwen3-235B-A22B FP8-Static"
        in lines
    )
    assert any(
        line.startswith("scheme calibration.propagation: quantized (recipe: full-precision) -- Qwen3-0.6B FP8-Static")
        for line in lines
    )


def test_the_report_lists_the_departures(tmp_path):
    published = pd.DataFrame(
        [("t", "A", "BF16", "MMLU", "50.00")], columns=["table", "model", "scheme", "benchmark", "value"]
    )
    reproduced = published.assign(value=[50.5])
    paths = {k: tmp_path / f"t.{k}" for k in ("csv", "md", "png")}
    kwargs = dict(table="t", tolerance=1.0, csv_path=paths["csv"], md_path=paths["md"], png_path=paths["png"])
    write_comparison(
        published,
        reproduced,
        recipe="AngelSlim 4cc21d9",
        departures=["calibration samples: 256 (recipe: 128) -- A X"],
        **kwargs,
    )
    md = paths["md"].read_text(encoding="utf-8")
    assert (
        "## Settings that depart from the published recipe\n\nThe published cells were made by AngelSlim 4cc21d9; "
        "docs/fidelity.md gives each setting's source and effect.\n\n- calibration samples: 256 (recipe: 128) -- A X\n\n| Model"
    ) in md
    write_comparison(published, reproduced, recipe="AngelSlim 4cc21d9", departures=[], **kwargs)
    assert "effect.\n\n- none\n\n| Model" in paths["md"].read_text(encoding="utf-8")
    write_comparison(published, reproduced, **kwargs)  # no recipe configured: no section
    assert "published recipe" not in paths["md"].read_text(encoding="utf-8")


def test_a_broken_recipe_file_is_named(tmp_path):
    with pytest.raises(QuantbenchError, match=r"recipe file .*nowhere\.yaml does not exist"):
        load_recipe(tmp_path / "nowhere.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump({"recipe": "x", "streams": {}, "schemes": {}, "calibration": {"M": {"S": [1, 2]}}}),
        encoding="utf-8",
    )
    with pytest.raises(QuantbenchError, match=r"bad\.yaml: calibration rows are \[samples, tokens, data\]"):
        load_recipe(bad)
