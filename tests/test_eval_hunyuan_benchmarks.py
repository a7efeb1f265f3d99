"""The Hunyuan table's benchmarks (OlympiadBench, AIME 2024, DROP, GPQA-Diamond) through the real scoring path,
offline: the project's tasks over a few hand-written items in each dataset's layout (tests/data), prompted
through a chat template as config/benchmarks.yaml sets them, answered by an oracle from the documents
themselves, so the expected scores are known (worked out by hand where a metric is not all-or-nothing)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from lm_eval.api.model import LM

from quantbench.evaluate.backend import Backend
from quantbench.evaluate.benchmarks import load_benchmarks
from quantbench.evaluate.harness import make_lm, run_lm_eval
from quantbench.evaluate.olympiadbench import doc_to_text
from quantbench.evaluate.runner import evaluate_benchmark
from quantbench.evaluate.tasks import build_hub_task, build_local_task

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
TINY = ROOT / "resources" / "models" / "tinyqwen3-dense"
BENCHMARKS = load_benchmarks(ROOT / "config" / "benchmarks.yaml")


class ChatOracle(LM):
    """Stands in for a chat model: renders the chat turns visibly and answers each request with ``answer(doc)``."""

    def __init__(self, answer: Callable[[dict], str]) -> None:
        super().__init__()
        self.answer = answer
        self.contexts: list[str] = []

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        self.contexts += [request.args[0] for request in requests]
        return [self.answer(request.doc) for request in requests]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        turns = "".join(f"<|{m['role']}|>{m['content']}" for m in chat_history)
        return turns + ("<|assistant|>" if add_generation_prompt else "")

    @property
    def tokenizer_name(self) -> str:
        return "chat-oracle"


def score(name: str, answer: Callable[[dict], str], task=None):
    lm = ChatOracle(answer)
    spec = BENCHMARKS[name]
    return run_lm_eval(lm, spec, task or build_local_task(spec, DATA), source="local"), lm.contexts


def records(rel: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / rel).read_text(encoding="utf-8").splitlines()]


# --- OlympiadBench -------------------------------------------------------------------------------------

INSTRUCTION = (
    "Please calculate the answer according to the given requirements and the information provided. Please use "
    "LaTeX format to represent the variables and formulas used in the solution process and results. "
)


def test_olympiadbench_prompt_is_the_authors() -> None:
    maths = records("olympiadbench/OE_TO_maths_en_COMP.jsonl")
    physics = records("olympiadbench/OE_TO_physics_en_COMP.jsonl")
    assert doc_to_text(maths[0]) == (
        "The following is an open-ended problem from an International Math competition. The answer of The "
        f'problem should be a numerical value. {INSTRUCTION}Please end your solution with "So the final answer '
        'is \\boxed{answer}." and give the result explicitly.\nFind the number of positive divisors of $360$.'
    )
    # a tuple answer names no type
    assert doc_to_text(maths[4]).startswith(
        f"The following is an open-ended problem from an International Math competition. {INSTRUCTION}"
    )
    # physics: several answers with units, the context before the question
    assert doc_to_text(physics[2]) == (
        "The following is an open-ended problem from an International Physics competition. The problem has "
        f"multiple answers, each of them should be a numerical value. {INSTRUCTION}Please end your solution "
        'with "So the final answer is \\boxed{multiple answers connected with commas}(unit)." and give the '
        "result explicitly, note that the unit of the answer should not be included in \\boxed{}.\n"
        f"{physics[2]['context']}\n{physics[2]['question']}"
    )
    mixed = {**maths[1], "answer_type": "Numerical,Expression"}
    assert "with the answers in order being a numerical value, an expression. Please" in doc_to_text(mixed)


def reference_reply(doc: dict) -> str:
    return "Some working.\nSo the final answer is $\\boxed{" + doc["final_answer"][0].replace("$", "") + "}$."


# Hand-worked: other correct forms (within each record's tolerance), and answers that are wrong.
EQUIVALENT = {
    9001: r"So the final answer is \boxed{24}.",
    9002: r"So the final answer is \boxed{3}, \boxed{-2}.",  # the other order
    9003: r"So the final answer is $\left(0, 4\right)$.",  # no box: the $...$ of the line
    9004: r"So the final answer is \boxed{1+n}.",
    9005: r"So the final answer is \boxed{(3,2)}.",
    9101: r"So the final answer is \boxed{9.05} J.",  # |9 - 9.05| <= 0.1 * 1.01
    9102: r"So the final answer is \boxed{\frac{k x^{2}}{2}}.",
    9103: r"So the final answer is \boxed{20}, \boxed{2.05}.",  # tolerances 0.1 (time) and 1 (distance)
}
WRONG = {
    9001: r"So the final answer is \boxed{23}.",
    9002: r"So the final answer is \boxed{3}.",  # one of two answers
    9003: r"So the final answer is $[0, 4)$.",  # wrong bracket
    9004: r"So the final answer is \boxed{n-1}.",
    9005: r"So the final answer is \boxed{(2,3)}.",
    9101: r"So the final answer is \boxed{9.5} J.",  # 0.5 > 0.101
    9102: r"So the final answer is \boxed{k x^{2}}.",
    9103: r"So the final answer is \boxed{2.05}, \boxed{22}.",  # |20 - 22| > 1.01
}


@pytest.mark.slow
def test_olympiadbench_scores_known_answers_through_the_chat_template() -> None:
    outcome, contexts = score("OlympiadBench", reference_reply)
    assert (outcome.score, outcome.items, outcome.task, outcome.scores) == (
        1.0,
        8,
        "qb_olympiadbench",
        {"acc,none": 1.0},
    )
    assert all(c.startswith("<|user|>The following is an open-ended problem") for c in contexts)
    assert all(c.endswith("<|assistant|>") for c in contexts) and len(contexts) == 8
    assert score("OlympiadBench", lambda doc: EQUIVALENT[doc["id"]])[0].score == 1.0
    assert score("OlympiadBench", lambda doc: WRONG[doc["id"]])[0].score == 0.0
    # the group is the share of all items: 5 maths items right, 3 physics items wrong
    mixed = score("OlympiadBench", lambda doc: (EQUIVALENT if doc["id"] < 9100 else WRONG)[doc["id"]])[0]
    assert mixed.score == pytest.approx(5 / 8)


def test_olympiadbench_hub_source_reads_the_named_files(tmp_path: Path) -> None:
    """The hub source loads each split through datasets.load_dataset(**hub_data[split]); here from local files."""
    spec = BENCHMARKS["OlympiadBench"]
    local = {
        split: {"path": "json", "data_files": str(DATA / rel), "split": "train"} for split, rel in spec.files.items()
    }
    hub_like = dataclasses.replace(spec, lm_eval=dataclasses.replace(spec.lm_eval, hub_data=local))
    outcome, _ = score("OlympiadBench", reference_reply, task=build_hub_task(hub_like))
    assert (outcome.score, outcome.items) == (1.0, 8)


# --- AIME 2024, DROP, GPQA-Diamond (lm-eval's tasks over local files) ------------------------------------


def test_aime_reads_the_boxed_answer() -> None:
    outcome, contexts = score("AIME2024", lambda doc: f"<think>2+2</think> So it is $\\boxed{{{doc['Answer']}}}$")
    assert (outcome.score, outcome.items) == (1.0, 3)
    assert (
        contexts[0] == "<|user|>Question: Find the remainder when $2^{10}$ is divided by $1000$.\nAnswer:<|assistant|>"
    )
    assert score("AIME2024", lambda doc: f"\\boxed{{{doc['Answer'] + 1}}}")[0].score == 0.0


def test_drop_reports_f1_with_em_beside_it() -> None:
    gold = {"quantbench-q1": "2", "quantbench-q2": "Lind", "quantbench-q3": "14 November 2021"}
    outcome, _ = score("DROP", lambda doc: gold[doc["query_id"]])
    assert (outcome.score, outcome.items, outcome.scores) == (1.0, 3, {"em,none": 1.0, "f1,none": 1.0})
    # "2 matches" against "2": precision 1/2, recall 1, F1 2/3 (DROP rounds it to 0.67); the others exact
    partial = {**gold, "quantbench-q1": "2 matches"}
    outcome, _ = score("DROP", lambda doc: partial[doc["query_id"]])
    assert outcome.scores == pytest.approx({"em,none": 2 / 3, "f1,none": (0.67 + 1 + 1) / 3})


def test_gpqa_reads_the_letter_strictly_and_flexibly() -> None:
    outcome, contexts = score("GPQA-Diamond", lambda doc: f"Thinking. The answer is {doc['answer']}.")
    assert outcome.score == 1.0 and outcome.scores == {
        "exact_match,strict-match": 1.0,
        "exact_match,flexible-extract": 1.0,
    }
    assert contexts[0].startswith("<|user|>What is the correct answer to this question:A sample of a radioactive")
    assert contexts[0].endswith("Let's think step by step: <|assistant|>")
    # no "The answer is": only the flexible filter (the configured one) finds the letter
    outcome, _ = score("GPQA-Diamond", lambda doc: f"I pick {doc['answer']}")
    assert outcome.scores == {"exact_match,strict-match": 0.0, "exact_match,flexible-extract": 1.0}
    assert outcome.score == 1.0

    def wrong(doc: dict) -> str:
        return "The answer is (A)." if doc["answer"] != "(A)" else "The answer is (B)."

    assert score("GPQA-Diamond", wrong)[0].scores == {
        "exact_match,strict-match": 0.0,
        "exact_match,flexible-extract": 0.0,
    }


# --- the model side: thinking stripped, chat template applied, on a real (tiny) model ---------------------


def test_the_think_end_token_reaches_lm_evals_model() -> None:
    backend = Backend(threads=1)
    assert make_lm(TINY, backend, BENCHMARKS["DROP"].lm_eval).think_end_token == "<answer>"
    assert make_lm(TINY, backend, BENCHMARKS["GSM8K"].lm_eval).think_end_token is None


def test_olympiadbench_runs_end_to_end_on_the_tiny_model(tmp_path: Path) -> None:
    out = tmp_path / "OlympiadBench.json"
    result = evaluate_benchmark(
        TINY,
        BENCHMARKS["OlympiadBench"].with_overrides({"max_gen_toks": 4}),
        out_path=out,
        model_name="tiny",
        scheme_name="BF16",
        data_dir=DATA,
        limit=1,
        backend=Backend(threads=1),
    )
    assert json.loads(out.read_text(encoding="utf-8")) == result
    assert (result["items"], result["task"]["name"], result["metric"]) == (2, "qb_olympiadbench", "acc,none")
    assert result["scores"] == {"acc,none": result["score"]} and result["score"] in (0.0, 50.0, 100.0)
    assert result["spec"]["lm_eval"]["chat_template"] is True
    assert set(result["data"]["files"]) == {"maths", "physics"}
