"""Offline teacher logits: exactness, alignment, robust writing (resume, several processes), refusals."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from hf_interop import TeacherLogitsCache, load_causal_lm
from hf_interop import cache_teacher_logits as _cache_teacher_logits
from hf_interop.distill.teacher_cache import (
    IDS_COLUMN,
    LOGPROBS_COLUMN,
    PAD_LOGPROB,
    TAIL_COLUMN,
    dataset_fingerprint,
    logprobs_to_float16_round_down,
    tail_logprob_from_topk,
    tokenizer_fingerprint,
)
from hf_interop.distill.teacher_cache import writer as cache_writer


def cache_teacher_logits(*args, **kwargs):
    """Format version 1 (float16) unless a test names another encoding: what this file tests."""
    kwargs.setdefault("encoding", "float16")
    return _cache_teacher_logits(*args, **kwargs)


WORKER = Path(__file__).resolve().parents[1] / "cache_worker.py"  # tests/cache_worker.py
ONE_FP16_STEP = 2.0**-10  # relative spacing of float16 values (10 mantissa bits)


class CountingTeacher(torch.nn.Module):
    """Wraps a causal LM; counts forward passes and raises at the `fail_at`-th one (a crash inside the loop)."""

    def __init__(self, model, fail_at: int | None = None):
        super().__init__()
        self.model = model
        self.config = model.config
        self.calls = 0
        self.fail_at = fail_at

    def forward(self, **kwargs):
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise RuntimeError("simulated crash inside the caching loop")
        return self.model(**kwargs)


class NextTokenOracle(torch.nn.Module):
    """A 'teacher' that reads the whole row and puts almost all mass at position i on input_ids[i + 1]."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size)

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.config.vocab_size)
        logits[:, :-1].scatter_(-1, input_ids[:, 1:, None], 20.0)
        return SimpleNamespace(logits=logits)


def _reference_topk(model, dataset, rows, top_k, temperature=1.0):
    """The teacher's own float32 top-k on one batch of `rows` (the same batch the cache computed)."""
    batch = dataset.select(rows)
    input_ids = torch.tensor(batch["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
    logprobs = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    values, ids = logprobs.topk(top_k, dim=-1)
    return values, ids, logprobs


def _shard_bytes(folder: Path) -> dict[str, bytes]:
    return {path.parent.name: path.read_bytes() for path in sorted(folder.glob("shard-*/data.arrow"))}


@pytest.fixture(scope="module")
def tiny_teacher(tiny_model_dirs):
    model, tokenizer = load_causal_lm(tiny_model_dirs["llama"], dtype="float32")
    return model, tokenizer


@pytest.fixture(scope="module")
def blocks(packed_corpus):
    """24 validation blocks of 64 tokens (corpus tokenizer)."""
    return packed_corpus["validation"].select(range(24))


@pytest.fixture(scope="module")
def blocks_dir(tmp_path_factory, blocks):
    folder = tmp_path_factory.mktemp("blocks")
    blocks.save_to_disk(folder)
    return folder


@pytest.fixture(scope="module")
def single_process_cache(tmp_path_factory, tiny_teacher, blocks):
    """The reference: one process, one thread, same arguments as tests/cache_worker.py."""
    model, tokenizer = tiny_teacher
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cache_teacher_logits(
            model,
            blocks,
            tmp_path_factory.mktemp("single") / "cache",
            top_k=8,
            batch_size=2,
            shard_size=4,
            tokenizer=tokenizer,
            teacher_name_or_path="tiny-llama",
            show_progress=False,
        )
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------------
# Exactness, layout, size
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_round_trip_matches_the_teachers_own_topk(tmp_path, monkeypatch, tiny_teacher, blocks, temperature):
    model, tokenizer = tiny_teacher
    if temperature == 2.0:
        # small log-softmax chunks (13 per row, the last partial) and one Arrow record batch per row
        monkeypatch.setattr(cache_writer, "_POSITIONS_PER_CHUNK", 5)
        monkeypatch.setattr(cache_writer, "_FLUSH_BYTES", 1)
    cache = cache_teacher_logits(
        model, blocks, tmp_path / "cache", top_k=16, temperature=temperature, batch_size=4, shard_size=8,
        tokenizer=tokenizer, show_progress=False, encoding="float16",  # format version 1 (compact: test_compact_cache)
    )  # fmt: skip
    assert len(cache) == len(blocks)
    values, ids, full = _reference_topk(model, blocks, range(4, 8), top_k=16, temperature=temperature)
    for offset, row in enumerate(range(4, 8)):
        cached = cache.row(row)
        assert torch.equal(cached[IDS_COLUMN], ids[offset])
        stored = cached[LOGPROBS_COLUMN].double()
        # rounded toward -inf, by at most one float16 step
        assert (stored <= values[offset].double()).all()
        assert ((values[offset].double() - stored) <= values[offset].double().abs() * ONE_FP16_STEP + 1e-7).all()
        # the derived tail is the float64 complement of what is stored, and close to the teacher's true tail
        true_tail_mass = 1.0 - full[offset].double().exp().gather(-1, ids[offset]).sum(-1)
        tail_mass = cached[TAIL_COLUMN].double().exp()
        assert (tail_mass >= true_tail_mass - 1e-6).all()
        torch.testing.assert_close(tail_mass, true_tail_mass, atol=2e-3, rtol=0)
        torch.testing.assert_close(tail_mass + stored.exp().sum(-1), torch.ones_like(tail_mass), atol=1e-6, rtol=0)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    for key, expected in {
        "top_k": 16, "temperature": temperature, "vocab_size": model.config.vocab_size, "num_rows": 24,
        "seq_length": 64, "ids_dtype": "uint16", "logprobs_dtype": "float16", "dtype": "float32", "num_shards": 3,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "dataset_fingerprint": dataset_fingerprint(blocks),
    }.items():  # fmt: skip
        assert manifest[key] == expected, key
    assert "teacher" in manifest and "teacher_revision" in manifest
    assert [shard["name"] for shard in manifest["shards"]] == ["shard-00000", "shard-00001", "shard-00002"]
    # stored types on disk, memory-mapped on read
    schema = cache.dataset.data.schema
    assert str(schema.field(IDS_COLUMN).type) == "large_list<item: uint16>"
    assert str(schema.field(LOGPROBS_COLUMN).type) == "large_list<item: halffloat>"
    assert all(Path(entry["filename"]).name == "data.arrow" for entry in cache.dataset.cache_files)
    assert len(cache.dataset.cache_files) == 3


def test_size_is_4k_bytes_per_position_plus_little_arrow_overhead(tmp_path, tiny_teacher, blocks):
    model, tokenizer = tiny_teacher
    cache = cache_teacher_logits(
        model, blocks, tmp_path / "cache", top_k=64, batch_size=8, shard_size=24, tokenizer=tokenizer,
        show_progress=False, encoding="float16",
    )  # fmt: skip
    data_bytes = (tmp_path / "cache" / "shard-00000" / "data.arrow").stat().st_size
    payload = 24 * 63 * 64 * (2 + 2)
    # Arrow: one int64 offset per row and column, schema and batch headers; nothing per token
    assert payload < data_bytes <= payload + 24 * 2 * 8 + 2048
    report = cache.report(sample_rows=4)
    assert report["payload_bytes_per_position"] == 256
    # every file of the folder (manifest and plan included) per dataset token
    assert report["bytes_per_token"] <= 256
    assert report["bytes_per_position"] < 256 * 1.02


def test_int32_ids_when_the_vocabulary_exceeds_uint16(tmp_path):
    rows = Dataset.from_dict({"input_ids": [[69_999, 5, 68_000, 7, 9], [1, 2, 3, 4, 66_000]]})
    cache = cache_teacher_logits(
        NextTokenOracle(70_000), rows, tmp_path / "cache", top_k=4, show_progress=False, encoding="float16"
    )
    assert cache.manifest["ids_dtype"] == "int32"
    assert str(cache.dataset.data.schema.field(IDS_COLUMN).type) == "large_list<item: int32>"
    # ids above 65,535 survive storage (uint16 would wrap them)
    assert cache.row(0)[IDS_COLUMN][:, 0].tolist() == [5, 68_000, 7, 9]
    assert cache.row(1)[IDS_COLUMN][:, 0].tolist() == [2, 3, 4, 66_000]


def test_float16_round_down_and_tail_properties():
    values = torch.tensor([-1e-9, -0.0, 0.0, -0.3333, -5.123456, -17.77, -70_000.0, -math.inf])
    half = logprobs_to_float16_round_down(values)
    assert half.dtype == torch.float16
    assert (half.float() <= values.clamp(max=0)).all()
    finite = torch.isfinite(values) & (values > -65_504)
    assert ((values - half.float())[finite] <= values[finite].abs() * ONE_FP16_STEP + 6e-8).all()
    # a distribution whose top-k is everything: the derived tail stays finite and tiny
    logprobs = torch.log_softmax(torch.randn(3, 10, dtype=torch.float64), -1)
    tail = tail_logprob_from_topk(logprobs_to_float16_round_down(logprobs))
    assert torch.isfinite(tail).all() and (tail.exp() < 1e-2).all()
    # float64 reference for a partial top-k
    top = logprobs.topk(4, -1).values
    expected = torch.log1p(-top.exp().sum(-1))
    torch.testing.assert_close(tail_logprob_from_topk(top), expected.float())


def test_an_ensemble_works_as_teacher(tmp_path, tiny_model_dirs, blocks):
    from hf_interop import EnsembleForCausalLM

    first, tokenizer = load_causal_lm(tiny_model_dirs["llama"], dtype="float32")
    second, _ = load_causal_lm(tiny_model_dirs["qwen2"], dtype="float32", load_tokenizer_too=False)
    ensemble = EnsembleForCausalLM.from_members([(first, tokenizer), (second, tokenizer)], [0.3, 0.7], "mixture")
    rows = blocks.select(range(4))
    cache = cache_teacher_logits(
        ensemble, rows, tmp_path / "cache", top_k=8, batch_size=4, tokenizer=tokenizer,
        teacher_name_or_path="mixture(llama, qwen2)", show_progress=False, encoding="float16",
    )  # fmt: skip
    assert cache.manifest["teacher"] == "mixture(llama, qwen2)"
    assert cache.manifest["teacher_class"] == "EnsembleForCausalLM"
    input_ids = torch.tensor(rows["input_ids"])
    with torch.no_grad():
        first_p = torch.softmax(first(input_ids=input_ids).logits[:, :-1].double(), -1)
        second_p = torch.softmax(second(input_ids=input_ids).logits[:, :-1].double(), -1)
    mixture = 0.3 * first_p + 0.7 * second_p  # float64 reference of the ensemble's distribution
    for row in range(4):
        cached = cache.row(row)
        reference = mixture[row].gather(-1, cached[IDS_COLUMN]).log()
        stored = cached[LOGPROBS_COLUMN].double()
        # within one float16 step below the float64 mixture (float32 rounding of the teacher aside)
        assert ((reference - stored) <= reference.abs() * ONE_FP16_STEP + 1e-5).all()
        assert (stored <= reference + 1e-5).all()
        assert torch.equal(cached[IDS_COLUMN][:, 0], mixture[row].argmax(-1))


# ----------------------------------------------------------------------------------------------------------------
# Alignment, attach, collate
# ----------------------------------------------------------------------------------------------------------------


def test_cache_lines_up_with_the_trainers_shifted_labels(tmp_path, blocks):
    oracle = NextTokenOracle(vocab_size=512)
    cache = cache_teacher_logits(oracle, blocks, tmp_path / "cache", top_k=4, batch_size=8, show_progress=False)
    attached = cache.attach(blocks)
    features = [attached[index] for index in range(5)]
    batch = cache.collate(features)
    labels = torch.tensor([feature["labels"] for feature in features])
    # position i of the cache predicts labels[:, i + 1]: the trainer's `labels[:, 1:]` (the compact encoding stores a
    # position's ids in increasing id order, so its most likely id is found by the log-probs, not the slot)
    top = batch[LOGPROBS_COLUMN].argmax(-1, keepdim=True)
    assert torch.equal(batch[IDS_COLUMN].gather(-1, top)[..., 0], labels[:, 1:])
    assert not torch.equal(batch[IDS_COLUMN].gather(-1, top)[..., 0], labels[:, :-1])
    assert (batch[LOGPROBS_COLUMN].max(-1).values > -1e-3).all()


def test_attach_and_collate_shapes_dtypes_and_order(single_process_cache, blocks):
    cache = single_process_cache
    attached = cache.attach(blocks)
    assert len(attached) == len(blocks)
    assert attached["input_ids"] == blocks["input_ids"]  # same rows, same order, other columns untouched
    assert set(cache.columns) <= set(attached.column_names)
    batch = cache.collate([attached[2], attached[9], attached[17]])
    assert batch[IDS_COLUMN].shape == (3, 63, 8) and batch[IDS_COLUMN].dtype == torch.int64
    assert batch[LOGPROBS_COLUMN].shape == (3, 63, 8) and batch[LOGPROBS_COLUMN].dtype == torch.float32
    assert batch[TAIL_COLUMN].shape == (3, 63) and batch[TAIL_COLUMN].dtype == torch.float32
    assert torch.equal(batch[IDS_COLUMN][1], cache.row(9)[IDS_COLUMN])
    assert torch.equal(batch[LOGPROBS_COLUMN][2], cache.row(17)[LOGPROBS_COLUMN])
    # the columns survive the Trainer's column pruning (remove_columns keeps our numpy format)
    pruned = attached.remove_columns(["attention_mask"])
    assert cache.collate([pruned[0]])[IDS_COLUMN].shape == (1, 63, 8)
    # without the in-memory tail column, collate derives the very same tail
    lean = cache.attach(blocks, include_tail=False)
    assert TAIL_COLUMN not in lean.column_names
    lean_batch = cache.collate([lean[2], lean[9], lean[17]])
    for key in (IDS_COLUMN, LOGPROBS_COLUMN, TAIL_COLUMN):
        assert torch.equal(lean_batch[key], batch[key]), key
    torch.testing.assert_close(
        batch[TAIL_COLUMN], torch.log1p(-batch[LOGPROBS_COLUMN].double().exp().sum(-1)).float(), atol=1e-6, rtol=1e-6
    )
    with pytest.raises(ValueError, match="rows"):
        cache.attach(blocks.select(range(5)))
    with pytest.raises(KeyError, match="attach the cache"):
        cache.collate([blocks[0]])


def test_variable_length_rows_are_padded_like_the_inputs(tmp_path, tiny_teacher):
    model, _ = tiny_teacher
    rows = Dataset.from_dict({"input_ids": [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18], [3, 4, 5]]})
    cache = cache_teacher_logits(
        model, rows, tmp_path / "cache", top_k=4, batch_size=3, show_progress=False, encoding="float16"
    )
    assert cache.manifest["seq_length"] is None and cache.manifest["max_seq_length"] == 9
    for side, attached in (("right", cache.attach(rows)), ("left", cache.attach(rows, include_tail=False))):
        batch = cache.collate([attached[0], attached[1], attached[2]], padding_side=side)
        assert batch[IDS_COLUMN].shape == (3, 8, 4)
        real = slice(0, 2) if side == "right" else slice(6, 8)
        padded = slice(2, 8) if side == "right" else slice(0, 6)
        assert torch.equal(batch[LOGPROBS_COLUMN][2, real], cache.row(2)[LOGPROBS_COLUMN])
        assert (batch[LOGPROBS_COLUMN][2, padded] == PAD_LOGPROB).all()
        assert (batch[TAIL_COLUMN][2, padded] == 0).all()  # all the mass in the tail, finite
    # right padding inside one batch does not change the cached values of the shorter rows
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([rows[2]["input_ids"]])).logits[0, :-1]
    assert torch.equal(cache.row(2)[IDS_COLUMN], torch.log_softmax(alone, -1).topk(4, -1).indices)


# ----------------------------------------------------------------------------------------------------------------
# Robust writing: several processes, resume after a killed run, reuse, overwrite
# ----------------------------------------------------------------------------------------------------------------


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def test_two_processes_split_shards_with_no_row_missing_or_repeated(
    tmp_path, tiny_model_dirs, blocks_dir, single_process_cache
):
    output = tmp_path / "cache"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(WORKER), str(tiny_model_dirs["llama"]), str(blocks_dir), str(output),
    ]  # fmt: skip
    result = subprocess.run(command, env=_worker_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["num_processes"] == 2
    ranges = [(shard["start"], shard["end"]) for shard in manifest["shards"]]
    assert ranges == [(start, start + 4) for start in range(0, 24, 4)]  # every row once, in order
    # byte-identical to one process computing everything
    assert _shard_bytes(output) == _shard_bytes(single_process_cache.path)
    loaded = TeacherLogitsCache.load(output)
    assert len(loaded) == 24
    assert loaded.manifest["dataset_fingerprint"] == single_process_cache.manifest["dataset_fingerprint"]


def test_resume_after_a_killed_run_recomputes_nothing_and_matches(
    tmp_path, tiny_model_dirs, tiny_teacher, blocks, blocks_dir, single_process_cache
):
    output = tmp_path / "cache"
    # SIGKILL right before the 6th forward: shards 0 and 1 (2 forwards each) are complete, shard 2 is half done
    command = [sys.executable, str(WORKER), str(tiny_model_dirs["llama"]), str(blocks_dir), str(output)]
    result = subprocess.run(
        [*command, "--kill_after_forwards", "6"], env=_worker_env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert sorted(path.name for path in output.glob("shard-*")) == ["shard-00000", "shard-00001"]
    assert not (output / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="resume"):
        TeacherLogitsCache.load(output)

    model, tokenizer = tiny_teacher
    counting = CountingTeacher(model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        resumed = cache_teacher_logits(
            counting, blocks, output, top_k=8, batch_size=2, shard_size=4, tokenizer=tokenizer,
            teacher_name_or_path="tiny-llama", show_progress=False,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert counting.calls == 8  # shards 2..5 only, 2 forwards each
    assert not list(output.glob(".tmp-*"))  # the killed run's half shard was cleaned up
    assert len(resumed) == 24
    assert _shard_bytes(output) == _shard_bytes(single_process_cache.path)


def test_a_complete_cache_is_reused_and_overwrite_recomputes(tmp_path, tiny_teacher, blocks):
    model, tokenizer = tiny_teacher
    rows = blocks.select(range(4))
    counting = CountingTeacher(model)
    kwargs = dict(top_k=4, batch_size=4, tokenizer=tokenizer, show_progress=False, teacher_name_or_path="t")
    cache_teacher_logits(counting, rows, tmp_path / "cache", **kwargs)
    assert counting.calls == 1
    again = cache_teacher_logits(counting, rows, tmp_path / "cache", **kwargs)
    assert counting.calls == 1 and len(again) == 4
    cache_teacher_logits(counting, rows, tmp_path / "cache", overwrite=True, **kwargs)
    assert counting.calls == 2


def test_resume_into_a_cache_of_another_teacher_is_refused_untouched(tmp_path, tiny_teacher, blocks):
    model, tokenizer = tiny_teacher
    rows = blocks.select(range(8))
    crashing = CountingTeacher(model, fail_at=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cache_teacher_logits(
            crashing, rows, tmp_path / "cache", top_k=4, batch_size=4, shard_size=4, tokenizer=tokenizer,
            teacher_name_or_path="teacher-a", show_progress=False,
        )  # fmt: skip
    before = {path.name: path.stat().st_mtime_ns for path in (tmp_path / "cache").iterdir()}
    other = CountingTeacher(model)
    with pytest.raises(ValueError, match="teacher: 'teacher-a' in the folder, 'teacher-b' now"):
        cache_teacher_logits(
            other, rows, tmp_path / "cache", top_k=4, batch_size=4, shard_size=4, tokenizer=tokenizer,
            teacher_name_or_path="teacher-b", show_progress=False,
        )  # fmt: skip
    assert other.calls == 0
    assert {path.name: path.stat().st_mtime_ns for path in (tmp_path / "cache").iterdir()} == before


# ----------------------------------------------------------------------------------------------------------------
# Fingerprints and refusals
# ----------------------------------------------------------------------------------------------------------------


def test_fingerprints_are_content_hashes(corpus_tokenizer, corpus_tokenizer_dir, tiny_model_dirs, blocks):
    from transformers import AutoTokenizer

    ids = blocks["input_ids"]
    # two in-memory datasets with the same content (random datasets fingerprints) and other integer widths agree
    as_int32 = Dataset.from_dict({"input_ids": ids}).cast_column("input_ids", blocks.features["input_ids"])
    rebuilt = Dataset.from_dict({"input_ids": [list(map(int, row)) for row in ids], "labels": ids})
    assert dataset_fingerprint(blocks) == dataset_fingerprint(as_int32) == dataset_fingerprint(rebuilt)
    changed = [list(row) for row in ids]
    changed[7][30] = (changed[7][30] + 1) % 512
    assert dataset_fingerprint(Dataset.from_dict({"input_ids": changed})) != dataset_fingerprint(blocks)
    assert dataset_fingerprint(blocks.select(range(23, -1, -1))) != dataset_fingerprint(blocks)  # order matters
    masked = blocks.map(lambda row: {"attention_mask": [1] * 60 + [0] * 4})
    assert dataset_fingerprint(masked) != dataset_fingerprint(blocks)

    reloaded = AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])
    reloaded(["padding changes runtime state only"], padding="max_length", max_length=12, truncation=True)
    assert tokenizer_fingerprint(reloaded) == tokenizer_fingerprint(corpus_tokenizer)
    extended = AutoTokenizer.from_pretrained(corpus_tokenizer_dir)
    extended.add_tokens(["<new_token>"])
    assert tokenizer_fingerprint(extended) != tokenizer_fingerprint(corpus_tokenizer)


def test_check_compatible_says_which_fingerprint_differs(single_process_cache, corpus_tokenizer_dir, blocks):
    from transformers import AutoTokenizer

    cache = single_process_cache
    cache.check_compatible(tokenizer=AutoTokenizer.from_pretrained(corpus_tokenizer_dir), dataset=blocks)
    cache.check_compatible(teacher="tiny-llama")
    other_tokenizer = AutoTokenizer.from_pretrained(corpus_tokenizer_dir)
    other_tokenizer.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="tokenizer fingerprint differs") as error:
        cache.check_compatible(tokenizer=other_tokenizer, dataset=blocks)
    assert "dataset fingerprint" not in str(error.value)
    with pytest.raises(ValueError, match="dataset fingerprint differs") as error:
        cache.check_compatible(dataset=blocks.select(range(1, 24)).add_item(blocks[0]))
    assert "tokenizer fingerprint" not in str(error.value)
    with pytest.raises(ValueError, match="teacher differs: the cache was made with 'tiny-llama', not 'other/model'"):
        cache.check_compatible(teacher="other/model")


def _break_shard(cache_dir: Path, name: str, how: str) -> None:
    path = cache_dir / name / "data.arrow"
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:  # same size, garbled payload
        data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
        path.write_bytes(bytes(data))


def test_truncated_or_corrupt_shard_is_named(tmp_path, single_process_cache):
    import shutil

    copy = tmp_path / "cache"
    shutil.copytree(single_process_cache.path, copy)
    TeacherLogitsCache.load(copy, verify_checksums=True)
    _break_shard(copy, "shard-00003", "truncate")
    with pytest.raises(ValueError, match="shard shard-00003 .* truncated or corrupt"):
        TeacherLogitsCache.load(copy)
    shutil.rmtree(copy)
    shutil.copytree(single_process_cache.path, copy)
    _break_shard(copy, "shard-00001", "garble")
    with pytest.raises(ValueError, match="shard shard-00001 .* sha256 differs"):
        TeacherLogitsCache.load(copy, verify_checksums=True)
    shutil.rmtree(copy / "shard-00004")
    with pytest.raises(ValueError, match="shard shard-00004 .* missing"):
        TeacherLogitsCache.load(copy)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_k": 0}, r"top_k must be an integer >= 1, got 0"),
        ({"top_k": 513}, r"top_k=513 is larger than the teacher's vocabulary \(512\)"),
        ({"temperature": 0.0}, r"temperature must be a finite number > 0, got 0.0"),
        ({"temperature": -1.0}, r"temperature must be a finite number > 0, got -1.0"),
        ({"temperature": float("nan")}, r"temperature must be a finite number > 0, got nan"),
        ({"shard_size": 0}, r"shard_size must be an integer >= 1, got 0"),
    ],
)
def test_bad_arguments_fail_before_any_forward_pass(tmp_path, tiny_teacher, blocks, kwargs, message):
    model, _ = tiny_teacher
    counting = CountingTeacher(model)
    with pytest.raises(ValueError, match=message):
        cache_teacher_logits(counting, blocks, tmp_path / "cache", show_progress=False, **kwargs)
    assert counting.calls == 0
    assert not (tmp_path / "cache").exists()


def test_bad_arguments_of_a_teacher_given_by_path(tmp_path, tiny_model_dirs, blocks):
    with pytest.raises(ValueError, match=r"top_k=1000 is larger than the teacher's vocabulary \(512\)"):
        cache_teacher_logits(str(tiny_model_dirs["llama"]), blocks, tmp_path / "cache", top_k=1000)
    with pytest.raises(ValueError, match="no 'input_ids' column"):
        cache_teacher_logits(str(tiny_model_dirs["llama"]), blocks.remove_columns("input_ids"), tmp_path / "c2")
    with pytest.raises(ValueError, match="row 1 has 1 token"):
        cache_teacher_logits(
            str(tiny_model_dirs["llama"]), Dataset.from_dict({"input_ids": [[1, 2], [3]]}), tmp_path / "c3"
        )


def test_an_output_folder_holding_something_else_is_refused_and_untouched(tmp_path, tiny_teacher, blocks):
    model, _ = tiny_teacher
    counting = CountingTeacher(model)
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    (folder / "shard-00000").mkdir()
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="not a teacher-logits cache; nothing was changed"):
            cache_teacher_logits(counting, blocks, folder, overwrite=overwrite, show_progress=False)
    assert sorted(path.name for path in folder.iterdir()) == ["notes.txt", "shard-00000"]
    assert (folder / "notes.txt").read_text() == "keep me"
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(FileExistsError, match="holds a file"):
        cache_teacher_logits(counting, blocks, a_file, show_progress=False)
    assert a_file.read_text() == "x" and counting.calls == 0


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def test_report_matches_a_float64_reference(tmp_path, tiny_teacher, blocks):
    model, tokenizer = tiny_teacher
    rows = blocks.select(range(6))
    cache = cache_teacher_logits(model, rows, tmp_path / "cache", top_k=32, tokenizer=tokenizer, show_progress=False)
    report = cache.report(sample_rows=6, teacher=model, dataset=rows)
    _, _, full = _reference_topk(model, rows, range(6), top_k=32)
    full = full.double()
    masses, kls = [], []
    for index in range(6):
        cached = cache.row(index)
        stored = cached[LOGPROBS_COLUMN].double()
        masses.append(stored.exp().sum(-1))
        # naive reconstruction: stored top-k probabilities, tail spread evenly over the other V - k tokens
        tail = 1.0 - stored.exp().sum(-1)
        sparse = (tail / (512 - 32))[:, None].repeat(1, 512)
        sparse.scatter_(-1, cached[IDS_COLUMN], stored.exp())
        p = full[index].exp()
        kls.append((p * (p.log() - sparse.log())).sum(-1))
    assert report["mean_topk_mass"] == pytest.approx(float(torch.cat(masses).mean()), rel=1e-9)
    assert report["kl_full_to_sparse"] == pytest.approx(float(torch.cat(kls).mean()), rel=1e-4)
    assert 0 < report["kl_buckets"] < 1e-4 < report["kl_full_to_sparse"]
    assert report["num_sampled_positions"] == 6 * 63
    assert report["bytes_on_disk"] == sum(p.stat().st_size for p in cache.path.rglob("*") if p.is_file())
    with pytest.raises(ValueError, match="also needs dataset"):
        cache.report(teacher=model)


# ----------------------------------------------------------------------------------------------------------------
# The real teacher
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_smollm2_teacher_round_trip_alignment_and_resume(tmp_path, smollm2, corpus, corpus_tokenizer):
    from hf_interop import pack_dataset

    teacher, tokenizer = smollm2
    rows = pack_dataset(corpus["validation"], tokenizer, block_size=64, max_blocks=4)
    kwargs = dict(top_k=64, batch_size=2, shard_size=2, tokenizer=tokenizer, show_progress=False, encoding="float16")

    # a crash inside the loop after the first shard, then a resume that computes only the rest
    with pytest.raises(RuntimeError, match="simulated crash"):
        cache_teacher_logits(CountingTeacher(teacher, fail_at=2), rows, tmp_path / "resumed", **kwargs)
    assert sorted(path.name for path in (tmp_path / "resumed").glob("shard-*")) == ["shard-00000"]
    counting = CountingTeacher(teacher)
    resumed = cache_teacher_logits(counting, rows, tmp_path / "resumed", **kwargs)
    assert counting.calls == 1
    straight = cache_teacher_logits(teacher, rows, tmp_path / "straight", **kwargs)
    assert _shard_bytes(resumed.path) == _shard_bytes(straight.path)
    assert straight.manifest["vocab_size"] == 49_152 and straight.manifest["ids_dtype"] == "uint16"

    # round trip: the stored values are the teacher's own top-64 from a fresh forward of the same batch
    values, ids, _ = _reference_topk(teacher, rows, [2, 3], top_k=64)
    for offset, row in enumerate([2, 3]):
        cached = straight.row(row)
        assert torch.equal(cached[IDS_COLUMN], ids[offset])
        torch.testing.assert_close(
            cached[LOGPROBS_COLUMN], values[offset].half().float(), atol=0.02, rtol=ONE_FP16_STEP
        )
        assert (cached[LOGPROBS_COLUMN].double() <= values[offset].double()).all()

    # alignment: the teacher's top-1 at cache position i is the trainer's label i + 1 far more often than not
    attached = straight.attach(rows)
    batch = straight.collate([attached[index] for index in range(4)])
    labels = torch.tensor(rows["labels"])
    top1 = batch[IDS_COLUMN][:, :, 0]
    shifted = (top1 == labels[:, 1:]).float().mean()
    unshifted = (top1 == labels[:, :-1]).float().mean()
    assert shifted > 0.2 and shifted > 3 * unshifted

    report = straight.report(sample_rows=2, teacher=teacher, dataset=rows)
    assert 0.7 < report["mean_topk_mass"] < 1.0
    assert 0 < report["kl_buckets"] < 1e-3 < report["kl_full_to_sparse"] < 2.0

    with pytest.raises(ValueError, match="tokenizer fingerprint differs"):
        straight.check_compatible(tokenizer=corpus_tokenizer, dataset=rows)
