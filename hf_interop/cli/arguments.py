"""Options of the recipe commands: `DataArguments`, one `*ScriptArguments` dataclass per recipe, and
`parse_recipe_args`, which merges `--config file.yaml` under the command line (shared by `recipes/*.py` and the CLI).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# How a command asks for an existing --output_dir to be replaced (see :func:`hf_interop.utils.check_output_dir`).
OVERWRITE_FLAG_FIX = "pass --overwrite_output_dir to replace it, or choose another --output_dir."

ALLOW_PICKLE_HELP = (
    "Also load pickle (.bin) weights; they can run code when loaded, so only for checkpoints you trust (default: "
    "safetensors only)."
)


def _allow_pickle_field() -> Any:
    return field(default=False, metadata={"help": ALLOW_PICKLE_HELP})


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
    eval_dataset: str | None = field(
        default=None,
        metadata={
            "help": "A separate held-out file or save_to_disk folder for evaluation; default: held-out documents "
            "carved from --dataset when it has no held-out split of its own (see --validation_split_percentage)."
        },
    )
    validation_split_percentage: float = field(
        default=5.0,
        metadata={
            "help": "Percent of the documents held out (by document, the same every run) when --dataset is one file "
            "or has only a train split; like run_clm.py."
        },
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
        from ..data import check_dataset_argument

        check_dataset_argument(
            self.dataset,
            eval_dataset=self.eval_dataset,
            validation_split_percentage=self.validation_split_percentage,
        )
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
    """The student and the data of `recipes/distill.py` / `hf-interop distill` (the teacher, the loss,
    `overwrite_output_dir` and `allow_pickle` are in :class:`~hf_interop.DistillationConfig`)."""

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
    # `--allow_pickle` and `--overwrite_output_dir` of `distill` are DistillationConfig's (one option, one place).

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
    allow_pickle: bool = _allow_pickle_field()
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
        default=None,
        metadata={
            "help": "Member weights (>= 0, one per member); default uniform. With --combination arithmetic: signed "
            "coefficients with a positive sum, e.g. 1 1 -1 for proxy-tuning."
        },
    )
    combination: str = field(
        default="mixture",
        metadata={"help": "How distributions combine: mixture, product, max, contrastive or arithmetic."},
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
    allow_pickle: bool = _allow_pickle_field()
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace an existing output_dir (otherwise an existing one is an error)."}
    )

    def check(self) -> None:
        from ..compare import check_checkpoint_arguments
        from ..data import check_dataset_argument

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
        metadata={
            "help": "linear, task_arithmetic, ties, dare_linear, dare_ties, slerp, breadcrumbs, della, della_linear or model_stock."
        },
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
    # breadcrumbs / della, and coefficients fitted on held-out text (`fit_merge_coefficients`)
    gamma: float | None = field(
        default=None, metadata={"help": "breadcrumbs: share of largest task-vector entries removed (default 0.01)."}
    )
    epsilon: float | None = field(
        default=None, metadata={"help": "della: keep probabilities span density +- epsilon (default 0.15)."}
    )
    fit_on: str | None = field(
        default=None,
        metadata={
            "help": "Fit the merge weights on this text (same forms as --dataset: 'builtin', a file or a saved "
            "dataset; its held-out split fit_split is used) by gradient descent; task_arithmetic or linear only."
        },
    )
    fit_split: str = field(default="validation", metadata={"help": "Split of fit_on the weights are fitted on."})
    fit_granularity: str = field(default="model", metadata={"help": "model (a weight per checkpoint) or layer."})
    fit_objective: str = field(
        default="perplexity", metadata={"help": "perplexity (held-out text) or entropy (unlabelled text)."}
    )
    fit_steps: int = field(default=20, metadata={"help": "Fitting steps (more: closer fit, slower)."})
    fit_learning_rate: float = field(default=0.1, metadata={"help": "Adam step size on the weights."})
    fit_batch_size: int = field(default=4, metadata={"help": "Blocks per fitting step (more: smoother, more memory)."})
    fit_block_size: int = field(default=128, metadata={"help": "Tokens per fitting block."})
    fit_max_blocks: int | None = field(default=None, metadata={"help": "Use only the first N fitting blocks."})

    def check(self) -> None:
        from ..loading import resolve_model_alias

        self.base = resolve_model_alias(self.base)  # `default_teacher` names the embedded SmolLM2 as a base
        if self.fit_on is not None:
            from ..data import check_dataset_argument
            from ..merge.fitting import FITTABLE_METHODS

            check_dataset_argument(self.fit_on)
            if self.method not in FITTABLE_METHODS:
                raise ValueError(
                    f"--fit_on fits the weights of {', '.join(FITTABLE_METHODS)}, not method={self.method!r}; use "
                    "--method task_arithmetic (with --base) or linear."
                )
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
    allow_pickle: bool = _allow_pickle_field()
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
    # ---- a teacher behind an OpenAI-compatible server (vLLM, llama.cpp) instead of a checkpoint ----
    teacher_url: str | None = field(
        default=None,
        metadata={
            "help": "Base URL of a server serving the teacher, e.g. http://127.0.0.1:8000/v1 (needs --tokenizer)."
        },
    )
    teacher_served_model: str | None = field(
        default=None, metadata={"help": "The served model's name (default: the one the server lists)."}
    )
    tokenizer: str | None = field(
        default=None,
        metadata={"help": "With --teacher_url: the student's tokenizer (folder, hub id or 'default_teacher')."},
    )
    concurrency: int = field(default=4, metadata={"help": "With --teacher_url: requests in flight at once."})
    request_timeout: float = field(default=300.0, metadata={"help": "With --teacher_url: seconds per request."})
    max_retries: int = field(default=4, metadata={"help": "With --teacher_url: retries of a failed request."})
    api_key_env: str = field(
        default="OPENAI_API_KEY", metadata={"help": "With --teacher_url: environment variable holding the API key."}
    )
    encoding: str | None = field(
        default=None,
        metadata={
            "help": "'float16' (format 1: all top_k float16 log-probs, 4 bytes per entry), 'compact' (format 2: "
            "adaptive k, quantised log-probs, Elias-Fano ids; 0.47x of 'float16' at its defaults) or 'sampled' "
            "(format 3: counts of --sample_draws tokens drawn from the teacher per position, an unbiased estimate).",
            "choices": ["compact", "float16", "sampled"],
        },
    )
    top_p: float | None = field(
        default=None,
        metadata={
            "help": "compact: keep per position the fewest entries reaching this mass, in (0, 1] (default 0.98; 1.0: all)."
        },
    )
    logprob_bits: int | None = field(
        default=None, metadata={"help": "compact: bits per stored log-prob: 6 (default), 8, 4 or 16 (float16)."}
    )
    compression: str | None = field(
        default=None, metadata={"help": "Arrow IPC compression of the shards: zstd or lz4 (loads into memory)."}
    )
    sample_draws: int | None = field(
        default=None, metadata={"help": "sampled: tokens drawn per position, 1 to 4096 (default 64)."}
    )
    sample_seed: int | None = field(default=None, metadata={"help": "sampled: seed of the draws (default 0)."})

    def check(self) -> None:
        super().check()
        if self.teacher_url is not None:
            if self.teacher_model_name_or_path is not None:
                raise ValueError(
                    "pass either --teacher_url (a served teacher) or --teacher_model_name_or_path (a checkpoint), "
                    "not both."
                )
            if not self.tokenizer:
                raise ValueError(
                    "--teacher_url needs --tokenizer: the student's tokenizer (e.g. 'default_teacher' for SmolLM2), "
                    "which maps the server's tokens to ids."
                )
            check_model_argument("tokenizer", self.tokenizer)
        elif not self.teacher_model_name_or_path:
            raise ValueError(
                "teacher_model_name_or_path (a checkpoint) or teacher_url (a server) is required: the teacher whose "
                "logits are cached."
            )
        from ..distill.teacher_cache.format import _checked_encoding

        _checked_encoding(
            self.encoding, self.top_p, self.logprob_bits, self.compression, self.sample_draws, self.sample_seed,
            served=self.teacher_url is not None,
        )  # fmt: skip
        check_model_argument("teacher_model_name_or_path", self.teacher_model_name_or_path)
        if not self.output_dir:
            raise ValueError("output_dir is required: the folder the cache is written to.")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}.")


def check_model_argument(name: str, value: str | None) -> None:
    """Before anything loads: a model option must name an existing path, a hub id or `default_teacher`."""
    from ..loading import DEFAULT_TEACHER_ALIAS, looks_like_hub_id

    if value is None or value == DEFAULT_TEACHER_ALIAS or os.path.exists(value) or looks_like_hub_id(value):
        return
    raise ValueError(
        f"{name} {value!r} does not exist; pass an existing checkpoint folder, a .gguf file, a hub id ('org/name') "
        "or 'default_teacher'."
    )


def _recipe_parser(dataclass_types: Sequence[type], prog: str, description: str) -> Any:
    from transformers import HfArgumentParser

    class OneLineErrorParser(HfArgumentParser):
        """An argparse error is ONE line (`PROG: error: MESSAGE`, exit 2), not the 150-line usage block first."""

        def error(self, message: str) -> None:
            message = " ".join(message.split())
            hint = "" if "--help" in message else f" (`{self.prog} --help` lists the options)"
            self.exit(2, f"{self.prog}: error: {message}{hint}\n")

    # An option two dataclasses share (distill-multi: `text_column` of the data and of the cross-tokenizer settings)
    # is one flag; parse_recipe_args hands its value to every dataclass that has the field.
    parser = OneLineErrorParser(list(dataclass_types), prog=prog, description=description, conflict_handler="resolve")
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
