"""Training bagged and boosted ensembles (`ensemble/bagging.py`, `ensemble/boosting.py`, `ensemble/weighted_trainer.py`)
with tiny from-config models: sample-weighted losses, the additive loss's gradient, save/load, resume, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import TrainerCallback

from hf_interop.ensemble.bagging import BaggingConfig, BaggingTrainer
from hf_interop.ensemble.boosting import BoostingConfig, BoostingTrainer
from hf_interop.ensemble.member_training import read_training_record
from hf_interop.ensemble.weighted_trainer import (
    AdditiveBoostingTrainer,
    SampleWeightedTrainer,
    WeightedExampleCollator,
)


def _args(config_class, output_dir, **overrides):
    values = dict(
        output_dir=str(output_dir),
        max_steps=3,
        learning_rate=5e-3,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        logging_strategy="no",
    )
    values.update(overrides)
    return config_class(**values)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, corpus_tokenizer):
    """A tiny Llama (hidden 32, one layer) with the corpus tokenizer: the base of every member."""
    from helpers import build_tiny_causal_lm

    model = build_tiny_causal_lm(
        "llama",
        len(corpus_tokenizer),
        tokenizer=corpus_tokenizer,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    folder = tmp_path_factory.mktemp("bagging_base")
    model.save_pretrained(folder)
    corpus_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def labelled(corpus, corpus_tokenizer):
    """Sentences of the corpus labelled by their length (3 classes): a task a few steps can learn a little."""
    from datasets import Dataset

    lines = [line.strip() for text in corpus["train"]["text"][:30] for line in text.split("\n")]
    lines = [line for line in lines if len(line) > 20][:64]
    encoded = corpus_tokenizer(lines, truncation=True, max_length=20)
    return Dataset.from_dict({"input_ids": encoded["input_ids"], "label": [min(2, len(x) // 30) for x in lines]})


@pytest.fixture(scope="module")
def blocks(corpus, corpus_tokenizer):
    from hf_interop import pack_dataset

    return pack_dataset(corpus["train"], corpus_tokenizer, block_size=24, max_blocks=24)


@pytest.fixture(scope="module")
def held_out(corpus, corpus_tokenizer):
    from hf_interop import pack_dataset

    return pack_dataset(corpus["validation"], corpus_tokenizer, block_size=24, max_blocks=6)


# ----------------------------------------------------------------------------------------------------------------
# Sample-weighted loss: float64 reference, and gradient accumulation
# ----------------------------------------------------------------------------------------------------------------


def _classifier(base_dir, seed=0):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=3)
    model.config.pad_token_id = 1
    return model


@pytest.mark.parametrize("task", ["sequence_classification", "causal_lm"])
def test_sample_weights_change_the_loss_as_a_float64_reference(task, base_dir, labelled, blocks, tmp_path):
    from transformers import AutoModelForCausalLM

    data = labelled if task == "sequence_classification" else blocks
    rows = [data[i] for i in range(8)]
    weights = [0.0, 1.0, 2.0, 0.5, 3.0, 1.0, 0.25, 1.0]
    for row, weight in zip(rows, weights, strict=True):
        row["sample_weight"] = weight
    model = (
        _classifier(base_dir) if task == "sequence_classification" else AutoModelForCausalLM.from_pretrained(base_dir)
    )
    collator = WeightedExampleCollator(1, task)
    batch = collator(rows)
    trainer = SampleWeightedTrainer(
        model=model, args=_args(BaggingConfig, tmp_path), data_collator=collator, task=task, train_dataset=data
    )
    loss = trainer.compute_loss(model, dict(batch))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    total = normaliser = 0.0
    for row, weight in enumerate(weights):
        if task == "sequence_classification":
            total += weight * -torch.log_softmax(logits[row], -1)[batch["labels"][row]].item()
            normaliser += weight
            continue
        for t in range(batch["labels"].shape[1] - 1):
            target = batch["labels"][row, t + 1].item()
            if target != -100:
                total += weight * -torch.log_softmax(logits[row, t], -1)[target].item()
                normaliser += weight
    assert loss.item() == pytest.approx(total / normaliser, rel=1e-5)
    unweighted = trainer.compute_loss(model, {k: v for k, v in batch.items() if k != "sample_weight"})
    assert abs(unweighted.item() - loss.item()) > 1e-3  # the weights really reach the loss


@pytest.mark.parametrize("task", ["sequence_classification", "causal_lm"])
def test_a_training_step_is_normalised_by_the_training_sets_mean_weight(task, base_dir, labelled, blocks, tmp_path):
    """The optimizer step's loss is sum(w * loss) / (items * the training set's mean item weight): a batch of
    zero-weight examples gives exactly 0 (not 0 / 0 = NaN), a batch of light examples a small step (not a full one)."""
    from transformers import AutoModelForCausalLM

    data = (labelled if task == "sequence_classification" else blocks).select(range(8))
    weights = [0.0, 0.0, 0.0, 0.0, 1e-30, 2.0, 4.0, 3.0]
    data = data.add_column("sample_weight", weights)
    model = (
        _classifier(base_dir) if task == "sequence_classification" else AutoModelForCausalLM.from_pretrained(base_dir)
    )
    collator = WeightedExampleCollator(1, task)
    trainer = SampleWeightedTrainer(
        model=model, args=_args(BaggingConfig, tmp_path), data_collator=collator, task=task, train_dataset=data
    )
    items = [1.0] * 8 if task == "sequence_classification" else [len(data[i]["input_ids"]) - 1.0 for i in range(8)]
    mean_weight = sum(w * n for w, n in zip(weights, items, strict=True)) / sum(items)
    assert trainer.mean_item_weight == pytest.approx(mean_weight, rel=1e-12)
    for rows in ([0, 1, 2, 3], [4, 5, 6, 7], [3, 4]):
        batch = collator([data[i] for i in rows])
        normaliser = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
        assert float(normaliser) == pytest.approx(sum(items[i] for i in rows) * mean_weight, rel=1e-12)
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=normaliser)
        assert torch.isfinite(loss)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
        total = 0.0
        for row, index in enumerate(rows):
            if task == "sequence_classification":
                total += weights[index] * -torch.log_softmax(logits[row], -1)[batch["labels"][row]].item()
                continue
            targets = batch["labels"][row, 1:]
            picked = torch.log_softmax(logits[row, :-1], -1).gather(-1, targets.clamp_min(0)[:, None]).squeeze(-1)
            total += weights[index] * -(picked * (targets != -100)).sum().item()
        reference = total / (sum(items[i] for i in rows) * mean_weight)
        assert loss.item() == pytest.approx(reference, rel=1e-5, abs=1e-12)
        if rows == [0, 1, 2, 3]:
            assert loss.item() == 0.0


def test_one_batch_of_8_equals_4_accumulation_steps_of_2(base_dir, labelled, tmp_path):
    data = labelled.select(range(8)).add_column("sample_weight", [0.0, 1.0, 2.0, 0.5, 3.0, 1.0, 0.25, 1.0])
    results = []
    for batch_size, accumulation in ((8, 1), (2, 4)):
        model = _classifier(base_dir)
        args = _args(
            BaggingConfig,
            tmp_path / f"b{batch_size}",
            max_steps=1,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            optim="sgd",
            learning_rate=1.0,
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
        )
        trainer = SampleWeightedTrainer(
            model=model,
            args=args,
            train_dataset=data,
            data_collator=WeightedExampleCollator(1, "sequence_classification"),
        )
        trainer.train()
        results.append({name: value.detach().clone() for name, value in model.named_parameters()})
    start = dict(_classifier(base_dir).named_parameters())
    moved = 0
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, atol=1e-6, rtol=1e-5)
        moved += int(not torch.equal(value, start[name]))
    assert moved > 0


def test_additive_loss_reaches_only_the_new_member(base_dir, blocks, tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_interop import EnsembleForCausalLM

    frozen_member = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(1)
    for parameter in frozen_member.parameters():
        parameter.data.add_(0.05 * torch.randn_like(parameter))
    frozen = EnsembleForCausalLM.from_members([frozen_member], combination="product")
    for parameter in frozen_member.parameters():
        parameter.requires_grad_(True)  # even trainable-looking earlier members must get no gradient
    new_member = AutoModelForCausalLM.from_pretrained(base_dir)
    collator = WeightedExampleCollator(1, "causal_lm")
    trainer = AdditiveBoostingTrainer(
        model=new_member,
        args=_args(BoostingConfig, tmp_path, boosting="additive"),
        data_collator=collator,
        train_dataset=blocks,
        frozen_ensemble=frozen,
        new_weight=0.5,
    )
    batch = collator([blocks[i] for i in range(2)])
    loss = trainer.compute_loss(new_member, dict(batch))
    loss.backward()
    assert all(parameter.grad is None for parameter in frozen_member.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in new_member.parameters())
    with torch.no_grad():
        frozen_lp = torch.log_softmax(frozen_member(input_ids=batch["input_ids"]).logits.double(), -1)
        new_lp = torch.log_softmax(new_member(input_ids=batch["input_ids"]).logits.double(), -1)
    combined = torch.log_softmax(0.5 * frozen_lp + 0.5 * new_lp, -1)[:, :-1]
    targets = batch["labels"][:, 1:]
    expected = -combined.gather(-1, targets[..., None]).squeeze(-1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Bagging
# ----------------------------------------------------------------------------------------------------------------


def test_bagged_lora_classifiers_save_load_and_score_out_of_bag(base_dir, labelled, tmp_path):
    from hf_interop import EnsembleForSequenceClassification

    args = _args(BaggingConfig, tmp_path / "bag", n_estimators=3, max_samples=0.75, random_state=5)
    trainer = BaggingTrainer(str(base_dir), args, labelled)
    ensemble = trainer.train()
    record = read_training_record(tmp_path / "bag")
    assert record["method"] == "bagging" and record["n_estimators"] == 3
    assert record["estimators_samples_"] == [indices.tolist() for indices in trainer.estimators_samples_]
    assert [len(indices) for indices in record["estimators_samples_"]] == [48] * 3
    card = (tmp_path / "bag" / "README.md").read_text()
    assert "bagging" in card and "estimators_samples_" in card and "oob_accuracy" in card
    # out-of-bag accuracy from the saved members equals a naive recomputation
    models = [trainer.load_member(index) for index in range(3)]
    probabilities = trainer.member_outputs(models, labelled)["probabilities"]
    correct = total = 0
    for example in range(len(labelled)):
        oob = [m for m in range(3) if example not in set(record["estimators_samples_"][m])]
        if oob:
            total += 1
            correct += int(sum(probabilities[m, example] for m in oob).argmax() == labelled[example]["label"])
    assert record["oob_score_"] == pytest.approx(correct / total)
    # the saved ensemble reloads with the same members (one shared base, LoRA adapters)
    reloaded = EnsembleForSequenceClassification.from_pretrained(tmp_path / "bag")
    inputs = WeightedExampleCollator(1, "sequence_classification")([labelled[i] for i in range(4)])
    inputs.pop("labels")
    torch.testing.assert_close(reloaded(**inputs).logits, ensemble(**inputs).logits)
    peft_models = {id(member.peft_model) for member in reloaded.members}
    assert len(peft_models) == 1  # one copy of the base weights


def test_a_classifiers_new_head_depends_on_the_seed_not_on_what_ran_before(base_dir, labelled, tmp_path):
    """The base classifier's head is drawn when the base loads: the same config gives the same head whatever the
    process drew before (so a resumed run trains its later members from the head of the earlier ones), another seed
    another head, and the global generator is left as it was."""
    heads = []
    for seed, noise in ((3, 0), (3, 1000), (4, 0)):
        torch.rand(noise)
        trainer = BaggingTrainer(str(base_dir), _args(BaggingConfig, tmp_path, seed=seed, oob_score=False), labelled)
        state = torch.get_rng_state()
        heads.append(trainer.base_model().score.weight.detach().clone())
        assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(heads[0], heads[1])
    assert not torch.equal(heads[0], heads[2])


def test_bagged_causal_lms_generate_and_report_oob_perplexity(base_dir, blocks, tmp_path):
    from hf_interop import EnsembleForCausalLM

    args = _args(BaggingConfig, tmp_path / "bag", n_estimators=2, per_device_train_batch_size=4)
    trainer = BaggingTrainer(str(base_dir), args, blocks)
    trainer.train()
    scores = trainer.oob_scores_
    assert math.isfinite(scores["oob_perplexity"]) and scores["oob_bits_per_byte"] > 0
    assert scores["oob_perplexity"] == pytest.approx(math.exp(scores["oob_nll"]))
    ensemble = EnsembleForCausalLM.from_pretrained(tmp_path / "bag")
    output = ensemble.generate(torch.tensor([blocks[0]["input_ids"][:5]]), max_new_tokens=3, do_sample=False)
    assert output.shape == (1, 8)


class _FailAtMember(TrainerCallback):
    def __init__(self, member_seed):
        self.member_seed = member_seed

    def on_step_end(self, args, state, control, **kwargs):
        if args.seed == self.member_seed:
            raise RuntimeError("simulated crash while training a member")


def test_a_failed_member_keeps_the_finished_ones_and_a_rerun_resumes(base_dir, labelled, tmp_path, monkeypatch):
    import hf_interop.ensemble.member_training as member_training

    args = _args(BaggingConfig, tmp_path / "bag", n_estimators=3, seed=10, oob_score=False)
    original = member_training.SampleWeightedTrainer.__init__

    def failing_init(self, *a, **kw):
        original(self, *a, **kw)
        self.add_callback(_FailAtMember(12))

    monkeypatch.setattr(member_training.SampleWeightedTrainer, "__init__", failing_init)
    with pytest.raises(RuntimeError, match="simulated crash"):
        BaggingTrainer(str(base_dir), args, labelled).train()
    members = tmp_path / "bag" / "trained_members"
    assert sorted(p.name for p in members.iterdir() if p.name.startswith("member_")) == ["member_000", "member_001"]
    stamp = (members / "member_000" / "adapter_model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(member_training.SampleWeightedTrainer, "__init__", original)
    trained = []
    real_train_member = BaggingTrainer.train_member
    monkeypatch.setattr(
        BaggingTrainer,
        "train_member",
        lambda self, index, *a, **kw: trained.append(index) or real_train_member(self, index, *a, **kw),
    )
    BaggingTrainer(str(base_dir), args, labelled).train()
    assert trained == [2]
    assert (members / "member_000" / "adapter_model.safetensors").stat().st_mtime_ns == stamp


def test_bad_input_is_refused_before_training(base_dir, labelled, tmp_path):
    with pytest.raises(ValueError, match="n_estimators=0"):
        _args(BaggingConfig, tmp_path, n_estimators=0)
    with pytest.raises(ValueError, match="max_samples=1.5"):
        _args(BaggingConfig, tmp_path, max_samples=1.5)
    with pytest.raises(ValueError, match=r"max_samples=100 as a count must lie in \[1, 64\]"):
        BaggingTrainer(str(base_dir), _args(BaggingConfig, tmp_path, max_samples=100), labelled)
    with pytest.raises(ValueError, match="train_dataset is empty"):
        BaggingTrainer(str(base_dir), _args(BaggingConfig, tmp_path), labelled.select([]))
    with pytest.raises(ValueError, match="match no module|nonexistent"):
        BaggingTrainer(str(base_dir), _args(BaggingConfig, tmp_path, lora_target_modules=["nonexistent"]), labelled)
    negative = labelled.add_column("sample_weight", [-1.0] + [1.0] * (len(labelled) - 1))
    with pytest.raises(ValueError, match="sample_weight.*negative"):
        BoostingTrainer(str(base_dir), _args(BoostingConfig, tmp_path), negative)
    zero = labelled.add_column("sample_weight", [0.0] * len(labelled))
    with pytest.raises(ValueError, match="all zero"):
        BoostingTrainer(str(base_dir), _args(BoostingConfig, tmp_path), zero)
    with pytest.raises(ValueError, match="boosting='additive' is for causal_lm"):
        BoostingTrainer(str(base_dir), _args(BoostingConfig, tmp_path, boosting="additive"), labelled)
    assert not (tmp_path / "trained_members").exists()


def test_a_member_that_cannot_read_its_whole_bag_is_warned_about(base_dir, labelled, tmp_path, caplog):
    """3 steps of 8 read 24 of the 64 drawn examples: the warning names both and the max_samples that fixes it;
    drawing what a member reads is quiet."""
    import logging

    with caplog.at_level(logging.WARNING):
        BaggingTrainer(str(base_dir), _args(BaggingConfig, tmp_path), labelled)
    assert "trains 3 steps = 24 examples but draws 64" in caplog.text
    assert "max_samples=24" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        BaggingTrainer(str(base_dir), _args(BaggingConfig, tmp_path, max_samples=24), labelled)
    assert "draws" not in caplog.text


# ----------------------------------------------------------------------------------------------------------------
# Boosting
# ----------------------------------------------------------------------------------------------------------------


def test_samme_boosting_records_weights_and_stages_and_reloads(base_dir, labelled, tmp_path):
    from hf_interop import EnsembleForSequenceClassification
    from hf_interop.ensemble.boosting_math import samme_round

    args = _args(BoostingConfig, tmp_path / "boost", n_estimators=3, max_steps=6)
    trainer = BoostingTrainer(str(base_dir), args, labelled)
    ensemble = trainer.train()
    count = len(trainer.estimator_weights_)
    assert count >= 1 and ensemble.config.voting == "weighted"
    # the recorded weights are SAMME's on the members' own training predictions
    labels = np.asarray(labelled["label"])
    weights = np.full(len(labelled), 1 / len(labelled))
    for index in range(count):
        predictions = trainer._train_predictions(index)[index]
        result = samme_round(
            weights, predictions, labels, trainer.num_labels, update_weights=index < args.n_estimators - 1
        )
        assert result.estimator_weight == pytest.approx(trainer.estimator_weights_[index], abs=1e-9)
        weights = result.sample_weight
    staged = trainer.staged_score(labelled)
    assert len(staged) == count and staged == pytest.approx(trainer.staged_train_score_)
    record = json.loads((tmp_path / "boost" / "ensemble_training.json").read_text())
    assert record["estimator_weights_"] == pytest.approx(trainer.estimator_weights_)
    assert "SAMME" in (tmp_path / "boost" / "README.md").read_text()
    reloaded = EnsembleForSequenceClassification.from_pretrained(tmp_path / "boost")
    inputs = WeightedExampleCollator(1, "sequence_classification")([labelled[i] for i in range(4)])
    inputs.pop("labels")
    torch.testing.assert_close(reloaded(**inputs).logits, ensemble(**inputs).logits)


def test_samme_stops_naming_the_round_of_a_member_no_better_than_chance(base_dir, labelled, tmp_path, monkeypatch):
    real_outputs = BoostingTrainer.member_outputs
    calls = []

    def worse_from_round(first_bad):
        def outputs(self, models, dataset, batch_size=None):
            result = real_outputs(self, models, dataset, batch_size)
            calls.append(1)
            if len(calls) > first_bad:  # this member predicts a wrong class everywhere
                labels = torch.tensor(dataset["label"])
                result["probabilities"] = torch.nn.functional.one_hot((labels + 1) % 3, 3).float()[None]
            return result

        return outputs

    monkeypatch.setattr(BoostingTrainer, "member_outputs", worse_from_round(0))
    with pytest.raises(ValueError, match="SAMME round 0: member 0 is no better than chance"):
        BoostingTrainer(str(base_dir), _args(BoostingConfig, tmp_path / "a", max_steps=1), labelled).train()
    calls.clear()
    monkeypatch.setattr(BoostingTrainer, "member_outputs", worse_from_round(1))
    trainer = BoostingTrainer(str(base_dir), _args(BoostingConfig, tmp_path / "b", n_estimators=3), labelled)
    trainer.train()
    assert len(trainer.estimator_weights_) == 1 and "SAMME round 1" in trainer.stopped_early_
    assert "SAMME round 1" in (tmp_path / "b" / "README.md").read_text()


def test_reweighting_uses_the_per_token_loss_and_a_diverged_member_is_named(base_dir, blocks, monkeypatch, tmp_path):
    """The next member's block weights are softmax(per-token ensemble NLL / temperature) (a summed block NLL put all
    the weight on one block); a member that leaves the training NLL non-finite stops boosting with its name, the
    earlier members kept."""
    from hf_interop.ensemble import boosting

    args = _args(BoostingConfig, tmp_path / "r", boosting="reweight", n_estimators=2, fit_weights_on_eval=False)
    trainer = BoostingTrainer(str(base_dir), args, blocks)
    trainer.train()
    losses = trainer._ensemble_block_losses([0]) / np.asarray([len(ids) - 1 for ids in blocks["input_ids"]])
    expected = np.exp((losses - losses.max()) / args.reweight_temperature)
    expected /= expected.sum()
    np.testing.assert_allclose(trainer.sample_weight_, expected, rtol=1e-6)
    assert trainer.sample_weight_.max() < 0.5  # no single block takes the member

    calls = []
    original = boosting.BoostingTrainer._ensemble_block_losses

    def diverged(self, indices):
        calls.append(indices)
        losses = original(self, indices)
        return losses * np.nan if len(indices) == 2 else losses

    monkeypatch.setattr(boosting.BoostingTrainer, "_ensemble_block_losses", diverged)
    failing = BoostingTrainer(str(base_dir), _args(BoostingConfig, tmp_path / "nan", boosting="reweight",
                                                  n_estimators=2, fit_weights_on_eval=False), blocks)  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"boosting member 1 left the ensemble's training NLL at nan"):
        failing.train()
    assert failing.member_is_saved(0) and not (tmp_path / "nan" / "config.json").exists()


@pytest.mark.parametrize("method", ["reweight", "additive"])
def test_causal_lm_boosting_builds_a_reloadable_ensemble(method, base_dir, blocks, held_out, tmp_path):
    from hf_interop import EnsembleForCausalLM

    args = _args(BoostingConfig, tmp_path / method, boosting=method, n_estimators=2, per_device_train_batch_size=4)
    trainer = BoostingTrainer(str(base_dir), args, blocks, eval_dataset=held_out)
    ensemble = trainer.train()
    assert len(trainer.estimator_weights_) == 2 and sum(trainer.estimator_weights_) == pytest.approx(1.0, abs=1e-6)
    assert ensemble.config.combination == ("mixture" if method == "reweight" else "product")
    assert all(math.isfinite(error) for error in trainer.estimator_errors_)
    reloaded = EnsembleForCausalLM.from_pretrained(tmp_path / method)
    ids = torch.tensor([blocks[0]["input_ids"]])
    torch.testing.assert_close(reloaded(input_ids=ids).logits, ensemble(input_ids=ids).logits)


# ----------------------------------------------------------------------------------------------------------------
# CLI and recipes
# ----------------------------------------------------------------------------------------------------------------

RECIPE_DIR = "recipes/smollm2-135m_bagging_boosting"


@pytest.mark.parametrize(
    ("recipe", "config"),
    [
        ("bag", "bag_lm.yaml"),
        ("bag", "bag_domains.yaml"),
        ("boost", "boost_domains.yaml"),
        ("boost", "boost_lm_additive.yaml"),
    ],
)
def test_recipe_configs_parse_and_name_their_command(recipe, config):
    import re
    from pathlib import Path

    from hf_interop.cli import RECIPES, parse_recipe_args

    path = Path(__file__).resolve().parents[2] / RECIPE_DIR / config
    script_args, ensemble_config = parse_recipe_args(RECIPES[recipe][0](), ["--config", str(path)], prog=recipe)
    assert type(ensemble_config).__name__ == ("BaggingConfig" if recipe == "bag" else "BoostingConfig")
    text = path.read_text()
    assert f"hf-interop {recipe} --config {RECIPE_DIR}/{config}" in text.split("\n\n")[0]
    for line in text.splitlines():
        match = re.match(r"^([a-z_0-9]+):(.*)$", line)
        if match and match.group(2).strip():
            assert "#" in line, f"{config}: option {match.group(1)!r} has no inline note"


def test_cli_bag_and_boost_classifiers_from_label_files(base_dir, corpus, tmp_path, capsys):
    from hf_interop import EnsembleForSequenceClassification
    from hf_interop.cli import main

    files = []
    # two classes a few steps can tell apart (as written, and in capitals), at a rate that moves a tiny model in four
    # steps: SAMME stops at a first member no better than chance, which an untrained head is as often as not
    for label, split in enumerate(("train", "validation")):
        paragraphs = [t.strip() for t in corpus[split]["text"][:6] if t.strip()]
        path = tmp_path / f"class{label}.txt"
        text = "\n\n".join(p[:200] for p in paragraphs for _ in range(2))
        path.write_text(text.upper() if label else text)
        files.append(str(path))
    common = ["--model_name_or_path", str(base_dir), "--label_files", *files, "--eval_label_files", *files]
    common += ["--max_steps", "4", "--per_device_train_batch_size", "4", "--n_estimators", "2", "--max_length", "16"]
    common += ["--learning_rate", "1e-2"]
    common += ["--report_to", "none", "--use_cpu", "true", "--save_strategy", "no", "--disable_tqdm", "true"]
    assert main(["bag", *common, "--output_dir", str(tmp_path / "bag")]) == 0
    output = capsys.readouterr().out
    assert "wrote" in output and "out of bag: oob_accuracy=" in output and "eval_accuracy" in output
    assert EnsembleForSequenceClassification.from_pretrained(tmp_path / "bag").config.voting == "soft"
    assert main(["boost", *common, "--output_dir", str(tmp_path / "boost")]) == 0
    assert "member weights:" in capsys.readouterr().out
    assert read_training_record(tmp_path / "boost")["method"] == "boosting (samme)"
    # a finished ensemble is not silently replaced
    assert main(["bag", *common, "--output_dir", str(tmp_path / "bag")]) != 0
    assert "overwrite_output_dir" in capsys.readouterr().err
    # causal LMs on packed text (the builtin corpus), additive boosting with the share fitted on held-out blocks
    lm = ["--model_name_or_path", str(base_dir), "--block_size", "24", "--max_train_blocks", "8"]
    lm += ["--max_eval_blocks", "2", "--max_steps", "1", "--per_device_train_batch_size", "4", "--n_estimators", "2"]
    lm += ["--report_to", "none", "--use_cpu", "true", "--save_strategy", "no", "--disable_tqdm", "true"]
    assert main(["boost", *lm, "--boosting", "additive", "--output_dir", str(tmp_path / "lm")]) == 0
    assert "eval_perplexity" in capsys.readouterr().out
    assert read_training_record(tmp_path / "lm")["method"] == "boosting (additive)"


@pytest.mark.slow
def test_weighted_loss_is_normalised_across_processes(tmp_path):
    """2 processes x 2 accumulation steps x 2 examples take the same step as one process with a batch of 8."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from multiprocess_weighted_loss import train_one_step

    tests_dir = Path(__file__).resolve().parents[1]
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    out = tmp_path / "two_processes.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests_dir.parent), os.environ.get("PYTHONPATH", "")])}
    command = [torchrun, "--standalone", "--nproc_per_node", "2", str(tests_dir / "multiprocess_weighted_loss.py")]
    result = subprocess.run([*command, str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    two_processes = torch.load(out)
    one_process = train_one_step(str(tmp_path / "one"), batch_size=8, accumulation=1).model
    start = dict(__import__("multiprocess_weighted_loss").build_classifier().named_parameters())
    moved = 0
    for name, value in one_process.named_parameters():
        torch.testing.assert_close(two_processes[name], value.detach(), atol=1e-6, rtol=1e-5)
        moved += int(not torch.equal(value.detach(), start[name].detach()))
    assert moved > 0
