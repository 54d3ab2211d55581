"""Accuracy: the fraction of predictions equal to their references (an `evaluate` module of hf_interop)."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Accuracy = (number of predictions equal to their reference) / (number of predictions), optionally weighted
per example with `sample_weight`. Works for class ids, token ids or any integer labels."""

_INPUTS = """
Args:
    predictions (`list[int]`): predicted labels.
    references (`list[int]`): true labels, same length.
    normalize (`bool`, *optional*, defaults to `True`): return the fraction; `False` returns the (weighted) count.
    sample_weight (`list[float]`, *optional*): one non-negative weight per example.
Returns:
    `{"accuracy": float}`
Examples:
    >>> import hf_interop.metrics
    >>> hf_interop.metrics.load("accuracy").compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        if len(predictions) == 0:
            raise ValueError("accuracy got no predictions; pass at least one prediction/reference pair.")
        correct = (predictions == references).astype(np.float64)
        if sample_weight is None:
            weights = np.ones_like(correct)
        else:
            weights = np.asarray(sample_weight, dtype=np.float64)
            if weights.shape != correct.shape or (weights < 0).any():
                raise ValueError(
                    f"sample_weight must hold one non-negative weight per example ({correct.shape[0]}), got shape "
                    f"{weights.shape}."
                )
        total = float((correct * weights).sum())
        return {"accuracy": total / float(weights.sum()) if normalize else total}
