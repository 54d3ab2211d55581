"""The embedded default corpus, causal-LM packing, and the dataset argument of the CLI and recipes.

The builtin corpus is Python's own language reference (`pydoc_data.topics`), present on every CPython: 79
documents, about 465 KB of English. It needs no download, so demos and tests run anywhere.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .logging_utils import get_logger

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict
    from transformers import PreTrainedTokenizerBase

logger = get_logger(__name__)


def builtin_documents() -> list[tuple[str, str]]:
    """`(title, text)` pairs of the builtin corpus, sorted by title."""
    from pydoc_data.topics import topics

    return sorted((title, text.strip()) for title, text in topics.items() if text.strip())


def load_builtin_corpus(validation_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0) -> DatasetDict:
    """Train/validation/test splits of the builtin corpus, deterministic for a given `seed`.

    Whole documents go to one split (no document straddles two), assigned after a seeded shuffle until each
    held-out split holds at least its fraction of the characters.

    Args:
        validation_fraction (`float`, *optional*, defaults to 0.1): share of characters for `validation`.
        test_fraction (`float`, *optional*, defaults to 0.1): share of characters for `test`.
        seed (`int`, *optional*, defaults to 0): shuffle seed.

    Returns:
        `datasets.DatasetDict` with splits `train`, `validation`, `test`, columns `title` and `text`.
    """
    from datasets import Dataset, DatasetDict

    for name, value in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < value < 0.5:
            raise ValueError(f"{name} must be in (0, 0.5), got {value}.")
    documents = builtin_documents()
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    total_chars = sum(len(text) for _, text in documents)
    splits: dict[str, list[int]] = {"test": [], "validation": [], "train": []}
    targets = {"test": test_fraction * total_chars, "validation": validation_fraction * total_chars}
    filled = {"test": 0, "validation": 0}
    for index in order:
        for split in ("test", "validation"):
            if filled[split] < targets[split]:
                splits[split].append(index)
                filled[split] += len(documents[index][1])
                break
        else:
            splits["train"].append(index)
    return DatasetDict(
        {
            split: Dataset.from_dict(
                {
                    "title": [documents[i][0] for i in sorted(indices)],
                    "text": [documents[i][1] for i in sorted(indices)],
                }
            )
            for split, indices in (
                ("train", splits["train"]),
                ("validation", splits["validation"]),
                ("test", splits["test"]),
            )
        }
    )


def tokenizer_adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether `tokenizer` puts its BOS token before every text it encodes (Gemma, Llama 2/3 do; GPT-2, SmolLM2
    do not), i.e. whether its model was trained to see BOS first."""
    bos_id = tokenizer.bos_token_id
    if bos_id is None:
        return False
    with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
    without = tokenizer("x", add_special_tokens=False)["input_ids"]
    return len(with_special) > len(without) and with_special[0] == bos_id


def pack_dataset(
    dataset: Dataset | DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int = 128,
    text_column: str = "text",
    add_eos: bool = True,
    max_blocks: int | None = None,
    num_proc: int | None = None,
    add_bos: bool | None = None,
) -> Any:
    """Tokenize a text dataset and pack it into fixed-length blocks for causal LM training.

    Documents are concatenated (separated by the EOS token when `add_eos`) and cut into blocks of `block_size`
    tokens; the last partial block is dropped. For models that expect a BOS token first (the tokenizer puts one
    before every text it encodes, as Gemma's does), every block starts with BOS followed by `block_size - 1`
    text tokens: without it such models predict far worse (Gemma-3-270M on 16 validation blocks of 128 tokens:
    held-out perplexity 29.8 with BOS, 214.1 without). Each row has `input_ids`, `attention_mask` and `labels` (a copy
    of `input_ids`; the model shifts them), so it feeds `Trainer` and the distillation trainers directly.

    Args:
        dataset (`Dataset` or `DatasetDict`): text data with a `text_column`.
        tokenizer (`PreTrainedTokenizerBase`): the tokenizer of the model that will train on the blocks.
        block_size (`int`, *optional*, defaults to 128): tokens per block.
        text_column (`str`, *optional*, defaults to `"text"`): the column holding the text.
        add_eos (`bool`, *optional*, defaults to `True`): put the EOS token after every document.
        max_blocks (`int`, *optional*): keep only the first `max_blocks` blocks (per split).
        num_proc (`int`, *optional*): worker processes for tokenization.
        add_bos (`bool`, *optional*): start every block with the BOS token. Default: when the tokenizer itself
            adds BOS to what it encodes (`tokenizer("x")` starts with `bos_token_id`).
    """
    from datasets import DatasetDict

    if block_size < 2:
        raise ValueError(f"block_size must be at least 2 (a causal LM needs an input and a target), got {block_size}.")
    if isinstance(dataset, DatasetDict):
        return DatasetDict(
            {
                split: pack_dataset(part, tokenizer, block_size, text_column, add_eos, max_blocks, num_proc, add_bos)
                for split, part in dataset.items()
            }
        )
    if text_column not in dataset.column_names:
        raise ValueError(
            f"text_column {text_column!r} is not a column of the dataset (columns: {dataset.column_names}); "
            "pass text_column=... ."
        )
    eos_id = tokenizer.eos_token_id
    if add_eos and eos_id is None:
        raise ValueError("add_eos=True but the tokenizer has no eos_token; set tokenizer.eos_token or add_eos=False.")
    bos_id = tokenizer.bos_token_id
    if add_bos is None:
        add_bos = tokenizer_adds_bos(tokenizer)
    elif add_bos and bos_id is None:
        raise ValueError("add_bos=True but the tokenizer has no bos_token; set tokenizer.bos_token or add_bos=False.")
    prefix = [bos_id] if add_bos else []
    text_per_block = block_size - len(prefix)

    def tokenize_and_pack(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer(batch[text_column], add_special_tokens=False, verbose=False)["input_ids"]
        stream: list[int] = []
        for ids in encoded:
            stream.extend(ids)
            if add_eos:
                stream.append(eos_id)
        usable = len(stream) // text_per_block * text_per_block
        blocks = [prefix + stream[start : start + text_per_block] for start in range(0, usable, text_per_block)]
        return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks], "labels": blocks}

    # One map batch holds the whole split, so packing crosses document boundaries the same way on every run.
    packed = dataset.map(
        tokenize_and_pack,
        batched=True,
        batch_size=len(dataset) if num_proc is None else max(1, len(dataset) // num_proc),
        remove_columns=dataset.column_names,
        num_proc=num_proc,
        desc=f"Packing into blocks of {block_size}",
    )
    if max_blocks is not None:
        packed = packed.select(range(min(max_blocks, len(packed))))
    return packed


BUILTIN_DATASET = "builtin"
_DATA_FILE_TYPES = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# The held-out split carved from a dataset that has none of its own answers to both names.
HELD_OUT_SPLITS = ("validation", "test")
# Every row of a dataset that has one split (a file, a saved `Dataset`, a train-only `DatasetDict`), nothing carved.
WHOLE_DATASET_SPLIT = "all"
DEFAULT_VALIDATION_SPLIT_PERCENTAGE = 5.0
_EVAL_DATASET_HINT = "pass eval_dataset=FILE (CLI: --eval_dataset FILE) to evaluate on a dataset of its own"


def load_text_dataset(
    dataset: str,
    split: str = "validation",
    *,
    eval_dataset: str | None = None,
    validation_split_percentage: float = DEFAULT_VALIDATION_SPLIT_PERCENTAGE,
    text_column: str = "text",
) -> Dataset:
    """Resolve a dataset argument of the CLI and recipes into a `datasets.Dataset`.

    A dataset with no held-out split of its own (a single file, a saved `Dataset`, or a saved `DatasetDict` whose
    only split is `train`) is split by document, as `run_clm.py` does with `validation_split_percentage`:
    `"validation"` (or `"test"`, the same documents) gives the held-out documents, `"train"` every other one, and
    `"all"` every row. A document is a row, except in a `.txt` file, where it is a paragraph (lines up to a blank
    line; a file without blank lines has one document per line). Which documents are held out depends only on
    their text (the `validation_split_percentage` share with the smallest BLAKE2 hashes; identical documents
    always land together), so every run and every process of a distributed run agree, and no document is in both
    splits. With `eval_dataset`, nothing is carved: `"train"` is the whole dataset and the held-out splits come from
    `eval_dataset`.

    Args:
        dataset (`str`):
            `"builtin"` (the builtin corpus, see :func:`hf_interop.load_builtin_corpus`), a folder written by
            `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, or a `.txt` / `.json` / `.jsonl` / `.csv` /
            `.parquet` file (loaded with `datasets.load_dataset`, offline).
        split (`str`, *optional*, defaults to `"validation"`):
            Split to take: a split of the builtin corpus or a saved `DatasetDict`, or, for a dataset with one split,
            `"train"`, `"validation"`, `"test"` or `"all"` (see above).
        eval_dataset (`str`, *optional*):
            Where the held-out splits come from instead (same forms as `dataset`; a `DatasetDict` gives its `split`,
            anything with one split all of its rows).
        validation_split_percentage (`float`, *optional*, defaults to 5):
            Share of the documents held out, in (0, 100), when the split is carved.
        text_column (`str`, *optional*, defaults to `"text"`):
            The column whose text identifies a document (else `input_ids`, else the whole row).
    """
    return load_text_split(
        dataset,
        split,
        eval_dataset=eval_dataset,
        validation_split_percentage=validation_split_percentage,
        text_column=text_column,
    )[0]


def load_text_split(
    dataset: str,
    split: str = "validation",
    *,
    eval_dataset: str | None = None,
    validation_split_percentage: float = DEFAULT_VALIDATION_SPLIT_PERCENTAGE,
    text_column: str = "text",
) -> tuple[Dataset, str]:
    """:func:`load_text_dataset` and a one-line description of what was taken (for reports and model cards)."""
    from datasets import DatasetDict

    percentage = check_validation_split_percentage(validation_split_percentage)
    if eval_dataset is not None:
        _check_eval_dataset_is_not_dataset(dataset, eval_dataset)
        if split in HELD_OUT_SPLITS:
            return _load_whole(eval_dataset, split, argument="eval_dataset"), f"{eval_dataset} (eval_dataset)"
    source = _load_source(dataset, "dataset")
    if isinstance(source, DatasetDict):
        if split not in source:
            where = "the builtin corpus" if dataset == BUILTIN_DATASET else f"the dataset at {dataset!r}"
            raise ValueError(f"split {split!r} is not in {where}; use one of {list(source)}.")
        if dataset == BUILTIN_DATASET:
            return source[split], f"builtin corpus ({split} split)"
        return source[split], f"{dataset} ({split} split)"
    rows, is_text_file = source
    if split == WHOLE_DATASET_SPLIT:
        return rows, f"{dataset} (all {len(rows)} rows)"
    if split not in ("train", *HELD_OUT_SPLITS):
        raise ValueError(
            f"split {split!r} is not in the dataset at {dataset!r}, which has one split; use 'train' (the documents "
            f"not held out), 'validation' or 'test' (the {percentage:g}% held out, validation_split_percentage) or "
            f"'{WHOLE_DATASET_SPLIT}' (every row)."
        )
    if eval_dataset is not None:  # split == "train": the held-out text is eval_dataset's, nothing to carve
        return rows, f"{dataset} (all {len(rows)} rows; held-out text from {eval_dataset})"
    held_out, num_documents, num_held_out = _held_out_rows(rows, percentage, text_column, is_text_file, dataset)
    keep = split in HELD_OUT_SPLITS
    indices = [index for index, is_held_out in enumerate(held_out) if is_held_out == keep]
    if split == "train":
        description = f"{dataset} (train: {num_documents - num_held_out} of {num_documents} documents"
    else:
        description = f"{dataset} ({split}: {num_held_out} of {num_documents} documents held out"
    description += f", validation_split_percentage={percentage:g})"
    logger.info(f"{dataset!r} has no held-out split of its own: carved by document, {description}")
    return rows.select(indices), description


def check_validation_split_percentage(value: Any) -> float:
    """`value` as a float, or a `ValueError` naming it and the fix when it is not a number in (0, 100)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 100:
        raise ValueError(
            f"validation_split_percentage={value!r} must be a number in (0, 100): the share of the documents held "
            "out for evaluation when a dataset has no held-out split of its own (5 holds out 5%, like run_clm.py). "
            f"Pass e.g. 5, or {_EVAL_DATASET_HINT}."
        )
    return float(value)


def _has_held_out_splits(folder: Path) -> bool:
    """Whether `folder` is a saved `DatasetDict` with a split besides `train` (read from its dataset_dict.json)."""
    import json

    try:
        return set(json.loads((folder / "dataset_dict.json").read_text())["splits"]) != {"train"}
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _check_eval_dataset_is_not_dataset(dataset: str, eval_dataset: str) -> None:
    """Refuse evaluating on the very dataset that is trained on (a DatasetDict with held-out splits is fine)."""
    if (
        dataset != BUILTIN_DATASET
        and Path(dataset).exists()
        and Path(dataset).resolve() == Path(eval_dataset).resolve()
        and not _has_held_out_splits(Path(dataset))
    ):
        raise ValueError(
            f"eval_dataset {eval_dataset!r} is the training dataset itself, so evaluation would score text the model "
            "trained on. Pass a different file, or leave eval_dataset out to hold out validation_split_percentage of "
            "the documents."
        )


def _load_source(dataset: str, argument: str) -> Any:
    """A `DatasetDict` with more than a train split (the builtin corpus, a saved one), or `(rows, is_text_file)` for
    a dataset with one split."""
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    _check_dataset_path(dataset, argument)
    if dataset == BUILTIN_DATASET:
        return load_builtin_corpus()
    path = Path(dataset)
    if path.is_dir():
        loaded = load_from_disk(str(path))
        if isinstance(loaded, DatasetDict):
            return (loaded["train"], False) if list(loaded) == ["train"] else loaded
        assert isinstance(loaded, Dataset)
        return loaded, False
    kind = _DATA_FILE_TYPES[path.suffix.lower()]
    return load_dataset(kind, data_files=str(path), split="train"), kind == "text"


def _load_whole(dataset: str, split: str, argument: str) -> Dataset:
    """`split` of a `DatasetDict`, or every row of a dataset with one split (an explicit evaluation set)."""
    from datasets import DatasetDict

    source = _load_source(dataset, argument)
    if isinstance(source, DatasetDict):
        if split not in source:
            raise ValueError(f"split {split!r} is not in the {argument} at {dataset!r}; use one of {list(source)}.")
        return source[split]
    return source[0]


def _document_keys(rows: Dataset, text_column: str, is_text_file: bool) -> tuple[list[int], list[str]]:
    """`(document index of every row, text of every document)`: a row is a document, except in a `.txt` file."""
    import json

    if text_column in rows.column_names:
        values = [str(value) if value is not None else "" for value in rows[text_column]]
    elif "input_ids" in rows.column_names:
        values = [json.dumps(ids) for ids in rows["input_ids"]]
    else:
        values = [json.dumps(row, sort_keys=True, default=str) for row in rows]
    if not is_text_file or all(value.strip() for value in values):
        return list(range(len(values))), values
    # A .txt file with blank lines: a document is a paragraph; a blank line belongs to the paragraph it closes.
    document_of_row: list[int] = []
    documents: list[list[str]] = []
    paragraph_open = False
    for value in values:
        if value.strip():
            if not paragraph_open:
                documents.append([])
                paragraph_open = True
            documents[-1].append(value)
        else:
            paragraph_open = False
        document_of_row.append(max(len(documents) - 1, 0))
    return document_of_row, ["\n".join(lines) for lines in documents]


def _held_out_rows(
    rows: Dataset, percentage: float, text_column: str, is_text_file: bool, dataset: str
) -> tuple[list[bool], int, int]:
    """`(held out? per row, number of documents, number held out)`, the documents chosen by content hash."""
    import hashlib
    import math

    document_of_row, documents = _document_keys(rows, text_column, is_text_file)
    count = len(documents)
    target = math.floor(count * percentage / 100 + 0.5)
    unit = "documents" if count != 1 else "document"
    kind = " (blank-line separated paragraphs)" if is_text_file and count != len(document_of_row) else ""
    if target < 1:
        needed = f"at least {math.ceil(5000 / count) / 100:g} (one document)" if count > 1 else "a larger dataset"
        raise ValueError(
            f"dataset {dataset!r} has {count} {unit}{kind}; validation_split_percentage={percentage:g} holds out none "
            f"of them. Raise validation_split_percentage to {needed}, or {_EVAL_DATASET_HINT}."
        )
    by_text: dict[str, list[int]] = {}
    for index, text in enumerate(documents):
        by_text.setdefault(text, []).append(index)
    held_out_documents: set[int] = set()
    for text in sorted(
        by_text, key=lambda text: (hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest(), text)
    ):
        if len(held_out_documents) >= target:
            break
        held_out_documents.update(by_text[text])  # identical documents go to the same side
    if len(held_out_documents) >= count:
        raise ValueError(
            f"dataset {dataset!r} has {count} {unit}{kind}; validation_split_percentage={percentage:g} holds out all "
            f"of them, leaving none to train on. Lower validation_split_percentage, or {_EVAL_DATASET_HINT}."
        )
    held_out = [document in held_out_documents for document in document_of_row]
    return held_out, count, len(held_out_documents)


def _check_dataset_path(dataset: str, argument: str = "dataset") -> None:
    if dataset == BUILTIN_DATASET:
        return
    path = Path(dataset)
    if path.is_dir():
        return
    if path.is_file():
        if path.suffix.lower() not in _DATA_FILE_TYPES:
            raise ValueError(
                f"{argument} file {dataset!r} has an unknown extension; use one of {sorted(_DATA_FILE_TYPES)}, a "
                "folder written by save_to_disk, or 'builtin'."
            )
        return
    raise ValueError(
        f"{argument} {dataset!r} is neither 'builtin', an existing folder (save_to_disk) nor a data file; check the "
        "path."
    )


def check_dataset_argument(
    dataset: str,
    *,
    eval_dataset: str | None = None,
    validation_split_percentage: float = DEFAULT_VALIDATION_SPLIT_PERCENTAGE,
) -> None:
    """Cheap check (no loading) that `dataset` (and `eval_dataset`) can be resolved by :func:`load_text_dataset`."""
    check_validation_split_percentage(validation_split_percentage)
    _check_dataset_path(dataset, "dataset")
    if eval_dataset is not None:
        _check_dataset_path(eval_dataset, "eval_dataset")
        _check_eval_dataset_is_not_dataset(dataset, eval_dataset)
