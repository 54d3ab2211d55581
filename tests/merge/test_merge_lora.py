"""LoRA adapter combinations (merge_lora_adapters): exact `cat`, full-rank `svd`, negative weights, bad inputs,
and PEFT's pitfalls (inherited use_rslora scaling, unequal ranks)."""

from __future__ import annotations

import math

import pytest
import torch

from hf_interop import load_causal_lm, merge_lora_adapters


@pytest.fixture
def two_adapter_model(tiny_model_dirs):
    from peft import LoraConfig, get_peft_model

    model, _ = load_causal_lm(tiny_model_dirs["llama"], load_tokenizer_too=False)
    torch.manual_seed(0)
    config_a = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True, init_lora_weights=False
    )
    config_b = LoraConfig(
        r=8, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_rslora=True, init_lora_weights=False
    )
    config_c = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config_a, adapter_name="a")
    peft_model.add_adapter("b", config_b)
    peft_model.add_adapter("c", config_c)
    return peft_model


def _delta(peft_model, adapter: str) -> torch.Tensor:
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    return layer.get_delta_weight(adapter).double()


def _reference_delta(peft_model, adapter: str) -> torch.Tensor:
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    config = peft_model.peft_config[adapter]
    scaling = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
    return scaling * layer.lora_B[adapter].weight.double() @ layer.lora_A[adapter].weight.double()


def test_cat_of_rslora_adapters_is_exact(two_adapter_model, tmp_path):
    from peft import PeftModel

    peft_model = two_adapter_model
    name = merge_lora_adapters(peft_model, ["a", "b"], [0.7, 1.3], combination_type="cat", adapter_name="ab")
    expected = 0.7 * _reference_delta(peft_model, "a") + 1.3 * _reference_delta(peft_model, "b")
    # PEFT alone would scale this by sqrt(12) (use_rslora inherited with lora_alpha = r = 12).
    torch.testing.assert_close(_delta(peft_model, name), expected, rtol=1e-5, atol=1e-6)
    assert peft_model.active_adapter == "ab"

    peft_model.save_pretrained(tmp_path / "adapters", selected_adapters=["ab"])
    base, _ = load_causal_lm(peft_model.peft_config["a"].base_model_name_or_path, load_tokenizer_too=False)
    restored = PeftModel.from_pretrained(base, tmp_path / "adapters" / "ab", adapter_name="ab")
    torch.testing.assert_close(_delta(restored, "ab"), expected, rtol=1e-5, atol=1e-6)


def test_svd_with_full_rank_is_exact_and_linear_needs_equal_ranks(two_adapter_model):
    peft_model = two_adapter_model
    merge_lora_adapters(peft_model, ["a", "b"], [1.0, 0.5], combination_type="svd", svd_rank=12, adapter_name="s")
    expected = _reference_delta(peft_model, "a") + 0.5 * _reference_delta(peft_model, "b")
    torch.testing.assert_close(_delta(peft_model, "s"), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"equal rank, got ranks \{'a': 4, 'b': 8\}; use combination_type='cat'"):
        merge_lora_adapters(peft_model, ["a", "b"], [1.0, 1.0], combination_type="linear")
    with pytest.raises(ValueError, match="equal rank"):
        merge_lora_adapters(peft_model, ["a", "b"], [1.0, 1.0], combination_type="ties")


def test_negative_weights_subtract_an_adapter(two_adapter_model):
    peft_model = two_adapter_model
    merge_lora_adapters(peft_model, ["a"], [-1.0], combination_type="linear", adapter_name="minus_a")
    torch.testing.assert_close(_delta(peft_model, "minus_a"), -_reference_delta(peft_model, "a"), rtol=1e-5, atol=1e-6)
    merge_lora_adapters(peft_model, ["a", "c"], [1.0, -1.0], combination_type="cat", adapter_name="a_minus_c")
    expected = _reference_delta(peft_model, "a") - _reference_delta(peft_model, "c")
    torch.testing.assert_close(_delta(peft_model, "a_minus_c"), expected, rtol=1e-5, atol=1e-6)
    merge_lora_adapters(peft_model, ["a", "c"], [1.0, 1.0], combination_type="ties", density=0.5, adapter_name="t")
    assert peft_model.peft_config["t"].r == 4


def test_lora_merge_bad_inputs(two_adapter_model):
    peft_model = two_adapter_model
    with pytest.raises(ValueError, match="already exists"):
        merge_lora_adapters(peft_model, ["a", "b"], adapter_name="a")
    with pytest.raises(ValueError, match=r"adapters \['z'\] are not in the model"):
        merge_lora_adapters(peft_model, ["a", "z"])
    with pytest.raises(ValueError, match="weights has 1 values for 2 adapters"):
        merge_lora_adapters(peft_model, ["a", "b"], [1.0])
    with pytest.raises(ValueError, match="combination_type='mean'"):
        merge_lora_adapters(peft_model, ["a", "b"], combination_type="mean")
