"""Two tokenisations of one text: token byte strings, aligned spans, the matched vocabulary, chunked documents."""

from __future__ import annotations

import pytest
import torch
from cross_tokenizer_samples import TEXTS, _bytes_of

from hf_interop.loading import load_gpt2_tokenizer
from hf_interop.text_alignment import (
    align_texts,
    build_vocabulary_mapping,
    split_texts_into_chunks,
    token_byte_strings,
)


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    return load_gpt2_tokenizer()


def _check_alignment_invariants(alignment, student_tokenizer, teacher_tokenizer):
    spans = alignment.spans
    assert spans, alignment.text
    # the spans cut both token sequences into consecutive, non-empty pieces that cover them completely
    assert spans[0].student_start == 0 and spans[0].teacher_start == 0
    assert spans[-1].student_end == len(alignment.student_ids)
    assert spans[-1].teacher_end == len(alignment.teacher_ids)
    for previous, span in zip(spans, spans[1:], strict=False):
        assert span.student_start == previous.student_end and span.teacher_start == previous.teacher_end
    for span in spans:
        assert span.student_end > span.student_start and span.teacher_end > span.teacher_start
        student_ids = alignment.student_ids[span.student_start : span.student_end]
        teacher_ids = alignment.teacher_ids[span.teacher_start : span.teacher_end]
        student_bytes = _bytes_of(student_tokenizer, student_ids)
        teacher_bytes = _bytes_of(teacher_tokenizer, teacher_ids)
        assert student_bytes == teacher_bytes  # both sides of a span stand for the same text
        one_each = len(student_ids) == 1 and len(teacher_ids) == 1
        assert span.matched == one_each, (student_bytes, student_ids, teacher_ids)
        # a span is never longer than needed: no inner byte position ends a token on both sides
        student_cuts = {len(_bytes_of(student_tokenizer, student_ids[:k])) for k in range(1, len(student_ids))}
        teacher_cuts = {len(_bytes_of(teacher_tokenizer, teacher_ids[:k])) for k in range(1, len(teacher_ids))}
        assert not student_cuts & teacher_cuts, (student_ids, teacher_ids)
    assert _bytes_of(student_tokenizer, alignment.student_ids) == alignment.text.encode("utf-8")


def test_alignment_corpus_vs_gpt2_tokenizer(corpus_tokenizer, gpt2_tokenizer):
    alignments = align_texts(TEXTS, corpus_tokenizer, gpt2_tokenizer)
    for alignment in alignments:
        _check_alignment_invariants(alignment, corpus_tokenizer, gpt2_tokenizer)
    # the 512-token corpus tokenizer splits words GPT-2 keeps whole: some spans must be multi-token on one side
    assert any(not span.matched for alignment in alignments for span in alignment.spans)
    assert any(span.matched for alignment in alignments for span in alignment.spans)


def test_alignment_of_identical_tokenizers_matches_every_token(corpus_tokenizer):
    for alignment in align_texts(TEXTS, corpus_tokenizer, corpus_tokenizer):
        # byte tokens inside split characters (emoji, CJK) included
        assert alignment.num_matched == len(alignment.spans) == len(alignment.student_ids)


def test_alignment_numbers_and_partial_characters(gpt2_tokenizer, corpus_tokenizer):
    (alignment,) = align_texts(["x 12345 日 🙂"], gpt2_tokenizer, corpus_tokenizer)
    spans = [
        (
            gpt2_tokenizer.convert_ids_to_tokens(alignment.student_ids[s.student_start : s.student_end]),
            corpus_tokenizer.convert_ids_to_tokens(alignment.teacher_ids[s.teacher_start : s.teacher_end]),
            s.matched,
        )
        for s in alignment.spans
    ]
    # GPT-2 writes " 12345" as " 123" + "45" (the corpus tokenizer digit by digit): two unmatched spans, merged
    assert spans[1][0] == ["Ġ123"] and not spans[1][2] and len(spans[1][1]) > 1
    assert spans[2][0] == ["45"] and not spans[2][2]
    # " 日" is three byte tokens in GPT-2; the shared byte tokens inside it are matched positions
    assert [matched for *_, matched in spans[3:6]] == [False, True, True]
    assert spans[4][0] == spans[4][1] == ["Ĺ"]


def test_alignment_errors_and_positions_fallback(corpus_tokenizer, gpt2_tokenizer):
    from transformers import ByT5Tokenizer

    slow = ByT5Tokenizer()
    with pytest.raises(ValueError, match=r"slow tokenizer.*alignment='positions'"):
        align_texts(["hello"], slow, gpt2_tokenizer)
    with pytest.raises(ValueError, match=r"teacher_tokenizer.*offset mapping"):
        align_texts(["hello"], gpt2_tokenizer, slow)
    with pytest.raises(ValueError, match="tokenises to no tokens"):
        align_texts(["fine", ""], corpus_tokenizer, gpt2_tokenizer)
    with pytest.raises(ValueError, match="list of strings"):
        align_texts("a single string", corpus_tokenizer, gpt2_tokenizer)
    # the fallback needs no offsets: position i with position i, all compared by ULD
    (alignment,) = align_texts(["hello world"], slow, gpt2_tokenizer, alignment="positions")
    assert len(alignment.spans) == min(len(alignment.student_ids), len(alignment.teacher_ids)) == 2
    assert not any(span.matched for span in alignment.spans)


def test_max_student_tokens_cuts_both_sides_at_the_same_text(corpus_tokenizer, gpt2_tokenizer):
    text = TEXTS[5]
    (alignment,) = align_texts([text], corpus_tokenizer, gpt2_tokenizer, max_student_tokens=7)
    assert len(alignment.student_ids) == 7
    assert _bytes_of(corpus_tokenizer, alignment.student_ids) == _bytes_of(gpt2_tokenizer, alignment.teacher_ids)
    assert text.encode().startswith(_bytes_of(gpt2_tokenizer, alignment.teacher_ids))


def test_vocabulary_mapping(corpus_tokenizer, gpt2_tokenizer):
    same = build_vocabulary_mapping(corpus_tokenizer, corpus_tokenizer)
    assert same.num_matched == len(corpus_tokenizer) == same.union_size  # special tokens match by name
    assert torch.equal(same.student_ids, same.teacher_ids)
    mapping = build_vocabulary_mapping(gpt2_tokenizer, corpus_tokenizer)
    student_table, teacher_table = token_byte_strings(gpt2_tokenizer), token_byte_strings(corpus_tokenizer)
    assert 256 <= mapping.num_matched <= len(corpus_tokenizer)  # at least every single byte
    for student_id, teacher_id in zip(mapping.student_ids.tolist(), mapping.teacher_ids.tolist(), strict=True):
        if student_id == 50256:  # <|endoftext|>, special in both
            assert teacher_id == corpus_tokenizer.eos_token_id
        else:
            assert student_table[student_id] == teacher_table[teacher_id] is not None
    assert corpus_tokenizer.pad_token_id not in mapping.teacher_ids.tolist()  # "<pad>": GPT-2 has none
    assert mapping.union_size == 50257 + 512 - mapping.num_matched
    with pytest.raises(ValueError, match=r"max_vocab_union_size=1000"):
        build_vocabulary_mapping(gpt2_tokenizer, corpus_tokenizer, max_vocab_union_size=1000)


def test_split_texts_into_chunks(corpus, gpt2_tokenizer):
    documents = corpus["validation"].select(range(2))
    chunks = split_texts_into_chunks(documents, gpt2_tokenizer, max_tokens=50)
    assert "".join(chunks["text"]).replace(" ", "") == "".join(documents["text"]).replace(" ", "")
    lengths = [len(gpt2_tokenizer(text, add_special_tokens=False)["input_ids"]) for text in chunks["text"]]
    assert max(lengths) <= 51 and len(chunks) > 2


# --------------------------------------------------------------------------------------------------------------
# real assets: SmolLM2-135M teacher, GPT-2-tokenizer student


@pytest.mark.slow
def test_alignment_smollm2_vs_gpt2(smollm2_tokenizer, gpt2_tokenizer, corpus):
    alignments = align_texts(TEXTS, gpt2_tokenizer, smollm2_tokenizer)
    for alignment in alignments:
        _check_alignment_invariants(alignment, gpt2_tokenizer, smollm2_tokenizer)
    # SmolLM2 writes every digit alone, GPT-2 groups up to three: " 12345" is never matched
    (numbers,) = align_texts([" 12345"], gpt2_tokenizer, smollm2_tokenizer)
    assert [span.matched for span in numbers.spans] == [False, False]
    # English prose: most spans are single tokens on both sides
    held_out = align_texts(list(corpus["validation"]["text"][:5]), gpt2_tokenizer, smollm2_tokenizer)
    matched = sum(a.num_matched for a in held_out) / sum(len(a.spans) for a in held_out)
    assert matched > 0.8
