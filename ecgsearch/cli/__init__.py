"""`ecgsearch` command line. Argument parsing lives here and nowhere else.

Each submodule owns its subcommands: it defines `register(subparsers)` which adds
parsers whose `func` default takes the parsed namespace and returns an exit code.
"""
from __future__ import annotations

import argparse
import importlib
import signal
import sys

# Order is the order shown in --help.
_MODULES = ("data", "train", "tune", "rle")


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit code 2."""


def load_runtime_env(path: str | None) -> dict:
    """A Ray runtime_env from a YAML or JSON file (`--runtime-env`), used when joining a cluster."""
    if not path:
        return {}
    import json
    from pathlib import Path

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"--runtime-env {path}: cannot read it ({exc.strerror})") from None
    if path.endswith((".yaml", ".yml")):
        import yaml

        env = yaml.safe_load(text)
    else:
        env = json.loads(text)
    if not isinstance(env, dict):
        raise ValueError(f"--runtime-env {path}: must hold a mapping (working_dir, env_vars, ...)")
    return env


def sigterm_as_interrupt(signum, frame):
    """SIGTERM handler: `ray job stop` sends SIGTERM; handle it like Ctrl-C so Tune stops its
    trials in order, MLflow runs end KILLED and saved state keeps finished work for --resume."""
    if callable(signal.getsignal(signal.SIGINT)):
        signal.raise_signal(signal.SIGINT)
    else:
        # SIGINT is ignored (a background job of a non-interactive shell): stop directly.
        raise KeyboardInterrupt("SIGTERM")


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
