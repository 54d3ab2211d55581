"""Speculative ensemble decoding (https://huggingface.co/papers/2502.01662): a cheap proposer drafts tokens, the
ensemble verifies them with one forward per member, and the output follows the ensemble's own distribution.

Every round the proposer (one of the members, or a separate small model sharing the tokenizer) drafts `k` tokens one
at a time with its own KV cache. Each member then scores the pending token and the `k` drafts in a single forward
with its cache, the combination rule turns those scores into the ensemble's `k + 1` next-token distributions, and
the drafts are accepted by the exact rule:

- greedy search: a draft is kept while it is the argmax of the ensemble's (processed) distribution; the first
  disagreement is replaced by that argmax, and after `k` kept drafts the ensemble adds its own next token. The tokens
  are those of plain `generate()` (up to floating-point ties: scoring several positions in one forward may round
  differently from scoring them one by one).
- sampling: the rejection rule of speculative sampling (https://huggingface.co/papers/2211.17192): draft `d` drawn
  from the proposer's `q` is kept with probability `min(1, p(d) / q(d))`; the first rejected one is replaced by a
  sample of `max(p - q, 0)` (renormalised), so each token is distributed exactly as the ensemble's `p`.

The proposer may also be `"prompt_lookup"`: drafts copied from the text itself (the tokens that followed the most
recent earlier occurrence of the last 3, 2 or 1 tokens, as transformers' prompt lookup decoding and vLLM's n-gram
speculator do). It costs no forward at all; its draft distribution is a point mass, for which the rejection rule
stays exact; a round with no match drafts nothing and is one plain decoding step. It pays on text that repeats
itself (code, extraction, edits, the loops greedy search falls into) and costs nothing when it finds no match.

Rejected drafts are dropped from every member's cache and the proposer's (`crop`), so the next round continues from
caches equal to a fresh encoding of the accepted text. Logits processors of `generate()` (temperature, top-k, top-p,
min_new_tokens, repetition penalty, ...) apply to both `p` and `q` with the right prefix for every position.

The cost per round: `k` one-token proposer steps plus one `(k + 1)`-token forward per member, instead of `k + 1`
one-token forwards per member. When the proposer is a member, its drafting steps already computed its own scores
for the first `k` positions: it shares its cache with the ensemble and verifies with a one-token forward (the last
draft) instead of `k + 1` tokens. It pays when the proposer is much cheaper than the rest of the ensemble and agrees
with it often.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.utils import ModelOutput

from .._compat import cache_argument, output_cache
from .members import accepts_argument, check_tokenizers_compatible, input_device

if TYPE_CHECKING:
    from transformers import GenerationConfig

    from .causal_lm import EnsembleForCausalLM

SPECULATIVE_ARGUMENTS = ("proposer", "num_draft_tokens", "proposer_tokenizer")
PROMPT_LOOKUP = "prompt_lookup"
PROMPT_LOOKUP_MAX_NGRAM = 3  # longest n-gram matched first, down to one token
PROPOSER_TOKENIZER_HINT = (
    "The proposer drafts token ids that the ensemble verifies, so it must share the ensemble's tokenizer. To combine "
    "models whose tokenizers differ, build a cross-tokenizer ensemble instead "
    "(EnsembleForCausalLM.from_members(..., cross_tokenizer=True)), or pick a proposer trained on the same tokenizer."
)
# generate() options with no meaning here: another search strategy, several sequences, or per-step outputs.
_UNSUPPORTED_OPTIONS = {
    "num_beams": (1, "beam search keeps several hypotheses, speculative decoding extends one"),
    "num_return_sequences": (1, "call generate() again for another sample"),
    "num_beam_groups": (1, "group beam search is a beam search"),
    "penalty_alpha": (None, "contrastive search is its own decoding strategy"),
    "output_scores": (False, "per-step scores are not collected"),
    "output_logits": (False, "per-step logits are not collected"),
    "output_attentions": (False, "attentions are not collected"),
    "output_hidden_states": (False, "hidden states are not collected"),
    "stop_strings": (None, "only eos_token_id and the length limits stop generation"),
    "max_time": (None, "only eos_token_id and the length limits stop generation"),
    "prompt_lookup_num_tokens": (None, 'prompt lookup drafting is proposer="prompt_lookup" here'),
}
_UNSUPPORTED_KWARGS = (
    "assistant_model",
    "streamer",
    "stopping_criteria",
    "logits_processor",
    "prefix_allowed_tokens_fn",
    "negative_prompt_ids",
    "synced_gpus",
    "custom_generate",
    "past_key_values",
    "cache",
    "inputs_embeds",
)


@dataclass
class SpeculativeGenerateOutput(ModelOutput):
    """What `generate(..., proposer=..., return_dict_in_generate=True)` returns.

    Args:
        sequences (`torch.LongTensor` of shape `(1, prompt_length + new_tokens)`): the prompt and the generated ids.
        num_drafted (`int`): draft tokens the proposer proposed.
        num_accepted (`int`): draft tokens the ensemble kept.
        num_rounds (`int`): verification rounds (one forward per member each).
        acceptance_rate (`float`): `num_accepted / num_drafted` (0 when nothing was drafted).
    """

    sequences: torch.LongTensor | None = None
    num_drafted: int | None = None
    num_accepted: int | None = None
    num_rounds: int | None = None
    acceptance_rate: float | None = None


def speculative_generate(
    ensemble: EnsembleForCausalLM,
    inputs: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    *,
    proposer: int | nn.Module | tuple[nn.Module, Any] | None = None,
    num_draft_tokens: int = 4,
    proposer_tokenizer: Any = None,
    **kwargs: Any,
) -> torch.LongTensor | SpeculativeGenerateOutput:
    """Generate with the ensemble, drafting with `proposer` and verifying `num_draft_tokens` tokens per round.

    Reached through `ensemble.generate(input_ids, proposer=..., num_draft_tokens=..., ...)`. Batch size 1; greedy
    search or sampling (`do_sample=True`, seeded with `torch.manual_seed`), with the usual length options, special
    tokens and logits processors of `generate()`. Everything is checked before the first forward.

    Args:
        ensemble (`EnsembleForCausalLM`): members that share a tokenizer (not `cross_tokenizer=True`).
        inputs (`torch.LongTensor` of shape `(1, prompt_length)`): prompt ids (or pass `input_ids=`).
        generation_config (`GenerationConfig`, *optional*): as in `generate()`; keyword options override it.
        proposer (`int`, `nn.Module`, `(model, tokenizer)` or `"prompt_lookup"`): the index of the member that
            drafts, a separate causal LM sharing the ensemble's tokenizer (the smaller and the more often it agrees,
            the faster), or `"prompt_lookup"` (drafts copied from earlier in the text, no model).
        num_draft_tokens (`int`, *optional*, defaults to 4): tokens drafted per round (`k >= 1`). Higher saves more
            member forwards when drafts are accepted and wastes more proposer steps when they are not.
        proposer_tokenizer (*optional*): the proposer's tokenizer, checked against the ensemble's.

    Returns:
        `torch.LongTensor` of shape `(1, length)`, or a :class:`SpeculativeGenerateOutput` with
        `return_dict_in_generate=True` (sequences plus the acceptance counts).
    """
    ensemble._refuse_in_cross_tokenizer_mode("speculative decoding (generate(proposer=...))")
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise ValueError(
                f"generate(proposer=...) does not take {name}=: speculative ensemble decoding drafts with the proposer "
                f"and keeps its own caches. Drop {name}, or drop proposer to use transformers' generate()."
            )
    check_num_draft_tokens(num_draft_tokens)
    proposer_model, proposer_index = _resolve_proposer(ensemble, proposer, proposer_tokenizer)
    input_ids = kwargs.pop("input_ids", None) if inputs is None else inputs
    attention_mask = kwargs.pop("attention_mask", None)
    if input_ids is None or not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(
            "speculative decoding needs the prompt ids as a (1, length) LongTensor (inputs or input_ids)."
        )
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"speculative decoding handles one sequence at a time; got a batch of {input_ids.shape[0]}. Call "
            "generate(proposer=...) once per row, or drop proposer for batched generate()."
        )
    if attention_mask is not None:  # a left-padded single row: keep only its real tokens
        input_ids = input_ids[:, attention_mask[0].bool().to(input_ids.device)]
    config, model_kwargs = ensemble._prepare_generation_config(generation_config, **kwargs)
    model_kwargs.pop("use_cache", None)
    if model_kwargs:
        raise ValueError(
            f"generate(proposer=...) got options it does not know: {sorted(model_kwargs)}. Check their spelling "
            "(generation options are those of transformers.GenerationConfig)."
        )
    _check_generation_config(config)
    prompt_length = input_ids.shape[1]
    max_new_tokens = config.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = config.max_length - prompt_length
    if max_new_tokens < 1:
        raise ValueError(
            f"nothing to generate: max_length={config.max_length} leaves {max_new_tokens} new tokens after a "
            f"{prompt_length}-token prompt; set max_new_tokens."
        )
    device = ensemble.device
    # generate()'s own preparation, so the processors (and therefore the distributions) are exactly its own
    ensemble._prepare_special_tokens(config, kwargs_has_attention_mask=False, device=device)
    processors = ensemble._get_logits_processor(
        generation_config=config,
        input_ids_seq_length=prompt_length,
        encoder_input_ids=input_ids,
        prefix_allowed_tokens_fn=None,
        logits_processor=None,
        device=device,
        model_kwargs={},
    )
    eos_ids = set()
    if config._eos_token_tensor is not None:
        eos_ids = {int(token) for token in config._eos_token_tensor.reshape(-1).tolist()}
    decoder = _SpeculativeDecoder(ensemble, proposer_model, processors, bool(config.do_sample), device, proposer_index)
    sequence = input_ids[0].tolist()
    with torch.no_grad():
        generated = decoder.run(sequence, max_new_tokens, num_draft_tokens, eos_ids)
    sequences = torch.tensor([sequence + generated], dtype=torch.long, device=input_ids.device)
    if not config.return_dict_in_generate:
        return sequences
    return SpeculativeGenerateOutput(
        sequences=sequences,
        num_drafted=decoder.num_drafted,
        num_accepted=decoder.num_accepted,
        num_rounds=decoder.num_rounds,
        acceptance_rate=decoder.num_accepted / decoder.num_drafted if decoder.num_drafted else 0.0,
    )


def check_num_draft_tokens(num_draft_tokens: Any) -> None:
    """Raise a clear `ValueError` unless `num_draft_tokens` is an integer >= 1."""
    if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
        raise ValueError(
            f"num_draft_tokens={num_draft_tokens!r} must be an integer >= 1 (tokens the proposer drafts per round; "
            "4 is a good start, higher when the proposer agrees with the ensemble most of the time)."
        )


def _check_generation_config(config: GenerationConfig) -> None:
    for name, (allowed, reason) in _UNSUPPORTED_OPTIONS.items():
        value = getattr(config, name, allowed)
        if value is not None and value != allowed:
            strategy = "beam search is not supported" if name in ("num_beams", "num_beam_groups") else "unsupported"
            raise ValueError(
                f"generate(proposer=...) got {name}={value!r}: {strategy} with speculative ensemble decoding ({reason})."
                f" Use {name}={allowed!r}, or drop proposer to run transformers' generate() with {name}."
            )


def _resolve_proposer(
    ensemble: EnsembleForCausalLM, proposer: Any, proposer_tokenizer: Any
) -> tuple[nn.Module | _PromptLookup, int | None]:
    """The proposer as a module and its member index (`None` for a separate model), after checking it shares the
    ensemble's vocabulary (before any forward)."""
    if isinstance(proposer, tuple):
        if len(proposer) != 2:
            raise ValueError(f"proposer as a tuple must be (model, tokenizer); got {len(proposer)} items.")
        proposer, proposer_tokenizer = proposer
    if isinstance(proposer, str):
        if proposer != PROMPT_LOOKUP:
            raise ValueError(
                f"proposer={proposer!r} is not a drafting method; the one by name is {PROMPT_LOOKUP!r} (drafts copied "
                "from earlier in the text), or pass a member index or a causal LM."
            )
        return _PromptLookup(PROMPT_LOOKUP_MAX_NGRAM), None
    if proposer is None:
        raise ValueError(
            "speculative decoding needs a proposer (num_draft_tokens or proposer_tokenizer was given without one): "
            "pass proposer=<member index> or a small causal LM that shares the ensemble's tokenizer."
        )
    if isinstance(proposer, int) and not isinstance(proposer, bool):
        if not 0 <= proposer < ensemble.num_members:
            raise ValueError(
                f"proposer={proposer} is not a member index; the ensemble has {ensemble.num_members} members "
                f"(0 to {ensemble.num_members - 1}), or pass a model."
            )
        return ensemble.members[proposer], proposer
    for index, member in enumerate(ensemble.members):
        if proposer is member:  # a member passed as a model: share its forwards all the same
            return member, index
    if not isinstance(proposer, nn.Module):
        raise ValueError(
            f"proposer must be a member index, a causal LM, a (model, tokenizer) pair or {PROMPT_LOOKUP!r}; got "
            f"{type(proposer).__name__}."
        )
    if proposer_tokenizer is not None and ensemble.tokenizer is not None:
        check_tokenizers_compatible(
            [ensemble.tokenizer, proposer_tokenizer], ["ensemble tokenizer", "proposer"], hint=PROPOSER_TOKENIZER_HINT
        )
    config = getattr(proposer, "config", None)
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    output_size = getattr(text_config, "vocab_size", None)
    vocab_size = ensemble.config.vocab_size
    if output_size is not None and vocab_size is not None and output_size < vocab_size:
        raise ValueError(
            f"the proposer's vocabulary has {output_size} tokens but the ensemble's has {vocab_size}: the proposer "
            f"cannot draft every token of the shared tokenizer. {PROPOSER_TOKENIZER_HINT}"
        )
    if proposer_tokenizer is None and output_size is not None and vocab_size is not None and output_size > vocab_size:
        # a larger head may be padding rows (as for members), or another tokenizer: without it we cannot tell
        raise ValueError(
            f"the proposer's vocabulary has {output_size} tokens but the ensemble's has {vocab_size}, and no "
            "proposer tokenizer was given to show they share ids. Pass proposer=(model, tokenizer). "
            f"{PROPOSER_TOKENIZER_HINT}"
        )
    return proposer, None


class _SpeculativeDecoder:
    """The draft-verify-rollback loop for one sequence; keeps the members' and the proposer's caches."""

    def __init__(
        self,
        ensemble: Any,
        proposer: nn.Module,
        processors: Any,
        do_sample: bool,
        device: torch.device,
        proposer_index: int | None = None,
    ):
        self.ensemble = ensemble
        self.proposer = proposer
        self.processors = processors
        self.do_sample = do_sample
        self.device = device
        self.vocab_size = ensemble.config.vocab_size
        # A member that proposes keeps one cache (the proposer's) and is left out of the members' verification
        # forward: its drafting steps already gave its log-probs at the drafts' positions.
        self.proposer_index = proposer_index
        self.verifiers = [index for index in range(ensemble.num_members) if index != proposer_index]
        self.ensemble_cache = ensemble.new_cache()
        self.ensemble_length = 0  # tokens of the sequence inside the verifying members' caches
        self.proposer_cache = None
        self.proposer_length = 0
        self.draft_log_probs: list[torch.Tensor] = []  # the proposer's log-probs at each draft's position
        self.lookup = proposer if isinstance(proposer, _PromptLookup) else None
        keeps_one = self.lookup is None and accepts_argument(proposer, "logits_to_keep")
        self.keep_one = {"logits_to_keep": 1} if keeps_one else {}
        self.num_drafted = self.num_accepted = self.num_rounds = 0

    def run(self, sequence: list[int], max_new_tokens: int, num_draft_tokens: int, eos_ids: set[int]) -> list[int]:
        generated: list[int] = []
        while len(generated) < max_new_tokens:
            prefix = sequence + generated
            draft_count = min(num_draft_tokens, max_new_tokens - len(generated) - 1)
            drafts, draft_probs = self._draft(prefix, draft_count)
            target_scores = self._verify(prefix, drafts)
            new_tokens, accepted = self._accept(drafts, draft_probs, target_scores)
            self.num_rounds += 1
            self.num_drafted += len(drafts)
            self.num_accepted += accepted
            # Rejected drafts leave every cache: what stays equals a fresh encoding of the accepted text.
            self._crop(len(prefix) + accepted)
            for token in new_tokens:
                generated.append(token)
                if token in eos_ids or len(generated) >= max_new_tokens:
                    return generated
        return generated

    def _processed(self, prefix: list[int], scores: torch.Tensor) -> torch.Tensor:
        ids = torch.tensor([prefix], dtype=torch.long, device=scores.device)
        return self.processors(ids, scores[None].float())[0]

    def _choose(self, scores: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        if not self.do_sample:
            return int(scores.argmax()), None
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1)), probs

    def _draft(self, prefix: list[int], count: int) -> tuple[list[int], list[torch.Tensor | None]]:
        drafts: list[int] = []
        draft_probs: list[torch.Tensor | None] = []
        self.draft_log_probs = []
        if self.lookup is not None:  # a point mass on each copied token: `_accept` reads `None` as that
            drafts = self.lookup.draft(prefix, count)
            return drafts, [None] * len(drafts)
        for _ in range(count):
            log_probs = self._proposer_step(prefix + drafts)
            self.draft_log_probs.append(log_probs)
            token, probs = self._choose(self._processed(prefix + drafts, log_probs))
            drafts.append(token)
            draft_probs.append(probs)
        return drafts, draft_probs

    def _proposer_step(self, sequence: list[int]) -> torch.Tensor:
        """The proposer's normalised log-probabilities for the token after `sequence` (feeding what it has not seen)."""
        pending = sequence[self.proposer_length :]
        outputs = self.proposer(
            input_ids=torch.tensor([pending], dtype=torch.long, device=input_device(self.proposer)),
            use_cache=True,
            return_dict=True,
            **self.keep_one,
            **{cache_argument(): self.proposer_cache},
        )
        self.proposer_cache = output_cache(outputs)
        self.proposer_length += len(pending)
        logits = outputs.logits[0, -1, : self.vocab_size].to(device=self.device, dtype=torch.float32)
        return torch.log_softmax(logits, dim=-1)

    def _verify(self, prefix: list[int], drafts: list[int]) -> list[torch.Tensor]:
        """The ensemble's processed scores for the position of every draft and the one after the last."""
        positions = len(drafts) + 1
        full = prefix + drafts
        scores: dict[int, torch.Tensor] = {}
        if self.verifiers:
            member_log_probs, caches = self.ensemble.member_log_probs(
                torch.tensor([full[self.ensemble_length :]], dtype=torch.long, device=self.device),
                past_key_values=self.ensemble_cache,
                use_cache=True,
                logits_to_keep=positions,
                only=self.verifiers,
            )
            for index, cache, log_probs in zip(self.verifiers, caches, member_log_probs, strict=True):
                self.ensemble_cache.member_caches[index] = cache
                scores[index] = log_probs[0, -positions:]
            self.ensemble_length = len(full)
        if self.proposer_index is not None:
            # the drafts' positions come from drafting; one more step (the last draft) gives the position after it
            own = [*self.draft_log_probs, self._proposer_step(full)]
            scores[self.proposer_index] = torch.stack(own).to(self.device)
        if self.num_rounds == 0 and not (self.ensemble_cache.is_croppable and _croppable(self.proposer_cache)):
            raise ValueError(
                "a member's cache cannot be cropped (e.g. a sliding-window or static cache), so rejected drafts "
                "could not be rolled back; drop proposer to generate without speculative decoding."
            )
        member_log_probs = torch.stack([scores[index] for index in range(self.ensemble.num_members)])[:, None]
        combined = self.ensemble.combine(member_log_probs)[0]
        return [self._processed(full[: len(prefix) + index], combined[index]) for index in range(len(drafts) + 1)]

    def _accept(
        self, drafts: list[int], draft_probs: list[torch.Tensor | None], target_scores: list[torch.Tensor]
    ) -> tuple[list[int], int]:
        """New tokens of this round (kept drafts, then one correction or bonus token) and how many drafts were kept."""
        for index, draft in enumerate(drafts):
            if not self.do_sample:
                best = int(target_scores[index].argmax())
                if best != draft:
                    return drafts[:index] + [best], index
                continue
            target = torch.softmax(target_scores[index], dim=-1)
            proposal = draft_probs[index]
            if proposal is None:  # a copied draft: q is a point mass on it
                proposal = torch.zeros_like(target)
                proposal[draft] = 1.0
            # keep with probability min(1, p(d) / q(d)); q(d) > 0 since d was drawn from q
            if torch.rand((), device=target.device) * proposal[draft] >= target[draft]:
                residual = (target - proposal).clamp_min(0)
                total = residual.sum()
                # p == q up to rounding: the rejection had probability ~0, so p itself is the residual
                residual = residual / total if total > 0 else target
                return drafts[:index] + [int(torch.multinomial(residual, 1))], index
        token, _ = self._choose(target_scores[len(drafts)])
        return drafts + [token], len(drafts)

    def _crop(self, keep: int) -> None:
        # a negative crop removes that many tokens from the end: the form every transformers release accepts
        if self.ensemble_length > keep:
            self.ensemble_cache.crop(keep - self.ensemble_length)
            self.ensemble_length = keep
        if self.proposer_cache is not None and self.proposer_length > keep:
            self.proposer_cache.crop(keep - self.proposer_length)
            self.proposer_length = keep


class _PromptLookup:
    """Drafts copied from the text: what followed the most recent earlier occurrence of its last n tokens."""

    def __init__(self, max_ngram: int):
        self.max_ngram = max_ngram

    def draft(self, sequence: list[int], count: int) -> list[int]:
        if count < 1:
            return []
        for size in range(min(self.max_ngram, len(sequence) - 1), 0, -1):
            tail = sequence[-size:]
            for start in range(len(sequence) - size - 1, -1, -1):  # most recent first
                if sequence[start : start + size] == tail:
                    return sequence[start + size : start + size + count]
        return []


def _croppable(cache: Any) -> bool:
    return cache is None or getattr(cache, "is_croppable", True)
