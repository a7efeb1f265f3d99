"""The quantization-benchmark docs page: a MyST Markdown page built from rendered eval-rst tables.

The page has the published page's structure (``../shared/seed/000_*.txt``): a ``#`` title, then per
table a ``##`` section with its caption and the table in an ``{eval-rst}`` fence. A table's note, if
any, follows its fence as a ``{note}`` admonition, and page-wide notes close the page under
``## Notes``. The tables are the ``<table>.rst`` files :func:`quantbench.report.tables.write_tables` writes,
embedded byte for byte, so the page shows exactly what the workflow rendered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from quantbench.util.errors import QuantbenchError
from quantbench.util.io import atomic_write_text

FENCE = "```"


@dataclass(frozen=True)
class PageSection:
    """One table's section: its title, the caption above the table, the eval-rst table, an optional note."""

    title: str
    caption: str
    table_rst: str
    note: str = ""

    def __post_init__(self) -> None:
        if not self.table_rst.startswith(".. table::"):
            raise QuantbenchError(
                f"section {self.title!r}: the table is not an eval-rst '.. table::' block; "
                "pass the text of a <table>.rst file written by quantbench.report.tables"
            )
        if FENCE in self.table_rst or FENCE in self.note:
            raise QuantbenchError(f"section {self.title!r}: a table or note may not contain {FENCE}")


def _fenced(directive: str, body: str) -> list[str]:
    return [f"{FENCE}{{{directive}}}", body.rstrip("\n"), "", FENCE]


def render_page(title: str, sections: Sequence[PageSection], notes: Sequence[str] = ()) -> str:
    """The page's Markdown text (ending in a newline)."""
    if not sections:
        raise QuantbenchError("the docs page needs at least one table section")
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        if section.caption:
            lines += [section.caption.strip(), ""]
        lines += _fenced("eval-rst", section.table_rst)
        if section.note:
            lines += ["", *_fenced("note", section.note.strip())]
        lines.append("")
    if notes:
        lines += ["## Notes", ""] + [f"- {note.strip()}" for note in notes] + [""]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_page(path: str | Path, title: str, sections: Sequence[PageSection], notes: Sequence[str] = ()) -> Path:
    """Render the page and write it to ``path`` atomically."""
    return atomic_write_text(path, render_page(title, sections, notes))
