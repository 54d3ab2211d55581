"""Ensembles of causal LMs whose tokenizers differ, combined at the level of text pieces.

Members with different vocabularies cannot average logits column by column. :class:`CrossTokenizerEnsemble`
generates text instead: at every step each member proposes its `top_k` most likely next tokens, the proposals are
pooled by the text they stand for (their byte strings; UniTE, https://huggingface.co/papers/2410.03777, combines
the union of top-k candidates this way), every member scores every pooled candidate, and the weighted mixture of
the members' candidate distributions picks the next text piece. Each member then extends its own token sequence
with that piece and keeps its KV cache for the part of its sequence that did not change.

How a member scores a candidate piece: by the probability of its own token with exactly that byte string when its
vocabulary has one; otherwise by the probability of the first token of its own tokenisation of the piece (UniTE's
approximation; an exact probability would cost extra forward passes). Each member's scores are renormalised over
the candidates before mixing, so a member with a flat distribution does not count less.

How a member follows the chosen text: when its vocabulary holds the piece as one token, that token is appended
(a path the member itself could have generated). Otherwise the last `look_behind` tokens plus the piece are
re-encoded, as transformers' universal assisted generation does, so merges across the boundary come out the way the
member's tokenizer would write them; the KV cache is cropped to the longest unchanged prefix of token ids and only
the tail is run again.

`EnsembleForCausalLM(..., cross_tokenizer=True)` builds this engine and its `generate()` runs at the end of this
module: the options it honours, the checks of its prompt, one engine run per prompt row.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..logging_utils import get_logger
from ..text_alignment import DEFAULT_MAX_VOCAB_UNION_SIZE, special_token_ids, token_byte_strings
from .members import check_tokenizers_compatible

if TYPE_CHECKING:
    from torch import nn
    from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

    from .causal_lm import EnsembleForCausalLM
    from .config import EnsembleConfig

logger = get_logger(__name__)

_END_OF_SEQUENCE = "<end of sequence>"  # the one candidate key shared by every member's EOS token(s)


@dataclass
class _MemberState:
    model: Any
    tokenizer: Any
    piece_to_id: dict[bytes, int]
    id_to_piece: list[bytes | None]
    eos_ids: list[int]
    suppressed_ids: list[int]
    byte_token_ids: dict[int, int]
    ids: list[int] = field(default_factory=list)
    cache: Any = None
    cached_ids: list[int] = field(default_factory=list)  # the token ids the KV cache holds keys/values for
    num_forward_tokens: int = 0


def _common_prefix_length(first: list[int], second: list[int]) -> int:
    length = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        length += 1
    return length


class CrossTokenizerEnsemble:
    """Text-level ensemble of causal LMs with different tokenizers.

    Args:
        members (`list[tuple[PreTrainedModel, PreTrainedTokenizerBase]]`):
            `(model, tokenizer)` pairs; vocabularies may differ in size and content.
        weights (`list[float]`, *optional*):
            Non-negative mixture weights, one per member (normalised to sum to 1). Defaults to equal weights.
        top_k (`int`, *optional*, defaults to 10):
            Candidates each member proposes per step; the union of all proposals is scored by every member.
        look_behind (`int`, *optional*, defaults to 8):
            Tokens re-encoded together with a new piece that a member's vocabulary lacks as one token.
        max_vocab_union_size (`int`, *optional*, defaults to `DEFAULT_MAX_VOCAB_UNION_SIZE` = 2**20):
            Refuse members whose vocabularies together hold more distinct strings (the string indexes live in memory).

    Example:

    ```python
    ensemble = CrossTokenizerEnsemble([(smollm2, smollm2_tokenizer), (gpt2_like, gpt2_tokenizer)], weights=[0.7, 0.3])
    text = ensemble.generate("The capital of France is", max_new_tokens=16)
    ```
    """

    def __init__(
        self,
        members: list[tuple[PreTrainedModel, PreTrainedTokenizerBase]],
        weights: list[float] | None = None,
        top_k: int = 10,
        look_behind: int = 8,
        max_vocab_union_size: int = DEFAULT_MAX_VOCAB_UNION_SIZE,
    ) -> None:
        if not members:
            raise ValueError("members is empty; pass a list of (model, tokenizer) pairs.")
        for position, member in enumerate(members):
            if not isinstance(member, (tuple, list)) or len(member) != 2:
                raise ValueError(
                    f"members[{position}] is {type(member).__name__}, not a (model, tokenizer) pair; pass "
                    "members=[(model, tokenizer), ...]."
                )
        if weights is None:
            weights = [1.0] * len(members)
        weights = [float(weight) for weight in weights]
        if len(weights) != len(members):
            raise ValueError(f"weights has {len(weights)} entries for {len(members)} members; give one per member.")
        if any(not weight >= 0 for weight in weights) or sum(weights) <= 0:
            raise ValueError(f"weights={weights} must be >= 0 with a positive sum.")
        if top_k < 1:
            raise ValueError(f"top_k={top_k} must be >= 1 (candidates each member proposes per step).")
        if look_behind < 0:
            raise ValueError(f"look_behind={look_behind} must be >= 0.")
        self.weights = [weight / sum(weights) for weight in weights]
        self.top_k = top_k
        self.look_behind = look_behind
        self.members = [self._member_state(model, tokenizer) for model, tokenizer in members]
        union = set()
        for member in self.members:
            union.update(member.piece_to_id)
            if len(union) > max_vocab_union_size:
                raise ValueError(
                    f"the members' vocabularies hold more than max_vocab_union_size={max_vocab_union_size} distinct "
                    "token strings; raise max_vocab_union_size if memory allows, or use fewer members."
                )

    @staticmethod
    def _member_state(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> _MemberState:
        id_to_piece = token_byte_strings(tokenizer)
        vocab_size = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() else None
        vocab_size = vocab_size or getattr(model.config, "vocab_size", len(id_to_piece))
        id_to_piece = (id_to_piece + [None] * vocab_size)[:vocab_size]
        piece_to_id: dict[bytes, int] = {}
        for token_id, piece in enumerate(id_to_piece):
            if piece is not None and piece not in piece_to_id:
                piece_to_id[piece] = token_id
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        eos_ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        eos_ids = sorted(i for i in eos_ids if i is not None and i < vocab_size)
        specials = special_token_ids(tokenizer) | {i for i, piece in enumerate(id_to_piece) if piece is None}
        suppressed = sorted(i for i in specials if i not in eos_ids and i < vocab_size)
        byte_token_ids = {piece[0]: token_id for piece, token_id in piece_to_id.items() if len(piece) == 1}
        return _MemberState(model, tokenizer, piece_to_id, id_to_piece, eos_ids, suppressed, byte_token_ids)

    # ---- member bookkeeping -------------------------------------------------------------------------------------

    def _encode_bytes(self, member: _MemberState, data: bytes) -> list[int]:
        """Member token ids for `data`, which may hold incomplete UTF-8 (then single-byte tokens are used)."""
        text = data.decode("utf-8", errors="surrogateescape")
        ids: list[int] = []
        run: list[str] = []
        run_is_bytes = False

        def flush() -> None:
            if not run:
                return
            if run_is_bytes:
                for char in run:
                    byte = ord(char) - 0xDC00
                    if byte not in member.byte_token_ids:
                        raise ValueError(
                            f"{type(member.tokenizer).__name__} has no token for the single byte {byte:#04x}, so it "
                            "cannot follow text that ends inside a UTF-8 character; use members with byte-level "
                            "or byte-fallback tokenizers."
                        )
                    ids.append(member.byte_token_ids[byte])
            else:
                ids.extend(member.tokenizer("".join(run), add_special_tokens=False)["input_ids"])
            run.clear()

        for char in text:
            is_byte = 0xDC80 <= ord(char) <= 0xDCFF
            if is_byte != run_is_bytes:
                flush()
                run_is_bytes = is_byte
            run.append(char)
        flush()
        return ids

    def _extend(self, member: _MemberState, piece: bytes) -> None:
        token_id = member.piece_to_id.get(piece)
        if token_id is not None:
            member.ids = [*member.ids, token_id]
            return
        start = max(0, len(member.ids) - self.look_behind)
        while start < len(member.ids) and any(member.id_to_piece[i] is None for i in member.ids[start:]):
            start += 1  # never re-encode through a special token (it has no text)
        tail = b"".join(member.id_to_piece[i] for i in member.ids[start:]) + piece
        member.ids = member.ids[:start] + self._encode_bytes(member, tail)

    def _next_token_log_probs(self, member: _MemberState) -> torch.Tensor:
        from .._compat import cache_argument, output_cache
        from .members import input_device

        # Reuse the KV cache for the longest prefix whose token ids did not change (a re-encoded tail may have
        # rewritten ids the cache already holds); run only the rest. At least the last id is run to get its logits.
        keep = min(_common_prefix_length(member.cached_ids, member.ids), len(member.ids) - 1)
        if member.cache is not None and keep < member.cache.get_seq_length():
            tokens_to_remove = member.cache.get_seq_length() - keep
            if keep > 0 and getattr(member.cache, "is_croppable", True):
                try:
                    member.cache.crop(-tokens_to_remove)  # transformers 5: a negative count removes that many
                except (ValueError, RuntimeError):  # e.g. a sliding-window layer past its window: start again
                    member.cache = None
            else:
                member.cache = None
        if member.cache is None:
            keep = 0
        device = input_device(member.model)
        new_ids = torch.tensor([member.ids[keep:]], dtype=torch.long, device=device)
        attention_mask = torch.ones(1, len(member.ids), dtype=torch.long, device=device)
        outputs = member.model(
            input_ids=new_ids, attention_mask=attention_mask, use_cache=True, **{cache_argument(): member.cache}
        )
        member.cache = output_cache(outputs)
        member.cached_ids = list(member.ids)
        member.num_forward_tokens += new_ids.shape[1]
        logits = outputs.logits[0, -1].float()
        if member.suppressed_ids:
            logits[member.suppressed_ids] = float("-inf")
        # candidates are pooled and scored on the CPU: members may live on different devices, and the scoring
        # indexes single tokens, which is cheaper there than as tiny device reads
        return torch.log_softmax(logits, dim=-1).cpu()

    def _score(self, member: _MemberState, log_probs: torch.Tensor, candidates: list[Any]) -> torch.Tensor:
        probs = log_probs.exp()
        scores = []
        for candidate in candidates:
            if candidate == _END_OF_SEQUENCE:
                scores.append(probs[member.eos_ids].sum() if member.eos_ids else probs.new_zeros(()))
                continue
            token_id = member.piece_to_id.get(candidate)
            if token_id is None:
                encoded = self._encode_bytes(member, candidate)
                token_id = encoded[0] if encoded else None
            scores.append(probs[token_id] if token_id is not None else probs.new_zeros(()))
        scores = torch.stack(scores)
        total = scores.sum()
        return scores / total if total > 0 else torch.full_like(scores, 1.0 / len(candidates))

    # ---- public API ---------------------------------------------------------------------------------------------

    def set_weights(self, weights: list[float]) -> None:
        """Replace the mixture weights (non-negative, one per member, normalised to sum to 1)."""
        weights = [float(weight) for weight in weights]
        if len(weights) != len(self.members):
            raise ValueError(
                f"weights has {len(weights)} entries for {len(self.members)} members; give one per member."
            )
        if any(not weight >= 0 for weight in weights) or sum(weights) <= 0:
            raise ValueError(f"weights={weights} must be >= 0 with a positive sum.")
        self.weights = [weight / sum(weights) for weight in weights]

    def reset(self) -> None:
        """Forget the current sequences and drop every member's KV cache (frees its memory)."""
        for member in self.members:
            member.ids, member.cache, member.cached_ids, member.num_forward_tokens = [], None, [], 0

    def release_caches(self) -> None:
        """Drop every member's KV cache (frees its memory); the next step re-runs each member's whole sequence."""
        for member in self.members:
            member.cache, member.cached_ids = None, []

    def begin(self, member_prompt_ids: list[list[int]]) -> None:
        """Start a generation from each member's own token ids of the same prompt (caches are dropped).

        Args:
            member_prompt_ids (`list[list[int]]`): one non-empty id list per member, in the members' order.
        """
        if len(member_prompt_ids) != len(self.members):
            raise ValueError(
                f"member_prompt_ids has {len(member_prompt_ids)} entries for {len(self.members)} members; give each "
                "member its own token ids of the prompt."
            )
        self.reset()
        for index, (member, ids) in enumerate(zip(self.members, member_prompt_ids, strict=True)):
            ids = [int(token_id) for token_id in ids]
            if not ids:
                raise ValueError(
                    f"member_prompt_ids[{index}] is empty: the prompt tokenises to nothing with "
                    f"{type(member.tokenizer).__name__}; give a prompt with some text."
                )
            member.ids = ids

    def next_piece(
        self,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        allow_end_of_sequence: bool = True,
    ) -> bytes | None:
        """One ensemble step after :meth:`begin`: pool the candidates, mix, choose, and extend every member.

        Args:
            do_sample (`bool`, *optional*, defaults to `False`): sample from the mixture instead of taking its argmax.
            temperature (`float`, *optional*, defaults to 1.0): sampling temperature of the mixture (> 0).
            top_k (`int`, *optional*): when sampling, keep only the `top_k` most likely pooled candidates.
            top_p (`float`, *optional*): when sampling, keep the smallest set of pooled candidates whose mixture
                probability reaches `top_p` (nucleus sampling over the candidates).
            generator (`torch.Generator`, *optional*): random generator of the sampling; torch's global one when
                omitted (so `torch.manual_seed` makes a run reproducible).
            allow_end_of_sequence (`bool`, *optional*, defaults to `True`): when `False`, end of sequence is not a
                candidate (to reach a minimum length).

        Returns:
            The chosen text piece as UTF-8 bytes (possibly an incomplete character), or `None` when the mixture
            chose end of sequence (members are left unchanged then).
        """
        with torch.no_grad():
            all_log_probs = [self._next_token_log_probs(member) for member in self.members]
        candidates: dict[Any, None] = {}
        for member, log_probs in zip(self.members, all_log_probs, strict=True):
            k = min(self.top_k, log_probs.numel())
            for token_id in log_probs.topk(k).indices.tolist():
                if not torch.isfinite(log_probs[token_id]):
                    continue
                key = _END_OF_SEQUENCE if token_id in member.eos_ids else member.id_to_piece[token_id]
                if key == _END_OF_SEQUENCE and not allow_end_of_sequence:
                    continue
                if key is not None:
                    candidates.setdefault(key, None)
        candidate_list = list(candidates)
        if not candidate_list:
            return None
        mixture = sum(
            weight * self._score(member, log_probs, candidate_list)
            for weight, member, log_probs in zip(self.weights, self.members, all_log_probs, strict=True)
        )
        if do_sample:
            choice = _sample_candidate(mixture, temperature, top_k, top_p, generator)
        else:
            choice = int(torch.argmax(mixture))
        piece = candidate_list[choice]
        if piece == _END_OF_SEQUENCE:
            return None
        for member in self.members:
            self._extend(member, piece)
        return piece

    def member_token_ids(self, index: int) -> list[int]:
        """Member `index`'s current token ids (prompt and generated text, as it re-encoded them)."""
        return list(self.members[index].ids)

    def encode_bytes(self, index: int, data: bytes) -> list[int]:
        """Member `index`'s token ids for `data` (UTF-8 bytes; an incomplete last character uses byte tokens)."""
        return self._encode_bytes(self.members[index], data)

    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        seed: int | None = None,
        stop_at_eos: bool = True,
        add_special_tokens: bool = True,
    ) -> str:
        """Continue `prompt` and return the generated text (without the prompt).

        Args:
            prompt (`str`): the text to continue (non-empty).
            max_new_tokens (`int`, *optional*, defaults to 32):
                Ensemble steps, each adding one text piece (one token of the member whose token was chosen).
            do_sample (`bool`, *optional*, defaults to `False`): sample from the mixture instead of taking its argmax.
            temperature (`float`, *optional*, defaults to 1.0): sampling temperature of the mixture (> 0).
            seed (`int`, *optional*): seed of the sampling generator, for reproducible sampling; torch's global
                generator is used when omitted.
            stop_at_eos (`bool`, *optional*, defaults to `True`): stop when the mixture picks end of sequence.
            add_special_tokens (`bool`, *optional*, defaults to `True`):
                Let each tokenizer add its own special tokens (e.g. BOS) to the prompt, as `tokenizer(prompt)` does.

        Non-EOS special tokens are never proposed (they stand for no text). Greedy generation is deterministic;
        with one member it reproduces that member's greedy `generate()` text (with those special tokens suppressed).
        """
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}.")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0.")
        if not temperature > 0:
            raise ValueError(f"temperature={temperature} must be > 0; 1.0 samples the mixture as it is.")
        prompt_ids = []
        for member in self.members:
            ids = list(member.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
            if not ids:
                raise ValueError(f"prompt {prompt!r} tokenises to nothing with {type(member.tokenizer).__name__}.")
            prompt_ids.append(ids)
        self.begin(prompt_ids)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        output = bytearray()
        for _ in range(max_new_tokens):
            piece = self.next_piece(do_sample=do_sample, temperature=temperature, generator=generator)
            if piece is None:
                if stop_at_eos:
                    break
                continue
            output.extend(piece)
        return output.decode("utf-8", errors="replace")

    @property
    def forward_token_counts(self) -> list[int]:
        """Tokens each member ran through its model during the last `generate` (prompt included)."""
        return [member.num_forward_tokens for member in self.members]


def _sample_candidate(
    mixture: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> int:
    """Index of a candidate drawn from the tempered mixture, after the optional top-k / top-p cuts."""
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0; 1.0 samples the mixture as it is.")
    probs = mixture.clamp_min(1e-30).pow(1.0 / temperature)
    probs = probs / probs.sum()
    if top_k is not None and 0 < top_k < probs.numel():
        cutoff = probs.topk(top_k).values[-1]
        probs = torch.where(probs >= cutoff, probs, torch.zeros_like(probs))
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the candidates ranked above each one
        keep = torch.zeros_like(probs, dtype=torch.bool)
        keep[order] = before < top_p * probs.sum()
        probs = torch.where(keep, probs, torch.zeros_like(probs))
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


# ----------------------------------------------------------------------------------------------------------------
# EnsembleForCausalLM(cross_tokenizer=True): the engine it builds and its generate()
# ----------------------------------------------------------------------------------------------------------------

# generate() options a cross-tokenizer ensemble honours; anything else set to a non-neutral value is refused.
_CROSS_TOKENIZER_GENERATION_OPTIONS = frozenset(
    {
        "max_length",
        "max_new_tokens",
        "min_new_tokens",
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "eos_token_id",
        "pad_token_id",
        "bos_token_id",
        "decoder_start_token_id",
        "use_cache",
        "return_dict_in_generate",
        "cache_implementation",
        "cache_config",
        "max_cache_len",
        "compile_config",
        "disable_compile",
        "transformers_version",
        "_from_model_config",
    }
)
_NEUTRAL_GENERATION_VALUES = {
    "min_length": 0,
    "num_beams": 1,
    "num_beam_groups": 1,
    "num_return_sequences": 1,
    "typical_p": 1.0,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "min_p": 0.0,
    "diversity_penalty": 0.0,
    "guidance_scale": 1.0,
}
# Only meaningful to an assistant or to beam search; a copied generation config may carry their defaults.
_IGNORED_GENERATION_VALUES = frozenset(
    {
        "early_stopping",
        "num_assistant_tokens",
        "num_assistant_tokens_schedule",
        "assistant_confidence_threshold",
        "assistant_lookbehind",
        "target_lookbehind",
        "is_assistant",
    }
)
# generate() arguments that are not generation-config fields and that a cross-tokenizer ensemble cannot honour.
_UNSUPPORTED_GENERATE_ARGUMENTS = (
    "logits_processor",
    "stopping_criteria",
    "prefix_allowed_tokens_fn",
    "assistant_model",
    "streamer",
    "negative_prompt_ids",
    "negative_prompt_attention_mask",
    "custom_generate",
    "inputs_embeds",
    "past_key_values",
    "position_ids",
)


def _generate_across_tokenizers(
    ensemble: EnsembleForCausalLM,
    inputs: torch.Tensor | None,
    generation_config: GenerationConfig | None,
    **kwargs: Any,
) -> Any:
    """`ensemble.generate()` with `cross_tokenizer=True` (see :meth:`EnsembleForCausalLM.generate`): every prompt row
    generated alone by the engine, the rows padded to one width after the prompts."""
    input_ids, attention_mask = _pop_prompt_arguments(inputs, kwargs)
    settings = _cross_tokenizer_generation_settings(
        copy.deepcopy(generation_config if generation_config is not None else ensemble.generation_config), kwargs
    )
    _check_prompt_ids(input_ids, len(ensemble.tokenizer))
    pad_token_id, eos_token_id = settings["pad_token_id"], settings["eos_token_id"]
    attention_mask = _prompt_attention_mask(input_ids, attention_mask, pad_token_id, eos_token_id)
    max_new_tokens = _max_new_tokens(settings, input_ids.shape[1])
    prompts = _unpadded_prompts(input_ids, attention_mask)

    engine = ensemble._cross_tokenizer_engine
    engine.set_weights(ensemble.member_weights.tolist())
    generated_rows = []
    try:
        for row, prompt_ids in enumerate(prompts):
            generated_rows.append(_generate_row(ensemble, row, prompt_ids, max_new_tokens, settings))
    finally:
        engine.release_caches()
    padded = _pad_rows(generated_rows, pad_token_id, eos_token_id)
    width = len(padded[0])
    new_ids = torch.tensor(padded, dtype=input_ids.dtype, device=input_ids.device).reshape(len(padded), width)
    sequences = torch.cat([input_ids, new_ids], dim=1)
    if settings["return_dict_in_generate"]:
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        return GenerateDecoderOnlyOutput(sequences=sequences)
    return sequences


def _pop_prompt_arguments(inputs: torch.Tensor | None, kwargs: dict[str, Any]) -> tuple[Any, torch.Tensor | None]:
    """The prompt ids and attention mask taken out of `generate()`'s arguments, after refusing the arguments a
    cross-tokenizer ensemble cannot honour; `kwargs` keeps only generation options."""
    input_ids = kwargs.pop("input_ids", None)
    if inputs is not None and input_ids is not None:
        raise ValueError("pass the prompt ids once: either inputs (first argument) or input_ids, not both.")
    input_ids = inputs if inputs is not None else input_ids
    attention_mask = kwargs.pop("attention_mask", None)
    kwargs.pop("synced_gpus", None)  # a single process runs every member; nothing to synchronise
    for name in _UNSUPPORTED_GENERATE_ARGUMENTS:
        if kwargs.get(name) is not None:
            raise ValueError(
                f"generate() of a cross-tokenizer ensemble does not support {name}; drop it (the ensemble picks "
                "text pieces, not ids of one vocabulary, so processors, streamers and caches do not apply)."
            )
        kwargs.pop(name, None)
    return input_ids, attention_mask


def _check_prompt_ids(input_ids: Any, vocab_size: int) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(
            f"input_ids must be a 2-D tensor (batch, length) of the ensemble tokenizer's ids with at least one "
            f"token, got {shape}; encode with ensemble.tokenizer(texts, return_tensors='pt')."
        )
    outside = input_ids[(input_ids < 0) | (input_ids >= vocab_size)]
    if outside.numel():
        raise ValueError(
            f"input_ids holds id {int(outside[0])} outside the ensemble tokenizer's {vocab_size} ids; encode the "
            "prompt with ensemble.tokenizer."
        )


def _prompt_attention_mask(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad_token_id: int | None, eos_token_id: int | None
) -> torch.Tensor:
    """The given mask (checked against the ids), or one that hides the padding of a batch (when pad differs from
    EOS, which a prompt may hold)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
        if pad_token_id is not None and pad_token_id != eos_token_id and input_ids.shape[0] > 1:
            attention_mask = (input_ids != pad_token_id).long()
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has {tuple(input_ids.shape)}; "
            "pass the mask the tokenizer returned with the ids."
        )
    return attention_mask


def _max_new_tokens(settings: dict[str, Any], prompt_length: int) -> int:
    """`max_new_tokens`, or what `max_length` leaves after the (padded) prompt."""
    max_new_tokens = settings["max_new_tokens"]
    if max_new_tokens is None:
        max_new_tokens = settings["max_length"] - prompt_length
        if max_new_tokens <= 0:
            raise ValueError(
                f"max_length={settings['max_length']} leaves no room after the {prompt_length}-token prompt; "
                "pass max_new_tokens=N instead."
            )
    return max_new_tokens


def _unpadded_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """Each row's prompt ids without its left padding (right padding and empty rows are refused)."""
    prompts = []
    for row in range(input_ids.shape[0]):
        mask = attention_mask[row].bool().tolist()
        if not any(mask):
            raise ValueError(f"attention_mask row {row} is all zeros: that prompt is empty; drop it.")
        first = mask.index(True)
        if not all(mask[first:]):
            raise ValueError(
                f"attention_mask row {row} is right-padded (a 0 after a 1); a cross-tokenizer ensemble continues "
                "each prompt from its end: pad on the left (tokenizer.padding_side = 'left')."
            )
        prompts.append(input_ids[row, first:].tolist())
    return prompts


def _pad_rows(generated_rows: list[list[int]], pad_token_id: int | None, eos_token_id: int | None) -> list[list[int]]:
    """The generated rows filled to the longest with `pad_token_id` (or EOS), as `generate()` pads."""
    width = max(len(generated) for generated in generated_rows)
    fill = pad_token_id if pad_token_id is not None else eos_token_id
    if fill is None and any(len(generated) < width for generated in generated_rows):
        raise ValueError(
            "rows ended at different lengths and neither pad_token_id nor eos_token_id is set; pass pad_token_id."
        )
    return [generated + [fill] * (width - len(generated)) for generated in generated_rows]


def _generate_row(
    ensemble: EnsembleForCausalLM, row: int, prompt_ids: list[int], max_new_tokens: int, settings: dict[str, Any]
) -> list[int]:
    """Ids of the ensemble's tokenizer generated after one (unpadded) prompt."""
    engine = ensemble._cross_tokenizer_engine
    reference = ensemble._tokenizer_member_index
    text = ensemble.tokenizer.decode(prompt_ids, skip_special_tokens=True)
    member_prompt_ids = []
    for index, member_tokenizer in enumerate(engine_tokenizers(engine)):
        if index == reference:
            member_prompt_ids.append(prompt_ids)
            continue
        ids = list(member_tokenizer(text, add_special_tokens=True)["input_ids"])
        if not ids:
            raise ValueError(
                f"prompt row {row} ({text!r}) tokenises to nothing with members[{index}]'s tokenizer; give a "
                "prompt with some text."
            )
        member_prompt_ids.append(ids)
    engine.begin(member_prompt_ids)
    generated: list[int] = []
    text_bytes = bytearray()
    while len(generated) < max_new_tokens:
        piece = engine.next_piece(
            do_sample=settings["do_sample"],
            temperature=settings["temperature"],
            top_k=settings["top_k"],
            top_p=settings["top_p"],
            allow_end_of_sequence=len(generated) >= settings["min_new_tokens"],
        )
        if piece is None:
            if settings["eos_token_id"] is not None:
                generated.append(settings["eos_token_id"])
            break
        text_bytes.extend(piece)
        ids = engine.member_token_ids(reference)
        if ids[: len(prompt_ids)] == prompt_ids:
            generated = ids[len(prompt_ids) :]
        else:  # the member re-encoded across the prompt's end: keep the prompt ids, encode the new text alone
            generated = engine.encode_bytes(reference, bytes(text_bytes))
    return generated[:max_new_tokens]


def engine_tokenizers(engine: Any) -> list[Any]:
    """The members' tokenizers of a :class:`CrossTokenizerEnsemble`, in order."""
    return [member.tokenizer for member in engine.members]


def _build_cross_tokenizer_engine(
    config: EnsembleConfig,
    members: Sequence[nn.Module],
    tokenizers: Sequence[Any],
    names: Sequence[str],
    tokenizer: Any,
) -> tuple[Any, int]:
    """The :class:`CrossTokenizerEnsemble` that generates for a cross-tokenizer ensemble, and the index of the member
    whose tokenizer is the ensemble's (its ids are the ensemble's input and output ids)."""
    for index, member_tokenizer in enumerate(tokenizers):
        if member_tokenizer is None:
            raise ValueError(
                f"members[{index}] ({names[index]!r}) has no tokenizer; cross_tokenizer=True needs each member's own "
                "tokenizer: pass (model, tokenizer) pairs, or checkpoint folders / hub ids that hold a tokenizer."
            )
    tokenizer_member = next((index for index, candidate in enumerate(tokenizers) if candidate is tokenizer), None)
    if tokenizer_member is None:
        for index, candidate in enumerate(tokenizers):
            try:
                check_tokenizers_compatible([candidate, tokenizer], [names[index], "tokenizer"])
            except ValueError:
                continue
            tokenizer_member = index
            break
    if tokenizer_member is None:
        raise ValueError(
            f"tokenizer={type(tokenizer).__name__} (vocabulary of {len(tokenizer)}) is not the tokenizer of any member. "
            "With cross_tokenizer=True the ensemble's input and output ids are one member's ids: leave tokenizer unset "
            "(the first member's) or pass one member's tokenizer."
        )
    try:
        check_tokenizers_compatible(tokenizers, names)
    except ValueError:
        pass
    else:
        logger.warning(
            "cross_tokenizer=True but all members share one tokenizer; the logit-level ensemble (cross_tokenizer=False) "
            "is exact, faster and also gives forward() logits."
        )
    weights = config.weights if config.weights is not None else [1.0] * len(members)
    engine = CrossTokenizerEnsemble(
        list(zip(members, tokenizers, strict=True)),
        weights=list(weights),
        top_k=config.cross_tokenizer_top_k,
        look_behind=config.cross_tokenizer_look_behind,
    )
    return engine, tokenizer_member


def _cross_tokenizer_generation_settings(
    generation_config: GenerationConfig, kwargs: dict[str, Any]
) -> dict[str, Any]:
    """The options a cross-tokenizer `generate()` honours, after refusing any it cannot (named in the error)."""
    unused = generation_config.update(**kwargs)
    if unused:
        raise ValueError(
            f"generate() of a cross-tokenizer ensemble does not take {sorted(unused)}; it accepts input_ids, "
            "attention_mask and generation options (max_new_tokens, do_sample, temperature, top_k, top_p, ...)."
        )
    do_sample = bool(generation_config.do_sample)
    for name, value in generation_config.to_dict().items():
        if value is None or value is False or name in _CROSS_TOKENIZER_GENERATION_OPTIONS:
            continue
        if name in _IGNORED_GENERATION_VALUES:
            continue
        if name in _NEUTRAL_GENERATION_VALUES and value == _NEUTRAL_GENERATION_VALUES[name]:
            continue
        if name == "min_p" and not do_sample:
            continue
        if isinstance(value, (dict, list)) and not value:
            continue
        raise ValueError(
            f"generate() of a cross-tokenizer ensemble cannot honour {name}={value!r}: it runs greedy search or "
            "sampling (temperature, top_k, top_p) over the members' pooled candidates, one sequence per prompt. Drop "
            f"{name}, or use members that share a tokenizer (cross_tokenizer=False) for the full generate()."
        )
    num_beams = generation_config.num_beams
    if num_beams not in (None, 1):
        raise ValueError(f"num_beams={num_beams} is not supported with cross_tokenizer=True; use num_beams=1.")
    temperature = 1.0 if generation_config.temperature is None else float(generation_config.temperature)
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0 when sampling; 1.0 samples the mixture as it is.")
    top_k = generation_config.top_k if do_sample else None
    top_p = generation_config.top_p if do_sample else None
    if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k={top_k!r} must be an integer >= 0 (0 keeps every pooled candidate).")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} must be in (0, 1].")
    max_new_tokens = generation_config.max_new_tokens
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 0):
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0.")
    min_new_tokens = generation_config.min_new_tokens
    if min_new_tokens is not None and (not isinstance(min_new_tokens, int) or min_new_tokens < 0):
        raise ValueError(f"min_new_tokens={min_new_tokens!r} must be an integer >= 0.")
    eos = generation_config.eos_token_id
    pad = generation_config.pad_token_id
    return {
        "max_new_tokens": max_new_tokens,
        "max_length": generation_config.max_length if generation_config.max_length is not None else 20,
        "min_new_tokens": min_new_tokens or 0,
        "do_sample": do_sample,
        "temperature": temperature,
        "top_k": top_k or None,
        "top_p": top_p,
        "eos_token_id": eos[0] if isinstance(eos, (list, tuple)) else eos,
        "pad_token_id": pad[0] if isinstance(pad, (list, tuple)) else pad,
        "return_dict_in_generate": bool(generation_config.return_dict_in_generate),
    }
