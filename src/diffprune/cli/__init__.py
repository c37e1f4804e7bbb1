"""``diffprune`` command line: one subcommand per module, each only calling the public API.

Every module in ``SUBCOMMANDS`` defines ``add_parser(subparsers)`` (registering its flags, each with help) and
``run(args) -> int``. Nothing is parsed or imported heavily at import time.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ["prune", "info", "train", "finetune", "sample", "eval", "run", "demo", "config", "cache", "push",
               "export"]


class _Formatter(argparse.HelpFormatter):
    """Every flag's help ends with its default, unless the help states it already or there is none to state."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default == [] or default == argparse.SUPPRESS
                or "default" in text or isinstance(action, argparse._HelpAction)):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """argparse with diffprune's one-line errors (``diffprune: error: ...``, exit 2) instead of usage + error, and
    the defaults in ``--help``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"diffprune: error: {self.prog}: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffprune", description="Structural pruning for diffusion models.")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"diffprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..errors import DiffPruneError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a one-line usage error (already printed)
        return int(e.code or 0)
    try:
        return int(args.func(args) or 0)
    except DiffPruneError as e:
        print(f"diffprune: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permission denied, read-only file system: the system's words, one line
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"diffprune: error: {e.strerror or e}{where}; free disk space or fix the permissions, then run the "
              "command again (outputs are published only when complete; training resumes with --resume)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffprune: interrupted", file=sys.stderr)
        return 130
