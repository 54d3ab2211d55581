"""Sequence-classification ensembles (`ensemble/classification.py`): voting and stacking."""

from __future__ import annotations

import math

import pytest
import torch

PROMPT = "The with statement is used to"


def _prompt(tokenizer, texts=(PROMPT,)):
    tokenizer.padding_side = "left"
    return tokenizer(list(texts), return_tensors="pt", padding=True)


# ----------------------------------------------------------------------------------------------------------------
# 8. Sequence classification: voting and stacking
# ----------------------------------------------------------------------------------------------------------------


def test_hard_vote_tie_rule():
    from hf_interop.ensemble.classification import hard_vote

    # 2 members, 3 classes: member 0 votes class 2, member 1 votes class 0 -> tie; soft vote prefers class 0.
    member_logits = torch.tensor([[[0.0, 0.0, 0.2]], [[3.0, 0.0, 0.0]]])
    logits, winners = hard_vote(member_logits)
    assert winners.tolist() == [0] and logits.argmax(-1).tolist() == [0]
    torch.testing.assert_close(logits.exp(), torch.tensor([[0.5 + 1e-6, 1e-12, 0.5]]), atol=1e-7, rtol=0)
    # exact tie in votes and soft probabilities -> the lowest class index
    symmetric = torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]]])
    assert hard_vote(symmetric)[1].tolist() == [0]
    # weighted votes: the heavier member wins
    assert hard_vote(member_logits, [0.7, 0.3])[1].tolist() == [2]


@pytest.fixture(scope="module")
def classifiers(tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    models = []
    for seed in range(3):
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            num_labels=3,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(seed)
        models.append(LlamaForSequenceClassification(config).eval())
    return models


@pytest.fixture(scope="module")
def classification_data(corpus, tokenizer, classifiers):
    """Sentences labelled by member 0's prediction: a task only member 0 solves, so stacking must find it."""
    from datasets import Dataset

    texts = [
        line.strip() for text in corpus["train"]["text"][:20] for line in text.split("\n") if len(line.strip()) > 20
    ][:160]
    encoded = tokenizer(texts, truncation=True, max_length=24)
    with torch.no_grad():
        labels = [int(classifiers[0](input_ids=torch.tensor([ids])).logits.argmax()) for ids in encoded["input_ids"]]
    dataset = Dataset.from_dict(
        {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "label": labels}
    )
    return dataset.select(range(100)), dataset.select(range(100, len(dataset)))


def test_soft_and_weighted_voting_match_references(classifiers, tokenizer):
    from hf_interop import EnsembleForSequenceClassification

    inputs = _prompt(tokenizer, [PROMPT, "Assignment statements bind names"])
    member_logits = torch.stack([model(**inputs).logits.detach() for model in classifiers])
    soft = EnsembleForSequenceClassification.from_members(classifiers, voting="soft", weights=[0.5, 0.25, 0.25])
    expected = torch.log((torch.tensor([0.5, 0.25, 0.25])[:, None, None] * member_logits.softmax(-1)).sum(0))
    torch.testing.assert_close(soft(**inputs).logits, expected, atol=1e-6, rtol=0)
    weighted = EnsembleForSequenceClassification.from_members(classifiers, voting="weighted", weights=[0.6, 0.2, 0.2])
    assert torch.equal(weighted(**inputs).logits.argmax(-1), member_logits[0].argmax(-1))  # member 0 outvotes the rest
    with pytest.raises(ValueError, match="needs weights"):
        EnsembleForSequenceClassification.from_members(classifiers, voting="weighted")


def test_stacking_learns_from_held_out_data_and_works_with_trainer(
    classifiers, classification_data, tokenizer, tmp_path
):
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from hf_interop import EnsembleForSequenceClassification

    held_out, evaluation = classification_data
    ensemble = EnsembleForSequenceClassification.from_members([(m, tokenizer) for m in classifiers], voting="hard")
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_eval_batch_size=16, report_to=[], use_cpu=True
    )

    def accuracy(prediction):
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    tokenizer.padding_side = "right"
    trainer = Trainer(
        model=ensemble,
        args=args,
        eval_dataset=evaluation,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy,
    )
    hard_accuracy = trainer.evaluate()["eval_accuracy"]
    fit = ensemble.fit_stacking(held_out, l2=0.0)
    assert ensemble.config.voting == "stacking" and fit["accuracy"] > 0.9
    metrics = trainer.evaluate()
    assert metrics["eval_accuracy"] > max(0.85, hard_accuracy) and math.isfinite(metrics["eval_loss"])
    prediction = trainer.predict(evaluation)
    batch = DataCollatorWithPadding(tokenizer)(
        [{k: evaluation[i][k] for k in ("input_ids", "attention_mask")} for i in range(16)]
    )
    torch.testing.assert_close(
        torch.tensor(prediction.predictions[:16]), ensemble(**batch).logits.detach(), atol=1e-5, rtol=0
    )


def test_classification_ensemble_round_trip_keeps_the_stacking_head(
    classifiers, classification_data, tokenizer, tmp_path
):
    from hf_interop import EnsembleForSequenceClassification

    paths = []
    for index, model in enumerate(classifiers):
        folder = tmp_path / f"classifier_{index}"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        paths.append(str(folder))
    ensemble = EnsembleForSequenceClassification.from_members(paths, voting="soft")
    ensemble.fit_stacking(classification_data[0].select(range(40)), l2=1e-2)
    ensemble.save_pretrained(tmp_path / "ens")
    assert not any(name.endswith(".bin") for name in (p.name for p in (tmp_path / "ens").iterdir()))
    reloaded = EnsembleForSequenceClassification.from_pretrained(tmp_path / "ens")
    assert reloaded.config.voting == "stacking"
    inputs = _prompt(tokenizer, [PROMPT, "Assignment statements bind names"])
    torch.testing.assert_close(reloaded(**inputs).logits, ensemble(**inputs).logits)


def test_classifiers_with_different_label_sets_are_refused(classifiers, tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from hf_interop import EnsembleForSequenceClassification

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_labels=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    with pytest.raises(ValueError, match="different numbers of labels"):
        EnsembleForSequenceClassification.from_members([classifiers[0], LlamaForSequenceClassification(config)])
    with pytest.raises(ValueError, match="members is empty"):
        EnsembleForSequenceClassification.from_members([])
