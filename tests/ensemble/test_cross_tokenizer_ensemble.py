"""CrossTokenizerEnsemble: text-level generation by members whose vocabularies differ."""

from __future__ import annotations

import pytest
from cross_tokenizer_samples import _bytes_of
from helpers import build_tiny_causal_lm

from hf_interop.cross_tokenizer_ensemble import CrossTokenizerEnsemble
from hf_interop.loading import load_gpt2_tokenizer


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    return load_gpt2_tokenizer()


@pytest.fixture(scope="module")
def ensemble_members(corpus_tokenizer, gpt2_tokenizer):
    # a larger init scale than the default makes the random models' greedy choices vary from step to step
    llama = build_tiny_causal_lm(
        "llama", len(corpus_tokenizer), seed=3, tokenizer=corpus_tokenizer, initializer_range=0.5
    )
    gpt2 = build_tiny_causal_lm("gpt2", len(gpt2_tokenizer), seed=4, tokenizer=gpt2_tokenizer, initializer_range=0.5)
    return (llama, corpus_tokenizer), (gpt2, gpt2_tokenizer)


def test_single_member_ensemble_equals_its_own_greedy_generate(ensemble_members):
    model, tokenizer = ensemble_members[0]
    ensemble = CrossTokenizerEnsemble([(model, tokenizer)], top_k=3)
    prompt = "The interpreter"
    text = ensemble.generate(prompt, max_new_tokens=12)
    inputs = tokenizer(prompt, return_tensors="pt")
    suppressed = ensemble.members[0].suppressed_ids
    reference = model.generate(
        **inputs, max_new_tokens=12, do_sample=False, suppress_tokens=suppressed, pad_token_id=tokenizer.pad_token_id
    )
    new_ids = reference[0, inputs["input_ids"].shape[1] :]
    assert text == tokenizer.decode(new_ids, skip_special_tokens=True)
    assert len(set(new_ids.tolist())) > 1  # not a degenerate repetition of one token
    # the KV cache is reused: the prompt once, then one new token per step
    assert ensemble.forward_token_counts == [inputs["input_ids"].shape[1] + len(new_ids) - 1]


def test_ensemble_of_different_vocabularies(ensemble_members):
    ensemble = CrossTokenizerEnsemble(list(ensemble_members), weights=[0.5, 0.5], top_k=4, look_behind=4)
    prompt = "Numbers like 12345 and café"
    first = ensemble.generate(prompt, max_new_tokens=10)
    assert isinstance(first, str) and first
    assert ensemble.generate(prompt, max_new_tokens=10) == first  # greedy is deterministic
    # each member's own tokens spell exactly the prompt plus the generated text
    for member in ensemble.members:
        assert _bytes_of(member.tokenizer, member.ids).decode("utf-8", errors="replace") == prompt + first
    # far fewer forward tokens than re-running every member on the whole text at every step
    prompt_lengths = [len(tokenizer(prompt)["input_ids"]) for _, tokenizer in ensemble_members]
    naive = sum(length * 10 + 55 for length in prompt_lengths)
    assert sum(ensemble.forward_token_counts) < naive / 2
    sampled = ensemble.generate(prompt, max_new_tokens=10, do_sample=True, seed=7)
    assert ensemble.generate(prompt, max_new_tokens=10, do_sample=True, seed=7) == sampled
    # a member with all the weight decides alone
    only_second = CrossTokenizerEnsemble(list(ensemble_members), weights=[0.0, 1.0], top_k=4)
    alone = CrossTokenizerEnsemble([ensemble_members[1]], top_k=4)
    assert only_second.generate(prompt, max_new_tokens=8) == alone.generate(prompt, max_new_tokens=8)


def test_ensemble_errors(ensemble_members):
    with pytest.raises(ValueError, match="members is empty"):
        CrossTokenizerEnsemble([])
    with pytest.raises(ValueError, match="weights has 1 entries for 2 members"):
        CrossTokenizerEnsemble(list(ensemble_members), weights=[1.0])
    with pytest.raises(ValueError, match="top_k=0"):
        CrossTokenizerEnsemble(list(ensemble_members), top_k=0)
    with pytest.raises(ValueError, match=r"members\[0\]"):
        CrossTokenizerEnsemble([ensemble_members[0][0]])
    with pytest.raises(ValueError, match="max_vocab_union_size=1000"):
        CrossTokenizerEnsemble(list(ensemble_members), max_vocab_union_size=1000)
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        CrossTokenizerEnsemble([ensemble_members[0]]).generate("")


# --------------------------------------------------------------------------------------------------------------
# real assets: SmolLM2-135M teacher, GPT-2-tokenizer student


@pytest.mark.slow
def test_ensemble_with_smollm2_and_a_gpt2_tokenizer_member(smollm2, gpt2_tokenizer):
    teacher, teacher_tokenizer = smollm2
    student = build_tiny_causal_lm("gpt2", len(gpt2_tokenizer), seed=0, tokenizer=gpt2_tokenizer)
    prompt = "The capital of France is"
    # all the weight on SmolLM2: the ensemble writes what SmolLM2's own greedy search writes
    ensemble = CrossTokenizerEnsemble([(teacher, teacher_tokenizer), (student, gpt2_tokenizer)], weights=[1.0, 0.0])
    text = ensemble.generate(prompt, max_new_tokens=6)
    inputs = teacher_tokenizer(prompt, return_tensors="pt")
    reference = teacher.generate(
        **inputs,
        max_new_tokens=6,
        do_sample=False,
        suppress_tokens=ensemble.members[0].suppressed_ids,
        pad_token_id=teacher_tokenizer.pad_token_id,
    )
    assert text == teacher_tokenizer.decode(reference[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text
    mixed = CrossTokenizerEnsemble([(teacher, teacher_tokenizer), (student, gpt2_tokenizer)], weights=[0.7, 0.3])
    assert isinstance(mixed.generate(prompt, max_new_tokens=3), str)
