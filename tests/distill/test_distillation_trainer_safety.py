"""DistillationTrainer keeps what a run produced and fails early on bad input (issue 24).

An output_dir that holds a saved model is not overwritten; a checkpoint save that runs out of disk names the folder,
leaves no half checkpoint and the run resumes from the previous one; `resume_from_checkpoint=True` skips a
checkpoint a kill cut short; datasets that cannot train are refused before any teacher loads; bf16 on a CPU without
native bfloat16 says what it costs; pickle teachers load only with `allow_pickle=True`.
"""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from helpers import build_tiny_causal_lm
from helpers import make_distillation_args as make_args

import hf_interop.loading
from hf_interop import DistillationConfig, DistillationTrainer

TEACHER_OVERRIDES = {"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 4, "num_attention_heads": 4}


@pytest.fixture(scope="module")
def train_rows(packed_corpus):
    return packed_corpus["train"].select(range(16))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, corpus_tokenizer):
    teacher = build_tiny_causal_lm(
        "llama", len(corpus_tokenizer), seed=1, tokenizer=corpus_tokenizer, **TEACHER_OVERRIDES
    )
    folder = tmp_path_factory.mktemp("tiny_teacher")
    teacher.save_pretrained(folder)
    corpus_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def teacher_loads(monkeypatch):
    """Counts the models `load_causal_lm` loads (the trainer loads a teacher given by path through it)."""
    calls = []
    real = hf_interop.loading.load_causal_lm

    def counting(*args, **kwargs):
        calls.append(args[0] if args else kwargs.get("name_or_path"))
        return real(*args, **kwargs)

    monkeypatch.setattr(hf_interop.loading, "load_causal_lm", counting)
    return calls


def make_student(corpus_tokenizer, seed=0):
    return build_tiny_causal_lm("llama", len(corpus_tokenizer), seed=seed, tokenizer=corpus_tokenizer)


def make_trainer(corpus_tokenizer, teacher_dir, train_rows, output_dir, **overrides):
    return DistillationTrainer(
        model=make_student(corpus_tokenizer),
        teacher_model=str(teacher_dir),
        args=make_args(output_dir, **overrides),
        train_dataset=train_rows,
        processing_class=corpus_tokenizer,
    )


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(Path(folder).iterdir()) if path.is_file()}


# ---------------------------------------------------------------------------------------------- finding 2


def test_output_dir_holding_a_model_is_refused_before_the_teacher_loads(
    tmp_path, corpus_tokenizer, teacher_dir, train_rows, teacher_loads
):
    output_dir = tmp_path / "out"
    make_student(corpus_tokenizer, seed=5).save_pretrained(output_dir)
    corpus_tokenizer.save_pretrained(output_dir)
    before = folder_bytes(output_dir)

    with pytest.raises(FileExistsError) as raised:
        make_trainer(corpus_tokenizer, teacher_dir, train_rows, output_dir)
    message = str(raised.value)
    assert repr(str(output_dir)) in message and "model.safetensors" in message
    assert "overwrite_output_dir=True" in message and "--overwrite_output_dir" in message
    assert teacher_loads == [], "the refusal comes before the teacher loads"
    assert folder_bytes(output_dir) == before

    trainer = make_trainer(corpus_tokenizer, teacher_dir, train_rows, output_dir, overwrite_output_dir=True)
    trainer.train()
    trainer.save_model()
    assert folder_bytes(output_dir)["model.safetensors"] != before["model.safetensors"]


def test_a_finished_run_with_checkpoints_is_refused_at_train_unless_resumed(
    tmp_path, corpus_tokenizer, teacher_dir, train_rows
):
    output_dir = tmp_path / "out"
    first = make_trainer(corpus_tokenizer, teacher_dir, train_rows, output_dir, max_steps=1, save_strategy="steps")
    first.train()
    first.save_model()
    before = folder_bytes(output_dir)

    again = make_trainer(corpus_tokenizer, teacher_dir, train_rows, output_dir, max_steps=2, save_strategy="steps")
    with pytest.raises(FileExistsError) as raised:
        again.train()
    message = str(raised.value)
    assert "overwrite_output_dir=True" in message and "resume_from_checkpoint=True" in message
    assert "checkpoint-1" in message
    assert folder_bytes(output_dir) == before, "nothing was written"
    assert not (output_dir / "checkpoint-2").exists()

    elsewhere = tmp_path / "other" / "checkpoint-1"
    elsewhere.parent.mkdir()
    (output_dir / "checkpoint-1").rename(elsewhere)
    with pytest.raises(FileExistsError, match="already holds a saved model"):
        again.train(resume_from_checkpoint=str(elsewhere))  # another folder's checkpoint: this model is not resumed
    elsewhere.rename(output_dir / "checkpoint-1")

    again.train(resume_from_checkpoint=True)  # the folder's own checkpoints: allowed
    assert again.state.global_step == 2 and (output_dir / "checkpoint-2" / "trainer_state.json").is_file()


def test_the_cli_reads_overwrite_output_dir_and_allow_pickle_from_the_config():
    """Both options moved from the distill command's script arguments into DistillationConfig: parsed once."""
    from hf_interop.cli import DistillScriptArguments, parse_recipe_args

    argv = ["--student_model_name_or_path", "s", "--output_dir", "o", "--overwrite_output_dir", "--allow_pickle"]
    script_args, config = parse_recipe_args([DistillScriptArguments, DistillationConfig], argv, "hf-interop distill")
    assert config.overwrite_output_dir is True and config.allow_pickle is True
    assert not hasattr(script_args, "overwrite_output_dir") and not hasattr(script_args, "allow_pickle")


# ---------------------------------------------------------------------------------------------- finding 8


def _enospc_in_trainer_state_write(monkeypatch):
    """The 2nd checkpoint's trainer_state.json write hits a full disk after half its bytes (OSError ENOSPC)."""
    import transformers.trainer_callback as trainer_callback

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def write(self, text):
            self.handle.write(text[: len(text) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    def fake_open(path, *args, **kwargs):
        handle = open(path, *args, **kwargs)
        return FullDisk(handle) if "checkpoint-2" in str(path) else handle

    monkeypatch.setattr(trainer_callback, "open", fake_open, raising=False)


def _torch_unexpected_pos_in_optimizer_save(monkeypatch):
    """The 2nd checkpoint's optimizer.pt stops halfway with torch's zip-writer error (what a full disk gives)."""
    real_save = torch.save

    def fake_save(obj, path, *args, **kwargs):
        if "checkpoint-2" in str(path) and str(path).endswith("optimizer.pt"):
            real_save(obj, path, *args, **kwargs)
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 2])
            raise RuntimeError(f"[enforce fail at inline_container.cc:672] . unexpected pos {len(data) // 2} vs 9")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fake_save)


@pytest.mark.parametrize("fault", [_enospc_in_trainer_state_write, _torch_unexpected_pos_in_optimizer_save])
def test_a_full_disk_during_a_checkpoint_names_it_and_the_run_resumes_from_the_last_good_one(
    fault, tmp_path, corpus_tokenizer, teacher_dir, train_rows, monkeypatch, caplog
):
    output_dir = tmp_path / "out"
    settings = dict(max_steps=3, save_strategy="steps", save_steps=1)
    trainer = make_trainer(corpus_tokenizer, teacher_dir, train_rows, output_dir, **settings)
    with monkeypatch.context() as patch:
        fault(patch)
        with pytest.raises(OSError) as raised:
            trainer.train()
    message = str(raised.value)
    assert raised.value.errno == errno.ENOSPC
    assert "no space left on device" in message and repr(str(output_dir / "checkpoint-2")) in message
    assert "checkpoint-1" in message.replace(str(output_dir / "checkpoint-2"), "")
    assert not (output_dir / "checkpoint-2").exists(), "no half checkpoint is left behind"
    json.loads((output_dir / "checkpoint-1" / "trainer_state.json").read_text())
    assert {"model.safetensors", "optimizer.pt", "trainer_state.json"} <= set(
        folder_bytes(output_dir / "checkpoint-1")
    )

    resumed = make_trainer(corpus_tokenizer, teacher_dir, train_rows, output_dir, **settings)
    loaded = []
    original = DistillationTrainer._load_from_checkpoint
    monkeypatch.setattr(
        DistillationTrainer,
        "_load_from_checkpoint",
        lambda self, path, model=None: loaded.append(path) or original(self, path, model),
    )
    with caplog.at_level(logging.INFO, logger="hf_interop"):
        resumed.train(resume_from_checkpoint=True)
    assert loaded == [str(output_dir / "checkpoint-1")]
    assert "checkpoint-1" in caplog.text
    assert resumed.state.global_step == 3
    assert all((output_dir / f"checkpoint-{step}" / "trainer_state.json").is_file() for step in (1, 2, 3))


def test_resume_true_skips_a_checkpoint_a_kill_cut_short_and_warns(
    tmp_path, corpus_tokenizer, teacher_dir, train_rows, monkeypatch, caplog
):
    output_dir = tmp_path / "out"
    settings = dict(max_steps=2, save_strategy="steps", save_steps=1)
    make_trainer(corpus_tokenizer, teacher_dir, train_rows, output_dir, **settings).train()
    state_file = output_dir / "checkpoint-2" / "trainer_state.json"
    state_file.write_bytes(state_file.read_bytes()[:40])  # killed while writing the state, which comes last

    resumed = make_trainer(corpus_tokenizer, teacher_dir, train_rows, output_dir, **{**settings, "max_steps": 3})
    loaded = []
    original = DistillationTrainer._load_from_checkpoint
    monkeypatch.setattr(
        DistillationTrainer,
        "_load_from_checkpoint",
        lambda self, path, model=None: loaded.append(path) or original(self, path, model),
    )
    with caplog.at_level(logging.WARNING, logger="hf_interop"):
        resumed.train(resume_from_checkpoint=True)
    assert loaded == [str(output_dir / "checkpoint-1")]
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any("checkpoint-1" in text and "checkpoint-2" in text and "incomplete" in text for text in warnings)
    assert resumed.state.global_step == 3
    json.loads(state_file.read_text())  # the resumed run saved step 2 again, completely


def test_resume_true_without_a_complete_checkpoint_says_so(tmp_path, corpus_tokenizer, teacher_dir, train_rows):
    output_dir = tmp_path / "out"
    (output_dir / "checkpoint-4").mkdir(parents=True)
    trainer = make_trainer(corpus_tokenizer, teacher_dir, train_rows, output_dir)
    with pytest.raises(ValueError) as raised:
        trainer.train(resume_from_checkpoint=True)
    assert "no complete checkpoint" in str(raised.value) and "checkpoint-4" in str(raised.value)


# ---------------------------------------------------------------------------------------------- finding 10


@pytest.mark.parametrize(
    "which, rows, expected",
    [
        ("train_dataset", {"text": ["some text", "more text"]}, "no 'input_ids' column"),
        ("train_dataset", {"input_ids": []}, "train_dataset is empty"),
        ("eval_dataset", {"input_ids": []}, "eval_dataset is empty"),
        ("eval_dataset", {"text": ["held-out text"]}, "no 'input_ids' column"),
    ],
)
def test_datasets_that_cannot_train_are_refused_before_the_teacher_loads(
    which, rows, expected, tmp_path, corpus_tokenizer, teacher_dir, train_rows, teacher_loads
):
    datasets = {"train_dataset": train_rows, "eval_dataset": None, which: Dataset.from_dict(rows)}
    with pytest.raises(ValueError) as raised:
        DistillationTrainer(
            model=make_student(corpus_tokenizer),
            teacher_model=str(teacher_dir),
            args=make_args(tmp_path / "out"),
            processing_class=corpus_tokenizer,
            **datasets,
        )
    assert expected in str(raised.value) and which in str(raised.value)
    assert "pack_dataset" in str(raised.value)
    assert teacher_loads == []


# ---------------------------------------------------------------------------------------------- finding 13


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_native_bfloat16_warns_with_the_cost_and_the_fix(
    native, tmp_path, corpus_tokenizer, teacher_dir, train_rows, monkeypatch, caplog
):
    import hf_interop.distill.preflight as preflight
    import hf_interop.logging_utils

    monkeypatch.setattr(preflight, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(hf_interop.logging_utils, "_warned", set())  # warning_once: fresh for this test
    with caplog.at_level(logging.WARNING, logger="hf_interop"):
        make_trainer(corpus_tokenizer, teacher_dir, train_rows, tmp_path / "out", bf16=True)
        make_trainer(corpus_tokenizer, teacher_dir, train_rows, tmp_path / "out2", bf16=True)
    warnings = [record.getMessage() for record in caplog.records if "bf16" in record.getMessage()]
    if native:
        assert warnings == []
    else:
        assert len(warnings) == 1, "once per process"
        assert "15x slower than float32" in warnings[0] and "bf16=False" in warnings[0]
        assert "avx512_bf16" in warnings[0] and "bench_trainer.py" in warnings[0]


@pytest.mark.parametrize(
    "cpuinfo, native",
    [
        ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n", False),
        ("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\nprocessor\t: 1\nflags\t\t: fpu\n", True),
        ("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16 amx_tile\n", True),
        ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n", True),
        ("processor\t: 0\nFeatures\t: fp asimd crc32\n", False),
        ("", None),
    ],
)
def test_cpu_flags_tell_native_bf16(tmp_path, cpuinfo, native):
    from hf_interop.utils import cpu_flags, cpu_has_native_bf16

    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo)
    assert cpu_has_native_bf16(str(path)) is native
    if cpuinfo:
        assert "fpu" in cpu_flags(str(path)) or "fp" in cpu_flags(str(path))
    assert cpu_flags(str(tmp_path / "missing")) == []


# ---------------------------------------------------------------------------------------------- allow_pickle


def test_a_pickle_teacher_loads_only_with_allow_pickle(tmp_path, corpus_tokenizer, teacher_dir, train_rows):
    from hf_interop import load_causal_lm
    from hf_interop.loading import ModelLoadingError

    teacher, _ = load_causal_lm(teacher_dir)
    pickled = tmp_path / "pickle_teacher"
    teacher.config.save_pretrained(pickled)
    corpus_tokenizer.save_pretrained(pickled)
    torch.save(teacher.state_dict(), pickled / "pytorch_model.bin")

    with pytest.raises(ModelLoadingError, match="allow_pickle=True"):
        make_trainer(corpus_tokenizer, pickled, train_rows, tmp_path / "out")
    trainer = make_trainer(corpus_tokenizer, pickled, train_rows, tmp_path / "out", allow_pickle=True)
    for name, tensor in teacher.state_dict().items():
        torch.testing.assert_close(trainer.teacher_model.state_dict()[name], tensor)
