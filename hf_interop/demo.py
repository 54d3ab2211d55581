"""`make demo`: the whole story on the embedded default (SmolLM2-135M teacher, builtin corpus), no arguments.

1. the teacher's held-out perplexity;
2. its top-k next-token log-probabilities on the training blocks, cached once (:func:`cache_teacher_logits`);
3. a student built from a fraction of the teacher's layers (:func:`init_student_from_teacher`);
4. that student trained two ways for the same steps from the cache: cross-entropy only (`kd_ratio=0`) and distilled
   (`kd_ratio=1`, :class:`DistillationTrainer` with `teacher_logits_path`, no teacher in memory);
5. a LoRA-adapted variant of the distilled student (more distillation through adapters), exported merged;
6. a mixture ensemble of the trained students (:class:`EnsembleForCausalLM`);
7. an interoperability report of all of them (:func:`hf_interop.compare.compare_checkpoints`).

It ends with a table (parameters, held-out perplexity, tokens/s), a loss-curve PNG and the output folders, each with
a model card, under `demo_outputs/`. Everything is written to a staging folder that replaces the previous demo
output only when the run succeeds.
"""

from __future__ import annotations

import gc
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .logging_utils import get_logger

logger = get_logger(__name__)


@dataclass
class DemoSettings:
    """Knobs of the demo; the defaults are what `make demo` runs on 2 CPU cores.

    Tests point `teacher` and `corpus` at tiny models and texts; everything else works the same.
    """

    teacher: str | None = None  # checkpoint folder; None: the embedded SmolLM2-135M-Instruct
    corpus: Any = None  # DatasetDict with train/validation/test and a "text" column; None: the builtin corpus
    block_size: int = field(default=128, metadata={"help": "Tokens per block."})
    num_train_blocks: int = field(default=160, metadata={"help": "Training blocks the teacher is cached on."})
    num_eval_blocks: int = field(default=32, metadata={"help": "Held-out (validation) blocks behind the table."})
    sample_draws: int = field(
        default=64, metadata={"help": "Tokens drawn from the teacher per cached position (a sampled cache)."}
    )
    student_num_layers: int = field(default=8, metadata={"help": "Teacher layers the student keeps (evenly spread)."})
    train_steps: int = field(
        default=40, metadata={"help": "Optimizer steps of each student run (CE-only, distilled)."}
    )
    batch_size: int = field(default=8, metadata={"help": "Training blocks per step."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate (cosine decay)."})
    lora_steps: int = field(default=10, metadata={"help": "Steps of the LoRA variant."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank of the variant."})
    compare_documents: int = field(default=4, metadata={"help": "Test documents of the interoperability report."})
    compare_characters: int = field(default=4000, metadata={"help": "First characters of each report document."})
    eval_batch_size: int = field(default=4, metadata={"help": "Blocks per forward pass when evaluating."})
    output_dir: str = field(default="demo_outputs", metadata={"help": "Output folder (replaced on success)."})
    show_progress: bool = True
    seed: int = field(default=0, metadata={"help": "Seed of data order and initialisation."})
    extra: dict = field(default_factory=dict)  # recorded in summary.json (e.g. which machine)


def _model_size(model: Any) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def run_demo(settings: DemoSettings | None = None) -> dict[str, Any]:
    """Run the demo end to end (see the module docstring) and return the summary it prints and saves."""
    import torch

    from .loading import default_teacher_path
    from .utils import staged_output_dir

    settings = settings or DemoSettings()
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    final_dir = Path(settings.output_dir).resolve()
    teacher_dir = str(settings.teacher or default_teacher_path())
    teacher_name = "SmolLM2-135M" if settings.teacher is None else Path(teacher_dir).name

    print(f"hf_interop demo: {teacher_name} teacher -> {settings.student_num_layers}-layer student, builtin corpus")
    with staged_output_dir(final_dir, overwrite=True) as stage:
        run = _DemoRun(settings, stage, final_dir, teacher_dir, teacher_name, started)
        teacher = _evaluate_teacher(run)
        _cache_teacher(run, teacher)
        _init_student(run, teacher)
        # Models are freed after each step (peak memory stays near one teacher + one training student) and loaded
        # back from their folders for the report.
        del teacher
        gc.collect()
        _train_ce_student(run)
        _train_distilled_student(run)
        _train_lora_variant(run)
        _ensemble_students(run)
        _interoperability_report(run)
        summary, table = _write_summary(run)

    print()
    print(table, end="")
    print(f"\noutputs in {settings.output_dir}/: {', '.join(sorted(p.name for p in final_dir.iterdir()))}")
    print(f"total time {summary['seconds']:.0f} s")
    return summary


@dataclass
class _DemoRun:
    """What the stages of one demo run share: the settings, the staging folder, the packed data, and what has been
    measured so far (the table's rows, the stage timings, the loss histories, the models of the report)."""

    settings: DemoSettings
    stage: Path
    final_dir: Path
    teacher_dir: str
    teacher_name: str
    started: float
    tokenizer: Any = None
    corpus: Any = None
    train: Any = None
    validation: Any = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    histories: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    compare_models: list[tuple[str, Any]] = field(default_factory=list)

    @property
    def cache_dir(self) -> Path:
        return self.stage / "teacher_cache"

    @property
    def init_dir(self) -> Path:
        return self.stage / "student_init"

    def step(self, title: str) -> None:
        self.timings[title] = time.perf_counter() - self.started
        print(f"\n[{time.perf_counter() - self.started:5.0f} s] {title}", flush=True)

    def evaluate(self, label: str, model: Any, folder: str | None) -> dict[str, Any]:
        """Held-out perplexity and speed of `model`: one row of the closing table."""
        from .evaluation import evaluate_perplexity

        result = evaluate_perplexity(
            model,
            self.validation,
            batch_size=self.settings.eval_batch_size,
            show_progress=self.settings.show_progress,
            description=f"Held-out perplexity: {label}",
        )
        row = {
            "model": label,
            "parameters": _model_size(model),
            "perplexity": result["perplexity"],
            "tokens_per_second": result["tokens_per_second"],
            "folder": folder,
        }
        self.rows.append(row)
        print(f"  {label}: perplexity {row['perplexity']:.2f}, {row['tokens_per_second']:.0f} tokens/s")
        return row

    def final(self, stage_path: Path) -> str:
        """Where a folder of the staging area will live once the demo succeeds."""
        return str(self.final_dir / stage_path.relative_to(self.stage))

    def train_student(self, name: str, kd_ratio: float, steps: int, model: Any, peft_config: Any = None) -> Any:
        """Train `model` from the teacher cache (`kd_ratio=0`: on the text alone) into `stage/name`."""
        import torch

        from .distill.distillation_config import DistillationConfig
        from .distill.distillation_trainer import DistillationTrainer

        settings = self.settings
        config = DistillationConfig(
            output_dir=str(self.stage / name),
            teacher_logits_path=str(self.cache_dir),
            kd_ratio=kd_ratio,
            loss_type="forward_kl",
            max_steps=steps,
            per_device_train_batch_size=settings.batch_size,
            learning_rate=settings.learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, steps // 10),
            logging_steps=max(1, steps // 20),
            save_strategy="no",
            report_to="none",
            disable_tqdm=not settings.show_progress,
            seed=settings.seed,
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = DistillationTrainer(
            model=model,
            args=config,
            train_dataset=self.train,
            processing_class=self.tokenizer,
            peft_config=peft_config,
        )
        trainer.train()
        self.histories[name] = [entry for entry in trainer.state.log_history if "loss" in entry]
        return trainer


def _evaluate_teacher(run: _DemoRun) -> Any:
    """1. Load the teacher, pack the training and held-out blocks with its tokenizer, and measure the teacher."""
    from .data import load_builtin_corpus, pack_dataset
    from .loading import load_causal_lm

    settings = run.settings
    run.step(f"1. Teacher {run.teacher_name}: held-out perplexity")
    teacher, run.tokenizer = load_causal_lm(run.teacher_dir, dtype="float32")
    run.corpus = settings.corpus if settings.corpus is not None else load_builtin_corpus()
    run.train = pack_dataset(
        run.corpus["train"], run.tokenizer, block_size=settings.block_size, max_blocks=settings.num_train_blocks
    )
    run.validation = pack_dataset(
        run.corpus["validation"], run.tokenizer, block_size=settings.block_size, max_blocks=settings.num_eval_blocks
    )
    run.evaluate(f"teacher ({run.teacher_name})", teacher, run.teacher_dir)
    return teacher


def _cache_teacher(run: _DemoRun, teacher: Any) -> None:
    """2. The teacher's top-k log-probabilities on the training blocks, cached once for both trained students."""
    from .distill.teacher_cache import cache_teacher_logits
    from .loading import DEFAULT_TEACHER_HUB_ID

    settings = run.settings
    run.step(f"2. Caching the teacher's next-token distributions on {len(run.train)} training blocks")
    cache_teacher_logits(
        teacher,
        run.train,
        run.cache_dir,
        sample_draws=settings.sample_draws,
        batch_size=settings.eval_batch_size,
        tokenizer=run.tokenizer,
        teacher_name_or_path=DEFAULT_TEACHER_HUB_ID if settings.teacher is None else run.teacher_dir,
        show_progress=settings.show_progress,
    )


def _init_student(run: _DemoRun, teacher: Any) -> None:
    """3. A student made of evenly spread teacher layers, saved untrained with its card, and measured."""
    from .distill.student_init import init_student_from_teacher
    from .hub.cards import write_model_card

    settings = run.settings
    run.step(f"3. Student: {settings.student_num_layers} of the teacher's layers (init_student_from_teacher)")
    student = init_student_from_teacher(
        teacher, num_layers=settings.student_num_layers, tokenizer=run.tokenizer, output_dir=run.init_dir
    )
    write_model_card(
        run.init_dir,
        "finetuned",
        base_model=run.teacher_dir,
        base_model_relation="finetune",
        description=f"{settings.student_num_layers} evenly spread layers of the teacher, untrained.",
        hyperparameters={"num_layers": settings.student_num_layers, "layer_selection": "uniform"},
    )
    run.evaluate("student, untrained", student, run.final(run.init_dir))
    run.compare_models = [("teacher", run.teacher_dir), ("student_init", run.init_dir)]


def _train_ce_student(run: _DemoRun) -> None:
    """4a. The baseline: the untrained student trained on the text alone (`kd_ratio=0`)."""
    from .hub.cards import write_model_card
    from .loading import load_causal_lm

    settings, stage = run.settings, run.stage
    run.step(f"4a. Cross-entropy only (kd_ratio=0): {settings.train_steps} steps")
    ce_student, _ = load_causal_lm(run.init_dir, dtype="float32")
    trainer = run.train_student("student_ce", 0.0, settings.train_steps, ce_student)
    trainer.save_model()
    ce_row = run.evaluate("student, cross-entropy only", ce_student, run.final(stage / "student_ce"))
    write_model_card(
        stage / "student_ce",
        "finetuned",
        base_model=run.final(run.init_dir),
        datasets=["builtin corpus (pydoc_data.topics)"],
        description="Baseline: the same student trained on the text alone (no teacher), same steps and data.",
        metrics={"perplexity": ce_row["perplexity"]},
        hyperparameters={"max_steps": settings.train_steps, "learning_rate": settings.learning_rate},
    )
    run.compare_models.append(("student_ce", stage / "student_ce"))
    del trainer, ce_student
    gc.collect()


def _train_distilled_student(run: _DemoRun) -> None:
    """4b. The same untrained student distilled from the cache (`kd_ratio=1`), same steps and data."""
    from .loading import load_causal_lm

    settings, stage = run.settings, run.stage
    run.step(f"4b. Distilled from the cache (kd_ratio=1): {settings.train_steps} steps")
    distilled, _ = load_causal_lm(run.init_dir, dtype="float32")
    trainer = run.train_student("student_distilled", 1.0, settings.train_steps, distilled)
    trainer.save_model()
    distilled_row = run.evaluate("student, distilled", distilled, run.final(stage / "student_distilled"))
    _add_metrics_to_card(stage / "student_distilled", "distilled", {"perplexity": distilled_row["perplexity"]})
    run.compare_models.append(("student_distilled", stage / "student_distilled"))
    del trainer, distilled
    gc.collect()


def _train_lora_variant(run: _DemoRun) -> None:
    """5. More distillation of the distilled student through LoRA adapters; the adapter and its merged export."""
    from .adapters import build_lora_config, export_merged_model, save_adapter_checkpoint
    from .loading import load_causal_lm

    settings, stage = run.settings, run.stage
    run.step(f"5. LoRA-adapted variant of the distilled student: r={settings.lora_r}, {settings.lora_steps} steps")
    lora_base, _ = load_causal_lm(stage / "student_distilled", dtype="float32")
    lora_config = build_lora_config(r=settings.lora_r, lora_alpha=2 * settings.lora_r, model=lora_base)
    trainer = run.train_student("student_lora_run", 1.0, settings.lora_steps, lora_base, peft_config=lora_config)
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    # The adapter records its base model by path: point it at where the distilled student will live.
    for adapter_config in peft_model.peft_config.values():
        adapter_config.base_model_name_or_path = run.final(stage / "student_distilled")
    save_adapter_checkpoint(peft_model, stage / "student_lora", run.tokenizer, datasets=["builtin corpus"])
    lora_merged = export_merged_model(peft_model, stage / "student_lora_merged", run.tokenizer)
    lora_row = run.evaluate("student, distilled + LoRA", lora_merged, run.final(stage / "student_lora_merged"))
    _add_metrics_to_card(stage / "student_lora_merged", "finetuned", {"perplexity": lora_row["perplexity"]})
    run.compare_models.append(("student_lora", stage / "student_lora_merged"))
    del trainer, peft_model, lora_merged, lora_base
    gc.collect()
    shutil.rmtree(stage / "student_lora_run", ignore_errors=True)  # only trainer state; the adapter is saved


def _ensemble_students(run: _DemoRun) -> None:
    """6. A mixture ensemble of the three trained students, measured and saved pointing at their final folders."""
    from .ensemble import EnsembleForCausalLM

    stage = run.stage
    run.step("6. Mixture ensemble of the trained students")
    member_dirs = [stage / "student_ce", stage / "student_distilled", stage / "student_lora_merged"]
    ensemble = EnsembleForCausalLM.from_members([str(path) for path in member_dirs], combination="mixture")
    ensemble_row = run.evaluate("ensemble (3 students, mixture)", ensemble, run.final(stage / "ensemble"))
    for spec, path in zip(ensemble.config.members, member_dirs, strict=True):
        spec["name_or_path"] = run.final(path)  # saved config points at the final folders
    ensemble.save_pretrained(stage / "ensemble")
    _add_metrics_to_card(stage / "ensemble", "ensemble", {"perplexity": ensemble_row["perplexity"]})
    del ensemble
    gc.collect()


def _interoperability_report(run: _DemoRun) -> None:
    """7. :func:`compare_checkpoints` of every model so far on the first test documents, printed and saved."""
    from datasets import Dataset

    from .compare import compare_checkpoints, format_report

    settings = run.settings
    run.step(f"7. Interoperability report on {settings.compare_documents} test documents")
    texts = run.corpus["test"]["text"][: settings.compare_documents]
    report = compare_checkpoints(
        [str(path) for _, path in run.compare_models],
        Dataset.from_dict({"text": [text[: settings.compare_characters] for text in texts]}),
        names=[name for name, _ in run.compare_models],
        ensemble_members=["student_ce", "student_distilled", "student_lora"],
        block_size=settings.block_size,
        batch_size=2,  # 5 models' (tokens, vocab) log-probs are held at once
        output_dir=run.stage / "compare",
        show_progress=settings.show_progress,
    )
    print(format_report(report), end="")


def _write_summary(run: _DemoRun) -> tuple[dict[str, Any], str]:
    """The loss-curve PNG, summary.json and summary.md (the closing table); returns the summary and the table."""
    from .utils import atomic_write_json, atomic_write_text

    _plot_loss_curves(run.histories, run.stage / "loss_curves.png")
    summary = {
        "rows": run.rows,
        "settings": {k: v for k, v in asdict(run.settings).items() if k != "corpus"},
        "seconds": time.perf_counter() - run.started,
        "timings": run.timings,
    }
    table = format_demo_table(run.rows)
    atomic_write_json(run.stage / "summary.json", summary)
    atomic_write_text(run.stage / "summary.md", table)
    return summary, table


def _add_metrics_to_card(folder: Path, kind: str, metrics: dict[str, float]) -> None:
    """Re-render a card written by a trainer/helper with the demo's held-out numbers, keeping its lineage."""
    from .hub.outputs import update_card_metrics

    update_card_metrics(folder, kind, metrics, ["builtin corpus (pydoc_data.topics)"])


def format_demo_table(rows: list[dict[str, Any]]) -> str:
    """The demo's closing table as text."""
    lines = [f"{'model':<34}{'parameters':>12}{'held-out ppl':>15}{'tokens/s':>11}"]
    for row in rows:
        lines.append(
            f"{row['model']:<34}{row['parameters'] / 1e6:>11.1f}M{row['perplexity']:>15.2f}"
            f"{row['tokens_per_second']:>11.0f}"
        )
    return "\n".join(lines) + "\n"


def _plot_loss_curves(histories: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Training cross-entropy of the CE-only and distilled students (and the KD loss) against the step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axis = figure.subplots()
    styles = {"student_ce": "CE-only student", "student_distilled": "distilled student"}
    for name, label in styles.items():
        entries = [entry for entry in histories.get(name, []) if "ce_loss" in entry]
        if entries:
            axis.plot([e["step"] for e in entries], [e["ce_loss"] for e in entries], label=f"{label}: CE on text")
    distilled = [entry for entry in histories.get("student_distilled", []) if "kd_loss" in entry]
    if distilled:
        axis.plot(
            [e["step"] for e in distilled], [e["kd_loss"] for e in distilled], "--", label="distilled student: KD loss"
        )
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss (nats/token)")
    axis.set_title("Training losses, same student, same data and steps")
    axis.legend()
    figure.savefig(path, dpi=100)


if __name__ == "__main__":  # pragma: no cover - `python -m hf_interop.demo`
    run_demo()
