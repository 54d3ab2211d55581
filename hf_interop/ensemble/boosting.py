"""Boosting for Transformers models: [`BoostingConfig`] and [`BoostingTrainer`].

Members train one after another, each on what the ensemble so far gets wrong:

- `"samme"` (sequence classifiers): multi-class AdaBoost. Each member trains with a `sample_weight` per example
  (multiplied into its loss); its weighted training error sets its vote weight and raises the weights of the
  examples it misclassified. The ensemble is a weighted vote (`estimator_weights_`), with `staged_predict` and
  `staged_score` as scikit-learn's `AdaBoostClassifier`.
- `"reweight"` (causal LMs): each new member trains on the blocks weighted by `softmax(loss / temperature)` of the
  ensemble so far; the ensemble is a mixture whose weights are fitted on held-out text.
- `"additive"` (causal LMs, gradient boosting in logit space): each new member trains, the earlier ones frozen, to
  minimise the cross-entropy of the product of experts `log_softmax((1 - eta) F + eta log p_new)`; its share `eta`
  is then fitted on held-out text. The ensemble is an `EnsembleForCausalLM` with `combination="product"`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..logging_utils import get_logger
from ..utils import atomic_write_json
from .boosting_math import (
    additive_weight_nll,
    check_sample_weight,
    loss_reweighting,
    samme_round,
    samme_staged_predict,
)
from .member_training import EnsembleMemberTrainer, EnsembleTrainingConfig, label_column
from .resampling import check_n_estimators
from .weighted_trainer import AdditiveBoostingTrainer, target_counts

logger = get_logger(__name__)

BOOSTING_METHODS = ("samme", "reweight", "additive")
STATE_FILE = "boosting_state.json"


@dataclass
class BoostingConfig(EnsembleTrainingConfig):
    r"""Configuration of [`BoostingTrainer`]: [`EnsembleTrainingConfig`] (member training, LoRA) plus the boosting.

    Args:
        n_estimators (`int`, *optional*, defaults to 4): most members to train (SAMME may stop earlier).
        boosting (`str`, *optional*, defaults to `"samme"`): `"samme"` for classifiers; `"reweight"` or `"additive"`
            for causal LMs.
        boosting_learning_rate (`float`, *optional*, defaults to 1.0): SAMME's shrinkage of every member weight
            (scikit-learn's `learning_rate`; `learning_rate` here is the optimizer's). Lower needs more members.
        reweight_temperature (`float`, *optional*, defaults to 1.0): `"reweight"`: blocks get
            `softmax(ensemble_loss / temperature)` weights (mean 1), the loss being the ensemble's mean NLL per target
            token of the block (nats). Higher is closer to uniform.
        fit_weights_on_eval (`bool`, *optional*, defaults to `True`): causal LMs: fit member weights (reweight) or
            each new member's share (additive) on `eval_dataset`; without one, uniform weights / `1 / (m + 1)`.
    """

    n_estimators: int = field(default=4, metadata={"help": "Most members to train (>= 1)."})
    boosting: str = field(default="samme", metadata={"help": "samme (classifiers), reweight or additive (LMs)."})
    boosting_learning_rate: float = field(default=1.0, metadata={"help": "SAMME shrinkage of member weights."})
    reweight_temperature: float = field(default=1.0, metadata={"help": "Temperature of the loss reweighting."})
    fit_weights_on_eval: bool = field(default=True, metadata={"help": "Fit LM member weights on eval_dataset."})

    def __post_init__(self):
        check_n_estimators(self.n_estimators)
        if self.boosting not in BOOSTING_METHODS:
            raise ValueError(f"boosting={self.boosting!r} must be one of {BOOSTING_METHODS}.")
        if not (isinstance(self.boosting_learning_rate, (int, float)) and self.boosting_learning_rate > 0):
            raise ValueError(f"boosting_learning_rate={self.boosting_learning_rate!r} must be > 0, e.g. 1.0 or 0.5.")
        if not (isinstance(self.reweight_temperature, (int, float)) and self.reweight_temperature > 0):
            raise ValueError(f"reweight_temperature={self.reweight_temperature!r} must be > 0 (inf: uniform).")
        super().__post_init__()


class BoostingTrainer(EnsembleMemberTrainer):
    """Trains a boosted ensemble: SAMME for sequence classifiers, `"reweight"` or `"additive"` for causal LMs.

    Args as [`BaggingTrainer`]; `train_dataset` may carry a `sample_weight` column (SAMME's initial weights).
    `eval_dataset` (held-out text) fits the causal-LM member weights.

    After [`train`]: `estimator_weights_`, `estimator_errors_` (SAMME: weighted training errors; causal LMs: the
    ensemble's training NLL after each member), `staged_train_score_`, and [`staged_predict`] / [`staged_score`].
    """

    method = "boosting"

    def __init__(self, model: Any, args: BoostingConfig, train_dataset: Any, **kwargs: Any):
        if not isinstance(args, BoostingConfig):
            raise ValueError(f"args must be a BoostingConfig, got {type(args).__name__}.")
        if train_dataset is None or len(train_dataset) == 0:
            raise ValueError("train_dataset is empty; boosting needs at least one tokenized example.")
        super().__init__(model, args, train_dataset, **kwargs)
        wanted = "sequence_classification" if args.boosting == "samme" else "causal_lm"
        if self.task != wanted:
            raise ValueError(
                f"boosting={args.boosting!r} is for {wanted} but the training data is {self.task}; use "
                f"{'boosting=samme' if self.task == 'sequence_classification' else 'boosting=reweight or additive'}."
            )
        if "sample_weight" in train_dataset.column_names:
            initial = check_sample_weight(train_dataset["sample_weight"], len(train_dataset))
        else:
            initial = np.ones(len(train_dataset))
        self.initial_sample_weight = initial / initial.sum()
        self.estimator_weights_: list[float] = []
        self.estimator_errors_: list[float] = []
        self.staged_train_score_: list[float] = []
        self._targets: np.ndarray | None = None  # target tokens per training block (causal LMs), read once
        self.stopped_early_: str | None = None
        self.sample_weight_ = self.initial_sample_weight.copy()
        # Each member's predicted classes on the training set (SAMME), for the staged training accuracy.
        self._member_predictions: dict[int, np.ndarray] = {}

    # ----------------------------------------------------------------------------------------------------------

    def _load_state(self) -> int:
        path = self.members_dir / STATE_FILE
        if not path.is_file():
            return 0
        import json

        state = json.loads(path.read_text(encoding="utf-8"))
        if state.get("boosting") != self.args.boosting or state.get("num_train_examples") != len(self.train_dataset):
            raise ValueError(
                f"{path} was written by a different run (boosting={state.get('boosting')!r}, "
                f"{state.get('num_train_examples')} examples); use a new output_dir or delete that folder."
            )
        self.estimator_weights_ = state["estimator_weights_"]
        self.estimator_errors_ = state["estimator_errors_"]
        self.staged_train_score_ = state.get("staged_train_score_", [])
        self.sample_weight_ = np.asarray(state["sample_weight"], dtype=np.float64)
        self.stopped_early_ = state.get("stopped_early_")
        return len(self.estimator_weights_)

    def _save_state(self) -> None:
        self.members_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            self.members_dir / STATE_FILE,
            {
                "boosting": self.args.boosting,
                "num_train_examples": len(self.train_dataset),
                "estimator_weights_": self.estimator_weights_,
                "estimator_errors_": self.estimator_errors_,
                "staged_train_score_": self.staged_train_score_,
                "sample_weight": self.sample_weight_.tolist(),
                "stopped_early_": self.stopped_early_,
            },
        )

    def train(self) -> Any:
        """Train (or resume) the members one after another, save and return the ensemble."""
        done = self._load_state()
        if self.args.boosting == "samme":
            self._train_samme(done)
            combination, voting = "mixture", "weighted"
        else:
            self._train_causal_lm(done)
            combination, voting = ("mixture" if self.args.boosting == "reweight" else "product"), "soft"
        indices = list(range(len(self.estimator_weights_)))
        ensemble = self.build_ensemble(indices, list(self.estimator_weights_), combination, voting)
        self.save_ensemble(ensemble, self.record(), self.card(combination if self.task == "causal_lm" else voting))
        return ensemble

    def _weighted_dataset(self, weights: np.ndarray) -> Any:
        dataset = self.train_dataset
        if "sample_weight" in dataset.column_names:
            dataset = dataset.remove_columns("sample_weight")
        # Mean one, so the loss keeps the scale of unweighted training (the optimizer's learning rate still fits).
        return dataset.add_column("sample_weight", (weights * len(weights)).tolist())

    def _train_samme(self, done: int) -> None:
        args = self.args
        labels = np.asarray(self.train_dataset[label_column(self.train_dataset)])
        progress = tqdm(range(args.n_estimators), desc="boosting members (SAMME)", disable=args.disable_tqdm)
        for index in progress:
            if index < done or self.stopped_early_:
                continue
            if self.member_is_saved(index):
                model = self.load_member(index)  # trained before a crash that came before its state was saved
            else:
                model = self.train_member(index, self._weighted_dataset(self.sample_weight_))
            probabilities = self.member_outputs([model], self.train_dataset)["probabilities"][0]
            predictions = probabilities.argmax(-1).numpy()
            result = samme_round(
                self.sample_weight_,
                predictions,
                labels,
                self.num_labels,
                args.boosting_learning_rate,
                update_weights=index < args.n_estimators - 1,
            )
            if result.stop == "chance":
                message = (
                    f"SAMME round {index}: member {index} is no better than chance (weighted training error "
                    f"{result.estimator_error:.4f} >= 1 - 1/{self.num_labels}); "
                )
                if index == 0:
                    raise ValueError(
                        message
                        + "the first member must beat chance. Train it longer (max_steps), raise the optimizer "
                        "learning_rate, or check the labels."
                    )
                logger.warning(message + f"boosting stops with {index} members (this member is left out).")
                self.stopped_early_ = message + f"stopped with {index} members."
                self._save_state()
                break
            self.estimator_weights_.append(result.estimator_weight)
            self.estimator_errors_.append(result.estimator_error)
            self.sample_weight_ = result.sample_weight
            self._member_predictions[index] = predictions
            staged = self.staged_predict_from(self._train_predictions(index), np.asarray(self.estimator_weights_))
            self.staged_train_score_.append(float((staged[-1] == labels).mean()))
            if result.stop == "perfect":
                self.stopped_early_ = f"SAMME round {index}: member {index} made no training error; stopped."
            self._save_state()
            if result.stop == "perfect":
                break

    def _train_predictions(self, upto: int) -> np.ndarray:
        rows = []
        for index in range(upto + 1):
            if index not in self._member_predictions:
                probabilities = self.member_outputs([self.load_member(index)], self.train_dataset)["probabilities"]
                self._member_predictions[index] = probabilities[0].argmax(-1).numpy()
            rows.append(self._member_predictions[index])
        return np.stack(rows)

    def staged_predict_from(self, member_predictions: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return samme_staged_predict(member_predictions, weights, self.num_labels)

    def staged_predict(self, dataset: Any) -> np.ndarray:
        """SAMME class predictions after each member on `dataset`, `(num_members, num_examples)`."""
        if self.task != "sequence_classification":
            raise ValueError("staged_predict is for SAMME classifiers; causal LMs report staged_train_score_.")
        models = [self.load_member(index) for index in range(len(self.estimator_weights_))]
        predictions = self.member_outputs(models, dataset)["probabilities"].argmax(-1).numpy()
        return self.staged_predict_from(predictions, np.asarray(self.estimator_weights_))

    def staged_score(self, dataset: Any) -> list[float]:
        """Accuracy on `dataset` after each member (scikit-learn's `staged_score`)."""
        labels = np.asarray(dataset[label_column(dataset)])
        return [float((stage == labels).mean()) for stage in self.staged_predict(dataset)]

    # ----------------------------------------------------------------------------------------------------------
    # Causal LMs
    # ----------------------------------------------------------------------------------------------------------

    def _train_causal_lm(self, done: int) -> None:
        args = self.args
        progress = tqdm(
            range(args.n_estimators), desc=f"boosting members ({args.boosting})", disable=args.disable_tqdm
        )
        for index in progress:
            if index < done:
                continue
            if index == 0:
                model = self._train_or_load(index, self._weighted_dataset(self.initial_sample_weight))
                share = 1.0
            elif args.boosting == "reweight":
                # per target token, so the temperature is in nats per token whatever the block length (a summed
                # 64-token NLL over temperature 1 put all the weight on one block and sent the member's loss to NaN)
                losses = self._ensemble_block_losses(list(range(index))) / np.maximum(self._block_targets(), 1.0)
                self.sample_weight_ = loss_reweighting(losses, args.reweight_temperature) / len(losses)
                model = self._train_or_load(index, self._weighted_dataset(self.sample_weight_))
                share = 1.0 / (index + 1)
            else:
                frozen = self.build_ensemble(list(range(index)), list(self.estimator_weights_), "product")
                share = 1.0 / (index + 1)
                if self.member_is_saved(index):
                    model = self.load_member(index)
                else:
                    model = self.train_member(
                        index,
                        self._weighted_dataset(self.initial_sample_weight),
                        trainer_class=AdditiveBoostingTrainer,
                        frozen_ensemble=frozen,
                        new_weight=share,
                    )
                if self.eval_dataset is not None and args.fit_weights_on_eval:
                    share = self._fit_share(frozen, model)
            if args.boosting == "additive":
                self.estimator_weights_ = [w * (1.0 - share) for w in self.estimator_weights_] + [share]
            else:
                self.estimator_weights_ = [1.0] * (index + 1)
            if args.boosting == "reweight" and self.eval_dataset is not None and args.fit_weights_on_eval:
                self.estimator_weights_ = self._fit_mixture_weights(index)
            nll = float(np.sum(self._ensemble_block_losses(list(range(index + 1)))))
            if not math.isfinite(nll):
                raise FloatingPointError(
                    f"boosting member {index} left the ensemble's training NLL at {nll}: the member diverged (its "
                    f"weights hold NaN or inf). The earlier members stay saved in {self.members_dir}; delete "
                    f"{self.member_dir(index)} and rerun with a lower learning_rate (or a higher reweight_temperature): "
                    "the rerun resumes at this member."
                )
            self.estimator_errors_.append(nll / max(1, self._num_train_targets()))
            self.staged_train_score_.append(math.exp(self.estimator_errors_[-1]))
            self._save_state()

    def _train_or_load(self, index: int, dataset: Any) -> Any:
        return self.load_member(index) if self.member_is_saved(index) else self.train_member(index, dataset)

    def _num_train_targets(self) -> int:
        return int(self._block_targets().sum())

    def _block_targets(self) -> np.ndarray:
        """Target tokens of every training block (`weighted_trainer.target_counts`), read once."""
        if self._targets is None:
            self._targets = target_counts(self.train_dataset)
        return self._targets

    @torch.no_grad()
    def _ensemble_block_losses(self, indices: list[int]) -> np.ndarray:
        """Summed NLL of every training block under the ensemble of `indices` with the current weights."""
        weights = self.estimator_weights_[: len(indices)] if len(self.estimator_weights_) >= len(indices) else None
        combination = "product" if self.args.boosting == "additive" else "mixture"
        ensemble = self.build_ensemble(indices, weights, combination)
        losses = []
        rows = [self.train_dataset[i] for i in range(len(self.train_dataset))]
        size = self.args.per_device_eval_batch_size
        for start in range(0, len(rows), size):
            batch = self.collator(rows[start : start + size])
            log_probs = ensemble(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]
            picked = log_probs[:, :-1].gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)
            losses.extend((-(picked * (targets != -100))).sum(-1).double().tolist())
        return np.asarray(losses)

    @torch.no_grad()
    def _fit_share(self, frozen: Any, model: Any) -> float:
        """The new member's share `eta` minimising held-out NLL: a coarse grid, then a fine one around its best."""
        rows = [self.eval_dataset[i] for i in range(len(self.eval_dataset))]
        size = self.args.per_device_eval_batch_size

        def totals(grid: torch.Tensor) -> torch.Tensor:
            summed = torch.zeros(len(grid), dtype=torch.float64)
            for start in range(0, len(rows), size):
                batch = self.collator(rows[start : start + size])
                frozen_log_probs = frozen(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                new = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                new_log_probs = torch.log_softmax(new[..., : frozen_log_probs.shape[-1]].float(), -1)
                summed += additive_weight_nll(
                    frozen_log_probs[:, :-1], new_log_probs[:, :-1], batch["labels"][:, 1:], grid
                )
            return summed

        coarse = torch.linspace(0.0, 1.0, 11, dtype=torch.float64)
        best = float(coarse[int(totals(coarse).argmin())])
        fine = torch.linspace(max(0.0, best - 0.1), min(1.0, best + 0.1), 11, dtype=torch.float64)
        share = float(fine[int(totals(fine).argmin())])
        logger.info(f"additive boosting: held-out share of the new member {share:.3f}")
        return min(max(share, 1e-3), 1.0)

    def _fit_mixture_weights(self, index: int) -> list[float]:
        from .weights import fit_ensemble_weights

        ensemble = self.build_ensemble(list(range(index + 1)), None, "mixture")
        fit = fit_ensemble_weights(ensemble, self.eval_dataset, combination="mixture", init="uniform", apply=False)
        return [float(weight) for weight in fit.weights]

    def record(self) -> dict[str, Any]:
        return {
            "method": f"boosting ({self.args.boosting})",
            "task": self.task,
            "base_model": self.model_name_or_path,
            "n_estimators": self.args.n_estimators,
            "members": [str(self.member_dir(index)) for index in range(len(self.estimator_weights_))],
            "estimator_weights_": self.estimator_weights_,
            "estimator_errors_": self.estimator_errors_,
            "staged_train_score_": self.staged_train_score_,
            "boosting_learning_rate": self.args.boosting_learning_rate,
            "reweight_temperature": self.args.reweight_temperature,
            "stopped_early_": self.stopped_early_,
            "final_sample_weight": self.sample_weight_.tolist(),
        }

    def card(self, rule: str) -> dict[str, Any]:
        args = self.args
        what = {
            "samme": "SAMME (multi-class AdaBoost): each member trained on sample weights raised where the ensemble "
            "erred, members voting with weights log((1 - err) / err) + log(K - 1)",
            "reweight": "loss reweighting: each member trained on blocks weighted by softmax(ensemble loss / "
            f"{args.reweight_temperature}), members mixed with weights fitted on held-out text",
            "additive": "additive boosting in logit space: each member trained, the earlier ones frozen, on the "
            "cross-entropy of their product of experts; its share fitted on held-out text",
        }[args.boosting]
        description = f"A boosted ensemble of {len(self.estimator_weights_)} members trained by hf_interop's " + (
            f"`BoostingTrainer`: {what}."
        )
        if self.stopped_early_:
            description += f" {self.stopped_early_}"
        hyperparameters = {
            "method": f"boosting ({args.boosting})",
            "n_estimators (requested)": args.n_estimators,
            "estimator_weights_": ", ".join(f"{w:.4f}" for w in self.estimator_weights_),
            "estimator_errors_": ", ".join(f"{e:.4f}" for e in self.estimator_errors_),
            **({"boosting_learning_rate": args.boosting_learning_rate} if args.boosting == "samme" else {}),
            **self.hyperparameters(),
        }
        name = "train_accuracy" if args.boosting == "samme" else "train_perplexity"
        metrics = {name: self.staged_train_score_[-1]} if self.staged_train_score_ else None
        return {
            "description": description,
            "combination": rule,
            "hyperparameters": hyperparameters,
            "metrics": metrics,
            "eval_dataset": "the training set" if metrics else None,
        }
