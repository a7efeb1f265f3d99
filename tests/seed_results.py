"""Helpers for tests that run the seed workflow's last rules on results made from a long-format CSV."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = REPO / "resources" / "published" / "seed_tables.csv"


def published_cells(path: Path = PUBLISHED) -> list[dict[str, str]]:
    """The rows (table, model, scheme, benchmark, value) of a long-format CSV."""
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def seed_workdir(tmp_path: Path, scores: dict[tuple[str, str, str], float]) -> Path:
    """A working directory for config/seed.yaml whose evaluation results are ``scores``.

    ``scores`` maps (model, scheme, benchmark) to a value; one result JSON is written per entry, and every
    other cell of the tables is listed under its model's ``skip``, so the tables, the comparison and the
    docs page can be made from these results alone (``--allowed-rules``).
    """
    shutil.copytree(REPO / "config", tmp_path / "config")
    (tmp_path / "resources").symlink_to(REPO / "resources")
    (tmp_path / "docs").mkdir()
    for name in ("conf.py", "index.md", "fidelity.md"):
        shutil.copy(REPO / "docs" / name, tmp_path / "docs" / name)
    path = tmp_path / "config" / "seed.yaml"
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    for table in config["tables"]:
        for model in table["models"]:
            entry = config["models"][model]
            for scheme in entry["schemes"]:
                for bench in table["benchmarks"]:
                    key = (model, scheme, bench)
                    if key in scores:
                        out = tmp_path / "results" / "evals" / model / scheme / f"{bench}.json"
                        out.parent.mkdir(parents=True, exist_ok=True)
                        record = {"model": model, "scheme": scheme, "benchmark": bench, "score": scores[key]}
                        out.write_text(json.dumps(record), encoding="utf-8")
                    else:
                        entry.setdefault("skip", []).append({"scheme": scheme, "benchmark": bench})
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return tmp_path
