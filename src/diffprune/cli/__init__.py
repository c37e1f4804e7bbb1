"""``diffprune`` command line: one subcommand per module, each only calling the public API.

Every module in ``SUBCOMMANDS`` defines ``add_parser(subparsers)`` (registering its flags, each with help) and
``run(args) -> int``. Nothing is parsed or imported heavily at import time.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ["prune", "info", "train", "finetune", "sample", "eval", "run", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffprune", description="Structural pruning for diffusion models.")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"diffprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{name}":
                continue  # subcommand not built yet
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..errors import DiffPruneError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DiffPruneError as e:
        print(f"diffprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffprune: interrupted", file=sys.stderr)
        return 130
