"""load_gpt2_tokenizer: the real GPT-2 tokenizer, rebuilt offline from openai-whisper's gpt2.tiktoken."""

from __future__ import annotations

import pytest
from cross_tokenizer_samples import TEXTS

from hf_interop.loading import load_gpt2_tokenizer


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    return load_gpt2_tokenizer()


def test_gpt2_tokenizer_is_gpt2_and_matches_tiktoken(gpt2_tokenizer):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str

    from hf_interop.loading import _gpt2_tiktoken_file

    assert len(gpt2_tokenizer) == 50257
    assert gpt2_tokenizer.eos_token == "<|endoftext|>" and gpt2_tokenizer.eos_token_id == 50256
    assert gpt2_tokenizer("Hello", add_special_tokens=False)["input_ids"] == [15496]
    reference = tiktoken.Encoding(
        "gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=load_tiktoken_bpe(str(_gpt2_tiktoken_file())),
        special_tokens={"<|endoftext|>": 50256},
    )
    for text in TEXTS:
        assert gpt2_tokenizer(text, add_special_tokens=False)["input_ids"] == reference.encode(text), text
        assert gpt2_tokenizer.decode(reference.encode(text)) == text


def test_gpt2_tokenizer_is_converted_once_into_the_cache(tmp_path, monkeypatch):
    from hf_interop import loading

    target = tmp_path / "gpt2"
    tokenizer = load_gpt2_tokenizer(cache_dir=target)
    assert (target / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]  # written atomically
    # a second call loads the cached folder: the whisper asset is not needed any more
    monkeypatch.setattr(loading, "_gpt2_tiktoken_file", lambda: pytest.fail("converted twice"))
    again = load_gpt2_tokenizer(cache_dir=target)
    assert again("Hello world")["input_ids"] == tokenizer("Hello world")["input_ids"] == [15496, 995]


def test_gpt2_tokenizer_without_whisper_names_the_install_command(tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "whisper" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match="pip install --no-deps openai-whisper tiktoken"):
        load_gpt2_tokenizer(cache_dir=tmp_path / "missing")
