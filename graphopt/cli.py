"""The `graphopt` command line: parsing, dispatch and error handling.

Each subcommand is a module in `graphopt.commands` exposing `NAME`, `HELP`,
`add_arguments(parser)` and `run(args) -> int`; they are discovered here, so adding a command
never touches this file. Exit codes: 0 success, 1 failure, 2 bad usage or bad input. A user error
prints one line on stderr (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import traceback
from collections.abc import Sequence

import graphopt
from graphopt import commands
from graphopt.errors import GraphoptError


class _Parser(argparse.ArgumentParser):
    """argparse that exits with code 2 and a one-line message (it already does; kept explicit)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"graphopt: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _command_modules() -> list:
    modules = []
    for info in pkgutil.iter_modules(commands.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"graphopt.commands.{info.name}")
        if hasattr(module, "add_arguments") and hasattr(module, "run"):
            modules.append(module)
    order = ["optimize", "analyze", "bench", "run", "models", "demo"]
    return sorted(modules, key=lambda m: (order.index(m.NAME) if m.NAME in order else len(order), m.NAME))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="graphopt",
                     description="Graph-level inference optimizer for ONNX models on CPUs.")
    parser.add_argument("--version", action="version", version=f"graphopt {graphopt.__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in _command_modules():
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks on errors")
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    debug = getattr(args, "debug", False)
    try:
        return int(args._run(args) or 0)
    except GraphoptError as exc:
        if debug:
            traceback.print_exc()
        print(f"graphopt: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("graphopt: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("graphopt: error: out of memory", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: one line by default, the traceback with --debug
        if debug:
            traceback.print_exc()
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"graphopt: internal error: {type(exc).__name__}: {first} (rerun with --debug for "
              "the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
