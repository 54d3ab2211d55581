"""Interoperability report: several checkpoints scored side by side on the same text.

For two or more causal LMs and one dataset, :func:`compare_checkpoints` measures

- per model: perplexity, bits per byte (always; it is the only figure comparable across tokenizers), next-token
  top-1 accuracy, and multiple-choice accuracy when the data has `choices` + `label` columns;
- per pair of models that share a tokenizer: top-1 agreement (share of positions where both predict the same next
  token) and the symmetric KL divergence `(KL(p||q) + KL(q||p)) / 2` in nats per token;
- per group of models that share a tokenizer: the uniform mixture ensemble (mean of the members' probabilities) and
  its gain over the best member.

Every model scores exactly the same bytes: each document is tokenized on its own (no special tokens), preceded by the
tokenizer's BOS (or EOS) token as context, and cut into windows that overlap by one token so every token of the
document is predicted exactly once. Bits per byte are `sum NLL / ln 2 / UTF-8 bytes of the documents`.

The report is returned as a `dict`, printed as a table, and (with `output_dir`) written as `report.json`,
`report.md` and a `heatmap.png` of the two matrices, all in one folder that appears atomically.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .adapters import check_adapter_weights
from .data import (  # noqa: F401  (check_dataset_argument, load_text_dataset: their old home)
    BUILTIN_DATASET,
    DEFAULT_VALIDATION_SPLIT_PERCENTAGE,
    check_dataset_argument,
    check_validation_split_percentage,
    load_text_dataset,
    load_text_split,
)
from .loading import DEFAULT_TEACHER_ALIAS, resolve_model_alias
from .logging_utils import get_logger
from .utils import atomic_directory, atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    import torch
    from datasets import Dataset

logger = get_logger(__name__)


def check_checkpoint_arguments(checkpoints: list[str], names: list[str] | None = None) -> list[str]:
    """Validate the checkpoint list of a comparison before any model loads; return display names."""
    from .loading import looks_like_hub_id

    checkpoints = [str(checkpoint) for checkpoint in checkpoints]
    if len(checkpoints) < 2:
        raise ValueError(
            f"compare needs at least 2 checkpoints, got {len(checkpoints)} ({checkpoints}); pass two or more model "
            "folders or hub ids to compare them side by side."
        )
    duplicates = sorted({checkpoint for checkpoint in checkpoints if checkpoints.count(checkpoint) > 1})
    if duplicates:
        raise ValueError(f"checkpoint(s) {duplicates} are listed more than once; list each checkpoint once.")
    for checkpoint in checkpoints:
        if (
            checkpoint != DEFAULT_TEACHER_ALIAS
            and not os.path.exists(checkpoint)
            and not looks_like_hub_id(checkpoint)
        ):
            raise ValueError(
                f"checkpoint {checkpoint!r} does not exist; pass an existing folder, a .gguf file or a hub id."
            )
    if names is not None:
        if len(names) != len(checkpoints):
            raise ValueError(
                f"names has {len(names)} entries ({names}) for {len(checkpoints)} checkpoints; give one name per "
                "checkpoint or none."
            )
        if len(set(names)) != len(names):
            raise ValueError(f"names {names} are not unique; give each checkpoint its own name.")
        return list(names)
    return _display_names(checkpoints)


def _display_names(checkpoints: list[str]) -> list[str]:
    names = [Path(checkpoint.rstrip("/")).name or checkpoint for checkpoint in checkpoints]
    if len(set(names)) == len(names):
        return names
    # Same folder names under different parents: fall back to the paths as given.
    return checkpoints


@dataclass
class _Member:
    name: str
    path: str
    model: Any
    tokenizer: Any
    group: int = -1
    stats: dict[str, Any] = field(default_factory=dict)


def _is_adapter_folder(path: Path) -> bool:
    return path.is_dir() and (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()


def _adapter_base(path: Path) -> str:
    import json

    return json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]


def load_comparison_model(checkpoint: str, dtype: Any = "float32", allow_pickle: bool = False) -> tuple[Any, Any]:
    """Load one checkpoint for scoring: a full model folder, a `.gguf` file, a hub id, or a PEFT adapter folder
    (loaded onto its base model and merged). Pickle weights (`pytorch_model.bin`, `adapter_model.bin`) are refused
    unless `allow_pickle`."""
    from .loading import load_causal_lm, load_tokenizer

    checkpoint = resolve_model_alias(checkpoint)
    path = Path(checkpoint)
    if _is_adapter_folder(path):
        from peft import PeftModel

        check_adapter_weights(path, allow_pickle=allow_pickle)
        model, tokenizer = load_causal_lm(_adapter_base(path), dtype=dtype, allow_pickle=allow_pickle)
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload().eval()
        if any(path.glob("tokenizer*")):
            tokenizer = load_tokenizer(str(path))
        return model, tokenizer
    return load_causal_lm(checkpoint, dtype=dtype, allow_pickle=allow_pickle)


def check_checkpoint_weights(checkpoints: list[str], allow_pickle: bool = False) -> None:
    """Refuse, before any model loads, a local checkpoint (or adapter, or an adapter's local base) that
    :func:`load_comparison_model` would refuse: no weights, or pickle weights only without `allow_pickle`."""
    from .loading import _check_local_folder

    for checkpoint in checkpoints:
        path = Path(str(checkpoint))
        if _is_adapter_folder(path):
            check_adapter_weights(path, allow_pickle=allow_pickle)
            path = Path(_adapter_base(path))
        if path.is_dir():
            _check_local_folder(path, allow_pickle=allow_pickle)


def _same_tokenizer(first: Any, second: Any) -> bool:
    if len(first) != len(second):
        return False
    return first.get_vocab() == second.get_vocab()


def _context_token_id(tokenizer: Any) -> int | None:
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    return tokenizer.eos_token_id


def build_scoring_windows(texts: list[str], tokenizer: Any, block_size: int) -> tuple[list[list[int]], int, int]:
    """Cut every document into windows that predict each of its tokens exactly once.

    Returns `(windows, num_target_tokens, num_bytes)`: `windows[i]` holds `<= block_size`
    token ids whose positions `1..` are targets. The first window of a document starts with the BOS/EOS context
    token; later windows start with the last token of the previous one. Without a BOS/EOS token the first token of
    each document is context only and its bytes are not counted.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2 (one context token and one target), got {block_size}.")
    context = _context_token_id(tokenizer)
    windows: list[list[int]] = []
    num_targets = 0
    num_bytes = 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        text_bytes = len(text.encode("utf-8"))
        if context is not None:
            sequence = [context, *ids]
        else:
            sequence = list(ids)
            if sequence:
                text_bytes -= len(tokenizer.decode(sequence[:1]).encode("utf-8"))
        if len(sequence) < 2:
            continue
        num_bytes += max(text_bytes, 0)
        start = 0
        while start < len(sequence) - 1:
            window = sequence[start : start + block_size]
            windows.append(window)
            num_targets += len(window) - 1
            start += block_size - 1
    return windows, num_targets, num_bytes


def _padded_window_batches(windows: list[list[int]], batch_size: int, pad_id: int):
    """Scoring windows, `batch_size` at a time, right-padded into `(input_ids, attention_mask, labels)` tensors."""
    import torch

    for start in range(0, len(windows), batch_size):
        rows = windows[start : start + batch_size]
        length = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for index, row in enumerate(rows):
            input_ids[index, : len(row)] = torch.tensor(row)
            attention_mask[index, : len(row)] = 1
        # Right padding: with causal attention the padded tail never influences the real positions before it.
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        yield input_ids, attention_mask, labels


def _log_probs(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    import torch

    from .evaluation import model_device

    device = model_device(model)
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
    return torch.log_softmax(logits[:, :-1].float(), dim=-1).cpu()


def compare_checkpoints(
    checkpoints: list[str],
    dataset: str | Dataset = BUILTIN_DATASET,
    *,
    split: str = "validation",
    text_column: str = "text",
    names: list[str] | None = None,
    block_size: int = 128,
    batch_size: int = 8,
    max_documents: int | None = None,
    dtype: Any = "float32",
    output_dir: str | os.PathLike | None = None,
    overwrite_output_dir: bool = False,
    show_progress: bool = True,
    models: list[tuple[Any, Any]] | None = None,
    ensemble_members: list[str] | None = None,
    validation_split_percentage: float = DEFAULT_VALIDATION_SPLIT_PERCENTAGE,
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """Score two or more causal LMs on the same text and compare them (see the module docstring).

    Args:
        checkpoints (`list[str]`):
            Two or more model folders, `.gguf` files, hub ids or PEFT adapter folders. With `models`, only their
            display paths.
        dataset (`str` or `datasets.Dataset`, *optional*, defaults to `"builtin"`):
            The text to score: see :func:`load_text_dataset`, or a `Dataset` with a `text_column` and/or `choices`
            (`list[str]`) + `label` (`int`) columns (+ an optional `prompt` column) for multiple-choice accuracy.
        split (`str`, *optional*, defaults to `"validation"`):
            Split of the builtin corpus or of a saved `DatasetDict`. A dataset with no held-out split of its own (one
            file, a saved `Dataset`) is scored on the documents held out from training by `validation_split_percentage`
            (the ones `distill` and `adapt` hold out from it); `"all"` scores every row.
        text_column (`str`, *optional*, defaults to `"text"`):
            Column holding the documents scored for perplexity.
        names (`list[str]`, *optional*):
            Display names, one per checkpoint; defaults to the folder names.
        block_size (`int`, *optional*, defaults to 128):
            Tokens per scoring window (longer gives each prediction more context and costs more memory).
        batch_size (`int`, *optional*, defaults to 8):
            Windows per forward pass.
        max_documents (`int`, *optional*):
            Score only the first `max_documents` rows.
        dtype (`str`, *optional*, defaults to `"float32"`):
            Dtype the checkpoints are loaded in.
        output_dir (`str` or `os.PathLike`, *optional*):
            Folder for `report.json`, `report.md` and `heatmap.png`, written atomically.
        overwrite_output_dir (`bool`, *optional*, defaults to `False`):
            Replace an existing `output_dir` (otherwise that is an error, raised before any model loads).
        show_progress (`bool`, *optional*, defaults to `True`):
            tqdm progress bars.
        models (`list[tuple[model, tokenizer]]`, *optional*):
            Already-loaded `(model, tokenizer)` pairs to compare instead of loading `checkpoints`.
        ensemble_members (`list[str]`, *optional*):
            Names of the models mixed into the ensemble (two or more sharing a tokenizer); defaults to every model
            of each tokenizer group.
        validation_split_percentage (`float`, *optional*, defaults to 5):
            Share of the documents held out when `split` is carved from a dataset that has none (see
            :func:`hf_interop.data.load_text_dataset`).
        allow_pickle (`bool`, *optional*, defaults to `False`):
            Accept pickle weights (`pytorch_model.bin`, a LoRA folder's `adapter_model.bin`), which can run code on
            load. Safetensors only by default.

    Returns:
        `dict`: the report (`models`, `top1_agreement`, `symmetric_kl`, `ensembles`, `dataset`), JSON-serialisable.
    """
    display_names = _check_comparison_arguments(
        checkpoints,
        names,
        models=models,
        ensemble_members=ensemble_members,
        block_size=block_size,
        batch_size=batch_size,
        max_documents=max_documents,
        output_dir=output_dir,
        overwrite_output_dir=overwrite_output_dir,
        validation_split_percentage=validation_split_percentage,
        allow_pickle=allow_pickle,
    )
    dataset, dataset_description, has_text, has_choices = _comparison_dataset(
        dataset, split, text_column, max_documents, validation_split_percentage
    )
    members = _load_members(checkpoints, display_names, models, dtype, allow_pickle)

    texts = [text for text in dataset[text_column] if text] if has_text else []
    # Models share a tokenizer when their vocabularies are equal AND they cut this text into the same tokens: two
    # tokenizers with one vocabulary can still pre-tokenize differently (e.g. a model class's own tokenizer class).
    member_windows = [build_scoring_windows(texts, m.tokenizer, block_size) if has_text else None for m in members]
    groups = _group_by_tokenizer(members, member_windows)
    ensemble_indices = _ensemble_indices(members, groups, ensemble_members)
    num_bytes_total = sum(len(text.encode("utf-8")) for text in texts)
    agreement, symmetric_kl, ensembles = _score_tokenizer_groups(
        members, groups, member_windows, ensemble_indices, has_text, text_column, batch_size, show_progress
    )

    result = {
        "dataset": {
            "description": str(dataset_description),
            "num_documents": len(texts) if has_text else len(dataset),
            "num_bytes": num_bytes_total,
            "text_column": text_column if has_text else None,
            "block_size": block_size,
        },
        "models": [_model_report(member, dataset, has_text, has_choices) for member in members],
        "names": [member.name for member in members],
        "top1_agreement": agreement,
        "symmetric_kl": symmetric_kl,
        "ensembles": ensembles,
        "tokenizer_groups": [[members[i].name for i in group] for group in groups],
    }
    if output_dir is not None:
        write_report(result, output_dir, overwrite=overwrite_output_dir)
    return result


# --------------------------------------------------------------------------------------------------------------
# compare_checkpoints, step by step: check the arguments, load the data and the checkpoints, score, report
# --------------------------------------------------------------------------------------------------------------


def _check_comparison_arguments(
    checkpoints: list[str],
    names: list[str] | None,
    *,
    models: list[tuple[Any, Any]] | None,
    ensemble_members: list[str] | None,
    block_size: int,
    batch_size: int,
    max_documents: int | None,
    output_dir: str | os.PathLike | None,
    overwrite_output_dir: bool,
    validation_split_percentage: float,
    allow_pickle: bool,
) -> list[str]:
    """Every check of :func:`compare_checkpoints` that needs neither data nor a model; returns the display names."""
    display_names = check_checkpoint_arguments(checkpoints, names) if models is None else None
    check_validation_split_percentage(validation_split_percentage)
    if models is None:
        check_checkpoint_weights(checkpoints, allow_pickle=allow_pickle)
    if models is not None:
        if len(models) != len(checkpoints):
            raise ValueError(f"models has {len(models)} entries for {len(checkpoints)} checkpoints; pass one each.")
        if len(models) < 2:
            raise ValueError(f"compare needs at least 2 models, got {len(models)}; pass two or more.")
        display_names = list(names) if names is not None else _display_names([str(c) for c in checkpoints])
    if ensemble_members is not None:
        unknown = [name for name in ensemble_members if name not in display_names]
        if unknown or len(set(ensemble_members)) < 2:
            raise ValueError(
                f"ensemble_members {ensemble_members} must name two or more of the compared models {display_names}."
            )
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if max_documents is not None and max_documents < 1:
        raise ValueError(f"max_documents must be >= 1 (or None for all rows), got {max_documents}.")
    if output_dir is not None:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise ImportError(
                "output_dir needs matplotlib for heatmap.png: pip install 'hf_interop[demo]' (or matplotlib), or "
                "leave output_dir unset to print the report only."
            )
    if output_dir is not None and Path(output_dir).exists() and not overwrite_output_dir:
        raise FileExistsError(
            f"output folder {str(output_dir)!r} already exists; pass overwrite_output_dir=True (CLI: "
            "--overwrite_output_dir) to replace it, or choose another folder."
        )
    return display_names


def _comparison_dataset(
    dataset: str | Dataset, split: str, text_column: str, max_documents: int | None, validation_split_percentage: float
) -> tuple[Dataset, str, bool, bool]:
    """`(dataset, description, has_text, has_choices)`: the rows to score, checked for the columns scoring needs."""
    if isinstance(dataset, str):
        dataset, dataset_description = load_text_split(
            dataset, split, validation_split_percentage=validation_split_percentage, text_column=text_column
        )
    else:
        dataset_description = f"in-memory dataset ({len(dataset)} rows)"
    if max_documents is not None:
        dataset = dataset.select(range(min(max_documents, len(dataset))))
    has_text = text_column in dataset.column_names
    has_choices = "choices" in dataset.column_names and "label" in dataset.column_names
    if not has_text and not has_choices:
        raise ValueError(
            f"dataset has neither a {text_column!r} column (perplexity) nor 'choices' + 'label' columns (accuracy); "
            f"its columns are {dataset.column_names}. Pass text_column=... (CLI: --text_column)."
        )
    if "label" in dataset.column_names and "choices" not in dataset.column_names:
        raise ValueError(
            "dataset has a 'label' column but no 'choices' column; multiple-choice accuracy needs 'choices' "
            "(list of candidate continuations) next to 'label' (index of the right one)."
        )
    return dataset, dataset_description, has_text, has_choices


def _load_members(
    checkpoints: list[str],
    display_names: list[str],
    models: list[tuple[Any, Any]] | None,
    dtype: Any,
    allow_pickle: bool = False,
) -> list[_Member]:
    """Each checkpoint (or given `(model, tokenizer)` pair) in eval mode, with its display name."""
    members: list[_Member] = []
    for index, checkpoint in enumerate(checkpoints):
        if models is not None:
            model, tokenizer = models[index]
        else:
            logger.info(f"Loading {checkpoint}")
            model, tokenizer = load_comparison_model(str(checkpoint), dtype=dtype, allow_pickle=allow_pickle)
        if tokenizer is None:
            raise ValueError(f"checkpoint {checkpoint!r} has no tokenizer; save one next to the weights.")
        model.eval()
        members.append(_Member(name=display_names[index], path=str(checkpoint), model=model, tokenizer=tokenizer))
    return members


def _group_by_tokenizer(members: list[_Member], member_windows: list[Any]) -> list[list[int]]:
    """Member indices grouped by shared tokenizer (same vocabulary and same windows); sets each `member.group`."""
    groups: list[list[int]] = []
    for index, member in enumerate(members):
        for group_id, group in enumerate(groups):
            first = group[0]
            if _same_tokenizer(members[first].tokenizer, member.tokenizer) and (
                member_windows[first] == member_windows[index]
            ):
                group.append(index)
                member.group = group_id
                break
        else:
            member.group = len(groups)
            groups.append([index])
    return groups


def _ensemble_indices(members: list[_Member], groups: list[list[int]], ensemble_members: list[str] | None) -> set[int]:
    """Indices of the members mixed into the ensembles: all of them, or those named in `ensemble_members`."""
    ensemble_indices = {
        index for index, member in enumerate(members) if ensemble_members is None or member.name in ensemble_members
    }
    if ensemble_members is not None and not any(len(ensemble_indices & set(group)) >= 2 for group in groups):
        raise ValueError(
            f"ensemble_members {ensemble_members} do not share a tokenizer (groups: "
            f"{[[members[i].name for i in group] for group in groups]}); a token-level mixture needs one vocabulary."
        )
    return ensemble_indices


def _score_tokenizer_groups(
    members: list[_Member],
    groups: list[list[int]],
    member_windows: list[Any],
    ensemble_indices: set[int],
    has_text: bool,
    text_column: str,
    batch_size: int,
    show_progress: bool,
) -> tuple[list[list[float | None]], list[list[float | None]], list[dict[str, Any]]]:
    """Score every tokenizer group on its windows: fills each member's `stats` and returns the top-1 agreement and
    symmetric KL matrices (`None` across tokenizers) and the mixture ensembles' reports."""
    import torch

    num_models = len(members)
    agreement: list[list[float | None]] = [[None] * num_models for _ in range(num_models)]
    symmetric_kl: list[list[float | None]] = [[None] * num_models for _ in range(num_models)]
    ensembles: list[dict[str, Any]] = []
    with torch.no_grad():
        for group_id, group in enumerate(groups):
            for index in group:
                members[index].stats = {"nll_sum": 0.0, "num_tokens": 0, "correct": 0}
            if not has_text:
                continue
            windows, num_targets, num_bytes = member_windows[group[0]]
            if num_targets == 0:
                raise ValueError(f"the {text_column!r} column holds no text to score; check the dataset.")
            pair_agree, pair_kl, ensemble_nll = _score_group(
                members, group, windows, batch_size, ensemble_indices, show_progress
            )
            for index in group:
                stats = members[index].stats
                stats["num_bytes"] = num_bytes
            if len(group) >= 2:
                for a, index_a in enumerate(group):
                    for b, index_b in enumerate(group):
                        agreement[index_a][index_b] = float(pair_agree[a, b]) / num_targets
                        symmetric_kl[index_a][index_b] = (
                            0.0 if a == b else float(pair_kl[a, b] + pair_kl[b, a]) / 2 / num_targets
                        )
            chosen_members = [index for index in group if index in ensemble_indices]
            if len(chosen_members) >= 2:
                ensembles.append(
                    _ensemble_report(members, chosen_members, group_id, ensemble_nll, num_targets, num_bytes)
                )
    return agreement, symmetric_kl, ensembles


def _score_group(
    members: list[_Member],
    group: list[int],
    windows: list[list[int]],
    batch_size: int,
    ensemble_indices: set[int],
    show_progress: bool,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One tokenizer group over its windows: adds each member's NLL, token count and top-1 hits to its `stats`;
    returns the pairwise top-1 agreement counts and KL sums (`(len(group), len(group))`, float64) and the summed
    NLL of the uniform mixture of the group's `ensemble_indices`."""
    import torch
    from tqdm.auto import tqdm

    tokenizer = members[group[0]].tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pair_agree = torch.zeros(len(group), len(group), dtype=torch.float64)
    pair_kl = torch.zeros(len(group), len(group), dtype=torch.float64)
    ensemble_nll = 0.0
    batches = _padded_window_batches(windows, batch_size, pad_id)
    total = math.ceil(len(windows) / batch_size)
    label = f"Scoring {', '.join(members[i].name for i in group)}"
    for input_ids, attention_mask, labels in tqdm(batches, total=total, desc=label, disable=not show_progress):
        targets = labels[:, 1:]
        valid = targets != -100
        safe_targets = targets.clamp(min=0)
        valid_targets = safe_targets[valid]
        # Only the valid positions of each member are kept: (valid tokens, vocab) per member.
        member_log_probs = []
        for index in group:
            log_probs = _log_probs(members[index].model, input_ids, attention_mask)[valid]
            stats = members[index].stats
            stats["nll_sum"] += float(-log_probs.gather(-1, valid_targets[:, None]).double().sum())
            stats["num_tokens"] += int(valid.sum())
            stats["correct"] += int((log_probs.argmax(-1) == valid_targets).sum())
            member_log_probs.append(log_probs)
            del log_probs
        if len(group) < 2:
            continue
        # Pairwise and ensemble figures over the shared vocabulary (members may pad their embeddings).
        shared_vocab = min(lp.shape[-1] for lp in member_log_probs)
        if any(lp.shape[-1] != shared_vocab for lp in member_log_probs):
            member_log_probs = [torch.log_softmax(lp[:, :shared_vocab], dim=-1) for lp in member_log_probs]
        _add_pair_statistics(member_log_probs, pair_agree, pair_kl)
        chosen = [position for position, index in enumerate(group) if index in ensemble_indices]
        if len(chosen) >= 2:
            mixture = member_log_probs[chosen[0]] - math.log(len(chosen))
            for position in chosen[1:]:
                mixture = torch.logaddexp(mixture, member_log_probs[position] - math.log(len(chosen)))
            ensemble_nll += float(-mixture.gather(-1, valid_targets[:, None]).double().sum())
        del member_log_probs
    return pair_agree, pair_kl, ensemble_nll


def _add_pair_statistics(
    member_log_probs: list[torch.Tensor], pair_agree: torch.Tensor, pair_kl: torch.Tensor
) -> None:
    """Add one batch's top-1 agreement counts and KL(a || b) sums of every ordered pair of members, in place."""
    top1 = [lp.argmax(-1) for lp in member_log_probs]
    for a in range(len(member_log_probs)):
        probs_a = member_log_probs[a].exp()
        for b in range(len(member_log_probs)):
            pair_agree[a, b] += float((top1[a] == top1[b]).sum())
            if a != b:
                kl = (probs_a * (member_log_probs[a] - member_log_probs[b])).sum(-1)
                pair_kl[a, b] += float(kl.double().sum())
        del probs_a


def _ensemble_report(
    members: list[_Member],
    chosen_members: list[int],
    group_id: int,
    ensemble_nll: float,
    num_targets: int,
    num_bytes: int,
) -> dict[str, Any]:
    """The report of one uniform mixture ensemble, against its best member."""
    best = min(chosen_members, key=lambda i: members[i].stats["nll_sum"])
    ensemble_loss = ensemble_nll / num_targets
    best_loss = members[best].stats["nll_sum"] / num_targets
    return {
        "members": [members[i].name for i in chosen_members],
        "combination": "mixture",
        "weights": [1.0 / len(chosen_members)] * len(chosen_members),
        "tokenizer_group": group_id,
        "num_tokens": num_targets,
        "loss": ensemble_loss,
        "perplexity": math.exp(ensemble_loss),
        "bits_per_byte": ensemble_nll / math.log(2) / num_bytes if num_bytes else None,
        "best_member": members[best].name,
        "best_member_perplexity": math.exp(best_loss),
        "gain_nats_per_token": best_loss - ensemble_loss,
        "perplexity_reduction": 1.0 - math.exp(ensemble_loss) / math.exp(best_loss),
    }


def _model_report(member: _Member, dataset: Dataset, has_text: bool, has_choices: bool) -> dict[str, Any]:
    """One model's row of the report: size, tokenizer group, text figures and multiple-choice accuracy."""
    report: dict[str, Any] = {
        "name": member.name,
        "path": member.path,
        "num_parameters": sum(p.numel() for p in member.model.parameters()),
        "tokenizer_group": member.group,
        "vocab_size": len(member.tokenizer),
    }
    stats = member.stats
    if has_text and stats.get("num_tokens"):
        loss = stats["nll_sum"] / stats["num_tokens"]
        report.update(
            num_tokens=stats["num_tokens"],
            num_bytes=stats["num_bytes"],
            loss=loss,
            perplexity=math.exp(loss),
            bits_per_byte=stats["nll_sum"] / math.log(2) / stats["num_bytes"] if stats["num_bytes"] else None,
            next_token_accuracy=stats["correct"] / stats["num_tokens"],
        )
    if has_choices:
        report["accuracy"] = multiple_choice_accuracy(member.model, member.tokenizer, dataset)
    return report


def multiple_choice_accuracy(model: Any, tokenizer: Any, dataset: Dataset) -> float:
    """Share of rows whose `label` indexes the choice with the highest total log-likelihood after the prompt.

    Each row has `choices` (`list[str]`, continuations, usually starting with a space), `label` (`int`) and an
    optional `prompt` (`str`) column; each choice is scored as `sum log p(choice tokens | context + prompt)`.
    """
    import torch

    from .evaluation import model_device

    device = model_device(model)
    context = _context_token_id(tokenizer)
    correct = 0
    prompts = dataset["prompt"] if "prompt" in dataset.column_names else [""] * len(dataset)
    for prompt, choices, label in zip(prompts, dataset["choices"], dataset["label"], strict=True):
        if not isinstance(label, int) or not 0 <= label < len(choices):
            raise ValueError(f"label {label!r} is not an index into choices {choices!r}; use 0..{len(choices) - 1}.")
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        prefix = ([context] if context is not None else []) + prompt_ids
        scores = []
        for choice in choices:
            choice_ids = tokenizer(choice, add_special_tokens=False)["input_ids"]
            if not prefix:
                raise ValueError("multiple-choice scoring needs a prompt or a tokenizer with a BOS/EOS token.")
            ids = torch.tensor([prefix + choice_ids], device=device)
            with torch.no_grad():
                log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            targets = ids[0, 1:]
            token_scores = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)[len(prefix) - 1 :]
            scores.append(float(token_scores.double().sum()))
        correct += int(max(range(len(choices)), key=scores.__getitem__) == label)
    return correct / len(dataset) if len(dataset) else float("nan")


def _format_number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_report(report: dict[str, Any]) -> str:
    """The report as plain-text tables (what the CLI prints; also saved as `report.md`)."""
    lines = [f"dataset: {report['dataset']['description']} ({report['dataset']['num_documents']} documents)", ""]
    with_accuracy = any("accuracy" in model for model in report["models"])
    columns = ["model", "parameters", "perplexity", "bits/byte", "top-1 acc"]
    columns += ["accuracy"] * with_accuracy + ["tokenizer group"]
    rows = []
    for model in report["models"]:
        rows.append(
            [
                model["name"],
                f"{model['num_parameters'] / 1e6:.2f}M",
                _format_number(model.get("perplexity"), 2),
                _format_number(model.get("bits_per_byte")),
                _format_number(model.get("next_token_accuracy")),
                *([_format_number(model.get("accuracy"))] * with_accuracy),
                str(model["tokenizer_group"]),
            ]
        )
    lines += _table(columns, rows)
    names = report["names"]
    for title, key, digits in (
        ("top-1 agreement (same tokenizer only)", "top1_agreement", 3),
        ("symmetric KL, nats/token (same tokenizer only)", "symmetric_kl", 4),
    ):
        lines += ["", title]
        lines += _table(
            ["", *names],
            [[name, *[_format_number(v, digits) for v in row]] for name, row in zip(names, report[key], strict=True)],
        )
    for ensemble in report["ensembles"]:
        lines += [
            "",
            f"mixture ensemble of {', '.join(ensemble['members'])}: perplexity {ensemble['perplexity']:.2f} "
            f"(best member {ensemble['best_member']}: {ensemble['best_member_perplexity']:.2f}; gain "
            f"{ensemble['gain_nats_per_token']:+.4f} nats/token, {100 * ensemble['perplexity_reduction']:+.1f}% "
            "perplexity reduction)",
        ]
    return "\n".join(lines) + "\n"


def _table(columns: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(columns, *rows, strict=True)]
    header = "| " + " | ".join(str(c).ljust(w) for c, w in zip(columns, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows]
    return [header, rule, *body]


def plot_heatmap(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Save the top-1 agreement and symmetric KL matrices side by side as a PNG (matplotlib, Agg; no display)."""
    import numpy as np

    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "the heatmap of `compare --output_dir` needs matplotlib: pip install 'hf_interop[demo]' (or matplotlib)."
        ) from error

    names = report["names"]
    size = max(4.0, 0.9 * len(names) + 2.5)
    figure = Figure(figsize=(2 * size, size), layout="constrained")
    FigureCanvasAgg(figure)
    for axis, key, title, cmap in zip(
        figure.subplots(1, 2),
        ("top1_agreement", "symmetric_kl"),
        ("top-1 agreement", "symmetric KL (nats/token)"),
        ("viridis", "magma_r"),
        strict=True,
    ):
        matrix = np.array([[np.nan if v is None else v for v in row] for row in report[key]], dtype=float)
        image = axis.imshow(matrix, cmap=cmap)
        axis.set_xticks(range(len(names)), labels=names, rotation=45, ha="right")
        axis.set_yticks(range(len(names)), labels=names)
        axis.set_title(title)
        for (row, column), value in np.ndenumerate(matrix):
            if np.isnan(value):
                axis.text(column, row, "n/a", ha="center", va="center", color="gray")
                continue
            red, green, blue, _ = image.cmap(image.norm(value))
            color = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"
            axis.text(column, row, f"{value:.3g}", ha="center", va="center", color=color)
        figure.colorbar(image, ax=axis, shrink=0.8)
    figure.savefig(path, dpi=100)


def write_report(report: dict[str, Any], output_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write `report.json`, `report.md` and `heatmap.png` into `output_dir`, which appears complete or not at all."""
    with atomic_directory(output_dir, overwrite=overwrite) as tmp_dir:
        atomic_write_json(tmp_dir / "report.json", report)
        atomic_write_text(tmp_dir / "report.md", format_report(report))
        plot_heatmap(report, tmp_dir / "heatmap.png")
    return Path(output_dir)
