"""The compact teacher cache (format version 2): adaptive k, quantised log-probs, Elias-Fano ids.

Checked against float64 references (the codec's kept set and error bound, the sparse losses with entries that hold no
mass), end to end through `cache_teacher_logits` on a real (tiny, sharpened) teacher, with compression, resume and
training, and by its refusals: bad arguments before any forward, other format versions, damaged shards.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from hf_interop import DistillationConfig, DistillationTrainer, TeacherLogitsCache, losses
from hf_interop import cache_teacher_logits as _cache_teacher_logits
from hf_interop.distill.teacher_cache import (
    IDS_COLUMN,
    LOGPROBS_COLUMN,
    PAD_LOGPROB,
    TAIL_COLUMN,
    codec,
    logprobs_to_float16_round_down,
    tail_logprob_from_topk,
)
from hf_interop.distill.teacher_cache import writer as cache_writer
from hf_interop.loading import load_causal_lm


def cache_teacher_logits(*args, **kwargs):
    """The compact encoding unless a test names one (the default encoding is float16)."""
    kwargs.setdefault("encoding", "compact")
    return _cache_teacher_logits(*args, **kwargs)


class SharpTeacher(torch.nn.Module):
    """A real causal LM with its logits scaled up: peaked distributions, so top_p keeps few entries at some
    positions and many at others. Counts forward passes; raises at the `fail_at`-th (a crash inside the loop)."""

    def __init__(self, model, scale: float = 12.0, fail_at: int | None = None):
        super().__init__()
        self.model = model
        self.config = model.config
        self.scale = scale
        self.calls = 0
        self.fail_at = fail_at

    def forward(self, input_ids, attention_mask=None):
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise RuntimeError("simulated crash inside the caching loop")
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        out.logits = out.logits * self.scale
        return out


@pytest.fixture(scope="module")
def sharp_teacher(tiny_model_dirs):
    model, tokenizer = load_causal_lm(tiny_model_dirs["llama"], dtype="float32")
    return SharpTeacher(model), tokenizer


@pytest.fixture(scope="module")
def rows(packed_corpus):
    return packed_corpus["validation"].select(range(12))


def _float16_step_up(values: np.ndarray) -> np.ndarray:
    half = values.astype(np.float16)
    return np.where(half.astype(np.float64) < values, np.nextafter(half, np.float16(np.inf)), half).astype(np.float64)


# ----------------------------------------------------------------------------------------------------------------
# The codec against a float64 reference
# ----------------------------------------------------------------------------------------------------------------


def _teacher_rows(seed: int, num_rows: int = 5, positions: int = 23, k: int = 12, vocab: int = 3000):
    """Rows as a row source yields them: top-k ids and float16 log-probs rounded toward -inf, decreasing, some entries
    missing (-inf: a served teacher's gaps); also the float64 log-probs they came from."""
    generator = torch.Generator().manual_seed(seed)
    out, exact = [], []
    for _ in range(num_rows):
        logits = torch.randn(positions, vocab, generator=generator, dtype=torch.float64)
        logits *= torch.rand(positions, 1, generator=generator, dtype=torch.float64) * 12  # peaked and flat ones
        logprobs = torch.log_softmax(logits, -1)
        values, ids = logprobs.topk(k, -1)
        stored = logprobs_to_float16_round_down(values).numpy()
        missing = torch.rand(positions, k, generator=generator) < 0.1
        missing[:, 0] = False
        missing[3, 1:] = True  # a position with one entry only
        stored = np.where(missing.numpy(), np.float16(-np.inf), stored)
        out.append((ids.numpy().astype(np.uint16), stored))
        exact.append(values.numpy())
    return out, exact


@pytest.mark.parametrize("logprob_bits", codec.LOGPROB_BITS)
@pytest.mark.parametrize("top_p", [0.5, 0.95, 1.0])
def test_codec_keeps_the_fewest_entries_reaching_top_p_and_rounds_down_within_one_step(logprob_bits, top_p):
    vocab = 3000
    source, exact = _teacher_rows(seed=logprob_bits * 10 + int(top_p * 100), vocab=vocab)
    columns = codec.encode_rows(source, top_p, logprob_bits, vocab_size=vocab, top_k=12)
    counts, ids, logprobs = codec.decode_dense(columns, logprob_bits, vocab, width=12, fill_logprob=PAD_LOGPROB)
    position = 0
    for (row_ids, row_stored), row_exact in zip(source, exact, strict=True):
        for p in range(row_ids.shape[0]):
            finite = np.isfinite(row_stored[p])
            values = row_stored[p][finite].astype(np.float64)  # decreasing, as the row source gives them
            cumulative = np.cumsum(np.exp(values))
            expected = len(values) if top_p >= 1 else min(int((cumulative < top_p).sum()) + 1, len(values))
            n = int(counts[position])
            assert n == expected
            kept_ids = row_ids[p][finite][:n].astype(np.int64)
            assert ids[position, :n].tolist() == sorted(kept_ids.tolist())  # the kept set, in increasing id order
            assert (ids[position, n:] == ids[position, 0]).all() and (logprobs[position, n:] == PAD_LOGPROB).all()
            source_value = dict(zip(row_ids[p].tolist(), row_stored[p].astype(np.float64).tolist(), strict=True))
            exact_value = dict(zip(row_ids[p].tolist(), row_exact[p].tolist(), strict=True))
            decoded = logprobs[position, :n].astype(np.float64)
            given = np.array([source_value[int(i)] for i in ids[position, :n]])
            true = np.array([exact_value[int(i)] for i in ids[position, :n]])
            assert (decoded <= given).all()  # never above what the row source gave (itself <= the teacher's)
            assert np.exp(decoded).sum() <= np.exp(true).sum()  # stored mass never exceeds the teacher's
            if logprob_bits == 16:
                assert (decoded == given).all()
            else:
                # the stated bound: 0 <= error < s, s = (top - smallest kept) / (2**bits - 2) rounded up to float16
                step = _float16_step_up(np.array([(given.max() - given.min()) / (2**logprob_bits - 2)]))[0]
                assert (given - decoded < step + 1e-6).all()
            position += 1
    assert position == counts.shape[0]


def test_codec_ids_cost_about_two_bits_over_log2_of_vocab_per_kept():
    source, _ = _teacher_rows(seed=3, num_rows=8, positions=40, k=32, vocab=49152)
    columns = codec.encode_rows(source, None, 8, vocab_size=49152, top_k=32)
    kept = int(columns[codec.COUNTS_COLUMN][1].astype(np.int64).sum())
    id_bits = 8 * (columns[codec.LOW_BITS_COLUMN][1].size + columns[codec.HIGH_BITS_COLUMN][1].size) / kept
    assert id_bits < math.log2(49152 / 32) + 2.5 < 16  # Elias-Fano: floor(log2(U / n)) + 2 bits, rows byte-aligned


def test_codec_refuses_duplicate_ids_and_ids_outside_the_vocabulary():
    ids = np.array([[4, 4, 9]], dtype=np.int64)
    logprobs = np.array([[-0.5, -1.5, -2.0]], dtype=np.float16)
    with pytest.raises(ValueError, match="same token id twice"):
        codec.encode_rows([(ids, logprobs)], None, 8, vocab_size=100, top_k=3)
    with pytest.raises(ValueError, match="token id 100 >= vocab_size 100"):
        codec.encode_rows([(np.array([[1, 100, 7]]), logprobs)], None, 8, vocab_size=100, top_k=3)


# ----------------------------------------------------------------------------------------------------------------
# The sparse losses leave entries without mass out (float64 reference: each row with its kept entries alone)
# ----------------------------------------------------------------------------------------------------------------

LOSS_CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {"temperature": 0.8, "cache_temperature": 1.3}),
    ("jsd", {}),
    ("tvd", {"temperature": 2.0}),
]


@pytest.mark.parametrize("with_prior", [False, True])
@pytest.mark.parametrize("case", LOSS_CASES, ids=[case[0] for case in LOSS_CASES])
def test_sparse_losses_equal_each_row_with_only_its_kept_entries(case, with_prior):
    loss_type, kwargs = case
    n, vocab, k, hidden_size = 13, 61, 7, 9
    generator = torch.Generator().manual_seed(7)
    hidden = torch.randn(n, hidden_size, generator=generator, dtype=torch.float64).requires_grad_()
    head = torch.nn.Linear(hidden_size, vocab, bias=False, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden_size, generator=generator, dtype=torch.float64))
    teacher = torch.log_softmax(torch.randn(n, vocab, generator=generator, dtype=torch.float64) * 3, -1)
    values, ids = teacher.topk(k, -1)
    kept_counts = torch.randint(1, k + 1, (n,), generator=generator)
    labels = torch.randint(0, vocab, (n,), generator=generator)
    labels[2] = -100
    prior = torch.log_softmax(torch.randn(vocab, generator=generator, dtype=torch.float64), -1) if with_prior else None
    stored_ids, stored = ids.clone(), values.clone()
    tails = torch.empty(n, dtype=torch.float64)
    for row in range(n):
        kept = int(kept_counts[row])
        tails[row] = torch.log1p(-values[row, :kept].exp().sum())
        stored[row, kept:] = PAD_LOGPROB if row % 2 else -math.inf  # not kept / missing
        stored_ids[row, kept:] = 0 if row % 3 else stored_ids[row, 0]  # id 0 (a served gap) or a repeat
    common = dict(
        loss_type=loss_type, kd_ratio=1.0, teacher_tail_prior_logprobs=prior, compute_ce_loss=False, **kwargs
    )
    batched = losses.sparse_distillation_loss(head(hidden), stored_ids, stored, tails, labels, **common)
    chunked = losses.chunked_sparse_distillation_loss(
        hidden.view(1, n, -1), head, stored_ids.view(1, n, k), stored.view(1, n, k), tails.view(1, n),
        labels.view(1, n), chunk_size=5, **common,
    )  # fmt: skip
    expected = hidden.new_zeros(())
    for row in range(n):
        if labels[row] == -100:
            continue
        kept = int(kept_counts[row])
        expected = expected + losses.sparse_distillation_loss(
            head(hidden[row : row + 1]), ids[row : row + 1, :kept], values[row : row + 1, :kept], tails[row : row + 1],
            labels[row : row + 1], **common,
        ).loss  # fmt: skip
    expected = expected / int((labels != -100).sum())
    expected_grads = torch.autograd.grad(expected, [hidden, head.weight])
    for out in (batched, chunked):
        torch.testing.assert_close(out.loss, expected, rtol=1e-9, atol=1e-12)
        for grad, reference in zip(torch.autograd.grad(out.loss, [hidden, head.weight]), expected_grads, strict=True):
            torch.testing.assert_close(grad, reference, rtol=1e-7, atol=1e-10)


def test_the_derived_tail_leaves_entries_without_mass_out():
    logprobs = torch.tensor([[-0.5, -1.5, PAD_LOGPROB, -math.inf]])
    expected = math.log(1 - math.exp(-0.5) - math.exp(-1.5))
    assert tail_logprob_from_topk(logprobs).item() == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# End to end: cache_teacher_logits, load, attach, collate, train; compression; resume
# ----------------------------------------------------------------------------------------------------------------


def _reference(teacher, rows, indices):
    input_ids = torch.tensor(rows.select(indices)["input_ids"])
    with torch.no_grad():
        logits = teacher(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
    return torch.log_softmax(logits[:, :-1].float(), -1)


def test_round_trip_keeps_the_teachers_top_p_entries_within_the_bound(tmp_path, sharp_teacher, rows, monkeypatch):
    teacher, tokenizer = sharp_teacher
    monkeypatch.setattr(cache_writer, "_FLUSH_BYTES", 1)  # one Arrow record batch per row: offsets across batches
    cache = cache_teacher_logits(
        teacher, rows, tmp_path / "cache", top_k=16, top_p=0.9, logprob_bits=8, batch_size=4, shard_size=5,
        tokenizer=tokenizer, show_progress=False,
    )  # fmt: skip
    assert cache.is_compact and cache.manifest["format_version"] == 2 and cache.manifest["top_p"] == 0.9
    assert cache.manifest["shards"][0]["num_entries"] > 0
    full = _reference(teacher, rows, [6, 7])
    for offset, index in enumerate((6, 7)):
        row = cache.row(index)
        for position in range(0, row[IDS_COLUMN].shape[0], 7):
            values, ids = full[offset, position].topk(16)
            kept = row[LOGPROBS_COLUMN][position] > PAD_LOGPROB
            n = int(kept.sum())
            mass = values.double().exp().cumsum(0)
            assert n == min(int((mass < 0.9).sum()) + 1, 16) or abs(float(mass[n - 1]) - 0.9) < 1e-3
            assert sorted(row[IDS_COLUMN][position, :n].tolist()) == sorted(ids[:n].tolist())
            true = full[offset, position, row[IDS_COLUMN][position, :n]]
            stored = row[LOGPROBS_COLUMN][position, :n]
            assert (stored <= true + 1e-6).all() and (true - stored).max() < 0.05
    counts = [int((cache.row(i)[LOGPROBS_COLUMN] > PAD_LOGPROB).sum(-1).min()) for i in range(len(rows))]
    assert min(counts) < 16  # adaptive: some positions keep few entries

    float16 = cache_teacher_logits(
        teacher, rows, tmp_path / "float16", top_k=16, batch_size=4, tokenizer=tokenizer, show_progress=False,
        encoding="float16",
    )  # fmt: skip
    assert cache.report(sample_rows=4)["bytes_on_disk"] < 0.6 * float16.report(sample_rows=4)["bytes_on_disk"]

    # compression changes the bytes on disk, not what is read
    zstd = cache_teacher_logits(
        teacher, rows, tmp_path / "zstd", top_k=16, top_p=0.9, logprob_bits=8, batch_size=4, shard_size=5,
        tokenizer=tokenizer, show_progress=False, compression="zstd",
    )  # fmt: skip
    for index in (0, 11):
        for key, value in cache.row(index).items():
            assert torch.equal(zstd.row(index)[key], value), key


def test_attach_collate_and_a_training_step_from_a_compact_cache(tmp_path, sharp_teacher, rows, tiny_model_dirs):
    teacher, tokenizer = sharp_teacher
    cache = cache_teacher_logits(
        teacher, rows, tmp_path / "cache", top_k=8, top_p=0.8, logprob_bits=4, batch_size=6, tokenizer=tokenizer,
        show_progress=False,
    )  # fmt: skip
    attached = cache.attach(rows)
    assert TAIL_COLUMN not in attached.column_names and set(cache.columns) <= set(attached.column_names)
    batch = cache.collate([attached[1], attached[4]])
    width = batch[IDS_COLUMN].shape[-1]
    assert batch[IDS_COLUMN].shape == (2, 63, width) and width <= 8
    assert batch[LOGPROBS_COLUMN].dtype == torch.float32 and batch[TAIL_COLUMN].shape == (2, 63)
    assert torch.equal(batch[LOGPROBS_COLUMN][1, :, : cache.row(4)[LOGPROBS_COLUMN].shape[-1]][..., :1],
                       cache.row(4)[LOGPROBS_COLUMN][..., :1])  # fmt: skip
    kept = batch[LOGPROBS_COLUMN] > PAD_LOGPROB
    mass = torch.where(kept, batch[LOGPROBS_COLUMN].double().exp(), 0.0).sum(-1)
    torch.testing.assert_close(batch[TAIL_COLUMN].double().exp(), 1 - mass, rtol=1e-5, atol=1e-7)
    with pytest.raises(KeyError, match="attach the cache"):
        cache.collate([rows[0]])

    student, _ = load_causal_lm(tiny_model_dirs["qwen2"], dtype="float32")
    args = DistillationConfig(
        output_dir=str(tmp_path / "run"), teacher_logits_path=str(cache.path), loss_type="forward_kl", kd_ratio=1.0,
        max_steps=2, per_device_train_batch_size=2, report_to="none", use_cpu=True, save_strategy="no",
        disable_tqdm=True, logging_steps=1,
    )  # fmt: skip
    trainer = DistillationTrainer(model=student, args=args, train_dataset=rows, processing_class=tokenizer)
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all(math.isfinite(value) and value > 0 for value in logged)


def test_resume_after_a_crash_gives_the_same_compact_shards(tmp_path, sharp_teacher, rows):
    teacher, tokenizer = sharp_teacher
    kwargs = dict(top_k=8, top_p=0.9, logprob_bits=6, batch_size=2, shard_size=4, tokenizer=tokenizer,
                  show_progress=False, teacher_name_or_path="sharp")  # fmt: skip
    crashing = SharpTeacher(teacher.model, fail_at=4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cache_teacher_logits(crashing, rows, tmp_path / "resumed", **kwargs)
    assert (tmp_path / "resumed" / "shard-00000").is_dir() and not (tmp_path / "resumed" / "manifest.json").exists()
    counting = SharpTeacher(teacher.model)
    resumed = cache_teacher_logits(counting, rows, tmp_path / "resumed", **kwargs)
    assert counting.calls == 4  # shards 1 and 2 only, two forwards each
    straight = cache_teacher_logits(teacher, rows, tmp_path / "straight", **kwargs)
    for name in ("shard-00000", "shard-00001", "shard-00002"):
        assert (resumed.path / name / "data.arrow").read_bytes() == (straight.path / name / "data.arrow").read_bytes()
    # another encoding is another job
    with pytest.raises(ValueError, match="logprob_bits: 6 in the folder, 8 now"):
        cache_teacher_logits(teacher, rows, tmp_path / "resumed", **{**kwargs, "logprob_bits": 8})


# ----------------------------------------------------------------------------------------------------------------
# Refusals: bad arguments (before any forward), other format versions, damaged shards
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_p": 0.0}, r"top_p must be a number in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, r"top_p must be a number in \(0, 1\], got 1.5"),
        ({"top_p": float("nan")}, r"top_p must be a number in \(0, 1\], got nan"),
        ({"logprob_bits": 5}, r"logprob_bits must be one of \(4, 6, 8, 16\) .*got 5"),
        ({"logprob_bits": True}, r"logprob_bits must be one of"),
        ({"encoding": "zip"}, r"encoding must be one of \('compact', 'float16', 'sampled'\), got 'zip'"),
        ({"compression": "gzip"}, r"compression must be one of \(None, 'zstd', 'lz4'\), got 'gzip'"),
        ({"encoding": "float16", "top_p": 0.9}, r"encoding='float16' stores all top_k .*top_p=0.9"),
        ({"top_k": 513, "top_p": 0.9}, r"top_k=513 is larger than the teacher's vocabulary \(512\)"),
    ],
)
def test_bad_encoding_arguments_fail_before_any_forward(tmp_path, sharp_teacher, rows, kwargs, message):
    teacher, _ = sharp_teacher
    counting = SharpTeacher(teacher.model)
    with pytest.raises(ValueError, match=message):
        cache_teacher_logits(counting, rows, tmp_path / "cache", show_progress=False, **kwargs)
    assert counting.calls == 0 and not (tmp_path / "cache").exists()


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory, sharp_teacher, rows):
    teacher, tokenizer = sharp_teacher
    return cache_teacher_logits(
        teacher, rows, tmp_path_factory.mktemp("small") / "cache", top_k=8, batch_size=4, shard_size=6,
        tokenizer=tokenizer, show_progress=False,
    )  # fmt: skip


def test_an_unknown_format_version_is_refused_and_version_1_still_loads(tmp_path, small_cache, sharp_teacher, rows):
    copy = tmp_path / "future"
    shutil.copytree(small_cache.path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 4
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"has format_version 4 .*reads versions \[1, 2, 3\]\. Upgrade hf_interop"):
        TeacherLogitsCache.load(copy)

    # a cache written before encodings existed: format 1, a plan without the encoding keys; it loads and resumes
    teacher, tokenizer = sharp_teacher
    kwargs = dict(top_k=8, batch_size=4, shard_size=6, tokenizer=tokenizer, show_progress=False)
    old = cache_teacher_logits(teacher, rows, tmp_path / "old", encoding="float16", **kwargs)
    for name in ("cache_plan.json", "manifest.json"):
        state = json.loads((old.path / name).read_text())
        for key in ("encoding", "top_p", "logprob_bits", "compression"):
            state.pop(key)
        (old.path / name).write_text(json.dumps(state))
    loaded = TeacherLogitsCache.load(old.path)
    assert not loaded.is_compact and loaded.collate([loaded.attach(rows)[0]])[IDS_COLUMN].shape == (1, 63, 8)
    shutil.rmtree(old.path / "shard-00001")
    (old.path / "manifest.json").unlink()
    resumed = cache_teacher_logits(teacher, rows, old.path, encoding="float16", **kwargs)
    assert torch.equal(resumed.row(11)[LOGPROBS_COLUMN], loaded.row(11)[LOGPROBS_COLUMN])
    shutil.rmtree(old.path / "shard-00001")
    (old.path / "manifest.json").unlink()
    with pytest.raises(ValueError, match="encoding: 'float16' in the folder, 'compact' now"):
        cache_teacher_logits(teacher, rows, old.path, **kwargs)


def _rewrite_shard(path, shard: str, column: str, change) -> None:
    """Rewrite one column of a shard as valid Arrow (its checksum then differs: load with verify_checksums=False)."""
    import pyarrow as pa

    data = path / shard / "data.arrow"
    table = pa.ipc.open_stream(data.read_bytes()).read_all()  # in memory: the file is rewritten below
    column_index = table.schema.get_field_index(column)
    chunk = table.column(column).combine_chunks()
    values = change(chunk.flatten().to_numpy(zero_copy_only=False).copy())
    changed = pa.LargeListArray.from_arrays(chunk.offsets, pa.array(values, type=chunk.type.value_type))
    table = table.set_column(column_index, table.schema.field(column), changed)
    with pa.OSFile(str(data), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    info = json.loads((path / shard / "shard.json").read_text())
    manifest = json.loads((path / "manifest.json").read_text())
    for entry in manifest["shards"]:
        if entry["name"] == shard:
            entry["num_bytes"] = data.stat().st_size
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert info["name"] == shard


def test_a_damaged_encoded_shard_is_named_or_refused_when_it_decodes(tmp_path, small_cache, rows):
    counts = tmp_path / "counts"
    shutil.copytree(small_cache.path, counts)

    def more(values):
        values[5] += 1
        return values

    _rewrite_shard(counts, "shard-00001", codec.COUNTS_COLUMN, more)
    with pytest.raises(ValueError, match=r"shard shard-00001 of cache .* is corrupt: its sha256 differs"):
        TeacherLogitsCache.load(counts)
    with pytest.raises(ValueError, match=r"shard shard-00001 of cache .* is corrupt: its positions keep \d+ entries"):
        TeacherLogitsCache.load(counts, verify_checksums=False)

    high = tmp_path / "high"
    shutil.copytree(small_cache.path, high)
    _rewrite_shard(high, "shard-00000", codec.HIGH_BITS_COLUMN, lambda values: values * 0)
    unchecked = TeacherLogitsCache.load(high, verify_checksums=False)
    with pytest.raises(ValueError, match=r"is corrupt: a row does not decode .*high-bits stream holds 0 ids"):
        unchecked.collate([unchecked.attach(rows)[2]])
    with pytest.raises(ValueError, match="a row does not decode"):
        unchecked.tail_prior_logprobs()


def test_the_cache_teacher_command_takes_the_encoding_options(tiny_model_dirs, tmp_path, capsys):
    from hf_interop.cli import EXIT_BAD_INPUT, EXIT_OK, main

    argv = ["cache-teacher", "--teacher_model_name_or_path", str(tiny_model_dirs["llama"]), "--block_size", "32"]
    argv += ["--max_train_blocks", "4", "--eval_split", "none", "--disable_tqdm", "true", "--top_k", "8"]
    argv += ["--encoding", "compact"]
    assert main([*argv, "--output_dir", str(tmp_path / "bad"), "--top_p", "1.5"]) == EXIT_BAD_INPUT
    assert "top_p must be a number in (0, 1], got 1.5" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main([*argv, "--output_dir", str(tmp_path / "bad"), "--logprob_bits", "5"]) == EXIT_BAD_INPUT
    assert "logprob_bits must be one of (4, 6, 8, 16)" in capsys.readouterr().err
    options = ["--top_p", "0.5", "--logprob_bits", "4", "--compression", "lz4"]
    assert main([*argv, "--output_dir", str(tmp_path / "cache"), *options]) == EXIT_OK
    cache = TeacherLogitsCache.load(tmp_path / "cache")
    assert (cache.manifest["encoding"], cache.manifest["top_p"], cache.logprob_bits) == ("compact", 0.5, 4)
    assert cache.manifest["compression"] == "lz4"


def test_compact_defaults_are_the_benchmarks_choice(tmp_path, sharp_teacher, rows):
    """Unset top_p / logprob_bits take the defaults chosen by the frontier benchmark: top_p 0.98, 6-bit codes, and
    every stored log-prob is within the 6-bit step below the teacher's (never above)."""
    teacher, tokenizer = sharp_teacher
    cache = cache_teacher_logits(
        teacher,
        rows.select(range(4)),
        tmp_path / "cache",
        top_k=16,
        encoding="compact",
        tokenizer=tokenizer,
        show_progress=False,
    )
    assert (cache.manifest["top_p"], cache.logprob_bits) == (0.98, 6)
    full = _reference(teacher, rows, [1])
    row = cache.row(1)
    kept = row[LOGPROBS_COLUMN] > PAD_LOGPROB
    for position in range(row[IDS_COLUMN].shape[0]):
        n = int(kept[position].sum())
        values = full[0, position].topk(16).values
        mass = values.double().exp().cumsum(0)
        assert n == min(int((mass < 0.98).sum()) + 1, 16) or abs(float(mass[n - 1]) - 0.98) < 1e-3
        true = full[0, position, row[IDS_COLUMN][position, :n]]
        stored = row[LOGPROBS_COLUMN][position, :n]
        # the step (top - smallest) / 62, plus the row source's float16 rounding toward -inf (<= 0.004 at |x| < 8)
        step = (float(true.max()) - float(true.min())) / 62 + 0.01
        assert (stored <= true + 1e-6).all() and float((true - stored).max()) < step
