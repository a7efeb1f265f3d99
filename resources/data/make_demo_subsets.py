"""Rebuild the demo benchmark subsets in this folder from the full files (../shared/data).

Usage: python resources/data/make_demo_subsets.py ../shared/data resources/data

Rows are copied byte for byte (whole JSONL lines). The selection rules (also in README.md):
- C-Eval: the 4 subjects whose 5-shot examples (their first 5 dev rows) are shortest (characters of
  question and choices; Chinese text costs this byte-level tokenizer ~2 tokens a character, and a short
  prompt keeps the CPU demo fast), in file order; val: the first 5 rows of each; dev: every dev row of
  those subjects (5 each).
- MMLU: the first 4 subjects in file order; test: the first 5 rows of each; dev: every dev row of those
  subjects (5 each; the 4-shot examples are a subject's first 4).
- GSM8K: test rows 0-19; train: the rows lm-eval's default few-shot sampler draws for them (seed 1234,
  one random.Random.sample of 5 over the 7,473 train rows per test item, in order).
- HumanEval: problems 0-19.
- WikiText-2: the first test rows whose "\\n\\n"-join reaches 40,000 characters (>= 16 windows of 512
  tokens with the demo model's tokenizer).
subsets.json records, per file, the source file, its sha256, its row count and the rows copied.
Standard library only, so it runs without the project installed.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

SUBJECTS = 4
PER_SUBJECT = 5
ITEMS = 20
GSM8K_SHOTS = 5
CEVAL_SHOTS = 5
FEWSHOT_SEED = 1234
WIKITEXT_CHARS = 40_000


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _field(line: bytes, key: str):
    return json.loads(line)[key]


def _by_subject(lines: list[bytes], subjects: list[str], first: int | None) -> list[int]:
    rows: list[int] = []
    for subject in subjects:
        mine = [i for i, line in enumerate(lines) if _field(line, "subject") == subject]
        rows += mine[:first] if first is not None else mine
    return rows


def _shots_chars(dev: list[bytes], subject: str) -> int:
    rows = [json.loads(line) for line in dev if _field(line, "subject") == subject][:CEVAL_SHOTS]
    return sum(len(r["question"]) + sum(len(r[c]) for c in "ABCD") for r in rows)


def select(shared: Path) -> dict[str, list[int]]:
    """Relative file -> the 0-based rows of the full file that the demo subset keeps, in order."""
    picks: dict[str, list[int]] = {}
    for bench, eval_split in (("ceval", "val"), ("mmlu", "test")):
        lines = _lines(shared / bench / f"{eval_split}.jsonl")
        dev = _lines(shared / bench / "dev.jsonl")
        subjects = list(dict.fromkeys(_field(line, "subject") for line in lines))
        if bench == "ceval":
            shortest = sorted(subjects, key=lambda s: (_shots_chars(dev, s), s))[:SUBJECTS]
            subjects = [s for s in subjects if s in shortest]
        subjects = subjects[:SUBJECTS]
        picks[f"{bench}/{eval_split}.jsonl"] = _by_subject(lines, subjects, PER_SUBJECT)
        picks[f"{bench}/dev.jsonl"] = _by_subject(dev, subjects, None)
    picks["gsm8k/test.jsonl"] = list(range(ITEMS))
    train_rows = len(_lines(shared / "gsm8k" / "train.jsonl"))
    rnd = random.Random(FEWSHOT_SEED)
    drawn = {row for _ in range(ITEMS) for row in rnd.sample(range(train_rows), GSM8K_SHOTS)}
    picks["gsm8k/train.jsonl"] = sorted(drawn)
    picks["humaneval/test.jsonl"] = list(range(ITEMS))
    texts: list[str] = []
    for line in _lines(shared / "wikitext2" / "test.jsonl"):
        if len("\n\n".join(texts)) >= WIKITEXT_CHARS:
            break
        texts.append(_field(line, "text"))
    picks["wikitext2/test.jsonl"] = list(range(len(texts)))
    return picks


def build(shared: Path, out: Path) -> None:
    """Write every subset file and subsets.json under ``out``."""
    manifest = {}
    for rel, rows in select(shared).items():
        source = shared / rel
        lines = _lines(source)
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"".join(lines[i] for i in rows))
        manifest[rel] = {
            "source": rel,
            "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
            "source_rows": len(lines),
            "sha256": hashlib.sha256(target.read_bytes()).hexdigest(),
            "rows": rows,
        }
    (out / "subsets.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    build(Path(sys.argv[1]), Path(sys.argv[2]))
