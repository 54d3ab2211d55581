"""The sampled teacher cache (format version 3): per position, counts of `sample_draws` draws from the teacher.

Checked against float64 references (the draws are an unbiased estimate of the teacher's probabilities: over its whole
vocabulary in process, over a served teacher's top-k and the tail; a decoded row is exactly `log(count / draws)` over
the drawn ids), for reproducibility (a row's draws depend on
its index and the seed only, not on batching, shards, a crash and resume), end to end through
`cache_teacher_logits` with training, and by its refusals: bad arguments before any forward, damaged counts.
"""

from __future__ import annotations

import dataclasses
import math
import shutil

import numpy as np
import pytest
import torch
from test_compact_cache import SharpTeacher, _reference, _rewrite_shard, _teacher_rows

from hf_interop import DistillationConfig, DistillationTrainer, TeacherLogitsCache, cache_teacher_logits
from hf_interop.distill.teacher_cache import IDS_COLUMN, LOGPROBS_COLUMN, PAD_LOGPROB, TAIL_COLUMN, codec
from hf_interop.loading import load_causal_lm


@pytest.fixture(scope="module")
def sharp_teacher(tiny_model_dirs):
    model, tokenizer = load_causal_lm(tiny_model_dirs["llama"], dtype="float32")
    return SharpTeacher(model, scale=4.0), tokenizer


@pytest.fixture(scope="module")
def rows(packed_corpus):
    return packed_corpus["validation"].select(range(12))


# ----------------------------------------------------------------------------------------------------------------
# The draws and the codec against float64 references
# ----------------------------------------------------------------------------------------------------------------


def test_draws_are_an_unbiased_estimate_of_the_entries_and_the_tail():
    """Over many seeds the mean of count / draws is each entry's probability (and the rest of the draws the tail
    mass), within 5 standard errors of the multinomial; an entry without mass is never drawn."""
    probs = np.array([[0.5, 0.2, 0.1, 0.0, 0.05], [0.9, 0.04, 0.03, 0.02, 0.01]])  # tails 0.15 and 0.0
    logprobs = np.log(probs, where=probs > 0, out=np.full_like(probs, -np.inf))
    draws, seeds = 16, 3000
    total = np.zeros_like(probs)
    for seed in range(seeds):
        counts = codec.draw_counts(logprobs, np.array([1, 1]), draws, seed, first_row=0)
        assert counts[0, 3] == 0 and (counts.sum(-1) <= draws).all()
        total += counts
    estimate = total / (draws * seeds)
    standard_error = np.sqrt(probs * (1 - probs) / (draws * seeds))
    assert (np.abs(estimate - probs) <= 5 * standard_error + 1e-12).all(), estimate
    tail = 1 - estimate.sum(-1)
    assert abs(tail[0] - 0.15) <= 5 * math.sqrt(0.15 * 0.85 / (draws * seeds)) and abs(tail[1]) < 1e-9


def test_draws_from_logits_are_an_unbiased_estimate_over_the_whole_vocabulary():
    """An in-process teacher's draws come from its whole softmax (at the cache's temperature): over many uniforms each
    token's share of the draws is its probability, within 5 standard errors; counts sit at the first of each run."""
    from hf_interop.distill.teacher_cache.sampling import draw_from_logits

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=generator) * 2
    logits[1, 7] = -float("inf")  # a token without mass
    probs = torch.softmax(logits.double() / 1.5, -1).numpy()
    draws = 20_000
    ids, counts = draw_from_logits(logits, 1.5, np.random.default_rng(0).random((3, draws)))
    assert ids.shape == counts.shape == (3, draws) and (np.diff(ids, axis=-1) >= 0).all()
    assert (counts.sum(-1) == draws).all() and 7 not in ids[1][counts[1] > 0]
    share = np.zeros_like(probs)
    for position in range(3):
        np.add.at(share[position], ids[position], counts[position])
    share /= draws
    assert (np.abs(share - probs) <= 5 * np.sqrt(probs * (1 - probs) / draws) + 1e-12).all()


def test_a_rows_draws_depend_on_its_index_and_the_seed_only():
    rows, _ = _teacher_rows(seed=3)
    kwargs = dict(top_p=None, logprob_bits=None, vocab_size=3000, top_k=12, sample_draws=40)
    together = codec.encode_rows(rows, sample_seed=7, first_row=20, **kwargs)
    decoded = codec.decode_dense(together, None, 3000, 12, sample_draws=40)
    start = 0
    for offset, row in enumerate(rows):
        alone = codec.encode_rows([row], sample_seed=7, first_row=20 + offset, **kwargs)
        counts, ids, logprobs = codec.decode_dense(alone, None, 3000, 12, sample_draws=40)
        end = start + counts.shape[0]
        np.testing.assert_array_equal(counts, decoded[0][start:end])
        np.testing.assert_array_equal(ids, decoded[1][start:end])
        np.testing.assert_array_equal(logprobs, decoded[2][start:end])
        start = end
    other_seed = codec.decode_dense(codec.encode_rows(rows, sample_seed=8, first_row=20, **kwargs), None, 3000, 12,
                                    sample_draws=40)  # fmt: skip
    other_row = codec.decode_dense(codec.encode_rows(rows, sample_seed=7, first_row=21, **kwargs), None, 3000, 12,
                                   sample_draws=40)  # fmt: skip
    assert not np.array_equal(other_seed[2], decoded[2]) and not np.array_equal(other_row[2], decoded[2])


@pytest.mark.parametrize("draws", [1, 2, 48, 64, 256, 300])
def test_decoded_rows_are_the_drawn_ids_with_log_count_over_draws(draws):
    """Against a float64 reference drawn with the same generator: the kept ids are exactly the drawn ones, each
    with log(count / draws), and the derived tail is the share of draws outside the top-k."""
    rows, _ = _teacher_rows(seed=5, k=12)
    encoded = codec.encode_rows(rows, None, None, 3000, 12, sample_draws=draws, sample_seed=1, first_row=0)
    counts, ids, logprobs = codec.decode_dense(encoded, None, 3000, 12, PAD_LOGPROB, sample_draws=draws)
    position = 0
    for row_index, (row_ids, row_logprobs) in enumerate(rows):
        generator = np.random.default_rng((1, row_index))
        uniforms = generator.random((row_ids.shape[0], draws))
        for p in range(row_ids.shape[0]):
            order = np.argsort(-row_logprobs[p].astype(np.float32), kind="stable")
            probs = np.exp(row_logprobs[p][order].astype(np.float64))
            edges = np.cumsum(probs)
            expected: dict[int, int] = {}
            outside = 0
            for u in uniforms[p]:
                j = int((edges <= u).sum())  # first entry whose cumulative mass exceeds u
                if j == len(edges):
                    outside += 1
                else:
                    token = int(row_ids[p][order][j])
                    expected[token] = expected.get(token, 0) + 1
            n = int(counts[position])
            got = {int(i): float(v) for i, v in zip(ids[position, :n], logprobs[position, :n], strict=True)}
            assert set(got) == set(expected) and list(ids[position, :n]) == sorted(expected)
            for token, count in expected.items():
                assert got[token] == pytest.approx(math.log(count / draws), abs=1e-6)
            assert (logprobs[position, n:] == PAD_LOGPROB).all()
            tail = 1 - sum(math.exp(v) for v in got.values())
            assert tail == pytest.approx(outside / draws, abs=1e-6)
            position += 1
    # one count code of bit_length(draws - 1) bits per kept entry, rows byte-aligned
    bits = codec.count_code_bits(draws)
    assert encoded[codec.CODES_COLUMN][1].shape[0] <= (int(counts.sum()) * bits) // 8 + len(rows)


# ----------------------------------------------------------------------------------------------------------------
# End to end: cache_teacher_logits, resume, training
# ----------------------------------------------------------------------------------------------------------------


def test_a_sampled_cache_round_trips_resumes_and_trains(tmp_path, sharp_teacher, rows, tiny_model_dirs):
    teacher, tokenizer = sharp_teacher
    kwargs = dict(top_k=16, encoding="sampled", sample_draws=32, batch_size=2, tokenizer=tokenizer,
                  show_progress=False, teacher_name_or_path="sharp")  # fmt: skip
    crashing = SharpTeacher(teacher.model, scale=4.0, fail_at=4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cache_teacher_logits(crashing, rows, tmp_path / "resumed", shard_size=4, **kwargs)
    counting = SharpTeacher(teacher.model, scale=4.0)
    resumed = cache_teacher_logits(counting, rows, tmp_path / "resumed", shard_size=4, **kwargs)
    assert counting.calls == 4  # shards 1 and 2 only
    assert resumed.manifest["format_version"] == 3 and resumed.is_compact
    assert (resumed.manifest["encoding"], resumed.sample_draws, resumed.manifest["sample_seed"]) == ("sampled", 32, 0)
    straight = cache_teacher_logits(teacher, rows, tmp_path / "straight", shard_size=4, **kwargs)
    for name in ("shard-00000", "shard-00001", "shard-00002"):
        assert (resumed.path / name / "data.arrow").read_bytes() == (straight.path / name / "data.arrow").read_bytes()
    # other shards and batches, same rows: the same draws
    reshaped = cache_teacher_logits(teacher, rows, tmp_path / "reshaped", **{**kwargs, "batch_size": 5}, shard_size=7)
    for index in (0, 5, 11):
        for key, value in straight.row(index).items():
            assert torch.equal(reshaped.row(index)[key], value), key
    with pytest.raises(ValueError, match="sample_draws: 32 in the folder, 16 now"):
        shutil.rmtree(straight.path / "shard-00002")
        (straight.path / "manifest.json").unlink()
        cache_teacher_logits(teacher, rows, straight.path, shard_size=4, **{**kwargs, "sample_draws": 16})

    # against a reference drawn naively, one position and one draw at a time, from the teacher's whole vocabulary
    # (its float32 softmax, float64 edges): the same ids, each with log(count / 32), and no tail
    full = _reference(teacher, rows, [3])
    row = resumed.row(3)
    kept = row[LOGPROBS_COLUMN] > PAD_LOGPROB
    counts = torch.where(kept, row[LOGPROBS_COLUMN].double().exp() * 32, 0.0)
    uniforms = np.random.default_rng((0, 3)).random((row[IDS_COLUMN].shape[0], 32))
    for position in range(row[IDS_COLUMN].shape[0]):
        edges = np.cumsum(full[0, position].exp().double().numpy())
        expected: dict[int, int] = {}
        for u in uniforms[position]:
            token = int(np.searchsorted(edges / edges[-1], u, side="right"))
            expected[token] = expected.get(token, 0) + 1
        got = row[IDS_COLUMN][position][kept[position]].tolist()
        assert got == sorted(expected), position
        assert counts[position][kept[position]].round().long().tolist() == [expected[token] for token in got]
    assert float(row[TAIL_COLUMN].double().exp().max()) < 1e-6
    # smaller than today's float16 cache at the default top_k=64
    float16 = cache_teacher_logits(
        teacher, rows, tmp_path / "float16", tokenizer=tokenizer, show_progress=False, encoding="float16"
    )
    assert resumed.report(sample_rows=2)["bytes_on_disk"] < 0.3 * float16.report(sample_rows=2)["bytes_on_disk"]

    student, _ = load_causal_lm(tiny_model_dirs["qwen2"], dtype="float32")
    args = DistillationConfig(
        output_dir=str(tmp_path / "run"), teacher_logits_path=str(resumed.path), loss_type="forward_kl",
        kd_ratio=1.0, max_steps=2, per_device_train_batch_size=2, report_to="none", use_cpu=True,
        save_strategy="no", disable_tqdm=True, logging_steps=1,
    )  # fmt: skip
    for change, named in (({"loss_type": "jsd"}, "loss_type='jsd'"), ({"temperature": 2.0}, "temperature=2.0")):
        refused = dataclasses.replace(args, **change)
        with pytest.raises(
            ValueError, match=rf"is a sampled cache .*forward KL at that temperature only; got .*{named}"
        ):
            DistillationTrainer(model=student, args=refused, train_dataset=rows, processing_class=tokenizer)
    trainer = DistillationTrainer(model=student, args=args, train_dataset=rows, processing_class=tokenizer)
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all(math.isfinite(value) and value > 0 for value in logged)


def test_two_processes_write_the_same_sampled_shards_as_one(tmp_path, tiny_model_dirs, packed_corpus):
    """Rank r of 2 computes shards r, r + 2, ...: each row's draws come from its index, so the bytes match one
    process's (both run tests/cache_worker.py: one thread, the same teacher math)."""
    import subprocess
    import sys
    from pathlib import Path

    from test_teacher_cache import _worker_env

    worker = Path(__file__).resolve().parents[1] / "cache_worker.py"
    packed_corpus["validation"].select(range(12)).save_to_disk(tmp_path / "blocks")
    common = [str(worker), str(tiny_model_dirs["llama"]), str(tmp_path / "blocks")]
    runs = {
        "one": [sys.executable, *common, str(tmp_path / "one"), "--encoding", "sampled"],
        "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *common,
                str(tmp_path / "two"), "--encoding", "sampled"],
    }  # fmt: skip
    for command in runs.values():
        result = subprocess.run(command, env=_worker_env(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = TeacherLogitsCache.load(tmp_path / "one"), TeacherLogitsCache.load(tmp_path / "two")
    assert (one.manifest["num_processes"], two.manifest["num_processes"], two.sample_draws) == (1, 2, 64)
    names = sorted(path.name for path in (tmp_path / "one").glob("shard-*"))
    assert len(names) == 3
    for name in names:
        assert (tmp_path / "one" / name / "data.arrow").read_bytes() == (
            tmp_path / "two" / name / "data.arrow"
        ).read_bytes()


# ----------------------------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sample_draws": 0}, r"sample_draws must be an integer in \[1, 4096\], got 0"),
        ({"sample_draws": 5000}, r"sample_draws must be an integer in \[1, 4096\], got 5000"),
        ({"sample_draws": 2.5}, r"sample_draws must be an integer .*got 2.5"),
        ({"sample_draws": True}, r"sample_draws must be an integer .*got True"),
        ({"sample_seed": -1}, r"sample_seed must be a non-negative integer, got -1"),
        ({"top_p": 0.9}, r"encoding='sampled' stores draw counts, .*top_p=0.9"),
        ({"logprob_bits": 8}, r"encoding='sampled' stores draw counts, .*logprob_bits=8"),
        ({"encoding": "compact", "sample_draws": 32}, r"sample_draws=32 .* apply to encoding='sampled' only"),
        ({"encoding": "float16", "sample_seed": 3}, r"sample_seed=3 apply to encoding='sampled' only"),
    ],
)
def test_bad_sampling_arguments_fail_before_any_forward(tmp_path, sharp_teacher, rows, kwargs, message):
    teacher, _ = sharp_teacher
    counting = SharpTeacher(teacher.model)
    kwargs = {"encoding": "sampled", **kwargs}
    with pytest.raises(ValueError, match=message):
        cache_teacher_logits(counting, rows, tmp_path / "cache", show_progress=False, **kwargs)
    assert counting.calls == 0 and not (tmp_path / "cache").exists()


def test_a_count_above_the_draws_is_refused_when_it_decodes(tmp_path, sharp_teacher, rows):
    teacher, tokenizer = sharp_teacher
    cache = cache_teacher_logits(
        teacher, rows, tmp_path / "cache", top_k=8, encoding="sampled", sample_draws=40, batch_size=4, shard_size=6,
        tokenizer=tokenizer, show_progress=False,
    )  # fmt: skip
    _rewrite_shard(cache.path, "shard-00001", codec.CODES_COLUMN, lambda values: values | 0xFF)  # codes 63 >= 40
    with pytest.raises(ValueError, match=r"shard shard-00001 of cache .* is corrupt: its sha256 differs"):
        TeacherLogitsCache.load(cache.path)
    unchecked = TeacherLogitsCache.load(cache.path, verify_checksums=False)
    with pytest.raises(ValueError, match=r"a row does not decode \(a draw count exceeds the cache's sample_draws 40"):
        unchecked.collate([unchecked.attach(rows)[7]])


def test_the_cache_teacher_command_writes_a_sampled_cache(tiny_model_dirs, tmp_path, capsys):
    from hf_interop.cli import EXIT_BAD_INPUT, EXIT_OK, main

    argv = ["cache-teacher", "--teacher_model_name_or_path", str(tiny_model_dirs["llama"]), "--block_size", "32"]
    argv += ["--max_train_blocks", "4", "--eval_split", "none", "--disable_tqdm", "true", "--top_k", "8"]
    argv += ["--encoding", "sampled"]
    assert main([*argv, "--output_dir", str(tmp_path / "bad"), "--sample_draws", "0"]) == EXIT_BAD_INPUT
    assert "sample_draws must be an integer in [1, 4096], got 0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert (
        main([*argv, "--output_dir", str(tmp_path / "cache"), "--sample_draws", "20", "--sample_seed", "4"]) == EXIT_OK
    )
    cache = TeacherLogitsCache.load(tmp_path / "cache")
    assert (cache.manifest["encoding"], cache.sample_draws, cache.manifest["sample_seed"]) == ("sampled", 20, 4)


def test_the_default_encoding_is_sampled_for_an_in_process_teacher(tmp_path, sharp_teacher, rows):
    """No `encoding`: an in-process teacher gets the sampled cache with 64 draws (the benchmark's choice); a served
    one gets the compact cache (tests/distill/test_served_teacher.py)."""
    from hf_interop.distill.teacher_cache.format import default_encoding

    teacher, tokenizer = sharp_teacher
    cache = cache_teacher_logits(
        teacher, rows.select(range(2)), tmp_path / "cache", tokenizer=tokenizer, show_progress=False
    )
    assert (cache.manifest["encoding"], cache.sample_draws, cache.manifest["format_version"]) == ("sampled", 64, 3)
    assert (default_encoding(served=False), default_encoding(served=True)) == ("sampled", "compact")


def test_a_full_disk_mid_shard_keeps_finished_sampled_shards_and_the_capture_resumes(
    tmp_path, sharp_teacher, rows, monkeypatch
):
    """`OSError(ENOSPC)` while shard 1 is written: shard 0 stays, nothing half-written is visible, and the rerun
    writes only the rest, byte for byte what an uninterrupted sampled capture writes."""
    import errno

    import pyarrow
    from test_teacher_cache_integrity import fill_the_disk_while_writing

    teacher, tokenizer = sharp_teacher
    kwargs = dict(encoding="sampled", batch_size=2, shard_size=4, tokenizer=tokenizer, show_progress=False,
                  teacher_name_or_path="sharp")  # fmt: skip
    real_os_file = fill_the_disk_while_writing(monkeypatch, "shard-00001")
    with pytest.raises(OSError) as full:
        cache_teacher_logits(teacher, rows, tmp_path / "cache", **kwargs)
    assert full.value.errno == errno.ENOSPC and "shard-00001" in str(full.value)
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == ["cache_plan.json", "shard-00000"]
    first = (tmp_path / "cache" / "shard-00000" / "data.arrow").read_bytes()

    monkeypatch.setattr(pyarrow, "OSFile", real_os_file)
    counting = SharpTeacher(teacher.model, scale=4.0)
    resumed = cache_teacher_logits(counting, rows, tmp_path / "cache", **kwargs)
    assert counting.calls == 4  # shards 1 and 2 only
    assert (resumed.path / "shard-00000" / "data.arrow").read_bytes() == first
    straight = cache_teacher_logits(teacher, rows, tmp_path / "straight", **kwargs)
    for name in ("shard-00000", "shard-00001", "shard-00002"):
        assert (resumed.path / name / "data.arrow").read_bytes() == (straight.path / name / "data.arrow").read_bytes()
