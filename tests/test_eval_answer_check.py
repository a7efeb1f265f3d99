"""OlympiadBench's answer check (quantbench.evaluate.answer_check) on hand-worked cases.

Each case states the reference (as the dataset prints final_answer), the model's answer, the tolerance and
the verdict worked out by hand from the authors' rules (github OpenBMB/OlympiadBench, eval/
auto_scoring_judge.py); the comment says which rule decides it.
"""

from __future__ import annotations

import math

import pytest

from quantbench.evaluate.answer_check import answers_match, normalize

CASES = [
    # numbers: |reference - answer| <= tolerance * 1.01
    ("$9$", "9.05", 0.1, True),  # 0.05 <= 0.101
    ("$9$", "9.5", 0.1, False),  # 0.5 > 0.101
    ("$0.25$", "0.2500000001", 1e-8, True),  # 1e-10 <= 1.01e-8
    ("$0.25$", "0.251", 1e-8, False),
    # the reference also read as a percentage (x/100, 100x); the answer's % sign is dropped
    ("$0.35$", "35", 1e-8, True),
    ("$0.35$", "35%", 1e-8, True),
    ("$0.35$", "3.5", 1e-8, False),
    # numbers written as LaTeX expressions: both evaluated, then the tolerance
    ("$0.25$", r"\frac{1}{4}", 1e-8, True),
    (r"$7.2 \times 10^{3}$", "7150", 100, True),  # |7200 - 7150| = 50 <= 101
    (r"$7.2 \times 10^{3}$", "7150", 10, False),  # 50 > 10.1
    (r"$2 \pi$", "6.2832", 1e-4, True),  # pi read as 3.14159...: |6.283185 - 6.2832| = 1.5e-5
    (r"$2 \pi$", "6.2832", 1e-6, False),
    # the answer part: every \boxed{}, else the $...$ of the last line; units outside the box
    ("$12$", r"So the final answer is $\boxed{12}$.", 1e-8, True),
    ("$0.64$", r"\boxed{0.64} N", 1e-8, True),
    ("$0.64$", "0.64 N", 1e-8, False),  # N is a free symbol, the reference has none
    ("$24$", "The count is\n$24$", 1e-8, True),
    # several answers: split at top-level commas, paired in any order, counts must agree
    ("$-2, 3$", r"\boxed{3}, \boxed{-2}", 1e-8, True),
    ("$-2, 3$", r"\boxed{3}", 1e-8, False),
    (r"$1+\sqrt{2}, 1-\sqrt{2}$", r"1 \pm \sqrt{2}", 1e-8, True),  # \pm gives both answers
    ("$3000, 0.002$", "0.001, 3010", [20, 1e-3], True),  # one tolerance per reference answer
    ("$3000, 0.002$", "0.001, 3010", [5, 1e-3], False),  # |3000 - 3010| = 10 > 5.05
    # intervals: same brackets, equal end points; unions piece by piece; "x \in" dropped
    ("$(0,4)$", r"\left(0, 4\right)", 1e-8, True),
    ("$(0,4)$", "[0,4)", 1e-8, False),
    (r"$(-\infty, 2]$", r"x \in (-\infty,2]", 1e-8, True),
    (r"$(-\infty,-1)\cup(1,+\infty)$", r"(-\infty,-1)\cup(1,\infty)", 1e-8, True),
    # tuples stay one answer: the comma sits inside brackets
    ("$(3,2)$", r"\boxed{(3,2)}", 1e-8, True),
    ("$(3,2)$", r"\boxed{(2,3)}", 1e-8, False),
    # expressions with free symbols: simplified difference below 1e-3
    (r"$n+1$", r"\boxed{1+n}", 1e-8, True),
    (r"$\frac{x+1}{2 y}$", r"\frac{x}{2y}+\frac{1}{2y}", 1e-8, True),
    (r"$\frac{x+1}{2 y}$", r"\frac{x}{2y}", 1e-8, False),
    (r"$\frac{1}{2} k x^{2}$", r"\boxed{\frac{k x^2}{2}}", 1e-8, True),
    # a variable name before "=" is dropped; two equations are compared as equations
    ("$x=1$", "1", 1e-8, True),
    ("$x=1$", "x=2", 1e-8, False),
    ("$x^2+y^2=1$", "1-x^2-y^2=0", 1e-8, True),  # lhs - rhs differ by the factor -1
    ("$x^2+y^2=1$", "2x^2+2y^2=2", 1e-8, True),  # factor 2
    ("$x^2+y^2=1$", "x^2-y^2=1", 1e-8, False),
    # a power too large to evaluate is not equal (and does not hang)
    ("$10^{10^{10^{10}}}$", "10^{10}", 1e-8, False),
    # an unclosed box is no answer
    ("$12$", r"\boxed{12", 1e-8, False),
]


@pytest.mark.parametrize(("reference", "answer", "tolerance", "expected"), CASES)
def test_hand_worked_cases(reference: str, answer: str, tolerance, expected: bool) -> None:
    assert answers_match(reference, answer, tolerance) is expected


def test_normalize_keeps_only_the_answer() -> None:
    assert normalize(r"So the final answer is $\boxed{\frac{1}{2}}$ m.") == r"\frac{1}{2}"
    assert normalize(r"\boxed{3}, \boxed{-2}") == "3,-2"
    assert normalize(r"the speed is $v \approx 3 \mathrm{~m/s}$") == "v = 3 m/s"
    assert normalize(r"$\angle A=30^\circ$") == r"\angle A=30"
    assert math.isclose(float(normalize("$0.5$.")), 0.5)
