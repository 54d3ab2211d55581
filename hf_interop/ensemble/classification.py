"""`EnsembleForSequenceClassification`: soft, hard and weighted voting, and stacking with a logistic-regression
meta-model, over sequence classifiers that share a tokenizer and a label set."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from ..logging_utils import get_logger
from ..utils import atomic_write_text
from .combination import check_weights, mixture, normalise_weights
from .config import EnsembleConfig, load_ensemble_config, write_ensemble_card
from .members import check_member_path, check_no_remote_code, check_tokenizers_compatible, member_spec

if TYPE_CHECKING:
    from datasets import Dataset

logger = get_logger(__name__)

STACKING_HEAD_FILE = "stacking_head.safetensors"
# Written beside a classification LoRA adapter: the size (and names) of the label set its head predicts.
LABELS_FILE = "hf_interop_labels.json"
# Margin that makes the tie-break winner the argmax of hard-vote logits without visibly changing the vote shares.
_TIE_MARGIN = 1e-6


def soft_vote(member_logits: torch.Tensor, weights: torch.Tensor | Sequence[float] | None = None) -> torch.Tensor:
    """Weighted mean of the members' class probabilities, as log-probabilities `(batch, num_labels)`.

    `member_logits` has shape `(num_members, batch, num_labels)`.
    """
    return mixture(torch.log_softmax(member_logits.float(), dim=-1), weights)


def hard_vote(
    member_logits: torch.Tensor, weights: torch.Tensor | Sequence[float] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Weighted) majority vote of the members' predicted classes.

    Each member votes for its argmax class with its weight (1 each when `weights` is `None`). Tie rule: among the
    classes with the most votes, the one with the highest soft-vote probability (weighted mean of member
    probabilities) wins; if that ties too, the lowest class index.

    Returns:
        `(logits, winners)`: `logits` `(batch, num_labels)` are log vote shares, with the winner raised by a 1e-6
        margin so that `argmax(logits)` applies the tie rule; `winners` `(batch,)` the winning classes.
    """
    member_logits = member_logits.float()
    num_members, _, num_labels = member_logits.shape
    weights = normalise_weights(weights, num_members, member_logits)
    votes = torch.nn.functional.one_hot(member_logits.argmax(dim=-1), num_labels).to(member_logits.dtype)
    shares = (votes * weights[:, None, None]).sum(dim=0)  # (batch, labels), sums to one
    soft = soft_vote(member_logits, weights).exp()
    top = shares.amax(dim=-1, keepdim=True)
    tied = (shares >= top - 1e-9).to(member_logits.dtype)
    # Among tied classes the largest soft probability wins; argmax takes the lowest index on exact ties.
    winners = torch.where(tied > 0, soft, torch.full_like(soft, -1.0)).argmax(dim=-1)
    boosted = shares + _TIE_MARGIN * torch.nn.functional.one_hot(winners, num_labels).to(shares.dtype)
    return boosted.clamp_min(1e-12).log(), winners


def fit_logistic_regression(
    features: torch.Tensor, labels: torch.Tensor, num_labels: int, l2: float = 1e-3, max_iter: int = 200
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by L-BFGS (float64): returns `(weight (num_labels, dim), bias (num_labels,))`.

    Minimises mean cross-entropy + `l2 * ||weight||^2`.
    """
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0; got {l2}.")
    features = features.double()
    labels = labels.long()
    weight = torch.zeros(num_labels, features.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_labels, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(features @ weight.T + bias, labels) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach().float(), bias.detach().float()


class EnsembleForSequenceClassification(PreTrainedModel):
    r"""An ensemble of sequence classifiers that share a tokenizer and label set; works with `Trainer.evaluate/predict`.

    `config.voting` picks the rule:

    - `"soft"`: weighted mean of member probabilities (`logits` are its log-probabilities).
    - `"hard"`: majority vote of member predictions, one vote each (see :func:`hard_vote` for the tie rule).
    - `"weighted"`: majority vote where each member's vote counts its weight.
    - `"stacking"`: a logistic-regression meta-model on the concatenated member log-probabilities, fitted on
      held-out data with :meth:`fit_stacking` (until then it averages member log-probabilities).

    Members are given as names/paths (loaded with `trust_remote_code=False`, safetensors only), loaded models or
    `(model, tokenizer)` pairs; see :meth:`from_members`.
    """

    config_class = EnsembleConfig
    base_model_prefix = "ensemble"
    main_input_name = "input_ids"

    def __init__(self, config: EnsembleConfig, members: Sequence[Any] | None = None, tokenizer: Any = None):
        check_no_remote_code(config.trust_remote_code, "EnsembleConfig")
        loaded, tokenizers, names = _prepare_classifiers(config, members)
        super().__init__(config)
        self.members = nn.ModuleList(loaded)
        for member in self.members:
            member.eval()
            for parameter in member.parameters():
                parameter.requires_grad_(False)
        if tokenizer is None:
            tokenizer = next((candidate for candidate in tokenizers if candidate is not None), None)
        self.tokenizer = tokenizer
        check_tokenizers_compatible(tokenizers, names)
        label_maps = [getattr(member.config, "id2label", None) for member in self.members]
        num_labels = [member.config.num_labels for member in self.members]
        if len(set(num_labels)) > 1:
            raise ValueError(
                f"members predict different numbers of labels {num_labels}; every member must share one label set."
            )
        if any(label_map != label_maps[0] for label_map in label_maps):
            raise ValueError(
                f"members map class ids to different labels ({label_maps}); align their id2label/label2id first "
                "so that a vote for class i means the same label for every member."
            )
        self.config.num_labels = num_labels[0]
        self.config.id2label = dict(label_maps[0]) if label_maps[0] else None
        self.config.label2id = {label: index for index, label in label_maps[0].items()} if label_maps[0] else None
        features = len(self.members) * num_labels[0]
        self.stacking_head = nn.Linear(features, num_labels[0])
        with torch.no_grad():
            # Until fitted, stacking averages the members' log-probabilities (a product of experts).
            self.stacking_head.weight.copy_(
                torch.cat([torch.eye(num_labels[0])] * len(self.members), dim=1) / len(self.members)
            )
            self.stacking_head.bias.zero_()
        self.stacking_head.requires_grad_(False)
        self.post_init()
        self.eval()

    @classmethod
    def from_members(
        cls,
        members: Sequence[Any],
        voting: str = "soft",
        weights: Sequence[float] | None = None,
        *,
        tokenizer: Any = None,
        trust_remote_code: bool = False,
    ) -> EnsembleForSequenceClassification:
        """Build from classifier names/paths, loaded models or `(model, tokenizer)` pairs (validated before loading)."""
        check_no_remote_code(trust_remote_code, "EnsembleForSequenceClassification.from_members")
        members = list(members) if members is not None else []
        if not members:
            raise ValueError("members is empty; an ensemble needs at least one classifier.")
        specs = []
        for index, member in enumerate(members):
            model = member[0] if isinstance(member, tuple) else member
            if isinstance(model, nn.Module):
                name = str(getattr(model, "name_or_path", "") or "")
                specs.append(
                    {
                        "name_or_path": str(Path(name).resolve()) if name and os.path.exists(name) else name,
                        "revision": None,
                    }
                )
            else:
                specs.append(member_spec(member, index))
        if voting == "weighted" and weights is None:
            raise ValueError(
                "voting='weighted' needs weights=[...] (one per member); use voting='hard' for equal votes."
            )
        config = EnsembleConfig(members=specs, weights=list(weights) if weights is not None else None, voting=voting)
        return cls(config, members=members, tokenizer=tokenizer)

    @classmethod
    def from_lora_adapters(
        cls,
        base_model: str | os.PathLike,
        adapters: Sequence[str | os.PathLike],
        voting: str = "soft",
        weights: Sequence[float] | None = None,
        *,
        tokenizer: Any = None,
        base_revision: str | None = None,
    ) -> EnsembleForSequenceClassification:
        """Several peft LoRA adapters (task `SEQ_CLS`) of one base classifier as members, one copy of the base weights.

        Each member activates its adapter (and its own classification head, saved with the adapter) before running
        the shared `PeftModel`.
        """
        adapters = [str(adapter) for adapter in adapters]
        if not adapters:
            raise ValueError("adapters is empty; pass at least one LoRA adapter folder.")
        for index, adapter in enumerate(adapters):
            check_member_path({"name_or_path": adapter}, index)
            if os.path.isdir(adapter) and not (Path(adapter) / "adapter_config.json").is_file():
                raise ValueError(
                    f"adapters[{index}] {adapter!r} has no adapter_config.json; pass folders written by "
                    "PeftModel.save_pretrained."
                )
        base_spec = member_spec(str(base_model), 0, base_revision)
        check_member_path(base_spec, 0)
        if voting == "weighted" and weights is None:
            raise ValueError(
                "voting='weighted' needs weights=[...] (one per member); use voting='hard' for equal votes."
            )
        config = EnsembleConfig(
            members=[{"name_or_path": adapter, "revision": None} for adapter in adapters],
            weights=list(weights) if weights is not None else None,
            voting=voting,
            lora_base_model=base_spec,
        )
        return cls(config, tokenizer=tokenizer)

    def get_input_embeddings(self) -> None:
        return None

    def get_output_embeddings(self) -> None:
        return None

    def init_weights(self) -> None:
        return None

    def tie_weights(self, *args: Any, **kwargs: Any) -> None:
        return None

    @property
    def _member_devices(self) -> list[torch.device]:
        # Looked up on every call: Trainer moves the model after construction.
        return [_first_device(member) for member in self.members]

    @property
    def device(self) -> torch.device:
        return _first_device(self.members[0])

    @property
    def member_weights(self) -> torch.Tensor:
        return normalise_weights(self.config.weights, len(self.members))

    def member_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """Raw member logits stacked: `(num_members, batch, num_labels)` float32 on the first member's device."""
        outputs = []
        for member, device in zip(self.members, self._member_devices, strict=True):
            member_inputs = {"input_ids": input_ids.to(device)}
            if attention_mask is not None:
                member_inputs["attention_mask"] = attention_mask.to(device)
            for key in ("token_type_ids",):
                if kwargs.get(key) is not None:
                    member_inputs[key] = kwargs[key].to(device)
            outputs.append(member(**member_inputs).logits.float().to(self.device))
        return torch.stack(outputs, dim=0)

    def combine(self, member_logits: torch.Tensor) -> torch.Tensor:
        """Ensemble logits from stacked member logits under `config.voting`."""
        voting = self.config.voting
        if voting == "soft":
            vote = soft_vote(member_logits, self.config.weights)
            temperature = self.config.vote_temperature
            return vote if temperature == 1.0 else torch.log_softmax(vote / temperature, dim=-1)
        if voting == "hard":
            return hard_vote(member_logits)[0]
        if voting == "weighted":
            return hard_vote(member_logits, self.config.weights)[0]
        features = torch.log_softmax(member_logits, dim=-1).permute(1, 0, 2).reshape(member_logits.shape[1], -1)
        return self.stacking_head(features.to(self.stacking_head.weight.device))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        """Ensemble class scores; `loss` is the cross-entropy of `labels` under `softmax(logits)`."""
        if input_ids is None:
            raise ValueError("input_ids is required.")
        logits = self.combine(self.member_logits(input_ids, attention_mask, token_type_ids=token_type_ids))
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits, labels.to(logits.device).long())
        return SequenceClassifierOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def _features_and_labels(self, dataset: Dataset, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        label_column = "labels" if "labels" in dataset.column_names else "label"
        if label_column not in dataset.column_names or "input_ids" not in dataset.column_names:
            raise ValueError(
                f"dataset has columns {dataset.column_names}; fit_stacking needs tokenized 'input_ids' and "
                "'label'/'labels' (held-out data the members were not trained on)."
            )
        features, labels = [], []
        for start in range(0, len(dataset), batch_size):
            rows = dataset[start : start + batch_size]
            input_ids, attention_mask = _pad_rows(rows, self.tokenizer, self.device)
            logits = self.member_logits(input_ids, attention_mask)
            features.append(torch.log_softmax(logits, dim=-1).permute(1, 0, 2).reshape(logits.shape[1], -1).cpu())
            labels.append(torch.tensor(rows[label_column]))
        return torch.cat(features), torch.cat(labels)

    def fit_stacking(
        self, dataset: Dataset, batch_size: int = 16, l2: float = 1e-3, max_iter: int = 200
    ) -> dict[str, float]:
        """Fit the stacking meta-model (logistic regression on member log-probabilities) on held-out `dataset`.

        Sets `config.voting = "stacking"`. Returns the meta-model's training cross-entropy and accuracy.
        """
        if len(dataset) == 0:
            raise ValueError("dataset is empty; fit_stacking needs held-out labelled examples.")
        features, labels = self._features_and_labels(dataset, batch_size)
        if labels.min() < 0 or labels.max() >= self.config.num_labels:
            raise ValueError(f"labels must lie in [0, {self.config.num_labels}); got {labels.min()}..{labels.max()}.")
        weight, bias = fit_logistic_regression(features, labels, self.config.num_labels, l2=l2, max_iter=max_iter)
        with torch.no_grad():
            self.stacking_head.weight.copy_(weight)
            self.stacking_head.bias.copy_(bias)
        self.config.voting = "stacking"
        logits = features @ weight.T + bias
        return {
            "loss": torch.nn.functional.cross_entropy(logits, labels).item(),
            "accuracy": (logits.argmax(-1) == labels).float().mean().item(),
        }

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Config, stacking head (safetensors), shared tokenizer and card; no member weights."""
        from safetensors.torch import save_file

        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        for index, spec in enumerate(self.config.members or []):
            if not spec.get("name_or_path"):
                raise ValueError(
                    f"members[{index}] was given as an in-memory model with no name_or_path; save it first and build "
                    "the ensemble from its folder."
                )
        self.config.architectures = [self.__class__.__name__]
        atomic_write_text(save_directory / "config.json", self.config.to_json_string(use_diff=True))
        tmp = save_directory / f".tmp-{STACKING_HEAD_FILE}"
        save_file({key: value.contiguous() for key, value in self.stacking_head.state_dict().items()}, str(tmp))
        os.replace(tmp, save_directory / STACKING_HEAD_FILE)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(save_directory)
        weights = self.member_weights.tolist()
        members = [
            {"name_or_path": spec["name_or_path"], "revision": spec.get("revision"), "weight": round(weight, 6)}
            for spec, weight in zip(self.config.members, weights, strict=True)
        ]
        write_ensemble_card(save_directory, {"members": members, "combination": f"{self.config.voting} voting"})

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *args: Any,
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> EnsembleForSequenceClassification:
        """Rebuild a saved classification ensemble (members reloaded from their recorded paths / hub ids)."""
        from safetensors.torch import load_file

        check_no_remote_code(trust_remote_code, "EnsembleForSequenceClassification.from_pretrained")
        config = load_ensemble_config(pretrained_model_name_or_path, revision=kwargs.get("revision"))
        model = cls(config)
        head = Path(pretrained_model_name_or_path) / STACKING_HEAD_FILE
        if head.is_file():
            model.stacking_head.load_state_dict(load_file(str(head)))
        return model


def _first_device(module: nn.Module) -> torch.device:
    for parameter in module.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")


def _pad_rows(rows: dict[str, list], tokenizer: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    sequences = rows["input_ids"]
    longest = max(len(sequence) for sequence in sequences)
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention_mask[row, : len(sequence)] = 1
    return input_ids.to(device), attention_mask.to(device)


def _prepare_classifiers(
    config: EnsembleConfig, members: Sequence[Any] | None
) -> tuple[list[nn.Module], list[Any], list[str]]:
    from transformers import AutoModelForSequenceClassification

    from ..loading import load_tokenizer

    if members is None and config.lora_base_model:
        return _load_lora_classifiers(config)
    entries = list(members) if members is not None else list(config.members or [])
    if not entries:
        raise ValueError("members is empty; an ensemble needs at least one classifier.")
    check_weights(config.weights, len(entries))
    if config.voting == "weighted" and config.weights is None:
        raise ValueError("voting='weighted' needs weights (one per member); use voting='hard' for equal votes.")
    for index, entry in enumerate(entries):
        model = entry[0] if isinstance(entry, tuple) else entry
        if not isinstance(model, nn.Module):
            spec = member_spec(entry, index)
            check_member_path(spec, index)
            entries[index] = spec
    loaded, tokenizers, names = [], [], []
    for index, entry in enumerate(entries):
        if isinstance(entry, dict):
            model = AutoModelForSequenceClassification.from_pretrained(
                entry["name_or_path"], revision=entry.get("revision"), trust_remote_code=False, use_safetensors=True
            )
            tokenizer = load_tokenizer(entry["name_or_path"], revision=entry.get("revision"))
            names.append(entry["name_or_path"])
        else:
            model, tokenizer = (entry[0], entry[1]) if isinstance(entry, tuple) else (entry, None)
            names.append((config.members[index]["name_or_path"] if config.members else "") or f"member {index}")
        loaded.append(model)
        tokenizers.append(tokenizer)
    return loaded, tokenizers, names


def _load_lora_classifiers(config: EnsembleConfig) -> tuple[list[nn.Module], list[Any], list[str]]:
    """Load the base classifier once, attach every adapter (with its own head) and return one view per adapter."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from ..loading import load_tokenizer
    from .members import LoraAdapterMember, check_adapter_weights

    check_weights(config.weights, len(config.members))
    for index, spec in enumerate(config.members):
        check_member_path(spec, index)
        check_adapter_weights(spec["name_or_path"], index, allow_pickle=False)
    spec = config.lora_base_model
    check_member_path(spec, 0)
    adapters = [member["name_or_path"] for member in config.members]
    labels = _saved_labels(adapters[0])
    base_model = AutoModelForSequenceClassification.from_pretrained(
        spec["name_or_path"], revision=spec.get("revision"), trust_remote_code=False, use_safetensors=True, **labels
    )
    tokenizer = load_tokenizer(spec["name_or_path"], revision=spec.get("revision"))
    if base_model.config.pad_token_id is None:
        base_model.config.pad_token_id = tokenizer.pad_token_id
    names = [f"member_{index}" for index in range(len(adapters))]
    peft_model = PeftModel.from_pretrained(base_model, adapters[0], adapter_name=names[0], is_trainable=False)
    for name, adapter in zip(names[1:], adapters[1:], strict=True):
        peft_model.load_adapter(adapter, adapter_name=name, is_trainable=False)
    peft_model.eval()
    members = [LoraAdapterMember(peft_model, name) for name in names]
    return members, [tokenizer] * len(members), adapters


def _saved_labels(adapter: str) -> dict[str, Any]:
    """`num_labels` and `id2label` an adapter's classification head was trained for (:data:`LABELS_FILE` beside it)."""
    path = Path(adapter) / LABELS_FILE
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    labels: dict[str, Any] = {"num_labels": int(data["num_labels"])}
    if data.get("id2label"):
        labels["id2label"] = {int(key): value for key, value in data["id2label"].items()}
    return labels
