"""What each recipe command runs (`run_distill`, `run_adapt`, `run_ensemble`, `run_merge`, `run_cache_teacher`), the
`RECIPES` table, and `run_recipe` / `run_recipe_main`, which `recipes/*.py` and `hf-interop <recipe>` call.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..loading import resolve_model_alias
from ..logging_utils import get_logger
from ..utils import check_output_dir, resumable_output_dir, staged_output_dir
from .arguments import (
    OVERWRITE_FLAG_FIX,
    AdaptScriptArguments,
    CacheTeacherScriptArguments,
    DataArguments,
    DistillScriptArguments,
    EnsembleScriptArguments,
    MergeScriptArguments,
    check_model_argument,
    parse_recipe_args,
)
from .common import _add_card_results, _load_blocks, _load_student
from .ensemble_training import (
    EnsembleTrainingScriptArguments,
    bagging_config_class,
    boosting_config_class,
    run_bag,
    run_boost,
)
from .multitask import MultiTaskScriptArguments, run_multitask

logger = get_logger(__name__)


def _held_out_metrics(model: Any, blocks: Any, batch_size: int, show_progress: bool) -> dict[str, float]:
    from ..evaluation import evaluate_perplexity

    result = evaluate_perplexity(model, blocks, batch_size=batch_size, show_progress=show_progress)
    return {"eval_loss": result["loss"], "eval_perplexity": result["perplexity"]}


def run_distill(script_args: DistillScriptArguments, config: Any) -> dict[str, Any]:
    """Distil a teacher (or a teacher cache) into a student: what `recipes/distill.py` and `hf-interop distill` run.

    The student comes from `student_model_name_or_path` or is built from the teacher's own layers
    (`student_num_layers`, :func:`hf_interop.init_student_from_teacher`). Training writes into
    `.incomplete-NAME/NAME` beside `config.output_dir`, renamed to it (checkpoints inside) only when training and
    saving succeed; an interrupted run's checkpoints stay there for `resume_from_checkpoint="true"`
    (:func:`hf_interop.utils.resumable_output_dir`).

    Returns:
        `dict` with `output_dir`, `train` (train metrics) and `eval` (held-out loss and perplexity, if any).
    """
    from ..distill.distillation_trainer import DistillationTrainer

    script_args.check()
    check_model_argument("teacher_model_name_or_path", config.teacher_model_name_or_path)
    if config.teacher_model_name_or_path is None and config.teacher_logits_path is None and config.teacher_url is None:
        raise ValueError(
            "no teacher: set teacher_model_name_or_path (a checkpoint), teacher_logits_path (a cache written by "
            "`hf-interop cache-teacher`) or teacher_url (a served teacher)."
        )
    init_from = script_args.init_from or config.teacher_model_name_or_path
    if script_args.student_num_layers is not None and init_from is None:
        raise ValueError(
            "student_num_layers builds the student from a teacher checkpoint, but there is none: set init_from (the "
            "teacher folder the cache was made from) or teacher_model_name_or_path."
        )
    if config.teacher_logits_path is not None and not os.path.isdir(config.teacher_logits_path):
        raise ValueError(
            f"teacher_logits_path {config.teacher_logits_path!r} is not a folder; write a cache first with "
            "`hf-interop cache-teacher`."
        )
    config.teacher_model_name_or_path = resolve_model_alias(config.teacher_model_name_or_path)
    init_from = resolve_model_alias(init_from)
    final_dir = config.output_dir
    with resumable_output_dir(final_dir, config.overwrite_output_dir, config.resume_from_checkpoint) as run:
        config.output_dir, config.resume_from_checkpoint = str(run.folder), run.resume_from_checkpoint
        student, tokenizer = _load_student(script_args, init_from, config.allow_pickle)
        train_blocks = _load_blocks(script_args, tokenizer, script_args.train_split, script_args.max_train_blocks)
        eval_blocks = None
        if script_args.eval_split is not None:
            eval_blocks = _load_blocks(script_args, tokenizer, script_args.eval_split, script_args.max_eval_blocks)
        # the trainer loads the teacher itself (config.teacher_model_name_or_path, config.allow_pickle)
        trainer = DistillationTrainer(
            model=student,
            args=config,
            train_dataset=train_blocks,
            eval_dataset=eval_blocks,
            processing_class=tokenizer,
        )
        train_result = trainer.train(resume_from_checkpoint=run.resume_from_checkpoint)
        trainer.save_model()
        trainer.save_metrics("train", train_result.metrics)
        eval_metrics: dict[str, Any] = {}
        if eval_blocks is not None:
            eval_metrics = trainer.evaluate()
            # eval_loss mixes KD and CE (kd_ratio); the student's own perplexity is exp(cross-entropy).
            ce_loss = eval_metrics.get("eval_ce_loss", eval_metrics.get("eval_loss"))
            if ce_loss is not None:
                eval_metrics["eval_perplexity"] = math.exp(min(ce_loss, 50.0))
            trainer.save_metrics("eval", eval_metrics)
        if trainer.accelerator.is_main_process:
            _add_card_results(run.folder, "distilled", script_args.dataset, eval_metrics)
        trainer.accelerator.wait_for_everyone()
    config.output_dir = final_dir
    return {"output_dir": final_dir, "train": train_result.metrics, "eval": eval_metrics, "trainer": trainer}


def run_adapt(script_args: AdaptScriptArguments, training_args: Any) -> dict[str, Any]:
    """LoRA fine-tuning of a causal LM on packed text: what `recipes/adapt.py` and `hf-interop adapt` run.

    `output_dir` receives the adapter (adapter_config.json, adapter_model.safetensors, tokenizer, `lora` card) and,
    with `export_merged`, the merged full model in `output_dir/merged`. Staged and resumable like :func:`run_distill`.
    """
    from peft import get_peft_model
    from transformers import Trainer, default_data_collator, set_seed

    from ..adapters import build_lora_config
    from ..loading import load_causal_lm

    script_args.check()
    final_dir = training_args.output_dir
    resume = training_args.resume_from_checkpoint
    with resumable_output_dir(final_dir, script_args.overwrite_output_dir, resume) as run:
        stage = run.folder
        training_args.output_dir, training_args.resume_from_checkpoint = str(stage), run.resume_from_checkpoint
        model, tokenizer = load_causal_lm(
            resolve_model_alias(script_args.model_name_or_path),
            dtype=script_args.model_dtype,
            allow_pickle=script_args.allow_pickle,
        )
        lora_config = build_lora_config(
            r=script_args.lora_r,
            lora_alpha=script_args.lora_alpha,
            lora_dropout=script_args.lora_dropout,
            target_modules=script_args.lora_target_modules,
            use_dora=script_args.use_dora,
            use_rslora=script_args.use_rslora,
            model=model,
        )
        train_blocks = _load_blocks(script_args, tokenizer, script_args.train_split, script_args.max_train_blocks)
        eval_blocks = None
        if script_args.eval_split is not None:
            eval_blocks = _load_blocks(script_args, tokenizer, script_args.eval_split, script_args.max_eval_blocks)
        # The adapter's random initialisation draws from torch's global generator: seed it, so that --seed decides
        # it (as it decides the data order) and two runs of one command give one adapter.
        set_seed(training_args.seed)
        peft_model = get_peft_model(model, lora_config)
        trainer = Trainer(
            model=peft_model,
            args=training_args,
            train_dataset=train_blocks,
            eval_dataset=eval_blocks,
            data_collator=default_data_collator,
            processing_class=tokenizer,
        )
        train_result = trainer.train(resume_from_checkpoint=run.resume_from_checkpoint)
        eval_metrics: dict[str, Any] = {}
        if eval_blocks is not None:
            eval_metrics = trainer.evaluate()
            if "eval_loss" in eval_metrics:
                eval_metrics["eval_perplexity"] = math.exp(min(eval_metrics["eval_loss"], 50.0))
        if trainer.accelerator.is_main_process:
            _save_adapter_outputs(trainer, stage, tokenizer, script_args, Path(final_dir).name, eval_metrics)
            trainer.save_metrics("train", train_result.metrics)
            if eval_metrics:
                trainer.save_metrics("eval", eval_metrics)
        trainer.accelerator.wait_for_everyone()
    training_args.output_dir = final_dir
    return {"output_dir": final_dir, "train": train_result.metrics, "eval": eval_metrics, "trainer": trainer}


def _save_adapter_outputs(
    trainer: Any, stage: Path, tokenizer: Any, script_args: AdaptScriptArguments, name: str, eval_metrics: dict
) -> None:
    """The adapter (and with `export_merged` the merged model in `merged/`) with their `lora` cards, into `stage`."""
    from ..adapters import export_merged_model, save_adapter_checkpoint

    training_args = trainer.args
    card = {
        "model_name": name,
        "datasets": [script_args.dataset],
        "metrics": {k: v for k, v in eval_metrics.items() if k in ("eval_loss", "eval_perplexity")},
        "hyperparameters": {
            "lora_r": script_args.lora_r,
            "lora_alpha": script_args.lora_alpha,
            "learning_rate": training_args.learning_rate,
            "max_steps": training_args.max_steps,
            "num_train_epochs": training_args.num_train_epochs,
        },
    }
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    # The helpers write atomically into a fresh folder; build them inside the staging folder and move the files up,
    # so the final folder holds the adapter next to the training checkpoints. A resumed run may find what a killed
    # earlier attempt left of them.
    for leftover in (stage / ".adapter", stage / "merged"):
        shutil.rmtree(leftover, ignore_errors=True)
    _move_contents(save_adapter_checkpoint(unwrapped, stage / ".adapter", tokenizer, **card), stage)
    if script_args.export_merged:
        export_merged_model(unwrapped, stage / "merged", tokenizer, **{**card, "model_name": f"{name}-merged"})


def _move_contents(source: Path, target: Path) -> None:
    for item in Path(source).iterdir():
        os.replace(item, target / item.name)
    Path(source).rmdir()


def run_ensemble(script_args: EnsembleScriptArguments) -> dict[str, Any]:
    """Build a logit-level ensemble, optionally fit its weights, evaluate and save it (config, tokenizer, card)."""
    from ..ensemble import EnsembleForCausalLM, fit_ensemble_weights

    script_args.check()
    check_output_dir(script_args.output_dir, script_args.overwrite_output_dir, fix=OVERWRITE_FLAG_FIX)
    ensemble = EnsembleForCausalLM.from_members(
        [resolve_model_alias(member) for member in script_args.members],
        weights=script_args.weights,
        combination=script_args.combination,
        dtype=script_args.dtype,
        allow_pickle=script_args.allow_pickle,
    )
    data_args = DataArguments(
        dataset=script_args.dataset, text_column=script_args.text_column, block_size=script_args.block_size
    )
    result: dict[str, Any] = {"output_dir": script_args.output_dir}
    if script_args.fit_weights:
        fit_blocks = _load_blocks(data_args, ensemble.tokenizer, script_args.fit_split, script_args.max_blocks)
        fit = fit_ensemble_weights(ensemble, fit_blocks, max_steps=script_args.fit_steps, show_progress=True)
        result["fitted_weights"] = [float(w) for w in ensemble.member_weights.tolist()]
        result["fit"] = fit
    if script_args.eval_split is not None:
        eval_blocks = _load_blocks(data_args, ensemble.tokenizer, script_args.eval_split, script_args.max_blocks)
        result["eval"] = _held_out_metrics(ensemble, eval_blocks, batch_size=8, show_progress=True)
    with staged_output_dir(script_args.output_dir, overwrite=script_args.overwrite_output_dir) as stage:
        ensemble.save_pretrained(stage)
    result["ensemble"] = ensemble
    return result


def run_merge(script_args: MergeScriptArguments) -> dict[str, Any]:
    """Merge checkpoints in weight space (:func:`hf_interop.merge_checkpoints`); the folder appears atomically."""
    from ..merge import merge_checkpoints

    script_args.check()
    check_output_dir(script_args.output_dir, script_args.overwrite_output_dir, fix=OVERWRITE_FLAG_FIX)
    if script_args.fit_on is not None:
        return _run_fitted_merge(script_args)
    path = merge_checkpoints(
        script_args.checkpoints,
        script_args.method,
        weights=script_args.weights,
        base=script_args.base,
        output_dir=script_args.output_dir,
        density=script_args.density,
        seed=script_args.seed,
        slerp_t=script_args.slerp_t,
        overwrite=script_args.overwrite_output_dir,
        max_shard_size=script_args.max_shard_size,
        show_progress=not script_args.disable_tqdm,
        gamma=script_args.gamma,
        epsilon=script_args.epsilon,
    )
    return {"output_dir": str(path)}


def _run_fitted_merge(script_args: MergeScriptArguments) -> dict[str, Any]:
    """`merge --fit_on DATASET`: pack the held-out text with the checkpoints' tokenizer, fit the weights
    (:func:`hf_interop.fit_merge_coefficients`) and write the merge with them."""
    from ..data import load_text_dataset, pack_dataset
    from ..loading import load_tokenizer
    from ..merge.fitting import fit_merge_coefficients

    tokenizer = load_tokenizer(script_args.checkpoints[0])
    text = load_text_dataset(script_args.fit_on, script_args.fit_split)
    blocks = pack_dataset(
        text, tokenizer, block_size=script_args.fit_block_size, max_blocks=script_args.fit_max_blocks
    )
    result = fit_merge_coefficients(
        script_args.checkpoints,
        blocks,
        base=script_args.base,
        method=script_args.method,
        granularity=script_args.fit_granularity,
        objective=script_args.fit_objective,
        initial_weights=script_args.weights,
        num_steps=script_args.fit_steps,
        learning_rate=script_args.fit_learning_rate,
        batch_size=script_args.fit_batch_size,
        seed=script_args.seed,
        output_dir=script_args.output_dir,
        overwrite=script_args.overwrite_output_dir,
        max_shard_size=script_args.max_shard_size,
        show_progress=not script_args.disable_tqdm,
    )
    return {"output_dir": result["output_dir"], "coefficients": result["coefficients"], "history": result["history"]}


def run_cache_teacher(script_args: CacheTeacherScriptArguments) -> dict[str, Any]:
    """Cache a teacher's top-k log-probabilities on the packed training split (:func:`hf_interop.cache_teacher_logits`).

    Packs the data with the teacher's tokenizer exactly as `distill` does with the same data options, so the
    distillation run's dataset fingerprint matches the cache.
    """
    from ..distill.teacher_cache import cache_teacher_logits
    from ..loading import load_causal_lm

    script_args.check()
    output_dir = Path(script_args.output_dir)
    # A complete cache (manifest.json) is a finished earlier run: refused without the flag. A partial cache of the
    # same job (shards, no manifest yet) resumes; cache_teacher_logits itself refuses folders holding anything else.
    if (output_dir / "manifest.json").exists() and not script_args.overwrite_output_dir:
        raise FileExistsError(
            f"output folder {str(output_dir)!r} already holds a complete teacher cache; pass --overwrite_output_dir "
            "to recompute it, or choose another output_dir."
        )
    if script_args.teacher_url is not None:
        teacher, tokenizer, teacher_path = _served_teacher(script_args)
    else:
        teacher_path = resolve_model_alias(script_args.teacher_model_name_or_path)
        teacher, tokenizer = load_causal_lm(
            teacher_path,
            revision=script_args.teacher_revision,
            dtype=script_args.teacher_dtype,
            allow_pickle=script_args.allow_pickle,
        )
    train_blocks = _load_blocks(script_args, tokenizer, script_args.train_split, script_args.max_train_blocks)
    cache = cache_teacher_logits(
        teacher,
        train_blocks,
        output_dir,
        top_k=script_args.top_k,
        temperature=script_args.temperature,
        batch_size=script_args.batch_size,
        shard_size=script_args.shard_size,
        tokenizer=tokenizer,
        teacher_name_or_path=teacher_path,
        teacher_revision=script_args.teacher_revision,
        overwrite=script_args.overwrite_output_dir,
        show_progress=not script_args.disable_tqdm,
        encoding=script_args.encoding,
        top_p=script_args.top_p,
        logprob_bits=script_args.logprob_bits,
        compression=script_args.compression,
        sample_draws=script_args.sample_draws,
        sample_seed=script_args.sample_seed,
    )
    return {"output_dir": str(output_dir), "cache": cache, "num_rows": len(train_blocks)}


def _served_teacher(script_args: CacheTeacherScriptArguments) -> tuple[Any, Any, str | None]:
    """The served teacher of `cache-teacher --teacher_url`, checked against the server and `--tokenizer` now."""
    from ..distill.served_teacher import ServedTeacher
    from ..loading import load_tokenizer

    tokenizer = load_tokenizer(resolve_model_alias(script_args.tokenizer))
    teacher = ServedTeacher(
        script_args.teacher_url,
        model=script_args.teacher_served_model,
        top_k=script_args.top_k,
        concurrency=script_args.concurrency,
        timeout=script_args.request_timeout,
        max_retries=script_args.max_retries,
        api_key_env=script_args.api_key_env,
    ).connect(tokenizer)
    return teacher, tokenizer, None


def _training_arguments_class() -> type:
    from transformers import TrainingArguments

    return TrainingArguments


def _distillation_config_class() -> type:
    from ..distill.distillation_config import DistillationConfig

    return DistillationConfig


def _multi_teacher_config_class() -> type:
    from ..distill.multi_teacher.config import MultiTeacherDistillationConfig

    return MultiTeacherDistillationConfig


def _multi_teacher_script_arguments() -> type:
    from .multi_teacher import MultiTeacherScriptArguments

    return MultiTeacherScriptArguments


def _run_distill_multi(*parsed: Any) -> dict[str, Any]:
    from .multi_teacher import run_distill_multi

    return run_distill_multi(*parsed)


def _multitask_config_class() -> type:
    from ..multitask.config import MultiTaskConfig

    return MultiTaskConfig


# name -> (dataclass types (callable for lazy imports), runner, description)
RECIPES: dict[str, tuple[Callable[[], list[type]], Callable[..., dict[str, Any]], str]] = {
    "distill": (
        lambda: [DistillScriptArguments, _distillation_config_class()],
        run_distill,
        "Knowledge distillation of a teacher (or a teacher-logits cache) into a student, with DistillationTrainer.",
    ),
    "distill-multi": (
        lambda: [_multi_teacher_script_arguments(), _multi_teacher_config_class()],
        lambda *parsed: _run_distill_multi(*parsed),
        "Distillation of several teachers into one student (each example routed to its teacher, or a mixture), "
        "with MultiTeacherDistillationTrainer.",
    ),
    "adapt": (
        lambda: [AdaptScriptArguments, _training_arguments_class()],
        run_adapt,
        "LoRA fine-tuning of a causal LM on text; saves the adapter (and optionally the merged model).",
    ),
    "ensemble": (
        lambda: [EnsembleScriptArguments],
        run_ensemble,
        "Build a logit-level ensemble of causal LMs sharing a tokenizer, optionally fit its weights, and save it.",
    ),
    "merge": (
        lambda: [MergeScriptArguments],
        run_merge,
        "Merge checkpoints of one architecture in weight space (linear, task arithmetic, TIES, DARE, SLERP, "
        "breadcrumbs, DELLA, Model Stock), optionally with weights fitted on held-out text (--fit_on).",
    ),
    "bag": (
        lambda: [EnsembleTrainingScriptArguments, bagging_config_class()],
        lambda script_args, config: run_bag(script_args, config, _load_blocks),
        "Train a bagged ensemble (members on bootstrap resamples, LoRA on one base) of causal LMs or classifiers, "
        "with out-of-bag scores.",
    ),
    "boost": (
        lambda: [EnsembleTrainingScriptArguments, boosting_config_class()],
        lambda script_args, config: run_boost(script_args, config, _load_blocks),
        "Train a boosted ensemble: SAMME for classifiers; loss reweighting or additive product-of-experts for "
        "causal LMs.",
    ),
    "cache-teacher": (
        lambda: [CacheTeacherScriptArguments],
        run_cache_teacher,
        "Run a teacher once over the packed training set and store its top-k log-probabilities for distill.",
    ),
    "multitask": (
        lambda: [MultiTaskScriptArguments, _multitask_config_class()],
        run_multitask,
        "Train one model on several text domains plus a domain classifier, with weighted task losses "
        "(MultiTaskTrainer: proportional / temperature / round-robin sampling; static, uncertainty or PCGrad).",
    ),
}


def run_recipe(name: str, argv: Sequence[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    """Parse `argv` (with `--config`) for recipe `name` and run it; what `recipes/<name>.py` calls."""
    dataclass_types, runner, description = RECIPES[name]
    parsed = parse_recipe_args(dataclass_types(), argv, prog or f"hf-interop {name}", description)
    return runner(*parsed)


def leave_process_group() -> None:
    """End of a launched run (recipes, `hf-interop`): the ranks leave the process group together. A rank that exits
    while another is still tearing down gloo can abort at exit ("terminate called without an active exception")
    after a successful run. Nothing to do in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def report_recipe_result(name: str, result: dict[str, Any]) -> None:
    """Print where a recipe wrote its output and its headline numbers (main process only)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    print(f"hf-interop {name}: wrote {result['output_dir']}")
    for key in ("train", "eval"):
        metrics = result.get(key) or {}
        shown = {
            k: round(v, 4)
            for k, v in metrics.items()
            if isinstance(v, float) and ("loss" in k or "perplex" in k or "accuracy" in k)
        }
        if shown:
            print(f"  {key}: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    if result.get("oob"):
        print("  out of bag: " + ", ".join(f"{k}={v:.4g}" for k, v in result["oob"].items()))
    if "estimator_weights" in result:
        print("  member weights: " + ", ".join(f"{w:.3f}" for w in result["estimator_weights"]))
    if "fitted_weights" in result:
        print("  fitted weights: " + ", ".join(f"{w:.3f}" for w in result["fitted_weights"]))


def run_recipe_main(name: str, argv: Sequence[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    """A whole launched recipe run: parse and run (:func:`run_recipe`), report, then leave the process group."""
    result = run_recipe(name, argv, prog)
    report_recipe_result(name, result)
    leave_process_group()
    return result
