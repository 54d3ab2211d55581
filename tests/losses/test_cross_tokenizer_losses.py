"""Cross-tokenizer distillation and ensembles: GPT-2 tokenizer, alignment, ULD / hybrid losses, trainer, ensemble."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import build_tiny_causal_lm

from hf_interop import losses
from hf_interop.cross_tokenizer import (
    CrossTokenizerDistillationCollator,
    CrossTokenizerDistillationConfig,
    CrossTokenizerDistillationTrainer,
    SpanAlignmentIndex,
    align_texts,
    build_vocabulary_mapping,
    cross_tokenizer_distillation_loss,
    load_gpt2_tokenizer,
    matched_vocabulary_divergence,
    span_aligned_distillation_loss,
    split_texts_into_chunks,
    token_byte_strings,
    uld_distance,
    uld_loss,
)
from hf_interop.cross_tokenizer_ensemble import CrossTokenizerEnsemble

# Whitespace runs, accents, CJK, emoji, multi-digit numbers, merged words and code.
TEXTS = [
    "Hello world  and   spaces\t\ttabs\n\n\n  indented",
    "héllo café naïve Ünïcödé",
    "日本語のテキスト and 中文 mixed",
    "emoji 🙂👍🏽 and flags 🇫🇷!",
    "numbers 12345 3.14159 -42 1,000,000 and 2026-11-22",
    "The interpreter's behaviour isn't undefined; they're merged tokens.",
    "def f(x):\n    return x ** 2  # comment",
]


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    return load_gpt2_tokenizer()


def _bytes_of(tokenizer, ids):
    table = token_byte_strings(tokenizer)
    return b"".join(table[i] for i in ids)


# --------------------------------------------------------------------------------------------------------------
# the GPT-2 tokenizer


def test_gpt2_tokenizer_is_gpt2_and_matches_tiktoken(gpt2_tokenizer):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str

    from hf_interop.cross_tokenizer import _gpt2_tiktoken_file

    assert len(gpt2_tokenizer) == 50257
    assert gpt2_tokenizer.eos_token == "<|endoftext|>" and gpt2_tokenizer.eos_token_id == 50256
    assert gpt2_tokenizer("Hello", add_special_tokens=False)["input_ids"] == [15496]
    reference = tiktoken.Encoding(
        "gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=load_tiktoken_bpe(str(_gpt2_tiktoken_file())),
        special_tokens={"<|endoftext|>": 50256},
    )
    for text in TEXTS:
        assert gpt2_tokenizer(text, add_special_tokens=False)["input_ids"] == reference.encode(text), text
        assert gpt2_tokenizer.decode(reference.encode(text)) == text


def test_gpt2_tokenizer_is_converted_once_into_the_cache(tmp_path, monkeypatch):
    from hf_interop import loading

    target = tmp_path / "gpt2"
    tokenizer = load_gpt2_tokenizer(cache_dir=target)
    assert (target / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]  # written atomically
    # a second call loads the cached folder: the whisper asset is not needed any more
    monkeypatch.setattr(loading, "_gpt2_tiktoken_file", lambda: pytest.fail("converted twice"))
    again = load_gpt2_tokenizer(cache_dir=target)
    assert again("Hello world")["input_ids"] == tokenizer("Hello world")["input_ids"] == [15496, 995]


def test_gpt2_tokenizer_without_whisper_names_the_install_command(tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "whisper" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match="pip install --no-deps openai-whisper tiktoken"):
        load_gpt2_tokenizer(cache_dir=tmp_path / "missing")


# --------------------------------------------------------------------------------------------------------------
# alignment


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


# --------------------------------------------------------------------------------------------------------------
# losses


def _uld_reference(student_probs, teacher_probs):
    """Float64, one row at a time, written out: sort descending, zero-pad, L1."""
    rows = []
    for p_s, p_t in zip(student_probs.double(), teacher_probs.double(), strict=True):
        a = sorted(p_s.tolist(), reverse=True)
        b = sorted(p_t.tolist(), reverse=True)
        width = max(len(a), len(b))
        a, b = a + [0.0] * (width - len(a)), b + [0.0] * (width - len(b))
        rows.append(sum(abs(x - y) for x, y in zip(a, b, strict=True)))
    return torch.tensor(rows, dtype=torch.float64)


def test_uld_matches_float64_reference_with_gradients():
    torch.manual_seed(0)
    student = (torch.randn(6, 7) * 2).requires_grad_()
    teacher = torch.randn(6, 11) * 2
    temperature = 2.0
    value = uld_loss(student, teacher, temperature=temperature)
    expected = _uld_reference((student / temperature).softmax(-1).detach(), (teacher / temperature).softmax(-1))
    torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-6)
    # gradient against a float64 autograd reference
    value.sum().backward()
    student64 = student.detach().double().requires_grad_()
    p_s = (student64 / temperature).softmax(-1).sort(-1, descending=True).values
    p_t = (teacher.double() / temperature).softmax(-1).sort(-1, descending=True).values
    reference = (torch.nn.functional.pad(p_s, (0, 4)) - p_t).abs().sum()
    reference.backward()
    torch.testing.assert_close(student.grad.double(), student64.grad, rtol=1e-5, atol=1e-6)
    assert torch.autograd.gradcheck(
        lambda s: uld_loss(s, teacher.double(), temperature=1.5), (student64.detach().requires_grad_(),)
    )


def test_uld_properties():
    torch.manual_seed(1)
    logits = torch.randn(4, 9)
    assert torch.allclose(uld_loss(logits, logits), torch.zeros(4), atol=1e-7)
    other = torch.randn(4, 5)
    assert torch.allclose(uld_loss(logits, other), uld_loss(other, logits), atol=1e-6)  # symmetric
    shuffled = logits[:, torch.randperm(9)]
    assert torch.allclose(uld_loss(shuffled, other), uld_loss(logits, other), atol=1e-6)  # blind to token identity
    assert torch.all(uld_loss(logits, other) <= 2.0 + 1e-6)
    # top_k: exact when k covers the vocabulary, a lower bound otherwise
    assert torch.allclose(uld_loss(logits, other, top_k=5), uld_loss(logits, other), atol=1e-6)
    assert torch.all(uld_loss(logits, other, top_k=2) <= uld_loss(logits, other) + 1e-6)
    # unnormalised vectors (merged spans) are compared as they are
    p, q = torch.tensor([[0.2, 0.1]]), torch.tensor([[0.05, 0.3, 0.1]])
    torch.testing.assert_close(uld_distance(p, q), _uld_reference(p, q).float())


def _matched_reference(student_logits, teacher_logits, mapping, loss_type, temperature, beta=0.5):
    """Float64, written out: matched ids in order plus one bucket of everything else, then the divergence."""
    p_s = (student_logits.double() / temperature).softmax(-1)
    p_t = (teacher_logits.double() / temperature).softmax(-1)
    s_ids, t_ids = mapping.student_ids.tolist(), mapping.teacher_ids.tolist()
    rows = []
    for row_s, row_t in zip(p_s, p_t, strict=True):
        a = [row_s[i].item() for i in s_ids] + [1.0 - sum(row_s[i].item() for i in s_ids)]
        b = [row_t[i].item() for i in t_ids] + [1.0 - sum(row_t[i].item() for i in t_ids)]

        def kl(x, y):
            return sum(xi * math.log(xi / yi) for xi, yi in zip(x, y, strict=True) if xi > 0)

        if loss_type == "forward_kl":
            rows.append(kl(b, a) * temperature**2)
        elif loss_type == "reverse_kl":
            rows.append(kl(a, b))
        else:
            m = [beta * y + (1 - beta) * x for x, y in zip(a, b, strict=True)]
            rows.append(beta * kl(b, m) + (1 - beta) * kl(a, m))
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("loss_type", ["forward_kl", "reverse_kl", "jsd"])
def test_matched_vocabulary_divergence_matches_float64_reference(loss_type, corpus_tokenizer, gpt2_tokenizer):
    mapping = build_vocabulary_mapping(corpus_tokenizer, gpt2_tokenizer)
    torch.manual_seed(2)
    student = (torch.randn(3, 512) * 3).requires_grad_()
    teacher = torch.randn(3, 50257) * 3
    value = matched_vocabulary_divergence(student, teacher, mapping, loss_type=loss_type, temperature=2.0)
    expected = _matched_reference(student.detach(), teacher, mapping, loss_type, 2.0)
    torch.testing.assert_close(value.double(), expected, rtol=1e-4, atol=1e-6)
    value.sum().backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


@pytest.mark.parametrize("loss_type", ["forward_kl", "reverse_kl", "jsd"])
def test_identical_tokenizers_hybrid_equals_same_tokenizer_kd(loss_type, corpus, corpus_tokenizer):
    collator = CrossTokenizerDistillationCollator(corpus_tokenizer, corpus_tokenizer, max_length=24)
    texts = [{"text": text} for text in corpus["train"]["text"][:3]]
    batch = collator(texts)
    index = SpanAlignmentIndex.from_batch(batch)
    assert index.num_unmatched == 0  # every position is matched
    assert index.num_matched == int((batch["labels"][:, 1:] != -100).sum())
    mapping = build_vocabulary_mapping(corpus_tokenizer, corpus_tokenizer)
    torch.manual_seed(3)
    shape = (*batch["input_ids"].shape, 512)
    student = torch.randn(shape, requires_grad=True)
    teacher = torch.randn(shape)
    ours = span_aligned_distillation_loss(student, teacher, index, mapping, loss_type=loss_type, temperature=2.0)
    reference = losses.distillation_loss(
        student[:, :-1], teacher[:, :-1], batch["labels"][:, 1:], loss_type=loss_type, temperature=2.0
    )
    torch.testing.assert_close(ours.loss, reference.kd_loss, rtol=1e-5, atol=1e-6)
    ours.loss.backward()
    assert student.grad.abs().sum() > 0


def test_merged_span_probabilities_and_weights(gpt2_tokenizer, corpus_tokenizer):
    # student: the corpus tokenizer (splits more), teacher: GPT-2
    collator = CrossTokenizerDistillationCollator(corpus_tokenizer, gpt2_tokenizer, max_length=64)
    batch = collator([{"text": TEXTS[4]}, {"text": TEXTS[1]}])
    index = SpanAlignmentIndex.from_batch(batch)
    assert index.num_matched > 0 and index.num_unmatched > 0
    mapping = build_vocabulary_mapping(corpus_tokenizer, gpt2_tokenizer)
    torch.manual_seed(4)
    student = torch.randn(*batch["input_ids"].shape, 512, dtype=torch.float64)
    teacher = torch.randn(*batch["teacher_input_ids"].shape, 50257, dtype=torch.float64)
    only_unmatched = span_aligned_distillation_loss(student, teacher, index, mapping, matched_weight=0.0)
    # float64 reference of the unmatched part: merged span probabilities written out
    flat_s, flat_t = student.reshape(-1, 512), teacher.reshape(-1, 50257)
    total = 0.0
    for span in range(index.num_unmatched):

        def merged(flat, base_rows, rows, tokens, spans, span=span):
            probs = flat[base_rows[span]].softmax(-1)
            for row, token, owner in zip(rows.tolist(), tokens.tolist(), spans.tolist(), strict=True):
                if owner == span:
                    probs = probs * flat[row].softmax(-1)[token]
            return probs

        p_s = merged(
            flat_s,
            index.unmatched_student_rows,
            index.student_continuation_rows,
            index.student_continuation_tokens,
            index.student_continuation_spans,
        )
        p_t = merged(
            flat_t,
            index.unmatched_teacher_rows,
            index.teacher_continuation_rows,
            index.teacher_continuation_tokens,
            index.teacher_continuation_spans,
        )
        total += _uld_reference(p_s[None], p_t[None]).item()
    num_spans = index.num_matched + index.num_unmatched
    assert math.isclose(only_unmatched.loss.item(), total / num_spans, rel_tol=1e-5)
    assert math.isclose(only_unmatched.unmatched_loss.item(), total / index.num_unmatched, rel_tol=1e-5)
    both = span_aligned_distillation_loss(student, teacher, index, mapping, matched_weight=1.0, unmatched_weight=0.5)
    expected = (both.matched_loss * index.num_matched + 0.5 * total) / num_spans
    assert math.isclose(both.loss.item(), expected.item(), rel_tol=1e-5)
    # a global normaliser (gradient accumulation) replaces the local span count
    scaled = span_aligned_distillation_loss(student, teacher, index, mapping, num_items_in_batch=1000)
    full = span_aligned_distillation_loss(student, teacher, index, mapping)
    assert math.isclose(scaled.loss.item() * 1000, full.loss.item() * num_spans, rel_tol=1e-6)
    # plain ULD compares matched spans by ULD too
    plain = span_aligned_distillation_loss(student, teacher, index, None, loss_type="uld")
    assert torch.isfinite(plain.loss) and plain.loss > 0
    with pytest.raises(ValueError, match="loss_type='tvd'"):
        span_aligned_distillation_loss(student, teacher, index, mapping, loss_type="tvd")


def test_cross_tokenizer_loss_mixes_ce_and_kd(gpt2_tokenizer, corpus_tokenizer):
    collator = CrossTokenizerDistillationCollator(gpt2_tokenizer, corpus_tokenizer, max_length=16)
    batch = collator([{"text": TEXTS[0]}, {"text": "short"}])
    assert batch["labels"][1].tolist().count(-100) >= 1 and batch["labels"][:, 0].eq(-100).all()
    index = SpanAlignmentIndex.from_batch(batch)
    mapping = build_vocabulary_mapping(gpt2_tokenizer, corpus_tokenizer)
    torch.manual_seed(5)
    student = torch.randn(*batch["input_ids"].shape, 50257)
    teacher = torch.randn(*batch["teacher_input_ids"].shape, 512)
    result = cross_tokenizer_distillation_loss(student, teacher, batch["labels"], index, mapping, kd_ratio=0.25)
    shift_labels = batch["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(student[:, :-1].reshape(-1, 50257), shift_labels.reshape(-1))
    torch.testing.assert_close(result.ce_loss, ce)
    assert result.num_valid_tokens == int((shift_labels != -100).sum())
    torch.testing.assert_close(result.loss, 0.25 * result.kd_loss + 0.75 * result.ce_loss)


def test_split_texts_into_chunks(corpus, gpt2_tokenizer):
    documents = corpus["validation"].select(range(2))
    chunks = split_texts_into_chunks(documents, gpt2_tokenizer, max_tokens=50)
    assert "".join(chunks["text"]).replace(" ", "") == "".join(documents["text"]).replace(" ", "")
    lengths = [len(gpt2_tokenizer(text, add_special_tokens=False)["input_ids"]) for text in chunks["text"]]
    assert max(lengths) <= 51 and len(chunks) > 2


@pytest.mark.gpu
def test_hybrid_loss_on_cuda_equals_cpu(gpt2_tokenizer, corpus_tokenizer):
    collator = CrossTokenizerDistillationCollator(corpus_tokenizer, gpt2_tokenizer, max_length=32)
    batch = collator([{"text": text} for text in TEXTS[:3]])
    index = SpanAlignmentIndex.from_batch(batch)
    mapping = build_vocabulary_mapping(corpus_tokenizer, gpt2_tokenizer)
    torch.manual_seed(6)
    student = torch.randn(*batch["input_ids"].shape, 512)
    teacher = torch.randn(*batch["teacher_input_ids"].shape, 50257)
    on_cpu = span_aligned_distillation_loss(student, teacher, index, mapping).loss
    on_gpu = span_aligned_distillation_loss(student.cuda(), teacher.cuda(), index, mapping).loss
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# trainer


def _tiny_pair(corpus_tokenizer, gpt2_tokenizer):
    student = build_tiny_causal_lm("gpt2", len(gpt2_tokenizer), seed=1, tokenizer=gpt2_tokenizer)
    teacher = build_tiny_causal_lm("llama", len(corpus_tokenizer), seed=0, tokenizer=corpus_tokenizer)
    return student, teacher


def test_trainer_updates_student_and_leaves_teacher_untouched(tmp_path, corpus, corpus_tokenizer, gpt2_tokenizer):
    student, teacher = _tiny_pair(corpus_tokenizer, gpt2_tokenizer)
    train = split_texts_into_chunks(corpus["train"].select(range(3)), gpt2_tokenizer, max_tokens=24)
    teacher_before = {name: tensor.clone() for name, tensor in teacher.state_dict().items()}
    student_before = {name: tensor.clone() for name, tensor in student.state_dict().items()}
    args = CrossTokenizerDistillationConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        max_length=24,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = CrossTokenizerDistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=train,
        processing_class=gpt2_tokenizer,
        teacher_processing_class=corpus_tokenizer,
    )
    trainer.train()
    assert all(torch.equal(teacher_before[name], tensor) for name, tensor in teacher.state_dict().items())
    changed = [name for name, tensor in student.state_dict().items() if not torch.equal(student_before[name], tensor)]
    assert changed
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3 and all(math.isfinite(entry["loss"]) for entry in logs)
    assert all(0.0 < entry["matched_span_fraction"] <= 1.0 and entry["kd_loss"] > 0 for entry in logs)
    trainer.save_model(str(tmp_path / "final"))
    card = (tmp_path / "final" / "README.md").read_text()
    assert "cross_tokenizer" in card and (tmp_path / "final" / "config.json").is_file()


def test_trainer_and_config_errors(tmp_path, corpus, corpus_tokenizer, gpt2_tokenizer):
    output_dir = str(tmp_path / "out")
    with pytest.raises(ValueError, match="loss_type='tvd'"):
        CrossTokenizerDistillationConfig(output_dir=output_dir, loss_type="tvd")
    with pytest.raises(ValueError, match="alignment='positions'.*loss_type='uld'"):
        CrossTokenizerDistillationConfig(output_dir=output_dir, alignment="positions")
    with pytest.raises(ValueError, match="unmatched_weight=-1"):
        CrossTokenizerDistillationConfig(output_dir=output_dir, unmatched_weight=-1.0)
    with pytest.raises(ValueError, match="hidden_loss_weight"):
        CrossTokenizerDistillationConfig(output_dir=output_dir, hidden_loss_weight=1.0, hidden_layer_map=[[1, 1]])
    assert CrossTokenizerDistillationConfig(output_dir=output_dir, loss_type="gold").matched_loss_type == "jsd"
    student, teacher = _tiny_pair(corpus_tokenizer, gpt2_tokenizer)
    args = CrossTokenizerDistillationConfig(output_dir=output_dir, report_to=[], use_cpu=True)
    packed = corpus["train"].select(range(2)).remove_columns("text")
    with pytest.raises(ValueError, match="no 'text'"):
        CrossTokenizerDistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=packed,
            processing_class=gpt2_tokenizer,
            teacher_processing_class=corpus_tokenizer,
        )
    with pytest.raises(ValueError, match="teacher_processing_class"):
        CrossTokenizerDistillationTrainer(
            model=student, teacher_model=teacher, args=args, processing_class=gpt2_tokenizer
        )
    with pytest.raises(ValueError, match="max_vocab_union_size=100"):
        CrossTokenizerDistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=CrossTokenizerDistillationConfig(
                output_dir=output_dir, report_to=[], use_cpu=True, max_vocab_union_size=100
            ),
            processing_class=gpt2_tokenizer,
            teacher_processing_class=corpus_tokenizer,
        )


# --------------------------------------------------------------------------------------------------------------
# cross-tokenizer ensemble


@pytest.fixture(scope="module")
def ensemble_members(corpus_tokenizer, gpt2_tokenizer):
    # a larger init scale than the default makes the random models' greedy choices vary from step to step
    llama = build_tiny_causal_lm(
        "llama", len(corpus_tokenizer), seed=3, tokenizer=corpus_tokenizer, initializer_range=0.5
    )
    gpt2 = build_tiny_causal_lm("gpt2", len(gpt2_tokenizer), seed=4, tokenizer=gpt2_tokenizer, initializer_range=0.5)
    return (llama, corpus_tokenizer), (gpt2, gpt2_tokenizer)


def test_single_member_ensemble_equals_its_own_greedy_generate(ensemble_members):
    model, tokenizer = ensemble_members[0]
    ensemble = CrossTokenizerEnsemble([(model, tokenizer)], top_k=3)
    prompt = "The interpreter"
    text = ensemble.generate(prompt, max_new_tokens=12)
    inputs = tokenizer(prompt, return_tensors="pt")
    suppressed = ensemble.members[0].suppressed_ids
    reference = model.generate(
        **inputs, max_new_tokens=12, do_sample=False, suppress_tokens=suppressed, pad_token_id=tokenizer.pad_token_id
    )
    new_ids = reference[0, inputs["input_ids"].shape[1] :]
    assert text == tokenizer.decode(new_ids, skip_special_tokens=True)
    assert len(set(new_ids.tolist())) > 1  # not a degenerate repetition of one token
    # the KV cache is reused: the prompt once, then one new token per step
    assert ensemble.forward_token_counts == [inputs["input_ids"].shape[1] + len(new_ids) - 1]


def test_ensemble_of_different_vocabularies(ensemble_members):
    ensemble = CrossTokenizerEnsemble(list(ensemble_members), weights=[0.5, 0.5], top_k=4, look_behind=4)
    prompt = "Numbers like 12345 and café"
    first = ensemble.generate(prompt, max_new_tokens=10)
    assert isinstance(first, str) and first
    assert ensemble.generate(prompt, max_new_tokens=10) == first  # greedy is deterministic
    # each member's own tokens spell exactly the prompt plus the generated text
    for member in ensemble.members:
        assert _bytes_of(member.tokenizer, member.ids).decode("utf-8", errors="replace") == prompt + first
    # far fewer forward tokens than re-running every member on the whole text at every step
    prompt_lengths = [len(tokenizer(prompt)["input_ids"]) for _, tokenizer in ensemble_members]
    naive = sum(length * 10 + 55 for length in prompt_lengths)
    assert sum(ensemble.forward_token_counts) < naive / 2
    sampled = ensemble.generate(prompt, max_new_tokens=10, do_sample=True, seed=7)
    assert ensemble.generate(prompt, max_new_tokens=10, do_sample=True, seed=7) == sampled
    # a member with all the weight decides alone
    only_second = CrossTokenizerEnsemble(list(ensemble_members), weights=[0.0, 1.0], top_k=4)
    alone = CrossTokenizerEnsemble([ensemble_members[1]], top_k=4)
    assert only_second.generate(prompt, max_new_tokens=8) == alone.generate(prompt, max_new_tokens=8)


def test_ensemble_errors(ensemble_members):
    with pytest.raises(ValueError, match="members is empty"):
        CrossTokenizerEnsemble([])
    with pytest.raises(ValueError, match="weights has 1 entries for 2 members"):
        CrossTokenizerEnsemble(list(ensemble_members), weights=[1.0])
    with pytest.raises(ValueError, match="top_k=0"):
        CrossTokenizerEnsemble(list(ensemble_members), top_k=0)
    with pytest.raises(ValueError, match=r"members\[0\]"):
        CrossTokenizerEnsemble([ensemble_members[0][0]])
    with pytest.raises(ValueError, match="max_vocab_union_size=1000"):
        CrossTokenizerEnsemble(list(ensemble_members), max_vocab_union_size=1000)
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        CrossTokenizerEnsemble([ensemble_members[0]]).generate("")


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


@pytest.mark.slow
def test_distil_smollm2_into_gpt2_tokenizer_student(tmp_path, smollm2, gpt2_tokenizer, corpus):
    teacher, teacher_tokenizer = smollm2
    student = build_tiny_causal_lm("gpt2", len(gpt2_tokenizer), seed=0, tokenizer=gpt2_tokenizer)
    train = split_texts_into_chunks(corpus["train"].select(range(2)), gpt2_tokenizer, max_tokens=32)
    checksum = sum(float(p.detach().double().sum()) for p in teacher.parameters())
    args = CrossTokenizerDistillationConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=2,
        max_length=32,
        kd_ratio=1.0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        teacher_start_token="<|endoftext|>",
    )
    trainer = CrossTokenizerDistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=train,
        processing_class=gpt2_tokenizer,
        teacher_processing_class=teacher_tokenizer,
    )
    assert trainer.vocabulary_mapping.num_matched > 30000
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and logs[0]["matched_span_fraction"] > 0.7
    assert sum(float(p.detach().double().sum()) for p in teacher.parameters()) == checksum


@pytest.mark.slow
def test_ensemble_with_smollm2_and_a_gpt2_tokenizer_member(smollm2, gpt2_tokenizer):
    teacher, teacher_tokenizer = smollm2
    student = build_tiny_causal_lm("gpt2", len(gpt2_tokenizer), seed=0, tokenizer=gpt2_tokenizer)
    prompt = "The capital of France is"
    # all the weight on SmolLM2: the ensemble writes what SmolLM2's own greedy search writes
    ensemble = CrossTokenizerEnsemble([(teacher, teacher_tokenizer), (student, gpt2_tokenizer)], weights=[1.0, 0.0])
    text = ensemble.generate(prompt, max_new_tokens=6)
    inputs = teacher_tokenizer(prompt, return_tensors="pt")
    reference = teacher.generate(
        **inputs,
        max_new_tokens=6,
        do_sample=False,
        suppress_tokens=ensemble.members[0].suppressed_ids,
        pad_token_id=teacher_tokenizer.pad_token_id,
    )
    assert text == teacher_tokenizer.decode(reference[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text
    mixed = CrossTokenizerEnsemble([(teacher, teacher_tokenizer), (student, gpt2_tokenizer)], weights=[0.7, 0.3])
    assert isinstance(mixed.generate(prompt, max_new_tokens=3), str)
