"""Reading a server's answer into a cache row: top-k ids and log-probabilities per position of our token ids.

Two answer shapes are understood (pure functions, no network):

- **vLLM** (`prompt_logprobs=k` on `/v1/completions` with a token-id prompt): `choices[0].prompt_logprobs` is a
  list with `None` first, then per prompt token `j` a dict `{token_id: {"logprob", "rank", "decoded_token"}}`
  holding the top-k of the distribution that predicted token `j`, plus token `j` itself when it is not among them.
- **OpenAI completions with `echo`** (llama.cpp's server, llama-cpp-python, any server following OpenAI's legacy
  schema): `choices[0].logprobs` holds `tokens` (strings), `text_offset` and `top_logprobs`, a list of
  `{token string: logprob}` dicts (the first `None`). Strings are mapped back to ids through a
  :class:`TokenStringTable`; ambiguous strings are dropped (their mass stays in the tail).

A row of `S` tokens gives `S - 1` positions; position `p` is the teacher's distribution after reading tokens
`0..p`, i.e. its prediction of token `p + 1` (the trainer's causal shift). A position the answer has no
distribution for (the first one, when the server reports it as `None`, or text the server tokenised differently)
gets no kept entries: every slot holds log-probability `PAD_LOGPROB` (zero mass) and the trainer masks it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..teacher_cache.format import PAD_LOGPROB, logprobs_to_float16_round_down
from .tokens import TokenStringTable, align_server_tokens

# A log-probability above this is a server error, not rounding (log(1) = 0; servers round to a few ulps).
_MAX_LOGPROB = 1e-3


class ServedTeacherAnswerError(ValueError):
    """A server's answer cannot be turned into a teacher distribution (NaN, +-inf, too few entries, bad shape)."""


def _check_value(value: Any, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ServedTeacherAnswerError(f"{where}: log-probability {value!r} is not a number") from None
    if math.isnan(number) or math.isinf(number) or number > _MAX_LOGPROB:
        raise ServedTeacherAnswerError(
            f"{where}: log-probability {number!r} is not a finite value <= 0 (the server returned a broken "
            "distribution: NaN/inf logits, or a quantisation or sampling bug)"
        )
    return min(number, 0.0)


def _fill_row(
    entries_per_position: list[list[tuple[int, float]] | None],
    top_k: int,
    vocab_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Per position, its `top_k` largest `(id, logprob)` entries as `(ids, float16 logprobs)`.

    Missing slots (an ambiguous string dropped, or a whole position without an answer) hold distinct ids not used
    by that position with log-probability `PAD_LOGPROB` (zero mass), so the tail derived on read is unchanged.
    """
    positions = len(entries_per_position)
    ids = np.zeros((positions, top_k), dtype=np.int64)
    values = np.full((positions, top_k), PAD_LOGPROB, dtype=np.float32)
    for position, entries in enumerate(entries_per_position):
        kept = sorted(entries or [], key=lambda entry: -entry[1])[:top_k]
        used = {token_id for token_id, _ in kept}
        for slot, (token_id, logprob) in enumerate(kept):
            ids[position, slot] = token_id
            values[position, slot] = logprob
        filler = vocab_size - 1
        for slot in range(len(kept), top_k):
            while filler in used:
                filler -= 1
            ids[position, slot] = filler
            used.add(filler)
    half = logprobs_to_float16_round_down(torch.from_numpy(values)).numpy()
    return ids, half


def _dedupe_best(entries: list[tuple[int, float]]) -> list[tuple[int, float]]:
    best: dict[int, float] = {}
    for token_id, logprob in entries:
        if token_id not in best or logprob > best[token_id]:
            best[token_id] = logprob
    return list(best.items())


def parse_vllm_prompt_logprobs(
    choice: dict[str, Any],
    row_ids: list[int],
    top_k: int,
    vocab_size: int,
    where: str = "answer",
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """A vLLM `prompt_logprobs` answer for the token-id prompt `row_ids` as `(ids, logprobs)` of shape `(S-1, k)`.

    Returns also statistics: `missing_positions`, `short_positions` (fewer than `top_k` entries).

    Raises:
        ServedTeacherAnswerError: wrong length, NaN/inf/positive log-probabilities, ids outside the vocabulary, or
            fewer than `top_k` entries at a position (the server's `max_logprobs` or a truncated answer).
    """
    prompt_logprobs = choice.get("prompt_logprobs")
    if not isinstance(prompt_logprobs, list):
        raise ServedTeacherAnswerError(
            f"{where}: no `prompt_logprobs` list in the answer (keys: {sorted(choice)}); the server is not vLLM or "
            "ignored prompt_logprobs"
        )
    if len(prompt_logprobs) < len(row_ids):
        raise ServedTeacherAnswerError(
            f"{where}: prompt_logprobs has {len(prompt_logprobs)} entries for a prompt of {len(row_ids)} tokens"
        )
    limit = min(top_k, vocab_size)
    entries_per_position: list[list[tuple[int, float]] | None] = []
    for position in range(len(row_ids) - 1):
        answer = prompt_logprobs[position + 1]
        if answer is None:
            entries_per_position.append(None)
            continue
        entries = []
        for key, item in answer.items():
            token_id = int(key)
            if not 0 <= token_id < vocab_size:
                raise ServedTeacherAnswerError(
                    f"{where}, position {position}: token id {token_id} is outside the vocabulary [0, {vocab_size})"
                )
            logprob = item.get("logprob") if isinstance(item, dict) else item
            entries.append((token_id, _check_value(logprob, f"{where}, position {position}")))
        if len(entries) < limit:
            raise ServedTeacherAnswerError(
                f"{where}, position {position}: {len(entries)} log-probabilities for top_k={top_k}; the server "
                "answered fewer than asked (its max_logprobs limit, or a truncated answer)"
            )
        entries_per_position.append(entries)
    ids, logprobs = _fill_row(entries_per_position, top_k, vocab_size)
    missing = sum(entries is None for entries in entries_per_position)
    return ids, logprobs, {"missing_positions": missing, "dropped_entries": 0}


def prompt_token_count(server_tokens: list[str], prompt_chars: int | None) -> int:
    """How many of an echo answer's tokens spell the prompt (the rest were generated after it)."""
    if prompt_chars is None:
        return len(server_tokens)
    count = covered = 0
    for text in server_tokens:
        covered += len(text)
        if covered > prompt_chars:
            break
        count += 1
    return count


def parse_echo_logprobs(
    choice: dict[str, Any],
    row_ids: list[int],
    table: TokenStringTable,
    top_k: int,
    position_convention: str,
    prompt_chars: int | None = None,
    where: str = "answer",
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """An OpenAI-style echo answer (`logprobs.tokens`, `logprobs.top_logprobs`) as `(ids, logprobs)` of `(S-1, k)`.

    Args:
        choice (`dict`): `answer["choices"][0]`.
        row_ids (`list[int]`): the row's token ids (whose decoded text was the prompt).
        table (`TokenStringTable`): the student tokenizer's token strings.
        top_k (`int`): entries kept per position.
        position_convention (`str`): `"current"` when `top_logprobs[j]` is the distribution that predicted the
            server's token `j` (the OpenAI convention; llama-cpp-python when the model adds a BOS token), `"next"`
            when it is the distribution after token `j` (llama-cpp-python for models without BOS).
        prompt_chars (`int`, *optional*): length of the prompt text; tokens past it are what the server generated
            (some servers echo them, some do not) and are ignored. Defaults to all tokens.

    Returns:
        `(ids, logprobs, statistics)`; statistics count `missing_positions` (no distribution: the server's first
        position, or text tokenised differently), `dropped_entries` (ambiguous strings) and `misaligned_tokens`.
    """
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict) or not isinstance(logprobs.get("top_logprobs"), list):
        raise ServedTeacherAnswerError(
            f"{where}: the answer has no `logprobs.top_logprobs` (keys: {sorted(choice)}); the server does not "
            "return prompt log-probabilities (llama-cpp-python needs logits_all=True)"
        )
    server_tokens = list(logprobs.get("tokens") or [])
    top = logprobs["top_logprobs"]
    count = prompt_token_count(server_tokens, prompt_chars)
    if count < 1 or len(top) < count:
        raise ServedTeacherAnswerError(
            f"{where}: {len(server_tokens)} tokens and {len(top)} top_logprobs for a prompt of {len(row_ids)} tokens"
        )
    server_tokens, top = server_tokens[:count], top[: count + (1 if position_convention == "next" else 0)]
    mapping = align_server_tokens(table.row_strings(row_ids), server_tokens)
    string_to_id, ambiguous = table.string_to_id, table.ambiguous
    limit = min(top_k, len(table))
    entries_per_position: list[list[tuple[int, float]] | None] = []
    dropped = 0
    for position in range(len(row_ids) - 1):
        server_index = int(mapping[position + 1])
        answer_index = server_index if position_convention == "current" else server_index - 1
        if server_index < 0 or answer_index < 0 or answer_index >= len(top) or top[answer_index] is None:
            entries_per_position.append(None)
            continue
        answer = top[answer_index]
        entries, ambiguous_here = [], 0
        for text, logprob in answer.items():
            value = _check_value(logprob, f"{where}, position {position}")
            token_id = string_to_id.get(text)
            if token_id is None:
                ambiguous_here += 1
                if text not in ambiguous:
                    raise ServedTeacherAnswerError(
                        f"{where}, position {position}: the server named token {text!r}, which the student's "
                        "tokenizer does not have; the server's tokenizer differs (use cross-tokenizer distillation)"
                    )
                continue
            entries.append((token_id, value))
        if len(answer) < limit and not ambiguous_here:
            raise ServedTeacherAnswerError(
                f"{where}, position {position}: {len(answer)} log-probabilities for top_k={top_k}; the server "
                "answered fewer than asked"
            )
        dropped += ambiguous_here
        entries_per_position.append(_dedupe_best(entries))
    ids, values = _fill_row(entries_per_position, top_k, len(table))
    statistics = {
        "missing_positions": sum(entries is None for entries in entries_per_position),
        "dropped_entries": dropped,
        "misaligned_tokens": int((mapping < 0).sum()),
    }
    return ids, values, statistics
