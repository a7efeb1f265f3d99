"""The Snakemake workflow: DAG from config, config errors before any job, a real run, incremental reruns."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]
DEMO_SCHEMES = ["BF16", "FP8-Static", "FP8-Dynamic", "INT8-Dynamic", "INT4-GPTQ", "INT4-AWQ"]
DEMO_BENCHMARKS = ["CEVAL", "MMLU", "GSM8K", "HUMANEVAL", "WIKITEXT2"]


def workdir(tmp_path: Path, edit=None) -> Path:
    """A working directory with its own copy of config/ (editable) and the repo's resources/ linked in."""
    shutil.copytree(REPO / "config", tmp_path / "config")
    (tmp_path / "resources").symlink_to(REPO / "resources")
    if edit is not None:
        path = tmp_path / "config" / "config.yaml"
        config = yaml.safe_load(path.read_text())
        edit(config)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
    return tmp_path


def snakemake(wd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [*SNAKEMAKE, "--directory", str(wd), "--configfile", str(wd / "config" / "config.yaml"), *args],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {args} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def dry_run_jobs(wd: Path) -> list[tuple[str, str | None]]:
    """(rule, first output) of every job `snakemake -n` would run."""
    out = snakemake(wd, "--dry-run", "--cores", "1").stdout
    jobs, rule = [], None
    for line in out.splitlines():
        match = re.match(r"^(?:local)?rule (\w+):$", line)
        if match:
            rule = match.group(1)
            if rule == "all":
                jobs.append(("all", None))
        elif rule and line.strip().startswith("output:"):
            jobs.append((rule, line.split(":", 1)[1].split(",")[0].strip()))
            rule = None
    return jobs


@pytest.mark.workflow
def test_demo_dag_has_one_job_per_cell(tmp_path):
    jobs = dry_run_jobs(workdir(tmp_path))
    assert Counter(rule for rule, _ in jobs) == {
        "download": 1,
        "calibrate": 1,
        "quantize": 5,
        "evaluate": 30,
        "tabulate": 1,
        "all": 1,
    }
    evals = {out for rule, out in jobs if rule == "evaluate"}
    assert evals == {f"results/evals/tinyqwen3-dense/{s}/{b}.json" for s in DEMO_SCHEMES for b in DEMO_BENCHMARKS}
    assert {out for rule, out in jobs if rule == "quantize"} == {
        f"results/quantized/tinyqwen3-dense/{s}" for s in DEMO_SCHEMES if s != "BF16"
    }
    assert ("calibrate", "results/calib/tinyqwen3-dense/gutenberg-demo.safetensors") in jobs


@pytest.mark.workflow
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda c: c["models"]["tinyqwen3-dense"]["schemes"].append("INT3-MAGIC"),
            r"models\.tinyqwen3-dense\.schemes: unknown scheme 'INT3-MAGIC'",
        ),
        (lambda c: c["models"]["tinyqwen3-dense"].pop("path"), r"models\.tinyqwen3-dense: give exactly one source"),
        (lambda c: c["tables"][0]["benchmarks"].append("ARC"), r"benchmarks: unknown benchmark 'ARC'"),
        (
            lambda c: c["evaluation"].update(data_dir="resources/no-such-data"),
            r"benchmark CEVAL: data file\(s\) .*no-such-data/ceval/val.jsonl.* not found",
        ),
        (
            lambda c: c["models"]["tinyqwen3-dense"].pop("calibration"),
            r"models\.tinyqwen3-dense: schemes \['FP8-Static', 'INT4-GPTQ', 'INT4-AWQ'\] need calibration data",
        ),
        (lambda c: c["models"]["tinyqwen3-dense"].update(schemes="BF16"), r"'BF16' is not of type 'array'"),
    ],
    ids=["unknown-scheme", "no-source", "unknown-benchmark", "missing-data", "no-calibration", "schema"],
)
def test_bad_config_fails_before_any_job(tmp_path, edit, message):
    wd = workdir(tmp_path, edit)
    proc = snakemake(wd, "--cores", "1", check=False)
    assert proc.returncode != 0
    assert re.search(message, proc.stdout + proc.stderr), proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not (wd / "results").exists()


def small_config(config: dict) -> None:
    """One model, three data-free schemes, two cheap benchmarks: every rule but calibrate, in about a minute."""
    config["models"]["tinyqwen3-dense"]["schemes"] = ["BF16", "FP8-Dynamic", "INT4-RTN"]
    config["evaluation"]["limit"] = 2
    config["evaluation"]["overrides"] = {"WIKITEXT2": {"seq_len": 256, "max_tokens": 1024}}
    config["tables"][0]["benchmarks"] = ["MMLU", "WIKITEXT2"]


@pytest.mark.workflow
def test_run_then_nothing_then_only_the_edited_scheme(tmp_path):
    wd = workdir(tmp_path, small_config)
    snakemake(wd, "--cores", "2")

    table = (wd / "results/tables/table-demo-performance.csv").read_text().splitlines()
    assert table[0] == "model,scheme,MMLU,WIKITEXT2"
    cells = {}
    for scheme in ("BF16", "FP8-Dynamic", "INT4-RTN"):
        for bench in ("MMLU", "WIKITEXT2"):
            result = json.loads((wd / f"results/evals/tinyqwen3-dense/{scheme}/{bench}.json").read_text())
            assert (result["model"], result["scheme"], result["benchmark"]) == ("tinyqwen3-dense", scheme, bench)
            cells[scheme, bench] = f"{result['score']:.2f}"
    for scheme in ("BF16", "FP8-Dynamic", "INT4-RTN"):
        assert f"tinyqwen3-dense,{scheme},{cells[scheme, 'MMLU']},{cells[scheme, 'WIKITEXT2']}" in table
    # quantization changes the model: INT4 perplexity differs from BF16's
    assert cells["INT4-RTN", "WIKITEXT2"] != cells["BF16", "WIKITEXT2"]
    for log in ("download/tinyqwen3-dense", "quantize/tinyqwen3-dense/INT4-RTN", "evaluate/tinyqwen3-dense/BF16/MMLU"):
        assert (wd / "logs" / f"{log}.log").stat().st_size > 0

    assert dry_run_jobs(wd) == []

    schemes_file = wd / "config" / "schemes.yaml"
    schemes = yaml.safe_load(schemes_file.read_text())
    schemes["schemes"]["INT4-RTN"]["weights"]["group_size"] = 64
    schemes_file.write_text(yaml.safe_dump(schemes, sort_keys=False))
    assert sorted(dry_run_jobs(wd), key=str) == sorted(
        [
            ("quantize", "results/quantized/tinyqwen3-dense/INT4-RTN"),
            ("evaluate", "results/evals/tinyqwen3-dense/INT4-RTN/MMLU.json"),
            ("evaluate", "results/evals/tinyqwen3-dense/INT4-RTN/WIKITEXT2.json"),
            ("tabulate", "results/tables/table-demo-performance.rst"),
            ("all", None),
        ],
        key=str,
    )


@pytest.mark.slow  # imports the evaluate script's libraries: seconds
def test_evaluate_script_can_be_imported_again_by_a_spawned_process():
    """vLLM starts its engine in a process made by spawn, which imports the main script again as ``__mp_main__``
    (without Snakemake's ``snakemake`` object): the evaluate script must do nothing then."""
    import runpy

    runpy.run_path(str(REPO / "workflow" / "scripts" / "evaluate.py"), run_name="__mp_main__")
