"""Reading a teacher-logits cache: :class:`TeacherLogitsCache` (memory-mapped) and :func:`sparse_kl`."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ...logging_utils import get_logger
from .codec import COUNTS_COLUMN, DamagedCacheError, compact_columns, decode_dense, max_entries
from .format import (
    ENCODED_FORMAT_VERSIONS,
    IDS_COLUMN,
    LOGPROBS_COLUMN,
    MANIFEST_FILE,
    PAD_LOGPROB,
    PLAN_FILE,
    READABLE_FORMAT_VERSIONS,
    SHARD_DATA_FILE,
    TAIL_COLUMN,
    _check_input_ids_column,
    _model_device,
    _padded_batch,
    _read_json,
    _row_lengths,
    _rows_batch,
    _sha256_file,
    _teacher_identity,
    _token_columns,
    dataset_fingerprint,
    kept_entries,
    tail_logprob_from_topk,
    tokenizer_fingerprint,
)
from .format import teacher_fingerprint as compute_teacher_fingerprint

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

logger = get_logger(__name__)


class TeacherLogitsCache:
    """A finished teacher-logits cache, memory-mapped.

    Load with :meth:`load`; the trainer then calls :meth:`check_compatible`, :meth:`attach` and :meth:`collate`.

    Attributes:
        path (`Path`): the cache folder.
        manifest (`dict`): teacher id and revision, dtype, tokenizer and dataset fingerprints, `top_k`,
            `temperature`, `vocab_size`, `num_rows`, `seq_length`, shard list, ...
        dataset (`datasets.Dataset`): the stored columns, one row per dataset row (memory-mapped Arrow).
    """

    #: columns :meth:`attach` adds to a dataset (keep them through the Trainer's column pruning) and keys of the
    #: dict :meth:`collate` returns
    columns: tuple[str, ...] = (IDS_COLUMN, LOGPROBS_COLUMN, TAIL_COLUMN)
    #: columns stored on disk (the tail is derived from the log-probs)
    stored_columns: tuple[str, ...] = (IDS_COLUMN, LOGPROBS_COLUMN)

    def __init__(self, path: Path, manifest: dict[str, Any], dataset: Dataset):
        self.path = path
        self.manifest = manifest
        self.dataset = dataset
        self._tail_prior: torch.Tensor | None = None
        if self.is_compact:
            # the encoded columns travel to the collate (decoded there, in the DataLoader's workers)
            self.stored_columns = _stored_columns(manifest)
            self.columns = self.stored_columns

    @property
    def is_compact(self) -> bool:
        """Whether the cache is encoded by `codec.py` (format version 2, compact: adaptive k, quantised log-probs,
        Elias-Fano ids; or 3, sampled: draw counts, Elias-Fano ids), decoded per batch by :meth:`collate`."""
        return int(self.manifest["format_version"]) in ENCODED_FORMAT_VERSIONS

    @property
    def logprob_bits(self) -> int | None:
        """Bits per stored log-prob code (16: float16 values); `None` for a sampled cache (it stores counts)."""
        value = self.manifest.get("logprob_bits", 16)
        return None if value is None else int(value)

    @property
    def sample_draws(self) -> int | None:
        """Draws per position of a sampled cache (`encoding="sampled"`), else `None`."""
        value = self.manifest.get("sample_draws")
        return None if value is None else int(value)

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        return (
            f"TeacherLogitsCache(path={str(self.path)!r}, teacher={self.manifest.get('teacher')!r}, "
            f"top_k={self.top_k}, temperature={self.temperature}, num_rows={len(self)})"
        )

    @property
    def top_k(self) -> int:
        return int(self.manifest["top_k"])

    @property
    def max_entries(self) -> int:
        """The most entries a position holds: `top_k`, or a sampled cache's `sample_draws`."""
        return max_entries(self.top_k, self.sample_draws)

    @property
    def temperature(self) -> float:
        return float(self.manifest["temperature"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def teacher_fingerprint(self) -> str | None:
        """Fingerprint of the teacher that made the cache (see `teacher_cache.teacher_fingerprint`), or `None` when
        it recorded none (an older hf_interop, or a teacher without weights). :meth:`check_compatible` compares it
        with a teacher (`teacher=`: a model or its safetensors folder)."""
        return self.manifest.get("teacher_fingerprint")

    @classmethod
    def load(cls, path: str | os.PathLike, verify_checksums: bool = True) -> TeacherLogitsCache:
        """Open a cache folder written by :func:`cache_teacher_logits`, memory-mapped.

        Checks that the manifest exists and that every shard it lists is present, has the recorded byte size and
        row count, and reads as Arrow; with `verify_checksums` (the default) also the sha256 of every shard, so a
        changed byte is refused before anything trains on it. That reads every byte once, several shards at a time
        (about 1.8 GB/s of sha256 per core on a 2-core AMD EPYC, and the page cache then holds what training reads).

        Args:
            path (`str` or `os.PathLike`): the cache folder.
            verify_checksums (`bool`, *optional*, defaults to `True`): compare every shard's sha256 with the
                manifest's. `False` skips it (a cache just written and hashed by the same process).
        """
        from datasets import Dataset, concatenate_datasets

        path = Path(path)
        manifest = _read_manifest(path)
        for shard in manifest["shards"]:
            data_path = path / shard["name"] / SHARD_DATA_FILE
            if not data_path.is_file():
                raise ValueError(
                    f"shard {shard['name']} of cache {str(path)!r} is missing ({data_path}); "
                    f"{_recompute(path, shard)}."
                )
            size = data_path.stat().st_size
            if size != shard["num_bytes"]:
                raise ValueError(
                    f"shard {shard['name']} of cache {str(path)!r} is truncated or corrupt: {data_path} has "
                    f"{size} bytes, the manifest says {shard['num_bytes']}; {_recompute(path, shard)}."
                )
        if verify_checksums:
            _verify_checksums(path, manifest["shards"])
        parts = []
        for shard in manifest["shards"]:
            data_path = path / shard["name"] / SHARD_DATA_FILE
            try:
                part = Dataset.from_file(str(data_path), in_memory=False)
            except Exception as error:
                raise ValueError(
                    f"shard {shard['name']} of cache {str(path)!r} is corrupt: {data_path} does not read as Arrow "
                    f"({error}); {_recompute(path, shard)}."
                ) from error
            expected_columns = list(_stored_columns(manifest))
            if len(part) != shard["num_rows"] or part.column_names != expected_columns:
                raise ValueError(
                    f"shard {shard['name']} of cache {str(path)!r} is corrupt: {len(part)} rows with columns "
                    f"{part.column_names}, expected {shard['num_rows']} rows of {expected_columns}; "
                    f"{_recompute(path, shard)}."
                )
            if int(manifest["format_version"]) in ENCODED_FORMAT_VERSIONS:
                _check_compact_counts(
                    path, shard, part, max_entries(int(manifest["top_k"]), manifest.get("sample_draws"))
                )
            parts.append(part)
        dataset = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        if len(dataset) != manifest["num_rows"]:
            raise ValueError(
                f"cache {str(path)!r} holds {len(dataset)} rows but its manifest says {manifest['num_rows']}; "
                "recompute it with overwrite=True (CLI: --overwrite_output_dir)."
            )
        if manifest.get("teacher_fingerprint") is None:
            logger.warning_once(
                f"teacher-logits cache {path} records no teacher fingerprint (written by an older hf_interop, or by "
                "a teacher without weights to hash): nothing can check which teacher made it. Recompute it "
                "with overwrite=True (CLI: --overwrite_output_dir) to record one."
            )
        return cls(path, manifest, dataset)

    def check_compatible(
        self,
        tokenizer: PreTrainedTokenizerBase | None = None,
        dataset: Dataset | None = None,
        teacher: Any = None,
    ) -> None:
        """Raise `ValueError` naming the fingerprint that differs between this cache and what it is used with.

        Args:
            tokenizer (`PreTrainedTokenizerBase`, *optional*): the student's tokenizer / processing class.
            dataset (`datasets.Dataset`, *optional*): the tokenized training set the cache will be attached to.
            teacher (model, `str` or `os.PathLike`, *optional*): the teacher the caller expects. A model or a local
                safetensors folder is compared by :attr:`teacher_fingerprint` (its config and weights, whatever its
                name); a hub id, a `.gguf` file, or any teacher of a cache without a fingerprint, by name.
        """
        problems = []
        if teacher is not None:
            problems.extend(self._teacher_problems(teacher))
        if tokenizer is not None:
            recorded = self.manifest.get("tokenizer_fingerprint")
            if recorded is None:
                logger.warning_once(
                    f"cache {self.path} records no tokenizer fingerprint (made without tokenizer=...); the tokenizer "
                    "cannot be checked."
                )
            else:
                actual = tokenizer_fingerprint(tokenizer)
                if actual != recorded:
                    problems.append(
                        f"tokenizer fingerprint differs ({actual} now, {recorded} in the cache): the cache was made "
                        "with another tokenizer, so its token ids mean other tokens"
                    )
            if len(tokenizer) > self.vocab_size:
                problems.append(f"the tokenizer has {len(tokenizer)} tokens, the cache's vocabulary {self.vocab_size}")
        if dataset is not None:
            actual = dataset_fingerprint(dataset)
            if actual != self.manifest.get("dataset_fingerprint"):
                problems.append(
                    f"dataset fingerprint differs ({actual} now, {self.manifest.get('dataset_fingerprint')} in the "
                    f"cache): the rows (token ids, order or count: {len(dataset)} now, {self.manifest['num_rows']} "
                    "cached) are not the ones the teacher saw"
                )
        if problems:
            raise ValueError(
                f"teacher-logits cache {str(self.path)!r} does not match: "
                + "; ".join(problems)
                + ". Recompute the cache for this teacher/tokenizer/dataset (hf_interop.cache_teacher_logits) or use "
                "the matching ones."
            )

    def check_loss(self, loss_type: str, temperature: float) -> None:
        """Refuse what a sampled cache cannot estimate: its stored probabilities are draw frequencies, an unbiased
        estimate of the teacher for forward KL at the cache's temperature only (reverse KL, JSD and TVD are not
        linear in the teacher's distribution; re-tempering frequencies is not the teacher at another temperature).
        Other caches take every sparse loss at any temperature."""
        if self.sample_draws is not None and (loss_type != "forward_kl" or temperature != self.temperature):
            raise ValueError(
                f"{str(self.path)!r} is a sampled cache (frequencies of {self.sample_draws} draws at temperature "
                f"{self.temperature}): they estimate the teacher without bias for forward KL at that temperature only;"
                f" got loss_type={loss_type!r}, temperature={temperature}. Use loss_type='forward_kl' and "
                f"temperature={self.temperature}, or a compact or float16 cache."
            )

    def _teacher_problems(self, teacher: Any) -> list[str]:
        """Why `teacher` is not the one that made this cache: by fingerprint when both sides have one, else by name."""
        expected = _teacher_identity(teacher, None)
        recorded_name, recorded = self.manifest.get("teacher"), self.teacher_fingerprint
        actual = compute_teacher_fingerprint(teacher, dtype=self.manifest.get("dtype")) if recorded else None
        if recorded is None:
            logger.warning_once(
                f"cache {self.path} records no teacher fingerprint; the teacher is compared by name only."
            )
        if actual is None:
            if expected != recorded_name:
                return [f"teacher differs: the cache was made with {recorded_name!r}, not {expected!r}"]
            return []
        if actual != recorded:
            return [
                f"teacher fingerprint differs ({actual} for {expected!r} now, {recorded} for {recorded_name!r} in "
                f"the cache, run in {self.manifest.get('dtype')}): the teacher's weights or config are not the ones "
                "that made the cache (a retrained or re-saved teacher?)"
            ]
        return []

    def attach(self, dataset: Dataset, include_tail: bool = True) -> Dataset:
        """Return `dataset` with the cache's columns added, row for row (same rows, same order).

        Adds `teacher_topk_ids` and `teacher_topk_logprobs` (one flat list of `(S - 1) * top_k` values per row,
        memory-mapped from the cache) and, with `include_tail`, `teacher_tail_logprob` (`S - 1` float32 values per
        row). The tail is not stored on disk: it is derived here from the stored float16 log-probs and held in
        memory (4 bytes per position, 1/64 of the cache at k=64). With `include_tail=False` nothing is held in
        memory and :meth:`collate` derives the tail per batch instead; the values are identical. The cache columns
        are read as numpy arrays (no per-value Python objects). Call :meth:`check_compatible` first: `attach`
        itself checks only the row count and every row's length.

        Args:
            dataset (`datasets.Dataset`): the tokenized dataset the cache was made from.
            include_tail (`bool`, *optional*, defaults to `True`): add the `teacher_tail_logprob` column.
        """
        import pyarrow.compute as pc
        from datasets import Dataset, concatenate_datasets

        _check_input_ids_column(dataset)
        if len(dataset) != len(self):
            raise ValueError(
                f"dataset has {len(dataset)} rows but cache {str(self.path)!r} has {len(self)}; attach the cache "
                "to the dataset it was made from (check_compatible says what differs)."
            )
        dataset_lengths = _row_lengths(dataset)
        # values per position in the column that says how many positions a row has
        length_column, per_position = (COUNTS_COLUMN, 1) if self.is_compact else (IDS_COLUMN, self.top_k)
        cache_view = self.dataset.select_columns([length_column]).with_format("arrow")
        for start in range(0, len(self), 65536):
            column = cache_view[start : start + 65536].column(length_column).combine_chunks()
            cached = pc.list_value_length(column).to_pylist()
            for offset, value in enumerate(cached):
                row = start + offset
                if value != (dataset_lengths[row] - 1) * per_position:
                    raise ValueError(
                        f"row {row} has {dataset_lengths[row]} tokens but the cache holds "
                        f"{value // per_position} positions for it (expected {dataset_lengths[row] - 1}); the cache "
                        "belongs to another dataset."
                    )
        include_tail = include_tail and not self.is_compact  # a compact cache's collate derives the tail per batch
        added = list(self.stored_columns) + ([TAIL_COLUMN] if include_tail else [])
        clashing = [name for name in (*self.stored_columns, TAIL_COLUMN) if name in dataset.column_names]
        if clashing:
            dataset = dataset.remove_columns(clashing)
        previous_format = dataset.format
        parts = [dataset.with_format(None), self.dataset.with_format(None)]
        if include_tail:
            from datasets.table import InMemoryTable

            parts.append(Dataset(InMemoryTable(self._tail_table())))
        combined = concatenate_datasets(parts, axis=1)
        if previous_format["type"] is None:
            combined = combined.with_format("numpy", columns=added, output_all_columns=True)
        else:
            columns = previous_format["columns"]
            combined = combined.with_format(
                previous_format["type"],
                columns=None if columns is None else [*columns, *added],
                output_all_columns=previous_format["output_all_columns"],
                **previous_format["format_kwargs"],
            )
        return combined

    def _tail_table(self) -> Any:
        """`teacher_tail_logprob` for every row, derived from the stored log-probs, as an in-memory Arrow table."""
        import pyarrow as pa

        k = self.top_k
        pieces = []
        for chunk in self.dataset.data.column(LOGPROBS_COLUMN).chunks:
            offsets = np.asarray(chunk.offsets.to_numpy(zero_copy_only=False), dtype=np.int64)
            values = chunk.flatten().to_numpy(zero_copy_only=False).astype(np.float16)  # a writable copy
            tail = tail_logprob_from_topk(torch.from_numpy(values.reshape(-1, k))).numpy()
            pieces.append(
                pa.LargeListArray.from_arrays(pa.array((offsets - offsets[0]) // k, type=pa.int64()), pa.array(tail))
            )
        column = pa.chunked_array(pieces, type=pa.large_list(pa.float32()))
        return pa.table({TAIL_COLUMN: column})

    def tail_prior_logprobs(self) -> torch.Tensor:
        """The teacher's mean next-token distribution over every cached position, estimated from the cache alone.

        Each cached position contributes its stored top-k probabilities and spreads its tail mass evenly over the
        other `vocab_size - top_k` tokens, so every token gets a probability > 0; the result is their mean. Passed
        as `teacher_tail_prior_logprobs` to the sparse losses (`DistillationConfig.sparse_tail="teacher_marginal"`),
        it shapes the teacher's tail: a token the teacher often ranks high elsewhere gets more of a position's
        tail mass than one it never ranks. Reads every stored log-prob once (computed on the first call, then
        kept on this object).

        Returns:
            `torch.Tensor` of shape `(vocab_size,)`, float32 log-probabilities (they sum to 1 in probability).
        """
        if self._tail_prior is not None:
            return self._tail_prior
        vocab = self.vocab_size
        totals = torch.zeros(vocab, dtype=torch.float64)
        spread = 0.0  # tail mass each token outside a position's top-k receives, summed over positions
        num_positions = 0
        for ids, logprobs in self.decoded_batches():
            if not logprobs.numel():
                continue
            kept = kept_entries(logprobs)
            probs = torch.where(kept, logprobs.double().exp(), 0.0)
            num_positions += probs.shape[0]
            tail_tokens = vocab - kept.sum(-1, keepdim=True).double()
            per_tail_token = torch.where(
                tail_tokens > 0, tail_logprob_from_topk(logprobs).double().exp().unsqueeze(-1) / tail_tokens, 0.0
            )
            spread += float(per_tail_token.sum())
            # a position's kept ids get their probability instead of that position's even share of the tail
            probs = torch.where(kept, probs - per_tail_token, 0.0)
            totals.index_add_(0, ids.reshape(-1), probs.reshape(-1))
        if num_positions == 0:
            raise ValueError(
                f"cache {str(self.path)!r} holds no cached positions; there is no distribution to average."
            )
        mean = (totals + spread).div_(num_positions)
        # a token no position ranked, in a cache whose every tail rounded to 0, would get log(0): floor it
        self._tail_prior = mean.clamp_min_(torch.finfo(torch.float32).tiny).log_().float()
        return self._tail_prior

    def decoded_batches(self) -> Any:
        """Yield the whole cache, one stored record batch at a time, as `(ids (P, top_k) int64, logprobs (P, top_k)
        float32)` tensors over its `P` positions (a sampled cache: `(P, sample_draws)`); entries a compact or sampled
        cache did not keep hold `PAD_LOGPROB`."""
        k = self.max_entries
        for batch in self.dataset.data.to_batches():
            if not self.is_compact:
                ids = batch.column(IDS_COLUMN).flatten().to_numpy(zero_copy_only=False).astype(np.int64)
                values = batch.column(LOGPROBS_COLUMN).flatten().to_numpy(zero_copy_only=False).astype(np.float32)
                yield torch.from_numpy(ids.reshape(-1, k)), torch.from_numpy(values.reshape(-1, k))
                continue
            columns = {}
            for name in self.stored_columns:
                chunk = batch.column(name)
                offsets = np.asarray(chunk.offsets.to_numpy(zero_copy_only=False), dtype=np.int64)
                columns[name] = (offsets - offsets[0], chunk.flatten().to_numpy(zero_copy_only=False))
            _, ids, logprobs = self._decode(columns, width=k)
            yield torch.from_numpy(ids), torch.from_numpy(logprobs)

    def _decode(self, columns: dict[str, Any], width: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        try:
            return decode_dense(
                columns, self.logprob_bits, self.vocab_size, width, PAD_LOGPROB, sample_draws=self.sample_draws
            )
        except DamagedCacheError as error:
            raise ValueError(
                f"cache {str(self.path)!r} is corrupt: a row does not decode ({error}). TeacherLogitsCache.load "
                "(verify_checksums=True) names the damaged shard; recompute it as that error says."
            ) from error

    def _collate_compact(self, features: Sequence[dict[str, Any]], padding_side: str) -> dict[str, torch.Tensor]:
        """`collate` of a compact cache: every row of the batch decoded at once (see `codec.decode_dense`)."""
        columns = {}
        for name in self.stored_columns:
            arrays = [_as_numpy(feature[name]).reshape(-1) for feature in features]
            offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
            np.cumsum([array.shape[0] for array in arrays], out=offsets[1:])
            columns[name] = (offsets, np.concatenate(arrays))
        counts, ids, logprobs = self._decode(columns, width=None)
        tails = tail_logprob_from_topk(torch.from_numpy(logprobs)).numpy()
        positions = np.diff(columns[COUNTS_COLUMN][0])
        width, k = int(positions.max()), ids.shape[1]
        batch_ids = np.zeros((len(features), width, k), dtype=np.int64)
        batch_logprobs = np.full((len(features), width, k), PAD_LOGPROB, dtype=np.float32)
        batch_tails = np.zeros((len(features), width), dtype=np.float32)
        start = 0
        for index, length in enumerate(positions.tolist()):
            window = slice(0, length) if padding_side == "right" else slice(width - length, width)
            batch_ids[index, window] = ids[start : start + length]
            batch_logprobs[index, window] = logprobs[start : start + length]
            batch_tails[index, window] = tails[start : start + length]
            start += length
        return {
            IDS_COLUMN: torch.from_numpy(batch_ids),
            LOGPROBS_COLUMN: torch.from_numpy(batch_logprobs),
            TAIL_COLUMN: torch.from_numpy(batch_tails),
        }

    def collate(self, features: Sequence[dict[str, Any]], padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Stack the cache columns of a batch of rows (from :meth:`attach`) into tensors.

        Rows of different lengths are padded to the longest (on `padding_side`, matching how the data collator
        pads `input_ids`); padded positions get id 0, log-prob `PAD_LOGPROB` (zero probability, finite) and a tail
        log-prob of 0 (all the mass). They carry label -100, so no loss sees them. Rows without a
        `teacher_tail_logprob` value (`attach(include_tail=False)`) get it derived from their log-probs.

        A compact cache (format version 2) is decoded here, every row of the batch at once: `k` is then the largest
        count of kept entries in the batch, and a position keeping fewer fills its other slots with its first id
        and `PAD_LOGPROB` (no mass; the sparse losses leave such entries out).

        Returns:
            `dict` with `teacher_topk_ids` `(B, S-1, k)` int64, `teacher_topk_logprobs` `(B, S-1, k)` float32 and
            `teacher_tail_logprob` `(B, S-1)` float32.
        """
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}.")
        if not features:
            raise ValueError("collate got an empty batch.")
        if self.is_compact:
            missing = [name for name in self.stored_columns if name not in features[0]]
            if missing:
                raise KeyError(
                    f"a batch row has no {missing} (keys: {sorted(features[0])}); attach the cache to the dataset "
                    "(cache.attach(dataset)) and keep its columns through column pruning."
                )
            return self._collate_compact(features, padding_side)
        k = self.top_k
        ids_rows, logprob_rows, tail_rows = [], [], []
        for feature in features:
            if IDS_COLUMN not in feature or LOGPROBS_COLUMN not in feature:
                raise KeyError(
                    f"a batch row has no {IDS_COLUMN!r}/{LOGPROBS_COLUMN!r} (keys: {sorted(feature)}); attach the "
                    "cache to the dataset (cache.attach(dataset)) and keep its columns through column pruning."
                )
            ids_rows.append(_as_numpy(feature[IDS_COLUMN]).reshape(-1, k))
            logprob_rows.append(_as_numpy(feature[LOGPROBS_COLUMN]).reshape(-1, k))
            tail_rows.append(_as_numpy(feature[TAIL_COLUMN]).reshape(-1) if TAIL_COLUMN in feature else None)
        width = max(row.shape[0] for row in ids_rows)
        ids = np.zeros((len(features), width, k), dtype=np.int64)
        logprobs = np.full((len(features), width, k), PAD_LOGPROB, dtype=np.float32)
        tails = np.zeros((len(features), width), dtype=np.float32)
        for index, (row_ids, row_logprobs, row_tail) in enumerate(zip(ids_rows, logprob_rows, tail_rows, strict=True)):
            length = row_ids.shape[0]
            window = slice(0, length) if padding_side == "right" else slice(width - length, width)
            ids[index, window] = row_ids
            logprobs[index, window] = row_logprobs
            if row_tail is None:
                row_tail = tail_logprob_from_topk(torch.from_numpy(np.asarray(row_logprobs, dtype=np.float32))).numpy()
            tails[index, window] = row_tail
        return {
            IDS_COLUMN: torch.from_numpy(ids),
            LOGPROBS_COLUMN: torch.from_numpy(logprobs),
            TAIL_COLUMN: torch.from_numpy(tails),
        }

    def row(self, index: int) -> dict[str, torch.Tensor]:
        """Row `index` as tensors: ids `(S-1, k)` int64, log-probs `(S-1, k)` float32 (exactly the stored float16
        values) and the derived tail `(S-1,)` float32."""
        batch = self.collate([self.dataset.with_format("numpy")[int(index)]])  # derives the tail
        return {key: value[0] for key, value in batch.items()}

    def report(
        self,
        sample_rows: int = 64,
        teacher: Any = None,
        dataset: Dataset | None = None,
        batch_size: int = 4,
        seed: int = 0,
    ) -> dict[str, Any]:
        """Size and quality of the cache.

        Args:
            sample_rows (`int`, *optional*, defaults to 64): rows sampled (seeded) for coverage and KL.
            teacher (model or `str`, *optional*): the teacher; when given (with `dataset`), KL(full || sparse) is
                measured by running it on the sampled rows.
            dataset (`datasets.Dataset`, *optional*): the dataset the cache was made from (needed with `teacher`:
                the cache does not store token ids).
            batch_size (`int`, *optional*, defaults to 4): rows per teacher forward.
            seed (`int`, *optional*, defaults to 0): sampling seed.

        Returns:
            `dict` with `bytes_on_disk` (every file of the folder), `bytes_per_token` (per dataset token),
            `bytes_per_position` (per cached prediction, S-1 per row), `payload_bytes_per_position` (`4 * top_k`
            for uint16 ids), `mean_topk_mass` (mean over sampled positions of the stored top-k probability mass),
            `kl_full_to_sparse` (mean nats per position of KL(p || q), q = stored top-k probabilities plus the tail
            mass spread evenly over the other `vocab_size - top_k` tokens; `None` without teacher),
            `kl_buckets` (KL over the k+1 buckets, i.e. the float16 storage error; `None` without teacher),
            `num_sampled_positions`.
        """
        if sample_rows < 1:
            raise ValueError(f"sample_rows must be >= 1, got {sample_rows}.")
        bytes_on_disk = sum(entry.stat().st_size for entry in self.path.rglob("*") if entry.is_file())
        num_predictions = int(self.manifest["num_predictions"])
        num_tokens = num_predictions + int(self.manifest["num_rows"])
        ids_bytes = 2 if self.manifest["ids_dtype"] == "uint16" else 4
        payload = self.top_k * (ids_bytes + 2)
        if self.is_compact:
            payload = sum(shard["num_bytes"] for shard in self.manifest["shards"]) / num_predictions
        rng = np.random.default_rng(seed)
        sample = sorted(rng.choice(len(self), size=min(sample_rows, len(self)), replace=False).tolist())
        masses, kept = [], []
        for index in sample:
            logprobs = self.row(index)[LOGPROBS_COLUMN]
            masses.append(torch.where(kept_entries(logprobs), logprobs.double().exp(), 0.0).sum(-1))
            kept.append(kept_entries(logprobs).sum(-1))
        all_masses = torch.cat(masses)
        result: dict[str, Any] = {
            "top_k": self.top_k,
            "num_rows": len(self),
            "bytes_on_disk": bytes_on_disk,
            "bytes_per_token": bytes_on_disk / num_tokens,
            "bytes_per_position": bytes_on_disk / num_predictions,
            "payload_bytes_per_position": payload,
            "mean_topk_mass": float(all_masses.mean()),
            "mean_kept_entries": float(torch.cat(kept).double().mean()),
            "kl_full_to_sparse": None,
            "kl_buckets": None,
            "num_sampled_positions": int(all_masses.numel()),
        }
        if teacher is None:
            return result
        if dataset is None:
            raise ValueError(
                "report(teacher=...) also needs dataset=... (the tokenized rows the cache was made from): the cache "
                "stores no token ids."
            )
        self.check_compatible(dataset=dataset)
        if isinstance(teacher, (str, os.PathLike)):
            from ...loading import load_causal_lm

            teacher, _ = load_causal_lm(str(teacher), revision=self.manifest.get("teacher_revision"))
        kl_sum, bucket_kl_sum, count = 0.0, 0.0, 0
        device = _model_device(teacher)
        reading = dataset.select_columns(_token_columns(dataset))
        for batch_start in range(0, len(sample), batch_size):
            indices = sample[batch_start : batch_start + batch_size]
            rows = reading.select(indices)
            input_ids, attention_mask = _rows_batch(rows, 0, len(indices))
            full = _full_logprobs(teacher, input_ids, attention_mask, self.temperature, device)
            for offset, index in enumerate(indices):
                cached = self.row(index)
                length = len(input_ids[offset]) - 1
                kl, bucket_kl = sparse_kl(
                    full[offset, :length],
                    cached[IDS_COLUMN],
                    cached[LOGPROBS_COLUMN],
                    cached[TAIL_COLUMN],
                )
                kl_sum += float(kl.sum())
                bucket_kl_sum += float(bucket_kl.sum())
                count += length
        result["kl_full_to_sparse"] = kl_sum / count
        result["kl_buckets"] = bucket_kl_sum / count
        return result


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        hint = (
            "it is an unfinished cache: rerun cache_teacher_logits with the same arguments to resume it"
            if (path / PLAN_FILE).is_file()
            else "point at a folder written by hf_interop.cache_teacher_logits"
        )
        raise FileNotFoundError(f"teacher-logits cache {str(path)!r} has no {MANIFEST_FILE}; {hint}.")
    try:
        manifest = _read_json(manifest_path)
    except json.JSONDecodeError as error:
        raise ValueError(f"{manifest_path} is not valid JSON ({error}); recompute the cache.") from error
    if manifest.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise ValueError(
            f"teacher-logits cache {str(path)!r} has format_version {manifest.get('format_version')!r} "
            f"({manifest_path}); this hf_interop reads versions {list(READABLE_FORMAT_VERSIONS)}. Upgrade "
            "hf_interop to read it, or recompute the cache with this version (cache_teacher_logits, overwrite=True)."
        )
    return manifest


def _stored_columns(manifest: dict[str, Any]) -> tuple[str, ...]:
    if int(manifest["format_version"]) in ENCODED_FORMAT_VERSIONS:
        return compact_columns(manifest.get("logprob_bits"), manifest.get("sample_draws"))
    return (IDS_COLUMN, LOGPROBS_COLUMN)


def _check_compact_counts(path: Path, shard: dict[str, Any], part: Any, top_k: int) -> None:
    """An encoded shard's kept counts: none above `top_k` (a sampled one's: `sample_draws`), summing to the entries
    its writer recorded (cheap: one byte per position; the checksum covers every byte, this catches a shard that
    decodes to other rows)."""
    counts = part.data.column(COUNTS_COLUMN).combine_chunks().flatten().to_numpy(zero_copy_only=False)
    largest = int(counts.max(initial=0))
    total = int(counts.sum(dtype=np.int64))
    if largest > top_k or total != shard.get("num_entries", total):
        raise ValueError(
            f"shard {shard['name']} of cache {str(path)!r} is corrupt: its positions keep {total} entries (at most "
            f"{largest} per position), its shard.json says {shard.get('num_entries')} (at most {top_k}); "
            f"{_recompute(path, shard)}."
        )


def _recompute(path: Path, shard: dict[str, Any]) -> str:
    """How to recompute one shard of a finished cache (the writer resumes a cache without that shard and manifest)."""
    return (
        f"recompute it: delete the folder {path / shard['name']} and {path / MANIFEST_FILE}, then rerun "
        "cache_teacher_logits (CLI: hf-interop cache-teacher) with the same arguments, which computes only the "
        "missing shard"
    )


def _verify_checksums(path: Path, shards: list[dict[str, Any]]) -> None:
    """Compare every shard's sha256 with the manifest's, several shards at a time (hashlib releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    files = [path / shard["name"] / SHARD_DATA_FILE for shard in shards]
    with ThreadPoolExecutor(max_workers=max(1, min(len(files), os.cpu_count() or 1, 8))) as pool:
        digests = list(pool.map(_sha256_file, files))
    for shard, data_path, digest in zip(shards, files, digests, strict=True):
        if digest != shard["sha256"]:
            raise ValueError(
                f"shard {shard['name']} of cache {str(path)!r} is corrupt: its sha256 differs from the manifest "
                f"({data_path} changed on disk after it was written, so its teacher log-probs or token ids are not "
                f"the teacher's); {_recompute(path, shard)}."
            )


def _as_numpy(value: Any) -> Any:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _full_logprobs(
    teacher: Any, input_ids: list[list[int]], attention_mask: list[list[int]] | None, temperature: float, device: Any
) -> torch.Tensor:
    ids_tensor, mask_tensor = _padded_batch(input_ids, attention_mask)
    with torch.no_grad():
        logits = teacher(input_ids=ids_tensor.to(device), attention_mask=mask_tensor.to(device)).logits
    return torch.log_softmax(logits[:, :-1].double().cpu() / temperature, dim=-1)


def sparse_kl(
    full_logprobs: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logprob: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(full || sparse) per position, in float64.

    The sparse distribution puts the stored probabilities on the top-k ids and spreads the tail mass evenly over
    the other `V - k` ids (the least informative completion). Also returns the KL over the k+1 buckets (top-k ids
    and the tail), which only measures the float16 storage error.

    Args:
        full_logprobs (`torch.Tensor`): `(N, V)` teacher log-probabilities.
        topk_ids (`torch.Tensor`): `(N, k)` cached ids.
        topk_logprobs (`torch.Tensor`): `(N, k)` cached log-probabilities.
        tail_logprob (`torch.Tensor`): `(N,)` cached tail log-mass.

    Returns:
        `(kl, bucket_kl)`, each `(N,)` float64.
    """
    full = full_logprobs.double()
    vocab_size = full.shape[-1]
    # entries that hold no mass (PAD_LOGPROB, -inf: not kept by a compact cache, missing) are left out
    kept = kept_entries(topk_logprobs)
    rest = vocab_size - kept.sum(-1).double()
    fill = torch.where(rest > 0, tail_logprob.double() - rest.clamp(min=1).log(), -math.inf)
    sparse = fill[:, None].expand_as(full).clone()
    # left-out entries take the value of a kept entry of theirs (the top one), so duplicate ids agree
    top_index = topk_logprobs.argmax(-1, keepdim=True)
    ids = torch.where(kept, topk_ids.long(), topk_ids.long().gather(-1, top_index))
    values = torch.where(kept, topk_logprobs.double(), topk_logprobs.double().gather(-1, top_index))
    sparse.scatter_(-1, ids, values)
    p = full.exp()
    kl = torch.where(p > 0, p * (full - sparse), torch.zeros_like(p)).sum(-1)
    p_top = torch.where(kept, full.gather(-1, ids), -math.inf)
    p_tail_mass = (1.0 - p_top.exp().sum(-1)).clamp(min=0.0)
    bucket_top = torch.where(p_top.exp() > 0, p_top.exp() * (p_top - topk_logprobs.double()), torch.zeros_like(p_top))
    bucket_tail = torch.where(
        p_tail_mass > 0, p_tail_mass * (p_tail_mass.clamp(min=1e-300).log() - tail_logprob.double()), 0.0
    )
    return kl, bucket_top.sum(-1) + bucket_tail
