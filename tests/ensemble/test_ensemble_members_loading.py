"""Issue 24 for causal LM ensembles: vocabulary-size mismatches without tokenizers are errors (5), bare checkpoints
load with a shared tokenizer (6), pickle LoRA adapters need allow_pickle (14), saved ensembles travel (16)."""

from __future__ import annotations

import json

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
