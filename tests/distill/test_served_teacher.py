"""A teacher behind an OpenAI-compatible server: start-up checks, cache capture, online KD, generation, faults.

The server is `tests/served_engine.py` on loopback, backed by a tiny real causal LM that shares SmolLM2's tokenizer,
so answers can be compared with the same model run in-process, and faults can be injected on demand. The real
llama.cpp server is in `test_served_teacher_llama_cpp.py`.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from served_engine import ServedEngine

from hf_interop import (
    DistillationConfig,
    DistillationTrainer,
    ServedTeacher,
    ServedTeacherError,
    TeacherLogitsCache,
    losses,
    pack_dataset,
)
from hf_interop import cache_teacher_logits as _cache_teacher_logits

TOP_K = 8


def cache_teacher_logits(*args, **kwargs):
    """Format version 1 (float16: the served answers exactly) unless a test names an encoding (`None`: the default)."""
    kwargs.setdefault("encoding", "float16")
    return _cache_teacher_logits(*args, **kwargs)


@pytest.fixture(scope="module")
def teacher(smollm2_tokenizer):
    from helpers import build_tiny_causal_lm

    return build_tiny_causal_lm("llama", 49152, seed=0, tokenizer=smollm2_tokenizer)


@pytest.fixture(scope="module")
def blocks(corpus, smollm2_tokenizer):
    return pack_dataset(corpus, smollm2_tokenizer, block_size=24)["train"].select(range(12))


@pytest.fixture
def engine(teacher, smollm2_tokenizer):
    with ServedEngine(teacher, smollm2_tokenizer, style="vllm", root="org/tiny-teacher@0123abc") as served:
        yield served


def _fast(url: str, **kwargs) -> ServedTeacher:
    return ServedTeacher(url, top_k=TOP_K, retry_backoff=0.01, **kwargs)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------- start-up checks


def test_unreachable_url_is_named_with_the_fix(smollm2_tokenizer, blocks, tmp_path):
    url = f"http://127.0.0.1:{_free_port()}/v1"
    with pytest.raises(ServedTeacherError, match="cannot reach the teacher server") as info:
        _fast(url, max_retries=1).connect(smollm2_tokenizer)
    assert url in str(info.value) and "--teacher_url" in str(info.value)
    with pytest.raises(ServedTeacherError, match="cannot reach"):
        cache_teacher_logits(url, blocks, tmp_path / "cache", top_k=TOP_K, tokenizer=smollm2_tokenizer)
    assert not (tmp_path / "cache").exists()  # nothing written before the checks pass


def test_wrong_model_name_lists_the_served_ones(engine, smollm2_tokenizer):
    with pytest.raises(ServedTeacherError, match=r"'llama-70b' is not served .* \['tiny-teacher'\]"):
        _fast(engine.url, model="llama-70b").connect(smollm2_tokenizer)


def test_api_key_missing_wrong_and_right(teacher, smollm2_tokenizer, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with ServedEngine(teacher, smollm2_tokenizer, style="vllm", api_key="sk-local") as served:
        with pytest.raises(ServedTeacherError, match=r"asks for an API key .* \$OPENAI_API_KEY"):
            _fast(served.url).connect(smollm2_tokenizer)
        with pytest.raises(ServedTeacherError, match="rejected the API key"):
            _fast(served.url, api_key="sk-wrong").connect(smollm2_tokenizer)
        monkeypatch.setenv("TEACHER_KEY", "sk-local")
        assert _fast(served.url, api_key_env="TEACHER_KEY").connect(smollm2_tokenizer).model == "tiny-teacher"


def test_top_k_above_the_servers_limit_names_max_logprobs(engine, smollm2_tokenizer):
    with pytest.raises(ServedTeacherError, match="--max-logprobs 64"):
        ServedTeacher(engine.url, top_k=64).connect(smollm2_tokenizer)


def test_a_different_tokenizer_points_to_cross_tokenizer_distillation(corpus_tokenizer, smollm2_tokenizer):
    from helpers import build_tiny_causal_lm

    other = build_tiny_causal_lm("llama", len(corpus_tokenizer), seed=0, tokenizer=corpus_tokenizer)
    for style in ("vllm", "echo"):
        with ServedEngine(other, corpus_tokenizer, style=style) as served:
            with pytest.raises(ServedTeacherError, match="CrossTokenizerDistillationTrainer"):
                _fast(served.url, position_convention="current").connect(smollm2_tokenizer)


def test_a_server_without_logprobs_is_refused(teacher, smollm2_tokenizer):
    with ServedEngine(teacher, smollm2_tokenizer, style="echo") as served:
        served.faults["no_logprobs"] = True
        with pytest.raises(ServedTeacherError, match="no prompt log-probabilities"):
            _fast(served.url, position_convention="current").connect(smollm2_tokenizer)


def test_an_untrained_echo_server_needs_an_explicit_position_convention(teacher, smollm2_tokenizer):
    with ServedEngine(teacher, smollm2_tokenizer, style="echo", convention="next") as served:
        with pytest.raises(ServedTeacherError, match="position_convention="):
            _fast(served.url).connect(smollm2_tokenizer)
        client = _fast(served.url, position_convention="next").connect(smollm2_tokenizer)
        assert client.api == "echo" and client.known_missing_positions() == [0]


def test_trainer_refuses_bad_served_settings_before_training(engine, smollm2_tokenizer, blocks, teacher, tmp_path):
    with pytest.raises(ValueError, match="top-20; use one of"):
        DistillationConfig(output_dir=str(tmp_path), teacher_url=engine.url, loss_type="skew_kl")
    with pytest.raises(ValueError, match="two teachers"):
        DistillationConfig(output_dir=str(tmp_path), teacher_url=engine.url, teacher_logits_path=str(tmp_path))
    with pytest.raises(ValueError, match="not an http"):
        DistillationConfig(output_dir=str(tmp_path), teacher_url="127.0.0.1:8000")
    args = DistillationConfig(output_dir=str(tmp_path / "out"), teacher_url=engine.url, report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="needs the student's tokenizer"):
        DistillationTrainer(model=teacher, args=args, train_dataset=blocks)
    # a URL given as teacher_model_name_or_path means a served teacher too
    aliased = DistillationConfig(output_dir=str(tmp_path), teacher_model_name_or_path=engine.url)
    assert aliased.teacher_url == engine.url and aliased.teacher_model_name_or_path is None


# ---------------------------------------------------------------------------------------------- cache capture


def test_served_cache_equals_the_in_process_cache_and_gives_the_same_loss(
    engine, teacher, smollm2_tokenizer, blocks, tmp_path
):
    served = cache_teacher_logits(
        engine.url, blocks, tmp_path / "served", top_k=TOP_K, tokenizer=smollm2_tokenizer, shard_size=5,
        show_progress=False,
    )  # fmt: skip
    native = cache_teacher_logits(
        teacher, blocks, tmp_path / "native", top_k=TOP_K, tokenizer=smollm2_tokenizer, shard_size=5,
        show_progress=False,
    )  # fmt: skip
    assert served.manifest["teacher"] == "tiny-teacher"
    unset = cache_teacher_logits(
        engine.url, blocks.select(range(2)), tmp_path / "unset", top_k=TOP_K, tokenizer=smollm2_tokenizer,
        show_progress=False, encoding=None,
    )  # fmt: skip
    assert unset.manifest["encoding"] == "compact"  # a served teacher's default: it answers its top-k only
    assert served.manifest["teacher_revision"] == "org/tiny-teacher@0123abc"
    assert served.manifest["served_teacher"]["url"] == engine.url
    for key in ("format_version", "top_k", "vocab_size", "ids_dtype", "num_rows", "tokenizer_fingerprint"):
        assert served.manifest[key] == native.manifest[key]
    features = [served.dataset[row] for row in range(4)]
    native_features = [native.dataset[row] for row in range(4)]
    served_batch, native_batch = served.collate(features), native.collate(native_features)
    # same model, same float32 math: ids and float16 values identical (ties aside, which random logits do not have)
    for name in served_batch:
        torch.testing.assert_close(served_batch[name], native_batch[name], rtol=0, atol=0)
    generator = torch.Generator().manual_seed(0)
    student_logits = torch.randn(4, 23, 49152, generator=generator, dtype=torch.float64)
    labels = torch.tensor([blocks[row]["input_ids"][1:] for row in range(4)])
    loss_served = losses.sparse_distillation_loss(student_logits, *served_batch.values(), labels).loss
    loss_native = losses.sparse_distillation_loss(student_logits, *native_batch.values(), labels).loss
    assert abs(float(loss_served) - float(loss_native)) <= 1e-6


def test_a_sampled_cache_from_a_server_draws_from_its_top_k_and_the_tail(
    engine, teacher, smollm2_tokenizer, blocks, tmp_path
):
    """A server gives its top-k only: the draws come from those entries and the mass they leave (the tail), exactly
    as the codec draws from the same rows of an in-process float16 cache (same seed, same row indices)."""
    from hf_interop.distill.teacher_cache import codec

    served = cache_teacher_logits(
        engine.url, blocks, tmp_path / "served", top_k=TOP_K, tokenizer=smollm2_tokenizer, shard_size=5,
        show_progress=False, encoding="sampled", sample_draws=16,
    )  # fmt: skip
    native = cache_teacher_logits(
        teacher, blocks, tmp_path / "native", top_k=TOP_K, tokenizer=smollm2_tokenizer, show_progress=False
    )
    assert served.manifest["format_version"] == 3 and served.sample_draws == 16
    tails = []
    for row in range(len(blocks)):
        reference = native.row(row)
        rows = [(reference["teacher_topk_ids"].numpy(), reference["teacher_topk_logprobs"].numpy().astype("float16"))]
        encoded = codec.encode_rows(rows, None, None, 49152, TOP_K, sample_draws=16, sample_seed=0, first_row=row)
        counts, ids, logprobs = codec.decode_dense(encoded, None, 49152, 16, -1.0e4, sample_draws=16)
        got = served.row(row)
        width = got["teacher_topk_ids"].shape[-1]
        assert torch.equal(got["teacher_topk_ids"], torch.from_numpy(ids[:, :width]))
        assert torch.equal(got["teacher_topk_logprobs"], torch.from_numpy(logprobs[:, :width]))
        tails.append(got["teacher_tail_logprob"].exp())
    assert float(torch.cat(tails).max()) > 0.05  # some draws landed outside the top 8: the stored tail


def test_echo_server_cache_matches_where_it_answers(teacher, smollm2_tokenizer, blocks, tmp_path):
    native = cache_teacher_logits(
        teacher, blocks, tmp_path / "native", top_k=TOP_K, tokenizer=smollm2_tokenizer, show_progress=False
    )
    with ServedEngine(teacher, smollm2_tokenizer, style="echo", convention="next") as served:
        client = _fast(served.url, position_convention="next")
        cache = cache_teacher_logits(
            client, blocks, tmp_path / "served", top_k=TOP_K, tokenizer=smollm2_tokenizer, show_progress=False
        )
    served_ids = np.array(cache.dataset[0]["teacher_topk_ids"]).reshape(-1, TOP_K)
    served_values = np.array(cache.dataset[0]["teacher_topk_logprobs"], dtype=np.float32).reshape(-1, TOP_K)
    native_ids = np.array(native.dataset[0]["teacher_topk_ids"]).reshape(-1, TOP_K)
    native_values = np.array(native.dataset[0]["teacher_topk_logprobs"], dtype=np.float32).reshape(-1, TOP_K)
    assert (served_values[0] <= -5000).all()  # the position this server never answers holds no mass
    kept = served_values[1:] > -5000
    # every kept entry is the native entry of the same rank, or a lower-ranked one after an ambiguous string dropped
    for position in range(1, served_ids.shape[0]):
        native_of = dict(zip(native_ids[position].tolist(), native_values[position].tolist(), strict=True))
        for token, value in zip(
            served_ids[position][kept[position - 1]], served_values[position][kept[position - 1]], strict=True
        ):
            assert native_of[int(token)] == value
    assert kept.mean() > 0.8
    # the trainer's collator leaves the unanswered position out of every loss
    from hf_interop.distill.collators import _PaddingCollator, _TeacherCacheCollator

    features = [cache.attach(blocks)[row] for row in range(2)]
    batch = _TeacherCacheCollator(_PaddingCollator(smollm2_tokenizer.pad_token_id), cache)(features)
    assert (batch["labels"][:, 1] == -100).all() and (batch["labels"][:, 2:] != -100).all()


def test_a_server_that_fails_mid_capture_loses_no_finished_shard_and_resume_asks_only_the_rest(
    engine, teacher, smollm2_tokenizer, blocks, tmp_path
):
    output = tmp_path / "cache"
    client = _fast(engine.url, max_retries=1, concurrency=1).connect(smollm2_tokenizer)
    asked = client.row_topk

    def row_topk(*args, **kwargs):  # from the 6th row on (shard 1), the server answers 503 to everything
        if client.statistics["tokens"] >= 5 * 24:
            engine.faults.update(status=503, status_count=None)
        return asked(*args, **kwargs)

    client.row_topk = row_topk
    with pytest.raises(ServedTeacherError, match=r"failed 2 time\(s\).*cache capture resumes when rerun"):
        cache_teacher_logits(
            client, blocks, output, top_k=TOP_K, tokenizer=smollm2_tokenizer, shard_size=5, show_progress=False
        )
    assert sorted(path.name for path in output.iterdir() if path.name.startswith("shard-")) == ["shard-00000"]
    finished = (output / "shard-00000" / "data.arrow").read_bytes()

    engine.faults.clear()
    requests_before = len(engine.requests)
    cache = cache_teacher_logits(
        engine.url, blocks, output, top_k=TOP_K, tokenizer=smollm2_tokenizer, shard_size=5, show_progress=False
    )
    completions = [r for r in engine.requests[requests_before:] if r["path"].endswith("/completions")]
    assert len(completions) == 1 + 7  # the probe, then rows 5..11 only
    assert (output / "shard-00000" / "data.arrow").read_bytes() == finished
    reference = cache_teacher_logits(
        teacher, blocks, tmp_path / "native", top_k=TOP_K, tokenizer=smollm2_tokenizer, shard_size=5,
        show_progress=False,
    )  # fmt: skip
    assert cache.dataset[:]["teacher_topk_ids"] == reference.dataset[:]["teacher_topk_ids"]
    TeacherLogitsCache.load(output, verify_checksums=True)


def test_transient_errors_are_retried(engine, smollm2_tokenizer, blocks, tmp_path):
    client = _fast(engine.url).connect(smollm2_tokenizer)
    engine.faults.update(status=500, status_count=2)
    client.row_topk(blocks[0]["input_ids"])
    engine.faults.update(status=429, status_count=1, drop_connection=True, drop_connection_count=1)
    client.row_topk(blocks[1]["input_ids"])
    assert client.statistics["retries"] >= 4


def test_slow_answers_time_out_and_stop_with_a_clear_error(engine, smollm2_tokenizer, blocks, tmp_path):
    client = ServedTeacher(engine.url, top_k=TOP_K, timeout=60.0, max_retries=1, retry_backoff=0.01)
    client.connect(smollm2_tokenizer)  # start-up checks at a generous timeout: a loaded machine answers late
    client.timeout = 0.3
    engine.faults["delay"] = 1.0
    with pytest.raises(ServedTeacherError, match="ReadTimeout"):
        cache_teacher_logits(
            client, blocks, tmp_path / "cache", top_k=TOP_K, tokenizer=smollm2_tokenizer, show_progress=False
        )
    engine.faults.clear()
    assert not any(path.name.startswith("shard-") for path in (tmp_path / "cache").iterdir())


@pytest.mark.parametrize(
    ("fault", "message"), [("short", "fewer than asked"), ("nan", "not a finite"), ("neginf", "not a finite")]
)
def test_broken_answers_stop_the_capture_and_write_no_shard(
    engine, smollm2_tokenizer, blocks, tmp_path, fault, message
):
    client = _fast(engine.url).connect(smollm2_tokenizer)
    engine.faults[fault] = 3 if fault == "short" else True
    with pytest.raises(Exception, match=message):
        cache_teacher_logits(
            client, blocks, tmp_path / "cache", top_k=TOP_K, tokenizer=smollm2_tokenizer, show_progress=False
        )
    assert not any(path.name.startswith("shard-") for path in (tmp_path / "cache").iterdir())


# ---------------------------------------------------------------------------------------------- online KD


def _args(tmp_path, name, **overrides):
    from helpers import make_distillation_args

    defaults = dict(max_steps=3, per_device_train_batch_size=4, logging_steps=1, seed=0, kd_ratio=0.5)
    defaults.update(overrides)
    return make_distillation_args(tmp_path / name, **defaults)


def _student(smollm2_tokenizer):
    from helpers import build_tiny_causal_lm

    return build_tiny_causal_lm("llama", 49152, seed=1, tokenizer=smollm2_tokenizer)


def test_online_kd_from_a_served_teacher_equals_kd_from_its_cache(
    engine, teacher, smollm2_tokenizer, blocks, tmp_path
):
    cache = cache_teacher_logits(
        teacher, blocks, tmp_path / "cache", top_k=TOP_K, tokenizer=smollm2_tokenizer, show_progress=False
    )
    served_args = _args(tmp_path, "served", teacher_url=engine.url, teacher_top_k=TOP_K)
    served = DistillationTrainer(
        model=_student(smollm2_tokenizer), args=served_args, train_dataset=blocks, processing_class=smollm2_tokenizer
    )
    seen_requests = []
    compute_loss = served.compute_loss

    def counting(*args, **kwargs):
        seen_requests.append(served.served_teacher.statistics["submitted"])
        return compute_loss(*args, **kwargs)

    served.compute_loss = counting
    served.train()
    cached_args = _args(tmp_path, "cached", teacher_logits_path=str(cache.path))
    cached = DistillationTrainer(
        model=_student(smollm2_tokenizer), args=cached_args, train_dataset=blocks, processing_class=smollm2_tokenizer
    )
    cached.train()
    served_losses = [entry["loss"] for entry in served.state.log_history if "loss" in entry]
    cached_losses = [entry["loss"] for entry in cached.state.log_history if "loss" in entry]
    assert len(served_losses) == 3
    np.testing.assert_allclose(served_losses, cached_losses, rtol=0, atol=1e-6)
    # prefetch: when the first loss is computed, the next batch's 4 rows were already sent, not only this batch's
    assert seen_requests[0] >= 2 * 4
    assert "teacher_wait_seconds" in served.state.log_history[0]
    served.save_model()
    card = (tmp_path / "served" / "README.md").read_text()
    assert "tiny-teacher" in card and "org/tiny-teacher@0123abc" in card


def test_training_stops_naming_the_step_when_the_server_sends_garbage(engine, smollm2_tokenizer, blocks, tmp_path):
    args = _args(tmp_path, "run", teacher_url=engine.url, teacher_top_k=TOP_K, teacher_max_retries=0)
    trainer = DistillationTrainer(
        model=_student(smollm2_tokenizer), args=args, train_dataset=blocks, processing_class=smollm2_tokenizer
    )
    engine.faults["nan"] = True
    with pytest.raises(ValueError, match=r"at training step 0 .*served teacher failed on batch .*not a finite"):
        trainer.train()


def test_sequence_level_kd_generates_with_the_server_and_on_policy_with_a_served_student(
    engine, teacher, smollm2_tokenizer, blocks, tmp_path
):
    args = _args(
        tmp_path,
        "seq",
        teacher_url=engine.url,
        teacher_top_k=TOP_K,
        seq_kd=True,
        max_new_tokens=4,
        max_steps=1,
        generation_prompt_length=8,
    )
    trainer = DistillationTrainer(
        model=_student(smollm2_tokenizer), args=args, train_dataset=blocks, processing_class=smollm2_tokenizer
    )
    trainer.train()
    generations = [r for r in engine.requests if r["body"].get("max_tokens") == 4]
    assert len(generations) == 4 and all(len(r["body"]["prompt"]) == 8 for r in generations)
    assert np.isfinite(trainer.state.log_history[0]["loss"])
    with ServedEngine(
        _student(smollm2_tokenizer), smollm2_tokenizer, style="vllm", model_name="student"
    ) as student_server:
        args = _args(
            tmp_path,
            "policy",
            teacher_url=engine.url,
            teacher_top_k=TOP_K,
            lmbda=1.0,
            max_new_tokens=3,
            max_steps=1,
            student_generation_url=student_server.url,
        )
        trainer = DistillationTrainer(
            model=_student(smollm2_tokenizer), args=args, train_dataset=blocks, processing_class=smollm2_tokenizer
        )
        trainer.train()
        assert len([r for r in student_server.requests if r["body"].get("max_tokens") == 3]) == 4


# ---------------------------------------------------------------------------------------------- across tokenizers


def test_a_served_teacher_with_another_tokenizer_distils_across_tokenizers(corpus, corpus_tokenizer, tmp_path):
    """The server's full distribution (top_k = its whole 512-token vocabulary) through the span-aligned loss gives
    the in-process cross-tokenizer loss, up to the float16 rounding of the answers."""
    from helpers import build_tiny_causal_lm

    from hf_interop.distill.cross_tokenizer_config import CrossTokenizerDistillationConfig
    from hf_interop.distill.cross_tokenizer_trainer import CrossTokenizerDistillationTrainer
    from hf_interop.loading import load_gpt2_tokenizer
    from hf_interop.text_alignment import split_texts_into_chunks

    gpt2 = load_gpt2_tokenizer()
    teacher = build_tiny_causal_lm("llama", len(corpus_tokenizer), seed=0, tokenizer=corpus_tokenizer)
    train = split_texts_into_chunks(corpus["train"].select(range(3)), gpt2, max_tokens=24)
    losses_by_teacher = {}
    with ServedEngine(teacher, corpus_tokenizer, style="vllm", max_logprobs=512) as server:
        for name, teacher_settings in (("served", {"teacher_url": server.url}), ("in_process", {})):
            args = CrossTokenizerDistillationConfig(
                output_dir=str(tmp_path / name), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                max_length=24, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                teacher_top_k=len(corpus_tokenizer), **teacher_settings,
            )  # fmt: skip
            trainer = CrossTokenizerDistillationTrainer(
                model=build_tiny_causal_lm("gpt2", len(gpt2), seed=1, tokenizer=gpt2),
                teacher_model=None if teacher_settings else teacher,
                args=args,
                train_dataset=train,
                processing_class=gpt2,
                teacher_processing_class=corpus_tokenizer,
            )
            trainer.train()
            losses_by_teacher[name] = [entry["kd_loss"] for entry in trainer.state.log_history if "kd_loss" in entry]
        # the student's tokenizer differs: without the cross-tokenizer trainer, the server is refused at start
        with pytest.raises(ServedTeacherError, match="CrossTokenizerDistillationTrainer"):
            DistillationTrainer(
                model=build_tiny_causal_lm("gpt2", len(gpt2), seed=1, tokenizer=gpt2),
                args=_args(tmp_path, "same", teacher_url=server.url),
                train_dataset=pack_dataset(corpus, gpt2, block_size=24)["train"].select(range(4)),
                processing_class=gpt2,
            )
    assert len(losses_by_teacher["served"]) == 2
    np.testing.assert_allclose(losses_by_teacher["served"], losses_by_teacher["in_process"], rtol=2e-3)


def test_cache_teacher_command_with_a_teacher_url(engine, smollm2_dir, tmp_path):
    from hf_interop.cli import RECIPES, parse_recipe_args

    types, run, _ = RECIPES["cache-teacher"]
    base = ["--teacher_url", engine.url, "--output_dir", str(tmp_path / "cache"), "--block_size", "16"]
    base += ["--max_train_blocks", "3", "--top_k", str(TOP_K), "--disable_tqdm", "true"]
    (script_args,) = parse_recipe_args(types(), base, prog="hf-interop cache-teacher")
    with pytest.raises(ValueError, match="--teacher_url needs --tokenizer"):
        run(script_args)
    (script_args,) = parse_recipe_args(
        types(), [*base, "--tokenizer", str(smollm2_dir)], prog="hf-interop cache-teacher"
    )
    result = run(script_args)
    assert result["num_rows"] == 3 and result["cache"].manifest["teacher"] == "tiny-teacher"
    assert result["cache"].manifest["top_k"] == TOP_K


def test_answers_are_awaited_in_data_loader_workers(engine, smollm2_tokenizer, blocks, tmp_path):
    results = {}
    for workers in (0, 2):
        args = _args(tmp_path, f"workers{workers}", teacher_url=engine.url, teacher_top_k=TOP_K, max_steps=1)
        args.dataloader_num_workers = workers
        trainer = DistillationTrainer(
            model=_student(smollm2_tokenizer), args=args, train_dataset=blocks, processing_class=smollm2_tokenizer
        )
        trainer.train()
        results[workers] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    np.testing.assert_allclose(results[2], results[0], rtol=0, atol=1e-6)


def test_served_answers_in_a_compact_cache(teacher, smollm2_tokenizer, blocks, tmp_path):
    """Unfilled slots (PAD_LOGPROB) are not kept by the compact encoding and do not widen its quantisation step."""
    from hf_interop.distill.teacher_cache.format import PAD_LOGPROB

    native = cache_teacher_logits(
        teacher, blocks, tmp_path / "native", top_k=TOP_K, tokenizer=smollm2_tokenizer, encoding="compact",
        top_p=1.0, logprob_bits=8, show_progress=False,
    )  # fmt: skip
    with ServedEngine(teacher, smollm2_tokenizer, style="echo", convention="next") as served:
        client = _fast(served.url, position_convention="next")
        cache = cache_teacher_logits(
            client, blocks, tmp_path / "served", top_k=TOP_K, tokenizer=smollm2_tokenizer, encoding="compact",
            top_p=1.0, logprob_bits=8, show_progress=False,
        )  # fmt: skip
    assert cache.is_compact
    for index in range(3):
        row, reference = cache.row(index), native.row(index)
        kept = row["teacher_topk_logprobs"] > PAD_LOGPROB
        assert not bool(kept[0].any())  # the position this server never answers keeps nothing
        assert bool(kept[1:].any(-1).all())
        # every kept entry is within the 8-bit step of the native compact cache's value for that id
        for position in range(1, kept.shape[0]):
            native_of = dict(
                zip(
                    reference["teacher_topk_ids"][position].tolist(),
                    reference["teacher_topk_logprobs"][position].tolist(),
                    strict=True,
                )
            )
            for token, value in zip(
                row["teacher_topk_ids"][position][kept[position]].tolist(),
                row["teacher_topk_logprobs"][position][kept[position]].tolist(),
                strict=True,
            ):
                assert abs(native_of.get(token, value) - value) < 0.1
