"""A held-out split carved from a dataset that has none of its own (one file, a saved `Dataset`, a train-only
`DatasetDict`), and an explicit `eval_dataset` that replaces the carving (issue 24, finding 7)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from datasets import Dataset, DatasetDict

from hf_interop.data import check_dataset_argument, load_text_dataset, load_text_split

DOCUMENTS = [f"document {index}: " + " ".join(f"word{index}x{k}" for k in range(index % 7 + 3)) for index in range(60)]


def _write(tmp_path, fmt: str, documents=DOCUMENTS):
    """`documents` as a data file of format `fmt` (a .txt holds one blank-line separated paragraph each)."""
    path = tmp_path / f"data.{fmt}"
    if fmt == "txt":
        # Two lines per document, so a document is a paragraph and not a line.
        path.write_text("\n\n".join(f"{text}\nsecond line of {text}" for text in documents) + "\n")
    elif fmt == "jsonl":
        path.write_text(
            "".join(json.dumps({"id": index, "text": text}) + "\n" for index, text in enumerate(documents))
        )
    elif fmt == "csv":
        Dataset.from_dict({"text": documents}).to_csv(str(path), index=False)
    elif fmt == "parquet":
        Dataset.from_dict({"text": documents}).to_parquet(str(path))
    return path


def _documents_of(rows, fmt):
    texts = rows["text"]
    if fmt != "txt":
        return list(texts)
    return [text for text in texts if text and not text.startswith("second line of ")]


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "csv", "parquet"])
def test_one_file_gets_a_held_out_validation_split_disjoint_from_train(tmp_path, fmt):
    path = _write(tmp_path, fmt)
    train = load_text_dataset(str(path), "train")
    validation = load_text_dataset(str(path), "validation")
    train_documents, held_out = _documents_of(train, fmt), _documents_of(validation, fmt)
    # 5% (like run_clm.py) of the 60 documents, and no document on both sides
    assert len(held_out) == 3
    assert not set(train_documents) & set(held_out)
    assert sorted(train_documents + held_out) == sorted(DOCUMENTS)
    if fmt == "txt":  # a paragraph is never cut: both of its lines go to the same split
        for text in held_out:
            assert f"second line of {text}" in validation["text"]
            assert f"second line of {text}" not in train["text"]
    # "test" names the same held-out documents; "all" is every row of the file
    assert load_text_dataset(str(path), "test")["text"] == validation["text"]
    assert len(load_text_dataset(str(path), "all")) == len(train) + len(validation)


def test_carving_is_the_same_in_every_process_and_independent_of_row_order(tmp_path):
    path = _write(tmp_path, "jsonl")
    first = load_text_dataset(str(path), "validation")["text"]
    code = (
        "import sys; from hf_interop.data import load_text_dataset; "
        "print(repr(load_text_dataset(sys.argv[1], 'validation')['text']))"
    )
    other_process = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True, env=_env()
    )
    assert other_process.stdout.strip() == repr(first)
    reversed_path = tmp_path / "reversed.jsonl"
    reversed_path.write_text(
        "".join(json.dumps({"text": text}) + "\n" for text in reversed(DOCUMENTS))  # same documents, other order
    )
    assert sorted(load_text_dataset(str(reversed_path), "validation")["text"]) == sorted(first)
    # a larger share holds out more documents, and every document held out at 5% stays held out
    wider = load_text_dataset(str(path), "validation", validation_split_percentage=20)["text"]
    assert len(wider) == 12 and set(first) <= set(wider)


def _env():
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1"}


def test_identical_documents_never_straddle_the_split(tmp_path):
    documents = [f"text number {index % 25}" for index in range(100)]  # every text four times
    path = _write(tmp_path, "jsonl", documents)
    train = load_text_dataset(str(path), "train")["text"]
    validation = load_text_dataset(str(path), "validation")["text"]
    assert validation and not set(train) & set(validation)
    assert len(train) + len(validation) == 100


def test_saved_dataset_and_train_only_dataset_dict_are_carved_too(tmp_path):
    rows = Dataset.from_dict({"text": DOCUMENTS})
    rows.save_to_disk(str(tmp_path / "rows"))
    DatasetDict({"train": rows}).save_to_disk(str(tmp_path / "train_only"))
    for folder in ("rows", "train_only"):
        train = load_text_dataset(str(tmp_path / folder), "train")["text"]
        validation = load_text_dataset(str(tmp_path / folder), "validation")["text"]
        assert len(validation) == 3 and not set(train) & set(validation) and len(train) == 57
    # a DatasetDict with a validation split of its own keeps it: nothing is carved
    both = DatasetDict({"train": rows.select(range(50)), "validation": rows.select(range(50, 60))})
    both.save_to_disk(str(tmp_path / "both"))
    assert load_text_dataset(str(tmp_path / "both"), "train")["text"] == DOCUMENTS[:50]
    assert load_text_dataset(str(tmp_path / "both"), "validation")["text"] == DOCUMENTS[50:]


def test_explicit_eval_dataset_replaces_the_carving(tmp_path):
    train_path = _write(tmp_path, "jsonl")
    eval_path = tmp_path / "eval.txt"
    eval_path.write_text("held-out one\nheld-out two\n")
    train = load_text_dataset(str(train_path), "train", eval_dataset=str(eval_path))
    validation, description = load_text_split(str(train_path), "validation", eval_dataset=str(eval_path))
    assert train["text"] == DOCUMENTS  # nothing carved away from training
    assert validation["text"] == ["held-out one", "held-out two"]  # the whole eval file
    assert str(eval_path) in description
    # the eval file may be a saved DatasetDict: its split of that name is taken
    DatasetDict({"validation": Dataset.from_dict({"text": ["a", "b"]})}).save_to_disk(str(tmp_path / "evaldict"))
    assert load_text_dataset(str(train_path), "validation", eval_dataset=str(tmp_path / "evaldict"))["text"] == [
        "a",
        "b",
    ]
    check_dataset_argument(str(train_path), eval_dataset=str(eval_path))


@pytest.mark.parametrize("percentage", [0, -5, 100, 150, float("nan"), "5", True])
def test_bad_percentage_is_refused_naming_the_value_and_the_fix(tmp_path, percentage):
    path = _write(tmp_path, "jsonl")
    for call in (
        lambda: load_text_dataset(str(path), "validation", validation_split_percentage=percentage),
        lambda: check_dataset_argument(str(path), validation_split_percentage=percentage),
    ):
        with pytest.raises(
            ValueError, match=r"validation_split_percentage=.* must be a number in \(0, 100\).*eval_dataset"
        ):
            call()


def test_too_small_a_file_is_refused_with_the_percentage_that_would_work(tmp_path):
    path = _write(tmp_path, "jsonl", DOCUMENTS[:9])
    with pytest.raises(ValueError, match=r"9 documents.*holds out none.*at least 5\.56.*eval_dataset") as error:
        load_text_dataset(str(path), "validation")
    assert str(path) in str(error.value)
    assert len(load_text_dataset(str(path), "validation", validation_split_percentage=5.56)) == 1
    (tmp_path / "one").mkdir()
    one = _write(tmp_path / "one", "jsonl", DOCUMENTS[:1])
    with pytest.raises(ValueError, match=r"1 document.*leaving none to train on.*eval_dataset"):
        load_text_dataset(str(one), "train", validation_split_percentage=60)


def test_bad_split_and_eval_arguments(tmp_path):
    path = _write(tmp_path, "jsonl")
    with pytest.raises(ValueError, match=r"split 'dev' .* has one split; use 'train'.*'validation'.*'all'"):
        load_text_dataset(str(path), "dev")
    for resolve in (
        lambda: load_text_dataset(str(path), "validation", eval_dataset=str(tmp_path / "missing.txt")),
        lambda: check_dataset_argument(str(path), eval_dataset=str(tmp_path / "missing.txt")),
    ):
        with pytest.raises(ValueError, match=r"eval_dataset .*missing\.txt.* is neither 'builtin'"):
            resolve()
    for resolve in (
        lambda: load_text_dataset(str(path), "validation", eval_dataset=str(path)),
        lambda: check_dataset_argument(str(path), eval_dataset=str(path)),
    ):
        with pytest.raises(ValueError, match=r"eval_dataset .* is the training dataset itself"):
            resolve()
    # a saved DatasetDict with a validation split of its own may be named twice: its splits stay apart
    rows = Dataset.from_dict({"text": DOCUMENTS})
    DatasetDict({"train": rows.select(range(50)), "validation": rows.select(range(50, 60))}).save_to_disk(
        str(tmp_path / "both")
    )
    both = str(tmp_path / "both")
    check_dataset_argument(both, eval_dataset=both)
    assert load_text_dataset(both, "validation", eval_dataset=both)["text"] == DOCUMENTS[50:]
    DatasetDict({"train": rows}).save_to_disk(str(tmp_path / "train_only"))
    with pytest.raises(ValueError, match=r"is the training dataset itself"):
        check_dataset_argument(str(tmp_path / "train_only"), eval_dataset=str(tmp_path / "train_only"))
