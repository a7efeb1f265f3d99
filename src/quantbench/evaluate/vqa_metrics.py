"""Scores of the vision-language benchmarks, as lmms-eval computes them: DocVQA ANLS, ChartQA relaxed accuracy, MMMU accuracy.

- :func:`anls`: Average Normalized Levenshtein Similarity of one prediction against its references.
  Answers are compared lower-cased with whitespace runs collapsed; the distance is divided by the longer
  of the two strings *as given* (lmms-eval's denominator, before normalization). The best reference
  counts; a similarity below ``threshold`` (0.5) scores 0.
- :func:`relaxed_correctness`: ChartQA's relaxed accuracy. When both strings read as numbers (a trailing
  ``%`` divides by 100) and the target is non-zero, a relative error of at most 5% is correct; otherwise
  the strings must match case-insensitively.
- MMMU: :func:`parse_multi_choice` turns a free-form answer into an option letter (``(B)``, ``B``, ``B.``,
  then the option's text in answers longer than five words; the last mention wins; nothing found is a
  seeded random letter), :func:`parse_open` into candidate strings and numbers, and :func:`mmmu_correct`
  judges either against the gold answer. Accuracy is the mean over items.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence

ANLS_THRESHOLD = 0.5
RELAXED_TOLERANCE = 0.05
MMMU_SEED = 42  # lmms-eval seeds Python's random with 42 before parsing


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _squash(text: str) -> str:
    return " ".join(text.strip().lower().split())


def anls(prediction: str, references: Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """ANLS of ``prediction`` against ``references`` (module docstring); in [0, 1]."""
    if not references:
        raise ValueError("ANLS needs at least one reference answer")
    distances = []
    for reference in references:
        length = max(len(reference), len(prediction))
        distances.append(0.0 if length == 0 else levenshtein(_squash(reference), _squash(prediction)) / length)
    score = 1.0 - min(distances)
    return score if score >= threshold else 0.0


def _as_number(text: str) -> float | None:
    try:
        return float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction: str, target: str, tolerance: float = RELAXED_TOLERANCE) -> bool:
    """ChartQA's relaxed match of ``prediction`` to ``target`` (module docstring)."""
    predicted, expected = _as_number(prediction), _as_number(target)
    if predicted is not None and expected:
        return abs(predicted - expected) / abs(expected) <= tolerance
    return prediction.lower() == target.lower()


def option_letters(options: Sequence[str]) -> dict[str, str]:
    """``{"A": options[0], "B": options[1], ...}``."""
    return {chr(ord("A") + i): option for i, option in enumerate(options)}


def parse_multi_choice(response: str, options: Mapping[str, str], rng: random.Random) -> str:
    """The option letter a free-form ``response`` picks among ``options`` (letter -> text)."""
    letters = list(options)
    for char in ",.!?;:'":  # one character after the other, as the MMMU evaluation strips
        response = response.strip(char)
    response = f" {response} "
    candidates = [c for c in letters if f"({c})" in response]
    bracketed = bool(candidates)
    if not candidates:
        candidates = [c for c in letters if f"{c} " in response]
    if not candidates:
        candidates = [c for c in letters if f"{c}." in response]
    by_text = False
    if not candidates and len(response.split()) > 5:
        candidates = [c for c, text in options.items() if text.lower() in response.lower()]
        by_text = bool(candidates)
    if not candidates:
        return rng.choice(letters)
    if len(candidates) == 1:
        return candidates[0]
    if by_text:
        positions = [response.lower().rfind(options[c].lower()) for c in candidates]
    elif bracketed:
        positions = [response.rfind(f"({c})") for c in candidates]
    else:
        positions = [response.rfind(f" {c} ") for c in candidates]
    return candidates[positions.index(max(positions))]


_NUMBER_PATTERNS = (
    r"-?\b\d{1,3}(?:,\d{3})+\b",  # 1,234,567
    r"-?\d+(?:\.\d+)?[eE][+-]?\d+",  # 1.5e-3
    r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])",  # 12, 3.5, .5
)
_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_TRIVIAL = {":", ",", ".", "!", "?", ";", "'"}


def _normalize(text: str) -> list[str | float]:
    """A number (commas dropped, rounded to 2 decimals), or the lower-cased string (one letter padded by a space)."""
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        pass
    text = text.lower()
    return [f" {text}", f"{text} "] if len(text) == 1 else [text]


def _key_responses(response: str) -> list[str]:
    """The tails of the sentences after an answer indicator ("is ", "therefore ", "=" in the last)."""
    response = response.strip().strip(".").lower()
    sentences = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys = []
    for index, sentence in enumerate(sentences):
        indicators = _KEY_INDICATORS + (("=",) if index == len(sentences) - 1 else ())
        tails = [sentence.split(indicator)[-1].strip() for indicator in indicators if indicator in sentence]
        if tails:
            shortest = min(tails, key=len)
            if shortest.strip() not in _TRIVIAL:
                keys.append(shortest)
    return keys or [response]


def parse_open(response: str) -> list[str | float]:
    """Candidate answers of an open question's ``response``: key phrases and the numbers in them, normalized."""
    keys = _key_responses(response)
    found = list(keys)
    for key in keys:
        for pattern in _NUMBER_PATTERNS:
            found.extend(re.findall(pattern, key))
    candidates: list[str | float] = []
    for item in found:
        for value in _normalize(item):
            if value not in candidates:
                candidates.append(value)
    return candidates


def mmmu_correct(question_type: str, gold: str | Sequence[str], parsed: str | Sequence[str | float]) -> bool:
    """Whether a parsed MMMU answer is right: the same letter, or (open) a gold string inside a candidate or an equal number."""
    golds = [gold] if isinstance(gold, str) else list(gold)
    if question_type == "multiple-choice":
        return parsed in golds
    normalized = [value for answer in golds for value in _normalize(answer)]
    for candidate in parsed:
        if isinstance(candidate, str):
            if any(isinstance(answer, str) and answer in candidate for answer in normalized):
                return True
        elif candidate in normalized:
            return True
    return False


def mmmu_score(
    question_type: str, response: str, gold: str | Sequence[str], options: Sequence[str], rng: random.Random
) -> bool:
    """Parse ``response`` as the MMMU evaluation does and judge it (``options`` for multiple choice)."""
    if question_type == "multiple-choice":
        return mmmu_correct(question_type, gold, parse_multi_choice(response, option_letters(options), rng))
    return mmmu_correct(question_type, gold, parse_open(response))
