"""Bagging and boosting math (`ensemble/resampling.py`, `ensemble/boosting_math.py`, the weighted losses of
`ensemble/weighted_trainer.py`), against naive float64 references and scikit-learn's AdaBoostClassifier."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hf_interop.ensemble.boosting_math import (
    additive_token_losses,
    additive_weight_nll,
    check_sample_weight,
    loss_reweighting,
    samme_round,
    samme_staged_decision,
    samme_staged_predict,
)
from hf_interop.ensemble.resampling import (
    bootstrap_indices,
    member_sample_indices,
    oob_classification_score,
    oob_language_model_score,
    out_of_bag_mask,
    resolve_max_samples,
)

# ----------------------------------------------------------------------------------------------------------------
# Resampling and out-of-bag
# ----------------------------------------------------------------------------------------------------------------


def test_bootstrap_indices_are_reproducible_and_differ_across_members():
    first = bootstrap_indices(100, 5, max_samples=1.0, bootstrap=True, random_state=7)
    again = bootstrap_indices(100, 5, max_samples=1.0, bootstrap=True, random_state=7)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert len({tuple(indices) for indices in first}) == 5  # every member draws its own sample
    assert all(len(indices) == 100 and np.all(np.diff(indices) >= 0) for indices in first)
    # with replacement: repeats, about 63% distinct
    assert all(50 < np.unique(indices).size < 80 for indices in first)
    # a member's draw does not depend on how many members there are (a resumed run draws the same)
    assert np.array_equal(member_sample_indices(100, 3, 1.0, True, 7), first[3])
    assert not np.array_equal(bootstrap_indices(100, 1, random_state=8)[0], first[0])
    # without replacement: no repeats; counts and fractions
    pasted = bootstrap_indices(100, 3, max_samples=40, bootstrap=False, random_state=0)
    assert all(len(indices) == 40 and np.unique(indices).size == 40 for indices in pasted)
    assert resolve_max_samples(0.25, 10) == 2 and resolve_max_samples(10, 10) == 10


def test_out_of_bag_mask_matches_a_set_computation():
    samples = bootstrap_indices(30, 4, max_samples=0.7, random_state=3)
    mask = out_of_bag_mask(samples, 30)
    for member, indices in enumerate(samples):
        seen = set(indices.tolist())
        assert mask[member].tolist() == [example not in seen for example in range(30)]


def test_oob_scores_match_naive_float64_loops():
    generator = torch.Generator().manual_seed(0)
    members, examples, classes = 4, 25, 3
    probabilities = torch.softmax(torch.randn(members, examples, classes, generator=generator), -1)
    labels = torch.randint(0, classes, (examples,), generator=generator)
    samples = bootstrap_indices(examples, members, random_state=1)
    mask = out_of_bag_mask(samples, examples)
    correct = total = 0
    for example in range(examples):
        oob = [m for m in range(members) if mask[m, example]]
        if oob:
            total += 1
            correct += int(sum(probabilities[m, example].double() for m in oob).argmax() == labels[example])
    scores = oob_classification_score(probabilities, mask, labels)
    assert scores["oob_accuracy"] == pytest.approx(correct / total, abs=1e-12)
    assert scores["oob_coverage"] == pytest.approx(total / examples)

    targets = 6
    log_probs = torch.log_softmax(torch.randn(members, examples, 9, generator=generator), -1)[..., :targets]
    target_mask = torch.ones(examples, targets, dtype=torch.bool)
    target_mask[0, 4:] = False
    num_bytes = [3 * targets] * examples
    result = oob_language_model_score(log_probs, mask, target_mask, num_bytes)
    nll = tokens = bytes_ = 0.0
    for example in range(examples):
        oob = [m for m in range(members) if mask[m, example]]
        if not oob:
            continue
        bytes_ += num_bytes[example]
        for t in range(targets):
            if target_mask[example, t]:
                nll -= math.log(sum(math.exp(log_probs[m, example, t].item()) for m in oob) / len(oob))
                tokens += 1
    assert result["oob_perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-9)
    assert result["oob_bits_per_byte"] == pytest.approx(nll / math.log(2) / bytes_, rel=1e-9)


@pytest.mark.parametrize(
    ("max_samples", "match"),
    [(0.0, r"max_samples=0.0 .*\(0, 1\]"), (1.5, r"max_samples=1.5"), (11, r"\[1, 10\]"), (0, r"\[1, 10\]")],
)
def test_bad_max_samples_are_refused(max_samples, match):
    with pytest.raises(ValueError, match=match):
        resolve_max_samples(max_samples, 10)


def test_bad_sizes_and_sample_weights_are_refused():
    with pytest.raises(ValueError, match="n_estimators=0"):
        bootstrap_indices(10, 0)
    with pytest.raises(ValueError, match="at least one example"):
        resolve_max_samples(1.0, 0)
    with pytest.raises(ValueError, match="negative"):
        check_sample_weight([1.0, -0.5])
    with pytest.raises(ValueError, match="NaN"):
        check_sample_weight([1.0, float("nan")])
    with pytest.raises(ValueError, match="all zero"):
        check_sample_weight([0.0, 0.0])


# ----------------------------------------------------------------------------------------------------------------
# SAMME against scikit-learn
# ----------------------------------------------------------------------------------------------------------------


class _Schedule:
    """The predictions each boosting round's member makes, shared by the clones AdaBoost makes."""

    def __init__(self, rounds):
        self.rounds = rounds
        self.fitted = 0

    def __deepcopy__(self, memo):
        return self


def _fixed_prediction_estimator():
    from sklearn.base import BaseEstimator, ClassifierMixin

    class FixedPredictions(ClassifierMixin, BaseEstimator):
        def __init__(self, schedule=None):
            self.schedule = schedule

        def fit(self, X, y, sample_weight=None):
            self.classes_ = np.unique(y)
            self.predictions_ = self.schedule.rounds[self.schedule.fitted]
            self.schedule.fitted += 1
            return self

        def predict(self, X):
            return self.predictions_[X[:, 0].astype(int)]

    return FixedPredictions


@pytest.mark.parametrize(("num_classes", "learning_rate"), [(3, 1.0), (4, 0.5), (2, 0.8)])
def test_samme_weights_and_staged_predictions_equal_scikit_learn(num_classes, learning_rate):
    sklearn_ensemble = pytest.importorskip("sklearn.ensemble")
    rng = np.random.default_rng(num_classes)
    examples, rounds = 60, 5
    labels = rng.integers(0, num_classes, examples)
    labels[:num_classes] = np.arange(num_classes)
    predictions = []
    for _ in range(rounds):  # members right on ~70% of the examples, each on different ones
        wrong = rng.random(examples) < 0.3
        predictions.append(np.where(wrong, (labels + rng.integers(1, num_classes, examples)) % num_classes, labels))
    predictions = np.stack(predictions)
    initial = rng.random(examples) + 0.1

    reference = sklearn_ensemble.AdaBoostClassifier(
        estimator=_fixed_prediction_estimator()(_Schedule(predictions)),
        n_estimators=rounds,
        learning_rate=learning_rate,
    )
    X = np.arange(examples, dtype=float)[:, None]
    reference.fit(X, labels, sample_weight=initial)

    weights = initial / initial.sum()
    estimator_weights, estimator_errors = [], []
    for index in range(rounds):
        result = samme_round(
            weights, predictions[index], labels, num_classes, learning_rate, update_weights=index < rounds - 1
        )
        assert result.stop is None
        estimator_weights.append(result.estimator_weight)
        estimator_errors.append(result.estimator_error)
        weights = result.sample_weight
    np.testing.assert_allclose(estimator_weights, reference.estimator_weights_, rtol=0, atol=1e-9)
    np.testing.assert_allclose(estimator_errors, reference.estimator_errors_, rtol=0, atol=1e-9)
    staged = samme_staged_predict(predictions, estimator_weights, num_classes)
    for ours, theirs in zip(staged, reference.staged_predict(X), strict=True):
        assert np.array_equal(ours, theirs)
    decision = samme_staged_decision(predictions, estimator_weights, num_classes)[-1]
    expected = reference.decision_function(X)
    if num_classes == 2:
        decision = decision[:, 1] - decision[:, 0]
    np.testing.assert_allclose(decision, expected, rtol=0, atol=1e-9)


def test_samme_stops_at_chance_and_on_a_perfect_member():
    labels = np.array([0, 1, 2, 0, 1, 2])
    weights = np.full(6, 1 / 6)
    chance = samme_round(weights, (labels + 1) % 3, labels, 3)
    assert chance.stop == "chance" and chance.estimator_error == pytest.approx(1.0)
    perfect = samme_round(weights, labels, labels, 3)
    assert perfect.stop == "perfect" and perfect.estimator_weight == 1.0 and perfect.estimator_error == 0.0


# ----------------------------------------------------------------------------------------------------------------
# Causal-LM boosting math
# ----------------------------------------------------------------------------------------------------------------


def test_loss_reweighting_has_mean_one_and_follows_the_temperature():
    losses = np.array([1.0, 2.0, 4.0])
    weights = loss_reweighting(losses, temperature=1.0)
    np.testing.assert_allclose(weights, np.exp(losses) / np.exp(losses).mean(), rtol=1e-12)
    assert np.allclose(loss_reweighting(losses, math.inf), 1.0)
    flat = loss_reweighting(losses, temperature=100.0)
    assert weights.max() > flat.max() > 1.0
    with pytest.raises(ValueError, match="temperature=0"):
        loss_reweighting(losses, 0)


def test_additive_loss_equals_hand_computed_product_of_experts():
    generator = torch.Generator().manual_seed(0)
    frozen = torch.log_softmax(torch.randn(2, 5, 7, generator=generator, dtype=torch.float64), -1)
    new_logits = torch.randn(2, 5, 7, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 7, (2, 5), generator=generator)
    labels[1, 3] = -100
    losses, mask = additive_token_losses(frozen, new_logits, labels, 0.25)
    for row in range(2):
        for t in range(5):
            if labels[row, t] == -100:
                assert not mask[row, t] and losses[row, t] == 0
                continue
            scores = [
                0.75 * frozen[row, t, v].item() + 0.25 * torch.log_softmax(new_logits[row, t], -1)[v].item()
                for v in range(7)
            ]
            expected = -(scores[labels[row, t]] - math.log(sum(math.exp(s) for s in scores)))
            assert losses[row, t].item() == pytest.approx(expected, abs=1e-5)
    grid = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    totals = additive_weight_nll(frozen, torch.log_softmax(new_logits, -1), labels, grid)
    assert totals[1].item() == pytest.approx(losses.double().sum().item(), abs=1e-4)
    expected_frozen = -frozen.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)[labels != -100].sum()
    assert totals[0].item() == pytest.approx(expected_frozen.item(), abs=1e-9)
