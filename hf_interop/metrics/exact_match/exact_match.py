"""Exact match: the fraction of predicted strings identical to their references (an `evaluate` module of hf_interop)."""

import re
import string

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Exact match = share of predictions that equal their reference string, after optional normalisation
(regexes removed, case folded, punctuation and numbers dropped, surrounding whitespace stripped). Between 0 and 1."""

_INPUTS = """
Args:
    predictions (`list[str]`): predicted texts.
    references (`list[str]`): reference texts, same length.
    regexes_to_ignore (`list[str]`, *optional*): patterns removed from both sides before comparing.
    ignore_case (`bool`, *optional*, defaults to `False`): compare lower-cased.
    ignore_punctuation (`bool`, *optional*, defaults to `False`): drop `string.punctuation`.
    ignore_numbers (`bool`, *optional*, defaults to `False`): drop digits.
    strip_whitespace (`bool`, *optional*, defaults to `True`): strip leading/trailing whitespace.
Returns:
    `{"exact_match": float}`
Examples:
    >>> import hf_interop.metrics
    >>> hf_interop.metrics.load("exact_match").compute(predictions=["Paris", "rome"], references=["Paris", "Rome"])
    {'exact_match': 0.5}
"""


def _normalise(texts, regexes_to_ignore, ignore_case, ignore_punctuation, ignore_numbers, strip_whitespace):
    texts = np.asarray(texts, dtype=object)
    for pattern in regexes_to_ignore or []:
        texts = np.array([re.sub(pattern, "", text) for text in texts], dtype=object)
    if ignore_case:
        texts = np.array([text.lower() for text in texts], dtype=object)
    if ignore_punctuation:
        table = str.maketrans("", "", string.punctuation)
        texts = np.array([text.translate(table) for text in texts], dtype=object)
    if ignore_numbers:
        table = str.maketrans("", "", string.digits)
        texts = np.array([text.translate(table) for text in texts], dtype=object)
    if strip_whitespace:
        texts = np.array([text.strip() for text in texts], dtype=object)
    return texts


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(
        self,
        predictions,
        references,
        regexes_to_ignore=None,
        ignore_case=False,
        ignore_punctuation=False,
        ignore_numbers=False,
        strip_whitespace=True,
    ):
        if len(predictions) == 0:
            raise ValueError("exact_match got no predictions; pass at least one prediction/reference pair.")
        options = (regexes_to_ignore, ignore_case, ignore_punctuation, ignore_numbers, strip_whitespace)
        predictions = _normalise(predictions, *options)
        references = _normalise(references, *options)
        return {"exact_match": float(np.mean(predictions == references))}
