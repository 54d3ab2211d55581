"""Steps the recipe commands share: packing a dataset argument into blocks, loading or building the student, and
adding held-out results to a model card (used by `run_distill`, `run_distill_multi` and the others)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..loading import resolve_model_alias
from .arguments import DataArguments, DistillScriptArguments


def _load_blocks(data_args: DataArguments, tokenizer: Any, split: str, max_blocks: int | None) -> Any:
    """A split as packed blocks (`input_ids`, `attention_mask`, `labels`); already tokenized rows are kept."""
    from ..data import load_text_dataset, pack_dataset

    dataset = load_text_dataset(
        data_args.dataset,
        split,
        eval_dataset=getattr(data_args, "eval_dataset", None),
        validation_split_percentage=getattr(data_args, "validation_split_percentage", 5.0),
        text_column=data_args.text_column,
    )
    if "input_ids" in dataset.column_names:
        if max_blocks is not None:
            dataset = dataset.select(range(min(max_blocks, len(dataset))))
        return dataset
    return pack_dataset(
        dataset, tokenizer, block_size=data_args.block_size, text_column=data_args.text_column, max_blocks=max_blocks
    )


def _load_student(script_args: DistillScriptArguments, init_from: str | None, allow_pickle: bool) -> tuple[Any, Any]:
    """The student checkpoint, or a student built from the teacher's own layers (`student_num_layers`)."""
    from ..distill.student_init import init_student_from_teacher
    from ..loading import load_causal_lm, load_tokenizer

    if script_args.student_model_name_or_path is not None:
        return load_causal_lm(
            resolve_model_alias(script_args.student_model_name_or_path),
            dtype=script_args.model_dtype,
            allow_pickle=allow_pickle,
        )
    student = init_student_from_teacher(
        init_from,
        num_layers=script_args.student_num_layers,
        layer_selection=script_args.student_layer_selection,
        intermediate_size=script_args.student_intermediate_size,
        allow_pickle=allow_pickle,
    )
    return student, load_tokenizer(init_from)


def _add_card_results(folder: Path, kind: str, dataset: str, eval_metrics: dict[str, Any]) -> None:
    """Re-render the card the trainer wrote with the training data and held-out results, keeping its lineage."""
    from ..hub.outputs import update_card_metrics

    metrics = {
        key.removeprefix("eval_"): float(value)
        for key, value in eval_metrics.items()
        if key in ("eval_loss", "eval_ce_loss", "eval_kd_loss", "eval_perplexity", "eval_top1_agreement")
        or key.endswith("_perplexity")  # per-domain results of distill-multi
    }
    update_card_metrics(folder, kind, metrics, [dataset])
