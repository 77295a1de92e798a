"""`ecgsearch` command line. Argument parsing lives here and nowhere else.

Each submodule owns its subcommands: it defines `register(subparsers)` which adds
parsers whose `func` default takes the parsed namespace and returns an exit code.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Order is the order shown in --help.
_MODULES = ("data", "train", "tune", "rle")


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ecgsearch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _MODULES:
        mod = importlib.import_module(f"ecgsearch.cli.{name}")
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, FileNotFoundError, KeyError) as exc:
        # Data and config errors carry the record or setting in their message.
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"ecgsearch {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
