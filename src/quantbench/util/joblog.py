"""Per-job logging: send a job's log records, warnings and progress bars to its own log file."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def job_log(path: str | Path | None, level: int = logging.INFO) -> Iterator[None]:
    """Within the block, logging and stderr (tqdm, warnings) append to ``path``; a failure is logged there too.

    ``path=None`` logs to stderr (for the CLI).
    """
    root = logging.getLogger()
    old_level = root.level
    root.setLevel(level)
    logging.captureWarnings(True)
    if path is None:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
        try:
            yield
        finally:
            root.removeHandler(handler)
            root.setLevel(old_level)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as stream:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
        try:
            with contextlib.redirect_stderr(stream):
                yield
        except BaseException:
            logging.getLogger("quantbench").exception("job failed")
            raise
        finally:
            root.removeHandler(handler)
            root.setLevel(old_level)
