"""Calibrating a classifier ensemble's soft vote (`ensemble/calibration.py`, `EnsembleConfig.vote_temperature`,
`BaggingConfig(calibrate_vote=True)`): the temperature fit against a float64 search, the ECE against a hand count,
the rescaled vote against a float64 reference, the fit on the examples out of every bag against a naive
recomputation, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_bagging_boosting_training import _args, base_dir, labelled  # noqa: F401  (module fixtures)

from hf_interop.ensemble.bagging import BaggingConfig, BaggingTrainer
from hf_interop.ensemble.calibration import expected_calibration_error, fit_temperature
from hf_interop.ensemble.weighted_trainer import WeightedExampleCollator


def _mean_cross_entropy(log_probs: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    scaled = log_probs.double() / temperature
    return float((torch.logsumexp(scaled, 1) - scaled.gather(1, labels[:, None]).squeeze(1)).mean())


def _grid_search_temperature(log_probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Naive reference: the best of 4001 log-spaced temperatures, refined once around the winner."""
    grid = np.logspace(-2, 2, 4001)
    best = min(grid, key=lambda t: _mean_cross_entropy(log_probs, labels, float(t)))
    fine = np.linspace(best * 0.998, best * 1.002, 2001)
    return float(min(fine, key=lambda t: _mean_cross_entropy(log_probs, labels, float(t))))


@pytest.mark.parametrize("sharpness, expected_side", [(0.25, "above"), (4.0, "below")])
def test_fitted_temperature_is_the_float64_minimum_of_the_cross_entropy(sharpness, expected_side):
    """Labels drawn from softmax(sharpness * z): predictions log_softmax(z) are overconfident when sharpness < 1
    (fitted T > 1), underconfident when > 1 (T < 1); the fit equals a grid search and keeps every argmax."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(600, 4, generator=generator, dtype=torch.float64) * 2.0
    labels = torch.multinomial(torch.softmax(sharpness * logits, -1), 1, generator=generator).squeeze(1)
    log_probs = torch.log_softmax(logits, -1)
    temperature = fit_temperature(log_probs.float(), labels)
    reference = _grid_search_temperature(log_probs, labels)
    assert temperature == pytest.approx(reference, rel=2e-5)
    assert (temperature > 1.0) if expected_side == "above" else (temperature < 1.0)
    assert _mean_cross_entropy(log_probs, labels, temperature) <= _mean_cross_entropy(log_probs, labels, 1.0)
    assert torch.equal((log_probs / temperature).argmax(-1), log_probs.argmax(-1))


def test_fit_temperature_edge_cases_and_bad_input():
    # every prediction uniform: no temperature changes anything, 1.0 is returned
    assert fit_temperature(torch.full((5, 3), -math.log(3)), torch.tensor([0, 1, 2, 0, 1])) == 1.0
    # a class with probability zero stays finite (floored), the fit still runs
    log_probs = torch.log(torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.6, 0.4, 0.0]]))
    assert math.isfinite(fit_temperature(log_probs, torch.tensor([0, 1, 1])))
    with pytest.raises(ValueError, match=r"shape \(4,\) and labels"):
        fit_temperature(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one example"):
        fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        fit_temperature(torch.zeros(2, 3), torch.tensor([0, 3]))


def test_expected_calibration_error_equals_a_hand_count():
    # 10 bins: (0.9, 1] holds 0.95 (right) and 0.95 (wrong): |0.5 - 0.95| x 2/4; (0.5, 0.6] holds 0.55 (right):
    # |1 - 0.55| x 1/4; (0.3, 0.4] holds 0.33 (wrong): |0 - 0.33| x 1/4
    confidence = torch.tensor([0.95, 0.95, 0.55, 0.33])
    correct = torch.tensor([True, False, True, False])
    expected = 0.45 * 0.5 + 0.45 * 0.25 + 0.33 * 0.25
    assert expected_calibration_error(confidence, correct, bins=10) == pytest.approx(expected, abs=1e-7)
    # perfectly calibrated bins give zero
    assert expected_calibration_error(torch.tensor([1.0, 1.0]), torch.tensor([True, True])) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="bins=0"):
        expected_calibration_error(confidence, correct, bins=0)
    with pytest.raises(ValueError, match="confidence has 4 values but correct has 3"):
        expected_calibration_error(confidence, correct[:3])


def test_classification_scores_equal_a_naive_float64_loop():
    from hf_interop.ensemble.calibration import classification_scores

    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(200, 4, generator=generator) * 3).float()
    labels = torch.randint(0, 4, (200,), generator=generator)
    accuracy = confidence_sum = log_loss = 0.0
    confidences, corrects = [], []
    for row, label in zip(logits.tolist(), labels.tolist(), strict=True):
        exps = [math.exp(value - max(row)) for value in row]
        probabilities = [value / sum(exps) for value in exps]
        best = max(range(4), key=probabilities.__getitem__)
        accuracy += best == label
        confidence_sum += probabilities[best]
        log_loss -= math.log(probabilities[label])
        confidences.append(probabilities[best])
        corrects.append(best == label)
    scores = classification_scores(logits, labels)
    assert scores["accuracy"] == pytest.approx(accuracy / 200, abs=1e-12)
    assert scores["confidence"] == pytest.approx(confidence_sum / 200, rel=1e-6)
    assert scores["log_loss"] == pytest.approx(log_loss / 200, rel=1e-6)
    reference_ece = expected_calibration_error(torch.tensor(confidences, dtype=torch.float64), torch.tensor(corrects))
    assert scores["ece"] == pytest.approx(reference_ece, abs=1e-6)
    # a shift of each row's logits changes nothing (log-probabilities and logits score alike)
    assert classification_scores(logits + 5.0, labels) == pytest.approx(scores, rel=1e-6)


def test_vote_temperature_is_validated():
    from hf_interop.ensemble.config import EnsembleConfig

    members = ["a/b", "c/d"]
    for bad in (0.0, -1.0, float("nan"), float("inf"), "2"):
        with pytest.raises(ValueError, match="vote_temperature="):
            EnsembleConfig(members=members, vote_temperature=bad)
    with pytest.raises(ValueError, match="applies to voting='soft' only"):
        EnsembleConfig(members=members, voting="hard", vote_temperature=2.0)
    assert EnsembleConfig(members=members, voting="hard").vote_temperature == 1.0


def test_calibrate_vote_is_refused_where_it_cannot_apply(base_dir, labelled, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="oob_score=False turns off"):
        _args(BaggingConfig, tmp_path, calibrate_vote=True, oob_score=False)
    with pytest.raises(ValueError, match="voting='hard' has none"):
        _args(BaggingConfig, tmp_path, calibrate_vote=True, voting="hard")
    blocks = labelled.remove_columns("label")
    with pytest.raises(ValueError, match="training data is for a causal LM"):
        BaggingTrainer(str(base_dir), _args(BaggingConfig, tmp_path, calibrate_vote=True), blocks)
    # draws that leave no example out of every bag: nothing to fit the full vote on, refused before loading
    full = _args(BaggingConfig, tmp_path, calibrate_vote=True, n_estimators=3, max_samples=1.0, bootstrap=False)
    with pytest.raises(
        ValueError, match=r"leave 0 of 64: nothing to fit on\. Use max_samples=\d+ \(or fewer members\)"
    ):
        BaggingTrainer(str(base_dir), full, labelled)
    assert not (tmp_path / "trained_members").exists()


def test_calibration_advice_leaves_examples_out_of_every_bag(labelled, caplog):  # noqa: F811
    """The max_samples the refusal advises leaves about the examples it promises out of every bag; fewer than
    MIN_CALIBRATION_EXAMPLES (but some) give a warning that names the count."""
    import logging
    import re
    from types import SimpleNamespace

    from hf_interop.ensemble.bagging import MIN_CALIBRATION_EXAMPLES, check_calibration_examples
    from hf_interop.ensemble.resampling import member_sample_indices

    for bootstrap in (True, False):
        args = SimpleNamespace(n_estimators=4, max_samples=1.0 if bootstrap else 0.6, bootstrap=bootstrap)
        draws = [member_sample_indices(1000, i, args.max_samples, bootstrap, 0) for i in range(4)]
        with caplog.at_level(logging.WARNING):
            caplog.clear()
            count = check_calibration_examples(draws, 1000, args)
        assert 0 < count < MIN_CALIBRATION_EXAMPLES and f"leave {count} of 1000" in caplog.text
        advised = int(re.search(r"max_samples=(\d+) \(or fewer members\)", caplog.text).group(1))
        # the advised draw, over seeds, leaves MIN_CALIBRATION_EXAMPLES out of every bag on average
        counts = [
            check_calibration_examples(
                [member_sample_indices(1000, i, advised, bootstrap, seed) for i in range(4)], 1000, args
            )
            for seed in range(20)
        ]
        assert abs(np.mean(counts) - MIN_CALIBRATION_EXAMPLES) < 10


def test_bagging_fits_the_vote_temperature_on_examples_out_of_every_bag(base_dir, labelled, tmp_path, caplog):  # noqa: F811
    """The fitted temperature equals a fit of the full soft vote (every member) on the examples no member drew,
    recomputed naively from the saved members (not the out-of-bag vote of fewer members, which is sharper); the
    saved ensemble's logits are the float64 soft vote divided by it; the record and the card carry it."""
    import logging

    from hf_interop import EnsembleForSequenceClassification

    args = _args(BaggingConfig, tmp_path / "bag", n_estimators=3, max_samples=12, random_state=3, calibrate_vote=True)
    with caplog.at_level(logging.WARNING):
        trainer = BaggingTrainer(str(base_dir), args, labelled)
    untouched = [e for e in range(len(labelled)) if all(e not in set(d.tolist()) for d in trainer.estimators_samples_)]
    assert 20 < len(untouched) < 64 and f"leave {len(untouched)} of 64 (a noisy fit below 100)" in caplog.text
    ensemble = trainer.train()
    models = [trainer.load_member(index) for index in range(3)]
    probabilities = trainer.member_outputs(models, labelled)["probabilities"].double()
    log_votes = torch.stack([probabilities[:, example].mean(0) for example in untouched]).log()
    vote_labels = torch.tensor([labelled[example]["label"] for example in untouched])
    assert not bool((log_votes.argmax(-1) == vote_labels).all())  # some wrong votes: a finite temperature exists
    temperature = trainer.vote_temperature_
    assert temperature != 1.0
    assert temperature == pytest.approx(_grid_search_temperature(log_votes, vote_labels), rel=2e-5)
    scores = trainer.oob_scores_
    assert scores["vote_temperature"] == temperature and scores["calibration_examples"] == len(untouched)
    assert scores["calibration_log_loss"] == pytest.approx(_mean_cross_entropy(log_votes, vote_labels, 1.0), rel=1e-9)
    assert scores["calibration_log_loss_calibrated"] == pytest.approx(
        _mean_cross_entropy(log_votes, vote_labels, temperature), rel=1e-9
    )
    assert scores["calibration_log_loss_calibrated"] <= scores["calibration_log_loss"] + 1e-12

    saved = json.loads((tmp_path / "bag" / "config.json").read_text())
    assert saved["vote_temperature"] == pytest.approx(temperature)
    record = json.loads((tmp_path / "bag" / "ensemble_training.json").read_text())
    assert record["calibrate_vote"] is True and record["vote_temperature_"] == pytest.approx(temperature)
    assert "vote temperature (fitted out of every bag)" in (tmp_path / "bag" / "README.md").read_text()

    inputs = WeightedExampleCollator(1, "sequence_classification")([labelled[i] for i in range(6)])
    inputs.pop("labels")
    reloaded = EnsembleForSequenceClassification.from_pretrained(tmp_path / "bag")
    with torch.no_grad():
        member_probabilities = torch.stack(
            [torch.softmax(member(**inputs).logits.double(), -1) for member in reloaded.members]
        )
        reference = torch.log_softmax(member_probabilities.mean(0).log() / temperature, -1)
        for model in (ensemble, reloaded):
            torch.testing.assert_close(model(**inputs).logits.double(), reference, atol=1e-5, rtol=0)


def test_separable_votes_leave_the_vote_uncalibrated(caplog):
    """Votes that are all right have no finite best temperature (sharper is always likelier): the trainer warns and
    keeps temperature 1."""
    import logging
    from types import SimpleNamespace

    probabilities = torch.tensor([[[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.05, 0.05, 0.9]]] * 2)
    mask = np.ones((2, 3), dtype=bool)
    holder = SimpleNamespace(vote_temperature_=1.0)
    with caplog.at_level(logging.WARNING):
        scores = BaggingTrainer._calibrate_vote(holder, probabilities, mask, torch.tensor([0, 1, 2]))
    assert holder.vote_temperature_ == 1.0 and "vote_temperature" not in scores and scores["calibration_examples"] == 3
    assert "right on all 3 examples" in caplog.text and "stays uncalibrated" in caplog.text
    # one wrong vote among confident ones: a finite temperature inside the range is applied
    labels = torch.tensor([0, 1, 0])
    scores = BaggingTrainer._calibrate_vote(holder, probabilities, mask, labels)
    assert holder.vote_temperature_ == scores["vote_temperature"] and 0.05 <= holder.vote_temperature_ <= 20
    # only the examples out of every bag count: an example one member drew does not enter the fit
    partial = mask.copy()
    partial[0, 2] = False  # member 0 drew example 2, the wrong one: the two left are both right
    holder.vote_temperature_ = 1.0
    scores = BaggingTrainer._calibrate_vote(holder, probabilities, partial, labels)
    assert holder.vote_temperature_ == 1.0 and scores["calibration_examples"] == 2
    # confident votes that are right a third of the time (chance): the best temperature flattens them to uniform,
    # far outside the range a vote is rescaled by; the trainer keeps 1 and records the fitted value
    chance = torch.tensor([[[0.9, 0.05, 0.05]] * 3] * 2)
    with caplog.at_level(logging.WARNING):
        scores = BaggingTrainer._calibrate_vote(holder, chance, mask, torch.tensor([0, 1, 2]))
    assert holder.vote_temperature_ == 1.0 and scores["vote_temperature_fitted"] > 20
    assert "lies outside" in caplog.text
