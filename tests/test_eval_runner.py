"""The evaluate step end to end on the demo model, offline: every benchmark, repeatability, the CLI and
its recorded command, and the failures that must leave no result file."""

from __future__ import annotations

import json
import shlex
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from quantbench.checkpoint import load as checkpoint_load
from quantbench.checkpoint.load import load_model
from quantbench.cli import main
from quantbench.evaluate import harness
from quantbench.evaluate.backend import Backend
from quantbench.evaluate.benchmarks import load_benchmarks
from quantbench.evaluate.results import checkpoint_hash, file_sha256
from quantbench.evaluate.runner import evaluate_benchmark
from quantbench.util.errors import QuantbenchError

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "resources" / "data"
BENCHMARKS_FILE = ROOT / "config" / "benchmarks.yaml"
BENCHMARKS = load_benchmarks(BENCHMARKS_FILE)
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # Backend(threads=1) below sets it too
# Few items and short generations: each job is a few seconds on one CPU core.
QUICK = {
    "CEVAL": ({}, 1, 4),  # overrides, limit (per subject), items scored
    "MMLU": ({}, 1, 4),
    "GSM8K": ({"max_gen_toks": 16}, 2, 2),
    "HUMANEVAL": ({"max_gen_toks": 24}, 2, 2),
    "WIKITEXT2": ({"seq_len": 256, "max_tokens": 1024}, None, 4),
}


def run(model_dir: Path, name: str, out: Path, **kwargs) -> dict:
    overrides, limit, _ = QUICK[name]
    kwargs.setdefault("data_dir", DEMO)
    return evaluate_benchmark(
        model_dir,
        BENCHMARKS[name].with_overrides(overrides),
        out_path=out,
        model_name="tinyqwen3-dense",
        scheme_name="BF16",
        limit=limit,
        backend=Backend(threads=1),
        benchmarks_file=BENCHMARKS_FILE,
        **kwargs,
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", list(QUICK))
def test_every_benchmark_runs_offline_end_to_end(name: str, dense_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "evals" / f"{name}.json"
    result = run(dense_model_dir, name, out)
    assert json.loads(out.read_text(encoding="utf-8")) == result
    spec = BENCHMARKS[name]
    assert result["benchmark"] == name and result["items"] == QUICK[name][2]
    if spec.percent:
        assert 0.0 <= result["score"] <= 100.0 and result["unit"] == "percent"
        assert result["num_fewshot"] == spec.lm_eval.num_fewshot
        assert result["metric"] == spec.lm_eval.result_key
        assert result["task"]["name"].startswith("qb_")
        if spec.lm_eval.scorer == "lm_eval":  # the sandbox's pass@1 is quantbench's, not lm-eval's
            assert result["scores"][result["metric"]] == result["score"]
        if name == "GSM8K":  # both filters recorded, the configured one is the score
            assert set(result["scores"]) == {"exact_match,strict-match", "exact_match,flexible-extract"}
    else:
        assert 100 < result["score"] < 2000 and result["unit"] == "perplexity"
    assert result["data"]["source"] == "local"
    assert result["data"]["files"] == {
        split: {"path": rel, "sha256": file_sha256(DEMO / rel)} for split, rel in spec.files.items()
    }
    assert result["checkpoint_sha256"] == checkpoint_hash(dense_model_dir)
    assert {"lm_eval", "transformers", "torch"} <= {k for k, v in result["versions"].items() if v}
    assert result["backend"]["name"] == "hf" and result["backend"]["torch_dtype"] == "float32"
    assert (result["model"], result["scheme"]) == ("tinyqwen3-dense", "BF16")
    assert result["wall_time_s"] > 0
    argv = shlex.split(result["command"])
    assert argv[:2] == ["quantbench", "evaluate"] and argv[argv.index("--benchmark") + 1] == name


@pytest.mark.slow
@pytest.mark.parametrize("name", ["MMLU", "GSM8K"])
def test_same_checkpoint_twice_gives_identical_scores(name: str, dense_model_dir: Path, tmp_path: Path) -> None:
    first = run(dense_model_dir, name, tmp_path / "a.json")
    second = run(dense_model_dir, name, tmp_path / "b.json")
    keys = ("score", "stderr", "items", "task", "checkpoint_sha256", "data")
    assert {k: first[k] for k in keys} == {k: second[k] for k in keys}


def test_cli_result_and_its_recorded_command_reproduce(dense_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ppl.json"
    argv = [
        "evaluate",
        "--model",
        str(dense_model_dir),
        "--benchmark",
        "WIKITEXT2",
        "--benchmarks",
        str(BENCHMARKS_FILE),
        "--data-dir",
        str(DEMO),
        "--seq-len",
        "256",
        "--max-tokens",
        "768",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    first = json.loads(out.read_text(encoding="utf-8"))
    assert first["items"] == 3 and first["spec"]["overrides"] == {"seq_len": 256, "max_tokens": 768}
    again = shlex.split(first["command"])[1:]
    again[again.index("--out") + 1] = str(tmp_path / "again.json")
    assert main(again) == 0
    assert json.loads((tmp_path / "again.json").read_text(encoding="utf-8"))["score"] == first["score"]


def test_missing_data_file_is_a_clear_error_and_writes_nothing(dense_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "MMLU.json"
    with pytest.raises(QuantbenchError, match=r"mmlu/test\.jsonl.* not found; pass --data-dir"):
        run(dense_model_dir, "MMLU", out, data_dir=tmp_path / "empty")
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_task_unknown_to_lm_eval_is_a_clear_error_and_writes_nothing(dense_model_dir: Path, tmp_path: Path) -> None:
    spec = BENCHMARKS["GSM8K"]
    bogus = replace(spec, lm_eval=replace(spec.lm_eval, hub_task="gsm8k_no_such_variant"))
    out = tmp_path / "GSM8K.json"
    with pytest.raises(QuantbenchError, match="does not know the task 'gsm8k_no_such_variant'"):
        evaluate_benchmark(dense_model_dir, bogus, out_path=out, model_name="m", source="hub")
    assert not out.exists()


def test_unknown_local_task_template_is_a_clear_error(dense_model_dir: Path, tmp_path: Path) -> None:
    spec = BENCHMARKS["GSM8K"]
    bogus = replace(spec, lm_eval=replace(spec.lm_eval, local_task="gsm8k_cot"))
    with pytest.raises(
        QuantbenchError, match="no local task template 'gsm8k_cot'.*known: .*ceval-valid, drop, .*gsm8k"
    ):
        evaluate_benchmark(dense_model_dir, bogus, out_path=tmp_path / "x.json", model_name="m", data_dir=DEMO)


def _crashing_model(path, *, device="cpu", dtype=torch.float32):
    model, tokenizer = load_model(path, device=device, dtype=dtype)

    def broken(*args, **kwargs):
        raise RuntimeError("simulated kernel failure in layer 0")

    model.model.layers[0].mlp.forward = broken
    return model, tokenizer


@pytest.mark.parametrize("name", ["GSM8K", "MMLU", "WIKITEXT2"])
def test_crashing_model_is_a_clear_error_and_writes_nothing(
    name: str, dense_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpoint_load, "load_model", _crashing_model)  # what Backend.load loads through
    out = tmp_path / f"{name}.json"
    with pytest.raises(QuantbenchError, match=rf"benchmark {name}: .*simulated kernel failure in layer 0"):
        run(dense_model_dir, name, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_vllm_backend_without_vllm_is_a_clear_error(dense_model_dir: Path, tmp_path: Path) -> None:
    if harness.importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    spec = BENCHMARKS["MMLU"]
    with pytest.raises(QuantbenchError, match="backend 'vllm' needs the vllm package"):
        evaluate_benchmark(
            dense_model_dir,
            spec,
            out_path=tmp_path / "x.json",
            model_name="m",
            data_dir=DEMO,
            backend=Backend(name="vllm", device="cuda"),
        )
    assert not (tmp_path / "x.json").exists()
