"""Model cards for every output hf_interop saves, rendered from the Jinja templates in `model_cards/`.

A card is a `README.md` whose YAML header the Hub understands (`library_name`, `base_model`,
`base_model_relation`, `datasets`, `tags`, `model-index` with the measured metrics) and whose body says how the
checkpoint was made (teachers or members with their revisions, merge method, hyperparameters) and how to load it.
The lineage is also kept in the header under the `hf_interop` key, so tools can read it back without parsing
Markdown.

Templates ship inside the package (`hf_interop.model_cards`), so cards render in a plain `pip install` too. Each
template names the fields it needs in a header comment (`{#- required: teachers -#}`); a missing one raises an
error naming the field before anything is written.
"""

from __future__ import annotations

import enum
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..logging_utils import get_logger
from ..utils import atomic_write_text

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

logger = get_logger(__name__)

CARD_KINDS = ("distilled", "lora", "merged", "ensemble", "finetuned", "multitask")
BASE_MODEL_RELATIONS = ("finetune", "adapter", "merge", "quantized")
# What the Hub should show as the relation to `base_model` when the caller does not say.
_DEFAULT_RELATION = {
    "distilled": "finetune",
    "lora": "adapter",
    "merged": "merge",
    "finetuned": "finetune",
    "multitask": "finetune",
}
# A LoRA output is a PEFT adapter folder (adapter_config.json): the Hub's loading snippet for it is PEFT's.
_DEFAULT_LIBRARY = {"lora": "peft"}
PROJECT_TAG = "hf_interop"

# Every metadata key a template may use; anything else is a typo and raises.
METADATA_KEYS = (
    "base_model",
    "base_model_relation",
    "teachers",
    "members",
    "datasets",
    "hyperparameters",
    "metrics",
    "merge_method",
    "license",
    "model_name",
    "description",
    "tags",
    "language",
    "pipeline_tag",
    "library_name",
    "eval_dataset",
    "eval_split",
    "combination",
    "adapter",
    "lineage_manifest",
    "tasks",
)

_REQUIRED_COMMENT = re.compile(r"\{#-?\s*required:\s*([^#]*?)\s*-?#\}")


class ModelCardError(ValueError):
    """A model card could not be rendered; the message names the field and the fix."""


# ----------------------------------------------------------------------------------------------------------------
# Templates
# ----------------------------------------------------------------------------------------------------------------


def _templates_folder():
    """The shipped templates as an importlib.resources Traversable (works in wheels and editable installs)."""
    from importlib.resources import files

    # A source checkout's own templates first: an editable install may map the package to another checkout.
    checkout = Path(__file__).resolve().parents[2] / "model_cards"
    if (checkout / "_sources.md").is_file():
        return checkout
    try:
        return files("hf_interop.model_cards")
    except ModuleNotFoundError:  # a source checkout that is not installed
        return Path(__file__).resolve().parents[2] / "model_cards"


def template_text(kind: str) -> str:
    """Source of the shipped template for `kind` (one of :data:`CARD_KINDS`)."""
    if kind not in CARD_KINDS:
        raise ModelCardError(f"kind {kind!r} is not a model card kind; use one of {', '.join(CARD_KINDS)}.")
    return (_templates_folder() / f"{kind}.md").read_text(encoding="utf-8")


def required_fields(template: str) -> list[str]:
    """Fields a template declares as required in its `{#- required: a, b -#}` header comment."""
    fields: list[str] = []
    for match in _REQUIRED_COMMENT.finditer(template):
        fields.extend(name.strip() for name in match.group(1).split(",") if name.strip())
    return fields


def _jinja_environment():
    import jinja2

    folder = _templates_folder()

    def load_partial(name: str) -> str | None:
        candidate = folder / name
        return candidate.read_text(encoding="utf-8") if candidate.is_file() else None

    # StrictUndefined: a template that uses a field nobody filled raises instead of printing nothing.
    return jinja2.Environment(
        loader=jinja2.FunctionLoader(load_partial),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )


# ----------------------------------------------------------------------------------------------------------------
# Metadata normalisation
# ----------------------------------------------------------------------------------------------------------------


def _is_hub_id(name: str) -> bool:
    from ..loading import looks_like_hub_id

    return looks_like_hub_id(name)


def _plain(value: Any) -> Any:
    """A YAML-safe version of `value` (numbers, strings, lists, dicts); anything else becomes its `str`."""
    if isinstance(value, enum.Enum):  # e.g. transformers' SchedulerType, a str subclass yaml would tag
        return _plain(value.value)
    if value is None:
        return None
    for plain_type in (bool, int, str):  # subclasses become the plain type, which yaml.safe_dump writes untagged
        if isinstance(value, plain_type):
            return plain_type(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(item) for item in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return _plain(value.item())
        except (TypeError, ValueError, RuntimeError):
            pass
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def _normalise_sources(field: str, sources: Any, with_weight: bool) -> list[dict[str, Any]]:
    """`teachers` / `members` as a list of `{"name_or_path", "revision"[, "weight"]}` dicts."""
    if sources is None:
        return []
    if isinstance(sources, (str, os.PathLike, Mapping)):
        sources = [sources]
    if not isinstance(sources, Sequence):
        raise ModelCardError(
            f"`{field}` must be a list of names or of dicts with 'name_or_path' and 'revision'; got {sources!r}."
        )
    normalised = []
    for index, source in enumerate(sources):
        if isinstance(source, (str, os.PathLike)):
            source = {"name_or_path": os.fspath(source)}
        if not isinstance(source, Mapping) or not source.get("name_or_path"):
            raise ModelCardError(
                f"`{field}[{index}]` = {source!r} has no 'name_or_path'; pass e.g. "
                "{'name_or_path': 'org/name', 'revision': '<commit hash>'}."
            )
        entry = {"name_or_path": os.fspath(source["name_or_path"]), "revision": source.get("revision")}
        if with_weight:
            weight = source.get("weight")
            if weight is not None:
                try:
                    weight = float(weight)
                except (TypeError, ValueError) as error:
                    raise ModelCardError(
                        f"`{field}[{index}]['weight']` = {weight!r} is not a number; pass a float."
                    ) from error
            entry["weight"] = weight
        for key, value in source.items():
            if key not in entry:
                entry[key] = _plain(value)
        normalised.append(entry)
    return normalised


def _normalise_metrics(metrics: Any) -> dict[str, float]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise ModelCardError(f"`metrics` must be a dict of metric name -> number, got {metrics!r}.")
    normalised = {}
    for name, value in metrics.items():
        value = _plain(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ModelCardError(
                f"`metrics[{name!r}]` = {value!r} is not a number; the model-index holds measured numbers only."
            )
        normalised[str(name)] = float(value)
    return normalised


def _as_list(field: str, value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [os.fspath(value)]
    if isinstance(value, Sequence):
        return [os.fspath(item) if isinstance(item, os.PathLike) else str(item) for item in value]
    raise ModelCardError(f"`{field}` must be a string or a list of strings, got {value!r}.")


def build_card_data(kind: str, metadata: Mapping[str, Any]):
    """The `huggingface_hub.ModelCardData` (YAML header) for a card of `kind` with `metadata`."""
    from huggingface_hub import EvalResult, ModelCardData

    base_models = _as_list("base_model", metadata.get("base_model"))
    teachers = metadata.get("teachers") or []
    members = metadata.get("members") or []
    if not base_models and kind in ("merged", "ensemble"):
        # A merge or an ensemble derives from its members: that is what the Hub's model tree shows.
        base_models = [member["name_or_path"] for member in members]
    hub_base_models = [name for name in base_models if _is_hub_id(name)]

    relation = metadata.get("base_model_relation") or (_DEFAULT_RELATION.get(kind) if hub_base_models else None)
    if relation is not None and relation not in BASE_MODEL_RELATIONS:
        raise ModelCardError(
            f"`base_model_relation` = {relation!r} is not one the Hub knows; use one of "
            f"{', '.join(BASE_MODEL_RELATIONS)} (or leave it out)."
        )

    datasets = _as_list("datasets", metadata.get("datasets"))
    metrics = metadata["metrics"]
    model_name = metadata.get("model_name") or f"{PROJECT_TAG}-{kind}"
    eval_dataset = metadata.get("eval_dataset") or (datasets[0] if datasets else "held-out text")
    eval_results = [
        EvalResult(
            task_type="text-generation",
            task_name="Causal language modeling",
            dataset_type=eval_dataset,
            dataset_name=eval_dataset,
            dataset_split=metadata.get("eval_split"),
            metric_type=name,
            metric_name=name,
            metric_value=value,
        )
        for name, value in metrics.items()
    ]
    tags = [PROJECT_TAG, kind, *(_as_list("tags", metadata.get("tags")))]
    if kind == "distilled":
        tags.append("knowledge-distillation")
    lineage: dict[str, Any] = {"kind": kind}
    given_base_models = _as_list("base_model", metadata.get("base_model"))
    if given_base_models:  # as given (local paths too), so read_card_lineage -> write_model_card round-trips
        lineage["base_model"] = given_base_models[0] if len(given_base_models) == 1 else given_base_models
    if teachers:
        lineage["teachers"] = teachers
    if members:
        lineage["members"] = members
    for key in ("merge_method", "combination", "hyperparameters", "adapter", "tasks"):
        if metadata.get(key):  # None and empty dicts say nothing
            lineage[key] = _plain(metadata[key])
    if base_models and base_models != hub_base_models:
        lineage["local_base_models"] = [name for name in base_models if name not in hub_base_models]

    return ModelCardData(
        base_model=(hub_base_models[0] if len(hub_base_models) == 1 else hub_base_models) or None,
        base_model_relation=relation,
        datasets=[name for name in datasets if _is_hub_id(name)] or None,
        eval_results=eval_results or None,
        language=metadata.get("language"),
        library_name=metadata.get("library_name") or _DEFAULT_LIBRARY.get(kind, "transformers"),
        license=metadata.get("license"),
        model_name=model_name,
        pipeline_tag=metadata.get("pipeline_tag") or "text-generation",
        tags=tags,
        hf_interop=lineage,
    )


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------


def render_model_card(kind: str, template_path: str | os.PathLike | None = None, **metadata: Any) -> ModelCard:
    """Render the model card of an hf_interop output.

    Args:
        kind (`str`):
            What the output is: `"distilled"` (a student trained from teacher(s)), `"lora"` (a PEFT adapter),
            `"merged"` (weight-space merge), `"ensemble"` (logit-level ensemble) or `"finetuned"`.
        template_path (`str` or `os.PathLike`, *optional*):
            A Jinja template of your own instead of the shipped one for `kind`; it gets the same variables.
        **metadata:
            All optional unless the template requires them (the shipped ones: `distilled` needs `teachers`,
            `lora` and `finetuned` need `base_model`, `merged` needs `members` and `merge_method`, `ensemble`
            needs `members`):

            - `base_model` (`str` or `list[str]`): what the output derives from. Hub ids go into the YAML header;
              local paths are named in the body only (the Hub accepts hub ids there).
            - `base_model_relation` (`str`): one of `finetune`, `adapter`, `merge`, `quantized`; defaults by kind.
            - `teachers` / `members` (`list`): names, or dicts `{"name_or_path", "revision"}` (members also
              `"weight"`). Pin revisions to commit hashes for reproducibility.
            - `datasets` (`str` or `list[str]`), `eval_dataset`, `eval_split` (`str`): training data and the data the
              metrics were measured on.
            - `hyperparameters` (`dict`), `metrics` (`dict` name -> number, written as `model-index`),
              `merge_method`, `combination` (ensemble rule), `adapter` (`dict`, e.g. LoRA rank), `license`,
              `model_name`, `description`, `tags`, `language`, `pipeline_tag`, `library_name`,
              `lineage_manifest` (file name of the lineage manifest next to the card).

    Returns:
        `huggingface_hub.ModelCard`: the card; `str(card)` is the README.md text.

    Raises:
        `ModelCardError` (a `ValueError`): unknown kind or metadata key, a field the template requires that is
        missing, or a malformed value (each message names the field and the fix).
    """
    import jinja2
    from huggingface_hub import ModelCard

    unknown = sorted(set(metadata) - set(METADATA_KEYS))
    if unknown:
        raise ModelCardError(
            f"unknown model card field(s) {unknown}; the fields are: {', '.join(METADATA_KEYS)}. "
            "Put anything else in `hyperparameters` or `description`."
        )
    if template_path is not None:
        if kind not in CARD_KINDS:
            raise ModelCardError(f"kind {kind!r} is not a model card kind; use one of {', '.join(CARD_KINDS)}.")
        template_path = Path(template_path)
        if not template_path.is_file():
            raise ModelCardError(f"template_path {str(template_path)!r} does not exist; pass a Jinja .md file.")
        source = template_path.read_text(encoding="utf-8")
    else:
        source = template_text(kind)

    for field in required_fields(source):
        value = metadata.get(field)
        if value is None or (isinstance(value, (str, list, tuple, dict)) and len(value) == 0):
            raise ModelCardError(
                f"the {kind!r} model card requires `{field}`, which is missing; pass {field}=... to "
                f"render_model_card/write_model_card (see its docstring for the format)."
            )

    context: dict[str, Any] = {key: None for key in METADATA_KEYS}
    context.update(metadata)
    context["kind"] = kind
    context["teachers"] = _normalise_sources("teachers", metadata.get("teachers"), with_weight=False)
    context["members"] = _normalise_sources("members", metadata.get("members"), with_weight=True)
    context["metrics"] = _normalise_metrics(metadata.get("metrics"))
    context["datasets"] = _as_list("datasets", metadata.get("datasets"))
    context["base_models"] = _as_list("base_model", metadata.get("base_model"))
    hyperparameters = metadata.get("hyperparameters") or {}
    if not isinstance(hyperparameters, Mapping):
        raise ModelCardError(f"`hyperparameters` must be a dict of name -> value, got {hyperparameters!r}.")
    context["hyperparameters"] = {str(key): _plain(value) for key, value in hyperparameters.items()}
    context["adapter"] = _plain(metadata.get("adapter")) or {}
    if kind == "merged" and not isinstance(metadata.get("merge_method"), str):
        raise ModelCardError(
            f"`merge_method` = {metadata.get('merge_method')!r} must name the method (e.g. 'linear', 'ties')."
        )

    card_data = build_card_data(kind, context)
    context["model_name"] = card_data.model_name
    context["repo_id"] = card_data.model_name
    context["card_data"] = card_data.to_yaml()
    try:
        template = _jinja_environment().from_string(source)
        text = template.render(**context)
    except jinja2.UndefinedError as error:
        field = re.search(r"'([^']+)' is undefined", str(error))
        name = field.group(1) if field else str(error)
        raise ModelCardError(
            f"the {kind!r} model card template uses `{name}`, which is not a model card field; fix the template "
            f"or pass one of: {', '.join(METADATA_KEYS)}."
        ) from error
    except jinja2.TemplateError as error:
        raise ModelCardError(f"the {kind!r} model card template could not be rendered: {error}") from error
    return ModelCard(text)


def write_model_card(output_dir: str | os.PathLike, kind: str, **metadata: Any) -> Path:
    """Render the card for the output in `output_dir` and write it to `output_dir/README.md` atomically.

    An existing README.md is replaced (cards are regenerated at every save). `model_name` defaults to the folder's
    name. Takes the same arguments as :func:`render_model_card`.

    Returns:
        `Path` of the written README.md.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ModelCardError(f"output_dir {str(output_dir)!r} is a file; pass the output folder.")
    metadata.setdefault("model_name", output_dir.resolve().name)
    card = render_model_card(kind, **metadata)
    path = output_dir / "README.md"
    atomic_write_text(path, str(card))
    logger.info(f"Wrote the {kind} model card to {path}")
    return path


def read_card_lineage(path_or_card: str | os.PathLike | ModelCard) -> dict[str, Any]:
    """The `hf_interop` lineage block of a card (a README.md path, its folder, or a `ModelCard`)."""
    from huggingface_hub import ModelCard

    card = path_or_card
    if not isinstance(card, ModelCard):
        path = Path(path_or_card)
        if path.is_dir():
            path = path / "README.md"
        card = ModelCard.load(path)
    return dict(card.data.get(PROJECT_TAG) or {})
