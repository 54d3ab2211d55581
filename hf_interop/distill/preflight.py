"""What `DistillationTrainer` checks before it loads a student or a teacher: the datasets and the output folder; and
the warning about bfloat16 on a CPU that only emulates it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..logging_utils import get_logger
from ..utils import OVERWRITE_FLAG, cpu_has_native_bf16, last_complete_checkpoint
from .teacher_cache.format import _check_input_ids_column

logger = get_logger(__name__)

# Files at the top of a folder that mean a model (or adapter) was saved there; training would replace them.
SAVED_MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "tokenizer_config.json",
    "tokenizer.json",
)


def _check_datasets(train_dataset: Any, eval_dataset: Any, needs_input_ids: bool) -> None:
    """Refuse datasets the Trainer would fail on later (after the teacher loaded): no `input_ids` column (when the
    default collator, which pads `input_ids`, is used) and no rows. Streams and datasets without columns pass."""
    named = [("train_dataset", train_dataset)]
    if isinstance(eval_dataset, dict):
        named += [(f"eval_dataset[{key!r}]", value) for key, value in eval_dataset.items()]
    else:
        named.append(("eval_dataset", eval_dataset))
    for name, dataset in named:
        if dataset is None:
            continue
        if needs_input_ids and isinstance(getattr(dataset, "column_names", None), list):
            try:
                _check_input_ids_column(dataset)
            except ValueError as error:
                raise ValueError(f"{name}: {error}") from error
        try:
            num_rows = len(dataset)
        except TypeError:  # an iterable dataset: its length is unknown
            continue
        if num_rows == 0:
            purpose = "train on" if name == "train_dataset" else "evaluate on"
            raise ValueError(
                f"{name} is empty (0 rows); there is nothing to {purpose}. Pack some text first "
                "(hf_interop.pack_dataset), or check the split or filter that produced it."
            )


def _saved_model_files(output_dir: str | None) -> list[str]:
    if not output_dir:
        return []
    folder = Path(output_dir)
    return [name for name in SAVED_MODEL_FILES if (folder / name).is_file()]


def _check_output_dir(args: Any, resume_from_checkpoint: str | None, at_train: bool) -> None:
    """Refuse to train into an `output_dir` that holds a saved model, unless `args.overwrite_output_dir`.

    Resuming one of that folder's own checkpoints is allowed. The constructor (`at_train=False`) does not know yet
    whether `train()` will resume: it refuses only a folder without a complete checkpoint (nothing to resume), before
    anything loads; `train()` (`at_train=True`) decides the rest.
    """
    if args.overwrite_output_dir:
        return
    found = _saved_model_files(args.output_dir)
    if not found:
        return
    last = last_complete_checkpoint(args.output_dir)
    if not at_train and last is not None:
        return
    if resume_from_checkpoint is not None:
        if Path(resume_from_checkpoint).resolve().parent == Path(args.output_dir).resolve():
            return
    resume = f", train(resume_from_checkpoint=True) to continue from its {last.name}" if last is not None else ""
    raise FileExistsError(
        f"output_dir {str(args.output_dir)!r} already holds a saved model ({', '.join(found)}), which training "
        f"would overwrite; pass overwrite_output_dir=True (CLI: {OVERWRITE_FLAG}) to replace it{resume}, or choose "
        "another output_dir."
    )


def _warn_if_emulated_bf16(args: Any) -> None:
    """Once per process: `bf16=True` training on a CPU without native bfloat16 matmuls is much slower than float32."""
    if not args.bf16 or args.device.type != "cpu" or cpu_has_native_bf16() is not False:
        return
    logger.warning_once(
        "bf16=True on a CPU without native bfloat16 matmuls (no avx512_bf16, amx_bf16 or bf16 flag in /proc/cpuinfo): "
        "torch emulates them, and bfloat16 autocast training ran about 15x slower than float32 on an AMD EPYC without "
        "avx512_bf16 (measured with benchmarks/bench_trainer.py). Set bf16=False to train in float32."
    )
