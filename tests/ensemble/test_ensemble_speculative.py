"""Speculative ensemble decoding (`generate(proposer=...)`, `ensemble/speculative.py`): greedy tokens identical to
plain `generate()`, sampled tokens distributed as the ensemble's own distribution (chi-square against the exact joint
of two tokens), caches after rollback equal to a fresh encoding, and bad input refused before the first forward."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import build_tiny_causal_lm

import hf_interop.ensemble.speculative as speculative
from hf_interop._compat import output_cache
from hf_interop.ensemble import EnsembleForCausalLM

PROMPT = "The with statement is used to"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one thread avoids the spin-waits that make each forward ~15x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _prompt_ids(tokenizer):
    return tokenizer(PROMPT, return_tensors="pt").input_ids


# ----------------------------------------------------------------------------------------------------------------
# 1. Greedy: the tokens of plain generate()
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def separate_proposer(tokenizer):
    """A small model outside the ensemble, on the same tokenizer."""
    return build_tiny_causal_lm("llama", len(tokenizer), seed=11, tokenizer=tokenizer, num_hidden_layers=1)


@pytest.mark.parametrize("combination", ["mixture", "product", "arithmetic"])
@pytest.mark.parametrize("proposer_kind", ["member", "separate"])
@pytest.mark.parametrize("num_draft_tokens", [1, 4])
def test_greedy_speculative_tokens_equal_plain_generate(
    members, tokenizer, separate_proposer, combination, proposer_kind, num_draft_tokens
):
    weights = [1.0, 0.6, -0.6] if combination == "arithmetic" else [0.5, 0.3, 0.2]
    ensemble = EnsembleForCausalLM.from_members([(m, tokenizer) for m in members], weights, combination)
    ids = _prompt_ids(tokenizer)
    options = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False)
    plain = ensemble.generate(ids, **options)
    proposer = 2 if proposer_kind == "member" else (separate_proposer, tokenizer)
    output = ensemble.generate(
        ids, **options, proposer=proposer, num_draft_tokens=num_draft_tokens, return_dict_in_generate=True
    )
    assert torch.equal(output.sequences, plain)
    new_tokens = plain.shape[1] - ids.shape[1]
    assert output.num_accepted <= output.num_drafted <= num_draft_tokens * output.num_rounds
    # every round adds its kept drafts and one token of the ensemble's own
    assert output.num_accepted + output.num_rounds == new_tokens
    assert output.acceptance_rate == pytest.approx(output.num_accepted / output.num_drafted)
    # the plain tensor form too, and the attention mask of a single row is accepted
    again = ensemble.generate(
        ids, attention_mask=torch.ones_like(ids), **options, proposer=proposer, num_draft_tokens=num_draft_tokens
    )
    assert torch.equal(again, plain)


@pytest.mark.parametrize("combination", ["mixture", "product", "arithmetic"])
def test_prompt_lookup_drafts_give_the_tokens_of_plain_generate(members, tokenizer, combination):
    weights = [1.0, 0.6, -0.6] if combination == "arithmetic" else [0.5, 0.3, 0.2]
    ensemble = EnsembleForCausalLM.from_members([(m, tokenizer) for m in members], weights, combination)
    # a prompt that repeats itself, so the copied drafts are right some of the time and wrong some of the time
    ids = tokenizer(" ".join([PROMPT] * 3), return_tensors="pt").input_ids
    options = dict(max_new_tokens=30, min_new_tokens=30, do_sample=False)
    plain = ensemble.generate(ids, **options)
    output = ensemble.generate(
        ids, **options, proposer="prompt_lookup", num_draft_tokens=4, return_dict_in_generate=True
    )
    assert torch.equal(output.sequences, plain)
    assert output.num_drafted > 0
    assert output.num_accepted + output.num_rounds == plain.shape[1] - ids.shape[1]
    assert 0 < output.num_accepted < output.num_drafted, "the check needs kept and rejected copies"


def test_prompt_lookup_copies_what_followed_the_latest_longest_match():
    lookup = speculative._PromptLookup(max_ngram=3)
    #          0  1  2  3  4  5  6  7  8  9
    sequence = [5, 6, 7, 1, 6, 7, 2, 9, 6, 7]
    # "6 7" (2-gram; no earlier "9 6 7") last seen at 4-5, followed by 2 9 6
    assert lookup.draft(sequence, 3) == [2, 9, 6]
    assert lookup.draft([5, 6, 7, 8, 5, 6, 7], 2) == [8, 5]  # the 3-gram wins
    assert lookup.draft([1, 2, 3, 4], 4) == []  # nothing repeats: no draft, the round is a plain step
    assert lookup.draft([4, 4], 5) == [4]  # never copies past the text's end
    assert lookup.draft([4, 1, 4], 0) == []


def test_a_member_proposing_for_itself_accepts_every_draft(members, tokenizer):
    ensemble = EnsembleForCausalLM.from_members([(members[0], tokenizer)])
    output = ensemble.generate(
        _prompt_ids(tokenizer), max_new_tokens=13, do_sample=False, proposer=0, num_draft_tokens=4,
        return_dict_in_generate=True,
    )  # fmt: skip
    assert output.acceptance_rate == 1.0 and output.num_rounds == 3  # 5 + 5 + 3 tokens
    assert torch.equal(output.sequences, ensemble.generate(_prompt_ids(tokenizer), max_new_tokens=13, do_sample=False))


def test_generation_stops_at_eos_like_plain_generate(members, tokenizer):
    ensemble = EnsembleForCausalLM.from_members([(m, tokenizer) for m in members], combination="product")
    ids = _prompt_ids(tokenizer)
    plain = ensemble.generate(ids, max_new_tokens=12, do_sample=False)
    # make the 5th greedy token the end of sequence: generation must stop right after it, as plain generate() does
    eos = int(plain[0, ids.shape[1] + 4])
    plain_eos = ensemble.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=eos)
    fast = ensemble.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=eos, proposer=1, num_draft_tokens=3)
    assert torch.equal(fast, plain_eos)
    assert fast[0, -1].item() == eos and fast.shape[1] <= ids.shape[1] + 5


# ----------------------------------------------------------------------------------------------------------------
# 2. Rollback: caches equal a fresh encoding of the accepted text
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("proposer_kind", ["separate", "member"])
def test_caches_after_rollback_equal_a_fresh_encode(members, tokenizer, separate_proposer, proposer_kind):
    ensemble = EnsembleForCausalLM.from_members([(m, tokenizer) for m in members], combination="mixture")
    prompt = _prompt_ids(tokenizer)[0].tolist()
    processors = ensemble._get_logits_processor(
        generation_config=ensemble.generation_config, input_ids_seq_length=len(prompt), device=ensemble.device
    )
    proposer, index = (separate_proposer, None) if proposer_kind == "separate" else (members[1], 1)
    # sampling from near-uniform tiny models: most drafts are rejected, so caches are cropped in most rounds
    decoder = speculative._SpeculativeDecoder(ensemble, proposer, processors, True, ensemble.device, index)
    torch.manual_seed(0)
    with torch.no_grad():
        generated = decoder.run(prompt, max_new_tokens=20, num_draft_tokens=4, eos_ids=set())
    assert decoder.num_accepted < decoder.num_drafted, "the check needs rejected drafts to roll back"
    text = prompt + generated
    verifiers = [i for i in range(len(members)) if i != index]
    assert decoder.ensemble_length == decoder.ensemble_cache.get_seq_length() == len(text) - 1
    models = [members[i] for i in verifiers] + [proposer]
    caches = [decoder.ensemble_cache.member_caches[i] for i in verifiers] + [decoder.proposer_cache]
    lengths = [decoder.ensemble_length] * len(verifiers) + [decoder.proposer_length]
    if index is not None:  # a member proposing keeps one cache: the proposer's
        assert decoder.ensemble_cache.member_caches[index] is None
        assert decoder.proposer_length == len(text) - 1
    for model, cache, length in zip(models, caches, lengths, strict=True):
        assert cache.get_seq_length() == length
        with torch.no_grad():
            fresh = output_cache(model(input_ids=torch.tensor([text[:length]]), use_cache=True))
        assert len(cache.layers) == len(fresh.layers)
        for kept, reference in zip(cache.layers, fresh.layers, strict=True):
            torch.testing.assert_close(kept.keys, reference.keys, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(kept.values, reference.values, atol=1e-5, rtol=1e-5)


def test_a_member_proposing_runs_each_token_once(members, tokenizer):
    """The proposing member verifies with its drafting steps: it sees every kept token once and every rejected draft
    once (the plain loop would run it over each round's tokens a second time to verify)."""
    ensemble = EnsembleForCausalLM.from_members([(m, tokenizer) for m in members], combination="mixture")
    fed = []
    handle = members[1].register_forward_pre_hook(
        lambda module, args, kwargs: fed.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            result = ensemble.generate(
                _prompt_ids(tokenizer), max_new_tokens=20, do_sample=True, proposer=1, num_draft_tokens=3,
                return_dict_in_generate=True,
            )  # fmt: skip
    finally:
        handle.remove()
    rejected = result.num_drafted - result.num_accepted
    assert rejected > 0 and result.num_accepted > 0, "the check needs both kept and rejected drafts"
    # the last round's new tokens are never fed (generation ends), every other token exactly once
    new_in_last_round = result.sequences.shape[1] - sum(fed) + rejected
    assert 1 <= new_in_last_round <= 4
    assert max(fed[1:]) <= 4  # after the prompt: the last round's new tokens, or one draft


# ----------------------------------------------------------------------------------------------------------------
# 3. Sampling: the ensemble's distribution, exactly
# ----------------------------------------------------------------------------------------------------------------

SMALL_VOCAB = 10


def _peaked_tiny_lm(seed, scale):
    """A 1-layer random LM over 10 tokens whose head is scaled so its next-token distributions are far from uniform."""
    model = build_tiny_causal_lm(
        "llama", SMALL_VOCAB, seed=seed, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def _warp(log_probs, temperature, top_k):
    """Float64 reference of generate()'s warpers: temperature, then the top-k tokens renormalised."""
    scores = log_probs.double() / temperature
    if top_k is not None:
        threshold = scores.topk(top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < threshold, float("-inf"))
    return torch.softmax(scores, dim=-1)


def _chi_square_p_value(counts, expected):
    """Pearson's chi-square test; cells expected below 5 are pooled into one. Returns (statistic, p-value)."""
    order = expected >= 5
    observed = torch.cat([counts[order], counts[~order].sum()[None]])
    wanted = torch.cat([expected[order], expected[~order].sum()[None]])
    keep = wanted > 0
    observed, wanted = observed[keep], wanted[keep]
    statistic = ((observed - wanted) ** 2 / wanted).sum()
    degrees = torch.tensor(float(len(wanted) - 1), dtype=torch.float64)
    return statistic.item(), torch.special.gammaincc(degrees / 2, statistic / 2).item()


@pytest.mark.parametrize(
    "combination,temperature,top_k", [("mixture", 1.0, None), ("product", 0.8, 4)], ids=["mixture", "product-warped"]
)
def test_sampled_tokens_follow_the_ensemble_distribution(combination, temperature, top_k):
    members = [_peaked_tiny_lm(seed, 40.0) for seed in (1, 2)]
    # member 1's weights with a flatter head: agrees with the ensemble often, not always (rejections, residual samples)
    proposer = _peaked_tiny_lm(1, 15.0)
    ensemble = EnsembleForCausalLM.from_members(members, combination=combination)
    prompt = torch.tensor([[0, 3, 5]])
    options = dict(do_sample=True, temperature=temperature, top_k=top_k or 0, max_new_tokens=2)

    # exact joint distribution of the first two new tokens under the ensemble (and under the proposer alone)
    with torch.no_grad():
        both = torch.cat([prompt.repeat(SMALL_VOCAB, 1), torch.arange(SMALL_VOCAB)[:, None]], dim=1)
        first = _warp(ensemble(input_ids=prompt).logits[0, -1], temperature, top_k)
        second = _warp(ensemble(input_ids=both).logits[:, -1], temperature, top_k)
        joint = (first[:, None] * second).reshape(-1)
        proposer_first = _warp(torch.log_softmax(proposer(input_ids=prompt).logits[0, -1], -1), temperature, top_k)
        proposer_second = _warp(torch.log_softmax(proposer(input_ids=both).logits[:, -1], -1), temperature, top_k)
        proposer_joint = (proposer_first[:, None] * proposer_second).reshape(-1)

    num_samples = 1000
    torch.manual_seed(0)
    counts = torch.zeros(SMALL_VOCAB * SMALL_VOCAB, dtype=torch.float64)
    drafted = accepted = 0
    for _ in range(num_samples):
        output = ensemble.generate(
            prompt, **options, proposer=(proposer, None), num_draft_tokens=2, return_dict_in_generate=True
        )
        first_token, second_token = output.sequences[0, -2:].tolist()
        counts[first_token * SMALL_VOCAB + second_token] += 1
        drafted, accepted = drafted + output.num_drafted, accepted + output.num_accepted
    assert 0.1 < accepted / drafted < 0.9, "both kept and rejected drafts must occur for the check to mean anything"
    _, p_value = _chi_square_p_value(counts, joint * num_samples)
    assert p_value > 1e-3, f"speculative samples do not follow the ensemble distribution (p={p_value:.2e})"
    # the test has power: samples with the proposer's own distribution would fail it by far
    _, p_proposer = _chi_square_p_value(proposer_joint * num_samples, joint * num_samples)
    assert p_proposer < 1e-6
    total_variation = 0.5 * (counts / num_samples - joint).abs().sum().item()
    assert total_variation < 0.25 * (0.5 * (proposer_joint - joint).abs().sum().item())


def test_prompt_lookup_sampling_follows_the_ensemble_distribution():
    """A copied draft is a point-mass proposal: kept with probability p(d), else a sample of p without d."""
    members = [_peaked_tiny_lm(seed, 3.0) for seed in (1, 2)]
    ensemble = EnsembleForCausalLM.from_members(members, combination="mixture")
    with torch.no_grad():
        # a prompt "0 a b a": the lookup drafts b; pick b so the ensemble keeps it sometimes, not always
        candidates = []
        for a, b in itertools.product(range(1, SMALL_VOCAB), repeat=2):
            prompt = torch.tensor([[0, a, b, a]])
            p_b = torch.softmax(ensemble(input_ids=prompt).logits[0, -1], -1)[b].item()
            candidates.append((abs(p_b - 0.5), a, b))
        _, a, b = min(candidates)
        prompt = torch.tensor([[0, a, b, a]])
        both = torch.cat([prompt.repeat(SMALL_VOCAB, 1), torch.arange(SMALL_VOCAB)[:, None]], dim=1)
        first = torch.softmax(ensemble(input_ids=prompt).logits[0, -1].double(), -1)
        second = torch.softmax(ensemble(input_ids=both).logits[:, -1].double(), -1)
        joint = (first[:, None] * second).reshape(-1)
    assert 0.2 < first[b] < 0.8
    num_samples = 1000
    torch.manual_seed(0)
    counts = torch.zeros(SMALL_VOCAB * SMALL_VOCAB, dtype=torch.float64)
    drafted = accepted = 0
    for _ in range(num_samples):
        output = ensemble.generate(
            prompt, do_sample=True, max_new_tokens=2, proposer="prompt_lookup", num_draft_tokens=2,
            return_dict_in_generate=True,
        )  # fmt: skip
        first_token, second_token = output.sequences[0, -2:].tolist()
        counts[first_token * SMALL_VOCAB + second_token] += 1
        drafted, accepted = drafted + output.num_drafted, accepted + output.num_accepted
    assert drafted == num_samples and 0.1 < accepted / drafted < 0.9
    _, p_value = _chi_square_p_value(counts, joint * num_samples)
    assert p_value > 1e-3, f"prompt-lookup samples do not follow the ensemble distribution (p={p_value:.2e})"
    # power: always keeping the copied token (a wrong rule) would put all mass on first token b
    wrong = torch.zeros_like(joint)
    wrong[b * SMALL_VOCAB : (b + 1) * SMALL_VOCAB] = second[b]
    _, p_wrong = _chi_square_p_value(wrong * num_samples, joint * num_samples)
    assert p_wrong < 1e-6


def test_seeded_sampling_is_reproducible(members, tokenizer):
    ensemble = EnsembleForCausalLM.from_members([(m, tokenizer) for m in members])
    ids = _prompt_ids(tokenizer)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(ensemble.generate(ids, do_sample=True, max_new_tokens=10, proposer=0, num_draft_tokens=3))
    assert torch.equal(runs[0], runs[1])


# ----------------------------------------------------------------------------------------------------------------
# 4. Bad input: refused before the first forward
# ----------------------------------------------------------------------------------------------------------------


def _other_tokenizer(corpus):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<|endoftext|>", "<pad>"])
    backend.train_from_iterator(corpus["train"]["text"][:200], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<pad>")


@pytest.fixture
def no_generation(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("generation started before the arguments were validated")

    monkeypatch.setattr(speculative._SpeculativeDecoder, "run", fail)


def test_bad_speculative_arguments_are_refused_before_generation(
    members, tokenizer, ensemble3, corpus, separate_proposer, no_generation
):
    ids = _prompt_ids(tokenizer)
    other = _other_tokenizer(corpus)
    cases = [
        (dict(proposer=(separate_proposer, other)), "does not share the token-to-id map.*cross_tokenizer=True"),
        (dict(proposer=0, num_draft_tokens=0), r"num_draft_tokens=0 must be an integer >= 1"),
        (dict(proposer=0, num_draft_tokens=-2), r"num_draft_tokens=-2 must be an integer >= 1"),
        (dict(proposer=0, num_draft_tokens=2.5), r"num_draft_tokens=2.5 must be an integer >= 1"),
        (dict(proposer=0, num_beams=3), r"num_beams=3: beam search is not supported"),
        (dict(proposer=0, num_return_sequences=2), "num_return_sequences"),
        (dict(proposer=5), "proposer=5 is not a member index"),
        (dict(num_draft_tokens=3), "needs a proposer"),
        (dict(proposer=None), "needs a proposer"),
        (dict(proposer="members[0]"), "proposer='members\\[0\\]' is not a drafting method.*'prompt_lookup'"),
        (dict(proposer=1.5), "proposer must be a member index"),
        (dict(proposer=0, streamer=object()), "does not take streamer="),
        (dict(proposer=0, no_such_option=1), r"options it does not know: \['no_such_option'\]"),
        (dict(proposer=0, max_length=3), "nothing to generate"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            ensemble3.generate(ids, **kwargs)
    with pytest.raises(ValueError, match="one sequence at a time; got a batch of 2"):
        ensemble3.generate(ids.repeat(2, 1), proposer=0)
    small = build_tiny_causal_lm("llama", len(tokenizer) - 10, seed=3)
    with pytest.raises(ValueError, match=f"has {len(tokenizer) - 10} tokens but the ensemble's has {len(tokenizer)}"):
        ensemble3.generate(ids, proposer=small)


def test_every_combination_of_member_proposer_and_draft_length_is_exact_for_a_short_text(members, tokenizer):
    """A sweep over all members as proposers and k = 1..5 on one short text (cheap, catches off-by-one rollbacks)."""
    ensemble = EnsembleForCausalLM.from_members([(m, tokenizer) for m in members], combination="product")
    ids = _prompt_ids(tokenizer)
    plain = ensemble.generate(ids, max_new_tokens=9, do_sample=False)
    for proposer, k in itertools.product(range(3), range(1, 6)):
        fast = ensemble.generate(ids, max_new_tokens=9, do_sample=False, proposer=proposer, num_draft_tokens=k)
        assert torch.equal(fast, plain), (proposer, k)
