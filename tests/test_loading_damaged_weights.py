"""Damaged safetensors weights are refused by `load_causal_lm` with one error that names the file, says whether it is
corrupt or truncated, and gives the fix, before `from_pretrained` runs (headers only: no tensor is read)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import pytest
from safetensors_damage import DAMAGES, damage_safetensors

from hf_interop import ModelLoadingError, load_causal_lm

FIX = "Download it again"


def _copy(tiny_model_dirs, target):
    shutil.copytree(tiny_model_dirs["llama"], target)
    return target


@pytest.mark.parametrize("kind", sorted(DAMAGES))
def test_damaged_weights_name_the_file_and_what_is_wrong(kind, tiny_model_dirs, tmp_path, monkeypatch):
    folder = _copy(tiny_model_dirs, tmp_path / "checkpoint")
    weights = folder / "model.safetensors"
    damage_safetensors(weights, kind)
    import transformers

    def no_from_pretrained(*args, **kwargs):
        raise AssertionError("from_pretrained ran on a damaged checkpoint")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_from_pretrained)
    with pytest.raises(ModelLoadingError) as caught:
        load_causal_lm(folder)
    message = str(caught.value)
    assert str(weights) in message
    assert DAMAGES[kind] in message
    assert FIX in message


def test_intact_header_is_read_without_the_tensors(tiny_model_dirs):
    from hf_interop.safetensors_checks import read_safetensors_header

    header, data_start = read_safetensors_header(tiny_model_dirs["llama"] / "model.safetensors")
    assert "model.embed_tokens.weight" in header
    assert data_start % 8 == 0 and data_start > 8


def _sharded_copy(tiny_model_dirs, target):
    model, tokenizer = load_causal_lm(tiny_model_dirs["llama"])
    model.save_pretrained(target, max_shard_size="100KB")
    tokenizer.save_pretrained(target)
    index = json.loads((target / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    return target, shards


def test_damaged_or_missing_shard_of_a_sharded_checkpoint_is_named(tiny_model_dirs, tmp_path):
    folder, shards = _sharded_copy(tiny_model_dirs, tmp_path / "sharded")
    damage_safetensors(folder / shards[1], "truncated_data")
    with pytest.raises(ModelLoadingError, match=re.escape(str(folder / shards[1])) + ".*truncated"):
        load_causal_lm(folder)
    (folder / shards[1]).unlink()
    with pytest.raises(ModelLoadingError, match=f"{re.escape(shards[1])}.*missing.*{FIX}"):
        load_causal_lm(folder)


def test_damaged_index_is_named(tiny_model_dirs, tmp_path):
    folder, _ = _sharded_copy(tiny_model_dirs, tmp_path / "sharded")
    index = folder / "model.safetensors.index.json"
    index.write_text(index.read_text()[:40])
    with pytest.raises(ModelLoadingError, match=re.escape(str(index)) + ".*corrupt"):
        load_causal_lm(folder)


def test_safetensors_error_from_from_pretrained_names_the_file(tiny_model_dirs, tmp_path, monkeypatch):
    """Damage the header checks do not see still surfaces as the same error naming the file, not a bare
    `SafetensorError: Error while deserializing header`."""
    import hf_interop.safetensors_checks

    folder = _copy(tiny_model_dirs, tmp_path / "checkpoint")
    damage_safetensors(folder / "model.safetensors", "truncated_data")
    monkeypatch.setattr(hf_interop.safetensors_checks, "check_safetensors_checkpoint", lambda *args, **kwargs: None)
    with pytest.raises(ModelLoadingError) as caught:
        load_causal_lm(folder, load_tokenizer_too=False)
    assert str(folder / "model.safetensors") in str(caught.value)
    assert FIX in str(caught.value)
    assert type(caught.value.__cause__).__name__ == "SafetensorError"


def test_damaged_weights_in_the_hub_cache_are_named(tiny_model_dirs, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub_cache"
    commit = hashlib.sha1(b"damaged snapshot").hexdigest()
    repo = cache / "models--SeedOrg--tiny-llama"
    snapshot = _copy(tiny_model_dirs, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    damage_safetensors(snapshot / "model.safetensors", "flipped_header_bytes")
    with pytest.raises(ModelLoadingError, match=re.escape(str(snapshot / "model.safetensors")) + ".*corrupt"):
        load_causal_lm("SeedOrg/tiny-llama")
