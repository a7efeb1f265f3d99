"""Prompt equivalence: the local tasks build exactly the requests of lm-eval's built-in tasks.

The built-in task's own config (lm-eval's YAML) is pointed at the same JSONL rows (dataset_path json +
data_files; per subject for the grouped benchmarks, as the Hub dataset's per-subject configs are) and
both tasks render their requests the way ``simple_evaluate`` does. Requests hold the full context
(description, few-shot examples, question), the continuation (target delimiter + choice) or the
generation arguments (``until``, ...), so comparing them string for string compares the prompts.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import datasets
import pytest
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks._yaml_loader import load_yaml

from quantbench.evaluate.benchmarks import load_benchmarks
from quantbench.evaluate.tasks import build_local_task, builtin_task_manager, leaf_tasks

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "resources" / "data"
BENCHMARKS = load_benchmarks(ROOT / "config" / "benchmarks.yaml")
FEWSHOT_SEED = 1234  # simple_evaluate's default fewshot_random_seed


def render(task, docs: int, num_fewshot: int) -> list[tuple]:
    """The requests ``simple_evaluate`` builds for the first ``docs`` documents of ``task``."""
    task.set_config(key="num_fewshot", value=num_fewshot)
    task.set_fewshot_seed(seed=FEWSHOT_SEED)
    task.build_all_requests(samples=list(range(min(docs, len(task.eval_docs)))))
    return [(i.doc_id, i.idx, i.request_type, i.args) for i in task.instances]


def seeded(fn, *args):
    """``fn(*args)`` from the same global random state (lm-eval's gpqa shuffles the choices with it, as
    simple_evaluate's seeded run does)."""
    random.seed(0)
    return fn(*args)


def targets(task, docs: int) -> list[str]:
    out = []
    for doc in list(task.eval_docs)[:docs]:
        target = task.doc_to_target(doc)
        out.append(task.doc_to_choice(doc)[target] if task.config.doc_to_choice is not None else str(target))
    return out


def builtin_task(name: str, data_files: dict[str, str]) -> ConfigurableTask:
    """lm-eval's built-in task ``name`` with its dataset replaced by local JSONL files."""
    # HumanEval's metric and filter live in a module that downloads HF evaluate's code_eval at import;
    # neither is part of the prompt, and quantbench scores HumanEval in its own sandbox.
    cfg = load_yaml(builtin_task_manager().task_index[name].yaml_path, resolve_func=name != "humaneval")
    for key in ("tag", "group", "task_list"):
        cfg.pop(key, None)
    if name == "humaneval":
        cfg.pop("metric_list")
        cfg.pop("filter_list")
    if name == "drop":  # zero-shot here: its train split is only the few-shot source, not in the local files
        cfg.pop("training_split")
    cfg |= {"dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": data_files}}
    return ConfigurableTask(config=cfg)


def write_subject_files(data_dir: Path, files: dict[str, str], subject: str, tmp: Path) -> dict[str, str]:
    """Per-subject JSONL files (the rows of ``subject`` in file order), like the Hub's per-subject configs."""
    out = {}
    for split, rel in files.items():
        lines = [
            line
            for line in (data_dir / rel).read_bytes().splitlines(keepends=True)
            if json.loads(line)["subject"] == subject
        ]
        path = tmp / f"{subject}.{split}.jsonl"
        path.write_bytes(b"".join(lines))
        out[split] = str(path)
    return out


def assert_same_prompts(name: str, data_dir: Path, docs: int, tmp: Path) -> int:
    """Compare local and built-in renderings of benchmark ``name``; return the number of requests compared."""
    spec = BENCHMARKS[name]
    shots = spec.lm_eval.num_fewshot
    local = leaf_tasks(build_local_task(spec, data_dir))
    compared = 0
    for task in local:
        if len(local) == 1:
            builtin = builtin_task(spec.lm_eval.hub_task, {s: str(data_dir / r) for s, r in spec.files.items()})
        else:  # one subtask per subject: qb_mmlu_<subject> mirrors mmlu_<subject>
            subject = task.task_name.removeprefix(f"qb_{spec.lm_eval.hub_task}_")
            files = write_subject_files(data_dir, dict(spec.files), subject, tmp)
            builtin = builtin_task(f"{spec.lm_eval.hub_task}_{subject}", files)
        ours, theirs = seeded(render, task, docs, shots), seeded(render, builtin, docs, shots)
        assert ours == theirs, f"{task.task_name}: requests differ from {builtin.config.task}"
        assert seeded(targets, task, docs) == seeded(targets, builtin, docs)
        compared += len(ours)
    return compared


# GSM8K is compared on the full data only: its demo train file is a subset, which the local task samples
# as the full split (see test_demo_subset_prompts_equal_full_data_prompts) and the built-in task cannot.
@pytest.mark.parametrize(("name", "requests"), [("CEVAL", 80), ("MMLU", 80), ("HUMANEVAL", 20)])
def test_local_task_renders_like_builtin_on_demo_data(name: str, requests: int, tmp_path: Path) -> None:
    assert assert_same_prompts(name, DEMO, docs=20, tmp=tmp_path) == requests


@pytest.fixture
def uncached_maps():
    """datasets recomputes every map: a cached map would keep the choice order of gpqa's first shuffle."""
    datasets.disable_caching()
    yield
    datasets.enable_caching()


@pytest.mark.parametrize("name", ["AIME2024", "DROP", "GPQA-Diamond"])
def test_hunyuan_benchmark_tasks_render_like_builtin(name: str, tmp_path: Path, uncached_maps) -> None:
    """The Hunyuan table's lm-eval benchmarks: their local twins over tests/data's hand-written items."""
    assert assert_same_prompts(name, ROOT / "tests" / "data", docs=3, tmp=tmp_path) == 3


@pytest.mark.slow
@pytest.mark.parametrize(("name", "docs", "requests"), [("CEVAL", 2, 52 * 2 * 4), ("MMLU", 1, 57 * 4)])
def test_every_subject_renders_like_builtin_on_full_data(
    name: str, docs: int, requests: int, shared_dir: Path, tmp_path: Path
) -> None:
    """All 52 C-Eval and 57 MMLU subjects: descriptions (subject names), few-shot rows, choices."""
    assert assert_same_prompts(name, shared_dir / "data", docs=docs, tmp=tmp_path) == requests


@pytest.mark.parametrize("name", ["GSM8K", "HUMANEVAL"])
def test_single_tasks_render_like_builtin_on_full_data(name: str, shared_dir: Path, tmp_path: Path) -> None:
    assert assert_same_prompts(name, shared_dir / "data", docs=20, tmp=tmp_path) == 20


@pytest.mark.parametrize("name", ["CEVAL", "MMLU", "GSM8K", "HUMANEVAL"])
def test_demo_subset_prompts_equal_full_data_prompts(name: str, shared_dir: Path) -> None:
    """A demo item gets the prompt it gets on the full data (GSM8K: same random few-shot draws)."""
    spec = BENCHMARKS[name]
    shots = spec.lm_eval.num_fewshot
    demo = {t.task_name: t for t in leaf_tasks(build_local_task(spec, DEMO))}
    full = {t.task_name: t for t in leaf_tasks(build_local_task(spec, shared_dir / "data"))}
    assert set(demo) <= set(full)
    for task_name, task in demo.items():
        n = len(task.eval_docs)
        assert list(task.eval_docs) == list(full[task_name].eval_docs)[:n]
        assert render(task, n, shots) == render(full[task_name], n, shots)
