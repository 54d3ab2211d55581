"""Member handling shared by the ensemble models: specs, validation before loading, token-map checks, placement,
and loading the members of a causal LM ensemble (LoRA adapters of one base included)."""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from ..loading import dispatch_loaded_model  # noqa: F401  (one implementation, shared with the loaders)
from ..logging_utils import get_logger
from .combination import check_member_weights

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from .config import EnsembleConfig

logger = get_logger(__name__)

# Texts whose encodings must agree between members: words, code, whitespace runs, digits, accents, CJK, emoji.
PROBE_TEXTS = (
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def mean(values):\n    return sum(values) / len(values)\n",
    "  two leading spaces,\ta tab,\n\nand blank lines   ",
    "1234567890 3.14159 -42 1e-9 0x1F",
    "naïve café in Zürich, Ελληνικά, 東京タワー, emoji 😀👍",
    "<html><body class='x'>{\"key\": [1, 2]}</body></html>",
)

CROSS_TOKENIZER_HINT = (
    "A logit-level ensemble needs members that share one token-to-id map. For members with different tokenizers "
    "use cross-tokenizer ensembling, which aligns vocabularies first (DeePEn, https://huggingface.co/papers/2404.12715; "
    "UniTE, https://huggingface.co/papers/2410.03777), or pick members that share a tokenizer."
)


def member_spec(member: Any, index: int, revision: str | None = None) -> dict[str, Any]:
    """`{"name_or_path", "revision"}` for a member given by name/path or as such a dict.

    `revision` applies to a name/path, and to a dict that pins none itself (a dict pinning another one is refused).
    """
    if isinstance(member, dict):
        if "name_or_path" not in member:
            raise ValueError(
                f"members[{index}] is a dict without 'name_or_path' ({member!r}); use "
                "{'name_or_path': 'org/name' or '/path', 'revision': '<commit>'}."
            )
        own_revision = member.get("revision")
        if own_revision is not None and revision is not None and own_revision != revision:
            raise ValueError(
                f"members[{index}] pins revision {own_revision!r} but revisions[{index}] is {revision!r}; give the "
                "revision in one place only."
            )
        spec = {"name_or_path": str(member["name_or_path"]), "revision": own_revision or revision}
        if member.get("gguf_file"):
            spec["gguf_file"] = member["gguf_file"]
        return spec
    if isinstance(member, (str, os.PathLike)):
        return {"name_or_path": str(member), "revision": revision}
    raise TypeError(
        f"members[{index}] has type {type(member).__name__}; pass a hub id, a local path, a "
        "{'name_or_path', 'revision'} dict, a loaded model, or a (model, tokenizer) pair."
    )


def check_member_path(spec: dict[str, Any], index: int) -> None:
    """Fail before loading anything when a member is a local path that does not exist."""
    from ..loading import looks_like_hub_id

    name = spec["name_or_path"]
    if not name:
        raise ValueError(f"members[{index}] has an empty name_or_path; pass a hub id or a local checkpoint folder.")
    if os.path.exists(name):
        return
    if looks_like_hub_id(name) and not name.endswith(".gguf"):
        return
    raise ValueError(
        f"members[{index}] path {name!r} does not exist. Pass an existing checkpoint folder, a .gguf file, or a hub "
        "id such as 'org/name' (with revision='<commit>' to pin it)."
    )


# Files of which a checkpoint folder holding a tokenizer has at least one.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def check_member_has_tokenizer(spec: dict[str, Any], index: int) -> None:
    """Refuse, before loading, a local member folder without tokenizer files when no shared tokenizer was given."""
    name = spec["name_or_path"]
    folder = Path(name)
    if not folder.is_dir() or spec.get("gguf_file"):
        return
    if any((folder / file).is_file() for file in TOKENIZER_FILES):
        return
    raise ValueError(
        f"members[{index}] folder {name!r} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...), as a "
        "checkpoint written by model.save_pretrained alone does. Pass the shared tokenizer: "
        "from_members(..., tokenizer=tokenizer) (members then load without theirs), or save the tokenizer into "
        "that folder."
    )


def check_no_remote_code(trust_remote_code: Any, where: str) -> None:
    if trust_remote_code:
        raise ValueError(
            f"{where} asks for trust_remote_code={trust_remote_code!r}. Ensembles load every member with "
            "trust_remote_code=False so that no checkpoint can run its own code; drop the setting, or load the member "
            "yourself (after reviewing its code) and pass the loaded model."
        )


def resolved_revision(model: Any, spec_revision: str | None, name_or_path: str | None = None) -> str | None:
    """The commit a hub member was loaded from (pins branches such as 'main'); `None` for local folders."""
    commit = getattr(getattr(model, "config", None), "_commit_hash", None)
    if commit:
        return commit
    if name_or_path and not os.path.exists(name_or_path):
        from ..loading import looks_like_hub_id, resolve_commit_hash

        if looks_like_hub_id(name_or_path):
            try:
                return resolve_commit_hash(name_or_path, spec_revision) or spec_revision
            except Exception as error:  # the commit is lineage, not a reason to fail a loaded ensemble
                logger.warning(
                    f"could not resolve the commit of {name_or_path!r} ({error}); recording {spec_revision!r}."
                )
    return spec_revision


# --------------------------------------------------------------------------------------------------------------
# Token maps
# --------------------------------------------------------------------------------------------------------------


def check_tokenizers_compatible(
    tokenizers: Sequence[PreTrainedTokenizerBase | None], names: Sequence[str], hint: str = CROSS_TOKENIZER_HINT
) -> None:
    """Raise `ValueError` unless every tokenizer maps the same tokens to the same ids and encodes probes alike.

    Members without a tokenizer (`None`) are skipped. The message lists differing tokens (first 10) and ends with
    `hint` (by default: a pointer to cross-tokenizer ensembling).
    """
    present = [(index, tokenizer) for index, tokenizer in enumerate(tokenizers) if tokenizer is not None]
    if len(present) < 2:
        return
    reference_index, reference = present[0]
    reference_vocab = reference.get_vocab()
    for index, tokenizer in present[1:]:
        vocab = tokenizer.get_vocab()
        if vocab != reference_vocab:
            differing = sorted(
                token for token in set(reference_vocab) | set(vocab) if reference_vocab.get(token) != vocab.get(token)
            )
            examples = ", ".join(
                f"{token!r} (id {reference_vocab.get(token, 'missing')} vs {vocab.get(token, 'missing')})"
                for token in differing[:10]
            )
            raise ValueError(
                f"members[{index}] ({names[index]!r}) does not share the token-to-id map of members[{reference_index}] "
                f"({names[reference_index]!r}): {len(differing)} tokens differ (vocabulary sizes {len(reference_vocab)} "
                f"and {len(vocab)}), e.g. {examples}. {hint}"
            )
        for text in PROBE_TEXTS:
            expected = reference(text, add_special_tokens=False)["input_ids"]
            found = tokenizer(text, add_special_tokens=False)["input_ids"]
            if expected != found:
                raise ValueError(
                    f"members[{index}] ({names[index]!r}) has the same vocabulary as members[{reference_index}] but "
                    f"encodes {text!r} differently ({found[:12]} vs {expected[:12]}): its normaliser or "
                    f"pre-tokenizer differs. {hint}"
                )
        for attribute in ("eos_token_id", "bos_token_id"):
            if getattr(tokenizer, attribute, None) != getattr(reference, attribute, None):
                logger.warning(
                    f"members[{index}] {attribute}={getattr(tokenizer, attribute, None)} differs from members"
                    f"[{reference_index}] ({getattr(reference, attribute, None)}); generation uses members"
                    f"[{reference_index}]'s."
                )


def shared_vocab_size(
    output_sizes: Sequence[int | None], tokenizer: Any, names: Sequence[str], allow_vocab_padding: bool = False
) -> int:
    """The vocabulary the members are combined over: the shared tokenizer's length, which every member must cover.

    Without a tokenizer, members whose output sizes differ are refused (ids past the smallest size may be real
    tokens) unless `allow_vocab_padding`, which combines over the smallest size.
    """
    known = [size for size in output_sizes if size is not None]
    shared = len(tokenizer) if tokenizer is not None else (min(known) if known else None)
    if shared is None:
        raise ValueError("cannot tell the vocabulary size: pass the shared tokenizer (tokenizer=...).")
    for index, size in enumerate(output_sizes):
        if size is not None and size < shared:
            raise ValueError(
                f"members[{index}] ({names[index]!r}) predicts {size} tokens but the shared tokenizer has {shared}; "
                "every member must cover the whole shared vocabulary. Resize its embeddings or drop it."
            )
    if tokenizer is None and len(set(known)) > 1:
        smallest, largest = output_sizes.index(shared), output_sizes.index(max(known))
        message = (
            f"members[{smallest}] ({names[smallest]!r}) predicts {shared} tokens but members[{largest}] "
            f"({names[largest]!r}) predicts {max(known)}, and no tokenizer was given to tell whether ids "
            f"{shared}-{max(known) - 1} are padding or real tokens."
        )
        if not allow_vocab_padding:
            raise ValueError(
                f"{message} Pass the shared tokenizer (tokenizer=... or (model, tokenizer) pairs) so the token maps "
                "are checked, or allow_vocab_padding=True if the extra ids are padding rows (the ensemble then "
                f"combines over ids 0-{shared - 1})."
            )
        logger.warning(f"{message} allow_vocab_padding=True: combining over ids 0-{shared - 1}.")
    return int(shared)


# --------------------------------------------------------------------------------------------------------------
# Devices and placement
# --------------------------------------------------------------------------------------------------------------


def generation_model(member: nn.Module) -> nn.Module:
    """The module that generates for `member`: a LoRA adapter member's base model with its adapter, else itself."""
    return member.generation_model() if isinstance(member, LoraAdapterMember) else member


def accepts_argument(module: nn.Module, argument: str) -> bool:
    """Whether the forward of `module` (its generation model, for a LoRA adapter member) takes `argument`."""
    try:
        return argument in inspect.signature(generation_model(module).forward).parameters
    except (TypeError, ValueError):
        return False


def input_device(model: torch.nn.Module) -> torch.device:
    """Device a member's inputs must be on: its input embeddings' device, or the execution device of an
    Accelerate hook when the weights are offloaded (meta)."""
    import torch

    candidates: list[torch.nn.Module] = []
    try:
        embeddings = model.get_input_embeddings()
        if embeddings is not None:
            candidates.append(embeddings)
    except (NotImplementedError, AttributeError):
        pass
    candidates.append(model)
    for module in candidates:
        hook = getattr(module, "_hf_hook", None)
        execution_device = getattr(hook, "execution_device", None)
        if execution_device is not None:
            return torch.device(
                execution_device if not isinstance(execution_device, int) else f"cuda:{execution_device}"
            )
        for parameter in module.parameters():
            if parameter.device.type != "meta":
                return parameter.device
    return torch.device("cpu")


def parse_memory(value: int | str) -> int:
    from accelerate.utils import convert_file_size_to_int

    return convert_file_size_to_int(value)


def plan_member_placement(member_sizes: Sequence[int], max_memory: dict[int | str, int | str]) -> list[dict[str, Any]]:
    """Spread whole members over accelerators within `max_memory`, splitting (with CPU offload) only what must be.

    Members are placed largest first, each whole on the accelerator with the most budget left that can hold it. A
    member no single accelerator can hold gets `device_map="auto"` with the budgets still left (accelerators first,
    then `"cpu"`), so Accelerate splits it and offloads the rest to CPU memory. With no accelerator budget every
    member goes to `"cpu"`.

    Args:
        member_sizes (`list[int]`): bytes of each member's weights.
        max_memory (`dict`): budget per device, e.g. `{0: "20GiB", 1: "20GiB", "cpu": "64GiB"}` (Accelerate's format).

    Returns:
        `list[dict]`, one per member: `{"device_map": {"": device}}` or `{"device_map": "auto", "max_memory": {...}}`.

    Raises:
        `ValueError` when the members do not fit in the budgets together.
    """
    budgets = {key: parse_memory(value) for key, value in max_memory.items() if key != "disk"}
    accelerators = [key for key in budgets if key != "cpu"]
    plans: list[dict[str, Any] | None] = [None] * len(member_sizes)
    order = sorted(range(len(member_sizes)), key=lambda index: -member_sizes[index])
    for index in order:
        size = member_sizes[index]
        fitting = [key for key in accelerators if budgets[key] >= size]
        if fitting:
            device = max(fitting, key=lambda key: budgets[key])
            budgets[device] -= size
            plans[index] = {"device_map": {"": device}}
            continue
        if not accelerators:
            if budgets.get("cpu", 0) < size:
                raise ValueError(
                    f"member {index} needs {size / 2**20:.1f} MiB but max_memory leaves {budgets.get('cpu', 0) / 2**20:.1f} "
                    f"MiB of CPU memory ({max_memory}); raise max_memory['cpu'] or use fewer/smaller members."
                )
            budgets["cpu"] -= size
            plans[index] = {"device_map": {"": "cpu"}}
            continue
        available = {key: budget for key, budget in budgets.items() if budget > 0}
        if sum(available.values()) < size:
            raise ValueError(
                f"member {index} needs {size / 2**20:.1f} MiB but only {sum(available.values()) / 2**20:.1f} MiB are "
                f"left in max_memory={max_memory} after the other members; raise the budgets (or add CPU memory)."
            )
        plans[index] = {"device_map": "auto", "max_memory": dict(available)}
        remaining = size
        for key in [*accelerators, "cpu"]:
            if key not in budgets or remaining <= 0:
                continue
            used = min(budgets[key], remaining)
            budgets[key] -= used
            remaining -= used
    return plans  # type: ignore[return-value]


def meta_model_size(name_or_path: str, revision: str | None, dtype: Any = None) -> int:
    """Bytes of a causal LM's weights, computed from its config on the meta device (no weights read)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=False)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    element_size = torch.tensor([], dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else None
    total = 0
    for parameter in model.parameters():
        total += parameter.numel() * (element_size or parameter.element_size())
    return total


def auto_device_map(name_or_path: str, revision: str | None, max_memory: dict, dtype: Any = None) -> dict[str, Any]:
    """Accelerate's module-level device map for one member within `max_memory` (computed on the meta device)."""
    from accelerate import infer_auto_device_map, init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=False)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    if "disk" in set(device_map.values()):
        raise ValueError(
            f"member {name_or_path!r} does not fit in max_memory={max_memory} even with CPU offload; raise the budgets."
        )
    return device_map


def local_weight_bytes(folder: str | os.PathLike) -> int | None:
    folder = Path(folder)
    if not folder.is_dir():
        return None
    files = list(folder.glob("*.safetensors"))
    return sum(file.stat().st_size for file in files) if files else None


# --------------------------------------------------------------------------------------------------------------
# LoRA adapters of one base as members
# --------------------------------------------------------------------------------------------------------------


class LoraAdapterMember(nn.Module):
    """One LoRA adapter of a shared `peft.PeftModel` seen as a causal LM: activates its adapter, then runs the model.

    All views of one ensemble hold the same `PeftModel`, so the base weights exist once.
    """

    def __init__(self, peft_model: nn.Module, adapter_name: str):
        super().__init__()
        self.peft_model = peft_model
        self.adapter_name = adapter_name
        self.config = peft_model.get_base_model().config

    def get_input_embeddings(self) -> nn.Module:
        return self.peft_model.get_base_model().get_input_embeddings()

    def generation_model(self) -> nn.Module:
        return self.peft_model.get_base_model()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.peft_model.active_adapter != self.adapter_name:
            self.peft_model.set_adapter(self.adapter_name, inference_mode=True)
        return self.peft_model(*args, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# Loading and placing the members of a causal LM ensemble
# --------------------------------------------------------------------------------------------------------------


def _spec_of_loaded(model: nn.Module) -> dict[str, Any]:
    if isinstance(model, LoraAdapterMember):
        return {"name_or_path": model.adapter_name, "revision": None}
    name = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
    name = str(name or "")
    if name and os.path.exists(name):
        name = str(Path(name).resolve())
    return {"name_or_path": name, "revision": resolved_revision(model, None)}


def _prepare_members(
    config: EnsembleConfig,
    members: Sequence[Any] | None,
    device_map: str | None,
    max_memory: dict | None,
    token: str | bool | None,
    allow_pickle: bool = False,
    need_tokenizers: bool = True,
) -> tuple[list[nn.Module], list[Any], list[str]]:
    """Validate everything cheap first, then load or place the members. Returns models, tokenizers, names.

    With `need_tokenizers=False` (a shared tokenizer was given) members are loaded without theirs, so checkpoint folders
    written by a plain `model.save_pretrained` work; otherwise such a folder is refused before anything loads.
    """
    from ..loading import load_causal_lm
    from ..utils import resolve_dtype

    specs = config.members or []
    if members is None and not specs:
        raise ValueError("EnsembleConfig.members is empty; an ensemble needs at least one member.")
    if members is not None and len(members) == 0:
        raise ValueError("members is empty; an ensemble needs at least one member (hub id, path or model).")
    count = len(members) if members is not None else len(specs)
    check_member_weights(config.weights, count, config.combination)
    if config.combination == "contrastive" and count != 2:
        raise ValueError(
            f"combination='contrastive' needs exactly 2 members (expert first, amateur second); got {count}."
        )
    if device_map is not None and config.member_device_maps is not None:
        raise ValueError("pass either device_map='auto' (placement of whole members) or member_device_maps, not both.")
    if device_map is not None and device_map != "auto":
        raise ValueError(
            f"device_map={device_map!r} is not understood for an ensemble; use 'auto' (with max_memory) to spread "
            "members, or member_device_maps=[...] to place each member yourself."
        )
    entries: list[Any] = list(members) if members is not None else list(specs)
    to_load: list[int] = []
    for index, entry in enumerate(entries):
        model = entry[0] if isinstance(entry, tuple) else entry
        if isinstance(model, nn.Module):
            continue
        # A name/path entry keeps the revision recorded for it in the config (from_members(..., revisions=[...]) puts
        # it there), so the member is loaded at, and recorded with, the pinned commit instead of the default branch.
        recorded = (config.members or [])[index] if config.members and index < len(config.members) else None
        pinned = None
        if isinstance(entry, (str, os.PathLike)) and recorded and recorded.get("name_or_path") == str(entry):
            pinned = recorded.get("revision")
        spec = member_spec(entry, index, pinned)
        check_member_path(spec, index)
        if need_tokenizers:
            check_member_has_tokenizer(spec, index)
        entries[index] = spec
        to_load.append(index)
    dtype = resolve_dtype(config.member_dtype)
    device_maps: list[Any] = list(config.member_device_maps) if config.member_device_maps else [None] * count
    extra_memory: list[dict | None] = [None] * count
    if device_map == "auto":
        device_maps, extra_memory = _auto_placement(entries, max_memory, dtype)

    loaded: list[nn.Module] = []
    tokenizers: list[Any] = []
    names: list[str] = []
    for index, entry in enumerate(entries):
        if index in to_load:
            spec = entry
            member_map = device_maps[index]
            if member_map == "auto" and extra_memory[index] is not None:
                member_map = auto_device_map(spec["name_or_path"], spec.get("revision"), extra_memory[index], dtype)
            model, tokenizer = load_causal_lm(
                spec["name_or_path"],
                revision=spec.get("revision"),
                gguf_file=spec.get("gguf_file"),
                dtype=dtype,
                device_map=member_map,
                trust_remote_code=False,
                allow_pickle=allow_pickle,
                load_tokenizer_too=need_tokenizers,
                token=token,
            )
            spec["revision"] = resolved_revision(model, spec.get("revision"), spec["name_or_path"])
            if config.members is not None and index < len(config.members):
                config.members[index] = spec
            name = spec["name_or_path"]
        else:
            model, tokenizer = (entry[0], entry[1]) if isinstance(entry, tuple) else (entry, None)
            if device_maps[index] is not None:
                model = dispatch_loaded_model(model, device_maps[index], extra_memory[index])
            name = (config.members[index]["name_or_path"] if config.members else "") or f"member {index}"
        loaded.append(model)
        tokenizers.append(tokenizer)
        names.append(name)
    return loaded, tokenizers, names


def _auto_placement(
    entries: Sequence[Any], max_memory: dict | None, dtype: Any
) -> tuple[list[Any], list[dict | None]]:
    """Per-member device maps for `device_map="auto"`: whole members on GPUs, then split with CPU offload."""
    from accelerate.utils import get_max_memory

    budgets = get_max_memory(max_memory)
    sizes = []
    for entry in entries:
        model = entry[0] if isinstance(entry, tuple) else entry
        if isinstance(model, nn.Module):
            sizes.append(sum(p.numel() * p.element_size() for p in model.parameters()))
        else:
            size = local_weight_bytes(entry["name_or_path"]) if dtype is None else None
            sizes.append(
                size if size is not None else meta_model_size(entry["name_or_path"], entry.get("revision"), dtype)
            )
    plans = plan_member_placement(sizes, budgets)
    device_maps = [plan["device_map"] for plan in plans]
    memories = [plan.get("max_memory") for plan in plans]
    logger.info(f"Placed ensemble members (sizes {sizes} bytes) as {device_maps}.")
    return device_maps, memories


def check_adapter_weights(adapter: str, index: int, allow_pickle: bool) -> None:
    """Refuse a local LoRA adapter folder whose only weights are pickle (`adapter_model.bin`) unless allowed."""
    folder = Path(adapter)
    if allow_pickle or not folder.is_dir() or (folder / "adapter_model.safetensors").is_file():
        return
    if (folder / "adapter_model.bin").is_file():
        raise ValueError(
            f"adapters[{index}] folder {adapter!r} holds only pickle weights (adapter_model.bin), which can run code "
            "when loaded. Convert it to adapter_model.safetensors, or pass allow_pickle=True (CLI: --allow_pickle) "
            "if you trust its source."
        )


def _load_lora_members(
    config: EnsembleConfig, base_model: nn.Module | None, allow_pickle: bool = False
) -> list[nn.Module]:
    """Load the base once, attach every adapter to it, and return one view per adapter."""
    from peft import PeftModel

    from ..loading import load_causal_lm
    from ..utils import resolve_dtype

    for index, spec in enumerate(config.members):
        check_adapter_weights(spec["name_or_path"], index, allow_pickle)
    if base_model is None:
        spec = config.lora_base_model
        check_member_path(spec, 0)
        base_model, _ = load_causal_lm(
            spec["name_or_path"],
            revision=spec.get("revision"),
            dtype=resolve_dtype(config.member_dtype),
            trust_remote_code=False,
            allow_pickle=allow_pickle,
            load_tokenizer_too=False,
        )
    adapters = [spec["name_or_path"] for spec in config.members]
    names = [f"member_{index}" for index in range(len(adapters))]
    peft_model = PeftModel.from_pretrained(base_model, adapters[0], adapter_name=names[0], is_trainable=False)
    for name, adapter in zip(names[1:], adapters[1:], strict=True):
        peft_model.load_adapter(adapter, adapter_name=name, is_trainable=False)
    peft_model.eval()
    return [LoraAdapterMember(peft_model, name) for name in names]
