"""Perplexity of a causal language model on texts (an `evaluate` module of hf_interop)."""

import math

import datasets
import evaluate

_DESCRIPTION = """Perplexity = exp(mean negative log-likelihood per token) of a causal LM on each text. The model is a
loaded `transformers` model (with its tokenizer) or a name loaded with `hf_interop.load_causal_lm` (local folder,
hub id with a pinned `revision`, or a .gguf file; safetensors only, no remote code). Each text is scored on its own
(no packing across texts); with `add_start_token` the first token is scored too, after the BOS (or EOS) token."""

_INPUTS = """
Args:
    predictions (`list[str]`): the texts to score.
    model (`transformers.PreTrainedModel`, *optional*): a loaded causal LM; pass `tokenizer` with it.
    tokenizer (`transformers.PreTrainedTokenizerBase`, *optional*): its tokenizer.
    model_id (`str`, *optional*): instead of `model`: a folder, hub id or .gguf file for `hf_interop.load_causal_lm`.
    revision (`str`, *optional*): revision of `model_id` when it is a hub id.
    batch_size (`int`, *optional*, defaults to 8): texts per forward pass.
    add_start_token (`bool`, *optional*, defaults to `True`): prepend BOS (or EOS) so the first token is scored.
    max_length (`int`, *optional*): truncate each text to this many tokens (start token included).
Returns:
    `{"perplexities": list[float], "mean_perplexity": float, "perplexity": float, "num_tokens": int}`:
    per-text perplexities, their mean, and the corpus perplexity over all scored tokens.
Examples:
    >>> import hf_interop.metrics
    >>> metric = hf_interop.metrics.load("perplexity")
    >>> metric.compute(predictions=["Hello world."], model_id="path/to/checkpoint")["perplexity"]  # doctest: +SKIP
"""


def _token_rows(texts, tokenizer, add_start_token, max_length):
    start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if add_start_token and start_id is None:
        raise ValueError(
            "add_start_token=True needs a tokenizer with a BOS or EOS token; this one has neither. Pass "
            "add_start_token=False (the first token of each text is then not scored)."
        )
    rows = []
    for index, text in enumerate(texts):
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if add_start_token:
            ids = [start_id, *ids]
        if max_length is not None:
            ids = ids[:max_length]
        if len(ids) < 2:
            raise ValueError(
                f"text {index} ({text[:40]!r}) has fewer than 2 tokens, so no token can be scored; drop empty texts "
                "or pass add_start_token=True."
            )
        rows.append(ids)
    return rows


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(
        self,
        predictions,
        model=None,
        tokenizer=None,
        model_id=None,
        revision=None,
        batch_size=8,
        add_start_token=True,
        max_length=None,
    ):
        import torch

        if (model is None) == (model_id is None):
            raise ValueError(
                "perplexity needs exactly one of `model` (a loaded causal LM, with `tokenizer`) or `model_id` "
                f"(a folder or hub id); got model={type(model).__name__ if model is not None else None}, "
                f"model_id={model_id!r}."
            )
        if model_id is not None:
            from hf_interop import load_causal_lm

            model, loaded_tokenizer = load_causal_lm(model_id, revision=revision)
            tokenizer = tokenizer or loaded_tokenizer
        if tokenizer is None:
            raise ValueError("perplexity with `model` also needs `tokenizer=` (the model's tokenizer).")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer.")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length={max_length!r} must be at least 2 (one context and one scored token).")
        if len(predictions) == 0:
            raise ValueError("perplexity got no texts; pass predictions=[...] with at least one text.")

        rows = _token_rows(predictions, tokenizer, add_start_token, max_length)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        nll_per_text, tokens_per_text = [], []
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                batch = rows[start : start + batch_size]
                width = max(len(ids) for ids in batch)
                input_ids = torch.zeros((len(batch), width), dtype=torch.long)
                attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, ids in enumerate(batch):
                    input_ids[row, : len(ids)] = torch.tensor(ids)
                    attention_mask[row, : len(ids)] = 1
                input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
                logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
                targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
                nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
                nll_per_text.extend(nll.double().sum(dim=1).cpu().tolist())
                tokens_per_text.extend((targets != -100).sum(dim=1).cpu().tolist())
        if was_training:
            model.train()
        perplexities = [math.exp(nll / count) for nll, count in zip(nll_per_text, tokens_per_text, strict=True)]
        total_tokens = int(sum(tokens_per_text))
        return {
            "perplexities": perplexities,
            "mean_perplexity": sum(perplexities) / len(perplexities),
            "perplexity": math.exp(sum(nll_per_text) / total_tokens),
            "num_tokens": total_tokens,
        }
