"""Merge coefficients learned on held-out text (:func:`fit_merge_coefficients`), AdaMerging-style
(https://huggingface.co/papers/2310.02575): per-model or per-layer weights of task arithmetic or a linear merge,
fitted by gradient descent on held-out perplexity or on the entropy of the predictions on unlabelled text.

Memory: no model is held but the merged one. Each step builds the merged tensors from the checkpoint files one
tensor at a time (`base * (1 - sum(c)) + sum(c_i * theta_i)`), runs a functional forward
(`torch.func.functional_call`) of a skeleton model whose parameters are on the meta device, one block of the
batch at a time, and, as each merged tensor's gradient arrives in the backward pass, turns it into the
coefficients' gradient (`<grad, theta_i - base>`, with `theta_i` and `base` read again from disk) and frees it.
Peak memory is about one model, one block's activations and one tensor's gradient; the price is reading every
checkpoint once to build the merge and once more per block of each step.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..logging_utils import get_logger
from .checkpoints import _check_same_tensors, _check_same_tokenizers, merge_checkpoints
from .streaming import CHUNK_ELEMENTS, _SafetensorsCheckpoint

if TYPE_CHECKING:
    from datasets import Dataset

logger = get_logger(__name__)

FITTABLE_METHODS = ("task_arithmetic", "linear")
FIT_GRANULARITIES = ("model", "layer")
FIT_OBJECTIVES = ("perplexity", "entropy")

_LAYER_PATTERN = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def coefficient_group(tensor_name: str, granularity: str) -> str:
    """The coefficient group of a tensor: `"all"` per model, else `"layers.<k>"` for a decoder layer's tensors and
    the tensor's module path (e.g. `"model.embed_tokens"`) for the others."""
    if granularity == "model":
        return "all"
    match = _LAYER_PATTERN.search(tensor_name)
    if match:
        return f"layers.{int(match.group(1))}"
    return tensor_name.rsplit(".", 1)[0] if "." in tensor_name else tensor_name


def objective_loss(logits: torch.Tensor, input_ids: torch.Tensor, objective: str) -> torch.Tensor:
    """Mean next-token negative log-likelihood (`perplexity`, its log) or mean predictive entropy (`entropy`,
    AdaMerging's label-free objective) over the positions of `logits` (batch, length, vocab)."""
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    if objective == "perplexity":
        return -log_probs.gather(-1, input_ids[:, 1:, None]).mean()
    return -(log_probs.exp() * log_probs).sum(-1).mean()


def _check_fit_arguments(
    checkpoints: Sequence[Any],
    base: Any,
    method: str,
    granularity: str,
    objective: str,
    initial_weights: Sequence[float] | None,
    num_steps: int,
    learning_rate: float,
    batch_size: int,
    eval_dataset: Any,
) -> None:
    if isinstance(checkpoints, (str, os.PathLike)):
        raise ValueError("checkpoints must be a list of checkpoint folders, not a single path.")
    if method not in FITTABLE_METHODS:
        raise ValueError(
            f"method={method!r} cannot be fitted; fit_merge_coefficients learns the weights of "
            f"{', '.join(FITTABLE_METHODS)} (merge the fitted weights with another method by hand)."
        )
    if method == "task_arithmetic" and base is None:
        raise ValueError("method='task_arithmetic' needs base=<the model the checkpoints were fine-tuned from>.")
    if method == "linear" and base is not None:
        raise ValueError("method='linear' averages the checkpoints and takes no base; leave base out.")
    minimum = 2 if method == "linear" else 1
    if len(checkpoints) < minimum:
        raise ValueError(f"method={method!r} needs at least {minimum} checkpoints, got {len(checkpoints)}.")
    if granularity not in FIT_GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} must be one of {', '.join(FIT_GRANULARITIES)}.")
    if objective not in FIT_OBJECTIVES:
        raise ValueError(
            f"objective={objective!r} must be 'perplexity' (held-out text) or 'entropy' (unlabelled text)."
        )
    if initial_weights is not None and (
        len(initial_weights) != len(checkpoints)
        or not all(isinstance(w, (int, float)) and math.isfinite(w) for w in initial_weights)
        or (method == "linear" and any(w <= 0 for w in initial_weights))
    ):
        raise ValueError(
            f"initial_weights={list(initial_weights)} must hold {len(checkpoints)} finite numbers, one per "
            "checkpoint (positive for linear)."
        )
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r} must be an integer >= 1.")
    if not isinstance(learning_rate, (int, float)) or not learning_rate > 0:
        raise ValueError(f"learning_rate={learning_rate!r} must be > 0.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1.")
    if "input_ids" not in getattr(eval_dataset, "column_names", []):
        raise ValueError(
            "eval_dataset needs an `input_ids` column of held-out token blocks; pack text with "
            "hf_interop.pack_dataset(dataset, tokenizer)."
        )
    if len(eval_dataset) == 0:
        raise ValueError("eval_dataset is empty: the coefficients are fitted on its blocks; pass held-out text.")


def fit_merge_coefficients(
    checkpoints: Sequence[str | os.PathLike],
    eval_dataset: Dataset,
    base: str | os.PathLike | None = None,
    method: str = "task_arithmetic",
    *,
    granularity: str = "model",
    objective: str = "perplexity",
    initial_weights: Sequence[float] | None = None,
    num_steps: int = 20,
    learning_rate: float = 0.1,
    batch_size: int = 4,
    seed: int = 0,
    output_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
    show_progress: bool = True,
) -> dict[str, Any]:
    """Learn merge coefficients by gradient descent on held-out text, then (with `output_dir`) write the merge.

    The merged model is `base + sum_i c[g, i] * (theta_i - base)` (`task_arithmetic`) or
    `sum_i softmax(c[g])_i * theta_i` (`linear`, weights positive and summing to 1), with one coefficient per
    checkpoint and tensor group `g`: the whole model (`granularity="model"`) or each decoder layer and each other
    module (`"layer"`, AdaMerging's layer-wise merging). Adam minimises the mean next-token loss on `eval_dataset`
    (`objective="perplexity"`) or the mean entropy of the predictions (`"entropy"`, needs no labels). See the module
    docstring for how memory stays near one model. The merge is then written by :func:`merge_checkpoints` with the
    fitted per-tensor weights, which the model card and lineage manifest record.

    Args:
        checkpoints (`list` of `str` or `os.PathLike`): fine-tuned checkpoints (safetensors) of one architecture.
        eval_dataset (`Dataset`): held-out rows with `input_ids` (:func:`hf_interop.pack_dataset`), not used for
            training the checkpoints; batches cycle through it in a seeded order.
        base (`str` or `os.PathLike`, *optional*): the model the checkpoints were fine-tuned from
            (`task_arithmetic`).
        method (`str`, *optional*, defaults to `"task_arithmetic"`): `task_arithmetic` or `linear`.
        granularity (`str`, *optional*, defaults to `"model"`): `model` (one coefficient per checkpoint) or
            `layer` (one per checkpoint and layer).
        objective (`str`, *optional*, defaults to `"perplexity"`): `perplexity` or `entropy`.
        initial_weights (`list[float]`, *optional*): starting coefficients, one per checkpoint; defaults to 1/N
            each (the uniform soup, for both methods).
        num_steps (`int`, *optional*, defaults to 20): optimisation steps, one batch each (more: closer fit,
            slower; each step reads every checkpoint twice).
        learning_rate (`float`, *optional*, defaults to 0.1): Adam's step size on the coefficients (a coefficient moves
            by about this much per step: 20 steps at 0.1 beat the greedy soup in `benchmarks/bench_merge.py`, 6 at
            0.05 did not).
        batch_size (`int`, *optional*, defaults to 4): blocks per step (larger: smoother, more activation memory).
        seed (`int`, *optional*, defaults to 0): order of the batches.
        output_dir (`str` or `os.PathLike`, *optional*): where to write the merge with the fitted coefficients.
        overwrite (`bool`, *optional*, defaults to `False`), max_shard_size, show_progress: as in
            :func:`merge_checkpoints`.

    Returns:
        `dict` with `coefficients` (group -> one weight per checkpoint, as written), `history` (the objective at
        each step, before its update), `method`, `granularity`, `objective` and `output_dir`.

    Example:

    ```python
    >>> fit = fit_merge_coefficients(["code", "quotes", "jargon"], held_out, base="base", granularity="layer",
    ...                              output_dir="merged")
    ```
    """
    from tqdm.auto import tqdm

    _check_fit_arguments(
        checkpoints,
        base,
        method,
        granularity,
        objective,
        initial_weights,
        num_steps,
        learning_rate,
        batch_size,
        eval_dataset,
    )
    checkpoints = [Path(path) for path in checkpoints]
    if output_dir is not None and Path(output_dir).exists() and not overwrite:
        raise FileExistsError(
            f"output_dir {str(output_dir)!r} already exists; pass overwrite=True to replace it or choose another."
        )
    sources = [_SafetensorsCheckpoint(path, f"checkpoint {index}") for index, path in enumerate(checkpoints)]
    base_source = _SafetensorsCheckpoint(base, "base") if base is not None else None
    _check_same_tensors([*sources, *([base_source] if base_source else [])])
    _check_same_tokenizers([*sources, *([base_source] if base_source else [])])

    model = _skeleton(base if base is not None else checkpoints[0])
    state_names = set(model.state_dict())
    first = sources[0]
    # Aliases of tied weights (lm_head.weight of tied embeddings) are left out: functional_call ties them to the
    # tensor given for the name they alias, which a checkpoint saving both copies would otherwise contradict.
    tied_aliases = {name for name, _ in model.named_parameters(remove_duplicate=False)} - {
        name for name, _ in model.named_parameters()
    }
    names = [
        name
        for name in sorted(first.shapes)
        if name in state_names and name not in tied_aliases and getattr(torch, first.dtypes[name]).is_floating_point
    ]
    missing = sorted(name for name, _ in model.named_parameters() if name not in first.shapes)
    if missing:
        raise ValueError(
            f"the checkpoints lack parameters the model has ({missing[:3]}); they do not match its config."
        )
    groups = sorted({coefficient_group(name, granularity) for name in names})
    group_index = {name: groups.index(coefficient_group(name, granularity)) for name in names}

    count = len(sources)
    # Both start from the uniform soup (1/N each) unless told otherwise: a point known to be reasonable, where plain
    # task arithmetic (1.0 each) adds N task vectors and can land far from every fine-tune.
    start = list(initial_weights) if initial_weights is not None else [1.0 / count] * count
    if method == "task_arithmetic":
        raw = torch.tensor([start] * len(groups), dtype=torch.float64)
    else:
        raw = torch.log(torch.tensor([start] * len(groups), dtype=torch.float64) / sum(start))
    raw.requires_grad_(True)
    optimizer = torch.optim.Adam([raw], lr=learning_rate)

    def mixing_of(raw: torch.Tensor) -> torch.Tensor:
        return raw if method == "task_arithmetic" else torch.softmax(raw, dim=1)

    order = torch.randperm(len(eval_dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    history: list[float] = []
    progress = tqdm(range(num_steps), desc=f"Fitting {method} coefficients", disable=not show_progress)
    for step in progress:
        rows = [order[(step * batch_size + offset) % len(order)] for offset in range(batch_size)]
        input_ids = torch.tensor([eval_dataset[row]["input_ids"] for row in rows], dtype=torch.long)
        mixing = mixing_of(raw)
        loss, mixing_gradient = merged_objective_and_gradient(
            model, names, group_index, sources, base_source, mixing.detach(), input_ids, objective
        )
        history.append(loss)
        progress.set_postfix(loss=f"{history[-1]:.4f}")
        optimizer.zero_grad()
        mixing.backward(mixing_gradient)
        optimizer.step()
    progress.close()

    final = mixing_of(raw).detach()
    coefficients = {group: [float(value) for value in final[index]] for index, group in enumerate(groups)}
    logger.info(f"fit_merge_coefficients: objective {history[0]:.4f} -> {history[-1]:.4f} over {num_steps} steps")
    result = {
        "coefficients": coefficients,
        "history": history,
        "method": method,
        "granularity": granularity,
        "objective": objective,
        "output_dir": None if output_dir is None else str(output_dir),
    }
    if output_dir is not None:
        del model
        all_names = sorted(first.shapes)
        merge_checkpoints(
            checkpoints,
            method,
            weights=coefficients[groups[0]] if granularity == "model" else None,
            base=base,
            output_dir=output_dir,
            overwrite=overwrite,
            max_shard_size=max_shard_size,
            show_progress=show_progress,
            tensor_weights={
                name: coefficients[coefficient_group(name, granularity)]
                for name in all_names
                if coefficient_group(name, granularity) in coefficients
            },
            fitted_coefficients={
                "objective": objective,
                "granularity": granularity,
                "num_steps": num_steps,
                "learning_rate": learning_rate,
                "objective_first_step": round(history[0], 6),
                "objective_last_step": round(history[-1], 6),
                "coefficients": {group: [round(value, 6) for value in row] for group, row in coefficients.items()},
            },
        )
    return result


def _skeleton(folder: Path | str) -> torch.nn.Module:
    """The model of `folder`'s config with its parameters on the meta device (no memory; merged tensors replace them
    in each forward) and its buffers (rotary frequencies) real, in eval mode (no dropout)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # not done on meta parameters by from_config; tied aliases are told apart below
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


def _row_length(shape: Sequence[int]) -> int:
    return math.prod(shape[1:]) if len(shape) > 0 else 1


def _row_blocks(shape: Sequence[int]) -> list[tuple[int, int]]:
    """Row ranges of about `CHUNK_ELEMENTS` entries: merged tensors are built and gradients folded block by block,
    so the only full-size tensors are the merged ones and the gradient being folded (and the allocator, reusing
    same-size blocks, keeps few freed holes)."""
    num_rows = shape[0] if len(shape) > 0 else 1
    rows_per_block = max(1, CHUNK_ELEMENTS // max(1, _row_length(shape)))
    return [(start, min(num_rows, start + rows_per_block)) for start in range(0, num_rows, rows_per_block)]


def _read_rows(source: _SafetensorsCheckpoint, name: str, start: int, end: int) -> torch.Tensor:
    """Rows `start:end` of tensor `name`, flattened, in float32."""
    return source.reader(name)(start, end).to(torch.float32).reshape(-1)


def merged_objective_and_gradient(
    model: torch.nn.Module,
    names: Sequence[str],
    group_index: dict[str, int],
    sources: Sequence[_SafetensorsCheckpoint],
    base_source: _SafetensorsCheckpoint | None,
    mixing: torch.Tensor,
    input_ids: torch.Tensor,
    objective: str,
) -> tuple[float, torch.Tensor]:
    """The objective of the merge `base * (1 - sum_i m[g, i]) + sum_i m[g, i] * theta_i` (no base term without a
    base) on `input_ids`, and its gradient with respect to the mixing matrix `m` (groups x checkpoints).

    Merged tensors are built from disk one at a time; each one's gradient becomes `m`'s gradient as soon as the
    backward pass has accumulated it, `d loss / d m[g, i] = sum over g's tensors of <grad, theta_i - base>`, and is
    freed, so no more than one model's tensors and one tensor's gradient are held.
    """
    mixing_gradient = torch.zeros_like(mixing, dtype=torch.float64)

    def fold_gradient(name: str) -> Any:
        def hook(tensor: torch.Tensor) -> None:
            gradient = tensor.grad
            for start, end in _row_blocks(gradient.shape):
                rows = gradient[start:end].reshape(-1)
                base_dot = 0.0 if base_source is None else float(rows @ _read_rows(base_source, name, start, end))
                for index, source in enumerate(sources):
                    dot = float(rows @ _read_rows(source, name, start, end))
                    mixing_gradient[group_index[name], index] += dot - base_dot
            tensor.grad = None

        return hook

    merged: dict[str, torch.Tensor] = {}
    for name in names:
        row = mixing[group_index[name]]
        tensor = torch.empty(sources[0].shapes[name], dtype=torch.float32)
        for start, end in _row_blocks(tensor.shape):
            part = None
            if base_source is not None:
                part = _read_rows(base_source, name, start, end).mul_(float(1.0 - row.sum()))
            for index, source in enumerate(sources):
                contribution = _read_rows(source, name, start, end).mul_(float(row[index]))
                part = contribution if part is None else part.add_(contribution)
                del contribution
            tensor.reshape(-1)[start * _row_length(tensor.shape) : end * _row_length(tensor.shape)] = part
            del part
        tensor.requires_grad_(True)
        tensor.register_post_accumulate_grad_hook(fold_gradient(name))
        merged[name] = tensor
    total = 0.0
    # One block per forward and backward: activation memory is one block's whatever the batch size (the blocks are
    # of equal length, so the mean of the blocks' losses is the batch's mean loss). The price is folding (and so
    # reading the checkpoints) once per block.
    for block in input_ids.split(1):
        logits = torch.func.functional_call(model, merged, args=(), kwargs={"input_ids": block}).logits
        loss = objective_loss(logits, block, objective) / len(input_ids)
        del logits
        loss.backward()
        total += float(loss.detach())
    return total, mixing_gradient
