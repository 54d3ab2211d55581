"""Knowledge distillation between models whose tokenizers differ.

A teacher and a student with different vocabularies cannot compare next-token distributions position by position:
their sequences have different lengths and their vocabularies index different strings. This module makes them
comparable, in three layers:

1. **Alignment** (:func:`align_texts`, :func:`align_token_offsets`): each text is tokenised by both tokenizers;
   the character offsets of the tokens say where each token ends. A *boundary* is a character position where a
   tokenizer starts a new token cleanly (not inside a UTF-8 character that byte-level BPE split into several
   tokens). Positions that are boundaries for both tokenizers cut the text into aligned *spans*. A span that is
   one token on both sides, with the same byte string, is *matched*; every other span is *unmatched*.
2. **Losses** (pure functions on tensors): on matched spans the two next-token distributions are compared
   exactly over the *matched vocabulary* (tokens whose byte strings exist in both vocabularies,
   :func:`build_vocabulary_mapping`); on unmatched spans by the ULD distance (:func:`uld_distance`, Boizard et
   al., https://huggingface.co/papers/2402.12030), which needs no shared vocabulary. A multi-token span's
   distribution is merged as in TRL's GOLD trainer: the distribution at the span's first position, times the
   product of the conditional probabilities of the span's later (actual) tokens. That vector is unnormalised;
   its entry for the actual first token is the probability of the whole span, and since the product scales every
   entry alike it does not change the sorting ULD relies on.
3. **Training** (:class:`CrossTokenizerDistillationCollator`, :func:`cross_tokenizer_distillation_loss`, and
   `CrossTokenizerDistillationTrainer`): the collator tokenises raw text with both tokenizers and turns the
   alignment into flat index tensors; the loss gathers the needed rows of both models' logits.

It also ships :func:`load_gpt2_tokenizer`, the real 50,257-token GPT-2 tokenizer rebuilt from the
`gpt2.tiktoken` file that the `openai-whisper` package carries, so a real second vocabulary is available offline.
"""

from __future__ import annotations

import importlib.util
import json
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .distillation_config import DistillationConfig
from .distillation_trainer import DistillationTrainer
from .logging_utils import get_logger
from .utils import atomic_directory, hf_interop_cache_dir

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

logger = get_logger(__name__)

# --------------------------------------------------------------------------------------------------------------
# The real GPT-2 tokenizer, offline
# --------------------------------------------------------------------------------------------------------------

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

    @property
    def num_matched(self) -> int:
        return int(self.student_ids.numel())

    def unmatched_masks(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean masks `(student (V_s,), teacher (V_t,))`, `True` on ids outside the matched vocabulary."""
        import torch

        key = str(device)
        if key not in self._masks:
            student_mask = torch.ones(self.student_vocab_size, dtype=torch.bool, device=device)
            teacher_mask = torch.ones(self.teacher_vocab_size, dtype=torch.bool, device=device)
            student_mask[self.student_ids.to(device)] = False
            teacher_mask[self.teacher_ids.to(device)] = False
            self._masks[key] = (student_mask, teacher_mask)
        return self._masks[key]


def build_vocabulary_mapping(
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase,
    *,
    student_vocab_size: int | None = None,
    teacher_vocab_size: int | None = None,
    max_vocab_union_size: int = DEFAULT_MAX_VOCAB_UNION_SIZE,
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
    """
    import torch

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
    return VocabularyMapping(student_ids, teacher_ids, student_vocab_size, teacher_vocab_size, union_size)


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


# --------------------------------------------------------------------------------------------------------------
# Losses (pure functions)
# --------------------------------------------------------------------------------------------------------------

MATCHED_LOSS_TYPES = ("forward_kl", "reverse_kl", "jsd")
#: `"uld"` compares every span (matched ones too) by the ULD distance, as the original ULD paper does.
SPAN_LOSS_TYPES = (*MATCHED_LOSS_TYPES, "uld")
#: Default weights of the hybrid loss: every aligned span counts once, with its own distance (an exact divergence
#: on matched spans, the ULD distance on unmatched ones). Both are at most a few nats/units per span, so equal
#: weights keep either part from drowning the other; lower `unmatched_weight` to trust the (approximate) ULD less.
DEFAULT_MATCHED_WEIGHT = 1.0
DEFAULT_UNMATCHED_WEIGHT = 1.0


def uld_distance(student_probs: torch.Tensor, teacher_probs: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
    """Universal Logit Distillation distance between probability vectors over different vocabularies.

    The closed form of ULD's Wasserstein-1 distance (https://huggingface.co/papers/2402.12030): sort both vectors
    in descending order, zero-pad the shorter one to the longer's length, and sum the absolute differences. The
    vectors need not be normalised (merged multi-token spans are not).

    Args:
        student_probs (`torch.Tensor` of shape `(..., V_s)`): student probabilities.
        teacher_probs (`torch.Tensor` of shape `(..., V_t)`): teacher probabilities (no gradient needed).
        top_k (`int`, *optional*):
            Compare only the `top_k` largest entries of each side exactly and the remaining mass as one number
            (`|tail_s - tail_t|`, a lower bound of the exact tail term). Faster on large vocabularies; `None`
            (default) is exact.

    Returns:
        `torch.Tensor` of shape `(...,)`.
    """
    student_probs = _upcast(student_probs)
    teacher_probs = _upcast(teacher_probs)
    if top_k is not None and top_k < min(student_probs.size(-1), teacher_probs.size(-1)):
        student_top = student_probs.topk(top_k, dim=-1).values
        teacher_top = teacher_probs.topk(top_k, dim=-1).values
        tail = (student_probs.sum(-1) - student_top.sum(-1)) - (teacher_probs.sum(-1) - teacher_top.sum(-1))
        return (student_top - teacher_top).abs().sum(-1) + tail.abs()
    student_sorted = student_probs.sort(dim=-1, descending=True).values
    teacher_sorted = teacher_probs.sort(dim=-1, descending=True).values
    shared = min(student_sorted.size(-1), teacher_sorted.size(-1))
    distance = (student_sorted[..., :shared] - teacher_sorted[..., :shared]).abs().sum(-1)
    # Beyond the shorter vocabulary the other side is compared with zero padding: |x - 0| = x (x >= 0).
    return distance + student_sorted[..., shared:].sum(-1) + teacher_sorted[..., shared:].sum(-1)


def uld_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None
) -> torch.Tensor:
    """ULD distance between `softmax(student_logits / T)` and `softmax(teacher_logits / T)`, per row.

    Args:
        student_logits (`torch.Tensor` of shape `(..., V_s)`): student logits.
        teacher_logits (`torch.Tensor` of shape `(..., V_t)`): teacher logits (detached by the caller or not;
            no gradient flows to them here only if they do not require one).
        temperature (`float`, *optional*, defaults to 1.0): softmax temperature T of both models.
        top_k (`int`, *optional*): see :func:`uld_distance`.

    Returns:
        `torch.Tensor` of shape `(...,)`.
    """
    _check_temperature(temperature)
    student_probs = (_upcast(student_logits) / temperature).softmax(-1)
    teacher_probs = (_upcast(teacher_logits) / temperature).softmax(-1)
    return uld_distance(student_probs, teacher_probs, top_k=top_k)


def _upcast(tensor: torch.Tensor) -> torch.Tensor:
    """float32 for the math (bfloat16/float16 inputs are upcast); float64 stays float64 (reference tests)."""
    import torch

    return tensor if tensor.dtype == torch.float64 else tensor.float()


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; 1.0 leaves the distributions unchanged.")


def _kl_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, with 0 * log 0 = 0 and no NaN gradients where p is 0."""
    import torch

    p = log_p.exp()
    support = p > 0
    log_p = torch.where(support, log_p, torch.zeros_like(log_p))
    log_q = torch.where(support, log_q, torch.zeros_like(log_q))
    return (p * (log_p - log_q)).sum(-1)


def _matched_bucket_log_probs(
    log_probs: torch.Tensor, matched_ids: torch.Tensor, unmatched_mask: torch.Tensor, with_rest: bool
) -> torch.Tensor:
    import torch

    matched = log_probs.index_select(-1, matched_ids)
    if not with_rest:  # renormalise over the matched vocabulary
        return matched - matched.logsumexp(-1, keepdim=True)
    rest = log_probs.masked_fill(~unmatched_mask, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.cat([matched, rest], dim=-1)


def matched_vocabulary_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mapping: VocabularyMapping,
    *,
    loss_type: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    scale_by_temperature_squared: bool | None = None,
) -> torch.Tensor:
    """Exact divergence between two next-token distributions over the matched vocabulary, per row.

    Each distribution (at temperature T) is reduced to the matched vocabulary (`mapping`, in the same order on
    both sides) plus one *rest* bucket holding its probability of every unmatched token, and the divergence is
    taken between these two distributions. When one side has no unmatched column (its vocabulary lies inside the
    other's), the rest bucket is dropped and both sides are renormalised over the matched vocabulary. With two
    identical tokenizers every token is matched and this is exactly the same-tokenizer divergence.

    Args:
        student_logits (`torch.Tensor` of shape `(N, V_s)`): student logits.
        teacher_logits (`torch.Tensor` of shape `(N, V_t)`): teacher logits.
        mapping (`VocabularyMapping`): from :func:`build_vocabulary_mapping`.
        loss_type (`str`, *optional*, defaults to `"forward_kl"`):
            `"forward_kl"` = KL(teacher || student), `"reverse_kl"` = KL(student || teacher), `"jsd"` = generalized
            Jensen-Shannon with `jsd_beta` (0 is exactly forward KL, 1 exactly reverse KL).
        temperature (`float`, *optional*, defaults to 1.0): divides both models' logits.
        jsd_beta (`float`, *optional*, defaults to 0.5): interpolation of `"jsd"`.
        scale_by_temperature_squared (`bool`, *optional*):
            Multiply by T^2 (Hinton et al.) so gradients keep their scale; defaults to `True` for `"forward_kl"`
            and `False` otherwise.

    Returns:
        `torch.Tensor` of shape `(N,)`.
    """
    import math

    import torch

    if loss_type not in MATCHED_LOSS_TYPES:
        raise ValueError(
            f"loss_type={loss_type!r} is not supported on matched tokens; use one of {MATCHED_LOSS_TYPES}."
        )
    if not 0.0 <= jsd_beta <= 1.0:
        raise ValueError(f"jsd_beta must be in [0, 1], got {jsd_beta}.")
    _check_temperature(temperature)
    if student_logits.size(-1) != mapping.student_vocab_size or teacher_logits.size(-1) != mapping.teacher_vocab_size:
        raise ValueError(
            f"logits widths (student {student_logits.size(-1)}, teacher {teacher_logits.size(-1)}) do not match the "
            f"vocabulary mapping (student {mapping.student_vocab_size}, teacher {mapping.teacher_vocab_size}); build "
            "it with build_vocabulary_mapping(..., student_vocab_size=..., teacher_vocab_size=...) from the models' "
            "config.vocab_size."
        )
    if mapping.num_matched == 0:
        raise ValueError("the two vocabularies share no token string, so no position can be matched; use ULD only.")
    device = student_logits.device
    student_unmatched, teacher_unmatched = mapping.unmatched_masks(device)
    with_rest = bool(student_unmatched.any()) and bool(teacher_unmatched.any())
    student_log_probs = torch.log_softmax(_upcast(student_logits) / temperature, dim=-1)
    teacher_log_probs = torch.log_softmax(_upcast(teacher_logits) / temperature, dim=-1)
    log_s = _matched_bucket_log_probs(student_log_probs, mapping.student_ids.to(device), student_unmatched, with_rest)
    log_t = _matched_bucket_log_probs(teacher_log_probs, mapping.teacher_ids.to(device), teacher_unmatched, with_rest)
    if loss_type == "forward_kl" or (loss_type == "jsd" and jsd_beta == 0.0):
        divergence = _kl_from_log_probs(log_t, log_s)
    elif loss_type == "reverse_kl" or (loss_type == "jsd" and jsd_beta == 1.0):
        divergence = _kl_from_log_probs(log_s, log_t)
    else:
        log_mixture = torch.logaddexp(log_t + math.log(jsd_beta), log_s + math.log(1.0 - jsd_beta))
        divergence = jsd_beta * _kl_from_log_probs(log_t, log_mixture) + (1.0 - jsd_beta) * _kl_from_log_probs(
            log_s, log_mixture
        )
    if scale_by_temperature_squared is None:
        scale_by_temperature_squared = loss_type == "forward_kl"
    if scale_by_temperature_squared:
        divergence = divergence * temperature**2
    return divergence


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
    import torch

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


@dataclass
class CrossTokenizerLossOutput:
    """Result of :func:`span_aligned_distillation_loss`.

    Attributes:
        loss (`torch.Tensor`): `(matched_weight * sum(matched) + unmatched_weight * sum(unmatched)) / normalizer`.
        matched_loss (`torch.Tensor`): mean divergence over matched spans (detached; 0 when there are none).
        unmatched_loss (`torch.Tensor`): mean ULD distance over unmatched spans (detached; 0 when there are none).
        num_matched (`int`): matched spans in the batch.
        num_unmatched (`int`): unmatched spans in the batch.
    """

    loss: torch.Tensor
    matched_loss: torch.Tensor
    unmatched_loss: torch.Tensor
    num_matched: int
    num_unmatched: int

    @property
    def matched_fraction(self) -> float:
        total = self.num_matched + self.num_unmatched
        return self.num_matched / total if total else 0.0


def _merged_span_probs(
    flat_logits: torch.Tensor,
    base_rows: torch.Tensor,
    continuation_rows: torch.Tensor,
    continuation_tokens: torch.Tensor,
    continuation_spans: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Base distribution of each span times the product of its later tokens' conditional probabilities."""
    import torch

    base = (_upcast(flat_logits[base_rows]) / temperature).softmax(-1)
    if continuation_rows.numel() == 0:
        return base
    rows = _upcast(flat_logits[continuation_rows]) / temperature
    token_log_probs = rows.gather(-1, continuation_tokens[:, None]).squeeze(-1) - rows.logsumexp(-1)
    log_scale = torch.zeros(base.size(0), dtype=base.dtype, device=base.device)
    log_scale = log_scale.index_add(0, continuation_spans, token_log_probs)
    return base * log_scale.exp()[:, None]


def span_aligned_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    index: SpanAlignmentIndex,
    mapping: VocabularyMapping | None,
    *,
    loss_type: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    scale_by_temperature_squared: bool | None = None,
    matched_weight: float = DEFAULT_MATCHED_WEIGHT,
    unmatched_weight: float = DEFAULT_UNMATCHED_WEIGHT,
    uld_top_k: int | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> CrossTokenizerLossOutput:
    """Hybrid cross-tokenizer distillation loss on aligned spans.

    Matched spans: :func:`matched_vocabulary_divergence` (`loss_type`) between the two rows predicting the span's
    token (with `loss_type="uld"`: the ULD distance there too). Unmatched spans: :func:`uld_distance` between the merged span distributions (see the module docstring).
    Loss `= (matched_weight * sum over matched spans + unmatched_weight * sum over unmatched spans) / normalizer`,
    where the normalizer is `num_items_in_batch` (spans in the whole accumulated batch) if given, else the
    number of spans here.

    Args:
        student_logits (`torch.Tensor` of shape `(B, S, V_s)`): student logits over its input.
        teacher_logits (`torch.Tensor` of shape `(B, T, V_t)`): teacher logits (no gradient).
        index (`SpanAlignmentIndex`): from :func:`build_span_alignment_index` (the collator builds it).
        mapping (`VocabularyMapping`, *optional*): needed when there are matched spans.
        loss_type, temperature, jsd_beta, scale_by_temperature_squared: see :func:`matched_vocabulary_divergence`.
        matched_weight (`float`, *optional*, defaults to 1.0): weight of the matched part.
        unmatched_weight (`float`, *optional*, defaults to 1.0): weight of the ULD part.
        uld_top_k (`int`, *optional*): see :func:`uld_distance` (`None`: exact).
        num_items_in_batch (`int` or `torch.Tensor`, *optional*): global normalizer.
    """
    import torch

    _check_temperature(temperature)
    if loss_type not in SPAN_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not supported here; use one of {SPAN_LOSS_TYPES}.")
    for name, value in (("matched_weight", matched_weight), ("unmatched_weight", unmatched_weight)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}.")
    student_flat = student_logits.reshape(-1, student_logits.size(-1))
    teacher_flat = teacher_logits.detach().reshape(-1, teacher_logits.size(-1))
    device = student_flat.device
    index = SpanAlignmentIndex(**{name: getattr(index, name).to(device) for name in SpanAlignmentIndex.FIELDS})
    zero = student_flat.sum() * 0.0  # keeps the graph connected (and the loss finite) when a part is empty
    matched_sum = unmatched_sum = zero
    if index.num_matched and loss_type == "uld":  # plain ULD: matched spans are compared by ULD too
        matched_sum = uld_loss(
            student_flat[index.matched_student_rows],
            teacher_flat[index.matched_teacher_rows],
            temperature=temperature,
            top_k=uld_top_k,
        ).sum()
    elif index.num_matched:
        if mapping is None:
            raise ValueError("the batch has matched spans but mapping is None; pass build_vocabulary_mapping(...).")
        matched_sum = matched_vocabulary_divergence(
            student_flat[index.matched_student_rows],
            teacher_flat[index.matched_teacher_rows],
            mapping,
            loss_type=loss_type,
            temperature=temperature,
            jsd_beta=jsd_beta,
            scale_by_temperature_squared=scale_by_temperature_squared,
        ).sum()
    if index.num_unmatched:
        student_merged = _merged_span_probs(
            student_flat,
            index.unmatched_student_rows,
            index.student_continuation_rows,
            index.student_continuation_tokens,
            index.student_continuation_spans,
            temperature,
        )
        with torch.no_grad():
            teacher_merged = _merged_span_probs(
                teacher_flat,
                index.unmatched_teacher_rows,
                index.teacher_continuation_rows,
                index.teacher_continuation_tokens,
                index.teacher_continuation_spans,
                temperature,
            )
        unmatched_sum = uld_distance(student_merged, teacher_merged, top_k=uld_top_k).sum()
    num_spans = index.num_matched + index.num_unmatched
    normalizer = num_items_in_batch if num_items_in_batch is not None else max(num_spans, 1)
    if isinstance(normalizer, torch.Tensor):
        normalizer = normalizer.to(device)
    loss = (matched_weight * matched_sum + unmatched_weight * unmatched_sum) / normalizer
    return CrossTokenizerLossOutput(
        loss=loss,
        matched_loss=matched_sum.detach() / max(index.num_matched, 1),
        unmatched_loss=unmatched_sum.detach() / max(index.num_unmatched, 1),
        num_matched=index.num_matched,
        num_unmatched=index.num_unmatched,
    )


@dataclass
class CrossTokenizerDistillationOutput:
    """Result of :func:`cross_tokenizer_distillation_loss`.

    Attributes:
        loss (`torch.Tensor`): `kd_ratio * kd_loss + (1 - kd_ratio) * ce_loss` (what the trainer backpropagates).
        kd_loss (`torch.Tensor`): weighted sum over aligned spans of the hybrid loss / normaliser.
        ce_loss (`torch.Tensor`): the student's cross-entropy on its own labels / normaliser.
        spans (`CrossTokenizerLossOutput`): the matched / unmatched breakdown.
        num_valid_tokens (`int`): student target tokens in this batch.
    """

    loss: torch.Tensor
    kd_loss: torch.Tensor
    ce_loss: torch.Tensor
    spans: CrossTokenizerLossOutput
    num_valid_tokens: int


def cross_tokenizer_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    index: SpanAlignmentIndex,
    mapping: VocabularyMapping | None,
    *,
    kd_ratio: float = 0.5,
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
    **span_loss_kwargs: Any,
) -> CrossTokenizerDistillationOutput:
    """Cross-entropy of the student on its own labels plus the span-aligned distillation loss.

    Both sums are divided by the same normaliser: `num_items_in_batch` (the student's valid target tokens over the
    whole accumulated batch, which `transformers.Trainer` counts) or, without it, this batch's valid target
    tokens. Normalising the span sum by tokens (not spans) keeps the result independent of how a batch is split
    into accumulation steps or processes; each span covers at least one student token, so the scale is at most
    the per-span mean.

    Args:
        student_logits (`torch.Tensor` of shape `(B, S, V_s)`): student logits over its full input.
        teacher_logits (`torch.Tensor` of shape `(B, T, V_t)`): teacher logits over its full input (no gradient).
        labels (`torch.LongTensor` of shape `(B, S)`): the student's labels, NOT shifted (position i predicts
            `labels[:, i + 1]`), -100 where ignored.
        index, mapping: see :func:`span_aligned_distillation_loss`.
        kd_ratio (`float`, *optional*, defaults to 0.5): weight of distillation against cross-entropy, in [0, 1].
        ignore_index (`int`, *optional*, defaults to -100): label value left out.
        num_items_in_batch (`int` or `torch.Tensor`, *optional*): global normaliser.
        **span_loss_kwargs: `loss_type`, `temperature`, `jsd_beta`, `matched_weight`, `unmatched_weight`,
            `uld_top_k`, `scale_by_temperature_squared` of :func:`span_aligned_distillation_loss`.
    """
    import torch

    if not 0.0 <= kd_ratio <= 1.0:
        raise ValueError(f"kd_ratio={kd_ratio} is outside [0, 1]; 1.0 is pure distillation, 0.0 plain training.")
    shift_logits = student_logits[:, :-1]
    shift_labels = labels[:, 1:].to(shift_logits.device)
    num_valid_tokens = int((shift_labels != ignore_index).sum())
    normalizer = num_items_in_batch if num_items_in_batch is not None else max(num_valid_tokens, 1)
    if isinstance(normalizer, torch.Tensor):
        normalizer = normalizer.to(shift_logits.device)
    ce_sum = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)).float(),
        shift_labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="sum",
    )
    ce_loss = ce_sum / normalizer
    spans = span_aligned_distillation_loss(
        student_logits, teacher_logits, index, mapping, num_items_in_batch=normalizer, **span_loss_kwargs
    )
    loss = kd_ratio * spans.loss + (1.0 - kd_ratio) * ce_loss
    return CrossTokenizerDistillationOutput(loss, spans.loss, ce_loss, spans, num_valid_tokens)


# --------------------------------------------------------------------------------------------------------------
# Data: raw text in, both tokenisations and the alignment index out
# --------------------------------------------------------------------------------------------------------------


def _start_token_id(tokenizer: PreTrainedTokenizerBase, token: str | None, argument: str) -> int | None:
    if token is None:
        return None
    if token == "auto":
        token = tokenizer.bos_token or tokenizer.eos_token
        if token is None:
            return None
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ValueError(
            f"{argument}={token!r} is not a token of {type(tokenizer).__name__}; pass one of its special tokens "
            f"(e.g. {tokenizer.eos_token!r}), 'auto' (BOS, else EOS) or None (no start token)."
        )
    return int(token_id)


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


class CrossTokenizerDistillationCollator:
    """Tokenise raw text with both tokenizers, align it, and build the tensors of one training batch.

    Each row's text is cut to `max_length` student tokens (the teacher sees the same characters). A start token
    is put before each side's tokens, so the first span has a position that predicts it.

    Args:
        student_tokenizer (`PreTrainedTokenizerBase`): the student's (fast) tokenizer.
        teacher_tokenizer (`PreTrainedTokenizerBase`): the teacher's (fast) tokenizer.
        max_length (`int`, *optional*, defaults to 256): student tokens per row, start token included.
        alignment (`str`, *optional*, defaults to `"spans"`): see :func:`align_texts`.
        text_column (`str`, *optional*, defaults to `"text"`): the column holding the raw text.
        student_start_token, teacher_start_token (`str`, *optional*, defaults to `"auto"`):
            Token put before the text on each side: `"auto"` is the tokenizer's BOS, else its EOS; `None` for none
            (then each text's first span is not distilled).

    Returns (on call):
        `dict` with `input_ids`, `attention_mask`, `labels` (student; -100 on padding and the start token),
        `teacher_input_ids`, `teacher_attention_mask`, and the `alignment_*` index tensors of
        :class:`SpanAlignmentIndex`.
    """

    def __init__(
        self,
        student_tokenizer: PreTrainedTokenizerBase,
        teacher_tokenizer: PreTrainedTokenizerBase | None,
        *,
        max_length: int = 256,
        alignment: str = "spans",
        text_column: str = "text",
        student_start_token: str | None = "auto",
        teacher_start_token: str | None = "auto",
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length={max_length} must be >= 2 (a start token and one text token).")
        if alignment not in ALIGNMENT_MODES:
            raise ValueError(f"alignment={alignment!r} is not supported; use one of {ALIGNMENT_MODES}.")
        self.max_length = max_length
        self.alignment = alignment
        self.text_column = text_column
        self.student_start_token = student_start_token
        self.teacher_start_token = teacher_start_token
        self.student_tokenizer = student_tokenizer
        self.student_start_id = _start_token_id(student_tokenizer, student_start_token, "student_start_token")
        self.teacher_tokenizer = None
        if teacher_tokenizer is not None:
            self.set_teacher_tokenizer(teacher_tokenizer)
        if alignment == "spans":
            check_offsets_support(student_tokenizer, "student_tokenizer")

    def set_teacher_tokenizer(self, teacher_tokenizer: PreTrainedTokenizerBase) -> None:
        if self.alignment == "spans":
            check_offsets_support(teacher_tokenizer, "teacher_tokenizer")
        self.teacher_tokenizer = teacher_tokenizer
        self.teacher_start_id = _start_token_id(teacher_tokenizer, self.teacher_start_token, "teacher_start_token")

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        if self.teacher_tokenizer is None:
            raise ValueError("the collator has no teacher tokenizer; pass teacher_tokenizer=... when building it.")
        if any(self.text_column not in feature for feature in features):
            raise ValueError(
                f"rows must hold the raw text in column {self.text_column!r} (got keys {sorted(features[0])}); "
                "cross-tokenizer distillation tokenises text itself, so pass the untokenised dataset."
            )
        texts = [feature[self.text_column] for feature in features]
        student_offset = int(self.student_start_id is not None)
        teacher_offset = int(self.teacher_start_id is not None)
        alignments = align_texts(
            texts,
            self.student_tokenizer,
            self.teacher_tokenizer,
            max_student_tokens=self.max_length - student_offset,
            alignment=self.alignment,
        )
        student_rows = [[self.student_start_id] * student_offset + a.student_ids for a in alignments]
        teacher_rows = [[self.teacher_start_id] * teacher_offset + a.teacher_ids for a in alignments]
        student_length = max(len(row) for row in student_rows)
        teacher_length = max(len(row) for row in teacher_rows)

        def pad(rows: list[list[int]], length: int, value: int) -> tuple[torch.Tensor, torch.Tensor]:
            ids = torch.full((len(rows), length), value, dtype=torch.long)
            mask = torch.zeros((len(rows), length), dtype=torch.long)
            for row_index, row in enumerate(rows):
                ids[row_index, : len(row)] = torch.tensor(row, dtype=torch.long)
                mask[row_index, : len(row)] = 1
            return ids, mask

        input_ids, attention_mask = pad(student_rows, student_length, _pad_id(self.student_tokenizer))
        teacher_input_ids, teacher_attention_mask = pad(teacher_rows, teacher_length, _pad_id(self.teacher_tokenizer))
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        if student_offset:
            labels[:, 0] = -100
        index = build_span_alignment_index(
            alignments, student_length, teacher_length, student_offset=student_offset, teacher_offset=teacher_offset
        )
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "teacher_input_ids": teacher_input_ids,
            "teacher_attention_mask": teacher_attention_mask,
            **index.to_batch(),
        }


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


# --------------------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------------------

#: `loss_type` values of :class:`CrossTokenizerDistillationConfig`: the hybrid loss with forward KL / reverse KL /
#: JSD on matched spans, `"gold"` (the hybrid loss with JSD on matched spans, as TRL's GOLD) and `"uld"` (ULD on
#: every span).
CROSS_TOKENIZER_LOSS_TYPES = ("forward_kl", "reverse_kl", "jsd", "gold", "uld")


@dataclass
class CrossTokenizerDistillationConfig(DistillationConfig):
    r"""
    Configuration of [`CrossTokenizerDistillationTrainer`]: a [`DistillationConfig`] plus the settings of
    distillation between models with different tokenizers.

    Args:
        loss_type (`str`, *optional*, defaults to `"forward_kl"`):
            `"forward_kl"`, `"reverse_kl"` or `"jsd"`: the divergence on matched spans, with ULD on unmatched spans
            (the hybrid loss). `"gold"`: the same with `"jsd"` on matched spans (TRL's GOLD). `"uld"`: ULD on every
            span (Boizard et al., https://huggingface.co/papers/2402.12030).
        matched_weight (`float`, *optional*, defaults to `1.0`):
            Weight (>= 0) of the matched spans' divergence.
        unmatched_weight (`float`, *optional*, defaults to `1.0`):
            Weight (>= 0) of the unmatched spans' ULD distance. Equal weights make every aligned span count once.
        uld_top_k (`int`, *optional*):
            Compare only the `uld_top_k` largest probabilities exactly in ULD (the rest as one mass); faster on
            large vocabularies. `None` (default): exact.
        alignment (`str`, *optional*, defaults to `"spans"`):
            `"spans"` (character-offset alignment, fast tokenizers) or `"positions"` (position i with position i,
            ULD everywhere: the fallback for tokenizers without offset mapping).
        max_length (`int`, *optional*, defaults to `256`):
            Student tokens per row (start token included); the teacher sees the same characters.
        text_column (`str`, *optional*, defaults to `"text"`): the dataset column holding raw text.
        student_start_token (`str`, *optional*, defaults to `"auto"`):
            Token put before each row's student tokens (`"auto"`: BOS, else EOS; empty string: none).
        teacher_start_token (`str`, *optional*, defaults to `"auto"`): the same for the teacher.
        max_vocab_union_size (`int`, *optional*, defaults to `1048576`):
            Refuse vocabulary pairs whose union is larger (memory; see `DEFAULT_MAX_VOCAB_UNION_SIZE`).
    """

    loss_type: str = field(
        default="forward_kl",
        metadata={
            "help": "forward_kl / reverse_kl / jsd on matched spans + ULD on unmatched spans; gold (= jsd hybrid); "
            "uld (ULD everywhere).",
            "choices": list(CROSS_TOKENIZER_LOSS_TYPES),
        },
    )
    matched_weight: float = field(
        default=DEFAULT_MATCHED_WEIGHT, metadata={"help": "Weight (>= 0) of the divergence on matched spans."}
    )
    unmatched_weight: float = field(
        default=DEFAULT_UNMATCHED_WEIGHT, metadata={"help": "Weight (>= 0) of the ULD distance on unmatched spans."}
    )
    uld_top_k: int | None = field(
        default=None, metadata={"help": "Exact ULD over the top-k probabilities only (faster); None = exact."}
    )
    alignment: str = field(
        default="spans",
        metadata={
            "help": "spans (offset alignment) or positions (no alignment, ULD).",
            "choices": list(ALIGNMENT_MODES),
        },
    )
    max_length: int = field(default=256, metadata={"help": "Student tokens per row, start token included."})
    text_column: str = field(default="text", metadata={"help": "Dataset column holding the raw text."})
    student_start_token: str = field(
        default="auto", metadata={"help": "Token before each row's student tokens: auto (BOS, else EOS), '' = none."}
    )
    teacher_start_token: str = field(
        default="auto", metadata={"help": "Token before each row's teacher tokens: auto (BOS, else EOS), '' = none."}
    )
    allowed_loss_types: ClassVar[tuple[str, ...]] = CROSS_TOKENIZER_LOSS_TYPES

    max_vocab_union_size: int = field(
        default=DEFAULT_MAX_VOCAB_UNION_SIZE,
        metadata={"help": "Largest allowed union of the two vocabularies (memory cap)."},
    )

    def _check_distillation_fields(self) -> None:
        if self.loss_type not in CROSS_TOKENIZER_LOSS_TYPES:
            raise ValueError(
                f"loss_type={self.loss_type!r} is not available across tokenizers; use one of "
                f"{list(CROSS_TOKENIZER_LOSS_TYPES)}."
            )
        super()._check_distillation_fields()
        for name in ("matched_weight", "unmatched_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0; use 0.0 to turn that part off.")
        if self.uld_top_k is not None and self.uld_top_k < 1:
            raise ValueError(f"uld_top_k={self.uld_top_k} must be >= 1, or None for the exact ULD distance.")
        if self.alignment not in ALIGNMENT_MODES:
            raise ValueError(f"alignment={self.alignment!r} is not supported; use one of {list(ALIGNMENT_MODES)}.")
        if self.alignment == "positions" and self.loss_type != "uld":
            raise ValueError(
                f"alignment='positions' compares unaligned positions, which only the ULD distance can do; set "
                f"loss_type='uld' (got {self.loss_type!r}) or use alignment='spans'."
            )
        if self.max_length < 2:
            raise ValueError(f"max_length={self.max_length} must be >= 2.")
        if self.max_vocab_union_size < 1:
            raise ValueError(f"max_vocab_union_size={self.max_vocab_union_size} must be >= 1.")
        unsupported = {
            "teacher_logits_path": self.teacher_logits_path is not None,
            "hidden_loss_weight": self.hidden_loss_weight > 0,
            "lmbda": self.lmbda > 0,
            "seq_kd": self.seq_kd,
        }
        for name, is_set in unsupported.items():
            if is_set:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is not supported by cross-tokenizer distillation (the two "
                    f"models see differently tokenised sequences); leave {name} at its default."
                )

    @property
    def matched_loss_type(self) -> str:
        """The loss type handed to :func:`span_aligned_distillation_loss` (`"gold"` means JSD on matched spans)."""
        return "jsd" if self.loss_type == "gold" else self.loss_type

    def distillation_hyperparameters(self) -> dict[str, Any]:
        hyperparameters = super().distillation_hyperparameters()
        hyperparameters.update(
            cross_tokenizer=True,
            matched_weight=self.matched_weight,
            unmatched_weight=self.unmatched_weight,
            alignment=self.alignment,
            max_length=self.max_length,
        )
        if self.loss_type == "gold":
            hyperparameters["jsd_beta"] = self.jsd_beta
        return hyperparameters


class CrossTokenizerDistillationTrainer(DistillationTrainer):
    r"""
    Distil a teacher into a student whose tokenizer differs, from raw text.

    The data collator (:class:`CrossTokenizerDistillationCollator`) tokenises each row's text with both tokenizers
    and aligns the tokens; the loss is :func:`cross_tokenizer_distillation_loss`: `kd_ratio` times the hybrid
    span-aligned loss (exact divergence on matched spans, ULD on unmatched spans) plus `1 - kd_ratio` times the
    student's cross-entropy, both normalised by the student's target tokens of the accumulated batch. Everything
    else (teacher placement, optimizer, logging, saving, model cards) is [`DistillationTrainer`]'s.

    Args:
        model (`PreTrainedModel` or `str`): the student.
        teacher_model (`PreTrainedModel` or `str`, *optional*):
            The teacher; defaults to `args.teacher_model_name_or_path`.
        args ([`CrossTokenizerDistillationConfig`]): training and distillation settings.
        train_dataset, eval_dataset (`datasets.Dataset`, *optional*):
            Rows with raw text in `args.text_column` (see :func:`split_texts_into_chunks` for long documents).
        processing_class (`PreTrainedTokenizerBase`, *optional*): the student's tokenizer (required unless the
            student is given by name).
        teacher_processing_class (`PreTrainedTokenizerBase`, *optional*): the teacher's tokenizer (required unless
            it is saved next to the teacher's weights).
        **kwargs: passed to [`DistillationTrainer`] / `transformers.Trainer`.
    """

    def __init__(
        self,
        model: Any = None,
        teacher_model: Any = None,
        args: CrossTokenizerDistillationConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        teacher_processing_class: PreTrainedTokenizerBase | None = None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            args = CrossTokenizerDistillationConfig(output_dir="cross_tokenizer_distillation_output")
        if not isinstance(args, CrossTokenizerDistillationConfig):
            raise TypeError(
                f"args is a {type(args).__name__}; CrossTokenizerDistillationTrainer needs a "
                "CrossTokenizerDistillationConfig(output_dir=..., ...)."
            )
        if teacher_model is None and args.teacher_model_name_or_path is None:
            raise ValueError(
                "teacher_model is required: pass the teacher (a model or a name/path) or set "
                "args.teacher_model_name_or_path (self-distillation needs no cross-tokenizer trainer)."
            )
        if kwargs.get("data_collator") is not None:
            raise ValueError(
                "data_collator is built by CrossTokenizerDistillationTrainer (it tokenises and aligns raw text); "
                "leave it out and set max_length / text_column / *_start_token in the config."
            )
        if isinstance(model, (str, Path)) and processing_class is None:
            from .loading import load_tokenizer

            processing_class = load_tokenizer(model)
        if processing_class is None:
            raise ValueError(
                "processing_class (the student's tokenizer) is required for cross-tokenizer distillation."
            )
        for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            columns = getattr(dataset, "column_names", None)
            if isinstance(columns, list) and args.text_column not in columns:
                raise ValueError(
                    f"{name} has columns {columns} but no {args.text_column!r}; cross-tokenizer distillation needs "
                    "raw text (it tokenises with both tokenizers), so pass the untokenised dataset or set text_column."
                )
        self.vocabulary_mapping: VocabularyMapping | None = None
        self._span_counts = {"train": [0, 0], "eval": [0, 0]}
        collator = CrossTokenizerDistillationCollator(
            processing_class,
            None,
            max_length=args.max_length,
            alignment=args.alignment,
            text_column=args.text_column,
            student_start_token=args.student_start_token or None,
            teacher_start_token=args.teacher_start_token or None,
        )
        self._cross_tokenizer_collator = collator
        super().__init__(
            model=model,
            teacher_model=teacher_model,
            args=args,
            data_collator=collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            teacher_processing_class=teacher_processing_class,
            **kwargs,
        )

    def _check_teacher(
        self,
        student: Any,
        teacher: Any,
        processing_class: Any,
        teacher_processing_class: Any,
        args: DistillationConfig,
    ) -> None:
        # Overridden: the parent refuses tokenizers that differ, which is the point here. Builds the vocabulary
        # mapping and gives the collator the teacher's tokenizer instead.
        from .distillation_trainer import _tokenizer_next_to, _vocab_size

        on_meta = [name for name, parameter in teacher.named_parameters() if parameter.device.type == "meta"]
        if on_meta:
            raise ValueError(
                f"teacher_model has {len(on_meta)} parameters on the meta device (e.g. {on_meta[0]!r}); load the "
                "teacher with its weights."
            )
        teacher_tokenizer = teacher_processing_class or _tokenizer_next_to(teacher)
        if teacher_tokenizer is None:
            raise ValueError(
                "teacher_processing_class (the teacher's tokenizer) is required for cross-tokenizer distillation: "
                "pass teacher_processing_class=AutoTokenizer.from_pretrained(<teacher>)."
            )
        self._cross_tokenizer_collator.set_teacher_tokenizer(teacher_tokenizer)
        if args.alignment == "spans" and args.loss_type != "uld":
            self.vocabulary_mapping = build_vocabulary_mapping(
                processing_class,
                teacher_tokenizer,
                student_vocab_size=_vocab_size(student),
                teacher_vocab_size=_vocab_size(teacher),
                max_vocab_union_size=args.max_vocab_union_size,
            )
            logger.info(
                f"{self.vocabulary_mapping.num_matched} token strings are shared by the student "
                f"({self.vocabulary_mapping.student_vocab_size}) and teacher "
                f"({self.vocabulary_mapping.teacher_vocab_size}) vocabularies."
            )

    def _set_signature_columns_if_needed(self) -> None:
        # Private hook, overridden so that the Trainer's column pruning keeps the raw text the collator tokenises.
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, self.args.text_column]))

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        """Student and teacher forward passes on their own tokenisations, then the cross-tokenizer loss."""

        mode = "train" if model.training else "eval"
        inputs = dict(inputs)
        index = SpanAlignmentIndex.from_batch(inputs, pop=True)
        teacher_inputs = {
            "input_ids": inputs.pop("teacher_input_ids"),
            "attention_mask": inputs.pop("teacher_attention_mask"),
        }
        labels = inputs.pop("labels")
        if num_items_in_batch is None:
            steps = self.current_gradient_accumulation_steps if model.training else 1
            num_items_in_batch = max(int((labels[:, 1:] != -100).sum()), 1) * steps
        outputs = model(**inputs, use_cache=False)
        teacher_outputs = self._teacher_forward(model, teacher_inputs, want_hidden=False, want_logits=True)
        args = self.args
        try:
            result = cross_tokenizer_distillation_loss(
                outputs.logits,
                teacher_outputs.logits.to(outputs.logits.device),
                labels,
                index,
                self.vocabulary_mapping,
                kd_ratio=args.kd_ratio,
                num_items_in_batch=num_items_in_batch,
                loss_type=args.matched_loss_type,
                temperature=args.temperature,
                jsd_beta=args.jsd_beta,
                scale_by_temperature_squared=args.scale_by_temperature_squared,
                matched_weight=args.matched_weight,
                unmatched_weight=args.unmatched_weight,
                uld_top_k=args.uld_top_k,
            )
        except ValueError as error:
            raise ValueError(f"at training step {self.state.global_step} ({mode}): {error}") from error
        normalizer = float(num_items_in_batch)
        sums = self._metric_sums[mode]
        sums["num_tokens"] = sums.get("num_tokens", 0.0) + result.num_valid_tokens
        sums["kd_loss"] = sums.get("kd_loss", 0.0) + float(result.kd_loss.detach()) * normalizer
        sums["ce_loss"] = sums.get("ce_loss", 0.0) + float(result.ce_loss.detach()) * normalizer
        self._span_counts[mode][0] += result.spans.num_matched
        self._span_counts[mode][1] += result.spans.num_unmatched
        loss = result.loss
        if model.training and self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes  # same convention as DistillationTrainer.compute_loss
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds `matched_span_fraction`: the share of aligned spans compared exactly (not by ULD)."""
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        matched, unmatched = self._span_counts[mode]
        if matched + unmatched:
            logs[("eval_" if mode == "eval" else "") + "matched_span_fraction"] = matched / (matched + unmatched)
        self._span_counts[mode] = [0, 0]
        super().log(logs, start_time)
