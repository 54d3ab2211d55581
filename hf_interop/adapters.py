"""LoRA around PEFT: a `LoraConfig` from plain arguments, adapter-only checkpoints, merged full-model export.

LoRA (https://huggingface.co/papers/2106.09685) trains low-rank updates next to frozen weights. The helpers here
give every hf_interop trainer the same knobs TRL's `ModelConfig`, axolotl and LLaMA-Factory expose (`r`,
`lora_alpha`, `lora_dropout`, `target_modules`, `use_dora`, `use_rslora`, `modules_to_save`), check the target
modules against the model before any training starts, and write outputs atomically with a model card.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .logging_utils import get_logger
from .utils import atomic_directory

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = get_logger(__name__)

ALL_LINEAR = "all-linear"
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")


def _linear_module_names(model: torch.nn.Module) -> list[str]:
    """Full names of the linear layers LoRA can adapt (nn.Linear, GPT-2's Conv1D), output head excluded."""
    import torch
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head:
            names.append(name)
    return names


def _matches(target: str, module_name: str) -> bool:
    """PEFT's rule for a list entry: the full name, or a suffix after a dot."""
    return module_name == target or module_name.endswith(f".{target}")


def resolve_target_modules(model: torch.nn.Module, target_modules: str | Sequence[str] | None = None) -> list[str]:
    """Target modules of `model` for LoRA, checked before any training starts.

    With `target_modules=None` (or `"all-linear"`) every linear layer except the output head is targeted, named
    by its short name (`q_proj`, `c_fc`, ...) when that name denotes only such layers. A list entry or a regex
    that matches no module raises a `ValueError` listing the model's linear layers.

    Returns:
        `list[str]`: the short names (or full names) PEFT should target; for a regex, the full names it matches.
    """
    linear_names = _linear_module_names(model)
    if not linear_names:
        raise ValueError(f"{type(model).__name__} has no linear layers (other than its output head) to adapt.")
    short_names = sorted({name.rsplit(".", 1)[-1] for name in linear_names})
    all_module_names = [name for name, _ in model.named_modules() if name]
    if target_modules is None or (isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR):
        linear_set = set(linear_names)
        resolved = []
        for short in short_names:
            holders = [name for name in all_module_names if _matches(short, name)]
            if all(name in linear_set for name in holders):
                resolved.append(short)
            else:  # the short name also denotes a non-linear module (or the head): name the layers in full
                resolved.extend(name for name in linear_names if name.rsplit(".", 1)[-1] == short)
        return resolved
    if isinstance(target_modules, str):
        matched = [name for name in all_module_names if re.fullmatch(target_modules, name)]
        if not matched:
            raise ValueError(
                f"target_modules={target_modules!r} (a regex, matched against full module names) matches no module "
                f"of {type(model).__name__}. Its linear layers are named {short_names}; pass a list of those, or "
                "leave target_modules out to adapt all linear layers except the output head."
            )
        return matched
    targets = list(target_modules)
    if not targets or not all(isinstance(target, str) for target in targets):
        raise ValueError(f"target_modules={target_modules!r} must be a non-empty list of module names.")
    unmatched = [target for target in targets if not any(_matches(target, name) for name in all_module_names)]
    if unmatched:
        raise ValueError(
            f"target_modules entries {unmatched} match no module of {type(model).__name__}. Its linear layers are "
            f"named {short_names}; fix the names, or leave target_modules out to adapt all linear layers except "
            "the output head."
        )
    return targets


def build_lora_config(
    r: int = 16,
    lora_alpha: float = 32,
    lora_dropout: float = 0.05,
    target_modules: str | Sequence[str] | None = None,
    use_dora: bool = False,
    use_rslora: bool = False,
    modules_to_save: Sequence[str] | None = None,
    task_type: str = "CAUSAL_LM",
    model: torch.nn.Module | None = None,
    **lora_kwargs: Any,
) -> LoraConfig:
    """A `peft.LoraConfig` from plain arguments, checked against `model` when one is given.

    Args:
        r (`int`, *optional*, defaults to 16): rank of the update; higher adds capacity and memory.
        lora_alpha (`float`, *optional*, defaults to 32): the update is scaled by `lora_alpha / r`
            (`lora_alpha / sqrt(r)` with `use_rslora`).
        lora_dropout (`float`, *optional*, defaults to 0.05): dropout on the adapter input, in [0, 1).
        target_modules (`str` or `list[str]`, *optional*):
            Module names (matched as PEFT does: full name or dotted suffix) or a regex over full names. Defaults
            to every linear layer except the output head. With `model`, names that match nothing raise here,
            before training, instead of silently adapting nothing.
        use_dora (`bool`, *optional*, defaults to `False`): weight-decomposed LoRA
            (https://huggingface.co/papers/2402.09353).
        use_rslora (`bool`, *optional*, defaults to `False`): rank-stabilised scaling
            (https://huggingface.co/papers/2312.03732).
        modules_to_save (`list[str]`, *optional*): modules trained in full and saved with the adapter (e.g.
            `["lm_head"]` after adding tokens).
        task_type (`str`, *optional*, defaults to `"CAUSAL_LM"`): PEFT task type.
        model (`torch.nn.Module`, *optional*): the model the adapter is for; resolves `target_modules` to its
            layer names and checks `modules_to_save`. GPT-2's Conv1D layers get `fan_in_fan_out=True`.
        **lora_kwargs: any other `LoraConfig` field (e.g. `bias`, `init_lora_weights`, `layers_to_transform`).

    Returns:
        `peft.LoraConfig`
    """
    from peft import LoraConfig

    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r={r!r} must be a positive integer (the LoRA rank), e.g. r=16.")
    if not isinstance(lora_alpha, (int, float)) or isinstance(lora_alpha, bool) or lora_alpha <= 0:
        raise ValueError(f"lora_alpha={lora_alpha!r} must be a positive number (commonly 2 * r).")
    if not isinstance(lora_dropout, (int, float)) or not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout={lora_dropout!r} must be in [0, 1).")
    if task_type not in TASK_TYPES:
        raise ValueError(f"task_type={task_type!r} is not one of {list(TASK_TYPES)}.")
    if modules_to_save is not None and (
        isinstance(modules_to_save, str) or not all(isinstance(name, str) for name in modules_to_save)
    ):
        raise ValueError(f"modules_to_save={modules_to_save!r} must be a list of module names, e.g. ['lm_head'].")

    fan_in_fan_out = lora_kwargs.pop("fan_in_fan_out", None)
    if model is not None:
        resolved = resolve_target_modules(model, target_modules)
        if modules_to_save:
            names = [name for name, _ in model.named_modules() if name]
            missing = [target for target in modules_to_save if not any(_matches(target, name) for name in names)]
            if missing:
                raise ValueError(
                    f"modules_to_save entries {missing} match no module of {type(model).__name__}; pass names of "
                    "its modules (e.g. 'lm_head', 'embed_tokens')."
                )
        if fan_in_fan_out is None:
            from transformers.pytorch_utils import Conv1D

            fan_in_fan_out = any(
                isinstance(module, Conv1D) and any(_matches(target, name) for target in resolved)
                for name, module in model.named_modules()
            )
        target_modules = resolved
    elif target_modules is None:
        target_modules = ALL_LINEAR  # PEFT resolves it when the model is wrapped (output head excluded)
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
        use_dora=use_dora,
        use_rslora=use_rslora,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        task_type=task_type,
        fan_in_fan_out=bool(fan_in_fan_out),
        **lora_kwargs,
    )


def _base_model_name(peft_model: PeftModel) -> str | None:
    config = peft_model.peft_config.get(peft_model.active_adapter)
    name = getattr(config, "base_model_name_or_path", None)
    if name:
        return str(name)
    base = peft_model.get_base_model()
    return getattr(base.config, "_name_or_path", None) or None


def _adapter_summary(peft_model: PeftModel) -> dict[str, Any]:
    config = peft_model.peft_config[peft_model.active_adapter]
    targets = config.target_modules
    return {
        "adapter_name": peft_model.active_adapter,
        "r": getattr(config, "r", None),
        "lora_alpha": getattr(config, "lora_alpha", None),
        "lora_dropout": getattr(config, "lora_dropout", None),
        "use_dora": getattr(config, "use_dora", None),
        "use_rslora": getattr(config, "use_rslora", None),
        "target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets,
        "modules_to_save": sorted(config.modules_to_save) if config.modules_to_save else None,
    }


def _write_metadata(
    folder: Path,
    kind: str,
    model_name: str,
    base_model: str | None,
    card_metadata: dict[str, Any],
    card_adapter: dict,
    lineage_adapter: dict[str, Any],
) -> None:
    """The model card and `hf_interop_lineage.json` (the base model, commit hash for hub ids, and the LoRA setup)."""
    from .hub.outputs import write_output_metadata

    card = {"model_name": model_name, "adapter": card_adapter, **card_metadata}
    card.setdefault("base_model", base_model or "unknown")
    lineage = {"base_model": base_model, "extra": {"lora": lineage_adapter}, "strict": False}
    # Adapter cards have never named their manifest; keep them as they were.
    write_output_metadata(folder, kind, card=card, lineage=lineage, link_manifest=False)


def _check_peft_model(peft_model: Any, function: str) -> None:
    from peft import PeftModel

    if not isinstance(peft_model, PeftModel):
        raise TypeError(
            f"{function} needs a peft.PeftModel (e.g. from `peft.get_peft_model(model, build_lora_config(...))`), "
            f"got {type(peft_model).__name__}."
        )


def save_adapter_checkpoint(
    peft_model: PeftModel,
    output_dir: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase | None = None,
    overwrite: bool = False,
    **card_metadata: Any,
) -> Path:
    """Save only the adapter weights (plus tokenizer and a `lora` model card) atomically.

    The folder holds `adapter_config.json` and `adapter_model.safetensors`: megabytes instead of the whole model.
    Load it back with `peft.PeftModel.from_pretrained(base_model, output_dir)`.

    Args:
        peft_model (`PeftModel`): the adapted model.
        output_dir (`str` or `os.PathLike`): target folder (written to a temporary folder, then renamed).
        tokenizer (`PreTrainedTokenizerBase`, *optional*): saved next to the adapter.
        overwrite (`bool`, *optional*, defaults to `False`): replace an existing folder.
        **card_metadata: extra model-card fields (`datasets`, `metrics`, `hyperparameters`, `base_model`, ...).

    Returns:
        `Path` of the folder.
    """
    _check_peft_model(peft_model, "save_adapter_checkpoint")
    output_dir = Path(output_dir)
    with atomic_directory(output_dir, overwrite=overwrite) as tmp_dir:
        peft_model.save_pretrained(tmp_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp_dir)
        summary = _adapter_summary(peft_model)
        _write_metadata(
            tmp_dir, "lora", output_dir.name, _base_model_name(peft_model), card_metadata, summary, summary
        )
    return output_dir


def export_merged_model(
    peft_model: PeftModel,
    output_dir: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase | None = None,
    in_place: bool = False,
    safe_merge: bool = True,
    overwrite: bool = False,
    **card_metadata: Any,
) -> PreTrainedModel:
    """Fold the LoRA adapter into the base weights and save a plain, full checkpoint with tokenizer and card.

    The result loads with `AutoModelForCausalLM.from_pretrained(output_dir)` (or :func:`hf_interop.load_causal_lm`)
    without PEFT, and computes what the adapted model computes. The folder is written to a temporary name and
    renamed into place, so it is never seen half-written.

    Args:
        peft_model (`PeftModel`): the adapted model.
        output_dir (`str` or `os.PathLike`): target folder.
        tokenizer (`PreTrainedTokenizerBase`, *optional*): saved with the model.
        in_place (`bool`, *optional*, defaults to `False`):
            `False` merges a deep copy, so `peft_model` keeps its adapter (and can keep training) at the cost of a
            second copy of the model in memory. `True` merges into `peft_model` itself (no extra memory): after the
            call use the returned model, not `peft_model`.
        safe_merge (`bool`, *optional*, defaults to `True`): check the merged weights for NaNs before keeping them.
        overwrite (`bool`, *optional*, defaults to `False`): replace an existing folder.
        **card_metadata: model-card fields (`datasets`, `metrics`, `hyperparameters`, ...); the card kind is
            `"finetuned"` with the adapter's base model as `base_model`.

    Returns:
        `PreTrainedModel`: the merged model (without PEFT layers).
    """
    _check_peft_model(peft_model, "export_merged_model")
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(
            f"output_dir {str(output_dir)!r} already exists; pass overwrite=True to replace it or choose another."
        )
    base_model_name = _base_model_name(peft_model)
    adapter = _adapter_summary(peft_model)
    model = peft_model if in_place else copy.deepcopy(peft_model)
    merged = model.merge_and_unload(safe_merge=safe_merge)
    with atomic_directory(output_dir, overwrite=overwrite) as tmp_dir:
        merged.save_pretrained(tmp_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp_dir)
        hyperparameters = {"lora": adapter, **card_metadata.pop("hyperparameters", {})}
        _write_metadata(
            tmp_dir,
            "finetuned",
            output_dir.name,
            base_model_name,
            {"hyperparameters": hyperparameters, **card_metadata},
            {},
            adapter,
        )
    logger.info(f"Saved the merged model ({adapter['target_modules']} adapted) to {output_dir}")
    return merged


ADAPTER_SAFETENSORS_NAME = "adapter_model.safetensors"
ADAPTER_PICKLE_NAME = "adapter_model.bin"


def check_adapter_weights(
    adapter: str | os.PathLike,
    allow_pickle: bool = False,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
) -> None:
    """Refuse a PEFT adapter whose weights are pickle only, unless `allow_pickle`: the rule
    :func:`hf_interop.load_causal_lm` applies to full checkpoints, for what `PeftModel.from_pretrained` would load.

    PEFT reads `adapter_model.safetensors` when there is one and otherwise falls back to `adapter_model.bin`, a
    pickle that can run code when loaded. Call this before `PeftModel.from_pretrained` / `load_adapter`.

    Args:
        adapter (`str` or `os.PathLike`): a folder written by `PeftModel.save_pretrained`, or a hub id.
        allow_pickle (`bool`, *optional*, defaults to `False`): accept `adapter_model.bin` when there are no
            safetensors weights.
        revision (`str`, *optional*): revision of a hub `adapter`.
        token (`str` or `bool`, *optional*): hub token for a private `adapter`.

    Raises:
        `ModelLoadingError`: the adapter is missing, has no weights, or has pickle weights only and
            `allow_pickle=False`; the message names the adapter and the fix.
    """
    from .loading import ModelLoadingError, looks_like_hub_id

    folder = Path(adapter)
    if folder.is_dir():
        if not (folder / "adapter_config.json").is_file():
            raise ModelLoadingError(
                f"adapter folder {str(folder)!r} has no adapter_config.json, so it is not a PEFT adapter; point at a "
                "folder written by PeftModel.save_pretrained (or save_adapter_checkpoint)."
            )
        has_safetensors = (folder / ADAPTER_SAFETENSORS_NAME).is_file()
        has_pickle = (folder / ADAPTER_PICKLE_NAME).is_file()
        if not has_safetensors and not has_pickle:
            raise ModelLoadingError(
                f"adapter folder {str(folder)!r} has an adapter_config.json but no adapter weights "
                f"({ADAPTER_SAFETENSORS_NAME}); point at the folder PeftModel.save_pretrained wrote."
            )
        if not has_safetensors and not allow_pickle:
            raise ModelLoadingError(_pickle_adapter_message(repr(str(folder)), "holds only pickle weights"))
        return
    if not looks_like_hub_id(str(adapter)):
        raise ModelLoadingError(
            f"adapter {str(adapter)!r} does not exist; pass a folder written by PeftModel.save_pretrained or a hub id."
        )
    if not allow_pickle and not _hub_adapter_has_safetensors(str(adapter), revision, token):
        raise ModelLoadingError(
            _pickle_adapter_message(repr(str(adapter)), f"has no {ADAPTER_SAFETENSORS_NAME} (here or in the cache)")
        )


def _pickle_adapter_message(adapter: str, what: str) -> str:
    return (
        f"adapter {adapter} {what}, so PEFT would load {ADAPTER_PICKLE_NAME}, a pickle that can run arbitrary code "
        "when loaded. If you trust its source, pass allow_pickle=True (CLI: --allow_pickle); better, convert it once "
        "to safetensors: load it with allow_pickle=True and save it with `peft_model.save_pretrained(path)` "
        "(safetensors by default)."
    )


def _hub_adapter_has_safetensors(repo_id: str, revision: str | None, token: str | bool | None) -> bool:
    """Whether the hub adapter `repo_id` has safetensors weights: in the local cache when offline, else on the Hub."""
    from huggingface_hub import constants, file_exists, try_to_load_from_cache

    from .loading import ModelLoadingError

    if constants.HF_HUB_OFFLINE:
        return isinstance(try_to_load_from_cache(repo_id, ADAPTER_SAFETENSORS_NAME, revision=revision), str)
    try:
        return file_exists(repo_id, ADAPTER_SAFETENSORS_NAME, revision=revision, token=token)
    except (OSError, ValueError) as error:
        raise ModelLoadingError(
            f"could not check whether the hub adapter {repo_id!r} has {ADAPTER_SAFETENSORS_NAME} ({error}); check "
            "the id, the network and the token, or pass allow_pickle=True if you trust its source."
        ) from error
