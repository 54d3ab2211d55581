"""`hf-interop multitask` / `recipes/multitask.py`: one model trained on several text domains (one causal-LM task each)
plus a classification task over the same text (which domain a paragraph comes from), with `MultiTaskTrainer`."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..loading import resolve_model_alias
from ..logging_utils import get_logger
from ..utils import resumable_output_dir
from .arguments import _allow_pickle_field, check_model_argument

logger = get_logger(__name__)


@dataclass
class MultiTaskScriptArguments:
    """The model, the tasks and the adapters of `hf-interop multitask` (sampling, weighting and training settings are
    in :class:`~hf_interop.MultiTaskConfig`)."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "Base model (folder, hub id, .gguf)."})
    model_dtype: str = field(default="float32", metadata={"help": "dtype of the base weights (float32, bfloat16)."})
    domains: list[str] = field(
        default_factory=list,
        metadata={"help": "Causal-LM tasks as NAME=TRAIN.txt (documents separated by blank lines), one per domain."},
    )
    eval_domains: list[str] | None = field(
        default=None, metadata={"help": "Held-out text as NAME=EVAL.txt, for the domains to evaluate."}
    )
    classification_task: str | None = field(
        default="domain",
        metadata={"help": "Name of the task that classifies which domain a paragraph comes from; 'none' skips it."},
    )
    classification_tokens: int = field(default=64, metadata={"help": "Tokens of a paragraph the classifier sees."})
    max_classification_rows: int | None = field(
        default=512, metadata={"help": "Paragraphs per domain for the classification task (train and eval alike)."}
    )
    block_size: int = field(default=128, metadata={"help": "Tokens per packed causal-LM block."})
    max_train_blocks: int | None = field(default=None, metadata={"help": "Training blocks per domain (default all)."})
    max_eval_blocks: int | None = field(default=None, metadata={"help": "Held-out blocks per domain (default all)."})
    use_lora: bool = field(default=True, metadata={"help": "Train LoRA adapters on the backbone (else all weights)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (higher: more capacity and memory)."})
    lora_alpha: float = field(default=32, metadata={"help": "LoRA scale numerator: updates are scaled by alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input, in [0, 1)."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names to adapt (e.g. q_proj v_proj); default every linear layer."}
    )
    allow_pickle: bool = _allow_pickle_field()
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace an existing output_dir (otherwise an existing one is an error)."}
    )

    def check(self) -> None:
        """Validate without loading anything: names, files, sizes."""
        if not self.model_name_or_path:
            raise ValueError("model_name_or_path is required: the shared backbone (folder, hub id, .gguf).")
        check_model_argument("model_name_or_path", self.model_name_or_path)
        if isinstance(self.classification_task, str) and self.classification_task.lower() in ("", "none", "null"):
            self.classification_task = None
        train = _named_files(self.domains, "domains")
        if len(train) < (2 if self.classification_task else 1):
            raise ValueError(
                f"domains has {len(train)} entr{'y' if len(train) == 1 else 'ies'}; give at least "
                f"{2 if self.classification_task else 1} as NAME=TRAIN.txt (a classification task needs two domains)."
            )
        evals = _named_files(self.eval_domains or [], "eval_domains")
        unknown = [name for name in evals if name not in train]
        if unknown:
            raise ValueError(f"eval_domains names {unknown}, which are not in domains {list(train)}; fix the names.")
        if self.classification_task in train:
            raise ValueError(
                f"classification_task {self.classification_task!r} is also a domain's name; give it another name."
            )
        for name in ("block_size", "classification_tokens"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be >= 2, got {getattr(self, name)}.")
        for name in ("max_train_blocks", "max_eval_blocks", "max_classification_rows"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or unset for all), got {value}.")


def _named_files(entries: list[str], argument: str) -> dict[str, Path]:
    named: dict[str, Path] = {}
    for entry in entries:
        name, separator, path = entry.partition("=")
        if not separator or not name or not path:
            raise ValueError(
                f"{argument} entry {entry!r} is not NAME=FILE; e.g. python_docs=texts/python_docs/train.txt"
            )
        if name in named:
            raise ValueError(f"{argument} names {name!r} twice; give every domain its own name.")
        if not Path(path).is_file():
            raise ValueError(
                f"{argument} file {path!r} (task {name!r}) does not exist; write it first (e.g. "
                "recipes/smollm2-135m_merge_domains/prepare_texts.py)."
            )
        named[name] = Path(path)
    return named


def _documents(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    return [document.strip() for document in re.split(r"\n\s*\n", text) if len(document.strip()) > 20]


def _lm_blocks(path: Path, tokenizer: Any, block_size: int, max_blocks: int | None) -> Any:
    from datasets import Dataset

    from ..data import pack_dataset

    documents = Dataset.from_dict({"text": _documents(path)})
    return pack_dataset(documents, tokenizer, block_size=block_size, max_blocks=max_blocks)


def _classification_rows(files: dict[str, Path], tokenizer: Any, tokens: int, per_domain: int | None) -> Any:
    """Paragraphs of every domain, interleaved, labelled with the domain's index."""
    from datasets import Dataset

    per_label = []
    for label, path in enumerate(files.values()):
        documents = _documents(path)[:per_domain]
        ids = tokenizer(documents, truncation=True, max_length=tokens)["input_ids"]
        per_label.append([(row, label) for row in ids if len(row) >= 4])
    rows = [pair for group in zip(*per_label, strict=False) for pair in group]  # balanced: as many of each domain
    return Dataset.from_dict({"input_ids": [r for r, _ in rows], "labels": [label for _, label in rows]})


def run_multitask(script_args: MultiTaskScriptArguments, config: Any) -> dict[str, Any]:
    """Train one model on several domains and a domain classifier: what `hf-interop multitask` runs.

    Writes (staged and resumable like `distill`) the `MultiTaskModel` (`backbone/` with the LoRA adapter or the full
    model, `task_heads.safetensors`), the tokenizer, `multitask_state.json` and a `multitask` model card listing the
    tasks, their weights and held-out results.
    """
    from transformers import set_seed

    from ..loading import load_causal_lm
    from ..multitask.trainer import MultiTaskTrainer
    from ..multitask.weighting import check_task_weights

    script_args.check()
    train_files = _named_files(script_args.domains, "domains")
    eval_files = _named_files(script_args.eval_domains or [], "eval_domains")
    task_names = [*train_files, *([script_args.classification_task] if script_args.classification_task else [])]
    check_task_weights(config.task_weights, task_names, "task_weights")  # before any model is loaded
    final_dir = config.output_dir
    resume = config.resume_from_checkpoint
    with resumable_output_dir(final_dir, script_args.overwrite_output_dir, resume) as run:
        config.output_dir, config.resume_from_checkpoint = str(run.folder), run.resume_from_checkpoint
        base = resolve_model_alias(script_args.model_name_or_path)
        model, tokenizer = load_causal_lm(base, dtype=script_args.model_dtype, allow_pickle=script_args.allow_pickle)
        train = {
            name: _lm_blocks(path, tokenizer, script_args.block_size, script_args.max_train_blocks)
            for name, path in train_files.items()
        }
        evals = {
            name: _lm_blocks(path, tokenizer, script_args.block_size, script_args.max_eval_blocks)
            for name, path in eval_files.items()
        }
        heads = None
        if script_args.classification_task:
            task = script_args.classification_task
            heads = {task: {"type": "classification", "num_labels": len(train_files)}}
            rows = script_args.max_classification_rows
            train[task] = _classification_rows(train_files, tokenizer, script_args.classification_tokens, rows)
            if len(eval_files) == len(train_files):
                evals[task] = _classification_rows(eval_files, tokenizer, script_args.classification_tokens, rows)
        lora = None
        if script_args.use_lora:
            from ..adapters import build_lora_config

            lora = build_lora_config(
                r=script_args.lora_r,
                lora_alpha=script_args.lora_alpha,
                lora_dropout=script_args.lora_dropout,
                target_modules=script_args.lora_target_modules,
                model=model,
            )
        set_seed(config.seed)  # the adapters' and heads' initialisation
        trainer = MultiTaskTrainer(
            model=model,
            args=config,
            train_dataset=train,
            eval_dataset=evals or None,
            processing_class=tokenizer,
            heads=heads,
            peft_config=lora,
        )
        train_result = trainer.train(resume_from_checkpoint=run.resume_from_checkpoint)
        trainer.save_model()
        trainer.save_metrics("train", train_result.metrics)
        eval_metrics: dict[str, Any] = trainer.evaluate() if evals else {}
        if eval_metrics:
            trainer.save_metrics("eval", eval_metrics)
        if trainer.accelerator.is_main_process:
            _write_card(trainer, run.folder, base, script_args, train, eval_metrics)
        trainer.accelerator.wait_for_everyone()
    config.output_dir = final_dir
    return {"output_dir": final_dir, "train": train_result.metrics, "eval": eval_metrics, "trainer": trainer}


def _write_card(trainer: Any, folder: Path, base: str, script_args: Any, train: dict, eval_metrics: dict) -> None:
    from ..hub.cards import write_model_card
    from ..multitask.weighting import effective_weights

    args = trainer.args
    weights = effective_weights(args.task_weighting, trainer.static_weights, trainer.log_variances)
    tasks = []
    for task, weight in zip(trainer.task_names, weights, strict=True):
        result = None
        for metric in ("perplexity", "accuracy"):
            value = eval_metrics.get(f"eval_{task}_{metric}")
            if value is not None:
                result = f"{metric} {value:.4g}"
        tasks.append(
            {
                "name": task,
                "type": trainer.task_types[task],
                "weight": round(float(weight), 4),
                "result": result,
                "rows": len(train[task]),
            }
        )
    metrics = {
        key.removeprefix("eval_"): float(value)
        for key, value in eval_metrics.items()
        if key.endswith(("_loss", "_perplexity", "_accuracy")) and isinstance(value, (int, float))
    }
    hyperparameters = {
        "task_sampling": args.task_sampling,
        "task_weighting": args.task_weighting,
        "learning_rate": args.learning_rate,
        "max_steps": args.max_steps,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "seed": args.seed,
    }
    if args.task_sampling == "temperature":
        hyperparameters["sampling_temperature"] = args.sampling_temperature
    if script_args.use_lora:
        hyperparameters.update(lora_r=script_args.lora_r, lora_alpha=script_args.lora_alpha)
    write_model_card(
        folder,
        "multitask",
        base_model=base,
        tasks=tasks,
        datasets=[str(path) for path in script_args.domains],
        metrics={k: v for k, v in metrics.items() if math.isfinite(v)},
        hyperparameters=hyperparameters,
        model_name=Path(args.output_dir).name if args.output_dir else None,
    )
