import math

import pytest
import torch

import hf_interop.metrics
from hf_interop import evaluate_perplexity, load_causal_lm
from hf_interop.evaluation import ensemble_log_probs, prediction_statistics


def test_perplexity_matches_float64_reference_and_ignores_batching(tiny_model_dirs, packed_corpus):
    model, _ = load_causal_lm(tiny_model_dirs["llama"])
    data = packed_corpus["validation"].select(range(10))
    result = evaluate_perplexity(model, data, batch_size=3, show_progress=False)
    same = evaluate_perplexity(model, data, batch_size=10, show_progress=False)
    ids = torch.tensor(data["input_ids"])
    with torch.no_grad():
        logits = model(ids).logits.double()
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -log_probs.gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert result["num_tokens"] == nll.numel()
    assert math.isclose(result["loss"], nll.mean().item(), rel_tol=1e-5)
    assert math.isclose(result["loss"], same["loss"], rel_tol=1e-6)
    assert math.isclose(result["perplexity"], math.exp(result["loss"]), rel_tol=1e-9)
    # a random model is close to uniform over its 512-token vocabulary
    assert 200 < result["perplexity"] < 2000


def test_padding_is_excluded(tiny_model_dirs, packed_corpus):
    model, _ = load_causal_lm(tiny_model_dirs["llama"])
    data = packed_corpus["validation"].select(range(2))
    masked = data.map(lambda row: {"attention_mask": [1] * 40 + [0] * 24})
    result = evaluate_perplexity(model, masked, show_progress=False)
    assert result["num_tokens"] == 2 * 39


def test_prediction_statistics_against_float64_reference_and_metric_modules():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 11, generator=generator)
    reference = logits + torch.randn(2, 7, 11, generator=generator)
    labels = torch.randint(0, 11, (2, 7), generator=generator)
    labels[0, 3] = -100
    labels[1, 6] = -100
    statistics = prediction_statistics(logits, labels, reference, temperature=1.5)

    nll, kl, agree, count = 0.0, 0.0, 0, 0
    flat_model, flat_reference = [], []
    for row in range(2):
        for position in range(6):
            target = int(labels[row, position + 1])
            if target == -100:
                continue
            model_row, reference_row = logits[row, position].double(), reference[row, position].double()
            nll -= float(torch.log_softmax(model_row, -1)[target])
            p = torch.softmax(reference_row / 1.5, -1)
            q = torch.softmax(model_row / 1.5, -1)
            kl += float((p * (p.log() - q.log())).sum())
            agree += int(model_row.argmax() == reference_row.argmax())
            count += 1
            flat_model.append(model_row.float().numpy())
            flat_reference.append(reference_row.float().numpy())
    assert count == 10
    assert float(statistics["num_tokens"]) == count
    assert float(statistics["nll_sum"]) == pytest.approx(nll, rel=1e-5)
    assert float(statistics["kl_sum"]) == pytest.approx(kl, rel=1e-5)
    assert float(statistics["agreement_count"]) == agree
    # The same numbers as the project's evaluate modules.
    kl_metric = hf_interop.metrics.load("kl_divergence").compute(
        predictions=flat_model, references=flat_reference, temperature=1.5
    )
    assert kl_metric["kl_divergence"] == pytest.approx(kl / count, rel=1e-5)
    agreement = hf_interop.metrics.load("top1_agreement").compute(predictions=flat_model, references=flat_reference)
    assert agreement["top1_agreement"] == pytest.approx(agree / count)
    # Chunking over positions changes nothing.
    chunked = prediction_statistics(logits, labels, reference, temperature=1.5, chunk_size=3)
    assert {key: float(value) for key, value in chunked.items()} == pytest.approx(
        {key: float(value) for key, value in statistics.items()}
    )
    # Identical predictions: zero KL, full agreement.
    same = prediction_statistics(logits, labels, logits.clone())
    assert float(same["kl_sum"]) == pytest.approx(0.0, abs=1e-5)
    assert float(same["agreement_count"]) == count


def test_ensemble_log_probs_is_the_log_of_mean_probability():
    log_probs = [torch.log(torch.tensor([0.5, 0.1], dtype=torch.float64)), torch.log(torch.tensor([0.1, 0.3]))]
    expected = torch.log(torch.tensor([0.3, 0.2], dtype=torch.float64))
    assert torch.allclose(ensemble_log_probs([log_probs[0], log_probs[1].double()]), expected)


def test_prediction_math_keeps_its_old_home_in_callbacks():
    import hf_interop.callbacks
    import hf_interop.evaluation

    for name in ("prediction_statistics", "target_log_probs", "ensemble_log_probs"):
        assert getattr(hf_interop.callbacks, name) is getattr(hf_interop.evaluation, name)


def test_model_device_reads_the_device_attribute_then_the_parameters():
    from hf_interop.evaluation import model_device

    assert model_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    with torch.device("meta"):
        on_meta = torch.nn.Linear(2, 2)
    assert model_device(on_meta) == torch.device("cpu")  # nothing but meta: inputs go to the CPU

    class Wrapped:  # an ensemble or wrapper that says where its inputs go
        device = torch.device("cuda", 3)

    assert model_device(Wrapped()) == torch.device("cuda", 3)
    assert model_device(object()) == torch.device("cpu")  # not a Module, no device: the CPU
