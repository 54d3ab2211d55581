"""Output heads (`output_logits_fn`): the logits of real model classes (softcapping and logit scales included),
gradients to the head weight, PEFT models unwrapped, models without a head rejected."""

from __future__ import annotations

import pytest
import torch

from hf_interop import losses


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_output_logits_fn_reproduces_model_logits_and_reaches_the_head_weight(family):
    from helpers import build_tiny_causal_lm

    model = build_tiny_causal_lm(family, vocab_size=96)
    input_ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    outputs = model(input_ids, output_hidden_states=True)
    head = losses.output_logits_fn(model)
    torch.testing.assert_close(head(outputs.hidden_states[-1]), outputs.logits, rtol=1e-5, atol=1e-5)
    head(outputs.hidden_states[-1].detach()).sum().backward()
    weight = model.get_output_embeddings().weight
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    if model.config.tie_word_embeddings:
        assert model.get_input_embeddings().weight.grad is weight.grad


@pytest.mark.parametrize(
    "config_name, overrides",
    [
        ("Gemma2Config", {"head_dim": 16, "final_logit_softcapping": 0.5}),
        ("Gemma3TextConfig", {"head_dim": 16, "final_logit_softcapping": 0.5}),
        ("CohereConfig", {"logit_scale": 0.3}),
        ("GraniteConfig", {"logits_scaling": 4.0}),
    ],
)
def test_output_logits_fn_applies_softcapping_and_logit_scales(config_name, overrides):
    import transformers

    config = getattr(transformers, config_name)(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        eos_token_id=1,
        **overrides,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    input_ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(0))
    outputs = model(input_ids, output_hidden_states=True)
    hidden = outputs.hidden_states[-1]
    head = losses.output_logits_fn(model)
    torch.testing.assert_close(head(hidden), outputs.logits, rtol=1e-5, atol=1e-6)
    # the post-processing matters: the plain lm_head gives different logits
    assert (model.get_output_embeddings()(hidden) - outputs.logits).abs().max() > 1e-3
    if "final_logit_softcapping" in overrides:
        assert head(hidden * 100).abs().max() <= overrides["final_logit_softcapping"]


def test_output_logits_fn_unwraps_peft_models_and_rejects_models_without_a_head():
    from helpers import build_tiny_causal_lm
    from peft import LoraConfig, get_peft_model

    model = build_tiny_causal_lm("qwen2", vocab_size=96)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    head = losses.output_logits_fn(peft_model)
    assert head.output_embeddings is model.get_output_embeddings()

    class NoHead(torch.nn.Module):
        def get_output_embeddings(self):
            return None

    with pytest.raises(ValueError, match="teacher_logits"):
        losses.output_logits_fn(NoHead())
