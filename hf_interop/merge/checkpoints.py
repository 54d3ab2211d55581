"""Merging checkpoint folders (:func:`merge_checkpoints`) and in-memory state dicts (:func:`merge_state_dicts`),
with every argument, tensor and tokenizer checked before any tensor is merged.

:func:`merge_checkpoints` streams safetensors files tensor by tensor and writes the output shards as it goes, so
its peak memory is a few tensors, not N models.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..hub.outputs import write_output_metadata
from ..logging_utils import get_logger
from ..utils import atomic_write_json
from .methods import (
    DEFAULT_DENSITY,
    DEFAULT_EPSILON,
    DEFAULT_GAMMA,
    MERGE_METHODS,
    METHODS_ELECTING_SIGNS,
    METHODS_NEEDING_BASE,
    METHODS_USING_DENSITY,
)
from .staging import clear_stale_staging, merge_output_dir, naming_output_file
from .streaming import (
    RowReader,
    _merge_tensor_in_chunks,
    _parse_size,
    _plan_shards,
    _SafetensorsCheckpoint,
    _ShardWriter,
)

logger = get_logger(__name__)

# Files of a checkpoint folder that are not weights and travel with a merge (tokenizer, chat template, configs).
_COPIED_FILES = re.compile(
    r"^(config\.json|generation_config\.json|tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\..*|"
    r"merges\.txt|chat_template\.(jinja|json)|.*\.model)$"
)


# ----------------------------------------------------------------------------------------------------------------
# Checks before any work
# ----------------------------------------------------------------------------------------------------------------


def _check_method_arguments(
    method: str,
    num_checkpoints: int,
    weights: Sequence[float] | None,
    base: Any,
    density: float | None,
    slerp_t: float,
) -> tuple[list[float], float]:
    """Validated weights and density; raises a `ValueError` naming the argument, the value and the fix."""
    if method not in MERGE_METHODS:
        raise ValueError(f"merge method {method!r} is unknown; use one of {', '.join(MERGE_METHODS)}.")
    if method == "slerp":
        if num_checkpoints != 2:
            raise ValueError(
                f"slerp interpolates exactly two models, got {num_checkpoints} checkpoints; pass two, or use "
                "method='linear' for more."
            )
        if base is not None:
            raise ValueError("slerp interpolates its two checkpoints and takes no base; leave base out.")
        if not isinstance(slerp_t, (int, float)) or not 0.0 <= slerp_t <= 1.0:
            raise ValueError(f"slerp_t={slerp_t!r} must be in [0, 1] (0 gives the first model, 1 the second).")
    if method in METHODS_NEEDING_BASE and base is None:
        raise ValueError(
            f"merge method {method!r} works on task vectors (checkpoint - base) and needs base=<the model the "
            "checkpoints were fine-tuned from>; use method='linear' to average without a base."
        )
    if method == "linear" and num_checkpoints < 2:
        raise ValueError(f"method='linear' averages models and needs at least 2 checkpoints, got {num_checkpoints}.")
    if method == "model_stock":
        if num_checkpoints < 2:
            raise ValueError(
                f"model_stock estimates its ratio from the angle between fine-tunes and needs at least 2 fine-tuned "
                f"checkpoints besides the base, got {num_checkpoints}; add another fine-tune of the same base, or "
                "use task_arithmetic."
            )
        if weights is not None:
            raise ValueError(
                f"model_stock computes its own interpolation ratio and takes no weights (got weights={list(weights)}); "
                "leave weights out."
            )
    if num_checkpoints < 1:
        raise ValueError("checkpoints is empty; pass the checkpoint folders to merge.")
    if weights is None:
        weights = [1.0] * num_checkpoints
    else:
        weights = list(weights)
        if len(weights) != num_checkpoints:
            raise ValueError(
                f"weights has {len(weights)} values for {num_checkpoints} checkpoints; pass one weight per "
                "checkpoint (or leave weights out for equal weights)."
            )
        if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
            raise ValueError(f"weights={weights} must be finite numbers.")
        weights = [float(w) for w in weights]
    if method == "linear" and abs(sum(weights)) < 1e-12:
        raise ValueError(f"weights={weights} sum to 0, so the linear average is undefined; use weights summing to 1.")
    if method in METHODS_ELECTING_SIGNS and any(w <= 0 for w in weights):
        raise ValueError(
            f"weights={weights} must be positive for {method!r} (they weigh the sign election and the mean); "
            "use task_arithmetic or dare_linear to subtract a task vector."
        )
    if method in METHODS_USING_DENSITY:
        density = DEFAULT_DENSITY if density is None else density
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
            raise ValueError(
                f"density={density!r} must be in (0, 1]: the fraction of each task vector kept (1 keeps all)."
            )
    elif density is not None:
        logger.warning(
            f"density={density} is ignored by method {method!r} (used by {', '.join(METHODS_USING_DENSITY)})."
        )
        density = DEFAULT_DENSITY
    else:
        density = DEFAULT_DENSITY
    return weights, float(density)


def _check_sparsity_arguments(
    method: str, density: float, gamma: float | None, epsilon: float | None
) -> tuple[float, float]:
    """Validated `gamma` (breadcrumbs) and `epsilon` (della); raises a `ValueError` naming the value and the fix."""

    def is_number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    if method == "breadcrumbs":
        gamma = DEFAULT_GAMMA if gamma is None else gamma
        if not is_number(gamma) or not 0.0 <= gamma < 1.0:
            raise ValueError(f"gamma={gamma!r} must be in [0, 1): the share of largest task-vector entries removed.")
        if density + gamma > 1.0:
            raise ValueError(
                f"density={density} + gamma={gamma} exceeds 1: breadcrumbs keeps a density share of the entries "
                "below the gamma share of outliers; lower density or gamma."
            )
    elif gamma is not None:
        logger.warning(f"gamma={gamma} is ignored by method {method!r} (used by breadcrumbs).")
    if method in ("della", "della_linear"):
        epsilon = DEFAULT_EPSILON if epsilon is None else epsilon
        if not is_number(epsilon) or epsilon < 0:
            raise ValueError(f"epsilon={epsilon!r} must be a number >= 0 (the spread of DELLA's keep probabilities).")
        if density < 1.0 and not (density - epsilon > 0.0 and density + epsilon <= 1.0):
            raise ValueError(
                f"density={density} and epsilon={epsilon}: DELLA's keep probabilities span density - epsilon to "
                "density + epsilon, which must lie in (0, 1]; lower epsilon (e.g. epsilon=min(density, 1 - density) "
                "/ 2)."
            )
    elif epsilon is not None:
        logger.warning(f"epsilon={epsilon} is ignored by method {method!r} (used by della, della_linear).")
    return float(DEFAULT_GAMMA if gamma is None else gamma), float(DEFAULT_EPSILON if epsilon is None else epsilon)


def _check_tensor_weights(
    tensor_weights: dict[str, Sequence[float]] | None, num_checkpoints: int, names: Sequence[str]
) -> dict[str, list[float]] | None:
    """Validated per-tensor weights (fitted coefficients): one finite weight per checkpoint for known tensors."""
    if tensor_weights is None:
        return None
    unknown = sorted(set(tensor_weights) - set(names))
    if unknown:
        raise ValueError(
            f"tensor_weights names tensors the checkpoints do not hold: {unknown[:3]}; use the checkpoint's names."
        )
    checked = {}
    for name, values in tensor_weights.items():
        values = list(values)
        if len(values) != num_checkpoints or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in values
        ):
            raise ValueError(
                f"tensor_weights[{name!r}]={values} must hold {num_checkpoints} finite weights, one per checkpoint."
            )
        checked[name] = [float(w) for w in values]
    return checked


def _check_same_tensors(sources: list[_SafetensorsCheckpoint]) -> None:
    first = sources[0]
    for other in sources[1:]:
        missing = sorted(set(first.shapes) - set(other.shapes))
        extra = sorted(set(other.shapes) - set(first.shapes))
        if missing or extra:
            raise ValueError(
                f"{other.role} {str(other.folder)!r} and {first.role} {str(first.folder)!r} hold different tensors "
                f"(missing {missing[:3]}, extra {extra[:3]}); merges need checkpoints of one architecture."
            )
        for name, shape in first.shapes.items():
            if other.shapes[name] != shape:
                raise ValueError(
                    f"tensor {name!r} has shape {list(other.shapes[name])} in {other.role} {str(other.folder)!r} but "
                    f"{list(shape)} in {first.role} {str(first.folder)!r}; merges need checkpoints of one architecture."
                )
        for key in ("model_type", "architectures"):
            if first.config.get(key) != other.config.get(key):
                raise ValueError(
                    f"config {key} differs: {other.config.get(key)!r} in {str(other.folder)!r} vs "
                    f"{first.config.get(key)!r} in {str(first.folder)!r}; merges need checkpoints of one architecture."
                )


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()


def _check_same_tokenizers(sources: list[_SafetensorsCheckpoint]) -> Path | None:
    """Folder whose tokenizer the merge ships; raises if two checkpoints' tokenizers differ."""
    from transformers import AutoTokenizer

    with_tokenizer = [source for source in sources if _has_tokenizer(source.folder)]
    if not with_tokenizer:
        return None
    file_names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

    def file_digest(folder: Path) -> list[str | None]:
        return [
            hashlib.sha256((folder / name).read_bytes()).hexdigest() if (folder / name).is_file() else None
            for name in file_names
        ]

    # Byte-identical tokenizer files (the usual case for runs of one base) need no loading.
    first_digest = file_digest(with_tokenizer[0].folder)
    if all(file_digest(source.folder) == first_digest for source in with_tokenizer[1:]):
        return with_tokenizer[0].folder
    reference = None
    reference_folder = None
    for source in with_tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(source.folder)
        vocab = tokenizer.get_vocab()
        # A content hash (not the object) is kept, so only one tokenizer is in memory at a time.
        digest = hashlib.sha256(json.dumps([sorted(vocab.items()), tokenizer.all_special_tokens]).encode()).hexdigest()
        signature = (digest, len(vocab))
        del tokenizer, vocab
        if reference is None:
            reference, reference_folder = signature, source.folder
        elif signature != reference:
            detail = (
                f"vocabulary sizes {signature[1]} vs {reference[1]}"
                if signature[1] != reference[1]
                else "same size, different token ids or special tokens"
            )
            raise ValueError(
                f"the tokenizer of {source.role} {str(source.folder)!r} differs from that of "
                f"{str(reference_folder)!r} ({detail}); weight merges need checkpoints sharing one tokenizer."
            )
    return reference_folder


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------


def merge_state_dicts(
    state_dicts: Sequence[dict[str, torch.Tensor]],
    method: str,
    weights: Sequence[float] | None = None,
    base: dict[str, torch.Tensor] | None = None,
    density: float | None = None,
    seed: int = 0,
    slerp_t: float = 0.5,
    gamma: float | None = None,
    epsilon: float | None = None,
) -> dict[str, torch.Tensor]:
    """In-memory version of :func:`merge_checkpoints` over state dicts (same math, blocks and random drops)."""
    weights, density = _check_method_arguments(method, len(state_dicts), weights, base, density, slerp_t)
    gamma, epsilon = _check_sparsity_arguments(method, density, gamma, epsilon)

    def reader_of(tensor: torch.Tensor) -> RowReader:
        # Fresh copies, like reads from disk: the merge works on its blocks in place.
        return lambda start, end: (tensor[start:end] if tensor.dim() > 0 else tensor).clone()

    merged = {}
    for name in state_dicts[0]:
        blocks: list[torch.Tensor] = []
        _merge_tensor_in_chunks(
            name,
            tuple(state_dicts[0][name].shape),
            [reader_of(state[name]) for state in state_dicts],
            None if base is None else reader_of(base[name]),
            method,
            weights,
            density,
            seed,
            slerp_t,
            blocks.append,
            gamma=gamma,
            epsilon=epsilon,
        )
        merged[name] = torch.cat(blocks) if state_dicts[0][name].dim() > 0 else blocks[0]
    return merged


def merge_checkpoints(
    checkpoints: Sequence[str | os.PathLike],
    method: str = "linear",
    weights: Sequence[float] | None = None,
    base: str | os.PathLike | None = None,
    *,
    output_dir: str | os.PathLike,
    density: float | None = None,
    seed: int = 0,
    slerp_t: float = 0.5,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
    show_progress: bool = True,
    gamma: float | None = None,
    epsilon: float | None = None,
    tensor_weights: dict[str, Sequence[float]] | None = None,
    fitted_coefficients: dict[str, Any] | None = None,
) -> Path:
    """Merge checkpoints of one architecture in weight space, streaming tensor by tensor.

    Every argument, tensor name, shape and tokenizer is checked before any tensor is merged. Then each tensor is
    read from every checkpoint (safetensors, one tensor at a time), merged by :func:`merge_tensors` in float32
    (float64 for float64 checkpoints), cast back to its dtype and appended to the output shard at once, so peak
    memory is a few tensors rather than N models. The output folder gets the weights, the first checkpoint's
    config and generation config, the shared tokenizer, a `merged` model card and `hf_interop_lineage.json`
    (inputs and settings), all written to a temporary folder renamed into place when complete.

    Args:
        checkpoints (`list` of `str` or `os.PathLike`): checkpoint folders with safetensors weights.
        method (`str`, *optional*, defaults to `"linear"`): one of `linear`, `task_arithmetic`, `ties`,
            `dare_linear`, `dare_ties`, `slerp`, `breadcrumbs`, `della`, `della_linear`, `model_stock` (see
            `hf_interop.merge.methods`).
        weights (`list[float]`, *optional*): one per checkpoint; defaults to equal weights (1.0 each, which
            `linear` normalises to an average).
        base (`str` or `os.PathLike`, *optional*): the model the checkpoints were fine-tuned from; required by
            the task-vector methods.
        output_dir (`str` or `os.PathLike`): where the merged checkpoint is written.
        density (`float`, *optional*, defaults to 0.5): in (0, 1]; fraction of each task vector kept (`ties`) or
            keep probability (`dare_*`).
        seed (`int`, *optional*, defaults to 0): seed of DARE's random drops (results are reproducible).
        slerp_t (`float`, *optional*, defaults to 0.5): `slerp` interpolation point in [0, 1].
        overwrite (`bool`, *optional*, defaults to `False`): replace an existing `output_dir`.
        max_shard_size (`int` or `str`, *optional*, defaults to `"5GB"`): size of output shards.
        show_progress (`bool`, *optional*, defaults to `True`): tqdm progress bar over tensors.
        gamma (`float`, *optional*, defaults to 0.01): `breadcrumbs`: share of largest task-vector entries removed.
        epsilon (`float`, *optional*, defaults to 0.15): `della*`: keep probabilities span density +- epsilon.
        tensor_weights (`dict[str, list[float]]`, *optional*): per-tensor weights overriding `weights` for the
            tensors named (what :func:`hf_interop.fit_merge_coefficients` writes).
        fitted_coefficients (`dict`, *optional*): how the coefficients were fitted, recorded in the card and the
            lineage manifest.

    Returns:
        `Path` of the output folder.

    Example:

    ```python
    >>> merge_checkpoints(["run_a", "run_b"], "ties", base="base_model", density=0.3, output_dir="merged")
    ```
    """
    if isinstance(checkpoints, (str, os.PathLike)):
        raise ValueError("checkpoints must be a list of checkpoint folders, not a single path.")
    checkpoints = [Path(path) for path in checkpoints]
    weights, density = _check_method_arguments(method, len(checkpoints), weights, base, density, slerp_t)
    gamma, epsilon = _check_sparsity_arguments(method, density, gamma, epsilon)
    output_dir = Path(output_dir)
    max_shard_bytes = _parse_size(max_shard_size)
    _check_output_dir(output_dir, [*checkpoints, *([Path(base)] if base is not None else [])], overwrite)
    clear_stale_staging(output_dir)  # a killed merge's leftovers go; a live merge into output_dir is refused

    sources = [_SafetensorsCheckpoint(path, f"checkpoint {index}") for index, path in enumerate(checkpoints)]
    base_source = _SafetensorsCheckpoint(base, "base") if base is not None else None
    _check_same_tensors([*sources, *([base_source] if base_source else [])])
    tokenizer_folder = _check_same_tokenizers([*sources, *([base_source] if base_source else [])])

    first = sources[0]
    names = sorted(first.shapes)
    tensor_weights = _check_tensor_weights(tensor_weights, len(checkpoints), names)
    shards = _plan_shards(names, first.dtypes, first.shapes, max_shard_bytes)
    logger.info(
        f"Merging {len(checkpoints)} checkpoints with {method!r}: {len(names)} tensors, {len(shards)} shard(s)."
    )
    needed_bytes = sum(_tensor_bytes(first, name) for name in names)
    with merge_output_dir(output_dir, overwrite, needed_bytes, cleared=True) as tmp_dir:
        _write_merged_shards(
            tmp_dir,
            shards,
            sources,
            base_source,
            method=method,
            weights=weights,
            density=density,
            seed=seed,
            slerp_t=slerp_t,
            show_progress=show_progress,
            gamma=gamma,
            epsilon=epsilon,
            tensor_weights=tensor_weights,
        )
        for file_name in ("config.json", "generation_config.json"):
            if (first.folder / file_name).is_file():
                with naming_output_file(tmp_dir / file_name):
                    shutil.copyfile(first.folder / file_name, tmp_dir / file_name)
        _copy_tokenizer_files(tokenizer_folder, tmp_dir)
        lineage = {
            "method": method,
            "checkpoints": [str(path) for path in checkpoints],
            "weights": weights,
            "base": None if base is None else str(base),
            "density": density if method in METHODS_USING_DENSITY else None,
            "seed": seed if method.startswith(("dare", "della")) else None,
            "slerp_t": slerp_t if method == "slerp" else None,
            "gamma": gamma if method == "breadcrumbs" else None,
            "epsilon": epsilon if method.startswith("della") else None,
            "fitted_coefficients": fitted_coefficients,
        }
        with naming_output_file(tmp_dir / "README.md"):  # the card, and the lineage manifest it names
            _write_merge_metadata(tmp_dir, lineage, model_name=output_dir.name)
    logger.info(f"Merged checkpoint written to {output_dir}")
    return output_dir


def _tensor_bytes(checkpoint: _SafetensorsCheckpoint, name: str) -> int:
    return math.prod(checkpoint.shapes[name]) * torch.empty((), dtype=getattr(torch, checkpoint.dtypes[name])).itemsize


def _check_output_dir(output_dir: Path, inputs: list[Path], overwrite: bool) -> None:
    if output_dir.exists() and not overwrite:
        raise FileExistsError(
            f"output_dir {str(output_dir)!r} already exists; pass overwrite=True to replace it or choose another."
        )
    if any(output_dir.resolve() == path.resolve() for path in inputs):
        raise ValueError(f"output_dir {str(output_dir)!r} is one of the inputs; write the merge to a new folder.")


def _write_merged_shards(
    folder: Path,
    shards: list[list[str]],
    sources: list[_SafetensorsCheckpoint],
    base_source: _SafetensorsCheckpoint | None,
    *,
    method: str,
    weights: list[float],
    density: float,
    seed: int,
    slerp_t: float,
    show_progress: bool,
    gamma: float = DEFAULT_GAMMA,
    epsilon: float = DEFAULT_EPSILON,
    tensor_weights: dict[str, list[float]] | None = None,
) -> None:
    """Merge every tensor into the planned shards of `folder` (plus the index of a sharded checkpoint)."""
    from tqdm.auto import tqdm

    first = sources[0]
    weight_map = {}
    total_size = 0
    progress = tqdm(
        total=sum(len(names) for names in shards), desc=f"Merging ({method})", disable=not show_progress, leave=False
    )
    for shard_index, shard_names in enumerate(shards):
        file_name = (
            "model.safetensors"
            if len(shards) == 1
            else f"model-{shard_index + 1:05d}-of-{len(shards):05d}.safetensors"
        )
        writer = _ShardWriter(
            folder / file_name, [(name, first.dtypes[name], first.shapes[name]) for name in shard_names]
        )
        for name in shard_names:
            writer.begin(name)
            _merge_tensor_in_chunks(
                name,
                first.shapes[name],
                [source.reader(name) for source in sources],
                base_source.reader(name) if base_source is not None else None,
                method,
                weights,
                density,
                seed,
                slerp_t,
                writer.write_block,
                gamma=gamma,
                epsilon=epsilon,
                weights_of=None if tensor_weights is None else (lambda name: tensor_weights.get(name, weights)),
            )
            weight_map[name] = file_name
            progress.update(1)
        writer.close()
        total_size += writer.total_bytes
    progress.close()
    if len(shards) > 1:
        with naming_output_file(folder / "model.safetensors.index.json"):
            atomic_write_json(
                folder / "model.safetensors.index.json",
                {"metadata": {"total_size": total_size}, "weight_map": weight_map},
            )


def _copy_tokenizer_files(source: Path | None, target: Path) -> None:
    if source is None:
        return
    for path in source.iterdir():
        if (
            path.is_file()
            and _COPIED_FILES.match(path.name)
            and path.name not in ("config.json", "generation_config.json")
        ):
            with naming_output_file(target / path.name):
                shutil.copyfile(path, target / path.name)


def _write_merge_metadata(folder: Path, settings: dict[str, Any], model_name: str | None) -> None:
    """`hf_interop_lineage.json` (the inputs: local paths, or hub ids with commit hashes; and the merge settings)
    and, when `model_name` is given, the `merged` model card that names it."""
    members = [
        {"name_or_path": path, "weight": weight}
        for path, weight in zip(settings["checkpoints"], settings["weights"], strict=True)
    ]
    card = None
    if model_name is not None:
        hyperparameters = {
            key: settings[key]
            for key in ("density", "seed", "slerp_t", "gamma", "epsilon", "fitted_coefficients")
            if settings.get(key) is not None
        }
        card = {
            "members": members,
            "merge_method": settings["method"],
            "hyperparameters": hyperparameters,
            "model_name": model_name,
        }
        if settings["base"] is not None:
            card["base_model"] = settings["base"]
    write_output_metadata(
        folder,
        "merged",
        card=card,
        lineage={
            "base_model": settings["base"],
            "members": members,
            "extra": {key: value for key, value in settings.items() if key not in ("checkpoints", "weights", "base")},
            "strict": False,
        },
    )
