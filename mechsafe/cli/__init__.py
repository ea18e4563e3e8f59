"""The ``mechsafe`` command. Each subcommand lives in its own module of this package.

Errors from bad input (:class:`~mechsafe.errors.MechsafeError`) print one line to stderr and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from mechsafe.errors import MechsafeError

SUBCOMMANDS = (
    "mechsafe.cli.cache",
    "mechsafe.cli.probe_bench",
    "mechsafe.cli.sae",
    "mechsafe.cli.evaluate",
    "mechsafe.cli.refusal_direction",
    "mechsafe.cli.align",
    "mechsafe.cli.data",
    "mechsafe.cli.snip",
    "mechsafe.cli.prune_study",
    "mechsafe.cli.attack",
    "mechsafe.cli.drift",
    "mechsafe.cli.warp",
    "mechsafe.cli.mfs",
    "mechsafe.cli.report",
)
"""Modules defining subcommands; each has ``register(subparsers)`` that sets ``func``."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mechsafe", description="Mechanistic-interpretability tools for LLM safety.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except MechsafeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
