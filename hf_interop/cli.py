"""The `hf-interop` command line.

Each subcommand parses its options, validates them before any model is loaded, and calls the same Python API
a user would. Exit codes: 0 success, 2 bad input (argparse and our own checks), 1 any other failure.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2

# subcommand name -> function(subparsers) that adds it and sets `handler`
_SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {}


def subcommand(name: str) -> Callable:
    def register(add_parser: Callable[[argparse._SubParsersAction], None]) -> Callable:
        _SUBCOMMANDS[name] = add_parser
        return add_parser

    return register


@subcommand("demo")
def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="Run the walk-through on the embedded default (SmolLM2-135M teacher, builtin corpus).",
        description="Run the walk-through on the embedded default: no arguments needed.",
    )
    parser.add_argument(
        "--output_dir", default="demo_outputs", help="Where outputs are written (default: %(default)s)."
    )
    parser.add_argument("--no_progress", action="store_true", help="Hide progress bars.")

    def handler(args: argparse.Namespace) -> int:
        from .demo import DemoSettings, run_demo

        run_demo(DemoSettings(output_dir=args.output_dir, show_progress=not args.no_progress))
        return EXIT_OK

    parser.set_defaults(handler=handler)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-interop",
        description="Make language-model checkpoints work together: distil, adapt, ensemble, merge.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for add_parser in _SUBCOMMANDS.values():
        add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"hf-interop {args.command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"hf-interop {args.command}: interrupted", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
