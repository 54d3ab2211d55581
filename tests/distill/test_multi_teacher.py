"""MultiTeacherDistillationTrainer: routing, mixture/product weights against float64, per-teacher metrics, bad input.

Tiny models share the corpus tokenizer: a 2-layer student and two different 4-layer teachers.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import build_tiny_causal_lm
from helpers import make_distillation_args as make_single_args

from hf_interop import (
    DistillationTrainer,
    MultiTeacherDistillationConfig,
    MultiTeacherDistillationTrainer,
    combine_teacher_log_probs,
)
from hf_interop.distill.multi_teacher import sequence_confidence_scores, teacher_weights_per_example

TEACHER_OVERRIDES = {"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 4, "num_attention_heads": 4}


def make_args(output_dir, **overrides):
    return make_single_args(output_dir, config_class=MultiTeacherDistillationConfig, **overrides)


@pytest.fixture(scope="module")
def train_rows(packed_corpus):
    """8 packed 64-token rows, alternately routed to teachers 'a' and 'b'."""
    rows = packed_corpus["train"].select(range(8))
    return rows.add_column("teacher", ["a", "b"] * 4)


def make_teacher(tokenizer, seed):
    return build_tiny_causal_lm("llama", len(tokenizer), seed=seed, tokenizer=tokenizer, **TEACHER_OVERRIDES)


def make_student(tokenizer, seed=0):
    return build_tiny_causal_lm("llama", len(tokenizer), seed=seed, tokenizer=tokenizer)


def weights(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


class ForwardCounter:
    """Counts a teacher's forward calls and the rows it saw."""

    def __init__(self, model):
        self.calls, self.rows = 0, []
        model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.calls += 1
        self.rows.append(kwargs["input_ids"].detach().clone())


# ---------------------------------------------------------------------------------------------- the pure math


def test_mixture_and_product_match_a_float64_reference():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2, 5, 11, generator=generator, dtype=torch.float64)  # teachers, batch, positions, vocab
    log_probs = torch.log_softmax(logits, -1)
    weights = torch.tensor([[0.2, 0.5, 0.3], [0.0, 1.0, 0.0]], dtype=torch.float64)
    mixed = combine_teacher_log_probs(log_probs.float(), weights.float(), "mixture")
    producted = combine_teacher_log_probs(log_probs.float(), weights.float(), "product")
    probs = log_probs.exp()
    for row in range(2):
        expected_mixture = sum(weights[row, k] * probs[k, row] for k in range(3))
        unnormalised = torch.ones_like(probs[0, row])
        for k in range(3):
            unnormalised = unnormalised * probs[k, row] ** weights[row, k]
        expected_product = unnormalised / unnormalised.sum(-1, keepdim=True)
        torch.testing.assert_close(mixed[row].double().exp(), expected_mixture, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(producted[row].double().exp(), expected_product, rtol=1e-5, atol=1e-7)
    # a one-hot row is exactly that teacher's distribution
    torch.testing.assert_close(mixed[1], log_probs[1, 1].float(), rtol=0, atol=1e-6)


def test_confidence_weights_follow_the_documented_formula():
    generator = torch.Generator().manual_seed(1)
    log_probs = torch.log_softmax(torch.randn(2, 3, 4, 7, generator=generator, dtype=torch.float64), -1)
    labels = torch.randint(0, 7, (3, 4), generator=generator)
    labels[0, :2] = -100
    scores = sequence_confidence_scores(log_probs, labels)
    for row in range(3):
        for teacher in range(2):
            valid = [i for i in range(4) if labels[row, i] != -100]
            expected = sum(float(log_probs[teacher, row, i, labels[row, i]]) for i in valid) / len(valid)
            assert math.isclose(float(scores[row, teacher]), expected, rel_tol=1e-12)
    prior = [0.25, 0.75]
    weights = teacher_weights_per_example(3, prior, confidence_scores=scores, confidence_temperature=0.5)
    for row in range(3):
        numerators = [prior[k] * math.exp(float(scores[row, k]) / 0.5) for k in range(2)]
        for k in range(2):
            assert math.isclose(float(weights[row, k]), numerators[k] / sum(numerators), rel_tol=1e-12)
    routed = teacher_weights_per_example(3, prior, teacher_index=torch.tensor([1, 0, 1]))
    assert routed.tolist() == [[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]


# ---------------------------------------------------------------------------------------------- the trainer


def test_one_registered_teacher_is_bit_identical_to_teacher_model(tmp_path, corpus_tokenizer, train_rows):
    rows = train_rows.remove_columns("teacher")
    results = []
    for multi in (False, True):
        student = make_student(corpus_tokenizer)
        teacher = make_teacher(corpus_tokenizer, seed=1)
        if multi:
            args = make_args(tmp_path / "multi", teacher_combination="mixture")
            trainer = MultiTeacherDistillationTrainer(
                model=student,
                teachers={"only": teacher},
                args=args,
                train_dataset=rows,
                processing_class=corpus_tokenizer,
            )
        else:
            trainer = DistillationTrainer(
                model=student,
                teacher_model=teacher,
                args=make_single_args(tmp_path / "single"),
                train_dataset=rows,
                processing_class=corpus_tokenizer,
            )
        trainer.train()
        results.append(weights(student))
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), name


def test_routing_sends_each_example_only_to_its_teacher(tmp_path, corpus_tokenizer, train_rows):
    teachers = {"a": make_teacher(corpus_tokenizer, 1), "b": make_teacher(corpus_tokenizer, 2)}
    counters = {name: ForwardCounter(model) for name, model in teachers.items()}
    student = make_student(corpus_tokenizer)
    before = weights(student)
    args = make_args(tmp_path, max_steps=1, per_device_train_batch_size=8)
    trainer = MultiTeacherDistillationTrainer(
        model=student, teachers=teachers, args=args, train_dataset=train_rows, processing_class=corpus_tokenizer
    )
    trainer.train()
    assert any(not torch.equal(before[name], tensor) for name, tensor in weights(student).items())
    expected = {
        name: {
            tuple(row)
            for row, teacher in zip(train_rows["input_ids"], train_rows["teacher"], strict=True)
            if teacher == name
        }
        for name in teachers
    }
    for name, counter in counters.items():
        assert counter.calls == 1
        seen = {tuple(row.tolist()) for row in counter.rows[0]}
        assert seen == expected[name]  # its 4 rows, none of the other teacher's
    logged = trainer.state.log_history[0]
    for name in teachers:
        assert logged[f"teacher_share/{name}"] == pytest.approx(0.5)
        assert logged[f"kd_loss/{name}"] > 0 and 0 <= logged[f"top1_agreement/{name}"] <= 1


def test_routed_loss_equals_the_sum_of_single_teacher_losses(tmp_path, corpus_tokenizer, train_rows):
    """The routed batch's loss is the token-weighted combination of each teacher's loss on its own rows."""
    teachers = {"a": make_teacher(corpus_tokenizer, 1), "b": make_teacher(corpus_tokenizer, 2)}
    student = make_student(corpus_tokenizer)
    args = make_args(tmp_path, per_device_train_batch_size=8, loss_chunk_size=0)
    trainer = MultiTeacherDistillationTrainer(
        model=student, teachers=teachers, args=args, train_dataset=train_rows, processing_class=corpus_tokenizer
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with torch.no_grad():
        loss = float(trainer.compute_loss(student, batch))
    total_tokens = 8 * 63
    expected = 0.0
    for name, teacher in teachers.items():
        single = DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=make_single_args(tmp_path / name, loss_chunk_size=0),
            processing_class=corpus_tokenizer,
        )
        rows = train_rows.filter(lambda row, name=name: row["teacher"] == name).remove_columns("teacher")
        sub = single._prepare_inputs(single.data_collator([rows[i] for i in range(len(rows))]))
        with torch.no_grad():
            expected += float(single.compute_loss(student, sub)) * (len(rows) * 63) / total_tokens
    assert loss == pytest.approx(expected, rel=1e-5)


def test_per_domain_kd_weights_scale_each_domains_rows(tmp_path, corpus_tokenizer, train_rows):
    """One teacher registered under two domain names: route_weights weigh each domain's rows like static task weights
    (float64 sum of the single-teacher losses on each domain's rows times its weight)."""
    teacher = make_teacher(corpus_tokenizer, 1)
    student = make_student(corpus_tokenizer)
    rows = train_rows.map(lambda row: {"teacher": {"a": "code", "b": "prose"}[row["teacher"]]})
    route_weights = {"code": 1.0, "prose": 0.25}
    args = make_args(tmp_path, per_device_train_batch_size=8, loss_chunk_size=0, route_weights=route_weights)
    trainer = MultiTeacherDistillationTrainer(
        model=student,
        teachers={"code": teacher, "prose": teacher},
        args=args,
        train_dataset=rows,
        processing_class=corpus_tokenizer,
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with torch.no_grad():
        loss = float(trainer.compute_loss(student, batch))
    single = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_single_args(tmp_path / "single", loss_chunk_size=0),
        processing_class=corpus_tokenizer,
    )
    shares = {}  # each domain's single-teacher loss on its rows, as a share of the whole batch's tokens
    for domain in route_weights:
        own = rows.filter(lambda row, domain=domain: row["teacher"] == domain).remove_columns("teacher")
        sub = single._prepare_inputs(single.data_collator([own[i] for i in range(len(own))]))
        with torch.no_grad():
            shares[domain] = float(single.compute_loss(student, sub)) * (len(own) * 63) / (8 * 63)
    expected = sum(route_weights[domain] * share for domain, share in shares.items())
    assert loss == pytest.approx(expected, rel=1e-5)
    assert abs(loss - sum(shares.values())) > 1e-3  # the weights changed the loss
    assert trainer.args.distillation_hyperparameters()["route_weights"] == route_weights
    # a weight of 0 leaves that domain's rows out: the loss is the other domain's share alone
    args = make_args(tmp_path, per_device_train_batch_size=8, loss_chunk_size=0, route_weights='{"prose": 0}')
    only_code = MultiTeacherDistillationTrainer(
        model=student,
        teachers={"code": teacher, "prose": teacher},
        args=args,
        train_dataset=rows,
        processing_class=corpus_tokenizer,
    )
    with torch.no_grad():
        code_share = float(only_code.compute_loss(student, batch))
    assert code_share == pytest.approx(shares["code"], rel=1e-5)


@pytest.mark.parametrize("rule", ["mixture", "product"])
@pytest.mark.parametrize("weighting", ["static", "confidence"])
def test_mixed_loss_matches_a_float64_reference(tmp_path, corpus_tokenizer, train_rows, rule, weighting):
    teachers = {"a": make_teacher(corpus_tokenizer, 1), "b": make_teacher(corpus_tokenizer, 2)}
    student = make_student(corpus_tokenizer)
    args = make_args(
        tmp_path,
        teacher_combination=rule,
        teacher_weighting=weighting,
        teacher_weights={"a": 1.0, "b": 3.0},
        temperature=2.0,
        kd_ratio=1.0,
        loss_chunk_size=16,
        confidence_temperature=0.5,
    )
    rows = train_rows.remove_columns("teacher")
    trainer = MultiTeacherDistillationTrainer(
        model=student, teachers=teachers, args=args, train_dataset=rows, processing_class=corpus_tokenizer
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with torch.no_grad():
        loss = float(trainer.compute_loss(student, batch))
        ids = batch["input_ids"]
        labels = ids[:, 1:]
        student_lp = torch.log_softmax(student(input_ids=ids).logits[:, :-1].double() / 2.0, -1)
        teacher_lp = [torch.log_softmax(t(input_ids=ids).logits[:, :-1].double(), -1) for t in teachers.values()]
    prior = torch.tensor([0.25, 0.75], dtype=torch.float64)
    if weighting == "confidence":
        scores = torch.stack([lp.gather(-1, labels[..., None]).squeeze(-1).mean(-1) for lp in teacher_lp], dim=-1)
        w = torch.softmax(scores / 0.5 + prior.log(), -1)
    else:
        w = prior.expand(ids.shape[0], 2)
    tempered = [torch.log_softmax(lp / 2.0, -1) for lp in teacher_lp]
    if rule == "mixture":
        target = sum(w[:, k, None, None] * tempered[k].exp() for k in range(2))
    else:
        target = torch.softmax(sum(w[:, k, None, None] * tempered[k] for k in range(2)), -1)
    kl = (target * (target.log() - student_lp)).sum(-1)  # forward KL, times T^2
    expected = float(kl.mean()) * 4.0
    assert loss == pytest.approx(expected, rel=1e-4)


def test_mixture_trains_logs_weights_and_writes_a_card_with_every_teacher(tmp_path, corpus_tokenizer, train_rows):
    teachers = {"a": make_teacher(corpus_tokenizer, 1), "b": make_teacher(corpus_tokenizer, 2)}
    student = make_student(corpus_tokenizer)
    args = make_args(tmp_path, teacher_combination="mixture", teacher_weighting="confidence")
    trainer = MultiTeacherDistillationTrainer(
        model=student,
        teachers=teachers,
        args=args,
        train_dataset=train_rows.remove_columns("teacher"),
        processing_class=corpus_tokenizer,
    )
    trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["teacher_weight/a"] + logged["teacher_weight/b"] == pytest.approx(1.0)
    assert logged["kd_loss/a"] > 0 and logged["kd_loss/b"] > 0
    trainer.save_model()
    card = (tmp_path / "README.md").read_text()
    assert "teacher 'a': mixture, confidence" in card and "teacher 'b': mixture, confidence" in card


def test_lazy_teachers_load_on_first_use(tmp_path, corpus_tokenizer, train_rows):
    folders = {}
    for name, seed in (("a", 1), ("b", 2)):
        folders[name] = tmp_path / name
        make_teacher(corpus_tokenizer, seed).save_pretrained(folders[name])
        corpus_tokenizer.save_pretrained(folders[name])
    args = make_args(tmp_path / "out", teachers={k: str(v) for k, v in folders.items()}, lazy_teacher_loading=True)
    trainer = MultiTeacherDistillationTrainer(
        model=make_student(corpus_tokenizer),
        args=args,
        train_dataset=train_rows.filter(lambda r: r["teacher"] == "a"),
        processing_class=corpus_tokenizer,
    )
    assert trainer.teachers == {"a": None, "b": None}
    trainer.train()
    assert trainer.teachers["a"] is not None and trainer.teachers["b"] is None  # 'b' was never needed


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_input_is_refused_before_training(tmp_path, corpus_tokenizer, train_rows):
    teachers = {"a": make_teacher(corpus_tokenizer, 1), "b": make_teacher(corpus_tokenizer, 2)}
    student = make_student(corpus_tokenizer)

    def build(rows=train_rows, teachers=teachers, **overrides):
        return MultiTeacherDistillationTrainer(
            model=student,
            teachers=teachers,
            args=make_args(tmp_path, **overrides),
            train_dataset=rows,
            processing_class=corpus_tokenizer,
        )

    with pytest.raises(ValueError, match=r"unknown teacher\(s\) \['c'\] in column 'teacher'"):
        build(rows=train_rows.map(lambda row: {"teacher": "c" if row["teacher"] == "b" else "a"}))
    with pytest.raises(ValueError, match="has no column 'teacher'"):
        build(rows=train_rows.remove_columns("teacher"))
    with pytest.raises(ValueError, match=r"teacher_weights\['b'\]=-1.0 must be a finite number >= 0"):
        build(teacher_combination="mixture", teacher_weights={"a": 1.0, "b": -1.0})
    with pytest.raises(ValueError, match=r"no weight for teacher\(s\) \['b'\]"):
        build(teacher_combination="mixture", teacher_weights={"a": 1.0})
    with pytest.raises(ValueError, match=r"unknown teacher\(s\) \['z'\]"):
        build(teacher_combination="mixture", teacher_weights={"a": 1.0, "b": 1.0, "z": 1.0})
    with pytest.raises(ValueError, match=r"route_weights names unknown teacher\(s\) \['z'\]"):
        build(route_weights={"a": 1.0, "z": 2.0})
    with pytest.raises(ValueError, match=r"route_weights\['b'\]=nan must be a finite number >= 0"):
        build(route_weights={"b": float("nan")})
    with pytest.raises(ValueError, match="route_weights=.* weighs routed rows.*use teacher_weights"):
        make_args(tmp_path, teacher_combination="mixture", route_weights={"a": 2.0})
    with pytest.raises(ValueError, match="confidence_temperature=0.0 must be > 0"):
        make_args(tmp_path, confidence_temperature=0.0)
    with pytest.raises(ValueError, match="teacher_combination='vote' is not known"):
        make_args(tmp_path, teacher_combination="vote")
    with pytest.raises(ValueError, match="teachers=.* must be a non-empty dict"):
        build(teachers={})
    with pytest.raises(ValueError, match=r"teacher 'b' \(.*missing.*\) cannot be used"):
        build(teachers={"a": teachers["a"], "b": str(tmp_path / "missing")})
    other = build_tiny_causal_lm("llama", 300, seed=3)
    with pytest.raises(ValueError, match=r"teacher .b. .*cannot be used: .*(cross-tokenizer|CrossTokenizer)"):
        build(
            teachers={"a": teachers["a"], "b": other},
            teacher_combination="mixture",
            rows=train_rows.remove_columns("teacher"),
        )


# ---------------------------------------------------------------------------------------------- across tokenizers


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    from hf_interop.loading import load_gpt2_tokenizer

    return load_gpt2_tokenizer()


def cross_tokenizer_setup(corpus_tokenizer, gpt2_tokenizer):
    """A GPT-2-tokenizer student; teacher 'corpus' (the 512-token corpus tokenizer), teacher 'gpt2' (the student's)."""
    student = build_tiny_causal_lm("gpt2", len(gpt2_tokenizer), seed=1, tokenizer=gpt2_tokenizer)
    teachers = {
        "corpus": build_tiny_causal_lm("llama", len(corpus_tokenizer), seed=2, tokenizer=corpus_tokenizer),
        "gpt2": build_tiny_causal_lm("llama", len(gpt2_tokenizer), seed=3, tokenizer=gpt2_tokenizer),
    }
    tokenizers = {"corpus": corpus_tokenizer, "gpt2": gpt2_tokenizer}
    return student, teachers, tokenizers


def test_cross_tokenizer_teachers_combined_on_a_hand_checked_alignment(tmp_path, corpus_tokenizer, gpt2_tokenizer):
    """'The cat sat.': student The|_cat|_sat|. ; corpus teacher The|_c at|_s at|. -> 2 matched, 2 unmatched spans."""
    from datasets import Dataset

    from hf_interop.losses.cross_tokenizer import span_aligned_distillation_loss
    from hf_interop.text_alignment import SpanAlignmentIndex

    student, teachers, tokenizers = cross_tokenizer_setup(corpus_tokenizer, gpt2_tokenizer)
    assert gpt2_tokenizer.tokenize("The cat sat.") == ["The", "Ġcat", "Ġsat", "."]
    assert corpus_tokenizer.tokenize("The cat sat.") == ["The", "Ġc", "at", "Ġs", "at", "."]
    rows = Dataset.from_dict({"text": ["The cat sat."]})
    args = make_args(
        tmp_path,
        cross_tokenizer=True,
        teacher_combination="mixture",
        teacher_weights={"corpus": 1.0, "gpt2": 3.0},
        kd_ratio=0.5,
        max_length=16,
        per_device_train_batch_size=1,
    )
    trainer = MultiTeacherDistillationTrainer(
        model=student,
        teachers=teachers,
        args=args,
        train_dataset=rows,
        processing_class=gpt2_tokenizer,
        teacher_processing_classes=tokenizers,
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    index = SpanAlignmentIndex.from_batch(batch, prefix="teacher_batch/corpus/alignment_")
    assert (index.num_matched, index.num_unmatched) == (2, 2)
    assert SpanAlignmentIndex.from_batch(batch, prefix="teacher_batch/gpt2/alignment_").num_matched == 4
    with torch.no_grad():
        loss = float(trainer.compute_loss(student, batch))
        student_logits = student(input_ids=batch["input_ids"]).logits.double()
        expected_kd = 0.0
        for name, weight in (("corpus", 0.25), ("gpt2", 0.75)):
            teacher_ids = batch[f"teacher_batch/{name}/teacher_input_ids"]
            teacher_logits = teachers[name](input_ids=teacher_ids).logits.double()
            index = SpanAlignmentIndex.from_batch(batch, prefix=f"teacher_batch/{name}/alignment_")
            single = span_aligned_distillation_loss(
                student_logits, teacher_logits, index, trainer._mappings[name], num_items_in_batch=4
            ).loss
            expected_kd += weight * float(single)
            if name == "gpt2":  # the same tokenizer: the span loss is the plain forward KL at the 4 positions
                student_lp = torch.log_softmax(student_logits[0, :4], -1)
                teacher_lp = torch.log_softmax(teacher_logits[0, :4], -1)
                plain = float((teacher_lp.exp() * (teacher_lp - student_lp)).sum(-1).mean())
                assert float(single) == pytest.approx(plain, rel=1e-4)
        labels = batch["labels"][0, 1:]
        ce = float(torch.nn.functional.cross_entropy(student_logits[0, :-1], labels, ignore_index=-100))
    assert loss == pytest.approx(0.5 * expected_kd + 0.5 * ce, rel=1e-5)


def test_cross_tokenizer_routing_and_training(tmp_path, corpus, corpus_tokenizer, gpt2_tokenizer):
    from hf_interop.text_alignment import split_texts_into_chunks

    student, teachers, tokenizers = cross_tokenizer_setup(corpus_tokenizer, gpt2_tokenizer)
    counters = {name: ForwardCounter(model) for name, model in teachers.items()}
    rows = split_texts_into_chunks(corpus["train"].select(range(2)), gpt2_tokenizer, max_tokens=24).select(range(4))
    rows = rows.add_column("teacher", ["corpus", "gpt2", "gpt2", "corpus"])
    before = weights(student)
    args = make_args(tmp_path, cross_tokenizer=True, max_length=24, max_steps=1)
    trainer = MultiTeacherDistillationTrainer(
        model=student,
        teachers=teachers,
        args=args,
        train_dataset=rows,
        processing_class=gpt2_tokenizer,
        teacher_processing_classes=tokenizers,
    )
    trainer.train()
    assert any(not torch.equal(before[name], tensor) for name, tensor in weights(student).items())
    assert counters["corpus"].calls == 1 and counters["gpt2"].calls == 1
    assert counters["corpus"].rows[0].shape[0] == 2 and counters["gpt2"].rows[0].shape[0] == 2
    logged = trainer.state.log_history[0]
    assert logged["kd_loss/corpus"] > 0 and logged["kd_loss/gpt2"] > 0
    assert 0 <= logged["top1_agreement/gpt2"] <= 1
    # the student's own tokenizer: every span matched; the corpus tokenizer cuts some spans differently
    assert logged["matched_span_fraction/gpt2"] == 1.0
    assert 0 < logged["matched_span_fraction/corpus"] < 1


def test_prefix_projection_reaches_each_cross_tokenizer_teachers_loss(
    tmp_path, corpus, corpus_tokenizer, gpt2_tokenizer
):
    """`unmatched_vocabulary="prefix"` builds every cross-tokenizer teacher's projection, and the matched-span loss
    changes with it (the 512-token corpus tokenizer lacks most GPT-2 strings, so the rest bucket held most mass)."""
    from hf_interop.text_alignment import split_texts_into_chunks

    rows = split_texts_into_chunks(corpus["train"].select(range(2)), gpt2_tokenizer, max_tokens=24).select(range(4))
    losses_of = {}
    for unmatched in ("bucket", "prefix"):
        student, teachers, tokenizers = cross_tokenizer_setup(corpus_tokenizer, gpt2_tokenizer)
        args = make_args(
            tmp_path / unmatched, cross_tokenizer=True, max_length=24, max_steps=1, teacher_combination="mixture"
        )
        args.unmatched_vocabulary = unmatched
        trainer = MultiTeacherDistillationTrainer(
            model=student,
            teachers={"corpus": teachers["corpus"]},
            args=args,
            train_dataset=rows,
            processing_class=gpt2_tokenizer,
            teacher_processing_classes={"corpus": tokenizers["corpus"]},
        )
        trainer.train()
        mapping = trainer._mappings["corpus"]
        assert (mapping.teacher_to_student is not None) == (unmatched == "prefix")
        losses_of[unmatched] = trainer.state.log_history[0]["kd_loss/corpus"]
    assert math.isfinite(losses_of["prefix"]) and losses_of["prefix"] != losses_of["bucket"]


def test_cross_tokenizer_bad_input(tmp_path, corpus, corpus_tokenizer, gpt2_tokenizer, packed_corpus):
    student, teachers, tokenizers = cross_tokenizer_setup(corpus_tokenizer, gpt2_tokenizer)
    with pytest.raises(ValueError, match="teacher_combination='product' multiplies distributions over one vocabulary"):
        make_args(tmp_path, cross_tokenizer=True, teacher_combination="product")
    with pytest.raises(
        ValueError, match="loss_type='uld' compares models across tokenizers; set cross_tokenizer=True"
    ):
        make_args(tmp_path, loss_type="uld")
    args = make_args(tmp_path, cross_tokenizer=True, teacher_combination="mixture")
    with pytest.raises(ValueError, match="no 'text'; with cross_tokenizer=True"):
        MultiTeacherDistillationTrainer(
            model=student,
            teachers=teachers,
            args=args,
            train_dataset=packed_corpus["train"],
            processing_class=gpt2_tokenizer,
        )
    # without cross_tokenizer=True, a teacher with another tokenizer is refused and the message says what to set
    with pytest.raises(ValueError, match=r"teacher 'corpus' .*cannot be used: .*cross_tokenizer=True"):
        MultiTeacherDistillationTrainer(
            model=student,
            teachers=teachers,
            args=make_args(tmp_path, teacher_combination="mixture"),
            processing_class=gpt2_tokenizer,
            teacher_processing_classes=tokenizers,
        )


# ---------------------------------------------------------------------------------------------- two processes

_DDP_SCRIPT = """
import os
import sys
import torch
from datasets import load_from_disk
from transformers import AutoModelForCausalLM, AutoTokenizer
from hf_interop import MultiTeacherDistillationConfig, MultiTeacherDistillationTrainer

student_dir, teacher_a, teacher_b, data_dir, output_dir, batch_size = sys.argv[1:7]
tokenizer = AutoTokenizer.from_pretrained(student_dir)
for combination in ("route", "mixture"):
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    args = MultiTeacherDistillationConfig(
        output_dir=output_dir, max_steps=1, per_device_train_batch_size=int(batch_size), optim="sgd",
        learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=0.0, loss_chunk_size=16, report_to="none",
        use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=1, seed=0,
        teachers={"a": teacher_a, "b": teacher_b}, teacher_combination=combination, teacher_weighting="confidence",
    )
    trainer = MultiTeacherDistillationTrainer(
        model=student, args=args, train_dataset=load_from_disk(data_dir), processing_class=tokenizer
    )
    trainer.train()
    if trainer.is_world_process_zero():
        weights = {name: tensor.clone() for name, tensor in student.state_dict().items()}
        torch.save(weights, f"{output_dir}/{combination}.pt")
        torch.save(trainer.state.log_history[0], f"{output_dir}/{combination}_log.pt")
trainer.accelerator.wait_for_everyone()
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)  # skip interpreter teardown (see tests/distill/test_distillation_trainer.py)
"""


@pytest.mark.slow
def test_two_processes_of_4_equal_one_process_of_8(tmp_path, corpus_tokenizer, train_rows):
    """Routing and confidence-weighted mixing under DDP over gloo (2 CPU ranks, torchrun) equal one process."""
    import os
    import subprocess
    import sys

    folders = {}
    for name, model in (
        ("student", make_student(corpus_tokenizer)),
        ("a", make_teacher(corpus_tokenizer, 1)),
        ("b", make_teacher(corpus_tokenizer, 2)),
    ):
        folders[name] = tmp_path / name
        model.save_pretrained(folders[name])
        corpus_tokenizer.save_pretrained(folders[name])
    # uneven label masks, so the two ranks hold different numbers of valid tokens
    rows = train_rows.map(
        lambda row, index: {"labels": [-100] * (7 * index) + list(row["labels"][7 * index :])}, with_indices=True
    )
    rows.save_to_disk(str(tmp_path / "data"))
    script = tmp_path / "ddp_train.py"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    outputs = {}
    for processes, batch_size in ((2, 4), (1, 8)):
        output_dir = tmp_path / f"out{processes}"
        output_dir.mkdir()
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        command += [str(script), str(folders["student"]), str(folders["a"]), str(folders["b"])]
        command += [str(tmp_path / "data"), str(output_dir), str(batch_size)]
        completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert completed.returncode == 0, completed.stderr[-6000:]
        outputs[processes] = output_dir
    initial = make_student(corpus_tokenizer).state_dict()
    for combination in ("route", "mixture"):
        one, two = (torch.load(outputs[n] / f"{combination}.pt") for n in (1, 2))
        assert any(not torch.equal(initial[name], one[name]) for name in initial)
        for name in one:
            torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6)
        logs = [torch.load(outputs[n] / f"{combination}_log.pt") for n in (1, 2)]
        for key in ("kd_loss/a", "kd_loss/b", "loss"):
            assert logs[1][key] == pytest.approx(logs[0][key], rel=1e-5)


# ---------------------------------------------------------------------------------------------- served teachers


@pytest.fixture(scope="module")
def served_blocks(corpus, smollm2_tokenizer):
    from hf_interop import pack_dataset

    blocks = pack_dataset(corpus, smollm2_tokenizer, block_size=24)["train"].select(range(8))
    return blocks.add_column("teacher", ["a", "a", "b", "a", "b", "b", "a", "b"])


def _served_prompts(engine, length):
    return [
        tuple(request["body"]["prompt"])
        for request in engine.requests
        if request["path"].endswith("/completions") and len(request["body"].get("prompt", [])) == length
    ]


def test_served_teachers_are_asked_only_for_their_rows(tmp_path, smollm2_tokenizer, served_blocks):
    """Two teachers behind two servers: each is asked only for its rows; the routed loss is the token-weighted sum of
    each served teacher's single-teacher loss on its rows."""
    from served_engine import ServedEngine

    from hf_interop import DistillationConfig

    def tiny(seed):
        return build_tiny_causal_lm("llama", 49152, seed=seed, tokenizer=smollm2_tokenizer)

    student = tiny(0)
    with ServedEngine(tiny(1), smollm2_tokenizer) as engine_a, ServedEngine(tiny(2), smollm2_tokenizer) as engine_b:
        urls = {"a": engine_a.url, "b": engine_b.url}
        args = make_args(tmp_path, per_device_train_batch_size=8, teacher_top_k=8, loss_chunk_size=0)
        trainer = MultiTeacherDistillationTrainer(
            model=student, teachers=urls, args=args, train_dataset=served_blocks, processing_class=smollm2_tokenizer
        )
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        with torch.no_grad():
            loss = float(trainer.compute_loss(student, batch))
        for name, engine in (("a", engine_a), ("b", engine_b)):
            expected = {tuple(r["input_ids"]) for r in served_blocks if r["teacher"] == name}
            assert set(_served_prompts(engine, 24)) == expected  # only its own rows
        expected_loss = 0.0
        total_tokens = 8 * 23
        for name, url in urls.items():
            rows = served_blocks.filter(lambda row, name=name: row["teacher"] == name).remove_columns("teacher")
            single_args = DistillationConfig(
                output_dir=str(tmp_path / name),
                teacher_url=url,
                teacher_top_k=8,
                loss_chunk_size=0,
                report_to="none",
                use_cpu=True,
                per_device_train_batch_size=len(rows),
            )
            single = DistillationTrainer(
                model=student, args=single_args, train_dataset=rows, processing_class=smollm2_tokenizer
            )
            sub = single._prepare_inputs(next(iter(single.get_train_dataloader())))
            with torch.no_grad():
                expected_loss += float(single.compute_loss(student, sub)) * int((sub["labels"][:, 1:] != -100).sum())
        assert loss == pytest.approx(expected_loss / total_tokens, rel=1e-5)

        mixed_args = make_args(
            tmp_path / "mixed", teacher_combination="mixture", teacher_weighting="confidence", teacher_top_k=8
        )
        mixed = MultiTeacherDistillationTrainer(
            model=tiny(0),
            teachers=urls,
            args=mixed_args,
            train_dataset=served_blocks.remove_columns("teacher"),
            processing_class=smollm2_tokenizer,
        )
        mixed.train()
        logged = mixed.state.log_history[0]
        assert logged["teacher_weight/a"] + logged["teacher_weight/b"] == pytest.approx(1.0)
        assert logged["kd_loss/a"] > 0 and logged["kd_loss/b"] > 0


# ---------------------------------------------------------------------------------------------- cached teachers


def test_cached_teachers_route_like_their_single_teacher_caches(tmp_path, corpus_tokenizer, train_rows):
    """Each teacher read from its own cache (made on its own rows): the routed loss is the token-weighted sum of the
    single-teacher cached losses; a cache made on other rows is refused naming the teacher."""
    from hf_interop import cache_teacher_logits

    student = make_student(corpus_tokenizer)
    caches = {}
    for name, seed in (("a", 1), ("b", 2)):
        rows = train_rows.filter(lambda row, name=name: row["teacher"] == name).remove_columns("teacher")
        cache = cache_teacher_logits(
            make_teacher(corpus_tokenizer, seed),
            rows,
            tmp_path / f"cache_{name}",
            top_k=16,
            tokenizer=corpus_tokenizer,
            show_progress=False,
            encoding="float16",
        )
        caches[name] = (str(cache.path), rows)
    args = make_args(tmp_path / "multi", per_device_train_batch_size=8, loss_chunk_size=0)
    trainer = MultiTeacherDistillationTrainer(
        model=student,
        teachers={name: path for name, (path, _) in caches.items()},
        args=args,
        train_dataset=train_rows,
        processing_class=corpus_tokenizer,
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with torch.no_grad():
        loss = float(trainer.compute_loss(student, batch))
    expected = 0.0
    for name, (path, rows) in caches.items():
        single = DistillationTrainer(
            model=student,
            args=make_single_args(
                tmp_path / name, teacher_logits_path=path, loss_chunk_size=0, per_device_train_batch_size=len(rows)
            ),
            train_dataset=rows,
            processing_class=corpus_tokenizer,
        )
        sub = single._prepare_inputs(next(iter(single.get_train_dataloader())))
        with torch.no_grad():
            expected += float(single.compute_loss(student, sub)) * int((sub["labels"][:, 1:] != -100).sum())
    assert loss == pytest.approx(expected / int((batch["labels"][:, 1:] != -100).sum()), rel=1e-5)
    trainer.train()
    assert trainer.state.log_history[0]["kd_loss/a"] > 0

    swapped = {"a": caches["b"][0], "b": caches["a"][0]}  # each cache made on the other teacher's rows
    with pytest.raises(ValueError, match="teacher 'a' is a cache made on other rows than the rows of train_dataset"):
        MultiTeacherDistillationTrainer(
            model=student,
            teachers=swapped,
            args=make_args(tmp_path / "bad"),
            train_dataset=train_rows,
            processing_class=corpus_tokenizer,
        )


def test_a_sampled_cache_teacher_is_refused_where_frequencies_would_bias_the_loss(
    tmp_path, corpus_tokenizer, train_rows
):
    from hf_interop import cache_teacher_logits

    rows = train_rows.remove_columns("teacher")
    cache = cache_teacher_logits(
        make_teacher(corpus_tokenizer, 1), rows, tmp_path / "sampled", tokenizer=corpus_tokenizer, show_progress=False
    )
    assert cache.sample_draws == 64  # the default for an in-process teacher
    for overrides, message in (
        ({"teacher_combination": "mixture", "loss_type": "jsd"}, r"is a sampled cache .*got loss_type='jsd'"),
        ({"teacher_combination": "product"}, r"teacher 'a' is a sampled cache \(draw frequencies\): a product"),
    ):
        with pytest.raises(ValueError, match=message):
            MultiTeacherDistillationTrainer(
                model=make_student(corpus_tokenizer),
                teachers={"a": str(cache.path)},
                args=make_args(tmp_path / "out", **overrides),
                train_dataset=rows,
                processing_class=corpus_tokenizer,
            )


def test_each_teacher_by_path_is_placed_by_its_own_device_map(tmp_path, corpus_tokenizer, train_rows):
    folders = {}
    for name, seed in (("a", 1), ("b", 2)):
        folders[name] = str(tmp_path / name)
        make_teacher(corpus_tokenizer, seed).save_pretrained(folders[name])
        corpus_tokenizer.save_pretrained(folders[name])
    args = make_args(tmp_path / "out", teachers=folders, teacher_device_maps={"a": "auto"}, max_steps=1)
    trainer = MultiTeacherDistillationTrainer(
        model=make_student(corpus_tokenizer), args=args, train_dataset=train_rows, processing_class=corpus_tokenizer
    )
    # dispatched by Accelerate with its own (inferred) map; a CPU-only machine has one device to put it on
    assert set(trainer.teachers["a"].hf_device_map.values()) == {"cpu"}
    assert getattr(trainer.teachers["b"], "hf_device_map", None) is None  # the student's device, as one teacher
    assert not any(p.requires_grad for teacher in trainer.teachers.values() for p in teacher.parameters())
    trainer.train()
    with pytest.raises(ValueError, match=r"teacher_device_maps names unknown teacher\(s\) \['c'\]"):
        make_args(tmp_path, teachers=folders, teacher_device_maps={"c": "cpu"})


@pytest.mark.gpu
def test_gpu_teachers_on_their_own_devices_mixed_in_bf16(tmp_path, corpus_tokenizer, train_rows):
    """Teacher 'a' on the last GPU, teacher 'b' on the CPU, the student on cuda:0 in bf16 autocast."""
    teachers = {"a": make_teacher(corpus_tokenizer, 1), "b": make_teacher(corpus_tokenizer, 2)}
    last = f"cuda:{torch.cuda.device_count() - 1}"
    args = make_args(
        tmp_path, use_cpu=False, bf16=True, teacher_combination="mixture", teacher_device_maps={"a": last, "b": "cpu"}
    )
    trainer = MultiTeacherDistillationTrainer(
        model=make_student(corpus_tokenizer),
        teachers=teachers,
        args=args,
        train_dataset=train_rows.remove_columns("teacher"),
        processing_class=corpus_tokenizer,
    )
    assert str(next(trainer.teachers["a"].parameters()).device) == last
    assert next(trainer.teachers["b"].parameters()).device.type == "cpu"
    trainer.train()
    assert all(math.isfinite(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry)
