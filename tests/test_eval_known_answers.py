"""Known answers through the real scoring path: lm-eval task -> filters -> metric (GSM8K) or the
sandbox (HumanEval). The model is replaced by an oracle that answers from the document itself, so the
expected scores are known: reference answers 100%, canonical solutions 100%, wrong answers 0%."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from lm_eval.api.model import LM

from quantbench.evaluate.benchmarks import load_benchmarks
from quantbench.evaluate.harness import run_lm_eval
from quantbench.evaluate.tasks import build_local_task

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "resources" / "data"
BENCHMARKS = load_benchmarks(ROOT / "config" / "benchmarks.yaml")


class OracleLM(LM):
    """Stands in for the model: every generation request is answered with ``answer(doc)``."""

    def __init__(self, answer: Callable[[dict], str]) -> None:
        super().__init__()
        self.answer = answer

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return [self.answer(request.doc) for request in requests]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError


def score(name: str, data_dir: Path, answer: Callable[[dict], str]):
    spec = BENCHMARKS[name]
    return run_lm_eval(OracleLM(answer), spec, build_local_task(spec, data_dir), source="local")


def off_by_one(doc: dict) -> str:
    """The reference solution with its final answer changed."""
    head, number = doc["answer"].rsplit("#### ", 1)
    return f"{head}#### {int(number.replace(',', '')) + 1}"


@pytest.fixture(params=["demo", pytest.param("full", marks=pytest.mark.slow)])
def data_dir(request: pytest.FixtureRequest) -> Path:
    return DEMO if request.param == "demo" else request.getfixturevalue("shared_dir") / "data"


def test_gsm8k_strict_match_extracts_every_reference_answer(data_dir: Path) -> None:
    outcome = score("GSM8K", data_dir, lambda doc: doc["answer"])
    assert outcome.items == (20 if data_dir == DEMO else 1319)
    assert outcome.score == 1.0
    assert outcome.task == "qb_gsm8k" and outcome.task_version == "3.0"


def test_gsm8k_strict_match_rejects_wrong_numbers() -> None:
    assert score("GSM8K", DEMO, off_by_one).score == 0.0


def test_gsm8k_strict_match_needs_the_answer_marker() -> None:
    """A bare number is not extracted by strict-match (the flexible filter would take it)."""
    outcome = score("GSM8K", DEMO, lambda doc: re.sub(r"^.*#### ", "", doc["answer"], flags=re.S))
    assert outcome.score == 0.0


@pytest.mark.slow
def test_humaneval_canonical_solutions_pass_and_empty_bodies_fail(data_dir: Path) -> None:
    solved = score("HUMANEVAL", data_dir, lambda doc: doc["canonical_solution"])
    expected = 20 if data_dir == DEMO else 164
    assert (solved.items, solved.score, solved.stderr) == (expected, 1.0, 0.0)
    assert solved.details["sandbox"]["counts"] == {"passed": expected, "failed": 0, "timeout": 0}
    empty = score("HUMANEVAL", data_dir, lambda doc: "")
    assert (empty.items, empty.score) == (expected, 0.0)
    assert empty.details["sandbox"]["counts"]["failed"] == expected
