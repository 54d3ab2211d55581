"""Logit-level causal LM ensembles: contract and validation, generate() with one cache per member, placement,
saving, LoRA ensembles on one base, and an ensemble as a distillation teacher."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from helpers import build_tiny_causal_lm, transformers_log

from hf_interop._compat import output_cache
from hf_interop.ensemble import EnsembleConfig, EnsembleForCausalLM, contrastive, plan_member_placement

PROMPT = "The with statement is used to"

# ----------------------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------------------


def _prompt(tokenizer, texts=(PROMPT,)):
    tokenizer.padding_side = "left"
    return tokenizer(list(texts), return_tensors="pt", padding=True)


def _reference_log_probs(models, input_ids, attention_mask=None, vocab_size=None):
    """Each model's float64 log-softmax over the (first `vocab_size`) logits, stacked."""
    with torch.no_grad():
        outputs = []
        for model in models:
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.double()
            if vocab_size is not None:
                logits = logits[..., :vocab_size]
            outputs.append(torch.log_softmax(logits, dim=-1))
    return torch.stack(outputs)


# ----------------------------------------------------------------------------------------------------------------
# 2. The causal LM ensemble: contract, validation, compatibility
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("combination", ["mixture", "product", "max"])
def test_forward_returns_combined_log_probs_over_shared_vocab(members, tokenizer, combination):
    weights = [0.5, 0.3, 0.2]
    ensemble = EnsembleForCausalLM.from_members([(m, tokenizer) for m in members], weights, combination)
    inputs = _prompt(tokenizer, [PROMPT, "Assignment statements"])
    output = ensemble(**inputs, labels=inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100))
    assert ensemble.get_output_embeddings() is None
    assert ensemble.config.vocab_size == len(tokenizer) == output.logits.shape[-1]
    reference = _naive_combination(combination, _reference_log_probs(members, **inputs), weights)
    torch.testing.assert_close(output.logits.double().exp(), reference.exp(), atol=1e-5, rtol=0)
    torch.testing.assert_close(output.logits.exp().sum(-1), torch.ones(output.logits.shape[:2]))
    labels = inputs["input_ids"][:, 1:]
    keep = inputs["attention_mask"][:, 1:] == 1
    expected_loss = -reference[:, :-1].gather(-1, labels[..., None]).squeeze(-1)[keep].mean()
    assert output.loss.item() == pytest.approx(expected_loss.item(), abs=1e-5)


def _naive_combination(rule, log_probs, weights):
    w = torch.tensor(weights, dtype=torch.float64)
    w = (w / w.sum()).view(-1, *([1] * (log_probs.dim() - 1)))
    if rule == "mixture":
        return torch.log((w * log_probs.exp()).sum(0))
    if rule == "product":
        return torch.log_softmax((w * log_probs).sum(0), -1)
    return torch.log_softmax(torch.log((w * log_probs.exp()).amax(0)), -1)


def test_padded_embedding_rows_combine_over_the_tokenizer_length(members, tokenizer):
    padded = build_tiny_causal_lm("llama", len(tokenizer) + 24, seed=5, tokenizer=tokenizer)
    ensemble = EnsembleForCausalLM.from_members([(members[0], tokenizer), (padded, tokenizer)], combination="mixture")
    inputs = _prompt(tokenizer)
    logits = ensemble(**inputs).logits
    assert logits.shape[-1] == len(tokenizer) == ensemble.config.vocab_size
    reference = _reference_log_probs([members[0], padded], **inputs, vocab_size=len(tokenizer))
    torch.testing.assert_close(logits.double(), torch.logsumexp(reference + math.log(0.5), 0), atol=1e-5, rtol=0)
    too_small = build_tiny_causal_lm("llama", len(tokenizer) - 12, seed=5)
    with pytest.raises(ValueError, match="must cover the whole shared vocabulary"):
        EnsembleForCausalLM.from_members([(members[0], tokenizer), too_small])


@pytest.fixture(scope="module")
def other_tokenizer(corpus):
    """A BPE tokenizer with a different vocabulary (384 tokens) and one with the same vocab but another pre-tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<pad>", "<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus["train"]["text"], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<pad>")


def test_members_with_different_token_maps_are_refused(members, tokenizer, other_tokenizer):
    with pytest.raises(ValueError, match="cross-tokenizer ensembling") as error:
        EnsembleForCausalLM.from_members([(members[0], tokenizer), (members[1], other_tokenizer)])
    assert "'<pad>' (id 1 vs 0)" in str(error.value) and "tokens differ" in str(error.value)


def test_same_vocabulary_but_different_encoding_is_refused(members, tokenizer, tmp_path):
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    changed = AutoTokenizer.from_pretrained(tmp_path)
    changed.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    with pytest.raises(ValueError, match="encodes .* differently.*cross-tokenizer"):
        EnsembleForCausalLM.from_members([(members[0], tokenizer), (members[1], changed)])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"members": []}, "members is empty"),
        ({"weights": [1.0]}, "weights has 1 entries"),
        ({"weights": [1.0, -0.5]}, "must be >= 0"),
        ({"weights": [float("nan"), 1.0]}, "finite"),
        ({"weights": [0.0, 0.0]}, "all zero"),
        ({"members": "missing"}, "does not exist"),
        ({"trust_remote_code": True}, "trust_remote_code=False"),
        ({"combination": "vote"}, "combination 'vote' is not supported"),
        ({"combination": "contrastive", "members": "three"}, "exactly 2 members"),
    ],
)
def test_bad_inputs_fail_before_any_member_is_loaded(tiny_model_dirs, tmp_path, forbid_loading, kwargs, match):
    good = [str(tiny_model_dirs["llama"]), str(tiny_model_dirs["qwen2"])]
    kwargs = dict(kwargs)
    if kwargs.get("members") == "missing":
        kwargs["members"] = [good[0], str(tmp_path / "no_such_checkpoint")]
    elif kwargs.get("members") == "three":
        kwargs["members"] = good + good[:1]
    kwargs.setdefault("members", good)
    with pytest.raises(ValueError, match=match):
        EnsembleForCausalLM.from_members(**kwargs)


def test_config_asking_for_remote_code_is_refused(tmp_path, tiny_model_dirs, forbid_loading):
    with pytest.raises(ValueError, match="trust_remote_code"):
        EnsembleConfig(members=[str(tiny_model_dirs["llama"])], trust_remote_code=True)
    folder = tmp_path / "ensemble"
    folder.mkdir()
    config = {
        "model_type": "hf_interop_ensemble",
        "members": [str(tiny_model_dirs["llama"])],
        "trust_remote_code": True,
    }
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trust_remote_code"):
        EnsembleForCausalLM.from_pretrained(folder)
    with pytest.raises(ValueError, match="trust_remote_code"):
        EnsembleForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)


def test_moved_names_keep_their_old_import_paths():
    """Users, recipes and other modules import these names from where they used to live."""
    import hf_interop.cross_tokenizer_ensemble as old_cross_tokenizer_ensemble
    from hf_interop.ensemble import cache, causal_lm, config, cross_tokenizer, members

    assert old_cross_tokenizer_ensemble.CrossTokenizerEnsemble is cross_tokenizer.CrossTokenizerEnsemble
    for name in ("EnsembleConfig", "ENSEMBLE_MODEL_TYPE", "load_ensemble_config", "write_ensemble_card"):
        assert getattr(causal_lm, name) is getattr(config, name)
    assert causal_lm.EnsembleCache is cache.EnsembleCache
    assert causal_lm.LoraAdapterMember is members.LoraAdapterMember


def test_import_of_the_ensemble_package_leaves_the_cross_tokenizer_code_unloaded():
    """The cross-tokenizer engine (and the alignment code and trainer it imports) loads only when an ensemble needs it."""
    code = (
        "import sys, hf_interop.ensemble; "
        "print(sorted(m for m in ('hf_interop.ensemble.cross_tokenizer', 'hf_interop.cross_tokenizer', "
        "'hf_interop.distillation_trainer') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ----------------------------------------------------------------------------------------------------------------
# 3. generate(): one KV cache per member
# ----------------------------------------------------------------------------------------------------------------


def _naive_greedy(models, rule, weights, input_ids, steps):
    """Re-encode the whole text every step (no cache), combine in float64, take the argmax."""
    sequence = input_ids.clone()
    for _ in range(steps):
        log_probs = _reference_log_probs(models, sequence)[:, :, -1]
        next_token = _naive_combination(rule, log_probs, weights).argmax(-1)
        sequence = torch.cat([sequence, next_token[:, None]], dim=-1)
    return sequence


@pytest.mark.parametrize("combination", ["mixture", "product"])
def test_cached_greedy_equals_no_cache_recomputation(members, tokenizer, combination):
    ensemble = EnsembleForCausalLM.from_members([(m, tokenizer) for m in members], [0.5, 0.3, 0.2], combination)
    inputs = _prompt(tokenizer)
    cached = ensemble.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    uncached = ensemble.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=False)
    naive = _naive_greedy(members, combination, [0.5, 0.3, 0.2], inputs["input_ids"], 8)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, naive)


def test_cached_generate_scores_equal_no_cache_scores(ensemble3, tokenizer):
    """Every step's logits, not only the argmax: tiny random members pick the same greedy tokens with or without
    their history, so equal sequences alone missed a cache that generate() handed over under a name the ensemble
    ignored (transformers 5.24 passes `cache=`, earlier releases `past_key_values=`)."""
    inputs = _prompt(tokenizer)
    kwargs = dict(
        max_new_tokens=6, min_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    cached = ensemble3.generate(**inputs, **kwargs)
    uncached = ensemble3.generate(**inputs, **kwargs, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert len(cached.logits) == 6
    for step, (with_cache, without_cache) in enumerate(zip(cached.logits, uncached.logits, strict=True)):
        torch.testing.assert_close(with_cache, without_cache, atol=1e-4, rtol=0, msg=f"step {step}")


def test_generate_and_cached_forward_log_no_cache_name_deprecation(ensemble3, tokenizer):
    """transformers 5.24 renamed `past_key_values` to `cache` and warns (once per process) when a model output is
    built or read under the old name; the ensemble's own calls must not trip that warning for its users."""
    with transformers_log() as messages:
        inputs = _prompt(tokenizer)
        ensemble3.generate(**inputs, max_new_tokens=3, do_sample=False)
        step = ensemble3(input_ids=inputs["input_ids"][:, :-1], use_cache=True)
        ensemble3(input_ids=inputs["input_ids"][:, -1:], use_cache=True, cache=output_cache(step))
    assert not [message for message in messages if "deprecated" in message], messages


@pytest.mark.parametrize("argument", ["past_key_values", "cache"])
def test_forward_continues_from_a_cache_passed_under_either_name(ensemble3, tokenizer, argument):
    input_ids = _prompt(tokenizer)["input_ids"]
    prefix = ensemble3(input_ids=input_ids[:, :-1], use_cache=True)
    step = ensemble3(input_ids=input_ids[:, -1:], use_cache=True, **{argument: prefix.past_key_values})
    full = ensemble3(input_ids=input_ids, use_cache=False)
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], atol=1e-4, rtol=0)


def test_cache_makes_each_step_feed_one_token_to_each_member(ensemble3, tokenizer):
    seen = [[] for _ in ensemble3.members]
    handles = [
        member.register_forward_pre_hook(
            lambda module, args, kwargs, i=i: seen[i].append(kwargs["input_ids"].shape[1]), with_kwargs=True
        )
        for i, member in enumerate(ensemble3.members)
    ]
    try:
        inputs = _prompt(tokenizer)
        ensemble3.generate(**inputs, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    finally:
        for handle in handles:
            handle.remove()
    prompt_length = inputs["input_ids"].shape[1]
    for lengths in seen:  # prefill once, then one token per step: linear, not quadratic, in the output length
        assert lengths == [prompt_length] + [1] * 9


def test_cached_sampling_with_fixed_seed_equals_no_cache(ensemble3, tokenizer):
    inputs = _prompt(tokenizer, [PROMPT, "A class definition"])
    torch.manual_seed(123)
    cached = ensemble3.generate(**inputs, max_new_tokens=12, do_sample=True, top_k=0, temperature=1.0)
    torch.manual_seed(123)
    uncached = ensemble3.generate(
        **inputs, max_new_tokens=12, do_sample=True, top_k=0, temperature=1.0, use_cache=False
    )
    assert torch.equal(cached, uncached)
    torch.manual_seed(124)
    other = ensemble3.generate(**inputs, max_new_tokens=12, do_sample=True, top_k=0, temperature=1.0)
    assert not torch.equal(cached, other)  # it really samples


def test_cached_beam_search_reorders_every_member_cache(ensemble3, tokenizer):
    inputs = _prompt(tokenizer, [PROMPT, "A class definition"])
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, num_beams=4, num_return_sequences=2, do_sample=False)
    kwargs.update(output_scores=True, return_dict_in_generate=True)
    cached = ensemble3.generate(**inputs, **kwargs)
    uncached = ensemble3.generate(**inputs, **kwargs, use_cache=False)
    assert cached.sequences.shape == (4, inputs["input_ids"].shape[1] + 8)
    assert torch.equal(cached.sequences, uncached.sequences)
    # the beams' scores sum every step's log-probabilities: a cache not reordered with its beam changes them
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, atol=1e-4, rtol=0)


def test_text_streamer_streams_the_generated_text(ensemble3, tokenizer):
    from transformers import TextStreamer

    class Collect(TextStreamer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.pieces = []

        def on_finalized_text(self, text, stream_end=False):
            self.pieces.append(text)

    streamer = Collect(tokenizer, skip_prompt=True)
    inputs = _prompt(tokenizer)
    output = ensemble3.generate(**inputs, max_new_tokens=10, min_new_tokens=10, do_sample=False, streamer=streamer)
    generated = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])
    assert "".join(streamer.pieces) == generated and generated


def test_text_generation_pipeline_accepts_the_ensemble(ensemble3, tokenizer):
    from transformers import pipeline

    generator = pipeline("text-generation", model=ensemble3, tokenizer=tokenizer)
    text = generator(PROMPT, max_new_tokens=6, min_new_tokens=6, do_sample=False)[0]["generated_text"]
    inputs = tokenizer(PROMPT, return_tensors="pt")
    expected = ensemble3.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert text == tokenizer.decode(expected[0], skip_special_tokens=True)


def test_contrastive_generation_equals_reference(members, tokenizer):
    ensemble = EnsembleForCausalLM.from_members(
        [(members[0], tokenizer), (members[1], tokenizer)], combination="contrastive", contrastive_alpha=0.2
    )
    inputs = _prompt(tokenizer)
    output = ensemble.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    sequence = inputs["input_ids"]
    for _ in range(6):
        log_probs = _reference_log_probs(members[:2], sequence)[:, :, -1]
        scores = contrastive(log_probs[0], log_probs[1], alpha=0.2)
        sequence = torch.cat([sequence, scores.argmax(-1)[:, None]], dim=-1)
    assert torch.equal(output, sequence)


# ----------------------------------------------------------------------------------------------------------------
# 4. Placement with Accelerate
# ----------------------------------------------------------------------------------------------------------------


def test_plan_member_placement_spreads_members_and_falls_back_to_cpu_offload():
    mib = 2**20
    plans = plan_member_placement([80 * mib, 60 * mib, 50 * mib], {0: "100MiB", 1: "100MiB", "cpu": "1GiB"})
    assert plans[0] == {"device_map": {"": 0}} and plans[1] == {"device_map": {"": 1}}
    assert plans[2]["device_map"] == "auto" and plans[2]["max_memory"] == {0: 20 * mib, 1: 40 * mib, "cpu": 2**30}
    assert plan_member_placement([10, 20], {"cpu": 100}) == [{"device_map": {"": "cpu"}}] * 2
    with pytest.raises(ValueError, match="raise the budgets"):
        plan_member_placement([300 * mib], {0: "100MiB", "cpu": "100MiB"})


def test_member_offloaded_with_accelerate_hooks_gives_the_same_generation(members, tokenizer, ensemble3):
    import copy

    from accelerate import cpu_offload

    offloaded = cpu_offload(copy.deepcopy(members[1]), execution_device="cpu")
    assert any(p.device.type == "meta" for p in offloaded.parameters())
    ensemble = EnsembleForCausalLM.from_members(
        [(members[0], tokenizer), (offloaded, tokenizer), (members[2], tokenizer)], [0.5, 0.3, 0.2]
    )
    inputs = _prompt(tokenizer)
    torch.testing.assert_close(ensemble(**inputs).logits, ensemble3(**inputs).logits)
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(ensemble.generate(**inputs, **kwargs), ensemble3.generate(**inputs, **kwargs))


def test_member_device_maps_and_auto_placement_load_on_cpu(tiny_model_dirs, tokenizer):
    paths = [str(tiny_model_dirs["llama"]), str(tiny_model_dirs["gpt2"])]
    module_map = {
        "model.embed_tokens": "cpu",
        "model.layers": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    placed = EnsembleForCausalLM.from_members(paths, member_device_maps=[module_map, "cpu"])
    auto = EnsembleForCausalLM.from_members(paths, device_map="auto", max_memory={"cpu": "2GiB"})
    inputs = _prompt(tokenizer)
    assert all(device.type == "cpu" for device in placed._member_devices)
    torch.testing.assert_close(placed(**inputs).logits, auto(**inputs).logits)
    assert auto.device.type == "cpu"
    with pytest.raises(ValueError, match="not both"):
        EnsembleForCausalLM.from_members(paths, member_device_maps=["cpu", "cpu"], device_map="auto")


@pytest.mark.gpu
def test_members_on_gpu_and_cpu_combine_on_one_device(tiny_model_dirs, tokenizer):
    # (the tiny qwen2 folder's tokenizer pre-tokenizes differently, so it is not compatible: gpt2 instead)
    paths = [str(tiny_model_dirs["llama"]), str(tiny_model_dirs["gpt2"])]
    mixed = EnsembleForCausalLM.from_members(paths, member_device_maps=["cuda:0", "cpu"], combine_device="cuda:0")
    reference = EnsembleForCausalLM.from_members(paths)
    inputs = _prompt(tokenizer)
    logits = mixed(**{k: v.cuda() for k, v in inputs.items()}).logits
    assert logits.device.type == "cuda"
    torch.testing.assert_close(logits.cpu(), reference(**inputs).logits, atol=1e-4, rtol=0)
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    cached = mixed.generate(**{k: v.cuda() for k, v in inputs.items()}, **kwargs)
    uncached = mixed.generate(**{k: v.cuda() for k, v in inputs.items()}, **kwargs, use_cache=False)
    assert torch.equal(cached, uncached)
    auto = EnsembleForCausalLM.from_members(paths, device_map="auto")
    assert all(device.type == "cuda" for device in auto._member_devices)


# ----------------------------------------------------------------------------------------------------------------
# 5. Saving, loading, publishing
# ----------------------------------------------------------------------------------------------------------------


def test_save_and_from_pretrained_round_trip(tiny_model_dirs, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    # (the tiny qwen2 folder's tokenizer loads as Qwen2Tokenizer with another pre-tokenizer, so it is not compatible)
    paths = [str(tiny_model_dirs["llama"]), str(tiny_model_dirs["gpt2"])]
    ensemble = EnsembleForCausalLM.from_members(paths, [0.7, 0.3], "product")
    ensemble.save_pretrained(tmp_path / "ens")
    files = {path.name for path in (tmp_path / "ens").iterdir()}
    assert {"config.json", "README.md", "generation_config.json", "tokenizer.json"} <= files
    assert not any(name.endswith((".safetensors", ".bin")) for name in files)  # no member weights
    saved = json.loads((tmp_path / "ens" / "config.json").read_text())
    assert saved["combination"] == "product" and saved["weights"] == pytest.approx([0.7, 0.3])
    assert [member["name_or_path"] for member in saved["members"]] == paths
    card = (tmp_path / "ens" / "README.md").read_text()
    assert "product" in card and paths[0] in card
    for reloaded in (
        EnsembleForCausalLM.from_pretrained(tmp_path / "ens"),
        AutoModelForCausalLM.from_pretrained(tmp_path / "ens"),
    ):
        assert isinstance(reloaded, EnsembleForCausalLM)
        inputs = _prompt(tokenizer)
        torch.testing.assert_close(reloaded(**inputs).logits, ensemble(**inputs).logits)


def test_hub_id_member_is_saved_with_its_pinned_commit(tiny_model_dirs, tokenizer, tmp_path, monkeypatch):
    """A member given as a hub id without a revision is recorded at the commit it was loaded from."""
    import hashlib
    import shutil

    from huggingface_hub import constants

    cache = tmp_path / "hub_cache"
    commit = hashlib.sha1(b"ensemble member snapshot").hexdigest()
    repo = cache / "models--SeedOrg--tiny-llama"
    shutil.copytree(tiny_model_dirs["llama"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))

    ensemble = EnsembleForCausalLM.from_members(["SeedOrg/tiny-llama", str(tiny_model_dirs["gpt2"])])
    ensemble.save_pretrained(tmp_path / "ens")
    saved = json.loads((tmp_path / "ens" / "config.json").read_text())["members"]
    assert saved[0] == {"name_or_path": "SeedOrg/tiny-llama", "revision": commit}
    assert saved[1]["revision"] is None  # a local folder has no commit to pin
    assert commit in (tmp_path / "ens" / "README.md").read_text()


def test_save_refuses_in_memory_members(members, tokenizer, tmp_path):
    ensemble = EnsembleForCausalLM.from_members([(members[0], tokenizer), (members[1], tokenizer)])
    with pytest.raises(ValueError, match="in-memory model"):
        ensemble.save_pretrained(tmp_path / "ens")


def test_push_to_hub_uploads_config_and_card_not_weights(tiny_model_dirs, monkeypatch):
    import huggingface_hub

    uploaded = {}

    class FakeRepo:
        repo_id = "someone/ensemble"

    def create_repo(self, repo_id, **kwargs):
        uploaded["created"] = repo_id
        return FakeRepo()

    def upload_folder(self, repo_id, folder_path, **kwargs):
        from pathlib import Path

        uploaded["repo_id"] = repo_id
        uploaded["files"] = sorted(path.name for path in Path(folder_path).iterdir())
        uploaded["config"] = json.loads((Path(folder_path) / "config.json").read_text())
        return "commit-url"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    ensemble = EnsembleForCausalLM.from_members([str(tiny_model_dirs["llama"]), str(tiny_model_dirs["gpt2"])])
    # local members would not resolve for anyone who downloads the ensemble: refused before anything is created
    with pytest.raises(ValueError, match="self_contained=True"):
        ensemble.push_to_hub("someone/ensemble")
    assert "created" not in uploaded
    assert ensemble.push_to_hub("someone/ensemble", self_contained=True) == "commit-url"
    assert uploaded["repo_id"] == "someone/ensemble"
    assert "config.json" in uploaded["files"] and "README.md" in uploaded["files"]
    assert not any(name.endswith((".safetensors", ".bin")) for name in uploaded["files"])  # weights only in members/
    assert uploaded["config"]["model_type"] == "hf_interop_ensemble" and len(uploaded["config"]["members"]) == 2
    assert [member["name_or_path"] for member in uploaded["config"]["members"]] == ["members/0", "members/1"]


# ----------------------------------------------------------------------------------------------------------------
# 7. LoRA ensembles on one base
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_setup(tiny_model_dirs, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = tiny_model_dirs["llama"]
    adapters = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(base_dir)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        peft_model = get_peft_model(base, config)
        folder = tmp_path_factory.mktemp(f"adapter_{seed}")
        peft_model.save_pretrained(folder)
        adapters.append(str(folder))
    return str(base_dir), adapters


def test_lora_ensemble_stores_base_once_and_equals_merged_models(lora_setup, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, adapters = lora_setup
    ensemble = EnsembleForCausalLM.from_lora_adapters(base_dir, adapters, weights=[0.6, 0.4], combination="mixture")
    base_parameters = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(base_dir).parameters())
    adapter_parameters = sum(p.numel() for n, p in ensemble.named_parameters() if "lora_" in n)
    assert sum(p.numel() for p in ensemble.parameters()) == base_parameters + adapter_parameters
    assert ensemble.members[0].peft_model is ensemble.members[1].peft_model
    merged = []
    for adapter in adapters:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter).merge_and_unload()
        merged.append(model.eval())
    inputs = _prompt(tokenizer)
    reference = _naive_combination("mixture", _reference_log_probs(merged, **inputs), [0.6, 0.4])
    torch.testing.assert_close(ensemble(**inputs).logits.double(), reference, atol=1e-4, rtol=0)
    assert not torch.allclose(_reference_log_probs(merged[:1], **inputs), _reference_log_probs(merged[1:], **inputs))
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(ensemble.generate(**inputs, **kwargs), ensemble.generate(**inputs, **kwargs, use_cache=False))


def test_lora_ensemble_round_trip(lora_setup, tokenizer, tmp_path):
    base_dir, adapters = lora_setup
    ensemble = EnsembleForCausalLM.from_lora_adapters(base_dir, adapters, combination="product")
    ensemble.save_pretrained(tmp_path / "lora_ens")
    reloaded = EnsembleForCausalLM.from_pretrained(tmp_path / "lora_ens")
    inputs = _prompt(tokenizer)
    torch.testing.assert_close(reloaded(**inputs).logits, ensemble(**inputs).logits)
    with pytest.raises(ValueError, match="adapter_config.json"):
        EnsembleForCausalLM.from_lora_adapters(base_dir, [base_dir])


# ----------------------------------------------------------------------------------------------------------------
# 9. An ensemble as a distillation teacher
# ----------------------------------------------------------------------------------------------------------------


def test_distillation_with_an_ensemble_teacher_trains_the_student_and_leaves_members_unchanged(
    members, tokenizer, packed_corpus, tmp_path
):
    from hf_interop import DistillationConfig, DistillationTrainer

    ensemble = EnsembleForCausalLM.from_members([(m, tokenizer) for m in members], [0.5, 0.3, 0.2], "product")
    members_before = [{k: v.clone() for k, v in m.state_dict().items()} for m in members]
    student = build_tiny_causal_lm("llama", len(tokenizer), seed=11, tokenizer=tokenizer)
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    args = DistillationConfig(
        output_dir=str(tmp_path / "distil"),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        kd_ratio=1.0,
        logging_steps=1,
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=ensemble,
        args=args,
        train_dataset=packed_corpus["train"].select(range(8)),
        processing_class=tokenizer,
    )
    trainer.train()
    assert any(not torch.equal(student_before[k], v) for k, v in student.state_dict().items())
    for member, before in zip(members, members_before, strict=True):
        assert all(torch.equal(before[k], v) for k, v in member.state_dict().items())
    kd_losses = [entry["kd_loss"] for entry in trainer.state.log_history if "kd_loss" in entry]
    assert kd_losses and all(math.isfinite(loss) and loss > 0 for loss in kd_losses)
