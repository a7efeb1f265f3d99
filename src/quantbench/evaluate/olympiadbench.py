"""OlympiadBench (He et al., 2024) for lm-eval: the authors' prompt and answer scoring, as task functions.

Records have the layout of the Hub dataset Hothan/OlympiadBench (one file per subset, e.g.
``OE_TO_maths_en_COMP``: open-ended, text-only, maths, English, competition): ``question``, ``context``,
``final_answer`` (a list; the first is the reference), ``is_multiple_answer``, ``unit``, ``answer_type``,
``error`` (the numeric tolerance, one per answer when comma-separated) and ``subject`` (maths or physics).

Prompt (the authors' ``Evaluator.make_prompt``, English open-ended problems, zero-shot): an instruction
naming the competition's subject, the expected answer type (none for tuples), how to end the solution
(``So the final answer is \\boxed{...}.``, the unit outside the box), then the question; physics
problems put their ``context`` before the question. Scoring (the authors' ``judge.py``): the text after
the last "So the final answer is" (the whole reply when there is none) is compared with the reference by
:func:`quantbench.evaluate.answer_check.answers_match`, with the record's tolerance (none for tuples).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from quantbench.evaluate.answer_check import DEFAULT_TOLERANCE, answers_match
from quantbench.util.errors import QuantbenchError

SUBJECTS = {"math": "Math", "phys": "Physics"}  # the record's subject, by its lower-case start -> the prompt's
ANSWER_TYPES = {
    "Numerical": "a numerical value",
    "Expression": "an expression",
    "Equation": "an equation",
    "Interval": "an interval",
}
UNSTATED_TYPES = ("Need_human_evaluate", "Tuple")  # the prompt names no type for these
FINAL_ANSWER = re.compile(r"So the final answer is (.*)")


def doc_to_text(doc: Mapping[str, Any]) -> str:
    """The authors' English prompt for one open-ended problem, then its (context and) question."""
    subject = next((name for start, name in SUBJECTS.items() if str(doc["subject"]).lower().startswith(start)), None)
    if subject is None:
        raise QuantbenchError(
            f"OlympiadBench record {doc.get('id')}: subject {doc['subject']!r} is neither maths nor physics"
        )
    box = "\\boxed{multiple answers connected with commas}" if doc["is_multiple_answer"] else "\\boxed{answer}"
    unit_note = ""
    if doc["unit"]:
        box += "(unit)"
        unit_note = ", note that the unit of the answer should not be included in \\boxed{}"
    instruction = (
        f"The following is an open-ended problem from an International {subject} competition. "
        f"{_answer_type_text(doc)}Please calculate the answer according to the given requirements and the "
        "information provided. Please use LaTeX format to represent the variables and formulas used in the "
        f'solution process and results. Please end your solution with "So the final answer is {box}." and give '
        f"the result explicitly{unit_note}."
    )
    question = doc["question"]
    if subject == "Physics" and doc.get("context"):
        question = f"{doc['context']}\n{question}"
    return f"{instruction}\n{question}"


def _answer_type_text(doc: Mapping[str, Any]) -> str:
    answer_type = doc["answer_type"]
    if any(kind in answer_type for kind in UNSTATED_TYPES):
        return ""
    names = [_type_name(part, doc) for part in answer_type.split(",")]
    if not doc["is_multiple_answer"]:
        return f"The answer of The problem should be {names[0]}. "
    if len(set(names)) == 1:
        return f"The problem has multiple answers, each of them should be {names[0]}. "
    return f"The problem has multiple answers, with the answers in order being {', '.join(names)}. "


def _type_name(answer_type: str, doc: Mapping[str, Any]) -> str:
    head = answer_type.split("-")[0]
    for kind, name in ANSWER_TYPES.items():
        if kind in head:
            return name
    raise QuantbenchError(f"OlympiadBench record {doc.get('id')}: unknown answer type {answer_type!r}")


def doc_to_target(doc: Mapping[str, Any]) -> str:
    return doc["final_answer"][0]


def final_answer_text(reply: str) -> str:
    """What the reply states after its last "So the final answer is" (the whole reply without one)."""
    found = FINAL_ANSWER.findall(reply)
    return found[-1].strip() if found else reply


def tolerances(doc: Mapping[str, Any]) -> float | list[float]:
    """The record's tolerance: its ``error`` (one per answer when comma-separated), none for tuple answers."""
    error = doc.get("error")
    if "Tuple" in doc["answer_type"] or error in (None, ""):
        return DEFAULT_TOLERANCE
    if isinstance(error, str) and "," in error:
        return [float(part) if part.strip() else DEFAULT_TOLERANCE for part in error.split(",")]
    return float(error)


def process_results(doc: Mapping[str, Any], results: list[str]) -> dict[str, float]:
    """lm-eval's per-document score: ``acc`` 1.0 when the reply's final answer matches the reference."""
    matched = answers_match(doc_to_target(doc), final_answer_text(results[0]), tolerances(doc))
    return {"acc": 1.0 if matched else 0.0}
