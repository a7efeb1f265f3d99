"""The demo subsets in resources/data: byte-for-byte copies of the full files' rows, as recorded."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "resources" / "data"
MANIFEST = json.loads((DEMO / "subsets.json").read_text(encoding="utf-8"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_manifest_covers_every_data_file_with_its_hash_and_rows() -> None:
    shipped = sorted(p.relative_to(DEMO).as_posix() for p in DEMO.rglob("*.jsonl"))
    assert shipped == sorted(MANIFEST)
    readme = (DEMO / "README.md").read_text(encoding="utf-8")
    for rel, entry in MANIFEST.items():
        assert sha256(DEMO / rel) == entry["sha256"]
        assert len((DEMO / rel).read_bytes().splitlines()) == len(entry["rows"])
        assert entry["rows"] == sorted(set(entry["rows"])) and entry["rows"][-1] < entry["source_rows"]
        assert f"| {rel} |" in readme and entry["sha256"] in readme and entry["source_sha256"] in readme
    assert sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file()) < 1_000_000


def test_rows_are_byte_copies_of_the_full_files(shared_dir: Path) -> None:
    for rel, entry in MANIFEST.items():
        source = shared_dir / "data" / entry["source"]
        assert sha256(source) == entry["source_sha256"]
        lines = source.read_bytes().splitlines(keepends=True)
        assert len(lines) == entry["source_rows"]
        assert (DEMO / rel).read_bytes() == b"".join(lines[i] for i in entry["rows"])


def test_selection_script_reproduces_the_recorded_rows(shared_dir: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_demo_subsets", DEMO / "make_demo_subsets.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.select(shared_dir / "data") == {rel: entry["rows"] for rel, entry in MANIFEST.items()}
