"""Multi-teacher distillation vs weight merges of the same two specialists, on two real text domains.

Two LoRA specialists of SmolLM2-135M-Instruct (`default_teacher`), one on Python's language reference and one on
Debian's fortunes, each trained by `recipes/smollm2-135m_merge_domains/adapt_<domain>.yaml` (the texts from that
recipe's `prepare_texts.py`, split by document into train / fit / eval), exported merged. Then, per-domain held-out
perplexity on the eval documents and the mean of the two domains for:

- the base model and each specialist (135M parameters);
- weight merges of the two specialists (135M, teacher-sized): TIES (density 0.5) and task arithmetic (1.0 and 0.5
  per task vector), `hf_interop.merge_checkpoints`;
- a student of `STUDENT_LAYERS` of the teacher's 30 layers (`init_student_from_teacher`, as in
  `recipes/smollm2-135m_to_smollm2-l10/`), trained from the same initial weights on the same shuffled blocks of both
  domains' train documents, same steps, batch, schedule and seed, three ways: cross-entropy only
  (`transformers.Trainer`), routed multi-teacher distillation (each block taught by its domain's specialist,
  `MultiTeacherDistillationTrainer`, `teacher_combination="route"`), and a mixture of both specialists with
  per-example confidence weights (`"mixture"`, `teacher_weighting="confidence"`).

Each variant trains in its own single-threaded process, side by side with the others (load hits them alike; on a
heavily shared 2-core machine several single-threaded processes lose less time at intra-op barriers than one
two-threaded one). Specialists, merges, the initial student, the trained students and every evaluation are kept in
WORK_DIR (default /tmp/bench_multi_teacher) so that a rerun skips what is done (a rerun while students still train
waits for them instead of starting them twice); the result table is rewritten after every row.

Run: `python benchmarks/bench_multi_teacher.py [WORK_DIR]`: about 50 minutes on the 2-core machine at load average
10-20 (specialists 8 minutes, the three students 21-37 minutes side by side); not timed on an idle machine.
Environment overrides (the table states what ran): BENCH_MT_SPECIALIST_STEPS (10), BENCH_MT_STUDENT_STEPS (30),
BENCH_MT_STUDENT_LAYERS (10), BENCH_MT_EVAL_BLOCKS (8 per domain), BENCH_MT_CONFIDENCE_TEMPERATURE (0.1),
BENCH_MT_CHILD_THREADS (1).

`python benchmarks/bench_multi_teacher.py --fusion [WORK_DIR]` (BENCH_MT_FUSION_STEPS, 40): SmolLM2-135M and
Gemma-3-270M (two tokenizers) fused into a GPT-2-tokenizer student (`cross_tokenizer=True`, confidence-weighted
mixture) vs CE-only and vs distilling from each teacher alone, same rows and steps: held-out bits per byte. Both
parts write their section of `results/multi_teacher.md`.

Target (issue 18): the routed or mixed student beats the best weight merge on the mean of the two domains' held-out
perplexities. The merges keep all 135M parameters; the student has fewer, so the table also gives the gain of each
student over the CE-only student of the same size.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import write_result
from bench_merge import BLOCK_SIZE, RECIPE_DIR, _blocks

DOMAINS = ("python_docs", "fortunes")
SPECIALIST_STEPS = int(os.environ.get("BENCH_MT_SPECIALIST_STEPS", 10))
STUDENT_STEPS = int(os.environ.get("BENCH_MT_STUDENT_STEPS", 30))
STUDENT_LAYERS = int(os.environ.get("BENCH_MT_STUDENT_LAYERS", 10))
EVAL_BLOCKS = int(os.environ.get("BENCH_MT_EVAL_BLOCKS", 8))
CONFIDENCE_TEMPERATURE = float(os.environ.get("BENCH_MT_CONFIDENCE_TEMPERATURE", 0.1))
CHILD_THREADS = int(os.environ.get("BENCH_MT_CHILD_THREADS", 1))
BATCH_SIZE = 4
LEARNING_RATE = 3e-4
KD_RATIO = 0.5
MERGES = {  # label -> merge_checkpoints options (base added later)
    "TIES merge (density 0.5, weights 1.0)": dict(method="ties", weights=[1.0, 1.0], density=0.5),
    "task-arithmetic merge (1.0 each)": dict(method="task_arithmetic", weights=[1.0, 1.0]),
    "task-arithmetic merge (0.5 each)": dict(method="task_arithmetic", weights=[0.5, 0.5]),
}
STUDENTS = {  # variant -> label
    "ce": "student, cross-entropy only",
    "route": "student, routed multi-teacher KD",
    "mixture": "student, mixture KD, confidence weights",
}


def _load_prepare_texts():
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare_texts", RECIPE_DIR / "prepare_texts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _child_environment() -> dict:
    """One torch thread per child process: several single-threaded processes waste less time at intra-op barriers
    than one multi-threaded process on a heavily shared 2-core machine."""
    return {**os.environ, "OMP_NUM_THREADS": str(CHILD_THREADS), "MKL_NUM_THREADS": str(CHILD_THREADS)}


def _start_specialist(work_dir: Path, domain: str, files: dict) -> subprocess.Popen | None:
    """Start training the LoRA specialist of `domain` by the recipe's adapt config (None when already there)."""
    output = work_dir / f"lora_{domain}"
    info_file = output / "bench_steps.json"
    if info_file.is_file() and json.loads(info_file.read_text())["steps"] == SPECIALIST_STEPS:
        return None
    args = ["adapt", "--config", str(RECIPE_DIR / f"adapt_{domain}.yaml"), "--dataset", str(files["train"])]
    args += ["--eval_dataset", str(files["eval"]), "--max_eval_blocks", "4", "--output_dir", str(output)]
    args += ["--overwrite_output_dir", "true", "--disable_tqdm", "true", "--max_steps", str(SPECIALIST_STEPS)]
    args += ["--logging_steps", "1"]
    log = open(work_dir / f"adapt_{domain}.log", "w")  # noqa: SIM115 - closed with the process
    command = [sys.executable, "-c", "import sys; from hf_interop.cli import main; sys.exit(main(sys.argv[1:]))"]
    process = subprocess.Popen([*command, *args], stdout=log, stderr=subprocess.STDOUT, env=_child_environment())
    process.bench_info = (info_file, _load_average(), time.perf_counter(), domain)
    return process


def _finish(process: subprocess.Popen | None) -> None:
    if process is None:
        return
    info_file, load, start, domain = process.bench_info
    if process.wait() != 0:
        raise RuntimeError(f"the {domain} specialist failed to train; see adapt_{domain}.log in the work dir")
    info = {"steps": SPECIALIST_STEPS, "seconds": round(time.perf_counter() - start), "load": load}
    info_file.write_text(json.dumps(info))


def _training_rows(texts: dict, tokenizer):
    """STUDENT_STEPS x BATCH_SIZE blocks, half from each domain's train documents, shuffled, with a teacher column."""
    from datasets import concatenate_datasets

    per_domain = STUDENT_STEPS * BATCH_SIZE // len(DOMAINS)
    parts = []
    for domain in DOMAINS:
        blocks = _blocks(texts[domain]["train"], tokenizer, per_domain).select_columns(["input_ids"])
        parts.append(blocks.add_column("teacher", [domain] * len(blocks)))
    return concatenate_datasets(parts).shuffle(seed=0)


def _train_child(spec_json: str) -> None:
    """Runs in a fresh process: train one student variant, save it, print JSON (seconds, last logs)."""
    import torch
    from transformers import Trainer, TrainingArguments

    from hf_interop import (
        MultiTeacherDistillationConfig,
        MultiTeacherDistillationTrainer,
        load_causal_lm,
    )
    from hf_interop.distill.collators import _PaddingCollator

    spec = json.loads(spec_json)
    texts = {domain: {part: Path(path) for part, path in files.items()} for domain, files in spec["texts"].items()}
    torch.manual_seed(0)
    student, tokenizer = load_causal_lm(spec["student_init"], dtype="float32")
    rows = _training_rows(texts, tokenizer)
    training = dict(
        output_dir=spec["output_dir"] + ".run",
        max_steps=STUDENT_STEPS,
        per_device_train_batch_size=BATCH_SIZE,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="cosine",
        warmup_steps=5,
        weight_decay=0.0,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    collator = _PaddingCollator(tokenizer.pad_token_id)
    variant = spec["variant"]
    if variant == "ce":
        trainer = Trainer(
            model=student,
            args=TrainingArguments(**training),
            train_dataset=rows.select_columns(["input_ids"]),
            data_collator=collator,
        )
    else:
        options = dict(teacher_combination="route")
        if variant == "mixture":
            options = dict(
                teacher_combination="mixture",
                teacher_weighting="confidence",
                confidence_temperature=CONFIDENCE_TEMPERATURE,
            )
        config = MultiTeacherDistillationConfig(
            teachers=spec["teachers"],
            loss_type="forward_kl",
            kd_ratio=KD_RATIO,
            temperature=1.0,
            teacher_dtype="float32",
            **options,
            **training,
        )
        trainer = MultiTeacherDistillationTrainer(
            model=student, args=config, train_dataset=rows, processing_class=tokenizer, data_collator=collator
        )
    load, start = _load_average(), time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    student.save_pretrained(spec["output_dir"])
    tokenizer.save_pretrained(spec["output_dir"])
    info = {"steps": STUDENT_STEPS, "seconds": seconds, "load_at_start": load, "last_log": logs[-1] if logs else {}}
    (Path(spec["output_dir"]) / "bench_run.json").write_text(json.dumps(info))
    print(json.dumps(info))


def _student_dir(work_dir: Path, variant: str) -> Path:
    return work_dir / f"student_{variant}_{STUDENT_LAYERS}l_{STUDENT_STEPS}s"


def _start_student(
    work_dir: Path, variant: str, student_init: Path, teachers: dict, texts: dict
) -> subprocess.Popen | int | None:
    """Start training one student variant in its own process (None when already trained, the pid of a process
    still training it from an earlier run)."""
    output = _student_dir(work_dir, variant)
    if (output / "bench_run.json").is_file():
        return None
    pid_file = work_dir / f"student_{variant}.pid"
    if pid_file.is_file() and _alive(int(pid_file.read_text())):  # a rerun while an earlier run still trains it
        return int(pid_file.read_text())
    spec = {
        "variant": variant,
        "student_init": str(student_init),
        "teachers": {name: str(path) for name, path in teachers.items()},
        "texts": {domain: {part: str(path) for part, path in files.items()} for domain, files in texts.items()},
        "output_dir": str(output),
    }
    log = open(work_dir / f"student_{variant}.log", "w")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(
        [sys.executable, __file__, "--train-child", json.dumps(spec)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=_child_environment(),
    )
    pid_file.write_text(str(process.pid))
    return process


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _wait_student(work_dir: Path, variant: str, process: subprocess.Popen | int | None) -> None:
    if isinstance(process, subprocess.Popen):
        process.wait()
    while isinstance(process, int) and _alive(process):
        time.sleep(5)
    if not (_student_dir(work_dir, variant) / "bench_run.json").is_file():
        raise RuntimeError(f"the {variant} student failed; see student_{variant}.log in {work_dir}")


def main(work_dir: Path) -> None:
    import torch

    from hf_interop import (
        default_teacher_path,
        evaluate_perplexity,
        init_student_from_teacher,
        load_causal_lm,
        load_tokenizer,
        merge_checkpoints,
    )

    torch.manual_seed(0)
    torch.set_num_threads(CHILD_THREADS)
    work_dir.mkdir(parents=True, exist_ok=True)
    texts = {domain: _load_prepare_texts().prepare_texts(work_dir / "texts")[domain] for domain in DOMAINS}
    base = default_teacher_path()
    tokenizer = load_tokenizer(str(base))
    eval_sets = {domain: _blocks(texts[domain]["eval"], tokenizer, EVAL_BLOCKS) for domain in DOMAINS}
    perplexities: dict[str, dict[str, float]] = {}
    sizes: dict[str, float] = {}
    notes: dict[str, str] = {}

    cache_file = work_dir / f"evaluations_{EVAL_BLOCKS}blocks.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}

    def evaluate(label: str, folder: Path | str, note: str = "") -> None:
        key = f"{folder}@{(Path(folder) / 'model.safetensors').stat().st_mtime_ns}"
        if key in cache:  # a rerun: this checkpoint was scored on these blocks already
            sizes[label], values = cache[key]
        else:
            model, _ = load_causal_lm(str(folder), load_tokenizer_too=False, dtype="float32")
            sizes[label] = sum(parameter.numel() for parameter in model.parameters()) / 1e6
            values = {
                domain: evaluate_perplexity(model, blocks, batch_size=8, show_progress=False)["perplexity"]
                for domain, blocks in eval_sets.items()
            }
            values["mean"] = sum(values.values()) / len(DOMAINS)
            cache[key] = [sizes[label], values]
            cache_file.write_text(json.dumps(cache))
        perplexities[label], notes[label] = values, note
        print(f"{label}: {values} (load {_load_average()})", flush=True)
        _write(work_dir, perplexities, sizes, notes, eval_sets)

    # the specialists train side by side while the base and the initial student are evaluated here
    processes = [_start_specialist(work_dir, domain, texts[domain]) for domain in DOMAINS]
    evaluate("base (SmolLM2-135M-Instruct)", base)
    student_init = work_dir / f"student_init_{STUDENT_LAYERS}l"
    if not (student_init / "model.safetensors").is_file():
        init_student_from_teacher(str(base), num_layers=STUDENT_LAYERS, output_dir=str(student_init), overwrite=True)
    init_label = f"student before training ({STUDENT_LAYERS} of 30 layers)"
    evaluate(init_label, student_init)
    for process in processes:
        _finish(process)
    specialists = {domain: work_dir / f"lora_{domain}" / "merged" for domain in DOMAINS}

    # the three students train side by side (load hits them alike) while the merges are made and evaluated here
    students = [_start_student(work_dir, variant, student_init, specialists, texts) for variant in STUDENTS]
    for domain in DOMAINS:
        info = json.loads((specialists[domain].parent / "bench_steps.json").read_text())
        note = f"{info['steps']} LoRA steps, {info['seconds']} s, load {info.get('load', '?')}"
        evaluate(f"specialist: {domain}", specialists[domain], note)
    for index, (label, options) in enumerate(MERGES.items()):
        output = work_dir / f"merge{index}_{SPECIALIST_STEPS}s"
        if not (output / "model.safetensors").is_file():
            start = time.perf_counter()
            merge_checkpoints(
                [str(specialists[domain]) for domain in DOMAINS],
                base=str(base),
                output_dir=str(output),
                show_progress=False,
                **options,
            )
            print(f"{label}: {time.perf_counter() - start:.0f} s", flush=True)
        evaluate(label, output, "135M: teacher-sized, not the student's size")
    for variant, process in zip(STUDENTS, students, strict=True):
        _wait_student(work_dir, variant, process)
    for variant, label in STUDENTS.items():
        run = json.loads((_student_dir(work_dir, variant) / "bench_run.json").read_text())
        note = f"{run['steps']} steps, {run['seconds']:.0f} s ({run['seconds'] / run['steps']:.1f} s/step), "
        note += f"load at start {run['load_at_start']}"
        weights = {
            key: round(value, 3)
            for key, value in run["last_log"].items()
            if key.startswith(("teacher_share/", "teacher_weight/"))
        }
        if weights:
            note += f"; last log {weights}"
        evaluate(label, _student_dir(work_dir, variant), note)


def _write(work_dir: Path, perplexities: dict, sizes: dict, notes: dict, eval_sets: dict) -> None:
    merges = [label for label in MERGES if label in perplexities]
    students = {variant: label for variant, label in STUDENTS.items() if label in perplexities}
    lines = [
        f"Two LoRA specialists (r 8, {SPECIALIST_STEPS} steps of {BATCH_SIZE} x {BLOCK_SIZE} tokens, lr 1e-3; "
        "`recipes/smollm2-135m_merge_domains/adapt_<domain>.yaml`) of SmolLM2-135M-Instruct, one on Python's "
        "language reference, one on Debian's fortunes. Held-out perplexity on each domain's eval documents "
        f"({', '.join(f'{d} {len(b)}' for d, b in eval_sets.items())} blocks of {BLOCK_SIZE} tokens) and the mean of "
        f"the two. Students: {STUDENT_LAYERS} of the teacher's 30 layers (`init_student_from_teacher`, uniform), "
        f"the same initial weights, {STUDENT_STEPS} steps of {BATCH_SIZE} x {BLOCK_SIZE} tokens (half from each "
        f"domain's train documents, same shuffled order), AdamW lr {LEARNING_RATE}, cosine, seed 0; KD variants: "
        f"forward KL, kd_ratio {KD_RATIO} (the rest cross-entropy), T 1; the mixture's confidence temperature is "
        f"{CONFIDENCE_TEMPERATURE}. The merges keep all 135M parameters (teacher-sized): they are NOT at the "
        "student's size. CPU float32; a shared 2-core machine (load average at each start in the notes).",
        "",
        "| model | params (M) | python_docs | fortunes | mean | notes |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for label, values in perplexities.items():
        cells = " | ".join(f"{values[domain]:.2f}" for domain in DOMAINS)
        lines.append(f"| {label} | {sizes[label]:.1f} | {cells} | {values['mean']:.2f} | {notes[label]} |")
    ce = perplexities.get(STUDENTS["ce"])
    results: dict = {}
    if merges and len(students) > 1:
        best_merge = min(merges, key=lambda label: perplexities[label]["mean"])
        best_value = perplexities[best_merge]["mean"]
        lines.append("")
        for variant in ("route", "mixture"):
            if variant not in students:
                continue
            value = perplexities[students[variant]]["mean"]
            met = value < best_value
            results[variant] = {"mean": value, "best_merge": best_value, "beats_best_merge": met}
            sentence = (
                f"{students[variant]}: mean perplexity {value:.2f} vs the best merge ({best_merge}) {best_value:.2f}, "
                f"x{value / best_value:.2f}: target {'met' if met else 'NOT met'}"
            )
            if ce is not None:
                gain = math.log(ce["mean"]) - math.log(value)
                sentence += (
                    f"; vs CE-only at equal size and steps x{value / ce['mean']:.3f} ({gain:+.3f} nats of mean)"
                )
                results[variant]["vs_ce"] = value / ce["mean"]
            lines.append(sentence + ".")
    data = {
        "perplexities": perplexities,
        "parameters_millions": sizes,
        "notes": notes,
        "targets": results,
        "settings": {
            "specialist_steps": SPECIALIST_STEPS,
            "student_steps": STUDENT_STEPS,
            "student_layers": STUDENT_LAYERS,
            "batch_size": BATCH_SIZE,
            "block_size": BLOCK_SIZE,
            "learning_rate": LEARNING_RATE,
            "kd_ratio": KD_RATIO,
            "confidence_temperature": CONFIDENCE_TEMPERATURE,
            "eval_blocks": {domain: len(blocks) for domain, blocks in eval_sets.items()},
        },
    }
    _publish(work_dir, "specialists", "\n".join(lines), data)


SECTIONS = {
    "specialists": "Two SmolLM2 specialists: routed / mixed student vs weight merges",
    "fusion": "SmolLM2 + Gemma-3-270M fused into a GPT-2-tokenizer student",
    # an earlier fusion run kept beside a later one (its section file renamed by hand)
    "fusion_bucket": "The same fusion with unmatched_vocabulary='bucket' (the default; the earlier run)",
}


def _publish(work_dir: Path, part: str, markdown: str, data: dict) -> None:
    """Store this part's section in WORK_DIR, then write `results/multi_teacher.md` with every section done so far."""
    (work_dir / f"section_{part}.json").write_text(json.dumps({"markdown": markdown, "data": data}, default=str))
    texts, everything = [], {}
    for name, title in SECTIONS.items():
        stored = work_dir / f"section_{name}.json"
        if stored.is_file():
            section = json.loads(stored.read_text())
            texts.append(f"### {title}\n\n{section['markdown']}")
            everything[name] = section["data"]
    write_result("multi_teacher", "\n\n".join(texts), everything)


# ----------------------------------------------------------------------------------------------------------------
# --fusion: SmolLM2 + Gemma-3-270M (two tokenizers) fused into a GPT-2-tokenizer student
# ----------------------------------------------------------------------------------------------------------------

FUSION_STEPS = int(os.environ.get("BENCH_MT_FUSION_STEPS", 40))
FUSION_TOKENS = 64  # student tokens per training row (the start token comes on top)
FUSION_LEARNING_RATE = 3e-3
FUSION_EVAL_TEXTS = 32
FUSION_TEACHERS = {"smollm2": "default_teacher", "gemma": "gemma3_270m"}
# `unmatched_vocabulary` of the KD runs: bucket (the default) or prefix (teacher tokens GPT-2 lacks count for their
# longest GPT-2 prefix; Gemma-3 puts 22% of its mass on such tokens here)
FUSION_UNMATCHED = os.environ.get("BENCH_MT_FUSION_UNMATCHED", "bucket")
FUSION_VARIANTS = {  # variant -> (label, teachers)
    "ce": ("student, cross-entropy only", []),
    "smollm2": ("student, KD from SmolLM2-135M alone", ["smollm2"]),
    "gemma": ("student, KD from Gemma-3-270M alone", ["gemma"]),
    "fusion": ("student, fusion of both (mixture, confidence weights)", ["smollm2", "gemma"]),
}


def _fusion_texts():
    from hf_interop import load_builtin_corpus, load_gpt2_tokenizer
    from hf_interop.text_alignment import split_texts_into_chunks

    corpus, tokenizer = load_builtin_corpus(), load_gpt2_tokenizer()
    train = split_texts_into_chunks(corpus["train"], tokenizer, max_tokens=FUSION_TOKENS)
    validation = split_texts_into_chunks(corpus["validation"], tokenizer, max_tokens=FUSION_TOKENS)
    return train, list(validation["text"][:FUSION_EVAL_TEXTS]), tokenizer


def _fusion_child(spec_json: str) -> None:
    """Runs in a fresh process: train one GPT-2-tokenizer student variant, score it in bits per byte, print JSON."""
    import torch
    from bench_cross_tokenizer import _StudentOnly, bits_per_byte
    from transformers import Trainer, TrainingArguments

    from hf_interop import (
        MultiTeacherDistillationConfig,
        MultiTeacherDistillationTrainer,
        load_causal_lm,
        load_default_teacher,
    )
    from hf_interop.distill.cross_tokenizer_collator import CrossTokenizerDistillationCollator

    spec = json.loads(spec_json)
    _, teachers = FUSION_VARIANTS[spec["variant"]]
    train, eval_texts, tokenizer = _fusion_texts()
    torch.manual_seed(0)
    student, _ = load_causal_lm(spec["student"], dtype="float32", load_tokenizer_too=False)
    training = dict(
        output_dir=spec["output"] + ".run",
        max_steps=FUSION_STEPS,
        per_device_train_batch_size=BATCH_SIZE,
        learning_rate=FUSION_LEARNING_RATE,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, FUSION_STEPS // 10),
        weight_decay=0.0,
        seed=0,
        data_seed=0,
        logging_steps=10,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    if not teachers:  # the student's own tokens of the same rows, as the KD runs' collator cuts them
        _, smollm2_tokenizer = load_default_teacher()
        collator = CrossTokenizerDistillationCollator(tokenizer, smollm2_tokenizer, max_length=FUSION_TOKENS + 1)
        args = TrainingArguments(remove_unused_columns=False, **training)
        trainer = Trainer(model=student, args=args, train_dataset=train, data_collator=_StudentOnly(collator))
    else:
        config = MultiTeacherDistillationConfig(
            teachers={name: FUSION_TEACHERS[name] for name in teachers},
            teacher_combination="mixture",
            teacher_weighting="confidence" if len(teachers) > 1 else "static",
            confidence_temperature=1.0,
            cross_tokenizer=True,
            max_length=FUSION_TOKENS + 1,
            uld_top_k=64,
            unmatched_vocabulary=FUSION_UNMATCHED,
            loss_type="forward_kl",
            kd_ratio=KD_RATIO,
            **training,
        )
        trainer = MultiTeacherDistillationTrainer(
            model=student, args=config, train_dataset=train, processing_class=tokenizer
        )
    load, start = _load_average(), time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    bpb = bits_per_byte(student, tokenizer, eval_texts, tokenizer.eos_token_id)
    info = {"bpb": bpb, "steps": FUSION_STEPS, "seconds": seconds, "load_at_start": load}
    info["last_log"] = logs[-1] if logs else {}
    Path(spec["output"]).write_text(json.dumps(info))
    print(json.dumps(info))


def fusion(work_dir: Path) -> None:
    import importlib.util

    import torch
    from bench_cross_tokenizer import bits_per_byte

    from hf_interop import load_causal_lm
    from hf_interop.loading import resolve_model_alias

    torch.set_num_threads(CHILD_THREADS)
    work_dir.mkdir(parents=True, exist_ok=True)
    student = work_dir / "gpt2_student"
    if not (student / "model.safetensors").is_file():
        path = RECIPE_DIR.parent / "smollm2-135m+gemma-3-270m_to_gpt2-student" / "make_student.py"
        spec = importlib.util.spec_from_file_location("make_student", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.main(str(student))
    processes = {}
    for variant in FUSION_VARIANTS:  # side by side: load hits them alike
        output = work_dir / f"fusion_{variant}_{FUSION_STEPS}s.json"
        if not output.is_file():
            spec = {"variant": variant, "student": str(student), "output": str(output)}
            log = open(work_dir / f"fusion_{variant}.log", "w")  # noqa: SIM115 - closed with the process
            command = [sys.executable, __file__, "--fusion-child", json.dumps(spec)]
            processes[variant] = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=_child_environment()
            )
    _, eval_texts, tokenizer = _fusion_texts()
    rows = {}
    untrained, _ = load_causal_lm(str(student), dtype="float32", load_tokenizer_too=False)
    rows["student before training"] = {"bpb": bits_per_byte(untrained, tokenizer, eval_texts, tokenizer.eos_token_id)}
    for name, source in FUSION_TEACHERS.items():
        teacher, teacher_tokenizer = load_causal_lm(resolve_model_alias(source), dtype="float32")
        start_id = teacher_tokenizer.bos_token_id
        start_id = teacher_tokenizer.eos_token_id if start_id is None else start_id
        label = {"smollm2": "teacher SmolLM2-135M-Instruct", "gemma": "teacher Gemma-3-270M"}[name]
        rows[label] = {"bpb": bits_per_byte(teacher, teacher_tokenizer, eval_texts, start_id, batch_size=4)}
        del teacher
    for variant, process in processes.items():
        if process.wait() != 0:
            raise RuntimeError(f"the fusion {variant} student failed; see fusion_{variant}.log in {work_dir}")
    for variant, (label, _) in FUSION_VARIANTS.items():
        rows[label] = json.loads((work_dir / f"fusion_{variant}_{FUSION_STEPS}s.json").read_text())
    eval_bytes = sum(len(text.encode("utf-8")) for text in eval_texts)
    lines = [
        "GPT-2-tokenizer student (`recipes/smollm2-135m+gemma-3-270m_to_gpt2-student/make_student.py`: Llama, 4 "
        "layers, hidden 256, vocabulary 50,257, random init, the same initial weights for every run), "
        f"{FUSION_STEPS} steps of {BATCH_SIZE} x {FUSION_TOKENS} student tokens of the builtin corpus's train split, "
        f"lr {FUSION_LEARNING_RATE} (cosine), same rows and seed for every run. KD runs: "
        "`MultiTeacherDistillationTrainer(cross_tokenizer=True)`, each teacher reading the raw text in its own tokens, "
        f"aligned by spans (forward KL on matched spans with unmatched_vocabulary={FUSION_UNMATCHED!r}, ULD top-64 on "
        f"the others), kd_ratio {KD_RATIO}; the fusion "
        "mixes both teachers with per-example confidence weights (temperature 1). Held-out: "
        f"{len(eval_texts)} validation pieces, {eval_bytes:,} bytes, in bits per byte (the unit that compares "
        "tokenizers). One torch thread per process, the four students trained side by side; a shared 2-core machine.",
        "",
        "| model | held-out bits/byte | train time (s) | load at start | notes |",
        "|---|---:|---:|---|---|",
    ]
    for label, row in rows.items():
        seconds = f"{row['seconds']:.0f}" if "seconds" in row else "-"
        shown = {
            key: round(value, 3)
            for key, value in row.get("last_log", {}).items()
            if key.startswith(("teacher_weight/", "kd_loss/"))
        }
        lines.append(f"| {label} | {row['bpb']:.3f} | {seconds} | {row.get('load_at_start', '-')} | {shown or ''} |")
    fused = rows[FUSION_VARIANTS["fusion"][0]]["bpb"]
    others = {variant: rows[FUSION_VARIANTS[variant][0]]["bpb"] for variant in ("ce", "smollm2", "gemma")}
    met = all(fused < value for value in others.values())
    ratios = ", ".join(f"x{fused / value:.3f} vs {variant}" for variant, value in others.items())
    lines += [
        "",
        f"Fusion student bits per byte {fused:.3f} ({ratios}); target (lower than CE-only and than each "
        f"teacher alone at equal steps): {'met' if met else 'NOT met'}.",
    ]
    _publish(work_dir, "fusion", "\n".join(lines), {"rows": rows, "target_met": met, "eval_bytes": eval_bytes})


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--train-child":
        _train_child(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "--fusion-child":
        _fusion_child(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "--fusion":
        fusion(Path(sys.argv[2]) if len(sys.argv) > 2 else Path("/tmp/bench_multi_teacher"))
    else:
        main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/bench_multi_teacher"))
