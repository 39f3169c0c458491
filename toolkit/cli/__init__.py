"""The command line: ``python -m toolkit SUBCOMMAND ... --json PATH``.

Each subcommand lives in its own module here and registers itself with :func:`subcommand`; every one takes
``--json PATH`` and writes its result there as JSON.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Callable

from toolkit.validation import check_writable_file
from toolkit.vocabulary import strict_json

_SUBCOMMANDS: dict[str, tuple[str, Callable, Callable]] = {}
MODULES = ("info", "warmstart", "tokens", "train", "plan", "predict", "bench", "sweep", "audit")


def subcommand(name: str, help: str):
    """Register ``configure(parser)`` / ``run(args) -> dict`` for a subcommand (decorate ``run``)."""

    def wrap(run: Callable):
        def register(configure: Callable):
            _SUBCOMMANDS[name] = (help, configure, run)
            return configure
        run.configure = register
        return run

    return wrap


def write_json(result, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(strict_json(result), indent=2, default=str, allow_nan=False))


class _Parser(argparse.ArgumentParser):
    """A usage error in one line and a pointer to --help: a subcommand's full usage runs to 60 lines, above the
    error it would bury."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    for module in MODULES:
        try:
            importlib.import_module(f"toolkit.cli.{module}")
        except ModuleNotFoundError as err:
            if err.name != f"toolkit.cli.{module}":
                raise
    parser = _Parser(prog="python -m toolkit", description=__doc__.splitlines()[0])
    subs = parser.add_subparsers(dest="command", required=True)
    parser.subcommand_parsers = {}
    for name, (help_text, configure, _run) in _SUBCOMMANDS.items():
        sub = subs.add_parser(name, help=help_text, description=help_text)
        configure(sub)
        sub.add_argument("--json", metavar="PATH", help="write the result as JSON to PATH")
        parser.subcommand_parsers[name] = sub
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:   # named by the parser they were given to: the subcommand's, unless before its name
            given = list(sys.argv[1:] if argv is None else argv)
            before = given.index(args.command) > given.index(extra[0]) if extra[0] in given else False
            (parser if before else parser.subcommand_parsers[args.command]).error(
                f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exit_:  # argparse has printed the usage error (or --help): report its code, not raise
        return int(exit_.code or 0)
    _help, _configure, run = _SUBCOMMANDS[args.command]
    try:
        if args.json:  # before any work: a long run must not end unable to write its result
            check_writable_file(args.json, "--json")
        result = run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_json(result, args.json)
    return 0
