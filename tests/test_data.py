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


def _bos_adding_copy(tokenizer):
    """The corpus tokenizer, made to put its BOS token before every text (as Gemma's and Llama's do)."""
    import copy

    from tokenizers.processors import TemplateProcessing

    bos_tokenizer = copy.deepcopy(tokenizer)
    bos = bos_tokenizer.bos_token or bos_tokenizer.eos_token
    bos_tokenizer.bos_token = bos
    bos_id = bos_tokenizer.convert_tokens_to_ids(bos)
    bos_tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )
    assert bos_tokenizer("x")["input_ids"][0] == bos_id
    return bos_tokenizer


def test_pack_starts_every_block_with_bos_when_the_tokenizer_adds_it(corpus, corpus_tokenizer):
    from hf_interop.data import tokenizer_adds_bos

    split = corpus["validation"]
    bos_tokenizer = _bos_adding_copy(corpus_tokenizer)
    assert tokenizer_adds_bos(bos_tokenizer) and not tokenizer_adds_bos(corpus_tokenizer)
    bos_id = bos_tokenizer.bos_token_id
    packed = pack_dataset(split, bos_tokenizer, block_size=32)  # auto: follows the tokenizer
    stream = []
    for text in split["text"]:
        stream.extend(corpus_tokenizer(text, add_special_tokens=False)["input_ids"])
        stream.append(corpus_tokenizer.eos_token_id)
    assert len(packed) == len(stream) // 31
    assert all(len(row) == 32 and row[0] == bos_id for row in packed["input_ids"])
    # the text after each BOS continues the stream without gaps or repeats
    assert [token for row in packed["input_ids"] for token in row[1:]] == stream[: 31 * len(packed)]
    assert packed[0]["labels"] == packed[0]["input_ids"]
    # explicit choices override the tokenizer
    assert (
        pack_dataset(split, bos_tokenizer, block_size=32, add_bos=False)["input_ids"]
        == pack_dataset(split, corpus_tokenizer, block_size=32)["input_ids"]
    )
    forced = pack_dataset(split, corpus_tokenizer, block_size=32, add_bos=True, max_blocks=3)
    assert all(row[0] == corpus_tokenizer.bos_token_id for row in forced["input_ids"])


def test_pack_add_bos_without_a_bos_token_is_refused(corpus, corpus_tokenizer):
    import copy

    no_bos = copy.deepcopy(corpus_tokenizer)
    no_bos.bos_token = None
    with pytest.raises(ValueError, match="add_bos=True but the tokenizer has no bos_token"):
        pack_dataset(corpus["test"], no_bos, add_bos=True)


def test_load_text_dataset_resolves_builtin_folders_and_files(tmp_path, corpus):
    from datasets import DatasetDict

    from hf_interop.data import BUILTIN_DATASET, check_dataset_argument, load_text_dataset

    assert load_text_dataset(BUILTIN_DATASET, "test")["text"] == corpus["test"]["text"]
    with pytest.raises(ValueError, match=r"split 'dev' is not in the builtin corpus; use one of \['train'"):
        load_text_dataset(BUILTIN_DATASET, "dev")
    saved = tmp_path / "saved"
    DatasetDict({"validation": corpus["validation"].select(range(2))}).save_to_disk(saved)
    assert load_text_dataset(str(saved))["text"] == corpus["validation"]["text"][:2]
    with pytest.raises(ValueError, match=r"split 'train' is not in the dataset at .*; use one of \['validation'\]"):
        load_text_dataset(str(saved), "train")
    lines = tmp_path / "lines.txt"
    lines.write_text("first line\nsecond line\n")
    assert load_text_dataset(str(lines), "all")["text"] == ["first line", "second line"]
    unknown = tmp_path / "data.xyz"
    unknown.write_text("x")
    for resolve in (load_text_dataset, check_dataset_argument):
        with pytest.raises(ValueError, match=r"dataset file .* has an unknown extension; use one of \['\.csv'"):
            resolve(str(unknown))
        with pytest.raises(ValueError, match="is neither 'builtin', an existing folder"):
            resolve(str(tmp_path / "missing.jsonl"))
    for argument in (BUILTIN_DATASET, str(saved), str(lines)):
        check_dataset_argument(argument)


def test_old_homes_of_the_dataset_and_alias_helpers_keep_working():
    import hf_interop.compare
    import hf_interop.data
    import hf_interop.loading

    for name in ("load_text_dataset", "check_dataset_argument", "BUILTIN_DATASET"):
        assert getattr(hf_interop.compare, name) is getattr(hf_interop.data, name)
    for name in ("resolve_model_alias", "DEFAULT_TEACHER_ALIAS"):
        assert getattr(hf_interop.compare, name) is getattr(hf_interop.loading, name)
    assert hf_interop.loading.resolve_model_alias("some/model") == "some/model"
    assert hf_interop.loading.resolve_model_alias(None) is None
