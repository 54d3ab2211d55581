"""Issue 24 for causal LM ensembles: vocabulary-size mismatches without tokenizers are errors (5), bare checkpoints
load with a shared tokenizer (6), pickle LoRA adapters need allow_pickle (14), saved ensembles travel (16)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import build_tiny_causal_lm

from hf_interop.ensemble import EnsembleConfig, EnsembleForCausalLM

# ----------------------------------------------------------------------------------------------------------------
# 5. Different output sizes and no tokenizer
# ----------------------------------------------------------------------------------------------------------------


def test_members_with_different_vocab_sizes_and_no_tokenizer_are_refused():
    small, large = build_tiny_causal_lm("llama", 300, seed=0), build_tiny_causal_lm("llama", 400, seed=1)
    with pytest.raises(ValueError) as error:
        EnsembleForCausalLM.from_members([small, large])
    message = str(error.value)
    assert "members[0]" in message and "300" in message and "members[1]" in message and "400" in message
    assert "allow_vocab_padding=True" in message and "tokenizer=" in message


def test_allow_vocab_padding_combines_over_the_smallest_size_and_is_kept_in_the_config():
    small, large = build_tiny_causal_lm("llama", 300, seed=0), build_tiny_causal_lm("llama", 400, seed=1)
    ensemble = EnsembleForCausalLM.from_members([small, large], allow_vocab_padding=True)
    ids = torch.tensor([[1, 5, 7, 250]])
    assert ensemble(input_ids=ids).logits.shape[-1] == 300
    saved = json.loads(ensemble.config.to_json_string(use_diff=True))
    assert saved["allow_vocab_padding"] is True
    saved.pop("model_type")
    assert EnsembleConfig(**saved).allow_vocab_padding is True


# ----------------------------------------------------------------------------------------------------------------
# 6. Bare checkpoints (weights and config, no tokenizer files)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bare_member_dirs(tmp_path_factory, corpus_tokenizer):
    """Two tiny members saved with a plain model.save_pretrained (no tokenizer files), like intermediate checkpoints."""
    folders = []
    for seed, family in enumerate(("llama", "gpt2")):
        folder = tmp_path_factory.mktemp(f"bare_{family}")
        build_tiny_causal_lm(family, len(corpus_tokenizer), seed=seed, tokenizer=corpus_tokenizer).save_pretrained(
            folder
        )
        folders.append(str(folder))
    return folders


def test_bare_checkpoints_load_when_the_shared_tokenizer_is_given(bare_member_dirs, corpus_tokenizer):
    ensemble = EnsembleForCausalLM.from_members(bare_member_dirs, tokenizer=corpus_tokenizer)
    assert ensemble.tokenizer is corpus_tokenizer
    ids = corpus_tokenizer("The with statement", return_tensors="pt").input_ids
    assert ensemble(input_ids=ids).logits.shape[-1] == len(corpus_tokenizer)


def test_bare_checkpoint_without_shared_tokenizer_names_the_folder_and_the_fix(bare_member_dirs, forbid_loading):
    with pytest.raises(ValueError) as error:
        EnsembleForCausalLM.from_members(bare_member_dirs)
    message = str(error.value)
    assert bare_member_dirs[0] in message and "tokenizer=" in message


# ----------------------------------------------------------------------------------------------------------------
# 14. LoRA adapters saved as pickle
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pickle_adapter(tiny_model_dirs, tmp_path_factory):
    """A LoRA adapter folder of the tiny llama whose only weights are adapter_model.bin."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"])
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    folder = tmp_path_factory.mktemp("pickle_adapter")
    get_peft_model(base, config).save_pretrained(folder, safe_serialization=False)
    assert (folder / "adapter_model.bin").is_file() and not (folder / "adapter_model.safetensors").exists()
    return str(tiny_model_dirs["llama"]), str(folder)


def test_pickle_lora_adapter_is_refused_without_allow_pickle(pickle_adapter):
    base_dir, adapter = pickle_adapter
    with pytest.raises(ValueError) as error:
        EnsembleForCausalLM.from_lora_adapters(base_dir, [adapter])
    message = str(error.value)
    assert adapter in message and "allow_pickle=True (CLI: --allow_pickle)" in message


def test_pickle_lora_adapter_loads_with_allow_pickle_and_reloads_only_with_it(pickle_adapter, tmp_path):
    base_dir, adapter = pickle_adapter
    ensemble = EnsembleForCausalLM.from_lora_adapters(base_dir, [adapter], allow_pickle=True)
    ensemble.save_pretrained(tmp_path / "ens")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        EnsembleForCausalLM.from_pretrained(tmp_path / "ens")
    reloaded = EnsembleForCausalLM.from_pretrained(tmp_path / "ens", allow_pickle=True)
    ids = torch.tensor([[1, 5, 7]])
    torch.testing.assert_close(reloaded(input_ids=ids).logits, ensemble(input_ids=ids).logits)


# ----------------------------------------------------------------------------------------------------------------
# 16. Saved ensembles travel
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def project(tmp_path, tiny_model_dirs):
    """A project folder holding two members under members/ (the layout of the issue), as the working directory."""
    root = tmp_path / "project"
    for family in ("llama", "gpt2"):
        shutil.copytree(tiny_model_dirs[family], root / "members" / family)
    return root


def _logits(ensemble):
    return ensemble(input_ids=torch.tensor([[1, 5, 7, 9]])).logits


def test_ensemble_saved_from_relative_paths_loads_from_another_directory_and_after_moving(
    project, tmp_path, monkeypatch
):
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(project)
    ensemble = EnsembleForCausalLM.from_members(["members/llama", "members/gpt2"])
    expected = _logits(ensemble)
    ensemble.save_pretrained("ens")
    saved = json.loads((project / "ens" / "config.json").read_text())["members"]
    assert [member["name_or_path"] for member in saved] == ["../members/llama", "../members/gpt2"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for reloaded in (
        EnsembleForCausalLM.from_pretrained(project / "ens"),
        AutoModelForCausalLM.from_pretrained(project / "ens"),
    ):
        torch.testing.assert_close(_logits(reloaded), expected)
    moved = tmp_path / "moved_project"
    shutil.move(project, moved)
    torch.testing.assert_close(_logits(EnsembleForCausalLM.from_pretrained(moved / "ens")), expected)


def test_self_contained_save_carries_its_members(tiny_model_dirs, tmp_path, monkeypatch):
    ensemble = EnsembleForCausalLM.from_members([str(tiny_model_dirs["llama"]), str(tiny_model_dirs["gpt2"])])
    expected = _logits(ensemble)
    ensemble.save_pretrained(tmp_path / "ens", self_contained=True)
    saved = json.loads((tmp_path / "ens" / "config.json").read_text())["members"]
    assert [member["name_or_path"] for member in saved] == ["members/0", "members/1"]
    assert (tmp_path / "ens" / "members" / "0" / "model.safetensors").is_file()
    shutil.move(tmp_path / "ens", tmp_path / "moved")
    monkeypatch.chdir(tmp_path)
    torch.testing.assert_close(_logits(EnsembleForCausalLM.from_pretrained(tmp_path / "moved")), expected)


def test_members_outside_the_folder_are_recorded_absolute_with_a_warning(tiny_model_dirs, tmp_path, caplog):
    import logging

    ensemble = EnsembleForCausalLM.from_members([str(tiny_model_dirs["llama"])])
    with caplog.at_level(logging.WARNING):
        ensemble.save_pretrained(tmp_path / "ens")
    saved = json.loads((tmp_path / "ens" / "config.json").read_text())["members"]
    assert saved[0]["name_or_path"] == str(tiny_model_dirs["llama"].resolve())
    assert "self_contained=True" in caplog.text


def test_config_saved_with_cwd_relative_paths_still_loads(project, monkeypatch, tmp_path):
    """Configs written before paths were recorded relative to the ensemble folder keep loading from their cwd."""
    monkeypatch.chdir(project)
    ensemble = EnsembleForCausalLM.from_members(["members/llama"])
    ensemble.save_pretrained(tmp_path / "old_ens")
    config_path = tmp_path / "old_ens" / "config.json"
    config = json.loads(config_path.read_text())
    config["members"][0]["name_or_path"] = "members/llama"  # as saved before the fix
    config_path.write_text(json.dumps(config))
    torch.testing.assert_close(_logits(EnsembleForCausalLM.from_pretrained(tmp_path / "old_ens")), _logits(ensemble))
