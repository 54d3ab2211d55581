"""Aligning two tokenisations of one text, for models whose tokenizers differ (distillation and ensembles).

A teacher and a student with different vocabularies cannot compare next-token distributions position by position:
their sequences have different lengths and their vocabularies index different strings. This module makes them
comparable (:func:`align_texts`, :func:`align_token_offsets`): each text is tokenised by both tokenizers; the
character offsets of the tokens say where each token ends. A *boundary* is a character position where a tokenizer
starts a new token cleanly (not inside a UTF-8 character that byte-level BPE split into several tokens). Positions
that are boundaries for both tokenizers cut the text into aligned *spans*. A span that is one token on both sides,
with the same byte string, is *matched*; every other span is *unmatched*. The *matched vocabulary* (tokens whose
byte strings exist in both vocabularies) is :func:`build_vocabulary_mapping`; :func:`build_span_alignment_index`
turns a batch's alignments into the flat row indices that the losses of `hf_interop.losses.cross_tokenizer` gather.
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


# --------------------------------------------------------------------------------------------------------------
# Token strings as bytes, and the matched vocabulary
# --------------------------------------------------------------------------------------------------------------

_BYTE_FALLBACK_PATTERN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_token_bytes_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _decoder_types(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return []
    decoder = json.loads(backend.to_str()).get("decoder")
    types: list[str] = []

    def walk(node: dict | None) -> None:
        if not node:
            return
        if node.get("type") == "Sequence":
            for child in node.get("decoders", []):
                walk(child)
        else:
            types.append(node.get("type", ""))

    walk(decoder)
    return types


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids of every special token of `tokenizer` (named ones and added tokens flagged `special`)."""
    ids = {int(i) for i in tokenizer.all_special_ids}
    for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            ids.add(int(token_id))
    return ids


def token_byte_strings(tokenizer: PreTrainedTokenizerBase) -> list[bytes | None]:
    """The UTF-8 bytes each token id stands for (`None` for special tokens), indexed by id.

    Byte-level BPE vocabularies (GPT-2, SmolLM2, Llama 3, Qwen) are mapped back through GPT-2's byte-to-unicode
    table; SentencePiece-style vocabularies (`▁` for space, `<0xNN>` byte fallback: Llama 2, Gemma) by those
    rules; anything else through `convert_tokens_to_string`. Computed once per tokenizer object.
    """
    try:
        return _token_bytes_cache[tokenizer]
    except (KeyError, TypeError):
        pass
    vocab = tokenizer.get_vocab()
    size = max(len(tokenizer), max(vocab.values()) + 1)
    table: list[bytes | None] = [None] * size
    specials = special_token_ids(tokenizer)
    added = {int(i): tok for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    decoders = _decoder_types(tokenizer)
    if "ByteLevel" in decoders:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        unicode_to_byte = {char: byte for byte, char in bytes_to_unicode().items()}

        def to_bytes(token: str) -> bytes:
            if all(char in unicode_to_byte for char in token):
                return bytes(unicode_to_byte[char] for char in token)
            return token.encode("utf-8")

    elif "ByteFallback" in decoders or "Metaspace" in decoders or "Replace" in decoders:

        def to_bytes(token: str) -> bytes:
            match = _BYTE_FALLBACK_PATTERN.match(token)
            if match:
                return bytes([int(match.group(1), 16)])
            return token.replace("\u2581", " ").encode("utf-8")

    else:

        def to_bytes(token: str) -> bytes:
            return tokenizer.convert_tokens_to_string([token]).encode("utf-8")

    for token, token_id in vocab.items():
        if token_id in specials:
            continue
        if token_id in added:  # non-special added tokens stand for their literal content
            table[token_id] = added[token_id].content.encode("utf-8")
        else:
            table[token_id] = to_bytes(token)
    try:
        _token_bytes_cache[tokenizer] = table
    except TypeError:
        pass
    return table


#: Default cap on the size of the union of two vocabularies (student + teacher - matched). Per position, the loss
#: holds float32 rows as wide as each vocabulary (and ULD pads to the larger), so a union of 2**20 entries means
#: about 4 MiB per position; above it, distillation would need vocabularies no real tokenizer pair has.
DEFAULT_MAX_VOCAB_UNION_SIZE = 2**20


@dataclass
class VocabularyMapping:
    """Pairs of (student id, teacher id) whose tokens are the same byte string.

    Attributes:
        student_ids (`torch.LongTensor` of shape `(num_matched,)`): student ids of the matched vocabulary.
        teacher_ids (`torch.LongTensor` of shape `(num_matched,)`): the teacher ids of the same strings.
        student_vocab_size (`int`): width of the student's logits.
        teacher_vocab_size (`int`): width of the teacher's logits.
        union_size (`int`): `student_vocab_size + teacher_vocab_size - num_matched`.
    """

    student_ids: torch.Tensor
    teacher_ids: torch.Tensor
    student_vocab_size: int
    teacher_vocab_size: int
    union_size: int
    _masks: dict = field(default_factory=dict, repr=False)
    #: `(V_t,)` with `unmatched="prefix"`: for every teacher id, the student id of the same string, else of its
    #: longest prefix that is a student token; -1 where none is (a special token without a same-named one)
    teacher_to_student: torch.Tensor | None = None

    @property
    def num_matched(self) -> int:
        return int(self.student_ids.numel())

    def projection(self, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor]:
        """`teacher_to_student` as `(teacher ids that have a student token, or None when all do; their student ids)`
        on `device`, computed once per device."""
        key = ("projection", str(device))
        if key not in self._masks:
            projected = self.teacher_to_student >= 0
            teacher_ids = None if bool(projected.all()) else projected.nonzero().squeeze(-1).to(device)
            self._masks[key] = (teacher_ids, self.teacher_to_student[projected].to(device))
        return self._masks[key]

    def unmatched_masks(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean masks `(student (V_s,), teacher (V_t,))`, `True` on ids outside the matched vocabulary."""
        key = str(device)
        if key not in self._masks:
            student_mask = torch.ones(self.student_vocab_size, dtype=torch.bool, device=device)
            teacher_mask = torch.ones(self.teacher_vocab_size, dtype=torch.bool, device=device)
            student_mask[self.student_ids.to(device)] = False
            teacher_mask[self.teacher_ids.to(device)] = False
            self._masks[key] = (student_mask, teacher_mask)
        return self._masks[key]


#: `build_vocabulary_mapping(unmatched=...)`: what teacher tokens without a same-string student token become
UNMATCHED_VOCABULARY = ("bucket", "prefix")


def build_vocabulary_mapping(
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase,
    *,
    student_vocab_size: int | None = None,
    teacher_vocab_size: int | None = None,
    max_vocab_union_size: int = DEFAULT_MAX_VOCAB_UNION_SIZE,
    unmatched: str = "bucket",
) -> VocabularyMapping:
    """Match the two vocabularies by byte string, once (a sparse id-to-id map, not a dense matrix).

    Ordinary tokens match by the bytes they stand for; special tokens match only special tokens of the same name
    (e.g. `<|endoftext|>` in both). When one vocabulary holds the same string under two ids, the lowest id is used.

    Args:
        student_tokenizer (`PreTrainedTokenizerBase`): the student's tokenizer.
        teacher_tokenizer (`PreTrainedTokenizerBase`): the teacher's tokenizer.
        student_vocab_size (`int`, *optional*):
            Width of the student's logits when it differs from `len(student_tokenizer)` (padded embeddings); the
            extra columns are unmatched.
        teacher_vocab_size (`int`, *optional*): the same for the teacher.
        max_vocab_union_size (`int`, *optional*, defaults to `DEFAULT_MAX_VOCAB_UNION_SIZE` = 2**20):
            Refuse vocabulary pairs whose union is larger (see the constant's note on memory).
        unmatched (`str`, *optional*, defaults to `"bucket"`):
            What the divergence on matched spans does with teacher tokens that have no same-string student token:
            `"bucket"` pools them into one rest bucket (against the student's own unmatched tokens); `"prefix"`
            also builds `teacher_to_student`, which gives each its longest student-token prefix (a teacher token
            `" function("` counts for the student's `" function"`), so the teacher's whole distribution lands on
            the student's vocabulary.
    """
    if unmatched not in UNMATCHED_VOCABULARY:
        raise ValueError(f"unmatched must be one of {UNMATCHED_VOCABULARY}, got {unmatched!r}.")
    student_vocab_size = student_vocab_size or len(student_tokenizer)
    teacher_vocab_size = teacher_vocab_size or len(teacher_tokenizer)
    upper_bound = student_vocab_size + teacher_vocab_size
    student_bytes = token_byte_strings(student_tokenizer)
    teacher_bytes = token_byte_strings(teacher_tokenizer)
    student_index: dict[bytes, int] = {}
    for token_id, piece in enumerate(student_bytes[:student_vocab_size]):
        if piece is not None and piece not in student_index:
            student_index[piece] = token_id
    pairs: dict[int, int] = {}
    for token_id, piece in enumerate(teacher_bytes[:teacher_vocab_size]):
        student_id = student_index.get(piece) if piece is not None else None
        if student_id is not None and student_id not in pairs:
            pairs[student_id] = token_id
    # Special tokens pair only with special tokens of the same name (e.g. both models' "<|endoftext|>").
    student_specials = {
        student_tokenizer.convert_ids_to_tokens(i): i
        for i in sorted(special_token_ids(student_tokenizer))
        if i < student_vocab_size
    }
    for token_id in sorted(special_token_ids(teacher_tokenizer)):
        student_id = student_specials.get(teacher_tokenizer.convert_ids_to_tokens(token_id))
        if token_id < teacher_vocab_size and student_id is not None and student_id not in pairs:
            pairs[student_id] = token_id
    union_size = upper_bound - len(pairs)
    if union_size > max_vocab_union_size:
        raise ValueError(
            f"the union of the student vocabulary ({student_vocab_size}) and the teacher vocabulary "
            f"({teacher_vocab_size}) has {union_size} entries, more than max_vocab_union_size={max_vocab_union_size}. "
            "Cross-tokenizer losses hold rows as wide as both vocabularies for every position; raise "
            "max_vocab_union_size if your memory allows it, or use tokenizers with smaller vocabularies."
        )
    student_ids = torch.tensor(sorted(pairs), dtype=torch.long)
    teacher_ids = torch.tensor([pairs[i] for i in sorted(pairs)], dtype=torch.long)
    mapping = VocabularyMapping(student_ids, teacher_ids, student_vocab_size, teacher_vocab_size, union_size)
    if unmatched == "prefix":
        projection = [-1] * teacher_vocab_size  # a list: per-element tensor writes are slow over 262k ids
        for student_id, teacher_id in pairs.items():
            projection[teacher_id] = student_id
        longest = max((len(piece) for piece in student_index), default=0)
        specials = special_token_ids(teacher_tokenizer)
        for token_id, piece in enumerate(teacher_bytes[:teacher_vocab_size]):
            if projection[token_id] >= 0 or piece is None or token_id in specials:
                continue
            for end in range(min(len(piece), longest), 0, -1):
                student_id = student_index.get(piece[:end])
                if student_id is not None:
                    projection[token_id] = student_id
                    break
        mapping.teacher_to_student = torch.tensor(projection, dtype=torch.long)
    return mapping


# --------------------------------------------------------------------------------------------------------------
# Alignment
# --------------------------------------------------------------------------------------------------------------

ALIGNMENT_MODES = ("spans", "positions")


@dataclass(frozen=True)
class AlignedSpan:
    """Tokens `[student_start, student_end)` and `[teacher_start, teacher_end)` cover the same characters."""

    student_start: int
    student_end: int
    teacher_start: int
    teacher_end: int
    matched: bool


@dataclass
class TextAlignment:
    """Both tokenisations of one text and their aligned spans (token indices into `student_ids`/`teacher_ids`)."""

    text: str
    student_ids: list[int]
    teacher_ids: list[int]
    spans: list[AlignedSpan]

    @property
    def num_matched(self) -> int:
        return sum(span.matched for span in self.spans)


def check_offsets_support(tokenizer: PreTrainedTokenizerBase, argument: str) -> None:
    """Raise a clear error when `tokenizer` cannot report character offsets (a slow, pure-Python tokenizer)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{argument} ({type(tokenizer).__name__}) is a slow tokenizer without offset mapping support, which span "
            "alignment needs. Load its fast version (`AutoTokenizer.from_pretrained(..., use_fast=True)` or "
            "`PreTrainedTokenizerFast`), or fall back to alignment='positions' (ULD on sequence positions, no "
            "alignment: position i of the student is compared with position i of the teacher)."
        )


def _clean_boundaries(offsets: list[tuple[int, int]]) -> list[bool]:
    """For each token, whether the text can be cut cleanly right after it.

    Byte-level BPE splits some multi-byte characters into several tokens, whose character offsets overlap (all of
    them end after that character); a cut between such tokens is not at a character boundary, so it is not clean.
    """
    clean = []
    for index, (_, end) in enumerate(offsets):
        next_start = offsets[index + 1][0] if index + 1 < len(offsets) else end
        clean.append(next_start >= end)
    return clean


def align_token_offsets(
    student_offsets: list[tuple[int, int]], teacher_offsets: list[tuple[int, int]]
) -> list[tuple[int, int, int, int]]:
    """Group two tokenisations of one text into spans whose boundaries coincide.

    Walks both token lists, closing a span at every character position that both sides can cut cleanly (see
    :func:`_clean_boundaries`). Tokens after the last common boundary form one last span when both sides have
    some. Pure function of the offsets.

    Returns:
        `list` of `(student_start, student_end, teacher_start, teacher_end)` token index ranges.
    """
    student_clean = _clean_boundaries(student_offsets)
    teacher_clean = _clean_boundaries(teacher_offsets)
    # A cut position maps to the LAST token ending cleanly there, so zero-width tokens join the span before them.
    student_cuts = {student_offsets[i][1]: i for i in range(len(student_offsets)) if student_clean[i]}
    teacher_cuts = {teacher_offsets[i][1]: i for i in range(len(teacher_offsets)) if teacher_clean[i]}
    spans = []
    student_start = teacher_start = 0
    for position in sorted(set(student_cuts) & set(teacher_cuts)):
        student_end, teacher_end = student_cuts[position] + 1, teacher_cuts[position] + 1
        if student_end > student_start and teacher_end > teacher_start:
            spans.append((student_start, student_end, teacher_start, teacher_end))
            student_start, teacher_start = student_end, teacher_end
    if student_start < len(student_offsets) and teacher_start < len(teacher_offsets):
        spans.append((student_start, len(student_offsets), teacher_start, len(teacher_offsets)))
    return spans


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str], offsets: bool) -> dict[str, list]:
    return tokenizer(
        texts, add_special_tokens=False, return_offsets_mapping=offsets, return_attention_mask=False, verbose=False
    )


def _check_not_empty(ids: list[int], text: str, argument: str) -> None:
    if not ids:
        raise ValueError(
            f"text {text[:60]!r} tokenises to no tokens with the {argument}; remove empty texts first, e.g. "
            "`dataset.filter(lambda row: len(row['text'].strip()) > 0)`."
        )


def align_texts(
    texts: list[str],
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase,
    *,
    max_student_tokens: int | None = None,
    alignment: str = "spans",
) -> list[TextAlignment]:
    """Tokenise `texts` with both tokenizers (no special tokens) and align the tokens into spans.

    Args:
        texts (`list[str]`): raw texts.
        student_tokenizer (`PreTrainedTokenizerBase`): fast tokenizer of the student.
        teacher_tokenizer (`PreTrainedTokenizerBase`): fast tokenizer of the teacher.
        max_student_tokens (`int`, *optional*):
            Keep at most this many student tokens per text; the text is cut after the last kept token's characters
            and the teacher tokenises only that part, so both sides cover the same characters.
        alignment (`str`, *optional*, defaults to `"spans"`):
            `"spans"` aligns by character offsets (needs fast tokenizers). `"positions"` is the fallback for
            tokenizers without offsets: student position i is paired with teacher position i (every pair unmatched,
            compared by ULD), as in the original ULD paper.

    Returns:
        `list[TextAlignment]`, one per text.
    """
    if alignment not in ALIGNMENT_MODES:
        raise ValueError(f"alignment={alignment!r} is not supported; use one of {ALIGNMENT_MODES}.")
    if isinstance(texts, str):
        raise ValueError("texts must be a list of strings, got one string; wrap it: align_texts([text], ...).")
    texts = list(texts)
    if alignment == "positions":
        student_ids = _encode(student_tokenizer, texts, offsets=False)["input_ids"]
        teacher_ids = _encode(teacher_tokenizer, texts, offsets=False)["input_ids"]
        results = []
        for text, s_ids, t_ids in zip(texts, student_ids, teacher_ids, strict=True):
            _check_not_empty(s_ids, text, "student tokenizer")
            _check_not_empty(t_ids, text, "teacher tokenizer")
            if max_student_tokens is not None:
                s_ids, t_ids = s_ids[:max_student_tokens], t_ids[:max_student_tokens]
            spans = [AlignedSpan(i, i + 1, i, i + 1, False) for i in range(min(len(s_ids), len(t_ids)))]
            results.append(TextAlignment(text, list(s_ids), list(t_ids), spans))
        return results

    check_offsets_support(student_tokenizer, "student_tokenizer")
    check_offsets_support(teacher_tokenizer, "teacher_tokenizer")
    student_encoded = _encode(student_tokenizer, texts, offsets=True)
    cut_texts = []
    for text, ids, offsets in zip(texts, student_encoded["input_ids"], student_encoded["offset_mapping"], strict=True):
        _check_not_empty(ids, text, "student tokenizer")
        if max_student_tokens is not None and len(ids) > max_student_tokens:
            cut_texts.append(text[: offsets[max_student_tokens - 1][1]])
        else:
            cut_texts.append(text)
    if cut_texts != list(texts):
        student_encoded = _encode(student_tokenizer, cut_texts, offsets=True)
    teacher_encoded = _encode(teacher_tokenizer, cut_texts, offsets=True)
    student_bytes = token_byte_strings(student_tokenizer)
    teacher_bytes = token_byte_strings(teacher_tokenizer)
    results = []
    for index, text in enumerate(cut_texts):
        s_ids, s_offsets = student_encoded["input_ids"][index], student_encoded["offset_mapping"][index]
        t_ids, t_offsets = teacher_encoded["input_ids"][index], teacher_encoded["offset_mapping"][index]
        _check_not_empty(s_ids, text, "student tokenizer")
        _check_not_empty(t_ids, text, "teacher tokenizer")
        if max_student_tokens is not None:  # a cut can re-tokenise into one more token at the very end
            s_ids, s_offsets = s_ids[:max_student_tokens], s_offsets[:max_student_tokens]
        spans = []
        s_pieces, t_pieces = [student_bytes[i] for i in s_ids], [teacher_bytes[i] for i in t_ids]
        for s_start, s_end, t_start, t_end in align_token_offsets(
            [tuple(o) for o in s_offsets], [tuple(o) for o in t_offsets]
        ):
            for piece in _split_at_common_bytes(s_start, s_end, t_start, t_end, s_pieces, t_pieces):
                p_s_start, p_s_end, p_t_start, p_t_end = piece
                matched = (
                    p_s_end - p_s_start == 1
                    and p_t_end - p_t_start == 1
                    and student_bytes[s_ids[p_s_start]] is not None
                    and student_bytes[s_ids[p_s_start]] == teacher_bytes[t_ids[p_t_start]]
                )
                spans.append(AlignedSpan(p_s_start, p_s_end, p_t_start, p_t_end, matched))
        results.append(TextAlignment(text, list(s_ids), list(t_ids), spans))
    return results


def _split_at_common_bytes(
    s_start: int, s_end: int, t_start: int, t_end: int, s_pieces: list, t_pieces: list
) -> list[tuple[int, int, int, int]]:
    """Split a multi-token span further where both sides' token bytes end at the same byte.

    Character offsets cannot cut inside a character that byte-level BPE split into several byte tokens; when both
    sides' tokens spell the same bytes, their cumulative byte lengths can (e.g. an emoji written as the same three
    byte tokens by both tokenizers gives three matched spans). Spans whose sides do not spell the same bytes (e.g.
    a normaliser changed the text) stay whole.
    """
    student = s_pieces[s_start:s_end]
    teacher = t_pieces[t_start:t_end]
    if (s_end - s_start == 1 and t_end - t_start == 1) or None in student or None in teacher:
        return [(s_start, s_end, t_start, t_end)]
    if b"".join(student) != b"".join(teacher):
        return [(s_start, s_end, t_start, t_end)]
    student_cuts, teacher_cuts, length = {}, {}, 0
    for index, piece in enumerate(student):
        length += len(piece)
        student_cuts[length] = s_start + index
    length = 0
    for index, piece in enumerate(teacher):
        length += len(piece)
        teacher_cuts[length] = t_start + index
    pieces = []
    for cut in sorted(set(student_cuts) & set(teacher_cuts)):
        s_next, t_next = student_cuts[cut] + 1, teacher_cuts[cut] + 1
        pieces.append((s_start, s_next, t_start, t_next))
        s_start, t_start = s_next, t_next
    return pieces


@dataclass
class SpanAlignmentIndex:
    """Flat indices into `(batch * length)`-flattened logits that say which rows each aligned span uses.

    Built by :func:`build_span_alignment_index`. For a matched span, one student row and one teacher row (the
    positions predicting the span's single token). For an unmatched span, a *base* row per side (predicting the
    span's first token) plus, per side, `(row, token, span)` triples for the span's later tokens, whose
    conditional probabilities multiply the base distribution (GOLD's merged probabilities).
    """

    matched_student_rows: torch.Tensor
    matched_teacher_rows: torch.Tensor
    unmatched_student_rows: torch.Tensor
    unmatched_teacher_rows: torch.Tensor
    student_continuation_rows: torch.Tensor
    student_continuation_tokens: torch.Tensor
    student_continuation_spans: torch.Tensor
    teacher_continuation_rows: torch.Tensor
    teacher_continuation_tokens: torch.Tensor
    teacher_continuation_spans: torch.Tensor

    FIELDS = (
        "matched_student_rows",
        "matched_teacher_rows",
        "unmatched_student_rows",
        "unmatched_teacher_rows",
        "student_continuation_rows",
        "student_continuation_tokens",
        "student_continuation_spans",
        "teacher_continuation_rows",
        "teacher_continuation_tokens",
        "teacher_continuation_spans",
    )

    @property
    def num_matched(self) -> int:
        return int(self.matched_student_rows.numel())

    @property
    def num_unmatched(self) -> int:
        return int(self.unmatched_student_rows.numel())

    def to_batch(self, prefix: str = "alignment_") -> dict[str, torch.Tensor]:
        return {prefix + name: getattr(self, name) for name in self.FIELDS}

    @classmethod
    def from_batch(cls, batch: dict[str, Any], prefix: str = "alignment_", pop: bool = False) -> SpanAlignmentIndex:
        get = batch.pop if pop else batch.__getitem__
        return cls(**{name: get(prefix + name) for name in cls.FIELDS})


def build_span_alignment_index(
    alignments: list[TextAlignment],
    student_length: int,
    teacher_length: int,
    *,
    student_offset: int = 0,
    teacher_offset: int = 0,
) -> SpanAlignmentIndex:
    """Turn per-text alignments into flat row indices for logits of shape `(batch, length, V)`.

    Token `k` of text `b` sits at position `k + offset` of row `b` of the model input (`offset` is 1 when a start
    token is prepended); the logits predicting it are at position `k + offset - 1`. Spans whose first token has no
    predicting position (the text's first token without a start token) are skipped.
    """
    lists: dict[str, list[int]] = {name: [] for name in SpanAlignmentIndex.FIELDS}
    for batch_index, alignment in enumerate(alignments):
        student_base = batch_index * student_length + student_offset - 1
        teacher_base = batch_index * teacher_length + teacher_offset - 1
        for span in alignment.spans:
            if student_offset + span.student_start < 1 or teacher_offset + span.teacher_start < 1:
                continue
            if span.matched:
                lists["matched_student_rows"].append(student_base + span.student_start)
                lists["matched_teacher_rows"].append(teacher_base + span.teacher_start)
                continue
            span_index = len(lists["unmatched_student_rows"])
            lists["unmatched_student_rows"].append(student_base + span.student_start)
            lists["unmatched_teacher_rows"].append(teacher_base + span.teacher_start)
            for k in range(span.student_start + 1, span.student_end):
                lists["student_continuation_rows"].append(student_base + k)
                lists["student_continuation_tokens"].append(alignment.student_ids[k])
                lists["student_continuation_spans"].append(span_index)
            for k in range(span.teacher_start + 1, span.teacher_end):
                lists["teacher_continuation_rows"].append(teacher_base + k)
                lists["teacher_continuation_tokens"].append(alignment.teacher_ids[k])
                lists["teacher_continuation_spans"].append(span_index)
    return SpanAlignmentIndex(**{name: torch.tensor(values, dtype=torch.long) for name, values in lists.items()})


def split_texts_into_chunks(
    dataset: Any, tokenizer: PreTrainedTokenizerBase, max_tokens: int, text_column: str = "text"
) -> Any:
    """Cut every document of `dataset` into pieces of at most `max_tokens` tokens of `tokenizer`, at token edges.

    Long documents would otherwise be truncated by the collator and most of their text never seen. Returns a
    `datasets.Dataset` with one column, `text_column`; pieces are cut at character offsets of the tokens, so
    re-tokenising a piece gives (almost always exactly) `max_tokens` tokens or fewer.
    """
    from datasets import Dataset

    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} must be >= 1.")
    check_offsets_support(tokenizer, "tokenizer")
    pieces: list[str] = []
    texts = list(dataset[text_column])
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    for text, offsets in zip(texts, encoded["offset_mapping"], strict=True):
        start_char = 0
        for start in range(0, len(offsets), max_tokens):
            end_char = offsets[min(start + max_tokens, len(offsets)) - 1][1]
            if start + max_tokens >= len(offsets):
                end_char = len(text)
            piece = text[start_char:end_char]
            if piece.strip():
                pieces.append(piece)
            start_char = end_char
    return Dataset.from_dict({text_column: pieces})
