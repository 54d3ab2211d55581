"""CrossTokenizerDistillationTrainer and its config: a student learns from a teacher whose tokenizer differs."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import build_tiny_causal_lm

from hf_interop.distill.cross_tokenizer_config import CrossTokenizerDistillationConfig
from hf_interop.distill.cross_tokenizer_trainer import CrossTokenizerDistillationTrainer
from hf_interop.loading import load_gpt2_tokenizer
from hf_interop.text_alignment import split_texts_into_chunks


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    return load_gpt2_tokenizer()


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
# real assets: SmolLM2-135M teacher, GPT-2-tokenizer student


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
