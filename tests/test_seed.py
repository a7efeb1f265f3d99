"""config/seed.yaml: the published page's full matrix, planned by the workflow with sized resources."""

from __future__ import annotations

import copy
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

from quantbench.evaluate.backend import Backend
from quantbench.evaluate.benchmarks import load_benchmarks
from quantbench.run.config import load_run_config
from quantbench.run.recipe import departures, load_recipe
from quantbench.util.errors import QuantbenchError
from seed_results import PUBLISHED, published_cells, true_benchmarks

REPO = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((REPO / "config" / "seed.yaml").read_text(encoding="utf-8"))
BENCHMARKS = load_benchmarks(REPO / "config" / "benchmarks.yaml")
CELLS = true_benchmarks(published_cells())  # the benchmark each published number came from
HEAVY = ("torch", "transformers", "lm_eval", "vllm", "matplotlib", "datasets")


def test_seed_config_is_the_published_page():
    run = load_run_config(CONFIG, base_dir=REPO)
    assert len(run.models) == 25 and [t.name for t in run.tables] == list(dict.fromkeys(c["table"] for c in CELLS))
    for table in run.tables:
        cells = [c for c in CELLS if c["table"] == table.name]
        assert run.table_rows(table) == tuple(dict.fromkeys((c["model"], c["scheme"]) for c in cells))
        assert table.benchmarks == tuple(dict.fromkeys(c["benchmark"] for c in cells))
        assert run.table_cells(table) == [(c["model"], c["scheme"], c["benchmark"]) for c in cells]
    evaluation = run.evaluation
    assert (evaluation.source, evaluation.limit, evaluation.overrides) == ("hub", None, {})
    assert evaluation.backend == Backend(name="vllm", device="cuda", dtype="auto")


def test_seed_tables_have_the_pages_captions(shared_dir):
    run = load_run_config(CONFIG, base_dir=REPO)
    page = (shared_dir / "seed" / "000_cba7e93356a1724f.txt").read_text(encoding="utf-8")
    captions = [line for line in page.splitlines() if line.endswith("评测结果如下：")]
    assert len(captions) == 4 and [t.caption for t in run.tables] == captions


def test_hunyuan_table_runs_the_benchmarks_its_numbers_came_from():
    """The page's CEVAL/MMLU/GSM8K/HUMANEVAL labels stay for the as-published rendering only."""
    run = load_run_config(CONFIG, base_dir=REPO)
    hunyuan = run.table("table-Hunyuan-Instruct-performance")
    page = [c["benchmark"] for c in published_cells() if c["table"] == hunyuan.name]
    assert hunyuan.benchmarks == ("OlympiadBench", "AIME2024", "DROP", "GPQA-Diamond")
    assert tuple(hunyuan.headers().values()) == ("OlympiadBench", "AIME 2024", "DROP", "GPQA-Diamond")
    assert tuple(hunyuan.headers(as_published=True).values()) == tuple(dict.fromkeys(page))
    assert [t.name for t in run.tables if t.published_labels] == [hunyuan.name]
    lm = {name: BENCHMARKS[name].lm_eval for name in hunyuan.benchmarks}
    assert {n: (s.hub_task, s.num_fewshot, s.result_key) for n, s in lm.items()} == {
        "OlympiadBench": (None, 0, "acc,none"),
        "AIME2024": ("aime24", 0, "exact_match,none"),
        "DROP": ("drop", 0, "f1,none"),
        "GPQA-Diamond": ("gpqa_diamond_cot_zeroshot", 0, "exact_match,flexible-extract"),
    }
    assert all(s.chat_template and s.think_end_token == "<answer>" for s in lm.values())
    assert all(s.generation == lm["DROP"].generation for s in lm.values())
    assert lm["DROP"].generation["max_gen_toks"] == 32768 and lm["DROP"].generation["until"] == ["</answer>"]
    assert set(lm["OlympiadBench"].hub_data) == set(BENCHMARKS["OlympiadBench"].files) == {"maths", "physics"}


def test_labels_must_name_the_tables_benchmarks():
    config = copy.deepcopy(CONFIG)
    config["tables"][0]["published_labels"]["CEVAL"] = "X"
    with pytest.raises(
        QuantbenchError,
        match=r"tables\[0\] \(table-Hunyuan-Instruct-performance\)\.published_labels: "
        r"unknown benchmark 'CEVAL'",
    ):
        load_run_config(config, base_dir=REPO)


def test_seed_schemes_are_angelslims_where_the_page_ran_otherwise():
    """seed.yaml's scheme_overrides select AngelSlim's AWQ and INT8 weight rounding; the others stay the file's."""
    from quantbench.quant.schemes import load_schemes, scheme_from_dict

    run = load_run_config(CONFIG, base_dir=REPO)
    shared = load_schemes(REPO / "config" / "schemes.yaml")
    awq, int8 = run.schemes["INT4-AWQ"], run.schemes["INT8-Dynamic"]
    assert (awq.params.style, awq.params.duo_scaling, awq.dtype) == ("angelslim", False, "float16")
    assert awq.calibration.propagation == "full-precision"
    assert (awq.rounding.asymmetric_range, awq.rounding.divide_in) == ("minmax", "weight_dtype")
    assert (int8.rounding.symmetric_scale, int8.rounding.divide_in) == ("qmax", "weight_dtype")
    assert run.schemes["INT8-Dynamic-ViT"].targets == ("language", "vision")
    assert all(scheme_from_dict(s.to_dict()) == s for s in (awq, int8))  # as the quantize rule receives them
    assert shared["INT4-AWQ"].params.style == "quantbench" and shared["INT8-Dynamic"].rounding.is_default
    assert {n for n in run.schemes if run.schemes[n] != shared.get(n)} == {
        "INT4-AWQ",
        "INT8-Dynamic",
        "INT8-Dynamic-ViT",
        "FP8-Static",
        "FP8-Static-ViT",
        "INT4-GPTQ",
    }
    fp8 = run.schemes["FP8-Dynamic"].input_activations
    assert (fp8.strategy, fp8.dynamic) == ("tensor", True)  # AngelSlim's layout, in the shared file itself
    broken = copy.deepcopy(CONFIG)
    broken["scheme_overrides"]["INT4-AWQ"]["awq"]["style"] = "autoawq"
    with pytest.raises(QuantbenchError, match="scheme 'INT4-AWQ'.awq: style must be one of"):
        load_run_config(broken, base_dir=REPO)


def test_models_are_pinned_hub_snapshots_where_a_revision_is_known():
    sources = {name: entry.source for name, entry in load_run_config(CONFIG, base_dir=REPO).models.items()}
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
    run = load_run_config(CONFIG, base_dir=REPO)
    files = {
        (model, calib.path.name if calib.path else calib.hub.describe())
        for model, entry in run.models.items()
        for calib in map(run.calibration_sets.get, entry.calibration.values())
    }
    assert {m for m, f in files if f == "sharegpt_gpt4_256.jsonl"} == {m for m in run.models if m.startswith("Hunyuan")}
    assert {m for m, f in files if "ChartQA" in f} == {m for m in run.models if m.startswith("Qwen2.5VL")}
    assert all(f.endswith("@b605b6e08b57faf4359aeb2fe6a3ca595f99b6c5:test") for m, f in files if "ChartQA" in f)


def test_seed_config_departs_from_the_published_recipe_only_where_no_option_selects_it():
    run = load_run_config(CONFIG, base_dir=REPO)
    recipe = load_recipe(REPO / CONFIG["compare"]["recipe"])
    for table in run.tables:
        assert departures(run, table, recipe) == [
            f.text for f in recipe.fixed if f.concerns(table.name, run.table_rows(table))
        ]
    # the recipe names a calibration for every published row that needs data, and the seed takes it
    needing = {(m, s) for t in run.tables for m, s in run.table_rows(t) if run.schemes[s].needs_calibration}
    assert needing == {(m, s) for m, row in recipe.calibration.items() for s in row}
    qwen3_8b = {
        s: (c.num_samples, c.max_seq_len)
        for s in ("FP8-Static", "INT4-GPTQ", "INT4-AWQ")
        for c in [run.calibration_of("Qwen3-8B", s)]
    }
    assert qwen3_8b == {"FP8-Static": (256, 4096), "INT4-GPTQ": (128, 4096), "INT4-AWQ": (128, 4096)}
    assert run.calibration_of("Hunyuan-7B-Instruct", "INT4-GPTQ").max_seq_len == 8192
    assert run.calibration_of("Qwen2.5VL-3B", "INT4-AWQ").num_samples == 2


def test_vision_language_benchmarks_are_declared_with_local_files():
    vlm = {name: spec for name, spec in BENCHMARKS.items() if spec.lmms_eval}
    assert {name: spec.lmms_eval.task for name, spec in vlm.items()} == {
        "MMMU_VAL": "mmmu_val",
        "DocVQA_VAL": "docvqa_val",
        "ChartQA_TEST": "chartqa",
    }
    assert all(spec.lmms_eval.split in spec.files for spec in vlm.values())


@pytest.fixture(scope="module")
def seed_dry_run(tmp_path_factory):
    """`snakemake -n --configfile config/seed.yaml --workflow-profile profiles/slurm --cores 1024`, with its import log."""
    wd = tmp_path_factory.mktemp("seed")
    for name in ("config", "resources"):
        (wd / name).symlink_to(REPO / name)
    started = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "--snakefile",
            str(REPO / "Snakefile"),
            "--directory",
            str(wd),
            "--configfile",
            str(wd / "config" / "seed.yaml"),
            "--workflow-profile",
            str(REPO / "profiles" / "slurm"),
            "--dry-run",
            "--cores",
            "1024",
        ],  # a dry run caps threads at --cores (1 unless given); SLURM jobs are not
        capture_output=True,
        text=True,
        timeout=300,
        cwd=wd,
        env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"},
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
        fields["resources"] = dict(
            item.split("=", 1) for item in fields.get("resources", "").split(", ") if "=" in item
        )
        found.append((block.group(1), fields))
    return found


@pytest.mark.workflow
def test_seed_dry_run_plans_every_cell_of_the_page_and_nothing_else(seed_dry_run):
    planned = jobs(seed_dry_run.stdout)
    assert Counter(rule for rule, _ in planned) == {
        "download": 25,
        "calibrate": 46,
        "quantize": 101,
        "evaluate": 445,
        "tabulate": 4,
        "tabulate_as_published": 1,
        "compare": 4,
        "docs_page": 1,
        "all": 1,
    }
    evals = {f["output"] for rule, f in planned if rule == "evaluate"}
    assert evals == {f"results/evals/{c['model']}/{c['scheme']}/{c['benchmark']}.json" for c in CELLS}
    quantized = {f["output"] for rule, f in planned if rule == "quantize"}
    assert quantized == {f"results/quantized/{c['model']}/{c['scheme']}" for c in CELLS if c["scheme"] != "BF16"}
    # data-free schemes quantize from the model alone; the others read the model's calibration set
    inputs = {f["output"]: f["input"] for rule, f in planned if rule == "quantize"}
    assert inputs["results/quantized/Qwen3-8B/FP8-Dynamic"] == "results/models/Qwen3-8B"
    assert inputs["results/quantized/Qwen3-8B/INT4-GPTQ"] == (
        "results/models/Qwen3-8B, results/calib/Qwen3-8B/sharegpt-qwen3-128.safetensors"
    )
    assert inputs["results/quantized/Qwen3-8B/FP8-Static"].endswith("Qwen3-8B/sharegpt-qwen3.safetensors")
    assert inputs["results/quantized/Hunyuan-7B-Instruct/FP8-Static"].endswith(
        "Hunyuan-7B-Instruct/sharegpt-gpt4.safetensors"
    )
    assert inputs["results/quantized/Hunyuan-7B-Instruct/INT4-GPTQ"].endswith(
        "Hunyuan-7B-Instruct/sharegpt-gpt4-128-8k.safetensors"
    )
    # the VLMs calibrate on ChartQA test from the Hub: the job's only file input is the model
    assert inputs["results/quantized/Qwen2.5VL-7B/FP8-Static-ViT"].endswith("Qwen2.5VL-7B/chartqa-test.safetensors")
    calibrate = {f["output"]: f["input"] for rule, f in planned if rule == "calibrate"}
    assert calibrate["results/calib/Qwen2.5VL-7B/chartqa-test.safetensors"] == "results/models/Qwen2.5VL-7B"
    assert "results/calib/Qwen2.5VL-3B/chartqa-test-2.safetensors" in calibrate


@pytest.mark.workflow
def test_a_235b_moe_is_evaluated_on_several_gpus(seed_dry_run):
    resources = {f["output"]: f["resources"] for _, f in jobs(seed_dry_run.stdout) if "output" in f}
    bf16 = resources["results/evals/Qwen3-235B-A22B/BF16/MMLU.json"]
    # time: 10 min start-up + 470 GB read at 1 GB/s + 1.5 x MMLU's workload at the measured rates for 235/8 B per GPU
    assert {k: bf16[k] for k in ("gpu", "mem_mb", "runtime", "slurm_partition")} == {
        "gpu": "8",
        "mem_mb": "257024",
        "runtime": "86",
        "slurm_partition": "gpu",
    }
    assert "gpu_mem_mb" not in bf16
    assert resources["results/evals/Qwen3-235B-A22B/FP8-Static/MMLU.json"]["gpu"] == "4"
    assert resources["results/evals/Qwen3-0.6B/BF16/MMLU.json"]["gpu"] == "1"
    quantize = resources["results/quantized/Qwen3-235B-A22B/FP8-Static"]
    assert (quantize["gpu"], quantize["mem_mb"], quantize["runtime"]) == ("1", "634368", "245")
    calibrate = resources["results/calib/Qwen3-235B-A22B/sharegpt-qwen3.safetensors"]
    assert (calibrate["gpu"], calibrate["slurm_partition"]) == ("0", "cpu")
    # CPUs per task: the rules' threads (4 per evaluation GPU, 8 to quantize, 1 to calibrate)
    cpus = {output: res["cpus_per_task"] for output, res in resources.items()}
    assert cpus["results/evals/Qwen3-235B-A22B/BF16/MMLU.json"] == "32"
    assert cpus["results/evals/Qwen3-235B-A22B/FP8-Static/MMLU.json"] == "16"
    assert cpus["results/quantized/Qwen3-235B-A22B/FP8-Static"] == "8"
    assert cpus["results/calib/Qwen3-235B-A22B/sharegpt-qwen3.safetensors"] == "1"


@pytest.mark.workflow
def test_the_dag_imports_no_model_libraries(seed_dry_run):
    imported = {
        m.group(1).split(".")[0]
        for m in re.finditer(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)", seed_dry_run.stderr, re.MULTILINE)
    }
    assert "quantbench" in imported and "snakemake" in imported
    assert not imported & set(HEAVY)


def test_published_csv_is_the_shared_reference(shared_dir):
    assert PUBLISHED.read_bytes() == (shared_dir / "reference" / "seed_tables.csv").read_bytes()
