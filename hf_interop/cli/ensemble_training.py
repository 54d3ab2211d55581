"""`hf-interop bag` and `hf-interop boost` (= `recipes/bag.py`, `recipes/boost.py`): train a bagged or boosted
ensemble of causal LMs (on packed text) or of sequence classifiers (one text file per class, a paragraph per
example), with LoRA members on one base by default. Rerunning the same command resumes after the last finished member.
`recipes.py` registers them and passes its block loader in (`load_blocks`), so this module does not import it back.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..loading import resolve_model_alias
from ..logging_utils import get_logger
from .arguments import OVERWRITE_FLAG_FIX, DataArguments, check_model_argument

logger = get_logger(__name__)


@dataclass
class EnsembleTrainingScriptArguments(DataArguments):
    """The base model and the data of `hf-interop bag` / `hf-interop boost` (the ensemble options are in
    :class:`~hf_interop.BaggingConfig` / :class:`~hf_interop.BoostingConfig`)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Base checkpoint every member starts from (folder, hub id, default_teacher)."}
    )
    label_files: list[str] | None = field(
        default=None,
        metadata={
            "help": "Train classifiers: one text file per class (paragraphs separated by blank lines are the "
            "examples, the file's folder name is the label). Without it the members are causal LMs on --dataset."
        },
    )
    eval_label_files: list[str] | None = field(
        default=None, metadata={"help": "Held-out files of the same classes, in the same order as --label_files."}
    )
    max_length: int = field(default=128, metadata={"help": "Tokens kept per classification example."})
    max_examples_per_class: int | None = field(
        default=None, metadata={"help": "Use only the first N paragraphs of every class file (quick runs)."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace a finished ensemble in output_dir (an unfinished run is resumed without it)."},
    )

    def check(self) -> None:
        super().check()
        if not self.model_name_or_path:
            raise ValueError("model_name_or_path is required: the base checkpoint the members start from.")
        check_model_argument("model_name_or_path", self.model_name_or_path)
        for name in ("label_files", "eval_label_files"):
            for path in getattr(self, name) or []:
                if not Path(path).is_file():
                    raise ValueError(f"{name} entry {path!r} does not exist; pass text files, one per class.")
        if self.label_files is not None and len(self.label_files) < 2:
            raise ValueError(
                f"label_files has {len(self.label_files)} file(s); a classifier needs one per class, >= 2."
            )
        if self.eval_label_files and len(self.eval_label_files) != len(self.label_files or []):
            raise ValueError(
                f"eval_label_files has {len(self.eval_label_files)} files but label_files {len(self.label_files or [])}; "
                "give one held-out file per class, in the same order."
            )


def labelled_paragraphs(files: list[str], tokenizer: Any, max_length: int, limit: int | None = None) -> Any:
    """A classification dataset: every paragraph of `files[i]` is an example of class `i` (tokenized)."""
    from datasets import Dataset

    texts, labels = [], []
    for label, path in enumerate(files):
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n", Path(path).read_text(encoding="utf-8")) if p.strip()]
        paragraphs = paragraphs[:limit] if limit else paragraphs
        texts += paragraphs
        labels += [label] * len(paragraphs)
    if not texts:
        raise ValueError(f"label files {files} hold no paragraphs; they must contain text separated by blank lines.")
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    return Dataset.from_dict({"input_ids": encoded["input_ids"], "label": labels})


def _prepare(
    script_args: EnsembleTrainingScriptArguments, config: Any, load_blocks: Callable[..., Any]
) -> tuple[str, Any, Any, Any]:
    from ..loading import load_tokenizer
    from ..utils import check_output_dir

    script_args.check()
    output_dir = Path(config.output_dir)
    if (output_dir / "config.json").is_file():
        if not script_args.overwrite_output_dir:
            check_output_dir(output_dir, False, fix=OVERWRITE_FLAG_FIX)
        shutil.rmtree(output_dir)
    model = resolve_model_alias(script_args.model_name_or_path)
    tokenizer = load_tokenizer(model)
    if script_args.label_files:
        train = labelled_paragraphs(
            script_args.label_files, tokenizer, script_args.max_length, script_args.max_examples_per_class
        )
        evaluation = None
        if script_args.eval_label_files:
            evaluation = labelled_paragraphs(script_args.eval_label_files, tokenizer, script_args.max_length)
        config.num_labels = len(script_args.label_files)
        return model, tokenizer, train, evaluation
    train = load_blocks(script_args, tokenizer, script_args.train_split, script_args.max_train_blocks)
    evaluation = None
    if script_args.eval_split is not None:
        evaluation = load_blocks(script_args, tokenizer, script_args.eval_split, script_args.max_eval_blocks)
    return model, tokenizer, train, evaluation


def _evaluate(ensemble: Any, dataset: Any, trainer: Any) -> dict[str, float]:
    if dataset is None:
        return {}
    if trainer.task == "causal_lm":
        from ..evaluation import evaluate_perplexity

        result = evaluate_perplexity(ensemble, dataset, batch_size=8, show_progress=not trainer.args.disable_tqdm)
        return {"eval_loss": result["loss"], "eval_perplexity": result["perplexity"]}
    import torch

    correct = 0
    with torch.no_grad():
        for start in range(0, len(dataset), 16):
            batch = trainer.collator([dataset[i] for i in range(start, min(len(dataset), start + 16))])
            logits = ensemble(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
    return {"eval_accuracy": correct / len(dataset)}


def run_bag(
    script_args: EnsembleTrainingScriptArguments, config: Any, load_blocks: Callable[..., Any]
) -> dict[str, Any]:
    """Train a bagged ensemble (`hf-interop bag`), report its out-of-bag and held-out scores."""
    from ..ensemble.bagging import BaggingTrainer

    model, tokenizer, train, evaluation = _prepare(script_args, config, load_blocks)
    trainer = BaggingTrainer(model, config, train, eval_dataset=evaluation, processing_class=tokenizer)
    ensemble = trainer.train()
    metrics = _evaluate(ensemble, evaluation, trainer)
    return {"output_dir": config.output_dir, "eval": metrics, "oob": trainer.oob_scores_, "ensemble": ensemble}


def run_boost(
    script_args: EnsembleTrainingScriptArguments, config: Any, load_blocks: Callable[..., Any]
) -> dict[str, Any]:
    """Train a boosted ensemble (`hf-interop boost`), report member weights and held-out scores."""
    from ..ensemble.boosting import BoostingTrainer

    model, tokenizer, train, evaluation = _prepare(script_args, config, load_blocks)
    trainer = BoostingTrainer(model, config, train, eval_dataset=evaluation, processing_class=tokenizer)
    ensemble = trainer.train()
    metrics = _evaluate(ensemble, evaluation, trainer)
    if evaluation is not None and trainer.task == "sequence_classification":
        metrics["eval_staged_accuracy"] = trainer.staged_score(evaluation)
    return {
        "output_dir": config.output_dir,
        "eval": metrics,
        "estimator_weights": trainer.estimator_weights_,
        "ensemble": ensemble,
    }


def bagging_config_class() -> type:
    from ..ensemble.bagging import BaggingConfig

    return BaggingConfig


def boosting_config_class() -> type:
    from ..ensemble.boosting import BoostingConfig

    return BoostingConfig
