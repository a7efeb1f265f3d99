"""config/seed.yaml: the published page's full matrix, planned by the workflow with sized resources."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from seed_results import PUBLISHED, published_cells

from quantbench.evaluate.benchmarks import load_benchmarks
from quantbench.runconfig import load_run_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((REPO / "config" / "seed.yaml").read_text(encoding="utf-8"))
BENCHMARKS = load_benchmarks(REPO / "config" / "benchmarks.yaml")
CELLS = published_cells()
HEAVY = ("torch", "transformers", "lm_eval", "vllm", "matplotlib", "datasets")


def test_seed_config_is_the_published_page():
    run = load_run_config(CONFIG, base_dir=REPO, benchmarks=BENCHMARKS)
    assert len(run.models) == 25 and [t.name for t in run.tables] == list(dict.fromkeys(c["table"] for c in CELLS))
    for table in run.tables:
        cells = [c for c in CELLS if c["table"] == table.name]
        assert run.table_rows(table) == tuple(dict.fromkeys((c["model"], c["scheme"]) for c in cells))
        assert table.benchmarks == tuple(dict.fromkeys(c["benchmark"] for c in cells))
        assert run.table_cells(table) == [(c["model"], c["scheme"], c["benchmark"]) for c in cells]
    page = (REPO.parent / "shared" / "seed" / "000_cba7e93356a1724f.txt")
    if page.is_file():
        captions = [line for line in page.read_text(encoding="utf-8").splitlines() if line.endswith("评测结果如下：")]
        assert [t.caption for t in run.tables] == captions
    assert run.evaluation == {"source": "hub", "limit": None, "backend": {"name": "vllm", "device": "cuda", "dtype": "auto"}}


def test_seed_schemes_are_angelslims_where_the_page_ran_otherwise():
    """seed.yaml's own schemes replace config/schemes.yaml's of the same name, whole; the others stay the file's."""
    from quantbench.errors import QuantbenchError
    from quantbench.schemes import load_schemes, scheme_from_dict

    run = load_run_config(CONFIG, base_dir=REPO, benchmarks=BENCHMARKS)
    shared = load_schemes(REPO / "config" / "schemes.yaml")
    awq, int8 = run.schemes["INT4-AWQ"], run.schemes["INT8-Dynamic"]
    assert (awq.awq.style, awq.awq.duo_scaling, awq.dtype) == ("angelslim", False, "float16")
    assert (awq.rounding.asymmetric_range, awq.rounding.divide_in) == ("minmax", "weight_dtype")
    assert (int8.rounding.symmetric_scale, int8.rounding.divide_in) == ("qmax", "weight_dtype")
    assert run.schemes["INT8-Dynamic-ViT"].targets == ("language", "vision")
    assert all(scheme_from_dict(s.to_dict()) == s for s in (awq, int8))  # as the quantize rule receives them
    assert shared["INT4-AWQ"].awq.style == "quantbench" and shared["INT8-Dynamic"].rounding.is_default
    assert {n for n in run.schemes if run.schemes[n] != shared.get(n)} == {"INT4-AWQ", "INT8-Dynamic", "INT8-Dynamic-ViT"}
    fp8 = run.schemes["FP8-Dynamic"].input_activations
    assert (fp8.strategy, fp8.dynamic) == ("tensor", True)  # AngelSlim's layout, in the shared file itself
    broken = {**CONFIG, "schemes": {"INT4-AWQ": {**CONFIG["schemes"]["INT4-AWQ"], "awq": {"style": "autoawq"}}}}
    with pytest.raises(QuantbenchError, match="scheme 'INT4-AWQ'.awq: style must be one of"):
        load_run_config(broken, base_dir=REPO, benchmarks=BENCHMARKS)


def test_models_are_pinned_hub_snapshots_where_a_revision_is_known():
    sources = {name: entry.source for name, entry in load_run_config(CONFIG, base_dir=REPO, benchmarks=BENCHMARKS).models.items()}
    assert sources["Qwen3-235B-A22B"].repo == "Qwen/Qwen3-235B-A22B"
    assert sources["Qwen2.5VL-7B"].repo == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert sources["DeepSeek-R1-Distill-Qwen-7B"].repo == "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
    unpinned = sorted(name for name, source in sources.items() if source.revision is None)
    assert unpinned == [f"Hunyuan-{size}-Instruct" for size in ("0.5B", "1.8B", "4B", "7B", "A13B")]
    assert all(re.fullmatch(r"[0-9a-f]{40}", s.revision) for s in sources.values() if s.revision)
    assert all(s.path is None for s in sources.values())


def test_published_calibration_sets_are_shipped_byte_for_byte():
    sets = CONFIG["calibration_sets"]
    digests = {
        "sharegpt-qwen3": "5019f991765804a042cf283e6d77d39454a01b1b146d03fd7b03b47af322ee19",
        "sharegpt-gpt4": "979996a3d098699d0e15b122f41d33fb9d985cd55b1b4dc3b7a2a12e22fd09f4",
    }
    for name, digest in digests.items():
        assert hashlib.sha256((REPO / sets[name]["path"]).read_bytes()).hexdigest() == digest
    calibration = {name: model["calibration"] for name, model in CONFIG["models"].items()}
    assert {m for m, c in calibration.items() if c == "sharegpt-gpt4"} == {m for m in calibration if m.startswith("Hunyuan")}


def test_vision_language_benchmarks_are_declared_with_local_files():
    vlm = {name: spec for name, spec in BENCHMARKS.items() if spec.lmms_eval}
    assert {name: spec.lmms_eval.task for name, spec in vlm.items()} == {
        "MMMU_VAL": "mmmu_val", "DocVQA_VAL": "docvqa_val", "ChartQA_TEST": "chartqa"}
    assert all(spec.lmms_eval.split in spec.files for spec in vlm.values())


@pytest.fixture(scope="module")
def seed_dry_run(tmp_path_factory):
    """`snakemake -n --configfile config/seed.yaml --workflow-profile profiles/slurm`, with its import log."""
    wd = tmp_path_factory.mktemp("seed")
    for name in ("config", "resources"):
        (wd / name).symlink_to(REPO / name)
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(wd),
         "--configfile", str(wd / "config" / "seed.yaml"), "--workflow-profile", str(REPO / "profiles" / "slurm"),
         "--dry-run"],
        capture_output=True, text=True, timeout=300, cwd=wd, env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"},
    )
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    shutil.rmtree(wd / ".snakemake", ignore_errors=True)
    print(f"seed dry run with the slurm profile: {seconds:.1f} s (with -X importtime)")
    return proc


def jobs(output: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, fields) of every job block of a dry run, fields including a parsed `resources` dict."""
    found = []
    for block in re.finditer(r"^(?:local)?rule (\w+):\n((?:    .*\n)+)", output, re.MULTILINE):
        fields = dict(re.findall(r"^    (\w+): (.*)$", block.group(2), re.MULTILINE))
        fields["resources"] = dict(item.split("=", 1) for item in fields.get("resources", "").split(", ") if "=" in item)
        found.append((block.group(1), fields))
    return found


def test_seed_dry_run_plans_every_cell_of_the_page_and_nothing_else(seed_dry_run):
    planned = jobs(seed_dry_run.stdout)
    assert Counter(rule for rule, _ in planned) == {
        "download": 25, "calibrate": 25, "quantize": 101, "evaluate": 445, "tabulate": 4, "compare": 4,
        "docs_page": 1, "all": 1,
    }
    evals = {f["output"] for rule, f in planned if rule == "evaluate"}
    assert evals == {f"results/evals/{c['model']}/{c['scheme']}/{c['benchmark']}.json" for c in CELLS}
    quantized = {f["output"] for rule, f in planned if rule == "quantize"}
    assert quantized == {f"results/quantized/{c['model']}/{c['scheme']}" for c in CELLS if c["scheme"] != "BF16"}
    # data-free schemes quantize from the model alone; the others read the model's calibration set
    inputs = {f["output"]: f["input"] for rule, f in planned if rule == "quantize"}
    assert inputs["results/quantized/Qwen3-8B/FP8-Dynamic"] == "results/models/Qwen3-8B"
    assert inputs["results/quantized/Qwen3-8B/INT4-GPTQ"] == (
        "results/models/Qwen3-8B, results/calib/Qwen3-8B/sharegpt-qwen3.safetensors"
    )
    assert inputs["results/quantized/Hunyuan-7B-Instruct/FP8-Static"].endswith("Hunyuan-7B-Instruct/sharegpt-gpt4.safetensors")
    # the VLMs calibrate on ChartQA train from the Hub: the job's only file input is the model
    assert inputs["results/quantized/Qwen2.5VL-7B/FP8-Static-ViT"].endswith("Qwen2.5VL-7B/chartqa-train.safetensors")
    calibrate = {f["output"]: f["input"] for rule, f in planned if rule == "calibrate"}
    assert calibrate["results/calib/Qwen2.5VL-7B/chartqa-train.safetensors"] == "results/models/Qwen2.5VL-7B"


def test_a_235b_moe_is_evaluated_on_several_gpus(seed_dry_run):
    resources = {f["output"]: f["resources"] for _, f in jobs(seed_dry_run.stdout) if "output" in f}
    bf16 = resources["results/evals/Qwen3-235B-A22B/BF16/MMLU.json"]
    assert {k: bf16[k] for k in ("gpu", "gpu_mem_mb", "mem_mb", "runtime", "slurm_partition")} == {
        "gpu": "8", "gpu_mem_mb": "72320", "mem_mb": "257024", "runtime": "500", "slurm_partition": "gpu",
    }
    assert resources["results/evals/Qwen3-235B-A22B/FP8-Static/MMLU.json"]["gpu"] == "4"
    assert resources["results/evals/Qwen3-0.6B/BF16/MMLU.json"]["gpu"] == "1"
    quantize = resources["results/quantized/Qwen3-235B-A22B/FP8-Static"]
    assert (quantize["gpu"], quantize["mem_mb"], quantize["runtime"]) == ("1", "634368", "245")
    calibrate = resources["results/calib/Qwen3-235B-A22B/sharegpt-qwen3.safetensors"]
    assert (calibrate["gpu"], calibrate["slurm_partition"]) == ("0", "cpu")


def test_the_dag_imports_no_model_libraries(seed_dry_run):
    imported = {m.group(1).split(".")[0] for m in re.finditer(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)", seed_dry_run.stderr, re.MULTILINE)}
    assert "quantbench" in imported and "snakemake" in imported
    assert not imported & set(HEAVY)


def test_published_csv_is_the_shared_reference(shared_dir):
    assert PUBLISHED.read_bytes() == (shared_dir / "reference" / "seed_tables.csv").read_bytes()
