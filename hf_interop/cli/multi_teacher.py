"""`hf-interop distill-multi` / `recipes/distill_multi.py`: one student distilled from several teachers.

Each teacher can bring its own training text (`teacher_datasets`): its examples are routed to it
(`teacher_combination: route`), or, mixed, every teacher teaches every example. The student's held-out perplexity is
reported per teacher's text (`eval_<name>_perplexity`) and in the model card.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from ..loading import resolve_model_alias
from ..utils import resumable_output_dir
from .arguments import DistillScriptArguments
from .common import _add_card_results, _load_blocks, _load_student


@dataclass
class MultiTeacherScriptArguments(DistillScriptArguments):
    """The student and the data of `hf-interop distill-multi` (the teachers and how they are combined are in
    :class:`~hf_interop.MultiTeacherDistillationConfig`)."""

    teacher_datasets: str | None = field(
        default=None,
        metadata={
            "help": "Teacher name -> its training text (file, folder or 'builtin'), as YAML mapping or JSON: each "
            "example is tagged with its teacher (routing). Default: every example from --dataset (mixing)."
        },
    )
    teacher_eval_datasets: str | None = field(
        default=None,
        metadata={
            "help": "Teacher name -> held-out text of its domain (default: documents carved from its training "
            "text); the student's perplexity is reported per domain."
        },
    )

    def check(self) -> None:
        super().check()
        self.teacher_datasets = _parse_mapping(self.teacher_datasets, "teacher_datasets")
        self.teacher_eval_datasets = _parse_mapping(self.teacher_eval_datasets, "teacher_eval_datasets")
        from ..data import check_dataset_argument

        for name, path in (self.teacher_datasets or {}).items():
            eval_path = (self.teacher_eval_datasets or {}).get(name)
            try:
                check_dataset_argument(path, eval_dataset=eval_path)
            except ValueError as error:
                raise ValueError(f"teacher_datasets[{name!r}]: {error}") from error


def _parse_mapping(value: Any, argument: str) -> dict[str, str] | None:
    if value is None or isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        raise ValueError(f"{argument}={value!r} is not a mapping; write it as YAML mapping or JSON object.") from error
    if not isinstance(parsed, dict) or not all(isinstance(v, str) for v in parsed.values()):
        raise ValueError(f"{argument}={value!r} must map teacher names to dataset paths.")
    return parsed


def run_distill_multi(script_args: MultiTeacherScriptArguments, config: Any) -> dict[str, Any]:
    """Distil several teachers into one student (what `hf-interop distill-multi` runs); see the module docstring.

    Returns:
        `dict` with `output_dir`, `train`, `eval` (overall and per-domain held-out metrics) and `trainer`.
    """
    from ..distill.multi_teacher.trainer import MultiTeacherDistillationTrainer

    script_args.check()
    if not config.teachers:
        raise ValueError(
            "no teachers: set teachers to a mapping of name -> checkpoint, e.g. "
            "{python_docs: outputs/lora_python_docs/merged, fortunes: outputs/lora_fortunes/merged}."
        )
    datasets = script_args.teacher_datasets or {}
    for argument, mapping in (
        ("teacher_datasets", datasets),
        ("teacher_eval_datasets", script_args.teacher_eval_datasets),
    ):
        unknown = sorted(set(mapping or {}) - set(config.teachers))
        if unknown:
            raise ValueError(
                f"{argument} names unknown teacher(s) {unknown}; the teachers are {list(config.teachers)}."
            )
    if config.teacher_combination == "route" and not datasets:
        raise ValueError(
            "teacher_combination='route' needs teacher_datasets (each teacher's training text, whose examples go to "
            "it); or use teacher_combination='mixture' with one --dataset."
        )
    if script_args.student_num_layers is not None and script_args.init_from is None:
        raise ValueError(
            "student_num_layers builds the student from a teacher's own layers: set init_from to that teacher's "
            f"checkpoint (one of {list(config.teachers.values())})."
        )
    init_from = resolve_model_alias(script_args.init_from)
    final_dir = config.output_dir
    with resumable_output_dir(final_dir, config.overwrite_output_dir, config.resume_from_checkpoint) as run:
        config.output_dir, config.resume_from_checkpoint = str(run.folder), run.resume_from_checkpoint
        student, tokenizer = _load_student(script_args, init_from, config.allow_pickle)
        domains = datasets or {None: script_args.dataset}
        train_parts, eval_parts, eval_blocks = [], [], {}
        for name, path in domains.items():
            domain_args = dataclasses.replace(
                script_args, dataset=path, eval_dataset=(script_args.teacher_eval_datasets or {}).get(name)
            )
            train_parts.append(_rows(domain_args, tokenizer, script_args.train_split, config, name, True))
            if script_args.eval_split is not None:
                eval_parts.append(_rows(domain_args, tokenizer, script_args.eval_split, config, name, False))
                eval_blocks[name] = _load_blocks(
                    domain_args, tokenizer, script_args.eval_split, script_args.max_eval_blocks
                )
        from datasets import concatenate_datasets

        train_rows = concatenate_datasets(train_parts)
        eval_rows = concatenate_datasets(eval_parts) if eval_parts else None
        trainer = MultiTeacherDistillationTrainer(
            model=student, args=config, train_dataset=train_rows, eval_dataset=eval_rows, processing_class=tokenizer
        )
        train_result = trainer.train(resume_from_checkpoint=run.resume_from_checkpoint)
        trainer.save_model()
        trainer.save_metrics("train", train_result.metrics)
        eval_metrics: dict[str, Any] = {}
        if eval_rows is not None:
            eval_metrics = trainer.evaluate()
            if "eval_ce_loss" in eval_metrics:  # eval_loss mixes KD and CE; the student's own perplexity is exp(CE)
                eval_metrics["eval_perplexity"] = math.exp(min(eval_metrics["eval_ce_loss"], 50.0))
            eval_metrics.update(_domain_perplexities(trainer, eval_blocks, config))
            trainer.save_metrics("eval", eval_metrics)
        if trainer.accelerator.is_main_process:
            _add_card_results(run.folder, "distilled", ", ".join(str(p) for p in domains.values()), eval_metrics)
        trainer.accelerator.wait_for_everyone()
    config.output_dir = final_dir
    return {"output_dir": final_dir, "train": train_result.metrics, "eval": eval_metrics, "trainer": trainer}


def _rows(domain_args: Any, tokenizer: Any, split: str, config: Any, name: str | None, train: bool) -> Any:
    """One domain's rows: packed blocks (or raw-text pieces across tokenizers), tagged with its teacher."""
    max_rows = domain_args.max_train_blocks if train else domain_args.max_eval_blocks
    if config.cross_tokenizer:
        from ..data import load_text_dataset
        from ..text_alignment import split_texts_into_chunks

        text = load_text_dataset(
            domain_args.dataset,
            split,
            eval_dataset=domain_args.eval_dataset,
            validation_split_percentage=domain_args.validation_split_percentage,
            text_column=domain_args.text_column,
        )
        rows = split_texts_into_chunks(
            text, tokenizer, max_tokens=config.max_length - 1, text_column=config.text_column
        )
        if max_rows is not None:
            rows = rows.select(range(min(max_rows, len(rows))))
    else:
        rows = _load_blocks(domain_args, tokenizer, split, max_rows)
    if name is not None:
        rows = rows.add_column(config.teacher_column, [name] * len(rows))
    return rows


def _domain_perplexities(trainer: Any, eval_blocks: dict[str | None, Any], config: Any) -> dict[str, float]:
    """The student's held-out perplexity on each teacher's text, and their mean."""
    from ..evaluation import evaluate_perplexity

    model = trainer.accelerator.unwrap_model(trainer.model)
    metrics: dict[str, float] = {}
    for name, blocks in eval_blocks.items():
        result = evaluate_perplexity(model, blocks, batch_size=config.per_device_eval_batch_size, show_progress=False)
        metrics[f"eval_{name or 'dataset'}_perplexity"] = result["perplexity"]
    if len(eval_blocks) > 1:
        values = [metrics[f"eval_{name}_perplexity"] for name in eval_blocks]
        metrics["eval_mean_domain_perplexity"] = sum(values) / len(values)
    return metrics
