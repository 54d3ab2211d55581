"""Top-1 agreement between two models' next-token predictions (an `evaluate` module of hf_interop)."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Top-1 agreement = share of positions where a model's most likely next token equals a reference model's
(e.g. a student vs. its teacher or ensemble). Each example is one position's logits (or log-probabilities) over the
shared vocabulary, from each model. Between 0 and 1; 1 for identical predictions."""

_INPUTS = """
Args:
    predictions (`list[list[float]]`): the model's logits, one vector of size `vocab_size` per position.
    references (`list[list[float]]`): the reference model's logits at the same positions.
Returns:
    `{"top1_agreement": float}`
Examples:
    >>> import hf_interop.metrics
    >>> metric = hf_interop.metrics.load("top1_agreement")
    >>> metric.compute(predictions=[[0.1, 2.0], [3.0, 0.0]], references=[[0.0, 1.0], [0.0, 1.0]])
    {'top1_agreement': 0.5}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class Top1Agreement(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Sequence(datasets.Value("float32")),
                }
            ),
        )

    def _compute(self, predictions, references):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        if predictions.ndim != 2 or predictions.shape != references.shape:
            raise ValueError(
                f"top1_agreement needs predictions and references of the same shape (positions, vocab_size); got "
                f"{predictions.shape} and {references.shape}. Flatten (batch, seq, vocab) logits to (-1, vocab) "
                "and keep only the positions you score."
            )
        if predictions.shape[0] == 0:
            raise ValueError("top1_agreement got no positions; pass at least one.")
        agree = predictions.argmax(axis=-1) == references.argmax(axis=-1)
        return {"top1_agreement": float(agree.mean())}
