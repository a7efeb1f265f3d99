"""The ``quantbench`` command line: one argparse subcommand per pipeline step.

Each subcommand is a pair of functions: ``_add_<name>(subparsers)`` declares its arguments and
sets ``handler``, and ``_run_<name>(args) -> int`` does the work through the library. To add a
subcommand, write that pair and list the ``_add_`` function in ``SUBCOMMANDS``. Errors a user can
cause (``QuantbenchError``) print ``error: <message>`` to stderr and exit with status 2.
Handlers import the library lazily, so a light subcommand never loads torch.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from quantbench import __version__
from quantbench.errors import QuantbenchError


def _add_tabulate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tabulate",
        help="render eval-rst, CSV and Markdown tables from a long-format results CSV",
        description="Write <table>.rst, <table>.csv and <table>.md for every table of a CSV with the "
        "columns table, model, scheme, benchmark, value ('-' = missing). Tables, models, schemes and "
        "benchmarks keep their first-seen order.",
    )
    parser.add_argument("--from-csv", type=Path, required=True, metavar="FILE", help="long-format results CSV")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory for the table files")
    parser.set_defaults(handler=_run_tabulate)


def _run_tabulate(args: argparse.Namespace) -> int:
    from quantbench.tables import load_long_csv, write_tables

    for path in write_tables(load_long_csv(args.from_csv), args.out):
        print(path)
    return 0


SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (_add_tabulate,)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand of ``SUBCOMMANDS`` registered."""
    parser = argparse.ArgumentParser(prog="quantbench", description="Reproduce LLM quantization benchmark tables.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; return its exit status (2 for a user error)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.handler(args)
    except QuantbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
