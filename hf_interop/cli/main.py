"""The `hf-interop` command line: the parser, the subcommands demo / compare / card, one-line errors, exit codes.

Each subcommand parses its options, validates them before any model is loaded, and calls the same Python API
a user would. `distill`, `adapt`, `ensemble`, `merge` and `cache-teacher` parse `HfArgumentParser` dataclasses plus
`--config file.yaml` exactly like `recipes/<name>.py` (both call :func:`run_recipe`, in `recipes.py`), so a recipe
and its command run the same code. Outputs are written to a staging folder that becomes the output folder only on
success.

Exit codes: 0 success, 2 bad input (argparse and our own checks: the message names the option, the value and the
fix), 1 any other failure. Every error is ONE line on stderr: `hf-interop COMMAND: error: MESSAGE` (no usage
block). `distill` and `adapt` keep the checkpoints of an interrupted or failed run and name their folder in that
line; the same command with `--resume_from_checkpoint true` continues from the last one.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..logging_utils import get_logger
from ..utils import check_output_dir
from .arguments import ALLOW_PICKLE_HELP, OVERWRITE_FLAG_FIX
from .recipes import RECIPES, run_recipe_main

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
    from ..demo import DemoSettings

    # Every numeric knob of DemoSettings is an option; the defaults are what `make demo` runs.
    for setting in dataclasses.fields(DemoSettings):
        if "help" in setting.metadata:
            parser.add_argument(
                f"--{setting.name}",
                type=type(setting.default),
                default=setting.default,
                help=f"{setting.metadata['help']} (default: %(default)s)",
            )
    parser.add_argument("--no_progress", action="store_true", help="Hide progress bars.")

    def handler(args: argparse.Namespace) -> int:
        from ..demo import run_demo

        values = {s.name: getattr(args, s.name) for s in dataclasses.fields(DemoSettings) if "help" in s.metadata}
        for name in ("num_train_blocks", "num_eval_blocks", "sample_draws", "student_num_layers", "train_steps"):
            if values[name] < 1:
                raise ValueError(f"--{name} must be >= 1, got {values[name]}.")
        run_demo(DemoSettings(**values, show_progress=not args.no_progress))
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
        help="Split of the builtin corpus or a saved DatasetDict; a file (or a dataset with only a train split) is "
        "scored on its held-out documents, 'all' for every row (default: %(default)s).",
    )
    parser.add_argument(
        "--validation_split_percentage",
        type=float,
        default=5.0,
        help="Percent of the documents held out when --dataset has no held-out split (default: %(default)s).",
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
    parser.add_argument("--allow_pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    parser.add_argument(
        "--ensemble_members",
        nargs="+",
        default=None,
        help="Names (see --names) of the models mixed into the ensemble (default: all sharing a tokenizer).",
    )
    parser.add_argument(
        "--output_dir", default=None, help="Folder for report.json, report.md and heatmap.png (default: print only)."
    )
    _add_overwrite_and_progress(parser)

    parser.set_defaults(handler=_run_compare)


def _run_compare(args: argparse.Namespace) -> int:
    """`hf-interop compare`: check the options before loading, score, print the table (and write the report)."""
    from ..compare import check_checkpoint_arguments, compare_checkpoints, format_report
    from ..data import check_dataset_argument

    check_checkpoint_arguments(args.checkpoints, args.names)
    check_dataset_argument(args.dataset, validation_split_percentage=args.validation_split_percentage)
    _check_positive(args, "block_size", minimum=2)
    _check_positive(args, "batch_size")
    if args.max_documents is not None:
        _check_positive(args, "max_documents")
    check_output_dir(args.output_dir, args.overwrite_output_dir, fix=OVERWRITE_FLAG_FIX)
    report = compare_checkpoints(
        args.checkpoints,
        args.dataset,
        split=args.split,
        validation_split_percentage=args.validation_split_percentage,
        text_column=args.text_column,
        names=args.names,
        block_size=args.block_size,
        batch_size=args.batch_size,
        max_documents=args.max_documents,
        dtype=args.dtype,
        output_dir=args.output_dir,
        overwrite_output_dir=args.overwrite_output_dir,
        show_progress=not args.no_progress,
        ensemble_members=args.ensemble_members,
        allow_pickle=args.allow_pickle,
    )
    print(format_report(report), end="")
    if args.output_dir:
        print(f"report written to {args.output_dir}/ (report.json, report.md, heatmap.png)")
    return EXIT_OK


@subcommand("card")
def _add_card(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "card",
        help="Write (or print) the model card README.md of an output folder from lineage and results.",
        description=(
            "Render an hf_interop model card (YAML header the Hub reads: base_model, datasets, metrics; body: how the "
            "checkpoint was made) into FOLDER/README.md. Sources are given as NAME or NAME@REVISION."
        ),
    )
    parser.add_argument("folder", metavar="FOLDER", help="The output folder the card describes.")
    parser.add_argument(
        "--kind", required=True, help="What the folder holds: distilled, lora, merged, ensemble or finetuned."
    )
    parser.add_argument("--model_name", default=None, help="Title of the card (default: the folder name).")
    parser.add_argument("--base_model", default=None, help="The model this one derives from (hub id or path).")
    parser.add_argument("--teachers", nargs="+", default=None, help="Teacher(s) of a distilled model: NAME[@REV].")
    parser.add_argument("--members", nargs="+", default=None, help="Members of an ensemble or merge: NAME[@REV].")
    parser.add_argument("--weights", nargs="+", type=float, default=None, help="Member weights, one per member.")
    parser.add_argument("--datasets", nargs="+", default=None, help="Training datasets.")
    parser.add_argument("--merge_method", default=None, help="Merge method of a merged model (e.g. ties).")
    parser.add_argument("--license", default=None, help="License identifier (e.g. apache-2.0).")
    parser.add_argument(
        "--metrics", default=None, help="Results as JSON, e.g. '{\"perplexity\": 21.3}' (or @file.json)."
    )
    parser.add_argument(
        "--hyperparameters",
        default=None,
        help="Training settings as JSON, e.g. '{\"kd_ratio\": 0.5}' (or @file.json).",
    )
    parser.add_argument("--print", dest="print_only", action="store_true", help="Print the card; write nothing.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing README.md in FOLDER.")

    parser.set_defaults(handler=_run_card)


def _run_card(args: argparse.Namespace) -> int:
    """`hf-interop card`: build the card's metadata from the options, then print it or write FOLDER/README.md."""
    from ..hub.cards import CARD_KINDS, render_model_card, write_model_card

    if args.kind not in CARD_KINDS:
        raise ValueError(f"--kind {args.kind!r} is not a card kind; use one of {', '.join(CARD_KINDS)}.")
    folder = Path(args.folder)
    metadata: dict[str, Any] = {}
    for name in ("model_name", "base_model", "merge_method", "license"):
        if getattr(args, name) is not None:
            metadata[name] = getattr(args, name)
    if args.datasets:
        metadata["datasets"] = args.datasets
    if args.teachers:
        metadata["teachers"] = [_source(text) for text in args.teachers]
    if args.members:
        members = [_source(text) for text in args.members]
        if args.weights is not None:
            if len(args.weights) != len(members):
                raise ValueError(
                    f"--weights has {len(args.weights)} values for {len(members)} --members; give one per member."
                )
            for member, weight in zip(members, args.weights, strict=True):
                member["weight"] = weight
        metadata["members"] = members
    for name in ("metrics", "hyperparameters"):
        if getattr(args, name) is not None:
            metadata[name] = _json_option(name, getattr(args, name))
    folder = Path(args.folder)
    if not args.print_only:
        if not folder.is_dir():
            raise FileNotFoundError(f"folder {args.folder!r} does not exist; pass the output folder to describe.")
        if (folder / "README.md").exists() and not args.overwrite:
            raise FileExistsError(
                f"{folder / 'README.md'} already exists; pass --overwrite to replace it, or --print to see the card."
            )
    if args.print_only:
        metadata.setdefault("model_name", folder.resolve().name)
        print(str(render_model_card(args.kind, **metadata)))
    else:
        path = write_model_card(folder, args.kind, **metadata)
        print(f"wrote {path}")
    return EXIT_OK


def _source(text: str) -> dict[str, Any]:
    """`NAME` or `NAME@REVISION` -> `{"name_or_path", "revision"}`."""
    name, _, revision = text.partition("@")
    return {"name_or_path": name, "revision": revision or None}


def _json_option(name: str, value: str) -> dict[str, Any]:
    if value.startswith("@"):
        try:
            value = Path(value[1:]).read_text(encoding="utf-8")
        except OSError as error:
            raise FileNotFoundError(f"--{name} file {value[1:]!r} cannot be read ({error.strerror}).") from error
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"--{name} {value!r} is not valid JSON ({error.msg}); pass e.g. '{{\"key\": 1.0}}'."
        ) from error
    if not isinstance(parsed, dict):
        raise ValueError(f"--{name} must be a JSON object (name -> value), got {value!r}.")
    return parsed


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


def _add_recipe_stub(subparsers: argparse._SubParsersAction, name: str) -> None:
    """The recipe subcommands parse their own options (HfArgumentParser); this entry lists them in `--help`."""
    description = RECIPES[name][2]
    parser = subparsers.add_parser(name, help=description, description=description, add_help=False)
    parser.add_argument("options", nargs=argparse.REMAINDER, help=f"options of {name}; see `hf-interop {name} --help`")


for _name in RECIPES:
    subcommand(_name)(lambda subparsers, _name=_name: _add_recipe_stub(subparsers, _name))


@subcommand("lm-eval")
def _add_lm_eval(subparsers: argparse._SubParsersAction) -> None:
    """Every option after `lm-eval` is lm-eval's own (see hf_interop/cli/lm_eval.py); this entry lists it in --help."""
    description = "Run lm-evaluation-harness's CLI with saved hf_interop ensembles loadable (hf_interop[lm_eval])."
    parser = subparsers.add_parser("lm-eval", help=description, description=description, add_help=False)
    parser.add_argument("options", nargs=argparse.REMAINDER, help="lm_eval's options, e.g. --model hf --tasks ...")


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
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in RECIPES:
        command = argv[0]

        def handler(_: argparse.Namespace) -> int:
            run_recipe_main(command, argv[1:])
            return EXIT_OK

        args = argparse.Namespace(command=command, handler=handler)
    elif argv and argv[0] == "lm-eval":  # lm-eval parses its own options, so they pass through untouched
        from .lm_eval import run_lm_eval

        args = argparse.Namespace(command="lm-eval", handler=lambda _: run_lm_eval(argv[1:]))
    else:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exit_request:  # --help (0) or an argparse error (2, already printed)
            return int(exit_request.code or 0)
    try:
        with _terminate_like_interrupt():
            return args.handler(args)
    except SystemExit as exit_request:  # a recipe parser's --help (0) or error (2, already printed)
        return int(exit_request.code or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        _print_error(args.command, error)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as interrupt:
        # The note (if any) names the folder an interrupted training run's checkpoints were kept in.
        print(f"hf-interop {args.command}: interrupted{_notes(interrupt)}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as error:  # noqa: BLE001 - the CLI's contract: one line and exit code 1, details in the log
        logger.debug("hf-interop failed", exc_info=True)
        _print_error(args.command, error, prefix=f"{type(error).__name__}: ")
        return EXIT_FAILURE


@contextlib.contextmanager
def _terminate_like_interrupt() -> Iterator[None]:
    """While a command runs, SIGTERM (`kill`, a scheduler's time limit) raises KeyboardInterrupt, as Ctrl-C does: a
    training run keeps its checkpoints and says where (see `resumable_output_dir`), other staging folders are cleaned
    up, and the exit is the documented one-line `interrupted` with code 1."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _print_error(command: str, error: BaseException, prefix: str = "") -> None:
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"hf-interop {command}: error: {prefix}{message}{_notes(error)}", file=sys.stderr)


def _notes(error: BaseException) -> str:
    """The exception's notes (e.g. where a failed run kept its checkpoints) as `; NOTE` on the same line."""
    return "".join(f"; {' '.join(str(note).split())}" for note in getattr(error, "__notes__", ()))
