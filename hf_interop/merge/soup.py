"""Greedy model soups: average fine-tuned checkpoints, keeping each one only if held-out loss improves."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..logging_utils import get_logger
from .checkpoints import (
    _COPIED_FILES,
    _check_same_tensors,
    _check_same_tokenizers,
    _write_merge_metadata,
    merge_checkpoints,
)
from .staging import merge_output_dir, naming_output_file
from .streaming import _SafetensorsCheckpoint

if TYPE_CHECKING:
    import torch
    from datasets import Dataset

logger = get_logger(__name__)


def greedy_soup(
    checkpoints: Sequence[str | os.PathLike],
    eval_dataset: Dataset,
    output_dir: str | os.PathLike | None = None,
    batch_size: int = 8,
    max_batches: int | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Greedy model soup (https://huggingface.co/papers/2203.05482): add a checkpoint only if held-out loss improves.

    Checkpoints are ranked by their own held-out loss; the soup starts with the best one, and each next candidate
    is kept only if the uniform average of the soup plus the candidate has a strictly lower loss than the soup so
    far. The final soup is written with :func:`merge_checkpoints` (`linear`, equal weights) when `output_dir` is given.

    Args:
        checkpoints (`list` of `str` or `os.PathLike`): fine-tuned checkpoints of one architecture (one tokenizer).
        eval_dataset (`Dataset`): held-out rows with `input_ids` (e.g. :func:`hf_interop.pack_dataset`).
        output_dir (`str` or `os.PathLike`, *optional*): where to write the soup.
        batch_size (`int`, *optional*, defaults to 8), max_batches (`int`, *optional*): evaluation batching.
        overwrite (`bool`, *optional*, defaults to `False`): replace an existing `output_dir`.
        show_progress (`bool`, *optional*, defaults to `True`): progress bars.

    Returns:
        `dict` with `selected` (checkpoint paths in the soup), `losses` (each checkpoint's own loss), `soup_loss`,
        `history` (one entry per candidate: its soup loss and whether it was kept) and `output_dir`.
    """
    from safetensors.torch import load_file

    from ..evaluation import evaluate_perplexity
    from ..loading import load_causal_lm

    checkpoints = [Path(path) for path in checkpoints]
    if len(checkpoints) < 1:
        raise ValueError("greedy_soup needs at least one checkpoint.")
    if "input_ids" not in getattr(eval_dataset, "column_names", []):
        raise ValueError(
            "eval_dataset needs an `input_ids` column of held-out token blocks; pack text with "
            "hf_interop.pack_dataset(dataset, tokenizer)."
        )
    if output_dir is not None and Path(output_dir).exists() and not overwrite:
        raise FileExistsError(
            f"output_dir {str(output_dir)!r} already exists; pass overwrite=True to replace it or choose another."
        )
    sources = [_SafetensorsCheckpoint(path, f"checkpoint {index}") for index, path in enumerate(checkpoints)]
    _check_same_tensors(sources)
    _check_same_tokenizers(sources)

    model, _ = load_causal_lm(checkpoints[0], load_tokenizer_too=False)

    def state_of(source: _SafetensorsCheckpoint) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        for file_name in sorted(set(source.file_of.values())):
            state.update(load_file(str(source.folder / file_name)))
        return state

    def loss_of(state: dict[str, torch.Tensor]) -> float:
        model.load_state_dict(state, strict=False)
        return evaluate_perplexity(
            model, eval_dataset, batch_size=batch_size, max_batches=max_batches, show_progress=show_progress
        )["loss"]

    losses = {str(source.folder): loss_of(state_of(source)) for source in sources}
    order = sorted(range(len(sources)), key=lambda index: losses[str(sources[index].folder)])
    best = sources[order[0]]
    soup_sum = {name: tensor.double() for name, tensor in state_of(best).items()}
    selected = [best.folder]
    soup_loss = losses[str(best.folder)]
    history = [{"checkpoint": str(best.folder), "soup_loss": soup_loss, "kept": True}]
    for index in order[1:]:
        candidate = state_of(sources[index])
        count = len(selected) + 1
        trial = {
            name: ((soup_sum[name] + candidate[name].double()) / count).to(candidate[name].dtype) for name in soup_sum
        }
        trial_loss = loss_of(trial)
        kept = trial_loss < soup_loss
        history.append({"checkpoint": str(sources[index].folder), "soup_loss": trial_loss, "kept": kept})
        logger.info(f"greedy soup: {sources[index].folder} -> loss {trial_loss:.4f} ({'kept' if kept else 'skipped'})")
        if kept:
            for name in soup_sum:
                soup_sum[name] += candidate[name].double()
            selected.append(sources[index].folder)
            soup_loss = trial_loss
    if output_dir is not None:
        _write_soup(selected, output_dir, overwrite, show_progress)
    return {
        "selected": [str(path) for path in selected],
        "losses": losses,
        "soup_loss": soup_loss,
        "history": history,
        "output_dir": None if output_dir is None else str(output_dir),
    }


def _write_soup(selected: list[Path], output_dir: str | os.PathLike, overwrite: bool, show_progress: bool) -> None:
    """Write the soup: a copy of the one kept checkpoint, or the linear merge of the kept ones."""
    if len(selected) == 1:
        copied = [
            path
            for path in selected[0].iterdir()
            if path.is_file() and (path.suffix == ".safetensors" or _COPIED_FILES.match(path.name))
        ]
        needed_bytes = sum(path.stat().st_size for path in copied)
        with merge_output_dir(Path(output_dir), overwrite, needed_bytes) as tmp_dir:
            for path in copied:
                with naming_output_file(tmp_dir / path.name):
                    shutil.copyfile(path, tmp_dir / path.name)
            _write_merge_metadata(
                tmp_dir,
                {"method": "greedy_soup", "checkpoints": [str(selected[0])], "weights": [1.0], "base": None},
                model_name=None,
            )
    else:
        merge_checkpoints(selected, "linear", output_dir=output_dir, overwrite=overwrite, show_progress=show_progress)
