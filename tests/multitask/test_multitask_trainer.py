"""MultiTaskTrainer on a tiny Llama with real text: per-task logs and evaluation metrics, one optimizer step against
the hand-computed static sum and PCGrad, a multi-head model saved and loaded, resume equal to the uninterrupted run,
and the bad inputs refused (naming the task) before training."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from datasets import Dataset
from helpers import build_tiny_causal_lm
from multitask_data import make_config, task_datasets
from safetensors.torch import load_file

from hf_interop import MultiTaskConfig, MultiTaskModel, MultiTaskTrainer
from hf_interop.multitask.weighting import pcgrad_combine

HEADS = {"topic": {"type": "classification", "num_labels": 2}}


@pytest.fixture(scope="module")
def tasks(corpus, corpus_tokenizer):
    return task_datasets(corpus, corpus_tokenizer)


def _model(tokenizer, seed: int = 0) -> MultiTaskModel:
    torch.manual_seed(seed)
    return MultiTaskModel(build_tiny_causal_lm("llama", len(tokenizer), seed=seed, tokenizer=tokenizer), HEADS)


def _trainer(tokenizer, tasks, args, model=None) -> MultiTaskTrainer:
    train, evals = tasks
    return MultiTaskTrainer(
        model=model if model is not None else _model(tokenizer),
        args=args,
        train_dataset=train,
        eval_dataset=evals,
        processing_class=tokenizer,
    )


def test_logs_and_evaluation_report_every_task(tmp_path, corpus_tokenizer, tasks):
    args = make_config(tmp_path, task_sampling="round_robin", task_weights={"reference_a": 0.5}, max_steps=6)
    trainer = _trainer(corpus_tokenizer, tasks, args)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3
    seen = {key for entry in logged for key in entry}
    for task in ("reference_a", "reference_b", "topic"):
        assert f"{task}_loss" in seen and f"{task}_weight" in seen
    assert logged[-1]["reference_a_weight"] == 0.5 and logged[-1]["topic_weight"] == 1.0
    assert logged[-1]["reference_a_steps"] == logged[-1]["topic_steps"] == 2  # round robin: 6 steps, 3 tasks

    metrics = trainer.evaluate()
    assert metrics["eval_reference_a_perplexity"] == pytest.approx(math.exp(metrics["eval_reference_a_loss"]))
    assert 0.0 <= metrics["eval_topic_accuracy"] <= 1.0
    assert "eval_topic_perplexity" not in metrics and "eval_reference_a_accuracy" not in metrics
    expected = 0.5 * metrics["eval_reference_a_loss"] + metrics["eval_topic_loss"]
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-12)
    # the accuracy is the head's real accuracy on the held-out rows
    model = trainer.model.eval()
    rows = tasks[1]["topic"]
    correct = 0
    with torch.no_grad():
        for row in rows:
            output = model(task="topic", input_ids=torch.tensor([row["input_ids"]]))
            correct += int(output.logits.argmax(-1).item() == row["labels"])
    assert metrics["eval_topic_accuracy"] == pytest.approx(correct / len(rows))


def _first_step(tmp_path, tokenizer, tasks, **overrides):
    """One plain-SGD step (lr 1, no clipping): the initial model, the first batch and the update it received."""
    args = make_config(
        tmp_path,
        max_steps=1,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        task_sampling="all",
        **overrides,
    )
    model = _model(tokenizer)
    initial = copy.deepcopy(model)
    trainer = _trainer(tokenizer, tasks, args, model=model)
    batch = next(iter(trainer.get_train_dataloader()))["task_batches"]
    trainer.train()
    update = {name: (initial.state_dict()[name] - p).detach() for name, p in model.named_parameters()}
    return initial.train(), batch, update


def test_static_step_follows_the_hand_weighted_sum(tmp_path, corpus_tokenizer, tasks):
    weights = {"reference_a": 0.25, "reference_b": 1.0, "topic": 2.0}
    initial, batch, update = _first_step(tmp_path, corpus_tokenizer, tasks, task_weights=weights)
    parameters = dict(initial.named_parameters())
    total = sum(weights[task] * initial(task=task, **inputs).loss.double() for task, inputs in batch.items())
    gradients = torch.autograd.grad(total, list(parameters.values()), allow_unused=True)
    for (name, _), gradient in zip(parameters.items(), gradients, strict=True):
        expected = torch.zeros_like(update[name]) if gradient is None else gradient.float()
        torch.testing.assert_close(update[name], expected, rtol=1e-4, atol=1e-6, msg=name)


def test_pcgrad_step_follows_pcgrad_of_the_task_gradients(tmp_path, corpus_tokenizer, tasks):
    initial, batch, update = _first_step(tmp_path, corpus_tokenizer, tasks, task_weighting="pcgrad")
    backbone = [(n, p) for n, p in initial.named_parameters() if not n.startswith("task_heads")]
    per_task = [
        torch.autograd.grad(initial(task=t, **inputs).loss, [p for _, p in backbone], allow_unused=True)
        for t, inputs in batch.items()
    ]
    # the LM head is tied to the embeddings; every backbone parameter is reached by every task
    assert all(g is not None for grads in per_task for g in grads)
    flat = [torch.cat([g.reshape(-1) for g in grads]).double() for grads in per_task]
    conflicts = sum(float(flat[i] @ flat[j]) < 0 for i in range(3) for j in range(i + 1, 3))
    expected = pcgrad_combine(flat).float()
    got = torch.cat([update[name].reshape(-1) for name, _ in backbone])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    if conflicts:  # then PCGrad really differs from the plain sum
        assert not torch.allclose(got, sum(flat).float(), rtol=1e-4, atol=1e-6)
    head_gradient = torch.autograd.grad(initial(task="topic", **batch["topic"]).loss, initial.task_heads.parameters())
    torch.testing.assert_close(update["task_heads.topic.weight"], head_gradient[0], rtol=1e-4, atol=1e-6)


def test_multi_head_model_saves_and_loads(tmp_path, corpus_tokenizer, tasks):
    args = make_config(tmp_path / "run", max_steps=2)
    trainer = _trainer(corpus_tokenizer, tasks, args)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    loaded = MultiTaskModel.from_pretrained(tmp_path / "saved").eval()
    model = trainer.model.eval()
    ids = torch.tensor([tasks[0]["reference_a"][0]["input_ids"]])
    with torch.no_grad():
        for task in ("reference_a", "topic"):
            torch.testing.assert_close(loaded(task=task, input_ids=ids).logits, model(task=task, input_ids=ids).logits)
    assert loaded.head_specs == {"topic": {"type": "classification", "num_labels": 2}}
    state = json.loads((tmp_path / "saved" / "multitask_state.json").read_text())
    assert state["tasks"] == ["reference_a", "reference_b", "topic"] and state["task_sampling"] == "proportional"


def test_lora_backbone_with_heads_saves_adapter_and_heads(tmp_path, corpus_tokenizer, tasks):
    from peft import LoraConfig

    backbone = build_tiny_causal_lm("llama", len(corpus_tokenizer), tokenizer=corpus_tokenizer)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = make_config(tmp_path / "run", max_steps=2)
    trainer = MultiTaskTrainer(
        model=backbone,
        args=args,
        train_dataset=tasks[0],
        heads=HEADS,
        peft_config=lora,
        processing_class=corpus_tokenizer,
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "backbone" / "adapter_model.safetensors").is_file()
    with pytest.raises(ValueError, match="pass base_model="):  # a base built from a config has no folder to name
        MultiTaskModel.from_pretrained(tmp_path / "saved")
    base = build_tiny_causal_lm("llama", len(corpus_tokenizer), tokenizer=corpus_tokenizer)  # same seed, same weights
    loaded = MultiTaskModel.from_pretrained(tmp_path / "saved", base_model=base).eval()
    ids = torch.tensor([tasks[0]["topic"][0]["input_ids"]])
    with torch.no_grad():
        expected = trainer.model.eval()(task="topic", input_ids=ids).logits
        torch.testing.assert_close(loaded(task="topic", input_ids=ids).logits, expected)


@pytest.mark.parametrize("weighting", ["uncertainty", "pcgrad"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, corpus_tokenizer, tasks, weighting):
    sampling = "temperature" if weighting == "uncertainty" else "all"
    options = dict(
        max_steps=6,
        save_strategy="steps",
        save_steps=3,
        logging_steps=1,
        task_weighting=weighting,
        task_sampling=sampling,
        log_variance_learning_rate=0.05,
    )
    whole = _trainer(corpus_tokenizer, tasks, make_config(tmp_path / "whole", **options))
    whole.train()
    # a fresh trainer and model (as after a kill) resumed from the checkpoint at step 3
    resumed = _trainer(
        corpus_tokenizer, tasks, make_config(tmp_path / "resumed", **options), model=_model(corpus_tokenizer, 1)
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-3"))
    for name, value in whole.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=0, atol=1e-6, msg=name)
    if weighting == "uncertainty":
        assert whole.log_variances.abs().max() > 1e-3, "the log-variances must have moved for the check to mean much"
        torch.testing.assert_close(resumed.log_variances, whole.log_variances, rtol=0, atol=1e-7)
        saved = load_file(str(tmp_path / "whole" / "checkpoint-6" / "task_log_variances.safetensors"))
        torch.testing.assert_close(saved["log_variances"], whole.log_variances.detach())

    def per_task_losses(trainer, step):
        entry = next(e for e in trainer.state.log_history if e.get("step") == step and "loss" in e)
        return {key: value for key, value in entry.items() if key.endswith(("_loss", "_steps", "_weight"))}

    for step in (4, 5, 6):
        assert per_task_losses(resumed, step) == pytest.approx(per_task_losses(whole, step), abs=1e-6)


def test_plain_causal_lm_trains_on_several_domains(tmp_path, corpus_tokenizer, tasks):
    lm_tasks = {task: rows for task, rows in tasks[0].items() if task != "topic"}
    model = build_tiny_causal_lm("llama", len(corpus_tokenizer), tokenizer=corpus_tokenizer)
    args = make_config(tmp_path, max_steps=2, task_weighting="uncertainty")
    trainer = MultiTaskTrainer(model=model, args=args, train_dataset=lm_tasks, processing_class=corpus_tokenizer)
    trainer.train()
    trainer.save_model()
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "task_log_variances.safetensors").is_file()
    assert trainer.evaluate({"reference_a": tasks[1]["reference_a"]})["eval_reference_a_perplexity"] > 1


# ---------------------------------------------------------------------------------------------------------------
# bad input: refused before training, naming the task and the fix


def _bad_inputs(tasks, tokenizer):
    train, evals = tasks
    regression_labels = train["topic"].map(lambda row: {"labels": float(row["labels"]) + 0.37})
    out_of_range = train["topic"].map(lambda row: {"labels": row["labels"] + 5})
    foreign_ids = train["reference_a"].map(lambda row: {"input_ids": [i + 60000 for i in row["input_ids"]]})
    empty = train["reference_b"].select([])
    return {
        "unknown task in weights": (dict(task_weights={"jargon": 2.0}), train, None, HEADS, r"\['jargon'\]"),
        "unknown task in heads": (
            {},
            train,
            None,
            {**HEADS, "sentiment": {"type": "classification", "num_labels": 2}},
            r"heads for task\(s\) \['sentiment'\]",
        ),
        "empty task": ({}, {**train, "reference_b": empty}, None, HEADS, r"train_dataset\['reference_b'\] is empty"),
        "regression labels for a classification head": (
            {},
            {**train, "topic": regression_labels},
            None,
            HEADS,
            r"train_dataset\['topic'\] has label 0.37, not a class id",
        ),
        "label id out of range": (
            {},
            {**train, "topic": out_of_range},
            None,
            HEADS,
            r"label id 5, outside \[0, 2\)",
        ),
        "another tokenizer's ids": (
            {},
            {**train, "reference_a": foreign_ids},
            None,
            HEADS,
            r"train_dataset\['reference_a'\] holds token id 6\d+, outside the model's vocabulary",
        ),
        "labels per row without a head": ({}, train, None, None, r"'topic'.*no head"),
        "eval task not trained": (
            {},
            train,
            {"jargon": evals["reference_a"]},
            HEADS,
            r"eval_dataset has task 'jargon'",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "unknown task in weights",
        "unknown task in heads",
        "empty task",
        "regression labels for a classification head",
        "label id out of range",
        "another tokenizer's ids",
        "labels per row without a head",
        "eval task not trained",
    ],
)
def test_bad_input_is_refused_naming_the_task(tmp_path, corpus_tokenizer, tasks, case):
    options, train, evals, heads, message = _bad_inputs(tasks, corpus_tokenizer)[case]
    model = build_tiny_causal_lm("llama", len(corpus_tokenizer), tokenizer=corpus_tokenizer)
    with pytest.raises(ValueError, match=message):
        MultiTaskTrainer(
            model=model,
            args=make_config(tmp_path, **options),
            train_dataset=train,
            eval_dataset=evals,
            heads=heads,
            processing_class=corpus_tokenizer,
        )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(task_weights={"topic": -1.0}), r"task_weights\['topic'\]=-1.0 must be a finite number >= 0"),
        (dict(task_weights={"topic": float("nan")}), r"task_weights\['topic'\]=nan"),
        (dict(task_sampling="temperature", sampling_temperature=0.0), "sampling_temperature=0.0 must be > 0"),
        (dict(task_sampling="temperature", sampling_temperature=-2.0), "sampling_temperature=-2.0 must be > 0"),
        (dict(task_weighting="pcgrad"), "set task_sampling='all'"),
        (dict(task_sampling="uniform"), "task_sampling='uniform' is not one of"),
        (dict(task_weighting="gradnorm"), "task_weighting='gradnorm' is not one of"),
        (dict(task_weights="{not json"), "task_weights='{not json' is not valid JSON"),
    ],
)
def test_bad_settings_are_refused_by_the_config(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        MultiTaskConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **options)


def test_classification_rows_and_regression_head(tmp_path, corpus_tokenizer, tasks):
    """A regression head trains on float targets (and its mean squared error is the task loss)."""
    train = dict(tasks[0])
    train["length"] = Dataset.from_dict(
        {"input_ids": train["topic"]["input_ids"], "labels": [len(ids) / 24 for ids in train["topic"]["input_ids"]]}
    )
    heads = {**HEADS, "length": {"type": "regression"}}
    model = build_tiny_causal_lm("llama", len(corpus_tokenizer), tokenizer=corpus_tokenizer)
    trainer = MultiTaskTrainer(
        model=model,
        args=make_config(tmp_path, max_steps=4, task_sampling="round_robin"),
        train_dataset=train,
        eval_dataset={"length": train["length"].select(range(8))},
        heads=heads,
        processing_class=corpus_tokenizer,
    )
    trainer.train()
    metrics = trainer.evaluate()
    rows = train["length"].select(range(8))
    with torch.no_grad():
        predictions = torch.cat(
            [trainer.model.eval()(task="length", input_ids=torch.tensor([r["input_ids"]])).logits for r in rows]
        )
    mse = float(((predictions.squeeze(-1) - torch.tensor(rows["labels"])) ** 2).mean())
    assert metrics["eval_length_loss"] == pytest.approx(mse, rel=1e-4)
