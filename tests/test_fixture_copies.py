"""The repository's copies of ../shared's fixtures are the same bytes, so tests that use the copies test what they
would test on ../shared (conftest.py's ``dense_model_dir``, ``sharegpt_file`` and ``book_chunks_file``)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_dense_model_is_the_shared_fixture(dense_model_dir: Path, shared_dir: Path) -> None:
    shared = shared_dir / "models" / "tinyqwen3-dense"
    names = sorted(p.name for p in shared.iterdir())
    assert sorted(p.name for p in dense_model_dir.iterdir() if p.name != "SHA256SUMS") == names
    assert {n: _sha256(dense_model_dir / n) for n in names} == {n: _sha256(shared / n) for n in names}
    recorded = dict(reversed(line.split()) for line in (dense_model_dir / "SHA256SUMS").read_text().splitlines())
    assert recorded == {n: _sha256(shared / n) for n in names}


def test_calibration_sets_are_the_shared_files(sharegpt_file: Path, book_chunks_file: Path, shared_dir: Path) -> None:
    calib = shared_dir / "data" / "calib"
    for copy in (sharegpt_file, sharegpt_file.with_name("sharegpt_gpt4-qwen3_a22B_output.jsonl")):
        assert copy.read_bytes() == (calib / copy.name).read_bytes(), copy.name
    chunks = book_chunks_file.read_bytes().splitlines(keepends=True)
    every_9th = (calib / "gutenberg_heldout.jsonl").read_bytes().splitlines(keepends=True)[::9]
    assert len(chunks) == 64 and chunks == every_9th[:64]  # rows 0, 9, ..., 567 (resources/README.md)
