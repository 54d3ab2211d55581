"""The `hf-interop` command line, and the code the recipe scripts in `recipes/` share with it.

Each subcommand parses its options, validates them before any model is loaded, and calls the same Python API
a user would. `distill`, `adapt`, `ensemble`, `merge` and `cache-teacher` parse `HfArgumentParser` dataclasses plus
`--config file.yaml` exactly like `recipes/<name>.py` (both call :func:`run_recipe`), so a recipe and its command
run the same code. Outputs are written to a staging folder that becomes the output folder only on success.

Exit codes: 0 success, 2 bad input (argparse and our own checks: the message names the option, the value and the
fix), 1 any other failure. Every error is ONE line on stderr: `hf-interop COMMAND: error: MESSAGE`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..compare import resolve_model_alias
from ..logging_utils import get_logger

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
        for name in ("num_train_blocks", "num_eval_blocks", "top_k", "student_num_layers", "train_steps"):
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
        "--ensemble_members",
        nargs="+",
        default=None,
        help="Names (see --names) of the models mixed into the ensemble (default: all sharing a tokenizer).",
    )
    parser.add_argument(
        "--output_dir", default=None, help="Folder for report.json, report.md and heatmap.png (default: print only)."
    )
    _add_overwrite_and_progress(parser)

    def handler(args: argparse.Namespace) -> int:
        from ..compare import (
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
            ensemble_members=args.ensemble_members,
        )
        print(format_report(report), end="")
        if args.output_dir:
            print(f"report written to {args.output_dir}/ (report.json, report.md, heatmap.png)")
        return EXIT_OK

    parser.set_defaults(handler=handler)


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

    def handler(args: argparse.Namespace) -> int:
        from ..model_card import CARD_KINDS, render_model_card, write_model_card

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

    parser.set_defaults(handler=handler)


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


def _check_output_dir(output_dir: str | None, overwrite: bool) -> None:
    """Refuse to overwrite a previous run before anything expensive happens."""
    if output_dir and os.path.exists(output_dir) and not overwrite:
        raise FileExistsError(
            f"output folder {output_dir!r} already exists; pass --overwrite_output_dir to replace it, or choose "
            "another --output_dir."
        )


# ----------------------------------------------------------------------------------------------------------------
# Recipes: dataclass options (HfArgumentParser) + `--config file.yaml`, shared by `recipes/*.py` and the CLI
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class DataArguments:
    """Where the training text comes from and how it is packed (shared by `distill`, `adapt` and `cache-teacher`).

    The same values must be used for `cache-teacher` and the `distill` run that reads its cache: the cache checks
    that the packed training set is the one it was computed on.
    """

    dataset: str = field(
        default="builtin",
        metadata={
            "help": "'builtin' (Python's language reference, no download), a save_to_disk folder, or a "
            ".txt/.json/.jsonl/.csv/.parquet file. Rows with input_ids are used as they are; text is packed."
        },
    )
    train_split: str = field(default="train", metadata={"help": "Split to train on (builtin or saved DatasetDict)."})
    eval_split: str | None = field(
        default="validation", metadata={"help": "Held-out split for evaluation; 'none' to skip evaluation."}
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    block_size: int = field(
        default=128, metadata={"help": "Tokens per packed training block (longer: more context, more memory)."}
    )
    max_train_blocks: int | None = field(
        default=None, metadata={"help": "Use only the first N training blocks (quick runs); default all."}
    )
    max_eval_blocks: int | None = field(
        default=None, metadata={"help": "Use only the first N held-out blocks; default all."}
    )

    def check(self) -> None:
        """Validate without loading anything."""
        from ..compare import check_dataset_argument

        check_dataset_argument(self.dataset)
        if isinstance(self.eval_split, str) and self.eval_split.lower() in ("", "none", "null"):
            self.eval_split = None
        if self.block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {self.block_size}.")
        for name in ("max_train_blocks", "max_eval_blocks"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or unset for all blocks), got {value}.")


@dataclass
class DistillScriptArguments(DataArguments):
    """The student and the data of `recipes/distill.py` / `hf-interop distill` (the teacher and the loss are in
    :class:`~hf_interop.DistillationConfig`)."""

    student_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Student checkpoint (folder, hub id or .gguf). Or build one: init_from."}
    )
    init_from: str | None = field(
        default=None,
        metadata={
            "help": "Build the student from this teacher checkpoint's own weights (init_student_from_teacher); "
            "defaults to teacher_model_name_or_path when student_num_layers is set."
        },
    )
    student_num_layers: int | None = field(
        default=None, metadata={"help": "Decoder layers of a student built from the teacher (fewer: smaller, faster)."}
    )
    student_layer_selection: str = field(
        default="uniform", metadata={"help": "Which teacher layers the student keeps: uniform, first or last."}
    )
    student_intermediate_size: int | None = field(
        default=None, metadata={"help": "MLP width of a student built from the teacher (width pruning); default keep."}
    )
    model_dtype: str = field(default="float32", metadata={"help": "dtype of the student weights (float32, bfloat16)."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace an existing output_dir (otherwise an existing one is an error)."}
    )

    def check(self) -> None:
        super().check()
        check_model_argument("student_model_name_or_path", self.student_model_name_or_path)
        check_model_argument("init_from", self.init_from)
        if (self.student_model_name_or_path is None) == (self.student_num_layers is None):
            raise ValueError(
                f"give exactly one of student_model_name_or_path ({self.student_model_name_or_path!r}) and "
                f"student_num_layers ({self.student_num_layers!r}): a student checkpoint, or the number of layers of a "
                "student built from the teacher."
            )


@dataclass
class AdaptScriptArguments(DataArguments):
    """Model, LoRA and data options of `recipes/adapt.py` / `hf-interop adapt` (training options are
    `transformers.TrainingArguments`)."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "Model to adapt (folder, hub id, .gguf)."})
    model_dtype: str = field(default="float32", metadata={"help": "dtype of the base weights (float32, bfloat16)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (higher: more capacity and memory)."})
    lora_alpha: float = field(default=32, metadata={"help": "LoRA scale numerator: updates are scaled by alpha / r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapter input, in [0, 1)."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names to adapt (e.g. q_proj v_proj); default every linear layer."}
    )
    use_dora: bool = field(default=False, metadata={"help": "Weight-decomposed LoRA (DoRA)."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised scaling alpha / sqrt(r)."})
    export_merged: bool = field(
        default=False,
        metadata={"help": "Also write the adapter folded into the base weights to output_dir/merged (plain model)."},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace an existing output_dir (otherwise an existing one is an error)."}
    )

    def check(self) -> None:
        super().check()
        if not self.model_name_or_path:
            raise ValueError("model_name_or_path is required: the model to adapt (folder, hub id or .gguf).")
        check_model_argument("model_name_or_path", self.model_name_or_path)


@dataclass
class EnsembleScriptArguments:
    """Options of `recipes/ensemble.py` / `hf-interop ensemble`: build (and optionally fit) a logit-level ensemble."""

    members: list[str] = field(
        default_factory=list, metadata={"help": "Two or more member checkpoints (folders or hub ids), one tokenizer."}
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "Folder the ensemble (config, tokenizer, card) goes to."}
    )
    weights: list[float] | None = field(
        default=None, metadata={"help": "Member weights (>= 0, one per member); default uniform."}
    )
    combination: str = field(
        default="mixture", metadata={"help": "How distributions combine: mixture, product, max or contrastive."}
    )
    fit_weights: bool = field(
        default=False, metadata={"help": "Fit the weights by minimising NLL on fit_split (members stay frozen)."}
    )
    dataset: str = field(default="builtin", metadata={"help": "Text for fitting/evaluating (see distill --dataset)."})
    fit_split: str = field(default="validation", metadata={"help": "Split the weights are fitted on."})
    eval_split: str | None = field(
        default="test", metadata={"help": "Split the ensemble is evaluated on (perplexity in the card); 'none' skips."}
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    block_size: int = field(default=128, metadata={"help": "Tokens per block for fitting and evaluation."})
    max_blocks: int | None = field(default=None, metadata={"help": "Use only the first N blocks of each split."})
    fit_steps: int = field(default=300, metadata={"help": "Adam steps of the weight fit."})
    dtype: str = field(default="float32", metadata={"help": "dtype the members are loaded in."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace an existing output_dir (otherwise an existing one is an error)."}
    )

    def check(self) -> None:
        from ..compare import check_checkpoint_arguments, check_dataset_argument

        if not self.output_dir:
            raise ValueError("output_dir is required: the folder the ensemble is saved to.")
        check_checkpoint_arguments(self.members)
        if self.weights is not None and len(self.weights) != len(self.members):
            raise ValueError(
                f"weights has {len(self.weights)} entries ({self.weights}) for {len(self.members)} members; give one "
                "per member, or none for uniform weights."
            )
        if self.weights is not None and self.fit_weights:
            raise ValueError("weights and fit_weights both given; fix the weights yourself or fit them, not both.")
        if isinstance(self.eval_split, str) and self.eval_split.lower() in ("", "none", "null"):
            self.eval_split = None
        check_dataset_argument(self.dataset)


@dataclass
class MergeScriptArguments:
    """Options of `recipes/merge.py` / `hf-interop merge` (weight-space merge, see :func:`hf_interop.merge_checkpoints`)."""

    checkpoints: list[str] = field(
        default_factory=list, metadata={"help": "Checkpoint folders (same architecture, safetensors) to merge."}
    )
    output_dir: str | None = field(default=None, metadata={"help": "Folder the merged checkpoint is written to."})
    method: str = field(
        default="linear",
        metadata={"help": "linear, task_arithmetic, ties, dare_linear, dare_ties or slerp."},
    )
    weights: list[float] | None = field(default=None, metadata={"help": "One weight per checkpoint; default equal."})
    base: str | None = field(
        default=None, metadata={"help": "The model the checkpoints were fine-tuned from (task-vector methods)."}
    )
    density: float | None = field(
        default=None, metadata={"help": "ties/dare: share of each task vector kept, in (0, 1] (lower: sparser)."}
    )
    slerp_t: float = field(default=0.5, metadata={"help": "slerp: interpolation point in [0, 1]."})
    seed: int = field(default=0, metadata={"help": "Seed of DARE's random drops."})
    max_shard_size: str = field(default="5GB", metadata={"help": "Largest output shard."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace an existing output_dir (otherwise an existing one is an error)."}
    )
    disable_tqdm: bool = field(default=False, metadata={"help": "Hide the progress bar."})

    def check(self) -> None:
        if not self.output_dir:
            raise ValueError("output_dir is required: the folder the merged checkpoint is written to.")
        if len(self.checkpoints) < 2:
            raise ValueError(
                f"merge needs at least 2 checkpoints, got {len(self.checkpoints)} ({self.checkpoints}); list the "
                "folders to merge."
            )
        for checkpoint in [*self.checkpoints, *([self.base] if self.base else [])]:
            if not os.path.isdir(checkpoint):
                raise ValueError(
                    f"checkpoint {checkpoint!r} is not a folder; merging needs local safetensors folders."
                )


@dataclass
class CacheTeacherScriptArguments(DataArguments):
    """Options of `recipes/cache_teacher.py` / `hf-interop cache-teacher`: store a teacher's top-k log-probabilities
    on the packed training set once, so distillation runs need no teacher."""

    teacher_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Teacher checkpoint (folder, hub id or .gguf)."}
    )
    teacher_revision: str | None = field(default=None, metadata={"help": "Revision of a hub teacher (pin a commit)."})
    teacher_dtype: str = field(default="float32", metadata={"help": "dtype the teacher runs in."})
    output_dir: str | None = field(default=None, metadata={"help": "Folder of the cache (shards + manifest.json)."})
    top_k: int = field(default=64, metadata={"help": "Log-probabilities kept per position (higher: closer, bigger)."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the stored distribution."})
    batch_size: int = field(default=8, metadata={"help": "Rows per teacher forward pass."})
    shard_size: int = field(default=1024, metadata={"help": "Rows per shard (unit of atomic writes and resuming)."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace an earlier cache in output_dir (a rerun of the same job resumes without it)."},
    )
    disable_tqdm: bool = field(default=False, metadata={"help": "Hide the progress bar."})

    def check(self) -> None:
        super().check()
        if not self.teacher_model_name_or_path:
            raise ValueError("teacher_model_name_or_path is required: the teacher whose logits are cached.")
        check_model_argument("teacher_model_name_or_path", self.teacher_model_name_or_path)
        if not self.output_dir:
            raise ValueError("output_dir is required: the folder the cache is written to.")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}.")


def check_model_argument(name: str, value: str | None) -> None:
    """Before anything loads: a model option must name an existing path, a hub id or `default_teacher`."""
    from ..compare import DEFAULT_TEACHER_ALIAS
    from ..loading import looks_like_hub_id

    if value is None or value == DEFAULT_TEACHER_ALIAS or os.path.exists(value) or looks_like_hub_id(value):
        return
    raise ValueError(
        f"{name} {value!r} does not exist; pass an existing checkpoint folder, a .gguf file, a hub id ('org/name') "
        "or 'default_teacher'."
    )


def _recipe_parser(dataclass_types: Sequence[type], prog: str, description: str) -> Any:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(list(dataclass_types), prog=prog, description=description)
    parser.add_argument(
        "--config",
        default=None,
        help="YAML file of options (keys = option names without --); flags on the command line override it.",
    )
    return parser


def parse_recipe_args(
    dataclass_types: Sequence[type], argv: Sequence[str] | None, prog: str, description: str = ""
) -> tuple[Any, ...]:
    """Parse `argv` into one instance of each dataclass, merging `--config file.yaml` under the command line.

    A YAML key that no dataclass knows is an error naming the key and the file (and the closest option), raised
    through the parser, so it prints one `PROG: error: ...` line and exits with code 2, like a bad flag.
    """
    import difflib

    parser = _recipe_parser(dataclass_types, prog, description)
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path = None
    pre_parser = argparse.ArgumentParser(add_help=False)
    pre_parser.add_argument("--config", default=None)
    known, _ = pre_parser.parse_known_args(argv)
    config_path = known.config
    if config_path is not None:
        values = _read_yaml_config(config_path, parser)
        dests = {action.dest: action for action in parser._actions}
        for key in values:
            if key not in dests or key in ("help", "config"):
                close = difflib.get_close_matches(key, [d for d in dests if d not in ("help", "config")], n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                parser.error(
                    f"key {key!r} in config file {config_path!r} is not an option of {prog}.{hint} Fix or remove it "
                    f"(`{prog} --help` lists the options)."
                )
        for key, value in values.items():
            action = dests[key]
            action.required = False  # given by the file; the command line may still override it
            if isinstance(value, (dict, list)) and action.nargs not in ("+", "*"):
                value = json.dumps(value)  # dict-valued options (device maps, ...) take JSON on the command line
            elif isinstance(value, list):
                value = [str(item) if not isinstance(item, str) else item for item in value]
                value = [action.type(item) if action.type else item for item in value]
            elif value is not None and not isinstance(value, str) and action.type is not None:
                value = str(value)  # argparse converts string defaults with the option's type
            parser.set_defaults(**{key: value})
    namespace = parser.parse_args(argv)
    namespace = vars(namespace)
    namespace.pop("config", None)
    outputs = []
    for dataclass_type in dataclass_types:
        names = {f.name for f in dataclasses.fields(dataclass_type) if f.init}
        outputs.append(dataclass_type(**{k: v for k, v in namespace.items() if k in names}))
    return tuple(outputs)


def _read_yaml_config(path: str, parser: Any) -> dict[str, Any]:
    import yaml

    if not os.path.isfile(path):
        parser.error(f"config file {path!r} does not exist; check the path given to --config.")
    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
    except yaml.YAMLError as error:
        parser.error(f"config file {path!r} is not valid YAML: {' '.join(str(error).split())}")
    if not isinstance(values, dict):
        parser.error(
            f"config file {path!r} must hold a mapping of option names to values, got {type(values).__name__}."
        )
    return values


@contextlib.contextmanager
def staged_output_dir(output_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """A staging folder that becomes `output_dir` only when the block succeeds (nothing partial is left behind).

    Like :func:`hf_interop.utils.atomic_directory`, but the staging folder carries the final folder's NAME (inside a
    hidden `.tmp-*` parent), so files that record their folder's name (model cards) are right, and it works under
    several processes: every rank uses the same staging folder, only the main process creates and renames it.
    """
    final_dir = Path(output_dir)
    if final_dir.exists() and not overwrite:
        raise FileExistsError(
            f"output folder {str(final_dir)!r} already exists; pass --overwrite_output_dir to replace it, or choose "
            "another output_dir."
        )
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    state = None
    if world_size > 1:
        from accelerate import PartialState

        state = PartialState()
    is_main = state is None or state.is_main_process
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    if state is None:
        stage_root = Path(tempfile.mkdtemp(prefix=f".tmp-{final_dir.name}-", dir=final_dir.parent))
    else:  # one name on every rank: derived from the launcher's rendezvous
        tag = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("MASTER_PORT", "run")
        stage_root = final_dir.parent / f".tmp-{final_dir.name}-{tag}"
        if is_main:
            shutil.rmtree(stage_root, ignore_errors=True)
            stage_root.mkdir(parents=True)
        state.wait_for_everyone()
    stage = stage_root / final_dir.name
    stage.mkdir(exist_ok=True)
    try:
        yield stage
    except BaseException:
        if is_main:
            shutil.rmtree(stage_root, ignore_errors=True)
        raise
    if state is not None:
        state.wait_for_everyone()
    if is_main:
        old_dir = None
        if final_dir.exists():
            old_dir = final_dir.parent / f".old-{final_dir.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final_dir, old_dir)
        os.replace(stage, final_dir)
        shutil.rmtree(stage_root, ignore_errors=True)
        if old_dir is not None:
            shutil.rmtree(old_dir, ignore_errors=True)
    if state is not None:
        state.wait_for_everyone()


def _load_blocks(data_args: DataArguments, tokenizer: Any, split: str, max_blocks: int | None) -> Any:
    """A split as packed blocks (`input_ids`, `attention_mask`, `labels`); already tokenized rows are kept."""
    from ..compare import load_text_dataset
    from ..data import pack_dataset

    dataset = load_text_dataset(data_args.dataset, split)
    if "input_ids" in dataset.column_names:
        if max_blocks is not None:
            dataset = dataset.select(range(min(max_blocks, len(dataset))))
        return dataset
    return pack_dataset(
        dataset, tokenizer, block_size=data_args.block_size, text_column=data_args.text_column, max_blocks=max_blocks
    )


def _held_out_metrics(model: Any, blocks: Any, batch_size: int, show_progress: bool) -> dict[str, float]:
    from ..evaluation import evaluate_perplexity

    result = evaluate_perplexity(model, blocks, batch_size=batch_size, show_progress=show_progress)
    return {"eval_loss": result["loss"], "eval_perplexity": result["perplexity"]}


def run_distill(script_args: DistillScriptArguments, config: Any) -> dict[str, Any]:
    """Distil a teacher (or a teacher cache) into a student: what `recipes/distill.py` and `hf-interop distill` run.

    The student comes from `student_model_name_or_path` or is built from the teacher's own layers
    (`student_num_layers`, :func:`hf_interop.init_student_from_teacher`). Training writes into a staging folder that
    becomes `config.output_dir` only when training and saving succeed.

    Returns:
        `dict` with `output_dir`, `train` (train metrics) and `eval` (held-out loss and perplexity, if any).
    """
    from ..distillation_trainer import DistillationTrainer
    from ..loading import load_causal_lm

    script_args.check()
    check_model_argument("teacher_model_name_or_path", config.teacher_model_name_or_path)
    if config.teacher_model_name_or_path is None and config.teacher_logits_path is None:
        raise ValueError(
            "no teacher: set teacher_model_name_or_path (a checkpoint) or teacher_logits_path (a cache written by "
            "`hf-interop cache-teacher`)."
        )
    init_from = script_args.init_from or config.teacher_model_name_or_path
    if script_args.student_num_layers is not None and init_from is None:
        raise ValueError(
            "student_num_layers builds the student from a teacher checkpoint, but there is none: set init_from (the "
            "teacher folder the cache was made from) or teacher_model_name_or_path."
        )
    if config.teacher_logits_path is not None and not os.path.isdir(config.teacher_logits_path):
        raise ValueError(
            f"teacher_logits_path {config.teacher_logits_path!r} is not a folder; write a cache first with "
            "`hf-interop cache-teacher`."
        )
    config.teacher_model_name_or_path = resolve_model_alias(config.teacher_model_name_or_path)
    init_from = resolve_model_alias(init_from)
    final_dir = config.output_dir
    with staged_output_dir(final_dir, overwrite=script_args.overwrite_output_dir) as stage:
        config.output_dir = str(stage)
        if script_args.student_model_name_or_path is not None:
            student, tokenizer = load_causal_lm(
                resolve_model_alias(script_args.student_model_name_or_path), dtype=script_args.model_dtype
            )
        else:
            from ..loading import load_tokenizer
            from ..student_init import init_student_from_teacher

            student = init_student_from_teacher(
                init_from,
                num_layers=script_args.student_num_layers,
                layer_selection=script_args.student_layer_selection,
                intermediate_size=script_args.student_intermediate_size,
            )
            tokenizer = load_tokenizer(init_from)
        train_blocks = _load_blocks(script_args, tokenizer, script_args.train_split, script_args.max_train_blocks)
        eval_blocks = None
        if script_args.eval_split is not None:
            eval_blocks = _load_blocks(script_args, tokenizer, script_args.eval_split, script_args.max_eval_blocks)
        trainer = DistillationTrainer(
            model=student,
            args=config,
            train_dataset=train_blocks,
            eval_dataset=eval_blocks,
            processing_class=tokenizer,
        )
        train_result = trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
        trainer.save_model()
        trainer.save_metrics("train", train_result.metrics)
        eval_metrics: dict[str, Any] = {}
        if eval_blocks is not None:
            eval_metrics = trainer.evaluate()
            # eval_loss mixes KD and CE (kd_ratio); the student's own perplexity is exp(cross-entropy).
            ce_loss = eval_metrics.get("eval_ce_loss", eval_metrics.get("eval_loss"))
            if ce_loss is not None:
                eval_metrics["eval_perplexity"] = math.exp(min(ce_loss, 50.0))
            trainer.save_metrics("eval", eval_metrics)
        if trainer.accelerator.is_main_process:
            _add_card_results(stage, "distilled", script_args.dataset, eval_metrics)
        trainer.accelerator.wait_for_everyone()
    config.output_dir = final_dir
    return {"output_dir": final_dir, "train": train_result.metrics, "eval": eval_metrics, "trainer": trainer}


def _add_card_results(folder: Path, kind: str, dataset: str, eval_metrics: dict[str, Any]) -> None:
    """Re-render the card the trainer wrote with the training data and held-out results, keeping its lineage."""
    from ..model_card import read_card_lineage, write_model_card

    if not (folder / "README.md").is_file():
        return
    lineage = read_card_lineage(folder)
    metadata = {key: lineage[key] for key in ("teachers", "hyperparameters", "base_model") if lineage.get(key)}
    metrics = {
        key.removeprefix("eval_"): float(value)
        for key, value in eval_metrics.items()
        if key in ("eval_loss", "eval_ce_loss", "eval_kd_loss", "eval_perplexity", "eval_top1_agreement")
    }
    try:
        write_model_card(folder, kind, datasets=[dataset], metrics=metrics, **metadata)
    except ValueError as error:  # the weights are saved; a card problem must not lose the run
        logger.warning(f"could not add the results to the model card in {folder}: {error}")


def run_adapt(script_args: AdaptScriptArguments, training_args: Any) -> dict[str, Any]:
    """LoRA fine-tuning of a causal LM on packed text: what `recipes/adapt.py` and `hf-interop adapt` run.

    `output_dir` receives the adapter (adapter_config.json, adapter_model.safetensors, tokenizer, `lora` card) and,
    with `export_merged`, the merged full model in `output_dir/merged`.
    """
    from peft import get_peft_model
    from transformers import Trainer, default_data_collator

    from ..adapters import build_lora_config, export_merged_model, save_adapter_checkpoint
    from ..loading import load_causal_lm

    script_args.check()
    final_dir = training_args.output_dir
    with staged_output_dir(final_dir, overwrite=script_args.overwrite_output_dir) as stage:
        training_args.output_dir = str(stage)
        model, tokenizer = load_causal_lm(
            resolve_model_alias(script_args.model_name_or_path), dtype=script_args.model_dtype
        )
        lora_config = build_lora_config(
            r=script_args.lora_r,
            lora_alpha=script_args.lora_alpha,
            lora_dropout=script_args.lora_dropout,
            target_modules=script_args.lora_target_modules,
            use_dora=script_args.use_dora,
            use_rslora=script_args.use_rslora,
            model=model,
        )
        train_blocks = _load_blocks(script_args, tokenizer, script_args.train_split, script_args.max_train_blocks)
        eval_blocks = None
        if script_args.eval_split is not None:
            eval_blocks = _load_blocks(script_args, tokenizer, script_args.eval_split, script_args.max_eval_blocks)
        peft_model = get_peft_model(model, lora_config)
        trainer = Trainer(
            model=peft_model,
            args=training_args,
            train_dataset=train_blocks,
            eval_dataset=eval_blocks,
            data_collator=default_data_collator,
            processing_class=tokenizer,
        )
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        eval_metrics: dict[str, Any] = {}
        if eval_blocks is not None:
            eval_metrics = trainer.evaluate()
            if "eval_loss" in eval_metrics:
                eval_metrics["eval_perplexity"] = math.exp(min(eval_metrics["eval_loss"], 50.0))
        if trainer.accelerator.is_main_process:
            card = {
                "model_name": Path(final_dir).name,
                "datasets": [script_args.dataset],
                "metrics": {k: v for k, v in eval_metrics.items() if k in ("eval_loss", "eval_perplexity")},
                "hyperparameters": {
                    "lora_r": script_args.lora_r,
                    "lora_alpha": script_args.lora_alpha,
                    "learning_rate": training_args.learning_rate,
                    "max_steps": training_args.max_steps,
                    "num_train_epochs": training_args.num_train_epochs,
                },
            }
            unwrapped = trainer.accelerator.unwrap_model(trainer.model)
            # The helpers write atomically into a fresh folder; build them inside the staging folder and move the
            # files up, so the final folder holds the adapter next to the training checkpoints.
            _move_contents(save_adapter_checkpoint(unwrapped, stage / ".adapter", tokenizer, **card), stage)
            if script_args.export_merged:
                export_merged_model(
                    unwrapped, stage / "merged", tokenizer, **{**card, "model_name": f"{card['model_name']}-merged"}
                )
            trainer.save_metrics("train", train_result.metrics)
            if eval_metrics:
                trainer.save_metrics("eval", eval_metrics)
        trainer.accelerator.wait_for_everyone()
    training_args.output_dir = final_dir
    return {"output_dir": final_dir, "train": train_result.metrics, "eval": eval_metrics, "trainer": trainer}


def _move_contents(source: Path, target: Path) -> None:
    for item in Path(source).iterdir():
        os.replace(item, target / item.name)
    Path(source).rmdir()


def run_ensemble(script_args: EnsembleScriptArguments) -> dict[str, Any]:
    """Build a logit-level ensemble, optionally fit its weights, evaluate and save it (config, tokenizer, card)."""
    from ..ensemble import EnsembleForCausalLM, fit_ensemble_weights

    script_args.check()
    _check_output_dir(script_args.output_dir, script_args.overwrite_output_dir)
    ensemble = EnsembleForCausalLM.from_members(
        [resolve_model_alias(member) for member in script_args.members],
        weights=script_args.weights,
        combination=script_args.combination,
        dtype=script_args.dtype,
    )
    data_args = DataArguments(
        dataset=script_args.dataset, text_column=script_args.text_column, block_size=script_args.block_size
    )
    result: dict[str, Any] = {"output_dir": script_args.output_dir}
    if script_args.fit_weights:
        fit_blocks = _load_blocks(data_args, ensemble.tokenizer, script_args.fit_split, script_args.max_blocks)
        fit = fit_ensemble_weights(ensemble, fit_blocks, max_steps=script_args.fit_steps, show_progress=True)
        result["fitted_weights"] = [float(w) for w in ensemble.member_weights.tolist()]
        result["fit"] = fit
    if script_args.eval_split is not None:
        eval_blocks = _load_blocks(data_args, ensemble.tokenizer, script_args.eval_split, script_args.max_blocks)
        result["eval"] = _held_out_metrics(ensemble, eval_blocks, batch_size=8, show_progress=True)
    with staged_output_dir(script_args.output_dir, overwrite=script_args.overwrite_output_dir) as stage:
        ensemble.save_pretrained(stage)
    result["ensemble"] = ensemble
    return result


def run_merge(script_args: MergeScriptArguments) -> dict[str, Any]:
    """Merge checkpoints in weight space (:func:`hf_interop.merge_checkpoints`); the folder appears atomically."""
    from ..merge import merge_checkpoints

    script_args.check()
    _check_output_dir(script_args.output_dir, script_args.overwrite_output_dir)
    path = merge_checkpoints(
        script_args.checkpoints,
        script_args.method,
        weights=script_args.weights,
        base=script_args.base,
        output_dir=script_args.output_dir,
        density=script_args.density,
        seed=script_args.seed,
        slerp_t=script_args.slerp_t,
        overwrite=script_args.overwrite_output_dir,
        max_shard_size=script_args.max_shard_size,
        show_progress=not script_args.disable_tqdm,
    )
    return {"output_dir": str(path)}


def run_cache_teacher(script_args: CacheTeacherScriptArguments) -> dict[str, Any]:
    """Cache a teacher's top-k log-probabilities on the packed training split (:func:`hf_interop.cache_teacher_logits`).

    Packs the data with the teacher's tokenizer exactly as `distill` does with the same data options, so the
    distillation run's dataset fingerprint matches the cache.
    """
    from ..loading import load_causal_lm
    from ..teacher_cache import cache_teacher_logits

    script_args.check()
    output_dir = Path(script_args.output_dir)
    # A complete cache (manifest.json) is a finished earlier run: refused without the flag. A partial cache of the
    # same job (shards, no manifest yet) resumes; cache_teacher_logits itself refuses folders holding anything else.
    if (output_dir / "manifest.json").exists() and not script_args.overwrite_output_dir:
        raise FileExistsError(
            f"output folder {str(output_dir)!r} already holds a complete teacher cache; pass --overwrite_output_dir "
            "to recompute it, or choose another output_dir."
        )
    teacher_path = resolve_model_alias(script_args.teacher_model_name_or_path)
    teacher, tokenizer = load_causal_lm(
        teacher_path,
        revision=script_args.teacher_revision,
        dtype=script_args.teacher_dtype,
    )
    train_blocks = _load_blocks(script_args, tokenizer, script_args.train_split, script_args.max_train_blocks)
    cache = cache_teacher_logits(
        teacher,
        train_blocks,
        output_dir,
        top_k=script_args.top_k,
        temperature=script_args.temperature,
        batch_size=script_args.batch_size,
        shard_size=script_args.shard_size,
        tokenizer=tokenizer,
        teacher_name_or_path=teacher_path,
        teacher_revision=script_args.teacher_revision,
        overwrite=script_args.overwrite_output_dir,
        show_progress=not script_args.disable_tqdm,
    )
    return {"output_dir": str(output_dir), "cache": cache, "num_rows": len(train_blocks)}


def _training_arguments_class() -> type:
    from transformers import TrainingArguments

    return TrainingArguments


def _distillation_config_class() -> type:
    from ..distillation_config import DistillationConfig

    return DistillationConfig


# name -> (dataclass types (callable for lazy imports), runner, description)
RECIPES: dict[str, tuple[Callable[[], list[type]], Callable[..., dict[str, Any]], str]] = {
    "distill": (
        lambda: [DistillScriptArguments, _distillation_config_class()],
        run_distill,
        "Knowledge distillation of a teacher (or a teacher-logits cache) into a student, with DistillationTrainer.",
    ),
    "adapt": (
        lambda: [AdaptScriptArguments, _training_arguments_class()],
        run_adapt,
        "LoRA fine-tuning of a causal LM on text; saves the adapter (and optionally the merged model).",
    ),
    "ensemble": (
        lambda: [EnsembleScriptArguments],
        run_ensemble,
        "Build a logit-level ensemble of causal LMs sharing a tokenizer, optionally fit its weights, and save it.",
    ),
    "merge": (
        lambda: [MergeScriptArguments],
        run_merge,
        "Merge checkpoints of one architecture in weight space (linear, task arithmetic, TIES, DARE, SLERP).",
    ),
    "cache-teacher": (
        lambda: [CacheTeacherScriptArguments],
        run_cache_teacher,
        "Run a teacher once over the packed training set and store its top-k log-probabilities for distill.",
    ),
}


def run_recipe(name: str, argv: Sequence[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    """Parse `argv` (with `--config`) for recipe `name` and run it; what `recipes/<name>.py` calls."""
    dataclass_types, runner, description = RECIPES[name]
    parsed = parse_recipe_args(dataclass_types(), argv, prog or f"hf-interop {name}", description)
    return runner(*parsed)


def leave_process_group() -> None:
    """End of a launched run (recipes, `hf-interop`): the ranks leave the process group together. A rank that exits
    while another is still tearing down gloo can abort at exit ("terminate called without an active exception")
    after a successful run. Nothing to do in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _add_recipe_stub(subparsers: argparse._SubParsersAction, name: str) -> None:
    """The recipe subcommands parse their own options (HfArgumentParser); this entry lists them in `--help`."""
    description = RECIPES[name][2]
    parser = subparsers.add_parser(name, help=description, description=description, add_help=False)
    parser.add_argument("options", nargs=argparse.REMAINDER, help=f"options of {name}; see `hf-interop {name} --help`")


for _name in RECIPES:
    subcommand(_name)(lambda subparsers, _name=_name: _add_recipe_stub(subparsers, _name))


def report_recipe_result(name: str, result: dict[str, Any]) -> None:
    """Print where a recipe wrote its output and its headline numbers (main process only)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    print(f"hf-interop {name}: wrote {result['output_dir']}")
    for key in ("train", "eval"):
        metrics = result.get(key) or {}
        shown = {
            k: round(v, 4) for k, v in metrics.items() if isinstance(v, float) and ("loss" in k or "perplex" in k)
        }
        if shown:
            print(f"  {key}: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    if "fitted_weights" in result:
        print("  fitted weights: " + ", ".join(f"{w:.3f}" for w in result["fitted_weights"]))


def run_recipe_main(name: str, argv: Sequence[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    """A whole launched recipe run: parse and run (:func:`run_recipe`), report, then leave the process group."""
    result = run_recipe(name, argv, prog)
    report_recipe_result(name, result)
    leave_process_group()
    return result


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
    except KeyboardInterrupt:
        print(f"hf-interop {args.command}: interrupted", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as error:  # noqa: BLE001 - the CLI's contract: one line and exit code 1, details in the log
        logger.debug("hf-interop failed", exc_info=True)
        _print_error(args.command, error, prefix=f"{type(error).__name__}: ")
        return EXIT_FAILURE


@contextlib.contextmanager
def _terminate_like_interrupt() -> Iterator[None]:
    """While a command runs, SIGTERM (`kill`, a scheduler's time limit) raises KeyboardInterrupt, so staging folders
    are cleaned up and the exit is the documented one-line `interrupted` with code 1, as for Ctrl-C."""
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
    print(f"hf-interop {command}: error: {prefix}{message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
