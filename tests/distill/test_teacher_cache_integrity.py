"""A teacher cache is what it says it is: the teacher that made it (fingerprint), bytes as written (sha256 before
training reads them), and a full disk that names the file and resumes once space is freed."""

from __future__ import annotations

import builtins
import errno
import json
import logging
import shutil
from pathlib import Path

import pyarrow
import pytest
import torch
from helpers import build_tiny_causal_lm

import hf_interop.utils
from hf_interop import DistillationConfig, DistillationTrainer, TeacherLogitsCache, logging_utils
from hf_interop import cache_teacher_logits as _cache_teacher_logits
from hf_interop.distill.teacher_cache import IDS_COLUMN, LOGPROBS_COLUMN, teacher_fingerprint


def cache_teacher_logits(*args, **kwargs):
    """Format version 1 (float16) unless a test names another encoding: what this file tests."""
    kwargs.setdefault("encoding", "float16")
    return _cache_teacher_logits(*args, **kwargs)


OVERWRITE_FIX = "Pass overwrite=True (CLI: --overwrite_output_dir) to replace it, or choose another folder."
KWARGS = dict(top_k=8, batch_size=2, shard_size=4, show_progress=False)  # 24 rows: 6 shards of 2 forwards


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


@pytest.fixture(scope="module")
def rows(packed_corpus):
    """24 validation blocks of 64 tokens (corpus tokenizer)."""
    return packed_corpus["validation"].select(range(24))


@pytest.fixture
def one_thread():
    """One thread while caching, so two runs give byte-identical shards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, corpus_tokenizer):
    """A tiny Llama saved to a folder of its own (tests overwrite it with a 'retrained' copy and restore it)."""
    model = build_tiny_causal_lm("llama", len(corpus_tokenizer), seed=0, tokenizer=corpus_tokenizer)
    folder = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(folder)
    corpus_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher_dir, corpus_tokenizer, rows):
    """An uninterrupted cache of `rows` by the teacher of `teacher_dir`, one thread."""
    model = _load(teacher_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cache_teacher_logits(
            model, rows, tmp_path_factory.mktemp("reference") / "cache", tokenizer=corpus_tokenizer,
            teacher_name_or_path=str(teacher_dir), **KWARGS,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def _load(folder: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def _retrained(model):
    """The same architecture with every weight moved a little, as a short fine-tune does."""
    moved = build_tiny_causal_lm("llama", model.config.vocab_size, seed=0)
    moved.load_state_dict(model.state_dict())
    with torch.no_grad():
        for parameter in moved.parameters():
            parameter.add_(1e-3 * torch.randn_like(parameter))
    return moved


def _shard_bytes(folder: Path) -> dict[str, bytes]:
    return {path.parent.name: path.read_bytes() for path in sorted(folder.glob("shard-*/data.arrow"))}


def _stamps(folder: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every file: a recomputed or rewritten file gets a new one."""
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _crash_after_first_shard(model, rows, output: Path, tokenizer, name: str) -> None:
    with pytest.raises(RuntimeError, match="simulated crash"):
        cache_teacher_logits(
            CountingTeacher(model, fail_at=3), rows, output, tokenizer=tokenizer, teacher_name_or_path=name, **KWARGS
        )
    assert sorted(path.name for path in output.glob("shard-*")) == ["shard-00000"]


# ----------------------------------------------------------------------------------------------------------------
# Finding 3: the teacher is identified by a fingerprint of its config and weights, not by its path
# ----------------------------------------------------------------------------------------------------------------


def test_fingerprint_is_the_same_for_a_folder_and_the_model_loaded_from_it(teacher_dir, tiny_model_dirs):
    model = _load(teacher_dir)
    fingerprint = teacher_fingerprint(teacher_dir)
    assert fingerprint.startswith("sha256:")
    assert teacher_fingerprint(model) == fingerprint == teacher_fingerprint(str(teacher_dir))
    assert teacher_fingerprint(CountingTeacher(model)) == fingerprint  # a wrapper adds no weights
    # held in bfloat16, the values are another teacher's; the folder rounded as loading does gives the same
    bf16 = _load(teacher_dir, dtype=torch.bfloat16)
    assert teacher_fingerprint(bf16) != fingerprint
    assert teacher_fingerprint(bf16) == teacher_fingerprint(teacher_dir, dtype="bfloat16")
    # another seed, a retrained copy and a config change are other teachers
    assert teacher_fingerprint(_retrained(model)) != fingerprint
    assert teacher_fingerprint(tiny_model_dirs["qwen2"]) != fingerprint
    changed = _load(teacher_dir)
    changed.config.rms_norm_eps = 1e-3
    assert teacher_fingerprint(changed) != fingerprint
    # nothing to hash cheaply: a hub id, an empty folder, an object without weights
    assert teacher_fingerprint("org/model") is None and teacher_fingerprint(teacher_dir.parent) is None
    assert teacher_fingerprint(torch.nn.Identity()) is None


def test_resume_after_the_teacher_was_retrained_into_the_same_folder_is_refused(
    tmp_path, teacher_dir, corpus_tokenizer, rows, reference, one_thread
):
    """The issue's case: cache-teacher killed, teacher retrained and saved to the same folder, cache-teacher rerun."""
    original = _load(teacher_dir)
    output = tmp_path / "cache"
    _crash_after_first_shard(original, rows, output, corpus_tokenizer, name=str(teacher_dir))
    before = _stamps(output)

    _retrained(original).save_pretrained(teacher_dir)
    try:
        with pytest.raises(ValueError) as refused:
            cache_teacher_logits(str(teacher_dir), rows, output, tokenizer=corpus_tokenizer, **KWARGS)
        message = str(refused.value)
        old, new = reference.teacher_fingerprint, teacher_fingerprint(teacher_dir)
        assert f"teacher_fingerprint: {old!r} in the folder, {new!r} now" in message
        assert f"the weights or config of teacher {str(teacher_dir)!r} are not the ones" in message
        assert message.endswith(OVERWRITE_FIX)
        assert _stamps(output) == before, "a refused resume must not touch the folder"
    finally:
        original.save_pretrained(teacher_dir)

    # the teacher as it was resumes: only the missing shards are computed, and the cache is the uninterrupted one
    resumed = cache_teacher_logits(str(teacher_dir), rows, output, tokenizer=corpus_tokenizer, **KWARGS)
    assert all(_stamps(output)[name] == stamp for name, stamp in before.items() if name.startswith("shard-00000"))
    assert _shard_bytes(output) == _shard_bytes(reference.path)
    assert resumed.teacher_fingerprint == reference.teacher_fingerprint == teacher_fingerprint(original)


def test_two_in_memory_teachers_of_one_class_do_not_resume_into_one_cache(tmp_path, corpus_tokenizer, rows):
    first = build_tiny_causal_lm("llama", len(corpus_tokenizer), seed=0, tokenizer=corpus_tokenizer)
    second = CountingTeacher(build_tiny_causal_lm("llama", len(corpus_tokenizer), seed=1, tokenizer=corpus_tokenizer))
    output = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="simulated crash"):
        cache_teacher_logits(CountingTeacher(first, fail_at=3), rows, output, tokenizer=corpus_tokenizer, **KWARGS)
    with pytest.raises(ValueError, match="teacher_fingerprint: 'sha256:[0-9a-f]+' in the folder, 'sha256:") as refused:
        cache_teacher_logits(second, rows, output, tokenizer=corpus_tokenizer, **KWARGS)
    assert "teacher 'CountingTeacher'" in str(refused.value) and str(refused.value).endswith(OVERWRITE_FIX)
    assert second.calls == 0
    cache = cache_teacher_logits(second, rows, output, tokenizer=corpus_tokenizer, overwrite=True, **KWARGS)
    assert cache.teacher_fingerprint == teacher_fingerprint(second)


def test_check_compatible_compares_the_teacher_by_fingerprint(tmp_path, teacher_dir, corpus_tokenizer, rows):
    model = _load(teacher_dir)
    # recorded under another name than the folder's: the fingerprint decides, not the name
    cache = cache_teacher_logits(
        model, rows.select(range(4)), tmp_path / "cache", tokenizer=corpus_tokenizer, teacher_name_or_path="my-teacher",
        **KWARGS,
    )  # fmt: skip
    assert cache.teacher_fingerprint == teacher_fingerprint(teacher_dir)
    cache.check_compatible(teacher=teacher_dir)
    cache.check_compatible(teacher=model)
    cache.check_compatible(teacher="my-teacher")  # a name: compared by name
    retrained_dir = tmp_path / "retrained"
    _retrained(model).save_pretrained(retrained_dir)
    with pytest.raises(ValueError, match="teacher fingerprint differs") as refused:
        cache.check_compatible(teacher=retrained_dir)
    assert teacher_fingerprint(retrained_dir) in str(refused.value) and cache.teacher_fingerprint in str(refused.value)
    assert "'my-teacher' in the cache" in str(refused.value)

    # a cache of the teacher run in bfloat16 matches its float32 folder (loaded as the cache was made)
    bf16_cache = cache_teacher_logits(
        _load(teacher_dir, dtype=torch.bfloat16), rows.select(range(4)), tmp_path / "bf16", **KWARGS
    )
    bf16_cache.check_compatible(teacher=teacher_dir)
    with pytest.raises(ValueError, match="teacher fingerprint differs"):
        bf16_cache.check_compatible(teacher=model)  # the float32 teacher in memory is not the one that ran


def _drop_fingerprint(folder: Path) -> None:
    """Make `folder` look written by hf_interop before teacher fingerprints."""
    for name in ("cache_plan.json", "manifest.json"):
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text())
            data.pop("teacher_fingerprint")
            path.write_text(json.dumps(data))


def test_a_cache_written_before_fingerprints_loads_resumes_and_says_it_cannot_be_checked(
    tmp_path, teacher_dir, corpus_tokenizer, rows, reference, monkeypatch, caplog, one_thread
):
    monkeypatch.setattr(logging_utils, "_warned", set())
    old = tmp_path / "old"
    shutil.copytree(reference.path, old)
    _drop_fingerprint(old)
    with caplog.at_level(logging.WARNING):
        cache = TeacherLogitsCache.load(old)
        assert cache.teacher_fingerprint is None
        cache.check_compatible(teacher=teacher_dir)  # by name: the recorded name is this folder
    assert "records no teacher fingerprint" in caplog.text and "nothing can check which teacher" in caplog.text
    with pytest.raises(ValueError, match="teacher differs"):
        cache.check_compatible(teacher="other/teacher")

    # an unfinished old cache resumes (its shards cannot be checked: a warning says so) and records no fingerprint
    partial = tmp_path / "partial"
    _crash_after_first_shard(_load(teacher_dir), rows, partial, corpus_tokenizer, name=str(teacher_dir))
    _drop_fingerprint(partial)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        resumed = cache_teacher_logits(str(teacher_dir), rows, partial, tokenizer=corpus_tokenizer, **KWARGS)
    assert "recorded no teacher fingerprint: its finished shards cannot be checked" in caplog.text
    assert resumed.teacher_fingerprint is None
    assert _shard_bytes(partial) == _shard_bytes(reference.path)


# ----------------------------------------------------------------------------------------------------------------
# Finding 4: every shard's sha256 is checked before training reads it
# ----------------------------------------------------------------------------------------------------------------


def _flip_bytes_of(cache_dir: Path, shard: str, values) -> None:
    """Flip the bits of 8 bytes in the middle of `values` (one row's stored array) inside the shard's file."""
    path = cache_dir / shard / "data.arrow"
    data = bytearray(path.read_bytes())
    pattern = values.tobytes()
    offset = data.find(pattern)
    assert offset >= 0 and data.find(pattern, offset + 1) < 0, "the row's bytes must occur exactly once"
    middle = offset + len(pattern) // 2
    data[middle : middle + 8] = bytes(byte ^ 0xFF for byte in data[middle : middle + 8])
    path.write_bytes(bytes(data))


def _trainer(student_dir: Path, cache_dir: Path, rows, tokenizer, output_dir: Path) -> DistillationTrainer:
    args = DistillationConfig(
        output_dir=str(output_dir), teacher_logits_path=str(cache_dir), kd_ratio=1.0, max_steps=3,
        per_device_train_batch_size=4, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    return DistillationTrainer(model=_load(student_dir), args=args, train_dataset=rows, processing_class=tokenizer)


@pytest.mark.parametrize("column", [LOGPROBS_COLUMN, IDS_COLUMN])
def test_training_refuses_a_shard_whose_bytes_changed_and_says_how_to_recompute_it(
    tmp_path, tiny_model_dirs, teacher_dir, corpus_tokenizer, rows, reference, column, one_thread
):
    cache_dir = tmp_path / "cache"
    shutil.copytree(reference.path, cache_dir)
    row = 9  # in shard-00002 (rows 8..11)
    stored = reference.dataset.data.column(column)[row].values.to_numpy()  # as stored: float16 / uint16
    _flip_bytes_of(cache_dir, "shard-00002", stored)
    # same size, valid Arrow: without the checksum the altered targets would be read as the teacher's
    unchecked = TeacherLogitsCache.load(cache_dir, verify_checksums=False)
    assert not (unchecked.dataset.data.column(column)[row].values.to_numpy() == stored).all()

    with pytest.raises(ValueError) as refused:
        _trainer(tiny_model_dirs["llama"], cache_dir, rows, corpus_tokenizer, tmp_path / "run")
    message = str(refused.value)
    data_file = cache_dir / "shard-00002" / "data.arrow"
    assert f"shard shard-00002 of cache {str(cache_dir)!r} is corrupt: its sha256 differs" in message
    assert str(data_file) in message and "tokenizer" not in message
    assert f"delete the folder {cache_dir / 'shard-00002'} and {cache_dir / 'manifest.json'}" in message
    assert "rerun cache_teacher_logits (CLI: hf-interop cache-teacher) with the same arguments" in message

    # doing what it says recomputes that shard alone, and the cache is the teacher's again
    shutil.rmtree(cache_dir / "shard-00002")
    (cache_dir / "manifest.json").unlink()
    counting = CountingTeacher(_load(teacher_dir))
    cache_teacher_logits(
        counting, rows, cache_dir, tokenizer=corpus_tokenizer, teacher_name_or_path=str(teacher_dir), **KWARGS
    )
    assert counting.calls == 2
    assert _shard_bytes(cache_dir) == _shard_bytes(reference.path)
    _trainer(tiny_model_dirs["llama"], cache_dir, rows, corpus_tokenizer, tmp_path / "run").train()


def test_deleting_only_the_shard_also_resumes(tmp_path, teacher_dir, corpus_tokenizer, rows, reference, one_thread):
    cache_dir = tmp_path / "cache"
    shutil.copytree(reference.path, cache_dir)
    shutil.rmtree(cache_dir / "shard-00004")
    counting = CountingTeacher(_load(teacher_dir))
    cache = cache_teacher_logits(
        counting, rows, cache_dir, tokenizer=corpus_tokenizer, teacher_name_or_path=str(teacher_dir), **KWARGS
    )
    assert counting.calls == 2 and len(cache) == 24
    assert _shard_bytes(cache_dir) == _shard_bytes(reference.path)


# ----------------------------------------------------------------------------------------------------------------
# Finding 8: a full disk names the file, leaves nothing half-written, and the capture resumes
# ----------------------------------------------------------------------------------------------------------------


class _DiskFillsUp:
    """A file whose writes succeed until `capacity` bytes, then fail as a full disk does (`[Errno 28]`)."""

    def __init__(self, path: str, capacity: int):
        self.handle = builtins.open(path, "wb")
        self.capacity = capacity
        self.closed = False

    def write(self, data) -> int:
        if self.handle.tell() + len(data) > self.capacity:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.handle.write(data)

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()
        self.closed = True


def fill_the_disk_while_writing(monkeypatch, shard: str, capacity: int = 1000):
    """Patch pyarrow so writing `shard`'s files fails as a full disk after `capacity` bytes; returns the real
    `pyarrow.OSFile`, to put back when the space is freed."""
    real_os_file = pyarrow.OSFile

    def shard_file(path, mode="r", **kwargs):
        if shard in str(path) and "w" in mode:
            return pyarrow.PythonFile(_DiskFillsUp(str(path), capacity=capacity), mode="w")
        return real_os_file(path, mode, **kwargs)

    monkeypatch.setattr(pyarrow, "OSFile", shard_file)
    return real_os_file


def test_a_full_disk_while_writing_a_shard_names_it_and_the_capture_resumes(
    tmp_path, teacher_dir, corpus_tokenizer, rows, reference, monkeypatch, one_thread
):
    real_os_file = fill_the_disk_while_writing(monkeypatch, "shard-00002")
    output = tmp_path / "cache"
    model = _load(teacher_dir)
    with pytest.raises(OSError) as full:
        cache_teacher_logits(
            model, rows, output, tokenizer=corpus_tokenizer, teacher_name_or_path=str(teacher_dir), **KWARGS
        )
    message = str(full.value)
    assert full.value.errno == errno.ENOSPC
    assert f"no space left on device while writing {output / 'shard-00002'}" in message
    assert "Free some space" in message and "rerun cache_teacher_logits (CLI: hf-interop cache-teacher)" in message
    # nothing half-written: the finished shards, the plan, no staging folder, no manifest
    assert sorted(path.name for path in output.iterdir()) == ["cache_plan.json", "shard-00000", "shard-00001"]
    before = _stamps(output)

    monkeypatch.setattr(pyarrow, "OSFile", real_os_file)  # space freed
    counting = CountingTeacher(model)
    cache_teacher_logits(
        counting, rows, output, tokenizer=corpus_tokenizer, teacher_name_or_path=str(teacher_dir), **KWARGS
    )
    assert counting.calls == 8  # shards 2..5
    assert all(_stamps(output)[name] == stamp for name, stamp in before.items())
    assert _shard_bytes(output) == _shard_bytes(reference.path)


def test_a_full_disk_while_writing_the_manifest_names_it_and_the_capture_resumes(
    tmp_path, teacher_dir, corpus_tokenizer, rows, reference, monkeypatch, one_thread
):
    def full_for_the_manifest(path, mode="r", *args, **kwargs):
        if Path(path).name.startswith(".tmp-manifest.json") and "w" in mode:
            handle = _DiskFillsUp(str(path), capacity=100)
            return _TextOver(handle)
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(hf_interop.utils, "open", full_for_the_manifest, raising=False)
    output = tmp_path / "cache"
    model = _load(teacher_dir)
    with pytest.raises(OSError, match=f"no space left on device while writing {output / 'manifest.json'}"):
        cache_teacher_logits(
            model, rows, output, tokenizer=corpus_tokenizer, teacher_name_or_path=str(teacher_dir), **KWARGS
        )
    assert sorted(path.name for path in output.iterdir()) == ["cache_plan.json"] + [f"shard-0000{i}" for i in range(6)]

    monkeypatch.undo()
    counting = CountingTeacher(model)
    cache = cache_teacher_logits(
        counting, rows, output, tokenizer=corpus_tokenizer, teacher_name_or_path=str(teacher_dir), **KWARGS
    )
    assert counting.calls == 0 and len(cache) == 24
    assert _shard_bytes(output) == _shard_bytes(reference.path)


class _TextOver:
    """Text-mode front of a `_DiskFillsUp` (what `open(path, "w")` returns), usable as a context manager."""

    def __init__(self, handle: _DiskFillsUp):
        self.handle = handle

    def write(self, text: str) -> int:
        return self.handle.write(text.encode("utf-8"))

    def flush(self) -> None:
        self.handle.flush()

    def fileno(self) -> int:
        return self.handle.handle.fileno()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()


# ----------------------------------------------------------------------------------------------------------------
# Finding 12: the library's own words name the command-line flag
# ----------------------------------------------------------------------------------------------------------------


def test_the_different_job_error_names_the_flag_of_the_command_line(tmp_path, corpus_tokenizer, rows):
    model = build_tiny_causal_lm("llama", len(corpus_tokenizer), seed=0, tokenizer=corpus_tokenizer)
    output = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="simulated crash"):
        cache_teacher_logits(CountingTeacher(model, fail_at=3), rows, output, **KWARGS)
    with pytest.raises(ValueError, match="top_k: 8 in the folder, 4 now") as refused:
        cache_teacher_logits(model, rows, output, **{**KWARGS, "top_k": 4})
    assert str(refused.value).endswith(OVERWRITE_FIX)
    (output / "cache_plan.json").unlink()
    with pytest.raises(FileExistsError, match=r"pass overwrite=True \(CLI: --overwrite_output_dir\) to replace them"):
        cache_teacher_logits(model, rows, output, **KWARGS)


@pytest.mark.slow
def test_the_real_teachers_folder_and_model_have_one_fingerprint(smollm2_dir, smollm2):
    """SmolLM2-135M (517 MB of float32 safetensors, tied embeddings): the folder and the loaded model agree, and moving
    one layer's weights changes the fingerprint."""
    model, _ = smollm2
    fingerprint = teacher_fingerprint(smollm2_dir)
    assert teacher_fingerprint(model) == fingerprint
    layer = model.model.layers[7].mlp.down_proj.weight
    saved = layer.detach().clone()
    try:
        with torch.no_grad():
            layer.add_(1e-4 * torch.randn_like(layer))
        assert teacher_fingerprint(model) != fingerprint
    finally:
        with torch.no_grad():
            layer.copy_(saved)
    assert teacher_fingerprint(model) == fingerprint
