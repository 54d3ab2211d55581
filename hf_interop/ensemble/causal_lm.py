"""`EnsembleForCausalLM`: several causal LMs combined into one model usable with generate().

Members that share a tokenizer are combined at the logit level. Each member keeps its own KV cache inside an
:class:`EnsembleCache` that `generate()` carries between steps, so a step feeds each member only the new token:
T tokens cost about the sum of the members' own generate() instead of re-encoding the text every step (as DeePEn and
UniTE do). Every strategy of generate() works; `proposer=` switches to speculative decoding (:mod:`.speculative`).
Members whose tokenizers differ are combined over text pieces with `cross_tokenizer=True` (:mod:`.cross_tokenizer`;
`generate()` only, ids of the ensemble's tokenizer).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .._compat import cache_argument, output_cache, output_cache_field
from ..logging_utils import get_logger
from ..utils import atomic_write_text
from .cache import EnsembleCache
from .combination import causal_lm_nll, check_member_weights, combine_log_probs
from .config import ENSEMBLE_MODEL_TYPE, EnsembleConfig, load_ensemble_config, write_ensemble_card
from .members import (
    LoraAdapterMember,  # noqa: F401  (its old import path)
    _load_lora_members,
    _prepare_members,
    _spec_of_loaded,
    accepts_argument,
    check_member_path,
    check_no_remote_code,
    check_tokenizers_compatible,
    generation_model,
    input_device,
    member_spec,
    shared_vocab_size,
)
from .portable import (
    _load_saved_tokenizer,
    check_publishable,
    local_ensemble_folder,
    portable_config,
    resolve_member_paths,
)
from .speculative import SPECULATIVE_ARGUMENTS, speculative_generate

logger = get_logger(__name__)

CAUSAL_LM_CROSS_TOKENIZER_HINT = (
    "To ensemble members whose tokenizers differ, pass cross_tokenizer=True to EnsembleForCausalLM.from_members "
    "(cross-tokenizer ensembling at the level of text pieces, UniTE-style, https://huggingface.co/papers/2410.03777: "
    "generate() only, combination='mixture'), or pick members that share a tokenizer."
)


def _output_vocab_size(member: nn.Module) -> int | None:
    config = getattr(member, "config", None)
    if config is None:
        return None
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return getattr(text_config, "vocab_size", None)


class EnsembleForCausalLM(PreTrainedModel, GenerationMixin):
    r"""A logit-level ensemble of causal LMs that share a tokenizer, behaving like one `PreTrainedModel`.

    `forward` returns a `CausalLMOutputWithPast` whose `logits` are the combined distribution's **log-probabilities**
    over the shared vocabulary (`softmax(logits)` is the ensemble's next-token distribution), so `generate()`,
    pipelines, `Trainer.evaluate` and distillation trainers use it like any causal LM. `get_output_embeddings()`
    returns `None`: there is no single LM head, a distillation trainer must take the full `logits`.

    Members whose tokenizers differ are accepted with `cross_tokenizer=True` (see :class:`EnsembleConfig`): then
    `generate()` combines them over pooled text pieces and returns ids of the ensemble's tokenizer (the first
    member's unless another member's is given), and `forward()` raises (no logits over one vocabulary).

    Build it with :meth:`from_members` (names, paths, loaded models or `(model, tokenizer)` pairs),
    :meth:`from_lora_adapters` (several LoRA adapters of one base), or `EnsembleForCausalLM(config)` /
    :meth:`from_pretrained` (members loaded from the config with :func:`hf_interop.load_causal_lm`,
    `trust_remote_code=False`).

    Example:

    ```python
    >>> from hf_interop import EnsembleForCausalLM
    >>> ensemble = EnsembleForCausalLM.from_members(["./student-seed0", "./student-seed1"], combination="product")
    >>> ids = ensemble.tokenizer("The with statement", return_tensors="pt").input_ids
    >>> ensemble.generate(ids, max_new_tokens=20)
    ```
    """

    config_class = EnsembleConfig
    base_model_prefix = "ensemble"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True

    def __init__(
        self,
        config: EnsembleConfig,
        members: Sequence[Any] | None = None,
        tokenizer: Any = None,
        *,
        device_map: str | None = None,
        max_memory: dict | None = None,
        token: str | bool | None = None,
        allow_pickle: bool = False,
    ):
        if not isinstance(config, EnsembleConfig):
            raise TypeError(f"config must be an EnsembleConfig, got {type(config).__name__}.")
        check_no_remote_code(config.trust_remote_code, "EnsembleConfig")
        # Member tokenizers are only needed without a shared one, or to align vocabularies across tokenizers.
        need_tokenizers = tokenizer is None or bool(config.cross_tokenizer)
        loaded, tokenizers, names = _prepare_members(
            config, members, device_map, max_memory, token, allow_pickle, need_tokenizers=need_tokenizers
        )
        super().__init__(config)
        self.members = nn.ModuleList(loaded)
        for member in self.members:
            member.eval()
            for parameter in member.parameters():
                parameter.requires_grad_(False)
        if tokenizer is None:
            tokenizer = next((candidate for candidate in tokenizers if candidate is not None), None)
        self.tokenizer = tokenizer
        self._cross_tokenizer_engine = None
        self._tokenizer_member_index: int | None = None
        if config.cross_tokenizer:
            # imported when needed: it brings in the vocabulary alignment of hf_interop.cross_tokenizer
            from .cross_tokenizer import _build_cross_tokenizer_engine

            self._cross_tokenizer_engine, self._tokenizer_member_index = _build_cross_tokenizer_engine(
                config, loaded, tokenizers, names, tokenizer
            )
            self.config.vocab_size = len(tokenizer)
        else:
            check_tokenizers_compatible(
                [*tokenizers, tokenizer] if tokenizer is not None else tokenizers,
                [*names, "tokenizer"],
                hint=CAUSAL_LM_CROSS_TOKENIZER_HINT,
            )
            self._set_shared_vocab_size(tokenizer, names)
        self._logits_to_keep_support = [accepts_argument(member, "logits_to_keep") for member in self.members]
        # Special-token ids come from the member whose ids the ensemble reads and writes (the first one's by default).
        generation_source = self.members[self._tokenizer_member_index or 0]
        self.generation_config = _generation_config_from(generation_source, tokenizer)
        self.post_init()
        self.eval()

    # ------------------------------------------------------------------------------------------------------------
    # Construction
    # ------------------------------------------------------------------------------------------------------------

    @classmethod
    def from_members(
        cls,
        members: Sequence[Any],
        weights: Sequence[float] | None = None,
        combination: str = "mixture",
        *,
        tokenizer: Any = None,
        revisions: Sequence[str | None] | None = None,
        member_device_maps: Sequence[Any] | None = None,
        device_map: str | None = None,
        max_memory: dict | None = None,
        combine_device: str | None = None,
        dtype: str | torch.dtype | None = None,
        contrastive_alpha: float = 0.1,
        contrastive_amateur_weight: float = 1.0,
        cross_tokenizer: bool = False,
        cross_tokenizer_top_k: int = 10,
        cross_tokenizer_look_behind: int = 8,
        allow_vocab_padding: bool = False,
        trust_remote_code: bool = False,
        token: str | bool | None = None,
        allow_pickle: bool = False,
    ) -> EnsembleForCausalLM:
        """Build an ensemble from member names/paths, loaded models, or `(model, tokenizer)` pairs.

        Everything that can be checked without weights is checked first (member count, weights, combination,
        paths, `trust_remote_code`), so a bad argument fails before any member is loaded.

        Args:
            members (`list`): hub ids, local folders, `{"name_or_path", "revision"}` dicts, loaded causal LMs, or
                `(model, tokenizer)` pairs as returned by :func:`hf_interop.load_causal_lm`.
            weights (`list[float]`, *optional*): one per member, >= 0 (signed with `"arithmetic"`); default uniform.
            combination (`str`, *optional*, defaults to `"mixture"`): `"mixture"`, `"product"`, `"max"`,
                `"contrastive"` or `"arithmetic"` (proxy-tuning, DExperts; see :class:`EnsembleConfig`).
            tokenizer (*optional*): the shared tokenizer; defaults to the first member's.
            revisions (`list[str | None]`, *optional*): revision per member (for hub ids given as strings).
            member_device_maps (`list`, *optional*): an Accelerate device map per member.
            device_map (`str`, *optional*): `"auto"` spreads whole members over the GPUs within `max_memory`, with
                CPU offload as the fallback (see :func:`hf_interop.ensemble.members.plan_member_placement`).
            max_memory (`dict`, *optional*): budgets for `device_map="auto"`, e.g. `{0: "20GiB", "cpu": "60GiB"}`.
            combine_device (`str`, *optional*): where log-probabilities are combined (default: first member's).
            dtype (`str` or `torch.dtype`, *optional*): dtype members are loaded in.
            contrastive_alpha (`float`, *optional*, defaults to 0.1): plausibility cut-off of `"contrastive"`.
            contrastive_amateur_weight (`float`, *optional*, defaults to 1.0): amateur strength of `"contrastive"`.
            cross_tokenizer (`bool`, *optional*, defaults to `False`): accept members whose tokenizers differ and
                combine them at the level of text pieces (`generate()` only, `"mixture"` only; see
                :class:`EnsembleConfig`). Each member needs its own tokenizer (a path holding one, or a pair); the
                ensemble's tokenizer (`tokenizer`, defaulting to the first member's) must be one member's.
            cross_tokenizer_top_k (`int`, *optional*, defaults to 10): candidates each member proposes per step.
            cross_tokenizer_look_behind (`int`, *optional*, defaults to 8): tokens re-encoded with a new piece.
            allow_vocab_padding (`bool`, *optional*, defaults to `False`): members without tokenizers whose output
                sizes differ are refused; set it when the extra ids are padding rows, to combine over the smallest
                size (kept in the config, so a saved ensemble reloads the same way).
            trust_remote_code (`bool`, *optional*, defaults to `False`): must stay `False` (refused otherwise).
            token (`str` or `bool`, *optional*): Hub token for private members.
            allow_pickle (`bool`, *optional*, defaults to `False`): members given by name/path may hold pickle
                (`.bin`) weights, which can run code when loaded (safetensors only by default).

        Example (members with different tokenizers):

        ```python
        >>> ensemble = EnsembleForCausalLM.from_members(["./llama-student", "./gpt2-student"], cross_tokenizer=True)
        >>> ids = ensemble.tokenizer("The with statement", return_tensors="pt").input_ids  # the first member's ids
        >>> ensemble.generate(ids, max_new_tokens=20)
        ```
        """
        check_no_remote_code(trust_remote_code, "EnsembleForCausalLM.from_members")
        members = list(members) if members is not None else []
        if not members:
            raise ValueError("members is empty; an ensemble needs at least one member (hub id, path or model).")
        if revisions is not None and len(revisions) != len(members):
            raise ValueError(
                f"revisions has {len(revisions)} entries for {len(members)} members; give one per member."
            )
        specs: list[dict[str, Any]] = []
        for index, member in enumerate(members):
            model = member[0] if isinstance(member, tuple) else member
            if cross_tokenizer and isinstance(member, nn.Module):
                raise ValueError(
                    f"members[{index}] is a loaded {type(member).__name__} without its tokenizer; cross_tokenizer=True "
                    "needs each member's own tokenizer: pass (model, tokenizer) pairs, or checkpoint folders / hub "
                    "ids that hold a tokenizer."
                )
            if isinstance(model, nn.Module):
                specs.append(_spec_of_loaded(model))
            else:
                specs.append(member_spec(member, index, revisions[index] if revisions else None))
        config = EnsembleConfig(
            members=specs,
            weights=list(weights) if weights is not None else None,
            combination=combination,
            contrastive_alpha=contrastive_alpha,
            contrastive_amateur_weight=contrastive_amateur_weight,
            member_device_maps=list(member_device_maps) if member_device_maps is not None else None,
            combine_device=str(combine_device) if combine_device is not None else None,
            member_dtype=_dtype_name(dtype),
            cross_tokenizer=cross_tokenizer,
            cross_tokenizer_top_k=cross_tokenizer_top_k,
            cross_tokenizer_look_behind=cross_tokenizer_look_behind,
            allow_vocab_padding=allow_vocab_padding,
        )
        return cls(
            config,
            members=members,
            tokenizer=tokenizer,
            device_map=device_map,
            max_memory=max_memory,
            token=token,
            allow_pickle=allow_pickle,
        )

    @classmethod
    def from_lora_adapters(
        cls,
        base_model: Any,
        adapters: Sequence[str | os.PathLike],
        weights: Sequence[float] | None = None,
        combination: str = "mixture",
        *,
        tokenizer: Any = None,
        base_revision: str | None = None,
        dtype: str | torch.dtype | None = None,
        contrastive_alpha: float = 0.1,
        contrastive_amateur_weight: float = 1.0,
        allow_pickle: bool = False,
    ) -> EnsembleForCausalLM:
        """Several peft LoRA adapters of one base model as members, with one copy of the base weights.

        Each member activates its adapter (`set_adapter`) before running the shared `PeftModel`; each keeps its own
        KV cache. Outputs equal those of the separately merged models.

        Args:
            base_model (`str`, `os.PathLike` or `PreTrainedModel`): the base checkpoint, or the loaded base model
                (then it is wrapped in place by peft).
            adapters (`list[str]`): local folders (or hub ids) of LoRA adapters trained on that base.
            weights, combination, tokenizer, dtype, contrastive_alpha, contrastive_amateur_weight: as in
                :meth:`from_members`.
            base_revision (`str`, *optional*): revision of a hub `base_model`.
            allow_pickle (`bool`, *optional*, defaults to `False`): accept adapters (and a base) whose only weights
                are pickle files (`adapter_model.bin`), which can run code when loaded.
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
        if isinstance(base_model, nn.Module):
            base_spec = _spec_of_loaded(base_model)
        else:
            base_spec = member_spec(base_model, 0, base_revision)
            check_member_path(base_spec, 0)
        config = EnsembleConfig(
            members=[{"name_or_path": adapter, "revision": None} for adapter in adapters],
            weights=list(weights) if weights is not None else None,
            combination=combination,
            contrastive_alpha=contrastive_alpha,
            contrastive_amateur_weight=contrastive_amateur_weight,
            member_dtype=_dtype_name(dtype),
            lora_base_model=base_spec,
        )
        members = _load_lora_members(
            config, base_model if isinstance(base_model, nn.Module) else None, allow_pickle=allow_pickle
        )
        if tokenizer is None and not isinstance(base_model, nn.Module):
            from ..loading import load_tokenizer

            tokenizer = load_tokenizer(base_spec["name_or_path"], revision=base_spec["revision"])
        return cls(config, members=members, tokenizer=tokenizer)

    def _set_shared_vocab_size(self, tokenizer: Any, names: Sequence[str]) -> None:
        output_sizes = [_output_vocab_size(member) for member in self.members]
        self.config.vocab_size = shared_vocab_size(output_sizes, tokenizer, names, self.config.allow_vocab_padding)

    # ------------------------------------------------------------------------------------------------------------
    # Model API
    # ------------------------------------------------------------------------------------------------------------

    @property
    def _member_devices(self) -> list[torch.device]:
        # Looked up on every call: a Trainer or user may move members (`.to(...)`) after construction.
        return [input_device(member) for member in self.members]

    @property
    def _combine_device(self) -> torch.device:
        if self.config.combine_device:
            return torch.device(self.config.combine_device)
        return input_device(self.members[0])

    @property
    def device(self) -> torch.device:
        """Where inputs go and member log-probabilities are combined."""
        return self._combine_device

    @property
    def num_members(self) -> int:
        return len(self.members)

    @property
    def member_weights(self) -> torch.Tensor:
        """Normalised member weights (uniform when the config has none)."""
        if self.config.weights is None:
            return torch.full((self.num_members,), 1.0 / self.num_members)
        weights = torch.tensor(self.config.weights, dtype=torch.float32)
        return weights / weights.sum()

    def set_member_weights(self, weights: Sequence[float] | torch.Tensor) -> None:
        """Replace the member weights (validated, stored normalised in the config)."""
        values = weights.detach().cpu().tolist() if isinstance(weights, torch.Tensor) else list(weights)
        check_member_weights(values, self.num_members, self.config.combination)
        total = sum(values)
        self.config.weights = [float(value) / total for value in values]

    def get_input_embeddings(self) -> None:
        return None

    def get_output_embeddings(self) -> None:
        """`None`: each member has its own head; use the returned `logits` (log-probabilities) instead."""
        return None

    def set_input_embeddings(self, value: nn.Module) -> None:
        raise NotImplementedError("an ensemble has no input embeddings of its own; change the members instead.")

    def init_weights(self) -> None:
        # Members arrive trained; post_init must not re-initialise (or tie) any of their weights.
        return None

    def tie_weights(self, *args: Any, **kwargs: Any) -> None:
        return None

    def new_cache(self) -> EnsembleCache:
        """An empty cache to pass as `past_key_values` (members fill their own on the first forward)."""
        return EnsembleCache([None] * self.num_members)

    def _prepare_cache_for_generation(
        self,
        generation_config: GenerationConfig,
        model_kwargs: dict,
        generation_mode: Any,
        batch_size: int,
        max_cache_length: int,
    ) -> None:
        # generate() would build one DynamicCache from this (layer-less) config; build one cache per member instead,
        # each the way that member's own generate() would, and carry them together.
        user_cache = model_kwargs.get("cache")
        if user_cache is None:
            user_cache = model_kwargs.get("past_key_values")
        if user_cache is not None:
            if not isinstance(user_cache, EnsembleCache):
                raise ValueError(
                    f"past_key_values is a {type(user_cache).__name__}; an ensemble needs an EnsembleCache (one cache "
                    "per member): pass ensemble.new_cache() or leave past_key_values unset."
                )
            user_cache._is_user_defined = True
            return
        if generation_config.use_cache is False:
            return
        caches: list[Cache | None] = []
        for member in self.members:
            model = generation_model(member)
            member_kwargs: dict[str, Any] = {}
            if isinstance(model, GenerationMixin) and hasattr(model, "_prepare_cache_for_generation"):
                model._prepare_cache_for_generation(
                    generation_config, member_kwargs, generation_mode, batch_size, max_cache_length
                )
            caches.append(member_kwargs.get(cache_argument(), member_kwargs.get("past_key_values")))
        model_kwargs[cache_argument()] = EnsembleCache(caches)

    def member_log_probs(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: EnsembleCache | None = None,
        use_cache: bool = False,
        logits_to_keep: int | torch.Tensor = 0,
        only: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, list[Cache | None]]:
        """Each member's normalised log-probabilities over the shared vocabulary, stacked on the combine device.

        `only` runs just those member indices (in that order); the result then stacks those members alone.

        Returns:
            `(log_probs, caches)`: `log_probs` of shape `(num_members, batch, positions, vocab_size)` in float32 and
            each member's cache (`None` where `use_cache` is off).
        """
        self._refuse_in_cross_tokenizer_mode("member_log_probs()")
        member_caches = past_key_values.member_caches if past_key_values is not None else [None] * self.num_members
        vocab_size = self.config.vocab_size
        combine_device = self._combine_device
        log_probs, caches = [], []
        for index in range(self.num_members) if only is None else only:
            member = self.members[index]
            device = input_device(member)
            kwargs: dict[str, Any] = {
                "input_ids": input_ids.to(device),
                "attention_mask": attention_mask.to(device) if attention_mask is not None else None,
                "use_cache": use_cache,
                "return_dict": True,
            }
            if position_ids is not None:
                kwargs["position_ids"] = position_ids.to(device)
            if use_cache:
                kwargs[cache_argument()] = member_caches[index]
            keep_in_member = self._logits_to_keep_support[index] and not (
                isinstance(logits_to_keep, int) and logits_to_keep == 0
            )
            if keep_in_member:
                kwargs["logits_to_keep"] = logits_to_keep
            outputs = member(**kwargs)
            logits = outputs.logits
            if not keep_in_member and isinstance(logits_to_keep, int) and logits_to_keep > 0:
                logits = logits[:, -logits_to_keep:]
            elif not keep_in_member and isinstance(logits_to_keep, torch.Tensor):
                logits = logits[:, logits_to_keep.to(logits.device)]
            logits = logits[..., :vocab_size].to(device=combine_device, dtype=torch.float32)
            log_probs.append(torch.log_softmax(logits, dim=-1))
            caches.append(output_cache(outputs) if use_cache else None)
        return torch.stack(log_probs, dim=0), caches

    def combine(self, member_log_probs: torch.Tensor) -> torch.Tensor:
        """The configured combination rule applied to stacked member log-probabilities."""
        return combine_log_probs(
            member_log_probs,
            self.config.combination,
            self.member_weights.to(member_log_probs.device),
            self.config.contrastive_alpha,
            self.config.contrastive_amateur_weight,
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: EnsembleCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        r"""Combined next-token log-probabilities of the members.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch, length)`): token ids of the shared tokenizer.
            attention_mask, position_ids: passed to every member.
            past_key_values (`EnsembleCache`, *optional*): one cache per member (what `generate()` carries).
            inputs_embeds: not supported (members have different embeddings).
            labels (`torch.LongTensor`, *optional*): targets for the causal LM loss (shifted inside; -100 ignored).
            use_cache (`bool`, *optional*): return the members' caches in an `EnsembleCache`.
            logits_to_keep (`int` or `torch.Tensor`, *optional*, defaults to 0): compute only the last positions.

        Returns:
            `CausalLMOutputWithPast` with `logits` = combined **log-probabilities** `(batch, positions, vocab_size)`
            and `loss` = mean negative log-likelihood of `labels` under the ensemble.
        """
        self._refuse_in_cross_tokenizer_mode("forward()")
        if inputs_embeds is not None:
            raise ValueError(
                "inputs_embeds is not supported by an ensemble: its members embed tokens differently. Pass input_ids."
            )
        if input_ids is None:
            raise ValueError("input_ids is required.")
        # generate() of newer transformers passes the cache as `cache` (see _compat.cache_argument); accept either name
        cache = kwargs.pop("cache", None)
        if cache is not None:
            past_key_values = cache
        if past_key_values is not None and not isinstance(past_key_values, EnsembleCache):
            raise ValueError(
                f"past_key_values is a {type(past_key_values).__name__}; pass the EnsembleCache returned by a previous "
                "call (or ensemble.new_cache())."
            )
        use_cache = self.config.use_cache if use_cache is None else use_cache
        use_cache = bool(use_cache)
        member_log_probs, caches = self.member_log_probs(
            input_ids, attention_mask, position_ids, past_key_values, use_cache, logits_to_keep
        )
        combined = self.combine(member_log_probs)
        cache_out = None
        if use_cache:
            cache_out = past_key_values if past_key_values is not None else EnsembleCache(caches)
            cache_out.member_caches = caches
        loss = None
        if labels is not None:
            loss = causal_lm_nll(combined, labels.to(combined.device), kwargs.get("num_items_in_batch"))
        return CausalLMOutputWithPast(loss=loss, logits=combined, **{output_cache_field(): cache_out})

    # ------------------------------------------------------------------------------------------------------------
    # Members with different tokenizers (cross_tokenizer=True)
    # ------------------------------------------------------------------------------------------------------------

    @property
    def is_cross_tokenizer(self) -> bool:
        """Whether the members' tokenizers may differ (combined over text pieces by `generate()` only)."""
        return bool(self.config.cross_tokenizer)

    def _refuse_in_cross_tokenizer_mode(self, what: str) -> None:
        if self.config.cross_tokenizer:
            raise NotImplementedError(
                f"{what} is not available for an ensemble built with cross_tokenizer=True: its members' tokenizers "
                "differ, so there are no logits over one vocabulary (each member's distribution is only combined "
                "with the others over pooled text pieces while generating). Use ensemble.generate(input_ids, ...), "
                "or build the ensemble from members that share a tokenizer to get logits, losses and evaluation."
            )

    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        **kwargs: Any,
    ) -> Any:
        """`GenerationMixin.generate`, or, for a cross-tokenizer ensemble, generation over pooled text pieces.

        Members that share a tokenizer use transformers' own `generate()` (every strategy, one cache per member); with
        `proposer=` (and `num_draft_tokens=`) it decodes speculatively (:func:`.speculative.speculative_generate`).

        With `cross_tokenizer=True`, `inputs` (or `input_ids`) are ids of the ensemble's tokenizer (`ensemble.tokenizer`,
        a member's), left-padded when batched with their `attention_mask`. Each row is run alone: the member whose
        tokenizer is the ensemble's starts from exactly these ids, every other member from its own encoding of the
        decoded prompt (special tokens skipped, its own added), then the cross-tokenizer engine adds one text piece per
        step. The result is like `generate()`'s: the prompt ids unchanged, followed by the generated text in ids of the
        ensemble's tokenizer (those the member with that tokenizer followed), then `eos_token_id` if the mixture chose
        end of sequence (any member's EOS), and `pad_token_id` after a row that ended early.

        Honoured options: `max_new_tokens` (counted in tokens of the ensemble's tokenizer, as `generate()` counts; a last
        piece that would overshoot is cut) or `max_length`; `min_new_tokens` (end of sequence is not a candidate before); `do_sample` with `temperature`, `top_k`, `top_p` (applied
        to the mixture over the pooled candidates; seed with `torch.manual_seed` for reproducible samples);
        `eos_token_id` / `pad_token_id` (the ids written); `return_dict_in_generate` (`sequences` only). Anything else
        (beam search, several return sequences, penalties, processors, streamers, scores) raises a `ValueError`
        naming it.
        """
        if any(name in kwargs for name in SPECULATIVE_ARGUMENTS):
            return speculative_generate(self, inputs, generation_config, **kwargs)
        if not self.config.cross_tokenizer:
            return super().generate(inputs, generation_config, **kwargs)
        from .cross_tokenizer import _generate_across_tokenizers

        return _generate_across_tokenizers(self, inputs, generation_config, **kwargs)

    # ------------------------------------------------------------------------------------------------------------
    # Saving, loading, publishing
    # ------------------------------------------------------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        push_to_hub: bool = False,
        *,
        self_contained: bool = False,
        **kwargs: Any,
    ) -> None:
        """Write the ensemble config (members with pinned revisions, weights, rule), generation config, the shared
        tokenizer and a model card.

        Local members are recorded relative to the ensemble folder when they lie inside it or beside it (so the folder
        loads from any working directory and moves together with them), otherwise as absolute paths (with a warning).
        Member weights are not copied unless `self_contained=True`: then every local member is hard-linked (or copied)
        into `members/<i>/` and the folder loads anywhere on its own.
        """
        if push_to_hub:
            raise ValueError("use ensemble.push_to_hub(repo_id) to publish; save_pretrained only writes a folder.")
        for index, spec in enumerate(self.config.members or []):
            if not spec.get("name_or_path"):
                raise ValueError(
                    f"members[{index}] was given as an in-memory model with no name_or_path, so a saved ensemble could "
                    "not load it again. Save that model first (model.save_pretrained(folder)) and build the ensemble "
                    "from the folder."
                )
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        self.config.architectures = [self.__class__.__name__]
        saved_config = portable_config(self.config, save_directory, self_contained)
        atomic_write_text(save_directory / "config.json", saved_config.to_json_string(use_diff=True))
        atomic_write_text(save_directory / "generation_config.json", self.generation_config.to_json_string())
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(save_directory)
        self._write_card(save_directory)

    def _write_card(self, save_directory: Path) -> None:
        weights = self.member_weights.tolist()
        members = [
            {"name_or_path": spec["name_or_path"], "revision": spec.get("revision"), "weight": round(weight, 6)}
            for spec, weight in zip(self.config.members, weights, strict=True)
        ]
        metadata: dict[str, Any] = {"members": members, "combination": self.config.combination}
        if self.config.lora_base_model:
            metadata["base_model"] = self.config.lora_base_model["name_or_path"]
        write_ensemble_card(save_directory, metadata)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        revision: str | None = None,
        token: str | bool | None = None,
        trust_remote_code: bool = False,
        device_map: str | None = None,
        max_memory: dict | None = None,
        member_device_maps: Sequence[Any] | None = None,
        dtype: str | torch.dtype | None = None,
        allow_pickle: bool = False,
        **kwargs: Any,
    ) -> EnsembleForCausalLM:
        """Rebuild a saved ensemble: read its config, then load each member (trust_remote_code=False; safetensors
        only unless `allow_pickle=True`)."""
        check_no_remote_code(trust_remote_code, "EnsembleForCausalLM.from_pretrained")
        config = kwargs.pop("config", None)
        if not isinstance(config, EnsembleConfig):
            config = load_ensemble_config(pretrained_model_name_or_path, revision=revision, token=token)
        if member_device_maps is not None:
            config.member_device_maps = list(member_device_maps)
        elif device_map is not None and device_map != "auto" and config.members:  # one device for all (lm-eval)
            config.member_device_maps, device_map = [device_map] * len(config.members), None
        if dtype is not None:
            config.member_dtype = _dtype_name(dtype)
        resolve_member_paths(
            config, local_ensemble_folder(pretrained_model_name_or_path, config, revision=revision, token=token)
        )
        tokenizer = _load_saved_tokenizer(pretrained_model_name_or_path, revision)
        if config.lora_base_model:
            members = _load_lora_members(config, None, allow_pickle=allow_pickle)
            model = cls(config, members=members, tokenizer=tokenizer)
        else:
            model = cls(
                config,
                tokenizer=tokenizer,
                device_map=device_map,
                max_memory=max_memory,
                token=token,
                allow_pickle=allow_pickle,
            )
        model.name_or_path = str(pretrained_model_name_or_path)
        return model

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        self_contained: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Publish the ensemble config, generation config, tokenizer and card to `repo_id`.

        Members must be hub ids with pinned revisions, so others can rebuild the ensemble; local members are refused
        unless `self_contained=True`, which uploads them inside the repository (`members/<i>/`).
        """
        from huggingface_hub import HfApi

        check_publishable(self.config, self_contained)
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, self_contained=self_contained)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message or "Upload hf_interop ensemble config",
                revision=revision,
                create_pr=create_pr,
            )


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


def _dtype_name(dtype: Any) -> str | None:
    if dtype is None:
        return None
    return str(dtype).replace("torch.", "") if isinstance(dtype, torch.dtype) else str(dtype)


def _generation_config_from(member: nn.Module, tokenizer: Any) -> GenerationConfig:
    source = getattr(generation_model(member), "generation_config", None)
    values: dict[str, Any] = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
        value = getattr(source, key, None) if source is not None else None
        if value is None and tokenizer is not None:
            value = getattr(tokenizer, key, None)
        if value is not None:
            values[key] = value
    if "pad_token_id" not in values and "eos_token_id" in values:
        eos = values["eos_token_id"]
        values["pad_token_id"] = eos[0] if isinstance(eos, list) else eos
    return GenerationConfig(**values)


def register_auto_classes() -> None:
    """Let `AutoConfig` / `AutoModelForCausalLM.from_pretrained(folder)` open saved ensembles."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register(ENSEMBLE_MODEL_TYPE, EnsembleConfig)
        AutoModelForCausalLM.register(EnsembleConfig, EnsembleForCausalLM)
    except ValueError:  # already registered (module reloaded)
        pass


register_auto_classes()
