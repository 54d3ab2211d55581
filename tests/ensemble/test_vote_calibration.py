"""Calibrating a classifier ensemble's soft vote (`ensemble/calibration.py`, `EnsembleConfig.vote_temperature`,
`BaggingConfig(calibrate_vote=True)`): the temperature fit against a float64 search, the ECE against a hand count,
the rescaled vote against a float64 reference, the out-of-bag fit against a naive recomputation, bad input."""

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
    assert not (tmp_path / "trained_members").exists()


def test_bagging_fits_the_vote_temperature_on_out_of_bag_votes(base_dir, labelled, tmp_path):  # noqa: F811
    """The fitted temperature equals a fit on the out-of-bag votes recomputed naively from the saved members; the
    saved ensemble's logits are the float64 soft vote divided by it; the record and the card carry it."""
    from hf_interop import EnsembleForSequenceClassification

    args = _args(BaggingConfig, tmp_path / "bag", n_estimators=3, max_samples=24, random_state=3, calibrate_vote=True)
    trainer = BaggingTrainer(str(base_dir), args, labelled)
    ensemble = trainer.train()
    models = [trainer.load_member(index) for index in range(3)]
    probabilities = trainer.member_outputs(models, labelled)["probabilities"].double()
    votes, vote_labels = [], []
    for example in range(len(labelled)):
        oob = [m for m in range(3) if example not in set(trainer.estimators_samples_[m].tolist())]
        if oob:
            votes.append(torch.stack([probabilities[m, example] for m in oob]).mean(0))
            vote_labels.append(labelled[example]["label"])
    log_votes, vote_labels = torch.stack(votes).log(), torch.tensor(vote_labels)
    temperature = trainer.vote_temperature_
    assert temperature != 1.0
    assert temperature == pytest.approx(_grid_search_temperature(log_votes, vote_labels), rel=2e-5)
    assert trainer.oob_scores_["vote_temperature"] == temperature
    assert trainer.oob_scores_["oob_log_loss_calibrated"] == pytest.approx(
        _mean_cross_entropy(log_votes, vote_labels, temperature), rel=1e-9
    )
    assert trainer.oob_scores_["oob_log_loss_calibrated"] <= trainer.oob_scores_["oob_log_loss"] + 1e-12

    saved = json.loads((tmp_path / "bag" / "config.json").read_text())
    assert saved["vote_temperature"] == pytest.approx(temperature)
    record = json.loads((tmp_path / "bag" / "ensemble_training.json").read_text())
    assert record["calibrate_vote"] is True and record["vote_temperature_"] == pytest.approx(temperature)
    assert "vote temperature (fitted out of bag)" in (tmp_path / "bag" / "README.md").read_text()

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


def test_separable_out_of_bag_votes_leave_the_vote_uncalibrated(caplog):
    """Votes that are all right have no finite best temperature (sharper is always likelier): the trainer warns and
    keeps temperature 1."""
    import logging
    from types import SimpleNamespace

    probabilities = torch.tensor([[[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.05, 0.05, 0.9]]] * 2)
    mask = np.ones((2, 3), dtype=bool)
    holder = SimpleNamespace(vote_temperature_=1.0)
    with caplog.at_level(logging.WARNING):
        scores = BaggingTrainer._calibrate_vote(holder, probabilities, mask, torch.tensor([0, 1, 2]))
    assert holder.vote_temperature_ == 1.0 and scores == {}
    assert "every out-of-bag vote is right" in caplog.text and "stays uncalibrated" in caplog.text
    # one wrong vote among confident ones: a finite temperature inside the range is applied
    labels = torch.tensor([0, 1, 0])
    scores = BaggingTrainer._calibrate_vote(holder, probabilities, mask, labels)
    assert holder.vote_temperature_ == scores["vote_temperature"] and 0.05 <= holder.vote_temperature_ <= 20
    # confident votes that are right a third of the time (chance): the best temperature flattens them to uniform,
    # far outside the range a vote is rescaled by; the trainer keeps 1 and records the fitted value
    holder.vote_temperature_ = 1.0
    chance = torch.tensor([[[0.9, 0.05, 0.05]] * 3] * 2)
    with caplog.at_level(logging.WARNING):
        scores = BaggingTrainer._calibrate_vote(holder, chance, mask, torch.tensor([0, 1, 2]))
    assert holder.vote_temperature_ == 1.0 and scores["vote_temperature_fitted"] > 20
    assert "lies outside" in caplog.text
