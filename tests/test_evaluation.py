import math

import torch

from hf_interop import evaluate_perplexity, load_causal_lm


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
