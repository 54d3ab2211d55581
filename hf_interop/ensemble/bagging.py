"""Bagging for Transformers models: [`BaggingConfig`] and [`BaggingTrainer`].

Every member trains on its own resample of the training set (bootstrap: drawn with replacement), then the members
are averaged: a mixture of next-token distributions for causal LMs, a soft vote for classifiers. Each example's
members that did not draw it score it out of bag (`oob_score_`), an estimate of held-out quality that costs no
held-out data. As scikit-learn's `BaggingClassifier`, with LoRA members that share one copy of the base weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..logging_utils import get_logger
from .member_training import EnsembleMemberTrainer, EnsembleTrainingConfig, infer_task, label_column
from .resampling import (
    check_n_estimators,
    member_sample_indices,
    oob_classification_score,
    oob_language_model_score,
    out_of_bag_mask,
    resolve_max_samples,
)

logger = get_logger(__name__)

# Fewer examples out of every bag than this give a warning: the vote temperature is fitted on them alone.
MIN_CALIBRATION_EXAMPLES = 100

# Fitted vote temperatures outside this range are not applied: they come from out-of-bag votes that are (nearly)
# separable, where the likelihood keeps improving as the vote sharpens or flattens without bound.
SANE_TEMPERATURES = (0.05, 20.0)


def check_calibration_examples(estimators_samples: list[np.ndarray], num_examples: int, args: Any) -> int:
    """The examples no member draws (what `calibrate_vote` fits on): refuse none, warn below
    `MIN_CALIBRATION_EXAMPLES`. Returns their count."""
    count = int(out_of_bag_mask(estimators_samples, num_examples).all(0).sum())
    if count >= MIN_CALIBRATION_EXAMPLES:
        return count
    target = min(MIN_CALIBRATION_EXAMPLES, max(1, num_examples // 5))
    # the largest draw that leaves about `target` examples out of every bag (its expected count)
    members = args.n_estimators
    if args.bootstrap:
        largest = (
            math.log(target / num_examples) / (members * math.log1p(-1.0 / num_examples)) if num_examples > 1 else 0
        )
    else:
        largest = num_examples * (1.0 - (target / num_examples) ** (1.0 / members))
    advice = (
        f"max_samples={int(largest)} (or fewer members)"
        if int(largest) >= 1
        else "more training examples (or calibrate on held-out data with calibrate_vote=False)"
    )
    message = (
        f"calibrate_vote=True fits the vote's temperature on the training examples that no member draws, and the "
        f"draws of n_estimators={members} x max_samples={args.max_samples!r} leave {count} of {num_examples}"
    )
    if not count:
        raise ValueError(f"{message}: nothing to fit on. Use {advice}, or calibrate_vote=False.")
    logger.warning(f"{message} (a noisy fit below {MIN_CALIBRATION_EXAMPLES}); {advice} leaves more.")
    return count


@dataclass
class BaggingConfig(EnsembleTrainingConfig):
    r"""Configuration of [`BaggingTrainer`]: [`EnsembleTrainingConfig`] (member training, LoRA) plus the resampling.

    Args:
        n_estimators (`int`, *optional*, defaults to 4):
            Members to train (>= 1). More members average out more variance and cost one training run each.
        max_samples (`float` or `int`, *optional*, defaults to 1.0):
            Examples each member draws: a fraction in (0, 1] of the training set, or a count (int, at most its size).
        bootstrap (`bool`, *optional*, defaults to `True`):
            Draw with replacement (classic bagging, about 63% distinct examples per member at `max_samples=1.0`);
            `False` draws without replacement (pasting), which needs `max_samples` < 1 to leave examples out of bag.
        random_state (`int`, *optional*, defaults to 0):
            Seed of the resamples; member `i`'s draw depends only on `(random_state, i)`.
        oob_score (`bool`, *optional*, defaults to `True`):
            Score every training example with the members that did not draw it (accuracy for classifiers, perplexity
            and bits per byte for causal LMs). Costs one forward pass of every member over the training set.
        combination (`str`, *optional*, defaults to `"mixture"`): rule of a causal-LM ensemble (see `EnsembleConfig`).
        voting (`str`, *optional*, defaults to `"soft"`): rule of a classifier ensemble.
        calibrate_vote (`bool`, *optional*, defaults to `False`):
            Classifiers with soft voting: fit the vote's temperature (`EnsembleConfig.vote_temperature`) on the
            training examples that no member drew, so that the ensemble's confidence matches its accuracy without
            held-out data. Averaging members flattens the vote; one temperature undoes that and never changes a
            predicted class. Only the examples out of every bag see the vote that is deployed (all members): an
            example's out-of-bag vote averages fewer members, is sharper than the full vote, and a temperature fitted
            on it leaves the full vote underconfident. Needs `oob_score=True` and draws that leave examples out of
            every bag: refused before training when none is (use a smaller `max_samples`; at least
            `MIN_CALIBRATION_EXAMPLES` = 100 are advised, fewer give a warning).
    """

    n_estimators: int = field(default=4, metadata={"help": "Members to train (>= 1)."})
    max_samples: float = field(default=1.0, metadata={"help": "Fraction in (0, 1] or count of examples per member."})
    bootstrap: bool = field(default=True, metadata={"help": "Draw with replacement (False: pasting)."})
    random_state: int = field(default=0, metadata={"help": "Seed of the resamples."})
    oob_score: bool = field(default=True, metadata={"help": "Compute out-of-bag scores after training."})
    combination: str = field(default="mixture", metadata={"help": "Causal-LM combination rule."})
    voting: str = field(default="soft", metadata={"help": "Classifier voting rule."})
    calibrate_vote: bool = field(
        default=False,
        metadata={"help": "Fit the soft vote's temperature on the examples no member drew (classifiers)."},
    )

    def __post_init__(self):
        check_n_estimators(self.n_estimators)
        if isinstance(self.max_samples, float) and self.max_samples.is_integer() and self.max_samples > 1:
            self.max_samples = int(self.max_samples)  # a count given on the command line as "200.0"
        if isinstance(self.max_samples, bool) or not isinstance(self.max_samples, (int, float)):
            raise ValueError(f"max_samples={self.max_samples!r} must be a fraction in (0, 1] or a count of examples.")
        if isinstance(self.max_samples, float) and not 0.0 < self.max_samples <= 1.0:
            raise ValueError(
                f"max_samples={self.max_samples!r} as a fraction must lie in (0, 1]; use e.g. 0.8, or an int count."
            )
        if isinstance(self.max_samples, int) and self.max_samples < 1:
            raise ValueError(f"max_samples={self.max_samples!r} as a count must be >= 1.")
        if isinstance(self.random_state, bool) or not isinstance(self.random_state, int) or self.random_state < 0:
            raise ValueError(f"random_state={self.random_state!r} must be an integer >= 0.")
        if self.calibrate_vote and not self.oob_score:
            raise ValueError(
                "calibrate_vote=True fits the vote's temperature in the out-of-bag pass, which oob_score=False turns "
                "off; set oob_score=True or calibrate_vote=False."
            )
        if self.calibrate_vote and self.voting != "soft":
            raise ValueError(
                f"calibrate_vote=True rescales the soft vote's probabilities; voting={self.voting!r} has none. Use "
                "voting='soft' or calibrate_vote=False."
            )
        super().__post_init__()


class BaggingTrainer(EnsembleMemberTrainer):
    """Trains a bagged ensemble of causal LMs or sequence classifiers.

    Args:
        model (`str` or `os.PathLike`): folder or hub id of the base checkpoint every member starts from.
        args ([`BaggingConfig`]): the resampling and the training of every member.
        train_dataset (`datasets.Dataset`): tokenized `input_ids` (+ `label` for a classifier, optional `labels`
            for a causal LM).
        eval_dataset (`datasets.Dataset`, *optional*): not used for training; kept for the caller's evaluation.
        processing_class (`PreTrainedTokenizerBase`, *optional*): the base's tokenizer (loaded when omitted).

    After [`train`]: `estimators_samples_` (one sorted index array per member), `oob_score_` and `oob_scores_`
    (every out-of-bag number), and the returned ensemble, also saved to `args.output_dir`.
    """

    method = "bagging"

    def __init__(self, model: Any, args: BaggingConfig, train_dataset: Any, **kwargs: Any):
        if not isinstance(args, BaggingConfig):
            raise ValueError(f"args must be a BaggingConfig, got {type(args).__name__}.")
        # Bad sizes are refused before the base model is loaded.
        if train_dataset is None or len(train_dataset) == 0:
            raise ValueError("train_dataset is empty; bagging needs at least one tokenized example.")
        resolve_max_samples(args.max_samples, len(train_dataset))
        if args.calibrate_vote and infer_task(train_dataset, args.task) != "sequence_classification":
            raise ValueError(
                "calibrate_vote=True calibrates a classifier's soft vote, but the training data is for a causal LM "
                "(no integer `label` column); set calibrate_vote=False."
            )
        num_examples = len(train_dataset)
        # the draws depend only on the sizes and the seed: known (and checked) before the base model is loaded
        self.estimators_samples_ = [
            member_sample_indices(num_examples, index, args.max_samples, args.bootstrap, args.random_state)
            for index in range(args.n_estimators)
        ]
        if args.calibrate_vote:
            check_calibration_examples(self.estimators_samples_, num_examples, args)
        super().__init__(model, args, train_dataset, **kwargs)
        self.oob_score_: float | None = None
        self.vote_temperature_: float = 1.0
        self.oob_scores_: dict[str, float] = {}
        self._warn_if_bags_are_not_read(len(self.estimators_samples_[0]))

    def _warn_if_bags_are_not_read(self, bag_size: int) -> None:
        """A member stopped by `max_steps` before one pass over its resample reads only part of it: the rest counts
        as in bag, so each example has fewer out-of-bag members than it could (a noisier `oob_score_`)."""
        args = self.args
        if not args.oob_score or args.max_steps is None or args.max_steps <= 0:
            return
        read = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps
        read *= max(1, args.world_size)
        if read < bag_size:
            logger.warning(
                f"each member trains {args.max_steps} steps = {read} examples but draws {bag_size}: the "
                f"{bag_size - read} it never reads count as in bag, which leaves fewer out-of-bag members per example. "
                f"Set max_samples={read} to draw what a member reads."
            )

    def train(self) -> Any:
        """Train (or resume) every member, compute the out-of-bag scores, save and return the ensemble."""
        args = self.args
        progress = tqdm(range(args.n_estimators), desc="bagging members", disable=args.disable_tqdm)
        for index in progress:
            if self.member_is_saved(index):
                logger.info(f"member {index} is already trained ({self.member_dir(index)}); resuming after it.")
                continue
            subset = self.train_dataset.select(self.estimators_samples_[index].tolist())
            self.train_member(index, subset)
        indices = list(range(args.n_estimators))
        if args.oob_score:
            self.compute_oob_score()
        ensemble = self.build_ensemble(indices, None, args.combination, args.voting)
        ensemble.config.vote_temperature = self.vote_temperature_  # 1.0 unless calibrate_vote (classifiers only)
        self.save_ensemble(ensemble, self.record(), self.card())
        return ensemble

    def compute_oob_score(self) -> dict[str, float]:
        """`oob_score_` from each training example's out-of-bag members (accuracy, or perplexity for causal LMs)."""
        num_examples = len(self.train_dataset)
        mask = out_of_bag_mask(self.estimators_samples_, num_examples)
        if not mask.any():
            logger.warning("every member drew every example: no out-of-bag estimate (use max_samples < 1).")
        models = [self.load_member(index) for index in range(self.args.n_estimators)]
        outputs = self.member_outputs(models, self.train_dataset)
        if self.task == "sequence_classification":
            import torch

            labels = torch.tensor(self.train_dataset[label_column(self.train_dataset)])
            scores = oob_classification_score(outputs["probabilities"], mask, labels)
            self.oob_score_ = scores["oob_accuracy"]
            if self.args.calibrate_vote:
                scores.update(self._calibrate_vote(outputs["probabilities"], mask, labels))
        else:
            scores = oob_language_model_score(
                outputs["target_log_probs"], mask, outputs["target_mask"], outputs["num_bytes"]
            )
            self.oob_score_ = scores["oob_perplexity"]
        self.oob_scores_ = scores
        return scores

    def _calibrate_vote(self, probabilities: Any, mask: np.ndarray, labels: Any) -> dict[str, float]:
        """`vote_temperature_` fitted on the full soft vote of the examples out of every bag, and the log loss and
        ECE of that vote there before and after (fitted on the same examples, so the "after" is optimistic)."""
        import torch

        from .calibration import classification_scores, fit_temperature

        untouched = torch.as_tensor(np.asarray(mask).all(0), device=probabilities.device)
        count = int(untouched.sum())
        if not count:  # refused before training; reachable only through a direct call
            logger.warning("calibrate_vote: no example is out of every bag; the vote stays uncalibrated.")
            return {}
        # the vote the ensemble deploys (every member, uniform weights), in float64
        log_votes = probabilities[:, untouched].double().mean(0).clamp_min(1e-300).log()
        held_labels = labels.to(log_votes.device)[untouched]
        before = classification_scores(log_votes, held_labels)
        scores = {
            "calibration_examples": float(count),
            "calibration_log_loss": before["log_loss"],
            "calibration_ece": before["ece"],
        }
        if bool((log_votes.argmax(-1) == held_labels).all()):
            # every vote right: the likelihood rises without bound as the vote sharpens
            logger.warning(
                f"calibrate_vote: the vote is right on all {count} examples out of every bag, so no finite temperature "
                "fits them (the likelihood keeps rising as the vote sharpens). The vote stays uncalibrated "
                "(temperature 1); use more training examples or a smaller max_samples so that more of them are out of "
                "every bag."
            )
            return scores
        temperature = fit_temperature(log_votes, held_labels)
        if not SANE_TEMPERATURES[0] <= temperature <= SANE_TEMPERATURES[1]:
            # votes that are (nearly) all right with room to spare: the likelihood keeps rising as the vote sharpens,
            # and a fitted temperature near zero would make every prediction certain on new data
            logger.warning(
                f"calibrate_vote: the fitted vote temperature {temperature:.3g} lies outside "
                f"[{SANE_TEMPERATURES[0]}, {SANE_TEMPERATURES[1]}]: the {count} votes out of every bag are (nearly) "
                "separable, too few to fit a temperature on. The vote stays uncalibrated (temperature 1); use more "
                "training examples or a smaller max_samples so that more of them are out of every bag."
            )
            return {**scores, "vote_temperature_fitted": temperature}
        self.vote_temperature_ = temperature
        after = classification_scores(log_votes / self.vote_temperature_, held_labels)
        logger.info(
            f"calibrate_vote: vote temperature {self.vote_temperature_:.4f} fitted on the {count} examples no member "
            "drew."
        )
        return {
            **scores,
            "vote_temperature": self.vote_temperature_,
            "calibration_log_loss_calibrated": after["log_loss"],
            "calibration_ece_calibrated": after["ece"],
        }

    def record(self) -> dict[str, Any]:
        args = self.args
        return {
            "method": "bagging",
            "task": self.task,
            "base_model": self.model_name_or_path,
            "n_estimators": args.n_estimators,
            "max_samples": args.max_samples,
            "bootstrap": args.bootstrap,
            "random_state": args.random_state,
            "num_train_examples": len(self.train_dataset),
            "members": [str(self.member_dir(index)) for index in range(args.n_estimators)],
            "estimators_samples_": [indices.tolist() for indices in self.estimators_samples_],
            "oob_score_": self.oob_score_,
            "calibrate_vote": args.calibrate_vote,
            "vote_temperature_": self.vote_temperature_,
            "oob_scores_": self.oob_scores_,
        }

    def card(self) -> dict[str, Any]:
        args = self.args
        distinct = [int(np.unique(indices).size) for indices in self.estimators_samples_]
        rule = f"`{args.combination}`" if self.task == "causal_lm" else f"{args.voting} voting"
        description = (
            f"A bagged ensemble of {args.n_estimators} members trained by hf_interop's `BaggingTrainer`: each member "
            f"trained on its own {'bootstrap resample (with replacement)' if args.bootstrap else 'subsample'} of "
            f"{len(self.train_dataset)} training examples, combined by {rule}. The exact example indices of every "
            f"member (`estimators_samples_`) are in `ensemble_training.json`."
        )
        hyperparameters = {
            "method": "bagging",
            "n_estimators": args.n_estimators,
            "max_samples": args.max_samples,
            "bootstrap": args.bootstrap,
            "random_state": args.random_state,
            **(
                {"vote temperature (fitted out of every bag)": round(self.vote_temperature_, 4)}
                if args.calibrate_vote
                else {}
            ),
            "draws per member": len(self.estimators_samples_[0]),
            "distinct examples per member": ", ".join(str(count) for count in distinct),
            **self.hyperparameters(),
        }
        metrics = {name: value for name, value in self.oob_scores_.items() if np.isfinite(value)}
        return {
            "description": description,
            "combination": rule,
            "hyperparameters": hyperparameters,
            "metrics": metrics or None,
            "eval_dataset": "the training set, out of bag" if metrics else None,
        }
