"""KL divergence between two models' next-token distributions (an `evaluate` module of hf_interop)."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Mean KL divergence, in nats per position, between the next-token distributions of a model and a reference
model (e.g. a student and its teacher). Each example is one position's logits over the shared vocabulary from each
model; softmax(logits / temperature) gives the distributions. `direction="forward"` is KL(reference || model), the
quantity standard distillation minimises; `"reverse"` is KL(model || reference). Zero for identical predictions.
Computed in float64."""

_INPUTS = """
Args:
    predictions (`list[list[float]]`): the model's logits, one vector of size `vocab_size` per position.
    references (`list[list[float]]`): the reference model's logits at the same positions.
    direction (`str`, *optional*, defaults to `"forward"`): `"forward"` = KL(reference || model), `"reverse"` =
        KL(model || reference).
    temperature (`float`, *optional*, defaults to 1.0): logits are divided by it before the softmax.
Returns:
    `{"kl_divergence": float}`
Examples:
    >>> import hf_interop.metrics
    >>> metric = hf_interop.metrics.load("kl_divergence")
    >>> metric.compute(predictions=[[0.0, 0.0]], references=[[0.0, 0.0]])
    {'kl_divergence': 0.0}
"""


def _log_softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class KLDivergence(evaluate.Metric):
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

    def _compute(self, predictions, references, direction="forward", temperature=1.0):
        if direction not in ("forward", "reverse"):
            raise ValueError(
                f"direction={direction!r} is not supported; use 'forward' (KL(reference || model)) or 'reverse'."
            )
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r} must be > 0 (1.0 compares the raw distributions).")
        predictions = np.asarray(predictions, dtype=np.float64)
        references = np.asarray(references, dtype=np.float64)
        if predictions.ndim != 2 or predictions.shape != references.shape:
            raise ValueError(
                f"kl_divergence needs predictions and references of the same shape (positions, vocab_size); got "
                f"{predictions.shape} and {references.shape}. Flatten (batch, seq, vocab) logits to (-1, vocab)."
            )
        if predictions.shape[0] == 0:
            raise ValueError("kl_divergence got no positions; pass at least one.")
        model_log_probs = _log_softmax(predictions / temperature)
        reference_log_probs = _log_softmax(references / temperature)
        if direction == "reverse":
            model_log_probs, reference_log_probs = reference_log_probs, model_log_probs
        per_position = (np.exp(reference_log_probs) * (reference_log_probs - model_log_probs)).sum(axis=-1)
        return {"kl_divergence": float(per_position.mean())}
