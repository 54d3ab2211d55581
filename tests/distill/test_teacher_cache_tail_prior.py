"""`TeacherLogitsCache.tail_prior_logprobs`: the teacher's mean next-token distribution estimated from a cache,
against a float64 loop over the cached rows and against the teacher's true mean distribution."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from hf_interop import TeacherLogitsCache, load_causal_lm
from hf_interop import cache_teacher_logits as _cache_teacher_logits
from hf_interop.distill.teacher_cache import IDS_COLUMN, LOGPROBS_COLUMN, PAD_LOGPROB, TAIL_COLUMN


def cache_teacher_logits(*args, **kwargs):
    """Format version 1 (float16) unless a test names another encoding: what this file tests."""
    kwargs.setdefault("encoding", "float16")
    return _cache_teacher_logits(*args, **kwargs)


TOP_K = 8


class FrequencyBiasedTeacher(torch.nn.Module):
    """A tiny random causal LM plus a fixed per-token bias: like a real teacher, some tokens are frequent
    everywhere (a random tiny model alone is nearly uniform, so its mean distribution would say nothing)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("bias", torch.randn(model.config.vocab_size, generator=generator) * 3.0)

    def forward(self, input_ids, attention_mask=None):
        output = self.model(input_ids=input_ids, attention_mask=attention_mask)
        output.logits = output.logits + self.bias
        return output


@pytest.fixture(scope="module")
def tiny_teacher(tiny_model_dirs):
    model, _ = load_causal_lm(tiny_model_dirs["llama"], dtype="float32")
    return FrequencyBiasedTeacher(model).eval()


@pytest.fixture(scope="module")
def blocks(packed_corpus):
    return packed_corpus["validation"].select(range(10))


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_teacher, blocks):
    # shard_size 4: three shards, so the estimate runs over several Arrow batches
    return cache_teacher_logits(
        tiny_teacher, blocks, tmp_path_factory.mktemp("prior") / "cache", top_k=TOP_K, batch_size=4, shard_size=4,
        show_progress=False,
    )  # fmt: skip


def reference_prior(cache: TeacherLogitsCache) -> torch.Tensor:
    """Loop over rows and positions: top-k probabilities + the tail spread evenly, averaged, float64."""
    vocab = cache.vocab_size
    total = torch.zeros(vocab, dtype=torch.float64)
    count = 0
    for index in range(len(cache)):
        row = cache.row(index)
        for ids, logprobs, tail in zip(row[IDS_COLUMN], row[LOGPROBS_COLUMN], row[TAIL_COLUMN], strict=True):
            kept = logprobs > PAD_LOGPROB  # a compact cache's position keeps its own number of entries
            spread = tail.double().exp().item() / (vocab - int(kept.sum()))
            position = torch.full((vocab,), spread, dtype=torch.float64)
            position[ids[kept]] = logprobs[kept].double().exp()
            total += position
            count += 1
    return total / count


def test_tail_prior_matches_a_float64_loop_over_the_rows(cache):
    prior = cache.tail_prior_logprobs()
    assert prior.shape == (cache.vocab_size,) and prior.dtype == torch.float32
    assert torch.isfinite(prior).all()
    expected = reference_prior(cache)
    torch.testing.assert_close(prior.double().exp(), expected, rtol=1e-5, atol=1e-12)
    assert prior.double().exp().sum().item() == pytest.approx(1.0, abs=1e-5)
    assert cache.tail_prior_logprobs() is prior  # computed once per cache object
    # a freshly loaded cache gives the same values
    torch.testing.assert_close(TeacherLogitsCache.load(cache.path).tail_prior_logprobs(), prior, rtol=0, atol=0)


def test_tail_prior_is_within_the_mean_tail_mass_of_the_teachers_true_mean_distribution(cache, tiny_teacher, blocks):
    # per position, top-k + an evenly spread tail differs from the full distribution by at most the tail mass in
    # total variation; averaging keeps that bound (convexity)
    with torch.no_grad():
        logits = tiny_teacher(input_ids=torch.tensor(blocks["input_ids"])).logits[:, :-1]
    true_mean = torch.softmax(logits.double(), -1).reshape(-1, cache.vocab_size).mean(0)
    estimate = cache.tail_prior_logprobs().double().exp()
    mean_tail = torch.cat([cache.row(i)[TAIL_COLUMN] for i in range(len(cache))]).double().exp().mean()
    total_variation = 0.5 * (estimate - true_mean).abs().sum()
    assert total_variation <= mean_tail + 1e-4
    # and it is informative: far closer to the truth than a uniform distribution
    uniform_distance = 0.5 * (true_mean - 1.0 / cache.vocab_size).abs().sum()
    assert total_variation < 0.5 * uniform_distance


def test_tail_prior_counts_every_position_of_variable_length_rows(tmp_path, tiny_teacher):
    rows = Dataset.from_dict({"input_ids": [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18], [3, 4, 5]]})
    cache = cache_teacher_logits(tiny_teacher, rows, tmp_path / "cache", top_k=4, batch_size=3, show_progress=False)
    torch.testing.assert_close(cache.tail_prior_logprobs().double().exp(), reference_prior(cache), rtol=1e-5, atol=0)


def test_config_sparse_tail_choices_and_refusals(tmp_path):
    from hf_interop import DistillationConfig

    def make(**overrides):
        return DistillationConfig(output_dir=str(tmp_path), report_to="none", **overrides)

    assert make().sparse_tail == "bucket"
    config = make(teacher_logits_path=str(tmp_path / "cache"), sparse_tail="teacher_marginal")
    assert config.distillation_hyperparameters()["sparse_tail"] == "teacher_marginal"
    assert "sparse_tail" not in make().distillation_hyperparameters()
    with pytest.raises(ValueError, match=r"sparse_tail='uniform' is not known; use one of \['bucket', 'teacher_marg"):
        make(teacher_logits_path=str(tmp_path / "cache"), sparse_tail="uniform")
    with pytest.raises(ValueError, match="sparse_tail='teacher_marginal' .* teacher_logits_path is not set"):
        make(sparse_tail="teacher_marginal")
