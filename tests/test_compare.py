"""`compare_checkpoints`: every figure of the interoperability report against a naive float64 reference."""

from __future__ import annotations

import json
import math

import pytest
import torch
from datasets import Dataset
from helpers import build_tiny_causal_lm

from hf_interop.compare import build_scoring_windows, compare_checkpoints, format_report


@pytest.fixture(scope="module")
def short_texts(corpus):
    # Short documents so one window holds a whole document: the reference then needs no windowing.
    return [text[:300] for text in corpus["validation"]["text"][:3]]


@pytest.fixture(scope="module")
def second_seed_dir(tmp_path_factory, corpus_tokenizer):
    model = build_tiny_causal_lm("llama", len(corpus_tokenizer), seed=1, tokenizer=corpus_tokenizer)
    folder = tmp_path_factory.mktemp("tiny_llama_seed1")
    model.save_pretrained(folder)
    corpus_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def other_tokenizer_dir(tmp_path_factory, corpus):
    """A tiny Llama with a different (300-token) tokenizer: only bits per byte compare it with the others."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus["train"]["text"][:20], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<pad>")
    model = build_tiny_causal_lm("llama", len(fast), seed=2, tokenizer=fast)
    folder = tmp_path_factory.mktemp("tiny_other_tokenizer")
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def _reference_log_probs(folder, texts):
    """float64 log-probs (one (n, vocab) tensor per document) and targets, whole documents at once."""
    from hf_interop import load_causal_lm

    model, tokenizer = load_causal_lm(folder, dtype="float64")
    context = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    out = []
    for text in texts:
        ids = torch.tensor([[context, *tokenizer(text, add_special_tokens=False)["input_ids"]]])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
        out.append((log_probs, ids[0, 1:]))
    return out


def test_compare_matches_float64_reference(tiny_model_dirs, second_seed_dir, other_tokenizer_dir, short_texts):
    checkpoints = [tiny_model_dirs["llama"], tiny_model_dirs["gpt2"], second_seed_dir, other_tokenizer_dir]
    names = ["llama", "gpt2", "llama_seed1", "other_tok"]
    report = compare_checkpoints(
        [str(c) for c in checkpoints],
        Dataset.from_dict({"text": short_texts}),
        names=names,
        block_size=512,
        batch_size=2,
        show_progress=False,
    )
    references = [_reference_log_probs(folder, short_texts) for folder in checkpoints]
    num_bytes = sum(len(text.encode()) for text in short_texts)

    for model_report, reference in zip(report["models"], references, strict=True):
        nll = sum(-lp.gather(-1, t[:, None]).sum() for lp, t in reference)
        num_tokens = sum(len(t) for _, t in reference)
        correct = sum(int((lp.argmax(-1) == t).sum()) for lp, t in reference)
        assert model_report["num_tokens"] == num_tokens
        assert model_report["perplexity"] == pytest.approx(math.exp(nll / num_tokens), rel=1e-5)
        assert model_report["bits_per_byte"] == pytest.approx(float(nll) / math.log(2) / num_bytes, rel=1e-5)
        assert model_report["next_token_accuracy"] == pytest.approx(correct / num_tokens)

    # The first three share the corpus tokenizer; the fourth does not, so its pairs are n/a.
    assert report["tokenizer_groups"] == [["llama", "gpt2", "llama_seed1"], ["other_tok"]]
    num_tokens = report["models"][0]["num_tokens"]
    for a in range(3):
        assert report["top1_agreement"][a][3] is None and report["symmetric_kl"][3][a] is None
        for b in range(3):
            agree = sum(
                int((ra[0].argmax(-1) == rb[0].argmax(-1)).sum())
                for ra, rb in zip(references[a], references[b], strict=True)
            )
            kl_ab = sum(
                (ra[0].exp() * (ra[0] - rb[0])).sum() for ra, rb in zip(references[a], references[b], strict=True)
            )
            kl_ba = sum(
                (rb[0].exp() * (rb[0] - ra[0])).sum() for ra, rb in zip(references[a], references[b], strict=True)
            )
            assert report["top1_agreement"][a][b] == pytest.approx(agree / num_tokens)
            assert report["symmetric_kl"][a][b] == pytest.approx(
                float(kl_ab + kl_ba) / 2 / num_tokens, rel=1e-4, abs=1e-9
            )
    # Properties: a model agrees fully with itself, KL is symmetric and positive between different models.
    assert all(report["top1_agreement"][i][i] == 1.0 and report["symmetric_kl"][i][i] == 0.0 for i in range(3))
    assert report["symmetric_kl"][0][1] == report["symmetric_kl"][1][0] > 0

    (ensemble,) = report["ensembles"]
    mixture_nll = 0.0
    for docs in zip(*references[:3], strict=True):
        stacked = torch.stack([lp for lp, _ in docs])
        mixture = torch.logsumexp(stacked - math.log(3), dim=0)
        mixture_nll += float(-mixture.gather(-1, docs[0][1][:, None]).sum())
    best = min(report["models"][:3], key=lambda m: m["perplexity"])
    assert ensemble["members"] == ["llama", "gpt2", "llama_seed1"]
    assert ensemble["perplexity"] == pytest.approx(math.exp(mixture_nll / num_tokens), rel=1e-5)
    assert ensemble["best_member"] == best["name"]
    assert ensemble["gain_nats_per_token"] == pytest.approx(
        math.log(best["perplexity"]) - mixture_nll / num_tokens, abs=1e-5
    )

    text = format_report(report)
    assert "llama_seed1" in text and "n/a" in text and "mixture ensemble" in text


def test_ensemble_of_chosen_members(tiny_model_dirs, second_seed_dir, short_texts):
    checkpoints = [tiny_model_dirs["llama"], tiny_model_dirs["gpt2"], second_seed_dir]
    report = compare_checkpoints(
        [str(c) for c in checkpoints],
        Dataset.from_dict({"text": short_texts}),
        names=["llama", "gpt2", "seed1"],
        ensemble_members=["gpt2", "seed1"],
        block_size=512,
        show_progress=False,
    )
    references = [_reference_log_probs(folder, short_texts) for folder in checkpoints[1:]]
    nll = sum(
        float(-torch.logsumexp(torch.stack([a[0], b[0]]) - math.log(2), 0).gather(-1, a[1][:, None]).sum())
        for a, b in zip(*references, strict=True)
    )
    (ensemble,) = report["ensembles"]
    assert ensemble["members"] == ["gpt2", "seed1"] and ensemble["weights"] == [0.5, 0.5]
    assert ensemble["perplexity"] == pytest.approx(math.exp(nll / report["models"][0]["num_tokens"]), rel=1e-5)
    with pytest.raises(ValueError, match="ensemble_members"):
        compare_checkpoints([str(c) for c in checkpoints], ensemble_members=["gpt2", "nobody"])


def test_windows_predict_every_token_once(corpus_tokenizer, short_texts):
    windows, num_targets, num_bytes = build_scoring_windows(short_texts, corpus_tokenizer, block_size=7)
    ids = [corpus_tokenizer(text, add_special_tokens=False)["input_ids"] for text in short_texts]
    assert num_targets == sum(len(i) for i in ids)
    assert num_bytes == sum(len(text.encode()) for text in short_texts)
    assert all(2 <= len(window) <= 7 for window in windows)
    # Stitching the targets of the windows back together gives each document's tokens, in order, exactly once.
    targets = [token for window in windows for token in window[1:]]
    assert targets == [token for doc in ids for token in doc]


def test_multiple_choice_accuracy_matches_reference(tiny_model_dirs, second_seed_dir):
    data = Dataset.from_dict(
        {
            "prompt": ["The keyword def", "A list is", "The for statement"],
            "choices": [[" defines a function", " is a number"], [" mutable", " a colour", " blue"], [" loops", " x"]],
            "label": [0, 0, 0],
        }
    )
    report = compare_checkpoints(
        [str(tiny_model_dirs["gpt2"]), str(second_seed_dir)], data, show_progress=False, names=["gpt2", "seed1"]
    )
    from hf_interop import load_causal_lm

    for model_report, folder in zip(report["models"], [tiny_model_dirs["gpt2"], second_seed_dir], strict=True):
        model, tokenizer = load_causal_lm(folder, dtype="float64")
        correct = 0
        for row in data:
            prefix = [tokenizer.eos_token_id, *tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]]
            scores = []
            for choice in row["choices"]:
                choice_ids = tokenizer(choice, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([prefix + choice_ids])
                with torch.no_grad():
                    log_probs = torch.log_softmax(model(input_ids=ids).logits[0], dim=-1)
                scores.append(sum(float(log_probs[len(prefix) - 1 + i, t]) for i, t in enumerate(choice_ids)))
            correct += int(scores.index(max(scores)) == row["label"])
        assert model_report["accuracy"] == pytest.approx(correct / len(data))
        assert "perplexity" not in model_report  # no text column: nothing to score for perplexity


def test_outputs_written_atomically(tiny_model_dirs, second_seed_dir, tmp_path):
    output_dir = tmp_path / "report"
    report = compare_checkpoints(
        [str(tiny_model_dirs["llama"]), str(second_seed_dir)],
        max_documents=1,
        block_size=64,
        output_dir=output_dir,
        show_progress=False,
    )
    assert sorted(p.name for p in output_dir.iterdir()) == ["heatmap.png", "report.json", "report.md"]
    assert json.loads((output_dir / "report.json").read_text())["names"] == report["names"]
    assert (output_dir / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["dataset"]["description"] == "builtin corpus (validation split)"
    # A second run into the same folder is refused before any model loads, and leaves the first report alone.
    before = (output_dir / "report.json").read_text()
    with pytest.raises(FileExistsError, match="overwrite_output_dir"):
        compare_checkpoints([str(tiny_model_dirs["llama"]), str(second_seed_dir)], output_dir=output_dir)
    assert (output_dir / "report.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["report"]


@pytest.mark.parametrize(
    ("checkpoints", "kwargs", "message"),
    [
        (["A"], {}, "at least 2 checkpoints"),
        (["A", "A"], {}, "more than once"),
        (["A", "/no/such/folder"], {}, "does not exist"),
        (["A", "B"], {"names": ["x"]}, "one name per checkpoint"),
        (["A", "B"], {"dataset": "/no/such/data.jsonl"}, "neither 'builtin'"),
        (["A", "B"], {"block_size": 1}, "block_size"),
    ],
)
def test_bad_input_errors(tiny_model_dirs, second_seed_dir, checkpoints, kwargs, message):
    paths = {"A": str(tiny_model_dirs["llama"]), "B": str(second_seed_dir)}
    with pytest.raises(ValueError, match=message):
        compare_checkpoints([paths.get(c, c) for c in checkpoints], show_progress=False, **kwargs)
