"""hf_interop's own `evaluate` modules, loaded by path offline, checked against float64 / hand references."""

from __future__ import annotations

import math

import evaluate
import numpy as np
import pytest
import torch

import hf_interop.metrics
from hf_interop import load_causal_lm

TEXTS = [
    "The import statement binds names in the local namespace.",
    "A class definition is an executable statement.",
    "x",
    "Exceptions are raised by the raise statement and handled by try.",
]


@pytest.fixture(scope="module")
def logits_pair():
    generator = torch.Generator().manual_seed(0)
    model_logits = torch.randn(40, 17, generator=generator, dtype=torch.float64) * 3
    reference_logits = model_logits + torch.randn(40, 17, generator=generator, dtype=torch.float64)
    return model_logits.float().numpy(), reference_logits.float().numpy()


def test_every_module_loads_by_path_offline():
    for name in hf_interop.metrics.list_metrics():
        folder = hf_interop.metrics.module_path(name)
        assert folder.endswith(f"/metrics/{name}")
        assert isinstance(evaluate.load(folder), evaluate.Metric)
    with pytest.raises(ValueError, match="metric 'bleu' is not one of hf_interop's"):
        hf_interop.metrics.load("bleu")


def test_accuracy_matches_hand_count():
    metric = hf_interop.metrics.load("accuracy")
    predictions, references = [0, 1, 2, 2, 1], [0, 1, 1, 2, 0]
    assert metric.compute(predictions=predictions, references=references) == {"accuracy": 3 / 5}
    weights = [1.0, 2.0, 3.0, 0.5, 0.5]
    result = metric.compute(predictions=predictions, references=references, sample_weight=weights)
    assert result["accuracy"] == pytest.approx((1.0 + 2.0 + 0.5) / 7.0)
    assert metric.compute(predictions=predictions, references=references, normalize=False) == {"accuracy": 3.0}
    with pytest.raises(ValueError, match="sample_weight must hold one non-negative weight per example"):
        metric.compute(predictions=predictions, references=references, sample_weight=[1.0, -1.0, 1.0, 1.0, 1.0])


def test_accuracy_accumulates_batches():
    metric = hf_interop.metrics.load("accuracy")
    metric.add_batch(predictions=[1, 1], references=[1, 0])
    metric.add_batch(predictions=[3], references=[3])
    assert metric.compute()["accuracy"] == pytest.approx(2 / 3)


def test_exact_match_options():
    metric = hf_interop.metrics.load("exact_match")
    predictions = ["Paris", " rome ", "Answer: 42!", "cat"]
    references = ["Paris", "Rome", "answer 42", "dog"]
    assert metric.compute(predictions=predictions, references=references)["exact_match"] == pytest.approx(1 / 4)
    assert metric.compute(predictions=predictions, references=references, ignore_case=True)[
        "exact_match"
    ] == pytest.approx(2 / 4)
    result = metric.compute(predictions=predictions, references=references, ignore_case=True, ignore_punctuation=True)
    assert result["exact_match"] == pytest.approx(3 / 4)
    result = metric.compute(predictions=["cat 1"], references=["dog 1"], regexes_to_ignore=["cat", "dog"])
    assert result["exact_match"] == 1.0


def test_top1_agreement_against_argmax(logits_pair):
    model_logits, reference_logits = logits_pair
    metric = hf_interop.metrics.load("top1_agreement")
    expected = float(np.mean(model_logits.argmax(-1) == reference_logits.argmax(-1)))
    assert 0.0 < expected < 1.0  # the fixture really mixes agreement and disagreement
    assert metric.compute(predictions=model_logits, references=reference_logits)["top1_agreement"] == expected
    assert metric.compute(predictions=model_logits, references=model_logits)["top1_agreement"] == 1.0
    with pytest.raises(ValueError, match="same shape"):
        metric.compute(predictions=model_logits[:, :5], references=reference_logits[:, :6])


def _kl_reference(p_logits, q_logits, temperature=1.0):
    """Naive float64 KL(softmax(p) || softmax(q)), averaged over rows."""
    p_logits = torch.tensor(p_logits, dtype=torch.float64) / temperature
    q_logits = torch.tensor(q_logits, dtype=torch.float64) / temperature
    total = 0.0
    for p_row, q_row in zip(p_logits, q_logits, strict=True):
        p = torch.exp(p_row) / torch.exp(p_row).sum()
        q = torch.exp(q_row) / torch.exp(q_row).sum()
        total += float((p * torch.log(p / q)).sum())
    return total / len(p_logits)


def test_kl_divergence_against_float64_reference(logits_pair):
    model_logits, reference_logits = logits_pair
    metric = hf_interop.metrics.load("kl_divergence")
    forward = metric.compute(predictions=model_logits, references=reference_logits)["kl_divergence"]
    assert forward == pytest.approx(_kl_reference(reference_logits, model_logits), rel=1e-6)
    reverse = metric.compute(predictions=model_logits, references=reference_logits, direction="reverse")
    assert reverse["kl_divergence"] == pytest.approx(_kl_reference(model_logits, reference_logits), rel=1e-6)
    assert reverse["kl_divergence"] != pytest.approx(forward)  # KL is not symmetric
    hot = metric.compute(predictions=model_logits, references=reference_logits, temperature=2.0)
    assert hot["kl_divergence"] == pytest.approx(_kl_reference(reference_logits, model_logits, 2.0), rel=1e-6)
    assert metric.compute(predictions=model_logits, references=model_logits)["kl_divergence"] == pytest.approx(
        0.0, abs=1e-12
    )
    with pytest.raises(ValueError, match="direction='sideways'"):
        metric.compute(predictions=model_logits, references=reference_logits, direction="sideways")
    with pytest.raises(ValueError, match="temperature=0"):
        metric.compute(predictions=model_logits, references=reference_logits, temperature=0)


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dirs):
    return load_causal_lm(tiny_model_dirs["llama"], dtype="float32")


def _perplexity_reference(model, tokenizer, texts):
    """One text at a time, no padding, float64 log-softmax: (per-text perplexities, corpus perplexity)."""
    per_text, total_nll, total_tokens = [], 0.0, 0
    for text in texts:
        ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        log_probs = torch.log_softmax(logits, dim=-1)
        nll = -sum(float(log_probs[position, ids[position + 1]]) for position in range(len(ids) - 1))
        per_text.append(math.exp(nll / (len(ids) - 1)))
        total_nll += nll
        total_tokens += len(ids) - 1
    return per_text, math.exp(total_nll / total_tokens), total_tokens


def test_perplexity_matches_unpadded_float64_reference(tiny_llama, tiny_model_dirs):
    model, tokenizer = tiny_llama
    metric = hf_interop.metrics.load("perplexity")
    per_text, corpus, num_tokens = _perplexity_reference(model, tokenizer, TEXTS)
    for batch_size in (1, 3):  # padding inside a batch must not change any text's score
        result = metric.compute(predictions=TEXTS, model=model, tokenizer=tokenizer, batch_size=batch_size)
        assert result["perplexities"] == pytest.approx(per_text, rel=1e-4)
        assert result["perplexity"] == pytest.approx(corpus, rel=1e-4)
        assert result["mean_perplexity"] == pytest.approx(sum(per_text) / len(per_text), rel=1e-4)
        assert result["num_tokens"] == num_tokens
    # The same checkpoint by path, loaded through hf_interop's safe loader.
    by_path = metric.compute(predictions=TEXTS, model_id=str(tiny_model_dirs["llama"]))
    assert by_path["perplexity"] == pytest.approx(corpus, rel=1e-4)
    # An untrained model over 512 tokens is close to uniform.
    assert 200 < corpus < 2000


def test_perplexity_bad_input(tiny_llama):
    model, tokenizer = tiny_llama
    metric = hf_interop.metrics.load("perplexity")
    with pytest.raises(ValueError, match="exactly one of `model`"):
        metric.compute(predictions=TEXTS, model=model, tokenizer=tokenizer, model_id="org/name")
    with pytest.raises(ValueError, match="also needs `tokenizer=`"):
        metric.compute(predictions=TEXTS, model=model)
    with pytest.raises(ValueError, match="text 0 .* fewer than 2 tokens"):
        metric.compute(predictions=[""], model=model, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="batch_size=0"):
        metric.compute(predictions=TEXTS, model=model, tokenizer=tokenizer, batch_size=0)
