"""Whether a model's final answer equals a reference answer, as OlympiadBench's authors define it.

The rules are those of the authors' automated scoring pipeline (github OpenBMB/OlympiadBench,
``eval/auto_scoring_judge.py``, the same rules as ``inference/code/math_judger.py``), implemented here
from their description and behaviour:

* Both answers are normalised: the contents of every ``\\boxed{...}`` (joined with commas), else the
  ``$...$`` parts of the last line, else the whole text; the part after ``\\in ``; ``\\left``/``\\right``,
  ``$`` and ``%`` dropped, ``\\approx``/``\\simeq``/``\\sim`` read as ``=``, primes and degree signs
  simplified; leading and trailing punctuation stripped; ``\\mathrm{x}``/``\\mathbf{x}`` read as ``x``.
* Equal texts match. Otherwise both are split at top-level commas (``\\pm`` gives two answers) and every
  reference answer must be paired with a distinct, equal predicted one; the counts must agree.
* Two single answers are equal when they are the same text; or both are intervals with the same brackets
  whose end points are equal expressions (unions compared piece by piece); or both are numbers within the
  tolerance (the reference may also be read as a percentage: x/100 or 100x); or, unless both are
  equations, the right-hand sides are equal expressions (``\\pi`` read as its value; numbers within the
  tolerance, expressions with free symbols when their simplified difference is below 1e-3); or both are
  equations whose ``lhs - rhs`` are integer multiples of each other.

The tolerance is per reference answer (the dataset's ``error`` field; 1e-8 when it has none) and is
compared with a 1 % margin, as the authors do. Anything that fails to parse is simply not equal.
Deliberate departure: the authors visit the reference answers in a rotating order when pairing them; here
each reference answer, in order, takes the first equal predicted answer not yet taken (the same pairs
whenever an answer equals only one of the others).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from quantbench.util.errors import QuantbenchError

DEFAULT_TOLERANCE = 1e-8
_MARGIN = 1.01  # the authors compare |difference| <= tolerance * 1.01
_SYMBOLIC_TOLERANCE = 1e-3  # |simplified difference| of expressions with free symbols
_MAX_EXPONENT = 1000  # powers with larger numeric exponents are not evaluated
_REPLACEMENTS = (
    ("\\left", ""),
    ("\\right", ""),
    ("∶", ":"),
    ("，", ","),
    ("$", ""),
    ("\\approx", "="),
    ("\\simeq", "="),
    ("\\sim", "="),
    ("^\\prime", "'"),
    ("^{\\prime}", "'"),
    ("^\\circ", ""),
    ("%", ""),
)
_EDGE_CHARS = "\n$,.:;^_=+`!@#$%^&*~，。"
_FONT = re.compile(r"\\(?:mathrm|mathbf)\{~?([^}]*)\}")
_CJK = re.compile(r"[\u4e00-\u9fff]+")
_DOLLARS = re.compile(r"\$(.*?)\$")


def answers_match(reference: str, prediction: str, tolerance: float | Sequence[float] = DEFAULT_TOLERANCE) -> bool:
    """True when ``prediction`` states the same answer(s) as ``reference`` (see the module docstring).

    ``tolerance``: one absolute tolerance for every reference answer, or one per reference answer (a
    missing one is the default).
    """
    try:
        ref, pred = normalize(reference), normalize(prediction)
    except ValueError:  # a \boxed{ that is never closed
        return False
    if ref == pred:
        return True
    ref_items = _expand_plus_minus(_split_top_level(_CJK.sub("", ref)))
    pred_items = _expand_plus_minus(_split_top_level(_CJK.sub("", pred)))
    if len(ref_items) != len(pred_items):
        return False
    tolerances = list(tolerance) if isinstance(tolerance, Sequence) else [tolerance]
    if len(tolerances) <= 1:
        tolerances = tolerances * len(ref_items)
    tolerances += [DEFAULT_TOLERANCE] * (len(ref_items) - len(tolerances))
    unused = list(pred_items)
    for item, tol in zip(ref_items, tolerances):
        match = next((i for i, candidate in enumerate(unused) if _equal(item, candidate, tol)), None)
        if match is None:
            return False
        del unused[match]
    return True


def normalize(text: str) -> str:
    """The answer part of ``text`` with presentation-only LaTeX removed (raises ValueError on an unclosed box)."""
    answer = _answer_part(text)
    if "\\in " in answer:
        answer = answer.split("\\in ")[1]
    for old, new in _REPLACEMENTS:
        answer = answer.replace(old, new)
    return _FONT.sub(r"\1", answer.strip(_EDGE_CHARS))


def _answer_part(text: str) -> str:
    boxed = _boxed_contents(text)
    if boxed:
        return "".join(content + "," for content in boxed)
    last_line = text.strip().split("\n")[-1]
    formulas = _DOLLARS.findall(last_line)
    return "".join(formula + "," for formula in formulas) if formulas else text


def _boxed_contents(text: str) -> list[str]:
    contents = []
    for match in re.finditer(r"\\boxed\{", text):
        depth, end = 1, match.end()
        while depth and end < len(text):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            end += 1
        if depth:
            raise ValueError(f"unclosed \\boxed{{ in {text!r}")
        contents.append(text[match.end() : end - 1])
    return contents


def _split_top_level(text: str) -> list[str]:
    """``text`` split at commas outside () and [] (an interval or a tuple stays one answer)."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    if start < len(text):
        parts.append(text[start:].strip())
    return parts


def _expand_plus_minus(items: list[str]) -> list[str]:
    out = []
    for item in items:
        out += [item.replace("\\pm", "+"), item.replace("\\pm", "-")] if "\\pm" in item else [item]
    return out


def _equal(ref: str, pred: str, tol: float) -> bool:
    if ref == pred and ref != "":
        return True
    if _is_interval(ref) and _is_interval(pred):
        try:
            if _intervals_equal(ref, pred, tol):
                return True
        except ImportError as exc:
            raise _no_parser(exc) from exc
        except Exception:  # noqa: BLE001 - an end point that does not parse: not equal (the authors stop here)
            return False
    for check in (_numbers_equal, _expressions_equal, _equations_equal):
        if check is _expressions_equal and "=" in ref and "=" in pred:
            continue  # two equations are compared as equations
        try:
            if check(ref, pred, tol):
                return True
        except ImportError as exc:
            raise _no_parser(exc) from exc
        except Exception:  # noqa: BLE001 - sympy's and the parser's many failure types: not equal
            pass
    return False


def _no_parser(exc: ImportError) -> QuantbenchError:
    return QuantbenchError(
        f"OlympiadBench's answer check needs sympy's LaTeX parser ({exc}); "
        "install it with pip install antlr4-python3-runtime==4.11"
    )


def _is_interval(text: str) -> bool:
    return text.startswith(("(", "[")) and text.endswith((")", "]"))


def _numbers_equal(ref: str, pred: str, tol: float) -> bool:
    reference, predicted = float(ref), float(pred)
    return any(abs(value - predicted) <= tol * _MARGIN for value in (reference / 100, reference, reference * 100))


def _parse(latex: str):
    from sympy import sympify
    from sympy.parsing.latex import parse_latex

    return sympify(parse_latex(latex))


def _expressions_equal(ref: str, pred: str, tol: float) -> bool:
    import sympy

    a, b = (_parse(text.split("=")[1].strip() if "=" in text else text.strip()) for text in (ref, pred))
    if a == b:
        return True
    pi = _parse("\\pi")  # the parser reads \pi as a symbol named pi
    a, b = a.subs(pi, math.pi), b.subs(pi, math.pi)
    symbolic_a, symbolic_b = a.has(sympy.Symbol), b.has(sympy.Symbol)
    if symbolic_a != symbolic_b:
        return False
    if not symbolic_a:
        if not (_computable(a) and _computable(b)):
            return False
        return bool(abs(a.evalf() - b.evalf()) <= tol * _MARGIN)
    return bool(abs(sympy.simplify(a - b).evalf()) < _SYMBOLIC_TOLERANCE)


def _computable(expr) -> bool:
    """False for a power whose exponent is too large to evaluate (or not a number)."""
    import sympy

    if not isinstance(expr, sympy.Pow):
        return True
    base, exponent = expr.as_base_exp()
    return bool(base.is_number and exponent.is_number and abs(exponent.evalf()) <= _MAX_EXPONENT)


def _equations_equal(ref: str, pred: str, tol: float) -> bool:
    import sympy

    def zero_form(equation: str):
        lhs, rhs = equation.split("=")  # exactly one '=' or this raises
        return sympy.simplify(_parse(lhs) - _parse(rhs))

    a, b = zero_form(ref), zero_form(pred)
    ratios = (sympy.simplify(a / b), sympy.simplify(b / a))
    return any(ratio.is_Integer and ratio != 0 for ratio in ratios)


def _intervals_equal(ref: str, pred: str, tol: float) -> bool:
    if ref == pred:
        return True
    ref_parts, pred_parts = ref.split("\\cup"), pred.split("\\cup")
    if len(ref_parts) != len(pred_parts):
        return False
    for a, b in zip(ref_parts, pred_parts):
        if a[0] != b[0] or a[-1] != b[-1]:
            return False
        ends = zip(a.strip("[]()").split(","), b.strip("[]()").split(","))
        if not all(_expressions_equal(x, y, tol) for x, y in ends):
            return False
    return True
