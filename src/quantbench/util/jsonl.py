"""Reading JSON Lines files (calibration sets, image-text records) with errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from quantbench.util.errors import QuantbenchError


def iter_jsonl(path: str | Path, what: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line of the JSONL file ``path``, read as consumed.

    ``what`` names the file in errors ("calibration file"): a missing file, a line that is not a JSON
    object and a file without records are :class:`QuantbenchError` naming the path (and line).
    """
    path = Path(path)
    if not path.is_file():
        raise QuantbenchError(f"{what} {path} does not exist")
    found = False
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise QuantbenchError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise QuantbenchError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            found = True
            yield lineno, record
    if not found:
        raise QuantbenchError(f"{what} {path} has no records")
