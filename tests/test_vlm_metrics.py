"""DocVQA ANLS, ChartQA relaxed accuracy and MMMU answer parsing against hand-computed values."""

from __future__ import annotations

import random

import pytest

from quantbench.evaluate.vqa_metrics import (
    anls,
    levenshtein,
    mmmu_correct,
    mmmu_score,
    option_letters,
    parse_multi_choice,
    parse_open,
    relaxed_correctness,
)


def test_levenshtein_counts_single_character_edits() -> None:
    assert levenshtein("kitten", "sitting") == 3  # k->s, e->i, +g
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0
    assert levenshtein("flaw", "lawn") == 2


@pytest.mark.parametrize(
    ("prediction", "references", "expected"),
    [
        ("Hello  World", ["hello world"], 1.0),  # case and whitespace runs do not count
        ("hello wrld", ["hello world"], 1 - 1 / 11),  # one deletion over the longer length 11
        ("abcd", ["abxy"], 0.5),  # similarity exactly at the threshold is kept
        ("abc", ["axy"], 0.0),  # 1 - 2/3 = 0.33 < 0.5 scores nothing
        ("1984", ["1985", "in 1984"], 0.75),  # best reference: 1 - 1/4 (the other gives 1 - 3/7)
        ("Totl  ", ["total"], 1 - 1 / 6),  # lmms-eval divides by the length as given (6), not normalized (4)
        ("", [""], 1.0),
    ],
)
def test_anls_known_values(prediction: str, references: list[str], expected: float) -> None:
    assert anls(prediction, references) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("prediction", "target", "expected"),
    [
        ("10.4", "10", True),  # 4% off
        ("10.5", "10", True),  # exactly 5% off
        ("10.6", "10", False),  # 6% off
        ("-0.97", "-1", True),  # relative to |target|
        ("5%", "0.05", True),  # a percentage reads as its fraction
        ("5", "0.05", False),  # ... but a bare 5 does not
        ("0", "0", True),  # a zero target needs the exact string
        ("0.01", "0", False),
        ("Yes", "yes", True),  # non-numeric: case-insensitive exact match
        ("yes.", "yes", False),
        ("1,000", "1000", False),  # not a float: compared as strings
    ],
)
def test_relaxed_correctness_known_values(prediction: str, target: str, expected: bool) -> None:
    assert relaxed_correctness(prediction, target) is expected


OPTIONS = option_letters(["green pear", "red apple", "blue whale", "yellow sun"])


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("(B) because apples are red", "B"),  # bracketed letter
        ("The answer is C.", "C"),  # trailing period stripped, then "C "
        ("D.", "D"),
        ("A.The rest", "A"),  # "A." with no space after
        ("Not (A); the correct option is (C)", "C"),  # several bracketed: the last mention wins
        ("I believe the correct one is the red apple here", "B"),  # > 5 words: option text
        ("blue whale", None),  # option text in 5 words or fewer is not looked for: random letter
    ],
)
def test_parse_multi_choice_representative_outputs(response: str, expected: str | None) -> None:
    picked = parse_multi_choice(response, OPTIONS, random.Random(42))
    if expected is not None:
        assert picked == expected
    else:
        assert picked == "A"  # random.Random(42).choice("ABCD") on the first draw


def test_parse_multi_choice_fallback_is_seeded_and_advances() -> None:
    rng = random.Random(42)
    draws = [parse_multi_choice("no idea", OPTIONS, rng) for _ in range(6)]
    assert draws == [parse_multi_choice("no idea", OPTIONS, r) for r in [random.Random(42)] for _ in range(6)]
    assert len(set(draws)) > 1 and set(draws) <= set("ABCD")


def test_parse_open_extracts_key_phrases_and_numbers() -> None:
    # tails "is 3,000" ("answer ") and "3,000" ("is "): the shorter, a number; in it the numbers 3,000 and
    # (the simple pattern, stopping at the comma) 000
    assert parse_open("The answer is 3,000.") == [3000.0, 0.0]
    assert parse_open("So the capital is Paris") == ["paris"]
    assert parse_open("x = 2.5\ny = 7") == [7.0]  # only the last line accepts "=" as an indicator
    assert mmmu_correct("open", "3000", parse_open("The answer is 3,000."))
    assert mmmu_correct("open", ["Paris", "paris, france"], parse_open("So the capital is Paris"))
    assert not mmmu_correct("open", "Rome", parse_open("So the capital is Paris"))
    assert mmmu_correct("open", "2.50", parse_open("therefore the ratio is 2.5"))  # numbers compare as floats
    assert not mmmu_correct("open", "a", parse_open("the answer is b"))  # one letter is padded: " a", "a "


def test_mmmu_score_multiple_choice_and_open() -> None:
    options = ["green pear", "red apple", "blue whale", "yellow sun"]
    rng = random.Random(42)
    assert mmmu_score("multiple-choice", "(B)", "B", options, rng)
    assert not mmmu_score("multiple-choice", "Answer: C", "B", options, rng)
    assert mmmu_score("open", "The result is 12.", "12", [], rng)
