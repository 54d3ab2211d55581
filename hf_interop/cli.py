"""The `hf-interop` command line.

Each subcommand parses its options, validates them before any model is loaded, and calls the same Python API
a user would. Exit codes: 0 success, 2 bad input (argparse and our own checks), 1 any other failure.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from .logging_utils import get_logger

logger = get_logger(__name__)

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


@subcommand("compare")
def _add_compare(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="Interoperability report: score 2+ checkpoints on the same text (perplexity, agreement, KL, ensemble).",
        description=(
            "Score two or more causal LMs on the same text: perplexity and bits per byte per model (bits per byte "
            "compare models with different tokenizers), next-token and multiple-choice accuracy, pairwise top-1 "
            "agreement and symmetric KL (models sharing a tokenizer), and the gain of their mixture ensemble over "
            "the best member. Prints a table; with --output_dir also writes report.json, report.md and heatmap.png."
        ),
    )
    parser.add_argument(
        "checkpoints",
        nargs="+",
        metavar="CKPT",
        help="Two or more model folders, .gguf files, hub ids or LoRA adapter folders.",
    )
    parser.add_argument(
        "--dataset",
        default="builtin",
        help="'builtin' (the builtin corpus), a save_to_disk folder, or a .txt/.json/.jsonl/.csv/.parquet file "
        "(default: %(default)s).",
    )
    parser.add_argument(
        "--split",
        default="validation",
        help="Split of the builtin corpus or a saved DatasetDict (default: %(default)s).",
    )
    parser.add_argument(
        "--text_column", default="text", help="Column with the documents to score (default: %(default)s)."
    )
    parser.add_argument(
        "--names", nargs="+", default=None, help="Display names, one per checkpoint (default: folder names)."
    )
    parser.add_argument(
        "--block_size", type=int, default=128, help="Tokens per scoring window (default: %(default)s)."
    )
    parser.add_argument("--batch_size", type=int, default=8, help="Windows per forward pass (default: %(default)s).")
    parser.add_argument("--max_documents", type=int, default=None, help="Score only the first N rows (default: all).")
    parser.add_argument("--dtype", default="float32", help="Dtype the models are loaded in (default: %(default)s).")
    parser.add_argument(
        "--output_dir", default=None, help="Folder for report.json, report.md and heatmap.png (default: print only)."
    )
    _add_overwrite_and_progress(parser)

    def handler(args: argparse.Namespace) -> int:
        from .compare import (
            check_checkpoint_arguments,
            check_dataset_argument,
            compare_checkpoints,
            format_report,
        )

        check_checkpoint_arguments(args.checkpoints, args.names)
        check_dataset_argument(args.dataset)
        _check_positive(args, "block_size", minimum=2)
        _check_positive(args, "batch_size")
        if args.max_documents is not None:
            _check_positive(args, "max_documents")
        _check_output_dir(args.output_dir, args.overwrite_output_dir)
        report = compare_checkpoints(
            args.checkpoints,
            args.dataset,
            split=args.split,
            text_column=args.text_column,
            names=args.names,
            block_size=args.block_size,
            batch_size=args.batch_size,
            max_documents=args.max_documents,
            dtype=args.dtype,
            output_dir=args.output_dir,
            overwrite_output_dir=args.overwrite_output_dir,
            show_progress=not args.no_progress,
        )
        print(format_report(report), end="")
        if args.output_dir:
            print(f"report written to {args.output_dir}/ (report.json, report.md, heatmap.png)")
        return EXIT_OK

    parser.set_defaults(handler=handler)


# ----------------------------------------------------------------------------------------------------------------
# shared option helpers
# ----------------------------------------------------------------------------------------------------------------


def _add_overwrite_and_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Replace an existing output folder (otherwise an existing one is an error).",
    )
    parser.add_argument("--no_progress", action="store_true", help="Hide progress bars.")


def _check_positive(args: argparse.Namespace, name: str, minimum: int = 1) -> None:
    value = getattr(args, name)
    if value < minimum:
        raise ValueError(f"--{name} must be >= {minimum}, got {value}.")


def _check_output_dir(output_dir: str | None, overwrite: bool) -> None:
    """Refuse to overwrite a previous run before anything expensive happens."""
    if output_dir and os.path.exists(output_dir) and not overwrite:
        raise FileExistsError(
            f"output folder {output_dir!r} already exists; pass --overwrite_output_dir to replace it, or choose "
            "another --output_dir."
        )


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
    """Run `hf-interop` with `argv` (defaults to `sys.argv[1:]`); returns the exit code (see the module docstring).

    Every error ends in ONE line on stderr, `hf-interop COMMAND: error: MESSAGE`, so scripts can grep for it.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # --help (0) or an argparse error (2, already printed)
        return int(exit_request.code or 0)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, FileExistsError, TypeError) as error:
        _print_error(args.command, error)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"hf-interop {args.command}: interrupted", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as error:  # noqa: BLE001 - the CLI's contract: one line and exit code 1, details in the log
        logger.debug("hf-interop failed", exc_info=True)
        _print_error(args.command, error, prefix=f"{type(error).__name__}: ")
        return EXIT_FAILURE


def _print_error(command: str, error: BaseException, prefix: str = "") -> None:
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"hf-interop {command}: error: {prefix}{message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
