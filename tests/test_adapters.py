"""LoRA helpers: config building and target checks, adapter-only training and checkpoints, merged export."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from hf_interop import build_lora_config, export_merged_model, load_causal_lm
from hf_interop.adapters import save_adapter_checkpoint

EXPECTED_TARGETS = {
    "llama": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    "qwen2": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    "gpt2": ["c_attn", "c_fc", "c_proj"],
}


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", sorted(EXPECTED_TARGETS))
def test_default_targets_are_all_linear_layers_except_the_output_head(tiny_model_dirs, family):
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    model, _ = load_causal_lm(tiny_model_dirs[family])
    config = build_lora_config(r=4, model=model)
    assert sorted(config.target_modules) == EXPECTED_TARGETS[family]
    assert config.fan_in_fan_out == (family == "gpt2")  # GPT-2's Conv1D stores weights as (in, out)
    peft_model = get_peft_model(model, config)
    adapted = {name for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)}
    assert adapted and not any("lm_head" in name for name in adapted)
    num_layers = model.config.num_hidden_layers
    assert len(adapted) == num_layers * (7 if family != "gpt2" else 4)


def test_without_a_model_targets_are_left_to_peft_as_all_linear():
    config = build_lora_config(r=8, lora_alpha=16, use_rslora=True, use_dora=True)
    assert config.target_modules == "all-linear"
    assert (config.r, config.lora_alpha, config.use_rslora, config.use_dora) == (8, 16, True, True)
    assert config.task_type == "CAUSAL_LM"


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"target_modules": ["q_proj", "query_proj"]}, ValueError, r"\['query_proj'\] match no module"),
        ({"target_modules": r".*\.attention\.dense"}, ValueError, "matches no module"),
        ({"target_modules": []}, ValueError, "non-empty list"),
        ({"modules_to_save": ["score"]}, ValueError, r"modules_to_save entries \['score'\]"),
        ({"r": 0}, ValueError, "r=0 must be a positive integer"),
        ({"lora_alpha": -1}, ValueError, "lora_alpha=-1"),
        ({"lora_dropout": 1.0}, ValueError, r"lora_dropout=1.0 must be in \[0, 1\)"),
        ({"task_type": "causal"}, ValueError, "task_type='causal'"),
    ],
)
def test_bad_lora_arguments_raise_before_training(tiny_model_dirs, kwargs, error, message):
    model, _ = load_causal_lm(tiny_model_dirs["llama"], load_tokenizer_too=False)
    with pytest.raises(error, match=message) as raised:
        build_lora_config(model=model, **kwargs)
    if "target_modules" in kwargs and kwargs["target_modules"]:
        assert "q_proj" in str(raised.value)  # the message lists the layers the model does have


def test_explicit_targets_and_regex_resolve_against_the_model(tiny_model_dirs):
    model, _ = load_causal_lm(tiny_model_dirs["llama"], load_tokenizer_too=False)
    assert build_lora_config(model=model, target_modules=["q_proj", "v_proj"]).target_modules == {"q_proj", "v_proj"}
    config = build_lora_config(model=model, target_modules=r"model\.layers\.0\.self_attn\.(q|k)_proj")
    assert config.target_modules == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"}


@pytest.fixture(scope="module", params=[("llama", {"use_dora": True}), ("gpt2", {"use_rslora": True})])
def trained_lora(request, tiny_model_dirs, packed_corpus, tmp_path_factory):
    """A LoRA model trained for 4 steps with plain `transformers.Trainer` (CE), with its untouched base weights."""
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    family, options = request.param
    model, tokenizer = load_causal_lm(tiny_model_dirs[family])
    base_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    peft_model = get_peft_model(model, build_lora_config(r=4, lora_alpha=8, lora_dropout=0.0, model=model, **options))
    output_dir = tmp_path_factory.mktemp(f"lora_{family}")
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_steps=4,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=peft_model, args=args, train_dataset=packed_corpus["train"].select(range(16)))
    trainer.train()
    peft_model.eval()
    return {
        "family": family,
        "peft_model": peft_model,
        "tokenizer": tokenizer,
        "base_state": base_state,
        "output_dir": output_dir,
        "base_dir": tiny_model_dirs[family],
    }


def test_lora_training_changes_only_adapter_weights(trained_lora):
    peft_model, base_state = trained_lora["peft_model"], trained_lora["base_state"]
    base = peft_model.get_base_model()
    changed_adapter = 0
    for name, tensor in base.state_dict().items():
        if "lora_" in name:
            if "lora_B" in name:  # initialised at zero; training moves it
                changed_adapter += int(tensor.abs().sum() > 0)
            continue
        original = name.replace(".base_layer", "")
        assert torch.equal(tensor, base_state[original]), f"base weight {original} changed during LoRA training"
    assert changed_adapter > 0


def test_trainer_checkpoints_hold_the_adapter_only(trained_lora):
    checkpoint = trained_lora["output_dir"] / "checkpoint-4"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert not (checkpoint / "model.safetensors").exists()
    with safe_open(checkpoint / "adapter_model.safetensors", "pt") as handle:
        keys = list(handle.keys())
    assert keys and all("lora_" in key for key in keys)


def test_merged_export_equals_adapter_applied_outputs(trained_lora, tmp_path, input_ids):
    peft_model = trained_lora["peft_model"]
    with torch.no_grad():
        adapted_logits = peft_model(input_ids=input_ids).logits
    merged = export_merged_model(
        peft_model, tmp_path / "merged", tokenizer=trained_lora["tokenizer"], datasets=["builtin"]
    )
    assert not hasattr(merged, "peft_config")
    reloaded, tokenizer = load_causal_lm(tmp_path / "merged")
    assert tokenizer is not None
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids).logits, adapted_logits, rtol=1e-4, atol=1e-4)
        # in_place=False merged a copy: the PEFT model still has its adapter and still computes the same.
        assert torch.equal(peft_model(input_ids=input_ids).logits, adapted_logits)
    readme = (tmp_path / "merged" / "README.md").read_text()
    assert "finetuned" in readme and str(trained_lora["base_dir"]) in readme
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    lineage = json.loads((tmp_path / "merged" / "hf_interop_lineage.json").read_text())
    assert lineage["kind"] == "finetuned" and lineage["base_model"][0]["local_path"] == str(
        trained_lora["base_dir"].resolve()
    )
    assert lineage["extra"]["lora"]["r"] == 4
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_merged_model(peft_model, tmp_path / "merged")


def test_disabled_adapters_give_the_base_models_logits(trained_lora, input_ids):
    peft_model = trained_lora["peft_model"]
    base, _ = load_causal_lm(trained_lora["base_dir"], load_tokenizer_too=False)
    with torch.no_grad():
        with peft_model.disable_adapter():
            without_adapter = peft_model(input_ids=input_ids).logits
        with_adapter = peft_model(input_ids=input_ids).logits
        base_logits = base(input_ids=input_ids).logits
    assert torch.equal(without_adapter, base_logits)
    assert not torch.allclose(with_adapter, base_logits)


def test_save_adapter_checkpoint_round_trips(trained_lora, tmp_path, input_ids):
    from peft import PeftModel

    peft_model = trained_lora["peft_model"]
    folder = save_adapter_checkpoint(peft_model, tmp_path / "adapter", tokenizer=trained_lora["tokenizer"])
    assert (folder / "adapter_config.json").is_file() and not (folder / "model.safetensors").exists()
    assert "library_name: peft" in (folder / "README.md").read_text()
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4
    base, _ = load_causal_lm(trained_lora["base_dir"], load_tokenizer_too=False)
    restored = PeftModel.from_pretrained(base, folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(input_ids=input_ids).logits, peft_model(input_ids=input_ids).logits)


def test_export_refuses_a_model_without_adapters(tiny_model_dirs, tmp_path):
    model, _ = load_causal_lm(tiny_model_dirs["llama"], load_tokenizer_too=False)
    with pytest.raises(TypeError, match="needs a peft.PeftModel"):
        export_merged_model(model, tmp_path / "out")


def test_in_place_export_merges_the_given_model(tiny_model_dirs, tmp_path, input_ids):
    from peft import get_peft_model

    model, _ = load_causal_lm(tiny_model_dirs["qwen2"])
    config = build_lora_config(r=2, model=model, init_lora_weights=False)
    peft_model = get_peft_model(model, config).eval()
    with torch.no_grad():
        adapted_logits = peft_model(input_ids=input_ids).logits
    merged = export_merged_model(peft_model, tmp_path / "merged", in_place=True)
    assert merged is peft_model.get_base_model()  # no second copy was made
    reloaded, _ = load_causal_lm(tmp_path / "merged", load_tokenizer_too=False)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids).logits, adapted_logits, rtol=1e-4, atol=1e-4)


def test_check_adapter_weights_refuses_pickle_only_adapters_unless_allowed(trained_lora, tmp_path):
    """Issue 24, finding 14: the safetensors-only rule of `load_causal_lm` holds for adapter folders too."""
    from hf_interop.adapters import check_adapter_weights
    from hf_interop.loading import ModelLoadingError

    safe = tmp_path / "safe"
    trained_lora["peft_model"].save_pretrained(safe)
    check_adapter_weights(safe, allow_pickle=False)  # safetensors: nothing to opt in to
    pickled = tmp_path / "pickled"
    trained_lora["peft_model"].save_pretrained(pickled, safe_serialization=False)
    assert (pickled / "adapter_model.bin").is_file() and not (pickled / "adapter_model.safetensors").exists()
    with pytest.raises(ModelLoadingError) as error:
        check_adapter_weights(pickled, allow_pickle=False)
    message = str(error.value)
    assert str(pickled) in message and "adapter_model.bin" in message
    assert "allow_pickle=True (CLI: --allow_pickle)" in message and "safetensors" in message
    check_adapter_weights(pickled, allow_pickle=True)
    # both files: PEFT reads the safetensors one, so no opt-in is needed
    shutil.copy(safe / "adapter_model.safetensors", pickled / "adapter_model.safetensors")
    check_adapter_weights(pickled, allow_pickle=False)
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(safe / "adapter_config.json", config_only / "adapter_config.json")
    with pytest.raises(ModelLoadingError, match=r"config_only.*no adapter weights"):
        check_adapter_weights(config_only, allow_pickle=True)
    (config_only / "adapter_config.json").unlink()
    with pytest.raises(ModelLoadingError, match=r"config_only.*has no adapter_config\.json"):
        check_adapter_weights(config_only, allow_pickle=True)
    with pytest.raises(ModelLoadingError, match=r"missing_folder' does not exist"):
        check_adapter_weights(tmp_path / "missing_folder", allow_pickle=False)


def test_check_adapter_weights_of_a_hub_id_offline(monkeypatch):
    """A hub adapter not in the local cache cannot be shown to have safetensors weights offline: refused unless the
    caller allows pickle (PEFT would then fall back to adapter_model.bin)."""
    import huggingface_hub

    from hf_interop.adapters import check_adapter_weights
    from hf_interop.loading import ModelLoadingError

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        ModelLoadingError, match=r"'someone/some-adapter'.*adapter_model\.safetensors.*allow_pickle=True"
    ):
        check_adapter_weights("someone/some-adapter", allow_pickle=False)
    check_adapter_weights("someone/some-adapter", allow_pickle=True)
