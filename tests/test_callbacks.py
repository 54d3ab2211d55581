"""Callbacks inside real (tiny, few-step) `transformers.Trainer` runs, and the math they rest on."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from hf_interop import DistillationConfig, evaluate_perplexity, load_causal_lm
from hf_interop.callbacks import (
    CheckpointEnsembleCallback,
    HeldOutEvaluationCallback,
    ModelCardCallback,
    ParameterScheduleCallback,
    kd_ratio_schedule,
    prediction_statistics,
    scheduled_value,
    temperature_schedule,
)
from hf_interop.model_card import ModelCardError


@pytest.fixture(scope="module")
def train_blocks(packed_corpus):
    return packed_corpus["train"].select(range(24))


@pytest.fixture(scope="module")
def heldout_blocks(packed_corpus):
    return packed_corpus["validation"].select(range(6))


@pytest.fixture
def student(tiny_model_dirs):
    model, _ = load_causal_lm(tiny_model_dirs["llama"], load_tokenizer_too=False)
    return model


@pytest.fixture(scope="module")
def teacher(tiny_model_dirs, corpus_tokenizer):
    from helpers import build_tiny_causal_lm

    return build_tiny_causal_lm("llama", len(corpus_tokenizer), seed=1, tokenizer=corpus_tokenizer)


def training_args(output_dir, args_class=TrainingArguments, **overrides):
    settings = dict(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=5e-3,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    settings.update(overrides)
    return args_class(**settings)


# ----------------------------------------------------------------------------------------------------------------
# Pure math (the prediction statistics are tested in test_evaluation.py)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine", "step"])
def test_schedules_start_end_and_monotonic(schedule):
    values = [scheduled_value(step, 9, 4.0, 1.0, schedule, num_stages=3) for step in range(9)]
    assert values[0] == 4.0
    assert values[-1] == (4.0 if schedule == "constant" else 1.0)
    assert all(later <= earlier for earlier, later in zip(values, values[1:], strict=False))
    if schedule == "linear":
        assert values[4] == pytest.approx(2.5)
    if schedule == "cosine":
        assert values[4] == pytest.approx(2.5)  # midpoint of a half cosine
        assert values[1] > 4.0 - 1.5 / 8  # flatter than linear at the start
    if schedule == "step":
        assert sorted(set(values), reverse=True) == [4.0, 2.5, 1.0]


def test_schedule_bad_input():
    with pytest.raises(ValueError, match="schedule='exponential' is not supported"):
        temperature_schedule(2.0, 1.0, schedule="exponential")
    with pytest.raises(ValueError, match="temperature schedule end=0.0 must be > 0"):
        temperature_schedule(2.0, 0.0)
    with pytest.raises(ValueError, match=r"kd_ratio schedule start=1.5 must be in \[0, 1\]"):
        kd_ratio_schedule(1.5, 0.5)
    with pytest.raises(ValueError, match="num_stages=1 must be >= 2"):
        kd_ratio_schedule(1.0, 0.0, schedule="step", num_stages=1)


# ----------------------------------------------------------------------------------------------------------------
# Inside Trainer runs
# ----------------------------------------------------------------------------------------------------------------


def test_heldout_evaluation_callback_in_trainer(tmp_path, student, teacher, train_blocks, heldout_blocks):
    callback = HeldOutEvaluationCallback(heldout_blocks, reference_model=teacher, batch_size=4)
    trainer = Trainer(
        model=student,
        args=training_args(tmp_path, save_strategy="no"),
        train_dataset=train_blocks,
        eval_dataset=heldout_blocks,
        callbacks=[callback],
    )
    trainer.train()
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert [entry["step"] for entry in evaluations] == [2, 4]
    for entry in evaluations:
        assert {"eval_heldout_perplexity", "eval_top1_agreement", "eval_kl_to_reference"} <= set(entry)
        # Same held-out text, same token counting as the Trainer's own eval loss.
        assert entry["eval_heldout_loss"] == pytest.approx(entry["eval_loss"], rel=1e-4)
        assert 0.0 <= entry["eval_top1_agreement"] <= 1.0 and entry["eval_kl_to_reference"] > 0
    assert evaluations[1]["eval_heldout_perplexity"] < evaluations[0]["eval_heldout_perplexity"]  # it learns

    # trainer.evaluate() returns them (so metric_for_best_model can use them) and they match independent numbers.
    metrics = trainer.evaluate()
    assert metrics["eval_heldout_perplexity"] == pytest.approx(
        evaluate_perplexity(student, heldout_blocks, show_progress=False)["perplexity"], rel=1e-5
    )
    assert metrics["eval_reference_perplexity"] == pytest.approx(
        evaluate_perplexity(teacher, heldout_blocks, show_progress=False)["perplexity"], rel=1e-5
    )
    with torch.no_grad():
        batch = {key: torch.tensor(heldout_blocks[key]) for key in ("input_ids", "labels")}
        statistics = prediction_statistics(
            student(input_ids=batch["input_ids"]).logits, batch["labels"], teacher(input_ids=batch["input_ids"]).logits
        )
    assert metrics["eval_kl_to_reference"] == pytest.approx(
        float(statistics["kl_sum"] / statistics["num_tokens"]), rel=1e-4
    )
    assert metrics["eval_top1_agreement"] == pytest.approx(
        float(statistics["agreement_count"] / statistics["num_tokens"])
    )


def test_heldout_evaluation_against_itself_agrees_fully(student, heldout_blocks):
    callback = HeldOutEvaluationCallback(heldout_blocks, reference_model=copy.deepcopy(student), max_batches=1)
    metrics = callback.compute(student)
    assert metrics["top1_agreement"] == 1.0
    assert metrics["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["reference_perplexity"] == pytest.approx(metrics["heldout_perplexity"], rel=1e-6)


def test_heldout_evaluation_bad_input_fails_before_training(tmp_path, student, train_blocks, heldout_blocks):
    with pytest.raises(ValueError, match="eval_dataset must be a datasets.Dataset with an `input_ids` column"):
        HeldOutEvaluationCallback(["some text"])
    with pytest.raises(ValueError, match="batch_size=0 must be a positive integer"):
        HeldOutEvaluationCallback(heldout_blocks, batch_size=0)
    from helpers import build_tiny_causal_lm

    other_vocab = build_tiny_causal_lm("llama", 600)
    callback = HeldOutEvaluationCallback(heldout_blocks, reference_model=other_vocab)
    args = training_args(tmp_path, eval_strategy="no")
    trainer = Trainer(model=student, args=args, train_dataset=train_blocks, callbacks=[callback])
    with pytest.raises(ValueError, match="reference_model vocab_size 600 != model vocab_size 512"):
        trainer.train()
    assert trainer.state.global_step == 0 and not list(tmp_path.glob("checkpoint-*"))


def _heldout_log_probs(model, blocks):
    """Float64 log p(next token) at every position, computed naively."""
    with torch.no_grad():
        input_ids = torch.tensor(blocks["input_ids"])
        log_probs = torch.log_softmax(model(input_ids=input_ids).logits.double(), -1)
    return log_probs[:, :-1].gather(-1, input_ids[:, 1:].unsqueeze(-1)).flatten()


def test_checkpoint_ensemble_callback_in_trainer(tmp_path, student, train_blocks, heldout_blocks):
    callback = CheckpointEnsembleCallback(heldout_blocks, num_checkpoints=2, batch_size=4)
    trainer = Trainer(
        model=student,
        args=training_args(tmp_path, max_steps=6, eval_strategy="no"),
        train_dataset=train_blocks,
        callbacks=[callback],
    )
    trainer.train()
    assert [entry["step"] for entry in callback.history] == [4, 6]
    assert [step for step, _ in callback.snapshots] == [4, 6]  # only the last K are kept
    logged = [entry for entry in trainer.state.log_history if "eval_ckpt_ensemble_perplexity" in entry]
    assert logged == callback.history
    final = callback.history[-1]
    assert final["eval_ckpt_ensemble_size"] == 2

    # Recompute from the checkpoints on disk with a naive float64 reference.
    members = [AutoModelForCausalLM.from_pretrained(tmp_path / f"checkpoint-{step}").eval() for step in (4, 6)]
    member_log_probs = [_heldout_log_probs(member, heldout_blocks) for member in members]
    latest = math.exp(-float(member_log_probs[-1].mean()))
    ensemble = math.exp(-float(torch.log((member_log_probs[0].exp() + member_log_probs[1].exp()) / 2).mean()))
    soup = copy.deepcopy(members[0])
    state_4, state_6 = members[0].state_dict(), members[1].state_dict()
    soup.load_state_dict({name: (state_4[name] + state_6[name]) / 2 for name in state_4})
    soup_perplexity = math.exp(-float(_heldout_log_probs(soup, heldout_blocks).mean()))
    assert final["eval_ckpt_latest_perplexity"] == pytest.approx(latest, rel=1e-4)
    assert final["eval_ckpt_ensemble_perplexity"] == pytest.approx(ensemble, rel=1e-4)
    assert final["eval_ckpt_weight_average_perplexity"] == pytest.approx(soup_perplexity, rel=1e-4)
    # Jensen: the mixture's NLL is at most the members' mean NLL.
    mean_member_nll = sum(-float(log_probs.mean()) for log_probs in member_log_probs) / 2
    assert math.log(final["eval_ckpt_ensemble_perplexity"]) <= mean_member_nll + 1e-9
    # The live model was not touched by the comparison: it is still checkpoint-6.
    assert torch.equal(student.state_dict()["model.embed_tokens.weight"], state_6["model.embed_tokens.weight"])
    saved = json.loads((tmp_path / "checkpoint-6" / "checkpoint_ensemble.json").read_text())
    assert saved["checkpoint_steps"] == [4, 6]
    assert saved["eval_ckpt_ensemble_perplexity"] == pytest.approx(final["eval_ckpt_ensemble_perplexity"])


def test_checkpoint_ensemble_bad_input(heldout_blocks):
    with pytest.raises(ValueError, match="num_checkpoints=1 must be >= 2"):
        CheckpointEnsembleCallback(heldout_blocks, num_checkpoints=1)


def test_model_card_callback_writes_a_card_in_every_checkpoint(tmp_path, student, train_blocks, heldout_blocks):
    teachers = [{"name_or_path": "org/teacher", "revision": "d" * 40}]
    callback = ModelCardCallback(kind="distilled", teachers=teachers, datasets=["pydoc_data/topics"])
    trainer = Trainer(
        model=student,
        args=training_args(tmp_path),
        train_dataset=train_blocks,
        eval_dataset=heldout_blocks,
        callbacks=[HeldOutEvaluationCallback(heldout_blocks), callback],
    )
    trainer.train()
    for step in (2, 4):
        card = ModelCard.load(tmp_path / f"checkpoint-{step}" / "README.md")
        lineage = card.data.to_dict()["hf_interop"]
        assert lineage["teachers"] == teachers
        assert lineage["hyperparameters"]["global_step"] == step
        assert lineage["hyperparameters"]["learning_rate"] == 5e-3
        results = {
            metric["type"]: metric["value"]
            for metric in card.data.to_dict()["model-index"][0]["results"][0]["metrics"]
        }
        evaluation = next(e for e in trainer.state.log_history if e.get("step") == step and "eval_loss" in e)
        assert results["loss"] == pytest.approx(evaluation["eval_loss"])
        assert results["heldout_perplexity"] == pytest.approx(evaluation["eval_heldout_perplexity"])
        assert "runtime" not in results
        lineage = json.loads((tmp_path / f"checkpoint-{step}" / "hf_interop_lineage.json").read_text())
        assert lineage["teachers"][0]["commit_hash"] == "d" * 40 and lineage["extra"] == {"global_step": step}
        assert "hf_interop_lineage.json" in card.text  # the card points at it
    assert (tmp_path / "README.md").is_file()  # and the run's own folder at the end
    assert len(callback.written) == 3


def test_model_card_callback_unresolvable_teacher_stops_before_training(tmp_path, student, train_blocks):
    from hf_interop.hub import LineageError

    callback = ModelCardCallback(kind="distilled", teachers=["org/not-in-any-cache"])
    args = training_args(tmp_path, eval_strategy="no")
    trainer = Trainer(model=student, args=args, train_dataset=train_blocks, callbacks=[callback])
    with pytest.raises(LineageError, match="teacher 'org/not-in-any-cache' could not be resolved"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_model_card_callback_bad_metadata_fails_at_construction():
    with pytest.raises(ModelCardError, match="requires `teachers`"):
        ModelCardCallback(kind="distilled")
    with pytest.raises(ModelCardError, match="kind 'student' is not a model card kind"):
        ModelCardCallback(kind="student")


class RecordingTrainer(Trainer):
    """A plain Trainer whose loss reads the scheduled knobs, as DistillationTrainer does every step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[float, float]] = []
        self.knob = 1.0

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        self.seen.append((self.args.temperature, self.args.kd_ratio, self.knob))
        return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)


def test_schedules_drive_args_and_trainer_attributes_every_step(tmp_path, student, train_blocks):
    args = training_args(tmp_path, args_class=DistillationConfig, max_steps=5, eval_strategy="no", save_strategy="no")
    callbacks = [
        temperature_schedule(3.0, 1.0, schedule="linear"),
        kd_ratio_schedule(1.0, 0.2, schedule="step", num_stages=2),
    ]
    trainer = RecordingTrainer(model=student, args=args, train_dataset=train_blocks, callbacks=callbacks)
    knob = ParameterScheduleCallback("knob", 0.0, 1.0, schedule="cosine", target=trainer)
    trainer.add_callback(knob)
    trainer.train()
    assert [seen[0] for seen in trainer.seen] == pytest.approx([3.0, 2.5, 2.0, 1.5, 1.0])
    assert [seen[1] for seen in trainer.seen] == pytest.approx([1.0, 1.0, 1.0, 0.2, 0.2])
    assert [seen[2] for seen in trainer.seen] == pytest.approx(
        [scheduled_value(s, 5, 0.0, 1.0, "cosine") for s in range(5)]
    )
    logged = [entry["temperature"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == pytest.approx([3.0, 2.5, 2.0, 1.5, 1.0])


def test_schedule_of_missing_attribute_fails_before_training(tmp_path, student, train_blocks):
    trainer = Trainer(
        model=student,
        args=training_args(tmp_path, eval_strategy="no", save_strategy="no"),
        train_dataset=train_blocks,
        callbacks=[temperature_schedule(2.0, 1.0)],
    )
    with pytest.raises(ValueError, match="TrainingArguments has no attribute 'temperature'"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_schedules_drive_the_distillation_trainer_loss(tmp_path, student, teacher, train_blocks, corpus_tokenizer):
    from hf_interop import DistillationTrainer

    class RecordingDistillationTrainer(DistillationTrainer):
        def _distillation_loss(self, *args, **kwargs):
            self.seen_temperatures.append(self.args.temperature)
            return super()._distillation_loss(*args, **kwargs)

    args = training_args(
        tmp_path, args_class=DistillationConfig, max_steps=4, eval_strategy="no", save_strategy="no", loss_chunk_size=0
    )
    trainer = RecordingDistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=train_blocks,
        processing_class=corpus_tokenizer,
        callbacks=[temperature_schedule(4.0, 1.0), kd_ratio_schedule(1.0, 0.25, schedule="cosine")],
    )
    trainer.seen_temperatures = []
    trainer.train()
    assert trainer.seen_temperatures == pytest.approx([4.0, 3.0, 2.0, 1.0])
    logged = [entry for entry in trainer.state.log_history if "kd_loss" in entry]
    expected_ratios = [scheduled_value(step, 4, 1.0, 0.25, "cosine") for step in range(4)]
    assert [entry["kd_ratio"] for entry in logged] == pytest.approx(expected_ratios)
    for entry, ratio in zip(logged, expected_ratios, strict=True):
        # The trainer's own logged total is the mixture at the scheduled kd_ratio of that step.
        assert entry["loss"] == pytest.approx(ratio * entry["kd_loss"] + (1 - ratio) * entry["ce_loss"], rel=1e-4)


def test_heldout_evaluation_with_an_ensemble_reference(student, teacher, heldout_blocks, corpus_tokenizer):
    from hf_interop import EnsembleForCausalLM

    ensemble = EnsembleForCausalLM.from_members(
        [copy.deepcopy(student), teacher], weights=[0.5, 0.5], tokenizer=corpus_tokenizer
    )
    metrics = HeldOutEvaluationCallback(heldout_blocks, reference_model=ensemble, max_batches=1).compute(student)
    with torch.no_grad():
        input_ids = torch.tensor(heldout_blocks[:8]["input_ids"])
        student_log_probs = torch.log_softmax(student(input_ids=input_ids).logits.double(), -1)[:, :-1]
        teacher_log_probs = torch.log_softmax(teacher(input_ids=input_ids).logits.double(), -1)[:, :-1]
    mixture = torch.log(0.5 * student_log_probs.exp() + 0.5 * teacher_log_probs.exp())
    kl = (mixture.exp() * (mixture - student_log_probs)).sum(-1).mean()
    agreement = (student_log_probs.argmax(-1) == mixture.argmax(-1)).double().mean()
    assert metrics["kl_to_reference"] == pytest.approx(float(kl), rel=1e-4)
    assert metrics["top1_agreement"] == pytest.approx(float(agreement))
    assert (
        0
        < metrics["kl_to_reference"]
        < float((teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(-1).mean())
    )
