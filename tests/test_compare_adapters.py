"""LoRA adapter folders in `compare_checkpoints`: pickle adapter weights need `allow_pickle=True` (issue 24,
finding 14), and a single-file dataset is scored on its held-out part (finding 7)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from datasets import Dataset

from hf_interop.compare import compare_checkpoints
from hf_interop.loading import ModelLoadingError


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, tiny_model_dirs):
    """The same LoRA adapter of the tiny Llama saved twice: safetensors, and pickle only (adapter_model.bin)."""
    from peft import LoraConfig, get_peft_model

    from hf_interop import load_causal_lm

    base_dir = tiny_model_dirs["llama"]
    model, tokenizer = load_causal_lm(base_dir)
    peft_model = get_peft_model(
        model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)
    )
    torch.manual_seed(0)
    folders = {}
    for kind, safe in (("safetensors", True), ("pickle", False)):
        folder = tmp_path_factory.mktemp(f"adapter_{kind}")
        peft_model.save_pretrained(folder, safe_serialization=safe)
        config = json.loads((folder / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(base_dir)
        (folder / "adapter_config.json").write_text(json.dumps(config))
        folders[kind] = folder
    assert sorted(p.name for p in folders["pickle"].iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.bin",
    ]
    return folders


def test_pickle_only_adapter_is_refused_without_allow_pickle(tiny_model_dirs, adapter_dirs):
    checkpoints = [str(tiny_model_dirs["llama"]), str(adapter_dirs["pickle"])]
    with pytest.raises(ModelLoadingError) as error:
        compare_checkpoints(checkpoints, max_documents=1, block_size=32, show_progress=False)
    message = str(error.value)
    assert str(adapter_dirs["pickle"]) in message and "adapter_model.bin" in message
    assert "allow_pickle=True" in message and "--allow_pickle" in message
    # refused before any model loads: the other order fails the same way
    with pytest.raises(ModelLoadingError, match="allow_pickle=True"):
        compare_checkpoints(checkpoints[::-1], max_documents=1, block_size=32, show_progress=False)


def test_pickle_only_adapter_is_accepted_with_allow_pickle_and_scores_like_safetensors(tiny_model_dirs, adapter_dirs):
    kwargs = {"max_documents": 2, "block_size": 32, "show_progress": False}
    base = str(tiny_model_dirs["llama"])
    opted_in = compare_checkpoints([base, str(adapter_dirs["pickle"])], allow_pickle=True, **kwargs)
    safe = compare_checkpoints([base, str(adapter_dirs["safetensors"])], **kwargs)
    assert opted_in["models"][1]["perplexity"] == pytest.approx(safe["models"][1]["perplexity"], rel=1e-6)
    assert opted_in["models"][1]["perplexity"] != pytest.approx(opted_in["models"][0]["perplexity"], rel=1e-6)


def test_adapter_without_weights_is_refused_naming_the_folder(tiny_model_dirs, adapter_dirs, tmp_path):
    empty = tmp_path / "no_weights"
    empty.mkdir()
    shutil.copy(adapter_dirs["pickle"] / "adapter_config.json", empty / "adapter_config.json")
    with pytest.raises(ModelLoadingError, match=r"no_weights.*no adapter weights \(adapter_model\.safetensors\)"):
        compare_checkpoints([str(tiny_model_dirs["llama"]), str(empty)], show_progress=False)


def test_pickle_only_full_checkpoint_is_refused_before_any_model_loads(tiny_model_dirs, tmp_path, monkeypatch):
    import hf_interop.compare as compare
    from hf_interop import load_causal_lm

    model, tokenizer = load_causal_lm(tiny_model_dirs["llama"])
    pickled = tmp_path / "pickled"
    model.config.save_pretrained(pickled)
    tokenizer.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    loaded = []
    monkeypatch.setattr(compare, "load_comparison_model", lambda *a, **k: loaded.append(a) or (model, tokenizer))
    with pytest.raises(ModelLoadingError, match=r"pickled.*allow_pickle=True \(CLI: --allow_pickle\)"):
        compare_checkpoints([str(tiny_model_dirs["llama"]), str(pickled)], show_progress=False)
    assert loaded == []


def test_single_file_dataset_is_scored_on_its_held_out_documents(tiny_model_dirs, tmp_path):
    from hf_interop.compare import check_dataset_argument  # noqa: F401  (the old home keeps working)
    from hf_interop.data import load_text_dataset

    path = tmp_path / "notes.jsonl"
    Dataset.from_dict({"text": [f"note {index} about the corpus" for index in range(40)]}).to_json(str(path))
    checkpoints = [str(tiny_model_dirs["llama"]), str(tiny_model_dirs["qwen2"])]
    report = compare_checkpoints(checkpoints, dataset=str(path), block_size=32, show_progress=False)
    held_out = load_text_dataset(str(path), "validation")
    assert report["dataset"]["num_documents"] == len(held_out) == 2
    assert "2 of 40 documents held out" in report["dataset"]["description"]
    whole = compare_checkpoints(checkpoints, dataset=str(path), split="all", block_size=32, show_progress=False)
    assert whole["dataset"]["num_documents"] == 40
    with pytest.raises(ValueError, match="validation_split_percentage=0 must be a number in"):
        compare_checkpoints(checkpoints, dataset=str(path), validation_split_percentage=0, show_progress=False)
