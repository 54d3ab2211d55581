"""Students built from their teacher's own weights: depth pruning (layer selection) and width pruning.

DistilBERT (https://huggingface.co/papers/1910.01108) initialises its student with every other teacher layer;
Minitron (https://huggingface.co/papers/2407.14679) prunes MLP channels and attention heads by their activation
on a little calibration text, then distils. :func:`init_student_from_teacher` does both for the decoder families
listed in `SUPPORTED_MODEL_TYPES`: the student is an ordinary checkpoint of the teacher's own family (same
class, smaller config) that saves, loads and trains like any other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..logging_utils import get_logger
from ..utils import atomic_directory, atomic_write_json

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

logger = get_logger(__name__)


@dataclass(frozen=True)
class _FamilyLayout:
    """Where a family keeps its decoder layers and how its blocks are built."""

    layers_path: str  # attribute path from the CausalLM to the ModuleList of decoder layers
    num_layers_key: str  # config key holding the number of decoder layers
    intermediate_key: str  # config key holding the MLP width
    gated_mlp: bool  # gate_proj/up_proj/down_proj (nn.Linear) vs GPT-2's c_fc/c_proj (Conv1D, weight is (in, out))
    head_pruning: bool  # whether head_dim can stay fixed while the number of heads changes


_LLAMA_LIKE = _FamilyLayout(
    "model.layers", "num_hidden_layers", "intermediate_size", gated_mlp=True, head_pruning=True
)
_FAMILY_LAYOUTS: dict[str, _FamilyLayout] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    # GPT-2 derives head_dim from n_embd // n_head, so it cannot lose heads without changing the hidden size.
    "gpt2": _FamilyLayout("transformer.h", "n_layer", "n_inner", gated_mlp=False, head_pruning=False),
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_FAMILY_LAYOUTS))
LAYER_SELECTIONS = ("uniform", "first", "last")
WIDTH_IMPORTANCES = ("activation", "random")


def select_layers(num_teacher_layers: int, num_layers: int, layer_selection: str = "uniform") -> list[int]:
    """Indices of the teacher layers a `num_layers`-layer student keeps.

    `"uniform"` spreads them evenly and always keeps the first and the last layer (DistilBERT keeps every other
    layer); `"first"` keeps the bottom `num_layers`; `"last"` the top ones.
    """
    if layer_selection == "first":
        return list(range(num_layers))
    if layer_selection == "last":
        return list(range(num_teacher_layers - num_layers, num_teacher_layers))
    if layer_selection == "uniform":
        if num_layers == 1:
            return [0]
        step = (num_teacher_layers - 1) / (num_layers - 1)
        return sorted({round(index * step) for index in range(num_layers)})
    raise ValueError(f"layer_selection {layer_selection!r} is not one of {LAYER_SELECTIONS} or a list of indices.")


def _resolve_layer_indices(
    layer_selection: str | list[int] | tuple[int, ...], num_layers: int | None, num_teacher_layers: int
) -> list[int]:
    if isinstance(layer_selection, str):
        if layer_selection not in LAYER_SELECTIONS:
            raise ValueError(
                f"layer_selection {layer_selection!r} is not understood; use one of {list(LAYER_SELECTIONS)} or a "
                "list of teacher layer indices such as [0, 5, 11]."
            )
        if num_layers is None:
            raise ValueError(
                f"num_layers is required with layer_selection={layer_selection!r}; pass num_layers=N with "
                f"1 <= N <= {num_teacher_layers} (the teacher's number of layers), or a list of indices."
            )
        if (
            isinstance(num_layers, bool)
            or not isinstance(num_layers, int)
            or not 1 <= num_layers <= num_teacher_layers
        ):
            raise ValueError(
                f"num_layers={num_layers!r} is outside [1, {num_teacher_layers}]: the teacher has "
                f"{num_teacher_layers} decoder layers and a student keeps between 1 and all of them."
            )
        return select_layers(num_teacher_layers, num_layers, layer_selection)
    indices = list(layer_selection)
    if not indices or not all(isinstance(index, int) and not isinstance(index, bool) for index in indices):
        raise ValueError(
            f"layer_selection={layer_selection!r} must be a non-empty list of integer teacher layer indices."
        )
    bad = [index for index in indices if not 0 <= index < num_teacher_layers]
    if bad:
        raise ValueError(
            f"layer_selection holds indices {bad} outside [0, {num_teacher_layers - 1}] (the teacher has "
            f"{num_teacher_layers} decoder layers)."
        )
    if any(later <= earlier for earlier, later in zip(indices, indices[1:], strict=False)):
        raise ValueError(
            f"layer_selection={indices} must be strictly increasing (each teacher layer at most once, in order)."
        )
    if num_layers is not None and num_layers != len(indices):
        raise ValueError(
            f"num_layers={num_layers} disagrees with the {len(indices)} indices in layer_selection={indices}; "
            "leave num_layers out when you pass indices."
        )
    return indices


def _config_value(config: PretrainedConfig | dict, key: str) -> Any:
    return config[key] if isinstance(config, dict) else getattr(config, key)


def _layout_for(config: PretrainedConfig) -> _FamilyLayout:
    model_type = getattr(config, "model_type", None)
    if model_type not in _FAMILY_LAYOUTS:
        raise ValueError(
            f"init_student_from_teacher does not support model_type {model_type!r}; supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}. Convert the teacher to one of them or build the student by hand."
        )
    return _FAMILY_LAYOUTS[model_type]


def _teacher_widths(config: PretrainedConfig, layout: _FamilyLayout) -> tuple[int, int, int, int]:
    """`(intermediate_size, num_attention_heads, num_key_value_heads, head_dim)` of the teacher."""
    hidden_size = config.hidden_size
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or hidden_size // num_heads
    intermediate = getattr(config, layout.intermediate_key, None) or 4 * hidden_size
    return intermediate, num_heads, num_kv_heads, head_dim


def _resolve_head_targets(
    num_attention_heads: int | None,
    num_key_value_heads: int | None,
    teacher_heads: int,
    teacher_kv_heads: int,
    layout: _FamilyLayout,
    model_type: str,
) -> tuple[int, int] | None:
    """Checked `(num_attention_heads, num_key_value_heads)` of the student, or `None` when heads are kept."""
    if num_attention_heads is None and num_key_value_heads is None:
        return None
    if not layout.head_pruning:
        raise ValueError(
            f"attention-head pruning is not available for model_type {model_type!r} (its head size is tied to the "
            "hidden size); leave num_attention_heads/num_key_value_heads out and prune intermediate_size instead."
        )
    for name, value, limit in (
        ("num_attention_heads", num_attention_heads, teacher_heads),
        ("num_key_value_heads", num_key_value_heads, teacher_kv_heads),
    ):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit):
            raise ValueError(f"{name}={value!r} must be an integer in [1, {limit}] (the teacher has {limit}).")
    group_size = teacher_heads // teacher_kv_heads
    if num_key_value_heads is None:
        num_key_value_heads = teacher_kv_heads
        if num_attention_heads % teacher_kv_heads:
            raise ValueError(
                f"num_attention_heads={num_attention_heads} is not a multiple of the teacher's "
                f"{teacher_kv_heads} key/value heads, so the query heads cannot stay in equal GQA groups. Use a "
                f"multiple of {teacher_kv_heads}, or also pass num_key_value_heads (a divisor of "
                f"num_attention_heads) to drop whole key/value groups."
            )
    if num_attention_heads is None:
        num_attention_heads = num_key_value_heads * group_size
    if num_attention_heads % num_key_value_heads or num_attention_heads // num_key_value_heads > group_size:
        raise ValueError(
            f"num_attention_heads={num_attention_heads} with num_key_value_heads={num_key_value_heads} does not "
            f"form equal GQA groups of at most the teacher's {group_size} query heads per key/value head; choose "
            f"num_attention_heads = num_key_value_heads * g with 1 <= g <= {group_size}."
        )
    return num_attention_heads, num_key_value_heads


# Slightly over the 80-line guide on purpose: every step is already a named helper, and what remains is the
# public signature's pass-through and the `student_init.json` record, which reads best in one place.
def init_student_from_teacher(
    teacher: PreTrainedModel | str | os.PathLike,
    num_layers: int | None = None,
    layer_selection: str | list[int] = "uniform",
    *,
    intermediate_size: int | None = None,
    num_attention_heads: int | None = None,
    num_key_value_heads: int | None = None,
    width_importance: str = "activation",
    calibration_dataset: Dataset | list[str] | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    calibration_num_blocks: int = 32,
    calibration_block_size: int = 128,
    calibration_batch_size: int = 4,
    seed: int = 0,
    output_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> PreTrainedModel:
    """Build a smaller student of the teacher's own family from the teacher's weights.

    Depth pruning copies the embeddings, the chosen decoder layers, the final norm and the output head (tied
    embeddings stay tied). Optional width pruning (Minitron, https://huggingface.co/papers/2407.14679) then keeps,
    in every kept layer, the MLP channels and attention heads with the largest mean activation on calibration text:
    MLP channel importance is the mean |activation| entering the down projection, head importance the mean L2
    norm of the head's output entering the output projection, averaged over calibration tokens. Heads are pruned in
    whole GQA groups: each kept key/value head keeps the same number of query heads, so the student is a valid
    config of the same family with the teacher's head size.

    Args:
        teacher (`PreTrainedModel`, `str` or `os.PathLike`):
            The teacher model, or a checkpoint folder / hub id / `.gguf` file loaded with
            :func:`hf_interop.load_causal_lm` (its tokenizer is then used for calibration and saving). Supported
            model types: `SUPPORTED_MODEL_TYPES` (Llama, Mistral, Qwen2, Qwen3, GPT-2).
        num_layers (`int`, *optional*):
            Decoder layers of the student, between 1 and the teacher's. Required unless `layer_selection` is a list.
        layer_selection (`str` or `list[int]`, *optional*, defaults to `"uniform"`):
            `"uniform"` (evenly spread, first and last kept), `"first"`, `"last"`, or strictly increasing teacher
            layer indices.
        intermediate_size (`int`, *optional*):
            MLP width of the student (at most the teacher's). Keeps the most important channels.
        num_attention_heads (`int`, *optional*):
            Query heads of the student; a multiple of `num_key_value_heads`. Not available for GPT-2.
        num_key_value_heads (`int`, *optional*):
            Key/value heads of the student; fewer than the teacher's drops the least important GQA groups.
        width_importance (`str`, *optional*, defaults to `"activation"`):
            `"activation"` ranks channels and heads on calibration text; `"random"` picks them at random (seeded),
            a baseline that needs no calibration data.
        calibration_dataset (`Dataset` or `list[str]`, *optional*):
            Calibration text: rows with `input_ids` (e.g. from :func:`hf_interop.pack_dataset`), rows with a `text`
            column, or a list of strings. Defaults to the train split of the builtin corpus. Only used for width
            pruning with `width_importance="activation"`.
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            Tokenizer for text calibration data and for `output_dir`; taken from the checkpoint when `teacher`
            is a path.
        calibration_num_blocks (`int`, *optional*, defaults to 32): rows of calibration data used.
        calibration_block_size (`int`, *optional*, defaults to 128): tokens per row when text is packed.
        calibration_batch_size (`int`, *optional*, defaults to 4): rows per calibration forward pass.
        seed (`int`, *optional*, defaults to 0): seed of `width_importance="random"`.
        output_dir (`str` or `os.PathLike`, *optional*):
            If given, the student (and tokenizer) is saved there atomically with `student_init.json`, which
            records the teacher and the kept layers, channels and heads.
        overwrite (`bool`, *optional*, defaults to `False`): replace an existing `output_dir`.
        allow_pickle (`bool`, *optional*, defaults to `False`): a `teacher` path may hold pickle (`.bin`) weights,
            which can run code when loaded (safetensors only by default).

    Returns:
        `PreTrainedModel`: the student, same class, dtype and device as the teacher, in eval mode.

    Example:

    ```python
    >>> from hf_interop import default_teacher_path, init_student_from_teacher
    >>> student = init_student_from_teacher(default_teacher_path(), num_layers=6, intermediate_size=768)
    ```
    """
    _check_init_arguments(
        width_importance,
        calibration_num_blocks,
        calibration_block_size,
        calibration_batch_size,
        output_dir,
        overwrite,
    )
    teacher, tokenizer, teacher_name = _teacher_and_tokenizer(
        teacher, tokenizer, num_layers, layer_selection, allow_pickle=allow_pickle
    )
    config = teacher.config
    layout = _layout_for(config)
    num_teacher_layers = _config_value(config, layout.num_layers_key)
    layer_indices = _resolve_layer_indices(layer_selection, num_layers, num_teacher_layers)
    teacher_intermediate, teacher_heads, teacher_kv_heads, head_dim = _teacher_widths(config, layout)
    _check_intermediate_size(intermediate_size, teacher_intermediate)
    head_targets = _resolve_head_targets(
        num_attention_heads, num_key_value_heads, teacher_heads, teacher_kv_heads, layout, config.model_type
    )
    prune_mlp = intermediate_size is not None and intermediate_size < teacher_intermediate
    prune_heads = head_targets is not None and head_targets != (teacher_heads, teacher_kv_heads)

    student_config = _student_config(
        config,
        layout,
        layer_indices,
        intermediate_size if prune_mlp else None,
        head_targets if prune_heads else None,
        head_dim,
    )
    _warn_if_attention_is_scaled_by_layer(config, layer_indices, num_teacher_layers)
    kept_channels, kept_heads, calibration_info = _kept_widths(
        teacher,
        layout,
        layer_indices,
        head_dim,
        intermediate_size if prune_mlp else None,
        head_targets if prune_heads else None,
        width_importance,
        seed,
        calibration_dataset,
        tokenizer,
        calibration_num_blocks,
        calibration_block_size,
        calibration_batch_size,
    )

    student = _build_student(teacher, student_config, layout, layer_indices, kept_channels, kept_heads, head_dim)
    info = {
        "teacher": teacher_name or getattr(config, "_name_or_path", None) or config.model_type,
        "teacher_num_layers": num_teacher_layers,
        "kept_layers": layer_indices,
        "intermediate_size": intermediate_size if prune_mlp else teacher_intermediate,
        "num_attention_heads": head_targets[0] if prune_heads else teacher_heads,
        "num_key_value_heads": head_targets[1] if prune_heads else teacher_kv_heads,
        "width_importance": width_importance if (prune_mlp or prune_heads) else None,
        "calibration": calibration_info,
        "kept_channels": {str(i): kept_channels[i].tolist() for i in kept_channels},
        "kept_query_heads": {str(i): kept_heads[i][0].tolist() for i in kept_heads},
        "kept_key_value_heads": {str(i): kept_heads[i][1].tolist() for i in kept_heads},
    }
    logger.info(
        f"Student of {info['teacher']}: layers {layer_indices} of {num_teacher_layers}, intermediate_size "
        f"{info['intermediate_size']}, heads {info['num_attention_heads']}/{info['num_key_value_heads']}, "
        f"{sum(p.numel() for p in student.parameters()) / 1e6:.1f}M parameters."
    )
    if output_dir is not None:
        _save_student(student, tokenizer, info, output_dir, overwrite)
    return student


def _check_init_arguments(
    width_importance: str,
    calibration_num_blocks: Any,
    calibration_block_size: Any,
    calibration_batch_size: Any,
    output_dir: str | os.PathLike | None,
    overwrite: bool,
) -> None:
    """The checks of `init_student_from_teacher` that need no teacher."""
    if width_importance not in WIDTH_IMPORTANCES:
        raise ValueError(f"width_importance={width_importance!r} is not one of {list(WIDTH_IMPORTANCES)}.")
    for name, value in (
        ("calibration_num_blocks", calibration_num_blocks),
        ("calibration_block_size", calibration_block_size),
        ("calibration_batch_size", calibration_batch_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer.")
    if output_dir is not None and Path(output_dir).exists() and not overwrite:
        raise FileExistsError(
            f"output_dir {str(output_dir)!r} already exists; pass overwrite=True to replace it or choose another."
        )


def _teacher_and_tokenizer(
    teacher: Any, tokenizer: Any, num_layers: Any, layer_selection: Any, allow_pickle: bool = False
) -> tuple[PreTrainedModel, Any, str | None]:
    """The teacher (loaded when given as a path, after its config.json is checked) with its tokenizer and its name
    (the path; `None` for a model object)."""
    import torch

    teacher_name = None
    if isinstance(teacher, (str, os.PathLike)):
        teacher_name = str(teacher)
        _check_teacher_config_before_loading(teacher_name, num_layers, layer_selection)
        from ..loading import load_causal_lm

        teacher, loaded_tokenizer = load_causal_lm(teacher_name, allow_pickle=allow_pickle)
        tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
    elif not hasattr(teacher, "config") or not isinstance(teacher, torch.nn.Module):
        raise TypeError(
            f"teacher must be a transformers causal LM or a checkpoint path, got {type(teacher).__name__}."
        )
    if hasattr(teacher, "peft_config"):
        raise ValueError(
            "teacher is a PEFT model; merge its adapters first (hf_interop.export_merged_model or "
            "`merge_and_unload()`) and pass the plain model."
        )
    return teacher, tokenizer, teacher_name


def _check_intermediate_size(intermediate_size: Any, teacher_intermediate: int) -> None:
    if intermediate_size is not None and (
        isinstance(intermediate_size, bool)
        or not isinstance(intermediate_size, int)
        or not 1 <= intermediate_size <= teacher_intermediate
    ):
        raise ValueError(
            f"intermediate_size={intermediate_size!r} must be an integer in [1, {teacher_intermediate}] (the "
            "teacher's MLP width)."
        )


def _warn_if_attention_is_scaled_by_layer(config: PretrainedConfig, layer_indices: list[int], num_layers: int) -> None:
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) and layer_indices != list(range(num_layers)):
        logger.warning(
            "The teacher scales attention by 1/(layer index + 1); kept layers get their new index's scale, so "
            "the student will not reproduce those layers exactly."
        )


def _kept_widths(
    teacher: PreTrainedModel,
    layout: _FamilyLayout,
    layer_indices: list[int],
    head_dim: int,
    intermediate_size: int | None,
    head_targets: tuple[int, int] | None,
    width_importance: str,
    seed: int,
    calibration_dataset: Any,
    tokenizer: Any,
    calibration_num_blocks: int,
    calibration_block_size: int,
    calibration_batch_size: int,
) -> tuple[dict[int, torch.Tensor], dict[int, tuple[torch.Tensor, torch.Tensor]], dict[str, Any] | None]:
    """Which MLP channels (`intermediate_size` of them) and attention heads (`head_targets`) each kept layer keeps,
    as ascending teacher-local indices (none for a width that is not pruned), and what calibration data ranked them.

    Ranked by mean activation on calibration text (`"activation"`) or by seeded random scores (`"random"`).
    """
    import torch

    kept_channels: dict[int, torch.Tensor] = {}
    kept_heads: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    calibration_info: dict[str, Any] | None = None
    if intermediate_size is None and head_targets is None:
        return kept_channels, kept_heads, calibration_info
    teacher_intermediate, teacher_heads, teacher_kv_heads, _ = _teacher_widths(teacher.config, layout)
    if width_importance == "activation":
        blocks = _calibration_input_ids(calibration_dataset, tokenizer, calibration_num_blocks, calibration_block_size)
        channel_scores, head_scores = _activation_importance(
            teacher, layout, layer_indices, blocks, calibration_batch_size, head_dim
        )
        calibration_info = {"num_rows": len(blocks), "num_tokens": int(sum(row.numel() for row in blocks))}
    else:
        generator = torch.Generator().manual_seed(seed)
        channel_scores = {i: torch.rand(teacher_intermediate, generator=generator) for i in layer_indices}
        head_scores = {i: torch.rand(teacher_heads, generator=generator) for i in layer_indices}
    for index in layer_indices:
        if intermediate_size is not None:
            top = torch.topk(channel_scores[index], intermediate_size).indices
            kept_channels[index] = torch.sort(top).values
        if head_targets is not None:
            kept_heads[index] = _select_heads(head_scores[index], teacher_kv_heads, *head_targets)
    return kept_channels, kept_heads, calibration_info


def _save_student(
    student: PreTrainedModel, tokenizer: Any, info: dict[str, Any], output_dir: str | os.PathLike, overwrite: bool
) -> None:
    """Save the student, its tokenizer and `student_init.json` into `output_dir`, atomically."""
    with atomic_directory(output_dir, overwrite=overwrite) as tmp_dir:
        student.save_pretrained(tmp_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp_dir)
        atomic_write_json(tmp_dir / "student_init.json", info)


def _check_teacher_config_before_loading(name_or_path: str, num_layers: Any, layer_selection: Any) -> None:
    """With a local checkpoint, check family and layer arguments from config.json before loading weights."""
    folder = Path(name_or_path)
    if not (folder.is_dir() and (folder / "config.json").is_file()):
        return
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    layout = _layout_for(config)
    _resolve_layer_indices(layer_selection, num_layers, _config_value(config, layout.num_layers_key))


def _student_config(
    config: PretrainedConfig,
    layout: _FamilyLayout,
    layer_indices: list[int],
    intermediate_size: int | None,
    head_targets: tuple[int, int] | None,
    head_dim: int,
) -> PretrainedConfig:
    values = config.to_dict()
    values.pop("quantization_config", None)
    values[layout.num_layers_key] = len(layer_indices)
    if values.get("layer_types") is not None:
        values["layer_types"] = [values["layer_types"][index] for index in layer_indices]
    if "max_window_layers" in values and values.get("layer_types") is not None:
        # Qwen2/3 derive layer_types from max_window_layers when absent; keep the two consistent.
        full = [t == "full_attention" for t in values["layer_types"]]
        values["max_window_layers"] = full.index(False) if False in full else len(full)
    if intermediate_size is not None:
        values[layout.intermediate_key] = intermediate_size
    if head_targets is not None:
        values["num_attention_heads"], values["num_key_value_heads"] = head_targets
        values["head_dim"] = head_dim  # the head size stays the teacher's; hidden_size is untouched
    try:
        return type(config).from_dict(values)
    except Exception as error:  # strict config validation (e.g. Llama's hidden_size % num_attention_heads)
        raise ValueError(
            f"the pruned student config is not valid for model_type {config.model_type!r}: {error}. Choose "
            "num_attention_heads/num_key_value_heads/intermediate_size that the family accepts (e.g. Llama needs "
            f"hidden_size {config.hidden_size} divisible by num_attention_heads)."
        ) from error


def _select_heads(
    head_scores: torch.Tensor, teacher_kv_heads: int, num_heads: int, num_kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept query heads and key/value heads (ascending teacher indices) in equal GQA groups."""
    import torch

    group_size = head_scores.numel() // teacher_kv_heads
    grouped = head_scores.view(teacher_kv_heads, group_size)
    kv_heads = torch.sort(torch.topk(grouped.sum(dim=1), num_kv_heads).indices).values
    per_group = num_heads // num_kv_heads
    query_heads = []
    for kv_head in kv_heads.tolist():
        within = torch.sort(torch.topk(grouped[kv_head], per_group).indices).values
        query_heads.append(within + kv_head * group_size)
    return torch.cat(query_heads), kv_heads


def _rows_of_heads(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    import torch

    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def _build_student(
    teacher: PreTrainedModel,
    student_config: PretrainedConfig,
    layout: _FamilyLayout,
    layer_indices: list[int],
    kept_channels: dict[int, torch.Tensor],
    kept_heads: dict[int, tuple[torch.Tensor, torch.Tensor]],
    head_dim: int,
) -> PreTrainedModel:
    from transformers.initialization import no_init_weights

    parameter = next(teacher.parameters())
    # Every weight is overwritten below, so skip the (slow, for large models) random initialisation.
    with no_init_weights():
        student = type(teacher)(student_config)
    student.to(dtype=parameter.dtype)

    prefix = layout.layers_path + "."
    teacher_state = teacher.state_dict()
    student_state: dict[str, torch.Tensor] = {}
    for name, tensor in teacher_state.items():
        if not name.startswith(prefix):
            student_state[name] = tensor
    for new_index, old_index in enumerate(layer_indices):
        old_prefix = f"{prefix}{old_index}."
        for name, tensor in teacher_state.items():
            if not name.startswith(old_prefix):
                continue
            local = name[len(old_prefix) :]
            student_state[f"{prefix}{new_index}.{local}"] = _prune_tensor(
                local, tensor, layout, kept_channels.get(old_index), kept_heads.get(old_index), head_dim
            )
    expected = set(student.state_dict())
    missing = sorted(expected - set(student_state))
    unexpected = sorted(set(student_state) - expected)
    if missing or unexpected:
        raise RuntimeError(
            f"student and teacher weights do not line up (missing {missing[:5]}, unexpected {unexpected[:5]}); "
            "this model type's layout is not what hf_interop expects."
        )
    student.load_state_dict(student_state, strict=True)
    if getattr(student_config, "tie_word_embeddings", False):
        student.tie_weights()
    student.to(parameter.device)
    if getattr(teacher, "generation_config", None) is not None:
        student.generation_config = type(teacher.generation_config).from_dict(teacher.generation_config.to_dict())
    return student.eval()


def _prune_tensor(
    local_name: str,
    tensor: torch.Tensor,
    layout: _FamilyLayout,
    channels: torch.Tensor | None,
    heads: tuple[torch.Tensor, torch.Tensor] | None,
    head_dim: int,
) -> torch.Tensor:
    """Slice one decoder-layer tensor (name relative to the layer) to the kept channels / heads."""
    if channels is not None:
        channels = channels.to(tensor.device)
        if layout.gated_mlp:
            if local_name in ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.gate_proj.bias", "mlp.up_proj.bias"):
                return tensor.index_select(0, channels)
            if local_name == "mlp.down_proj.weight":
                return tensor.index_select(1, channels)
        else:  # GPT-2 Conv1D weights are (in_features, out_features)
            if local_name == "mlp.c_fc.weight":
                return tensor.index_select(1, channels)
            if local_name == "mlp.c_fc.bias":
                return tensor.index_select(0, channels)
            if local_name == "mlp.c_proj.weight":
                return tensor.index_select(0, channels)
    if heads is not None:
        query_rows = _rows_of_heads(heads[0], head_dim).to(tensor.device)
        kv_rows = _rows_of_heads(heads[1], head_dim).to(tensor.device)
        if local_name in ("self_attn.q_proj.weight", "self_attn.q_proj.bias"):
            return tensor.index_select(0, query_rows)
        if local_name in ("self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight"):
            return tensor.index_select(0, kv_rows)
        if local_name == "self_attn.v_proj.bias":
            return tensor.index_select(0, kv_rows)
        if local_name == "self_attn.o_proj.weight":
            return tensor.index_select(1, query_rows)
    return tensor


def _calibration_input_ids(
    calibration_dataset: Any, tokenizer: Any, num_blocks: int, block_size: int
) -> list[torch.Tensor]:
    """Calibration rows as 1-D token id tensors (at most `num_blocks`)."""
    import torch
    from datasets import Dataset

    if calibration_dataset is None or isinstance(calibration_dataset, list):
        if tokenizer is None:
            raise ValueError(
                "width pruning by activation needs calibration token ids: pass tokenizer=... (or a teacher path, "
                "whose tokenizer is loaded), or a calibration_dataset with an `input_ids` column, or "
                "width_importance='random'."
            )
        if calibration_dataset is None:
            from ..data import load_builtin_corpus

            calibration_dataset = load_builtin_corpus()["train"]
        else:
            if not calibration_dataset or not all(isinstance(text, str) for text in calibration_dataset):
                raise ValueError("calibration_dataset as a list must hold non-empty text strings.")
            calibration_dataset = Dataset.from_dict({"text": calibration_dataset})
    if not isinstance(calibration_dataset, Dataset):
        raise TypeError(
            f"calibration_dataset must be a datasets.Dataset or a list of strings, got {type(calibration_dataset)}."
        )
    if "input_ids" not in calibration_dataset.column_names:
        if "text" not in calibration_dataset.column_names or tokenizer is None:
            raise ValueError(
                f"calibration_dataset has columns {calibration_dataset.column_names}; it needs `input_ids`, or "
                "`text` together with tokenizer=..."
            )
        from ..data import pack_dataset

        calibration_dataset = pack_dataset(
            calibration_dataset, tokenizer, block_size=block_size, max_blocks=num_blocks
        )
    rows = calibration_dataset.select(range(min(num_blocks, len(calibration_dataset))))["input_ids"]
    rows = [torch.tensor(row, dtype=torch.long) for row in rows if len(row) > 0]
    if not rows:
        raise ValueError(
            f"calibration_dataset gave no tokens (block_size={block_size}); pass more text or a smaller "
            "calibration_block_size."
        )
    return rows


def _activation_importance(
    teacher: PreTrainedModel,
    layout: _FamilyLayout,
    layer_indices: list[int],
    blocks: list[torch.Tensor],
    batch_size: int,
    head_dim: int,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Mean |activation| of MLP channels and mean L2 norm of head outputs per kept layer, over real tokens."""
    import torch

    layers = teacher.get_submodule(layout.layers_path)
    device = next(teacher.parameters()).device
    state: dict[str, Any] = {"mask": None}
    channel_sums: dict[int, torch.Tensor] = {}
    head_sums: dict[int, torch.Tensor] = {}

    def channel_hook(index: int):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            activation = args[0].detach().abs().double() * state["mask"][..., None]
            channel_sums[index] = channel_sums.get(index, 0) + activation.sum(dim=(0, 1)).cpu()

        return hook

    def head_hook(index: int):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            output = args[0].detach().double()
            norms = output.view(*output.shape[:-1], -1, head_dim).norm(dim=-1) * state["mask"][..., None]
            head_sums[index] = head_sums.get(index, 0) + norms.sum(dim=(0, 1)).cpu()

        return hook

    handles = []
    for index in layer_indices:
        layer = layers[index]
        mlp_out = layer.mlp.down_proj if layout.gated_mlp else layer.mlp.c_proj
        handles.append(mlp_out.register_forward_pre_hook(channel_hook(index)))
        if layout.head_pruning:
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(head_hook(index)))
    was_training = teacher.training
    teacher.eval()
    num_tokens = 0
    try:
        with torch.no_grad():
            for start in range(0, len(blocks), batch_size):
                batch = blocks[start : start + batch_size]
                length = max(row.numel() for row in batch)
                input_ids = torch.zeros(len(batch), length, dtype=torch.long)
                mask = torch.zeros(len(batch), length, dtype=torch.long)
                for row_index, row in enumerate(batch):
                    input_ids[row_index, : row.numel()] = row
                    mask[row_index, : row.numel()] = 1
                state["mask"] = mask.to(device=device, dtype=torch.float64)
                teacher(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)
                num_tokens += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
        teacher.train(was_training)
    channel_scores = {index: channel_sums[index] / num_tokens for index in layer_indices}
    head_scores = {index: head_sums[index] / num_tokens for index in head_sums}
    return channel_scores, head_scores
