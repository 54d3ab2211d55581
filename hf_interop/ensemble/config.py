"""`EnsembleConfig`: what rebuilds an ensemble (its members with pinned revisions, their weights, the combination or
voting rule), and reading a saved ensemble's config and writing its card. Both ensembles, :class:`EnsembleForCausalLM`
and :class:`EnsembleForSequenceClassification`, build on this module.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from transformers import PreTrainedConfig

from .combination import COMBINATIONS, check_contrastive_settings, check_member_weights
from .members import check_no_remote_code, member_spec

ENSEMBLE_MODEL_TYPE = "hf_interop_ensemble"
VOTING_RULES = ("soft", "hard", "weighted", "stacking")


class EnsembleConfig(PreTrainedConfig):
    r"""Configuration of a logit-level ensemble (:class:`EnsembleForCausalLM`, :class:`EnsembleForSequenceClassification`).

    Holds what is needed to rebuild the ensemble, never member weights: which checkpoints (pinned revisions), their
    weights and how their distributions are combined.

    Args:
        members (`list[dict]`, *optional*):
            One `{"name_or_path": str, "revision": str | None}` per member (hub id with a pinned commit, or a local
            folder). Plain strings are accepted and turned into such dicts.
        weights (`list[float]`, *optional*):
            Non-negative member weights, one per member, normalised to sum to one; uniform when omitted. With
            `combination="arithmetic"`: signed coefficients (required), also divided by their sum, which must be > 0.
        combination (`str`, *optional*, defaults to `"mixture"`):
            Causal LM rule: `"mixture"` (weighted mean of probabilities), `"product"` (weighted mean of
            log-probabilities, renormalised), `"max"` (per-token maximum, renormalised), `"contrastive"` (first
            member the expert, second the amateur) or `"arithmetic"` (signed weights on log-probabilities, e.g.
            proxy-tuning's `[1, 1, -1]` over large base, tuned small, small base; see
            :func:`hf_interop.ensemble.combination.arithmetic`).
        contrastive_alpha (`float`, *optional*, defaults to 0.1):
            Plausibility cut-off of `"contrastive"`: tokens below `alpha` times the expert's top probability are
            dropped. Higher keeps fewer tokens.
        contrastive_amateur_weight (`float`, *optional*, defaults to 1.0):
            How strongly `"contrastive"` subtracts the amateur's log-probabilities.
        member_device_maps (`list`, *optional*):
            One Accelerate device map per member (`"cpu"`, `"cuda:1"`, `{"": 0}`, a module map, `"auto"`, or `None`).
        combine_device (`str`, *optional*):
            Device where member log-probabilities are combined; defaults to the first member's input device.
        member_dtype (`str`, *optional*):
            dtype members are loaded in (`"float32"`, `"bfloat16"`, ...); each checkpoint's own when omitted.
        lora_base_model (`dict`, *optional*):
            `{"name_or_path", "revision"}` of the base model when the members are LoRA adapters of it (one copy of
            the base weights is loaded and the adapters are switched per member).
        vocab_size (`int`, *optional*):
            Size of the shared vocabulary the combined distribution covers (the tokenizer's length); members with
            padded embedding rows are cut to it. Filled in when the ensemble is built.
        cross_tokenizer (`bool`, *optional*, defaults to `False`):
            Let :class:`EnsembleForCausalLM` combine members whose tokenizers differ, at the level of text pieces
            (see :class:`hf_interop.ensemble.cross_tokenizer.CrossTokenizerEnsemble`). Only `generate()` works then
            (no logits over one vocabulary), with `combination="mixture"`. Off by default: members with different
            tokenizers are refused with an error that names this option, so a mismatch is never silently slower.
        cross_tokenizer_top_k (`int`, *optional*, defaults to 10):
            With `cross_tokenizer`: candidates each member proposes per step; every member scores the union. Higher
            approximates the full mixture better and costs more scoring per step.
        cross_tokenizer_look_behind (`int`, *optional*, defaults to 8):
            With `cross_tokenizer`: tokens a member re-encodes together with a chosen piece its vocabulary lacks as
            one token, so merges across the boundary come out as its tokenizer writes them.
        allow_vocab_padding (`bool`, *optional*, defaults to `False`):
            Members without tokenizers whose output sizes differ are refused (their extra ids may be real tokens).
            Set it when those ids are padding rows: the ensemble then combines over the smallest output size.
        voting (`str`, *optional*, defaults to `"soft"`):
            Classification rule of :class:`EnsembleForSequenceClassification`: `"soft"`, `"hard"`, `"weighted"` or
            `"stacking"`.
        vote_temperature (`float`, *optional*, defaults to 1.0):
            With `voting="soft"`: the soft vote's log-probabilities are divided by it and renormalised (above 1
            softer, below 1 sharper; the predicted class never changes). Fitted on the training examples no
            member drew by `BaggingConfig(calibrate_vote=True)`, or by hand with :func:`hf_interop.ensemble.calibration.fit_temperature`.
        trust_remote_code (`bool`, *optional*, defaults to `False`):
            Must stay `False`: ensembles never run code shipped with a checkpoint. Present so that a config asking
            for it is refused with a clear error.
    """

    model_type = ENSEMBLE_MODEL_TYPE

    members: list | None = None
    weights: list | None = None
    combination: str = "mixture"
    contrastive_alpha: float = 0.1
    contrastive_amateur_weight: float = 1.0
    member_device_maps: list | None = None
    combine_device: str | None = None
    member_dtype: str | None = None
    lora_base_model: dict | None = None
    vocab_size: int | None = None
    cross_tokenizer: bool = False
    cross_tokenizer_top_k: int = 10
    cross_tokenizer_look_behind: int = 8
    allow_vocab_padding: bool = False
    voting: str = "soft"
    vote_temperature: float = 1.0
    trust_remote_code: bool = False
    use_cache: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        check_no_remote_code(self.trust_remote_code, "EnsembleConfig")
        if kwargs.get("auto_map"):
            raise ValueError(
                f"this ensemble config carries auto_map={kwargs['auto_map']!r} (custom code); hf_interop ensembles "
                "never load remote code. Remove auto_map from config.json."
            )
        if self.members is not None:
            self.members = [member_spec(member, index) for index, member in enumerate(self.members)]
            check_member_weights(self.weights, len(self.members), self.combination)
            if self.member_device_maps is not None and len(self.member_device_maps) != len(self.members):
                raise ValueError(
                    f"member_device_maps has {len(self.member_device_maps)} entries but there are "
                    f"{len(self.members)} members; give one device map (or None) per member."
                )
        if self.weights is not None:
            self.weights = [float(weight) for weight in self.weights]
        if self.combination not in COMBINATIONS:
            raise ValueError(
                f"combination {self.combination!r} is not supported; use one of {', '.join(COMBINATIONS)}."
            )
        check_contrastive_settings(self.contrastive_alpha, self.contrastive_amateur_weight)
        _check_cross_tokenizer_settings(self)
        if self.voting not in VOTING_RULES:
            raise ValueError(f"voting {self.voting!r} is not supported; use one of {', '.join(VOTING_RULES)}.")
        _check_vote_temperature(self.vote_temperature, self.voting)
        super().__post_init__(**kwargs)


def load_ensemble_config(
    name_or_path: str | os.PathLike, revision: str | None = None, token: str | bool | None = None
) -> EnsembleConfig:
    """Read an ensemble's config.json (folder or hub id), refusing anything that is not an ensemble config."""
    import json

    from huggingface_hub import hf_hub_download

    name_or_path = str(name_or_path)
    if os.path.isdir(name_or_path):
        config_path = Path(name_or_path) / "config.json"
        if not config_path.is_file():
            raise ValueError(f"{name_or_path!r} has no config.json; it is not a saved ensemble.")
    elif os.path.exists(name_or_path):
        raise ValueError(
            f"{name_or_path!r} is a file; pass the folder written by EnsembleForCausalLM.save_pretrained."
        )
    else:
        from ..loading import looks_like_hub_id

        if not looks_like_hub_id(name_or_path):
            raise ValueError(f"path {name_or_path!r} does not exist; pass a saved ensemble folder or a hub id.")
        config_path = Path(hf_hub_download(name_or_path, "config.json", revision=revision, token=token))
    data = json.loads(config_path.read_text(encoding="utf-8"))
    if data.get("model_type") != ENSEMBLE_MODEL_TYPE:
        raise ValueError(
            f"{name_or_path!r} holds a {data.get('model_type')!r} config, not an hf_interop ensemble "
            f"({ENSEMBLE_MODEL_TYPE!r}); load it with hf_interop.load_causal_lm or use it as a member."
        )
    check_no_remote_code(data.get("trust_remote_code"), f"config.json of {name_or_path!r}")
    data.pop("model_type", None)
    data.pop("transformers_version", None)
    return EnsembleConfig(**data)


def write_ensemble_card(save_directory: Path, metadata: dict[str, Any]) -> None:
    """README.md through :func:`hf_interop.write_model_card` (`kind="ensemble"`),"""
    from ..hub.outputs import write_output_metadata

    write_output_metadata(save_directory, "ensemble", card=metadata)


def _check_cross_tokenizer_settings(config: EnsembleConfig) -> None:
    if not isinstance(config.cross_tokenizer, bool):
        raise ValueError(f"cross_tokenizer must be True or False, got {config.cross_tokenizer!r}.")
    top_k, look_behind = config.cross_tokenizer_top_k, config.cross_tokenizer_look_behind
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(
            f"cross_tokenizer_top_k={top_k!r} must be an integer >= 1 (candidates each member proposes per step)."
        )
    if isinstance(look_behind, bool) or not isinstance(look_behind, int) or look_behind < 0:
        raise ValueError(
            f"cross_tokenizer_look_behind={look_behind!r} must be an integer >= 0 (tokens re-encoded with a new piece)."
        )
    if not config.cross_tokenizer:
        return
    if config.combination != "mixture":
        raise ValueError(
            f"combination={config.combination!r} is not available with cross_tokenizer=True: members with different "
            "vocabularies are combined as a weighted mixture over pooled text pieces. Use combination='mixture', or "
            "members that share a tokenizer for the other rules."
        )
    if config.lora_base_model:
        raise ValueError(
            "cross_tokenizer=True with LoRA adapters of one base: the adapters share the base's tokenizer, so drop "
            "cross_tokenizer (the logit-level ensemble is exact and faster)."
        )


def _check_vote_temperature(temperature: Any, voting: str) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"vote_temperature={temperature!r} must be a positive number (1.0 leaves the vote as it is).")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"vote_temperature={temperature!r} must be finite and > 0 (1.0 leaves the vote as it is).")
    if temperature != 1.0 and voting != "soft":
        raise ValueError(
            f"vote_temperature={temperature!r} applies to voting='soft' only (it rescales the averaged probabilities); "
            f"voting={voting!r} has no probabilities to rescale. Use voting='soft' or vote_temperature=1.0."
        )
