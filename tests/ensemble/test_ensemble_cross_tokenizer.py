"""EnsembleForCausalLM with members of different vocabularies (cross_tokenizer=True): generate() over pooled text
pieces through CrossTokenizerEnsemble's engine, returning ids of the ensemble's tokenizer; saving and reloading;
errors; and pinned hub revisions of members (both modes)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import build_tiny_causal_lm, transformers_log

from hf_interop.cross_tokenizer import load_gpt2_tokenizer, token_byte_strings
from hf_interop.ensemble import EnsembleConfig, EnsembleForCausalLM
from hf_interop.ensemble.cross_tokenizer import CrossTokenizerEnsemble

PROMPT = "Numbers like 12345 and café"
OTHER_PROMPT = "The with statement"


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    return load_gpt2_tokenizer()


@pytest.fixture(scope="module")
def pairs(corpus_tokenizer, gpt2_tokenizer):
    """A tiny Llama with the 512-token corpus tokenizer and a tiny GPT-2 with the real 50,257-token GPT-2 tokenizer."""
    # a larger init scale than the default makes the random models' greedy choices vary from step to step
    llama = build_tiny_causal_lm(
        "llama", len(corpus_tokenizer), seed=3, tokenizer=corpus_tokenizer, initializer_range=0.5
    )
    gpt2 = build_tiny_causal_lm("gpt2", len(gpt2_tokenizer), seed=4, tokenizer=gpt2_tokenizer, initializer_range=0.5)
    return [(llama, corpus_tokenizer), (gpt2, gpt2_tokenizer)]


@pytest.fixture(scope="module")
def member_dirs(pairs, tmp_path_factory):
    """The two members saved with their tokenizers (for from_pretrained round trips)."""
    dirs = []
    for name, (model, tokenizer) in zip(("llama_corpus", "gpt2_gpt2"), pairs, strict=True):
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        dirs.append(str(folder))
    return dirs


@pytest.fixture(scope="module")
def ensemble(pairs):
    return EnsembleForCausalLM.from_members(
        pairs, [0.5, 0.5], cross_tokenizer=True, cross_tokenizer_top_k=4, cross_tokenizer_look_behind=4
    )


def _ids(tokenizer, text=PROMPT):
    return tokenizer(text, return_tensors="pt")


def _suppressed(ensemble, index):
    # the engine never proposes non-EOS special tokens (they spell no text); a member's own generate() must skip them
    return ensemble._cross_tokenizer_engine.members[index].suppressed_ids


# ----------------------------------------------------------------------------------------------------------------
# Opting in
# ----------------------------------------------------------------------------------------------------------------


def test_members_with_different_tokenizers_need_the_option_and_the_error_names_it(pairs):
    with pytest.raises(ValueError, match="pass cross_tokenizer=True to EnsembleForCausalLM.from_members") as error:
        EnsembleForCausalLM.from_members(pairs)
    assert "tokens differ" in str(error.value)  # the mismatch itself is still described


# ----------------------------------------------------------------------------------------------------------------
# generate()
# ----------------------------------------------------------------------------------------------------------------


def test_generate_logs_no_cache_name_deprecation(ensemble, corpus_tokenizer):
    # the cross-tokenizer engine keeps one cache per member and reads it from each member's output
    with transformers_log() as messages:
        ensemble.generate(**_ids(corpus_tokenizer), max_new_tokens=4, do_sample=False)
    assert not [message for message in messages if "deprecated" in message], messages


def test_generate_returns_the_prompt_then_valid_ids_of_the_ensemble_tokenizer(ensemble, corpus_tokenizer):
    inputs = _ids(corpus_tokenizer)
    output = ensemble.generate(**inputs, max_new_tokens=10, do_sample=False)
    prompt_length = inputs["input_ids"].shape[1]
    assert output.dtype == torch.long and output.shape == (1, prompt_length + 10)
    assert torch.equal(output[:, :prompt_length], inputs["input_ids"])
    assert int(output.max()) < len(corpus_tokenizer) and int(output.min()) >= 0
    # max_new_tokens counts the ensemble tokenizer's tokens, as generate() does; each stands for text (no specials)
    table = token_byte_strings(corpus_tokenizer)
    assert all(table[i] for i in output[0, prompt_length:].tolist())
    # greedy is deterministic
    assert torch.equal(ensemble.generate(**inputs, max_new_tokens=10), output)
    # return_dict_in_generate gives the same sequences
    as_dict = ensemble.generate(**inputs, max_new_tokens=10, return_dict_in_generate=True)
    assert torch.equal(as_dict.sequences, output)


def test_generate_matches_cross_tokenizer_ensemble_greedy_and_seeded_sampling(ensemble, pairs, corpus_tokenizer):
    engine = CrossTokenizerEnsemble(pairs, weights=[0.5, 0.5], top_k=4, look_behind=4)
    inputs = _ids(corpus_tokenizer)
    prompt_length = inputs["input_ids"].shape[1]
    # the engine counts steps (text pieces), the model counts ensemble-tokenizer tokens: the model's text is a prefix
    expected = engine.generate(PROMPT, max_new_tokens=30)
    output = ensemble.generate(**inputs, max_new_tokens=8)
    text = corpus_tokenizer.decode(output[0, prompt_length:])
    assert len(text) >= 8 and expected.startswith(text)
    # sampling draws from torch's global generator in both, so the same seed gives the same pieces
    torch.manual_seed(11)
    expected = engine.generate(PROMPT, max_new_tokens=30, do_sample=True, temperature=0.8)
    torch.manual_seed(11)
    sampled = ensemble.generate(**inputs, max_new_tokens=8, do_sample=True, temperature=0.8)
    sampled_text = corpus_tokenizer.decode(sampled[0, prompt_length:])
    assert expected.startswith(sampled_text) and sampled_text != text
    torch.manual_seed(11)
    assert torch.equal(ensemble.generate(**inputs, max_new_tokens=8, do_sample=True, temperature=0.8), sampled)


def test_member_with_all_the_weight_reproduces_its_own_greedy_generate(pairs, corpus_tokenizer, gpt2_tokenizer):
    (llama, _), (gpt2, _) = pairs
    inputs = _ids(corpus_tokenizer)
    prompt_length = inputs["input_ids"].shape[1]
    only_first = EnsembleForCausalLM.from_members(pairs, [1.0, 0.0], cross_tokenizer=True, cross_tokenizer_top_k=4)
    output = only_first.generate(**inputs, max_new_tokens=12)
    reference = llama.generate(
        **inputs,
        max_new_tokens=12,
        do_sample=False,
        suppress_tokens=_suppressed(only_first, 0),
        pad_token_id=corpus_tokenizer.pad_token_id,
    )
    assert torch.equal(output, reference)  # the very same ids, not just the same text
    assert len(set(output[0, prompt_length:].tolist())) > 1  # not a degenerate repetition

    # all the weight on the GPT-2-tokenizer member: its own greedy text, written in the corpus tokenizer's ids
    only_second = EnsembleForCausalLM.from_members(pairs, [0.0, 1.0], cross_tokenizer=True, cross_tokenizer_top_k=4)
    output = only_second.generate(**inputs, max_new_tokens=12)
    gpt2_inputs = _ids(gpt2_tokenizer)
    reference = gpt2.generate(
        **gpt2_inputs,
        max_new_tokens=20,
        do_sample=False,
        suppress_tokens=_suppressed(only_second, 1),
        pad_token_id=gpt2_tokenizer.eos_token_id,
    )
    reference_text = gpt2_tokenizer.decode(reference[0, gpt2_inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    text = corpus_tokenizer.decode(output[0, prompt_length:])
    assert text and reference_text.startswith(text)


def test_sampling_filters_apply_to_the_pooled_candidates(ensemble, corpus_tokenizer):
    inputs = _ids(corpus_tokenizer)
    greedy = ensemble.generate(**inputs, max_new_tokens=8)
    torch.manual_seed(0)
    assert torch.equal(ensemble.generate(**inputs, max_new_tokens=8, do_sample=True, top_k=1), greedy)
    torch.manual_seed(0)
    assert torch.equal(ensemble.generate(**inputs, max_new_tokens=8, do_sample=True, top_p=1e-6), greedy)


def test_text_generation_pipeline_accepts_the_cross_tokenizer_ensemble(ensemble, corpus_tokenizer):
    from transformers import pipeline

    generator = pipeline("text-generation", model=ensemble, tokenizer=corpus_tokenizer)
    text = generator(OTHER_PROMPT, max_new_tokens=6, do_sample=False)[0]["generated_text"]
    expected = ensemble.generate(**_ids(corpus_tokenizer, OTHER_PROMPT), max_new_tokens=6)
    assert text == corpus_tokenizer.decode(expected[0], skip_special_tokens=True)


def test_left_padded_batch_equals_each_prompt_alone(ensemble, corpus_tokenizer):
    corpus_tokenizer.padding_side = "left"
    batch = corpus_tokenizer([PROMPT, OTHER_PROMPT], return_tensors="pt", padding=True)
    output = ensemble.generate(**batch, max_new_tokens=6)
    width = batch["input_ids"].shape[1]
    assert torch.equal(output[:, :width], batch["input_ids"])
    for row, text in enumerate((PROMPT, OTHER_PROMPT)):
        inputs = _ids(corpus_tokenizer, text)
        generated = ensemble.generate(**inputs, max_new_tokens=6)[0, inputs["input_ids"].shape[1] :]
        assert generated.numel() > 0
        assert torch.equal(output[row, width : width + len(generated)], generated), text
        assert (output[row, width + len(generated) :] == corpus_tokenizer.pad_token_id).all()


def test_end_of_sequence_stops_the_row_and_min_new_tokens_delays_it(pairs, corpus_tokenizer):
    llama, _ = pairs[0]
    eos = corpus_tokenizer.eos_token_id
    bias = torch.zeros(llama.config.vocab_size)
    bias[eos] = 50.0  # makes EOS the llama's clear favourite
    handle = llama.lm_head.register_forward_hook(lambda module, args, output: output + bias.to(output.dtype))
    try:
        ensemble = EnsembleForCausalLM.from_members(pairs, [1.0, 0.0], cross_tokenizer=True)
        inputs = _ids(corpus_tokenizer)
        prompt_length = inputs["input_ids"].shape[1]
        output = ensemble.generate(**inputs, max_new_tokens=5)
        assert output[0, prompt_length:].tolist() == [eos]  # stops at once, EOS written like generate() does
        delayed = ensemble.generate(**inputs, max_new_tokens=5, min_new_tokens=3)
        assert delayed.shape[1] >= prompt_length + 3 and eos not in delayed[0, prompt_length : prompt_length + 3]
    finally:
        handle.remove()


# ----------------------------------------------------------------------------------------------------------------
# The engine: cached generation equals re-running every member on its whole sequence
# ----------------------------------------------------------------------------------------------------------------


class _NoCacheEnsemble(CrossTokenizerEnsemble):
    """Reference: every step re-runs each member on its whole token sequence."""

    def _next_token_log_probs(self, member):
        member.cache, member.cached_ids = None, []
        return super()._next_token_log_probs(member)


def test_cached_engine_equals_no_cache_reference_across_re_encodings(pairs):
    rewritten = []

    class Counting(CrossTokenizerEnsemble):
        def _extend(self, member, piece):
            before = list(member.ids)
            super()._extend(member, piece)
            if member.ids[: len(before)] != before:
                rewritten.append(piece)  # a re-encoding changed ids the member's KV cache already held

    cached = Counting(pairs, weights=[0.5, 0.5], top_k=4, look_behind=4)
    reference = _NoCacheEnsemble(pairs, weights=[0.5, 0.5], top_k=4, look_behind=4)
    for prompt in (PROMPT, OTHER_PROMPT, "naïve 東京 emoji 😀 and"):
        text = cached.generate(prompt, max_new_tokens=24)
        assert text == reference.generate(prompt, max_new_tokens=24), prompt
        for member in cached.members:  # each member's own ids spell exactly the prompt and the generated text
            table = token_byte_strings(member.tokenizer)
            spelled = b"".join(table[i] for i in member.ids if table[i] is not None)
            assert spelled.decode("utf-8", errors="replace") == prompt + text
    assert rewritten, "no step re-encoded a cached token; the test would not exercise cache cropping"


# ----------------------------------------------------------------------------------------------------------------
# forward(), saving, loading
# ----------------------------------------------------------------------------------------------------------------


def test_forward_refuses_and_names_generate(ensemble, corpus_tokenizer):
    with pytest.raises(NotImplementedError, match=r"forward\(\).*cross_tokenizer=True.*ensemble.generate"):
        ensemble(**_ids(corpus_tokenizer))
    with pytest.raises(NotImplementedError, match="member_log_probs"):
        ensemble.member_log_probs(_ids(corpus_tokenizer)["input_ids"])


def test_save_and_from_pretrained_round_trip_gives_identical_generations(member_dirs, corpus_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    built = EnsembleForCausalLM.from_members(member_dirs, [0.6, 0.4], cross_tokenizer=True, cross_tokenizer_top_k=5)
    built.save_pretrained(tmp_path / "ens")
    saved = json.loads((tmp_path / "ens" / "config.json").read_text())
    assert saved["cross_tokenizer"] is True and saved["cross_tokenizer_top_k"] == 5
    assert [member["name_or_path"] for member in saved["members"]] == member_dirs
    files = {path.name for path in (tmp_path / "ens").iterdir()}
    assert "tokenizer.json" in files and not any(name.endswith((".safetensors", ".bin")) for name in files)
    inputs = _ids(corpus_tokenizer)
    expected = built.generate(**inputs, max_new_tokens=8)
    for reloaded in (
        EnsembleForCausalLM.from_pretrained(tmp_path / "ens"),
        AutoModelForCausalLM.from_pretrained(tmp_path / "ens"),
    ):
        assert isinstance(reloaded, EnsembleForCausalLM) and reloaded.is_cross_tokenizer
        assert len(reloaded.tokenizer) == len(corpus_tokenizer)
        assert torch.equal(reloaded.generate(**inputs, max_new_tokens=8), expected)


@pytest.mark.gpu
def test_members_on_gpu_and_cpu_generate_like_on_cpu(member_dirs, corpus_tokenizer):
    on_cpu = EnsembleForCausalLM.from_members(member_dirs, cross_tokenizer=True)
    mixed = EnsembleForCausalLM.from_members(member_dirs, member_device_maps=["cuda:0", "cpu"], cross_tokenizer=True)
    inputs = _ids(corpus_tokenizer)
    output = mixed.generate(**{key: value.cuda() for key, value in inputs.items()}, max_new_tokens=8)
    assert output.device.type == "cuda"
    assert torch.equal(output.cpu(), on_cpu.generate(**inputs, max_new_tokens=8))


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"combination": "product"}, "combination='product' is not available with cross_tokenizer=True"),
        ({"cross_tokenizer_top_k": 0}, "cross_tokenizer_top_k=0 must be an integer >= 1"),
        ({"cross_tokenizer_look_behind": -1}, "cross_tokenizer_look_behind=-1 must be an integer >= 0"),
        ({"weights": [1.0]}, "weights has 1 entries"),
        ({"members": "missing"}, "does not exist"),
        ({"members": "bare model"}, r"members\[0\] is a loaded LlamaForCausalLM without its tokenizer"),
        ({"trust_remote_code": True}, "trust_remote_code=False"),
    ],
)
def test_bad_arguments_fail_before_any_member_is_loaded(member_dirs, pairs, tmp_path, forbid_loading, kwargs, match):
    kwargs = dict(kwargs)
    if kwargs.get("members") == "missing":
        kwargs["members"] = [member_dirs[0], str(tmp_path / "no_such_checkpoint")]
    elif kwargs.get("members") == "bare model":
        kwargs["members"] = [pairs[0][0], member_dirs[1]]
    kwargs.setdefault("members", member_dirs)
    with pytest.raises(ValueError, match=match):
        EnsembleForCausalLM.from_members(cross_tokenizer=True, **kwargs)


def test_config_refuses_cross_tokenizer_with_lora_adapters():
    with pytest.raises(ValueError, match="cross_tokenizer=True with LoRA adapters"):
        EnsembleConfig(members=["adapter"], lora_base_model={"name_or_path": "base"}, cross_tokenizer=True)
    with pytest.raises(ValueError, match="cross_tokenizer must be True or False"):
        EnsembleConfig(members=["a"], cross_tokenizer="yes")


def test_ensemble_tokenizer_must_be_one_members_and_may_be_any_members(pairs, corpus):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"])
    backend.train_from_iterator(corpus["train"]["text"][:50], trainer=trainer)
    stranger = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    with pytest.raises(ValueError, match="is not the tokenizer of any member"):
        EnsembleForCausalLM.from_members(pairs, tokenizer=stranger, cross_tokenizer=True)
    # the second member's tokenizer is accepted: ids (EOS and padding included) are then GPT-2 ids, and with all the
    # weight on that member the ensemble writes exactly its own greedy ids
    gpt2, gpt2_tokenizer = pairs[1]
    gpt2_ids = EnsembleForCausalLM.from_members(pairs, [0.0, 1.0], tokenizer=gpt2_tokenizer, cross_tokenizer=True)
    assert gpt2_ids.generation_config.eos_token_id == gpt2_tokenizer.eos_token_id == 50256
    inputs = _ids(gpt2_tokenizer)
    reference = gpt2.generate(
        **inputs,
        max_new_tokens=10,
        do_sample=False,
        suppress_tokens=_suppressed(gpt2_ids, 1),
        pad_token_id=gpt2_tokenizer.eos_token_id,
    )
    assert torch.equal(gpt2_ids.generate(**inputs, max_new_tokens=10), reference)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_beams": 2}, "cannot honour num_beams=2"),
        ({"do_sample": True, "num_return_sequences": 2}, "cannot honour num_return_sequences=2"),
        ({"repetition_penalty": 1.3}, "cannot honour repetition_penalty=1.3"),
        ({"output_scores": True}, "cannot honour output_scores=True"),
        ({"stop_strings": ["."]}, "cannot honour stop_strings"),
        ({"streamer": object()}, "does not support streamer"),
        ({"do_sample": True, "temperature": 0.0}, "temperature=0.0 must be > 0"),
        ({"max_new_tokens": -1}, "max_new_tokens"),  # (transformers' own check, which names it)
        ({"max_length": 3}, "max_length=3 leaves no room"),
        ({"not_an_option": 1}, r"does not take \['not_an_option'\]"),
    ],
)
def test_generate_refuses_what_it_cannot_honour(ensemble, corpus_tokenizer, kwargs, match):
    inputs = _ids(corpus_tokenizer)
    with pytest.raises(ValueError, match=match):
        ensemble.generate(**inputs, **kwargs)


def test_generate_refuses_bad_prompts(ensemble, corpus_tokenizer):
    inputs = _ids(corpus_tokenizer)
    with pytest.raises(ValueError, match="2-D tensor"):
        ensemble.generate(inputs["input_ids"][0], max_new_tokens=2)
    with pytest.raises(ValueError, match="outside the ensemble tokenizer's 512 ids"):
        ensemble.generate(inputs["input_ids"] + 1000, max_new_tokens=2)
    corpus_tokenizer.padding_side = "right"
    try:
        batch = corpus_tokenizer([PROMPT, OTHER_PROMPT], return_tensors="pt", padding=True)
    finally:
        corpus_tokenizer.padding_side = "left"
    with pytest.raises(ValueError, match="right-padded.*padding_side = 'left'"):
        ensemble.generate(**batch, max_new_tokens=2)


# ----------------------------------------------------------------------------------------------------------------
# Members given as hub ids with pinned revisions (both modes)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def two_snapshot_hub(tmp_path, monkeypatch, corpus_tokenizer):
    """An offline hub cache holding SeedOrg/tiny-llama at two commits (main = the newer one, other weights)."""
    import hashlib

    from huggingface_hub import constants

    cache = tmp_path / "hub_cache"
    repo = cache / "models--SeedOrg--tiny-llama"
    commits = {}
    for seed, label in ((0, "old"), (1, "new")):
        commit = hashlib.sha1(f"snapshot {label}".encode()).hexdigest()
        folder = repo / "snapshots" / commit
        build_tiny_causal_lm("llama", len(corpus_tokenizer), seed=seed, tokenizer=corpus_tokenizer).save_pretrained(
            folder
        )
        corpus_tokenizer.save_pretrained(folder)
        commits[label] = commit
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commits["new"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return commits


@pytest.mark.parametrize("cross_tokenizer", [False, True])
def test_revisions_given_to_from_members_pin_the_loaded_commit(
    two_snapshot_hub, member_dirs, corpus_tokenizer, tmp_path, cross_tokenizer
):
    old_model = build_tiny_causal_lm("llama", len(corpus_tokenizer), seed=0, tokenizer=corpus_tokenizer)
    old_weights = old_model.model.embed_tokens.weight
    second = member_dirs[1] if cross_tokenizer else member_dirs[0]
    ensemble = EnsembleForCausalLM.from_members(
        ["SeedOrg/tiny-llama", second], revisions=[two_snapshot_hub["old"], None], cross_tokenizer=cross_tokenizer
    )
    assert torch.equal(ensemble.members[0].model.embed_tokens.weight, old_weights)  # not main's weights
    assert ensemble.config.members[0] == {"name_or_path": "SeedOrg/tiny-llama", "revision": two_snapshot_hub["old"]}
    ensemble.save_pretrained(tmp_path / "ens")
    reloaded = EnsembleForCausalLM.from_pretrained(tmp_path / "ens")
    assert torch.equal(reloaded.members[0].model.embed_tokens.weight, old_weights)
    # without a revision the member is loaded from main and recorded at main's commit
    unpinned = EnsembleForCausalLM.from_members(["SeedOrg/tiny-llama", second], cross_tokenizer=cross_tokenizer)
    assert unpinned.config.members[0]["revision"] == two_snapshot_hub["new"]
    assert not torch.equal(unpinned.members[0].model.embed_tokens.weight, old_weights)


def test_dict_member_and_revisions_disagreeing_is_refused(forbid_loading):
    with pytest.raises(ValueError, match=r"members\[0\] pins revision 'a' but revisions\[0\] is 'b'"):
        EnsembleForCausalLM.from_members([{"name_or_path": "org/name", "revision": "a"}], revisions=["b"])


# ----------------------------------------------------------------------------------------------------------------
# Real assets
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_and_a_gpt2_tokenizer_member(smollm2, gpt2_tokenizer):
    teacher, teacher_tokenizer = smollm2
    student = build_tiny_causal_lm("gpt2", len(gpt2_tokenizer), seed=0, tokenizer=gpt2_tokenizer)
    members = [(teacher, teacher_tokenizer), (student, gpt2_tokenizer)]
    inputs = teacher_tokenizer("The capital of France is", return_tensors="pt")
    # all the weight on SmolLM2: exactly SmolLM2's own greedy ids
    ensemble = EnsembleForCausalLM.from_members(members, [1.0, 0.0], cross_tokenizer=True)
    output = ensemble.generate(**inputs, max_new_tokens=6)
    reference = teacher.generate(
        **inputs,
        max_new_tokens=6,
        do_sample=False,
        suppress_tokens=_suppressed(ensemble, 0),
        pad_token_id=teacher_tokenizer.pad_token_id,
    )
    assert torch.equal(output, reference) and "Paris" in teacher_tokenizer.decode(output[0])
    ensemble.set_member_weights([0.7, 0.3])
    mixed = ensemble.generate(**inputs, max_new_tokens=4)
    assert mixed.shape[1] <= inputs["input_ids"].shape[1] + 4 and int(mixed.max()) < len(teacher_tokenizer)
