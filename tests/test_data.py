import pytest

from hf_interop import load_builtin_corpus, pack_dataset


def test_corpus_splits_are_deterministic_and_disjoint(corpus):
    again = load_builtin_corpus()
    for split in ("train", "validation", "test"):
        assert corpus[split]["title"] == again[split]["title"]
    titles = [set(corpus[s]["title"]) for s in ("train", "validation", "test")]
    assert not (titles[0] & titles[1]) and not (titles[0] & titles[2]) and not (titles[1] & titles[2])
    assert sum(len(t) for t in titles) == 79 or sum(len(t) for t in titles) > 70


def test_corpus_fractions(corpus):
    chars = {s: sum(len(t) for t in corpus[s]["text"]) for s in corpus}
    total = sum(chars.values())
    assert total > 400_000
    for split in ("validation", "test"):
        assert 0.09 < chars[split] / total < 0.25


def test_other_seed_changes_split(corpus):
    other = load_builtin_corpus(seed=1)
    assert set(other["test"]["title"]) != set(corpus["test"]["title"])


def test_bad_fraction():
    with pytest.raises(ValueError, match="validation_fraction"):
        load_builtin_corpus(validation_fraction=0.7)


def test_pack_blocks_reconstruct_the_token_stream(corpus, corpus_tokenizer):
    split = corpus["validation"]
    packed = pack_dataset(split, corpus_tokenizer, block_size=32)
    stream = []
    for text in split["text"]:
        stream.extend(corpus_tokenizer(text, add_special_tokens=False)["input_ids"])
        stream.append(corpus_tokenizer.eos_token_id)
    assert len(packed) == len(stream) // 32
    flat = [token for row in packed["input_ids"] for token in row]
    assert flat == stream[: len(flat)]
    assert packed[0]["labels"] == packed[0]["input_ids"]
    assert all(len(row) == 32 for row in packed["attention_mask"])


def test_pack_datasetdict_and_max_blocks(corpus, corpus_tokenizer):
    packed = pack_dataset(corpus, corpus_tokenizer, block_size=16, max_blocks=5)
    assert set(packed) == {"train", "validation", "test"}
    assert all(len(packed[s]) == 5 for s in packed)


def test_pack_bad_inputs(corpus, corpus_tokenizer):
    with pytest.raises(ValueError, match="text_column 'body'"):
        pack_dataset(corpus["test"], corpus_tokenizer, text_column="body")
    with pytest.raises(ValueError, match="block_size"):
        pack_dataset(corpus["test"], corpus_tokenizer, block_size=1)
