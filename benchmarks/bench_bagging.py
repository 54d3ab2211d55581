"""Bagging and boosting against one model at equal total optimizer steps, on real text and real labels.

Part 1 (causal LM, Python's language reference = the builtin corpus, 64-token blocks): one model trained for
`members x steps` steps, against `members` bagged members (bootstrap resamples, mixture), loss-reweighting boosting
(mixture, weights fitted on the validation split) and additive product-of-experts boosting (share fitted on the
validation split), each member `steps` steps. Held-out perplexity and expected calibration error (ECE, 15 bins, top-1
next-token confidence) on the test split; bagging's out-of-bag perplexity against its held-out perplexity; seconds
per optimizer step (additive boosting runs every earlier member forward at every step).

Part 2 (classifier, which source a paragraph comes from: Python's reference, Debian's fortunes, the Jargon File, from
`recipes/smollm2-135m_merge_domains/prepare_texts.py`): one classifier against bagged (soft vote) and SAMME-boosted
(weighted vote) ones. Accuracy and ECE on held-out paragraphs, out-of-bag accuracy, SAMME's staged train/held-out
accuracy (a PNG when matplotlib is installed).

Models: SmolLM2-135M ran at ~80 s per LoRA step (4 x 64 tokens) on the shared 2-core machine at load ~9, so the
benchmark trains small Llama models (hidden 128, 2 layers) from one random initialisation with a 1024-token BPE
tokenizer fitted on the training text, members as full models (`use_lora=False`). `--model PATH` with `--use_lora`
runs the same comparison on a real checkpoint (e.g. the SmolLM2 folder) where there is time.

Held-out sets: every variant is scored on text from other documents (the corpus' test split; the eval files) and on
same-pool examples (a random part of the training documents' blocks / paragraphs, held out of training), which is
what an out-of-bag score estimates.

Run: `HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_bagging.py [--members 4] [--steps 40] [--texts DIR]`.
On SmolLM2 (about 4 s per LoRA step of 8 x 64 tokens on the idle 2-core machine): `--model default_teacher
--use_lora --steps 20 --lm_lr 5e-4 --skip_classifier` (`--lm_blocks 256`, and 64 for the overfitting regime with
`--lm_variants one bagging`), and `--model default_teacher --use_lora --steps 10 --skip_lm` for the classifiers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import RESULTS_DIR, write_result

from hf_interop.ensemble.calibration import classification_scores, expected_calibration_error


def load_average() -> str:
    return ", ".join(f"{value:.1f}" for value in os.getloadavg())


def train_tokenizer(texts: list[str], directory: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<pad>"
    )
    fast.save_pretrained(directory)
    return fast


def build_base(tokenizer, directory: Path) -> str:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def pretrain_base(base: str, tokenizer, directory: Path, steps: int) -> str:
    """The small base trained `steps` steps on the training blocks (the members then start from a trained model)."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator

    from hf_interop import load_builtin_corpus, pack_dataset

    blocks = pack_dataset(load_builtin_corpus()["train"], tokenizer, block_size=64)
    model = AutoModelForCausalLM.from_pretrained(base)
    args = TrainingArguments(
        output_dir=str(directory / "work"),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=blocks, data_collator=default_data_collator).train()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def common_args(output_dir: Path, steps: int, batch: int, learning_rate: float, use_lora: bool) -> dict:
    return dict(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=16,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_lora=use_lora,
        lora_r=8,
        lora_alpha=16,
    )


@torch.no_grad()
def causal_lm_metrics(ensemble, blocks, collator) -> dict[str, float]:
    nll = tokens = 0.0
    confidences, corrects = [], []
    for start in range(0, len(blocks), 16):
        batch = collator([blocks[i] for i in range(start, min(len(blocks), start + 16))])
        log_probs = ensemble(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        mask = targets != -100
        picked = log_probs.gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)
        nll -= picked[mask].double().sum().item()
        tokens += mask.sum().item()
        top = log_probs.max(-1)
        confidences.append(top.values.exp()[mask])
        corrects.append((top.indices == targets)[mask])
    return {
        "perplexity": math.exp(nll / tokens),
        "ece": expected_calibration_error(torch.cat(confidences), torch.cat(corrects)),
    }


@torch.no_grad()
def classifier_metrics(ensemble, dataset, collator) -> dict[str, float]:
    logits, labels = [], []
    for start in range(0, len(dataset), 32):
        batch = collator([dataset[i] for i in range(start, min(len(dataset), start + 32))])
        logits.append(ensemble(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float())
        labels.append(batch["labels"])
    scores = classification_scores(torch.cat(logits), torch.cat(labels))
    return {key: scores[key] for key in ("accuracy", "ece", "confidence")}


def seed_summary(runs: list[dict], seeds: list[int]) -> list[str]:
    """Mean and standard error over seeds of every classifier variant's accuracy, ECE and mean confidence."""
    metrics = ("accuracy", "ece", "confidence", "pool_accuracy", "pool_ece", "pool_confidence")
    lines = [
        f"Mean over seeds {', '.join(map(str, seeds))} (+- standard error of the mean):",
        "",
        "| variant | learning rate | held-out accuracy | held-out ECE | held-out mean confidence | same-pool accuracy | "
        "same-pool ECE | same-pool mean confidence |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in runs[0]["rows"]:
        rows = [run["rows"][name] for run in runs]
        cells = []
        for metric in metrics:
            values = np.asarray([row[metric] for row in rows], dtype=np.float64)
            error = values.std(ddof=1) / math.sqrt(len(values))
            cells.append(f"{values.mean():.3f} +- {error:.3f}")
        lines.append(f"| {name} | {rows[0]['learning_rate']:g} | " + " | ".join(cells) + " |")
    return lines


@torch.no_grad()
def dump_member_probabilities(trainer, path: Path, splits: dict) -> None:
    """Every member's class probabilities on every split, its draw and the labels, for offline analysis of vote
    rules (e.g. calibration) on the same trained members."""
    models = [trainer.load_member(index) for index in range(trainer.args.n_estimators)]
    arrays = {}
    for split, dataset in splits.items():
        arrays[f"{split}_probabilities"] = trainer.member_outputs(models, dataset)["probabilities"].double().numpy()
        arrays[f"{split}_labels"] = np.asarray(dataset["label"])
    for index, draw in enumerate(getattr(trainer, "estimators_samples_", [])):
        arrays[f"draw_{index}"] = np.asarray(draw)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def timed_train(trainer) -> tuple[object, float]:
    start = time.perf_counter()
    ensemble = trainer.train()
    return ensemble, time.perf_counter() - start


def _selected(name: str, chosen: list[str]) -> bool:
    """Whether variant `name` ("one model", "boosting (reweight)", ...) is among `chosen` ("all", "one", "boosting",
    "reweight", ...)."""
    words = name.replace("(", "").replace(")", "").lower().split()
    return "all" in chosen or words[0] in chosen or words[-1] in chosen


def bag_size(options, steps: int, batch: int, examples: int) -> float | int:
    """Each bagged member's draw: `--max_samples` as a fraction, or "read" = what a member reads (steps x batch)."""
    return min(steps * batch, examples) if options.max_samples == "read" else float(options.max_samples)


def part_causal_lm(base: str, tokenizer, work: Path, options) -> dict:
    from hf_interop import load_builtin_corpus, pack_dataset
    from hf_interop.ensemble.bagging import BaggingConfig, BaggingTrainer
    from hf_interop.ensemble.boosting import BoostingConfig, BoostingTrainer

    corpus = load_builtin_corpus()
    pool = pack_dataset(corpus["train"], tokenizer, block_size=64, max_blocks=options.lm_blocks + 64)
    # the same-pool held-out blocks: a random 64 of the training documents' blocks, never trained on (what an
    # out-of-bag score estimates: new examples from the training distribution); `test` = other documents
    order = np.random.default_rng(0).permutation(len(pool))
    pool_test = pool.select(sorted(order[:64].tolist()))
    train = pool.select(sorted(order[64:].tolist()))
    fit = pack_dataset(corpus["validation"], tokenizer, block_size=64, max_blocks=32)
    test = pack_dataset(corpus["test"], tokenizer, block_size=64, max_blocks=64)
    members, steps = options.members, options.steps
    total = members * steps
    rows, extra = {}, {}
    variants = [
        ("one model", BaggingConfig, dict(n_estimators=1, bootstrap=False, oob_score=False), total),
        (
            "bagging",
            BaggingConfig,
            dict(n_estimators=members, max_samples=bag_size(options, steps, 8, len(train))),
            steps,
        ),
        ("boosting (reweight)", BoostingConfig, dict(n_estimators=members, boosting="reweight"), steps),
        ("boosting (additive)", BoostingConfig, dict(n_estimators=members, boosting="additive"), steps),
    ]
    variants = [variant for variant in variants if _selected(variant[0], options.lm_variants)]
    for name, config_class, fields, member_steps in variants:
        args = config_class(
            **common_args(work / name.replace(" ", "_"), member_steps, 8, options.lm_lr, options.use_lora), **fields
        )
        trainer_class = BaggingTrainer if config_class is BaggingConfig else BoostingTrainer
        trainer = trainer_class(base, args, train, eval_dataset=fit, processing_class=tokenizer)
        load = load_average()
        ensemble, seconds = timed_train(trainer)
        metrics = causal_lm_metrics(ensemble, test, trainer.collator)
        same_pool = causal_lm_metrics(ensemble, pool_test, trainer.collator)
        metrics.update(pool_perplexity=same_pool["perplexity"], pool_ece=same_pool["ece"])
        metrics.update(seconds=seconds, seconds_per_step=seconds / total, load=load)
        if name == "bagging":
            metrics["oob_perplexity"] = trainer.oob_scores_["oob_perplexity"]
            metrics["oob_coverage"] = trainer.oob_scores_["oob_coverage"]
        if name.startswith("boosting"):
            metrics["weights"] = [round(w, 3) for w in trainer.estimator_weights_]
            extra[name] = {"train_perplexity_after_each_member": trainer.staged_train_score_}
        rows[name] = metrics
        print(name, json.dumps(metrics), flush=True)
    return {
        "rows": rows,
        "extra": extra,
        "train_blocks": len(train),
        "test_blocks": len(test),
        "pool_blocks": len(pool_test),
    }


def part_classifier(base: str, tokenizer, work: Path, texts: Path, options, seed: int = 0) -> dict:
    """Every selected classifier variant trained once; `seed` moves the training seeds (members: 42 + 100 seed + i)
    and the bagging draws (random_state = seed); the splits stay the same."""
    from hf_interop.cli.ensemble_training import labelled_paragraphs
    from hf_interop.ensemble.bagging import BaggingConfig, BaggingTrainer
    from hf_interop.ensemble.boosting import BoostingConfig, BoostingTrainer

    domains = ("python_docs", "fortunes", "jargon")
    pool = labelled_paragraphs(
        [str(texts / d / "train.txt") for d in domains], tokenizer, 64, options.per_class + options.per_class // 4
    )
    # same-pool held-out paragraphs: a random fifth of each class's training-file paragraphs (what out-of-bag
    # accuracy estimates); `held_out` = the eval files' paragraphs, from other documents
    rng = np.random.default_rng(0)
    labels = np.asarray(pool["label"])
    pool_indices = []
    for label in np.unique(labels):
        members_of = rng.permutation(np.flatnonzero(labels == label))
        pool_indices += members_of[: len(members_of) // 5].tolist()
    pool_test = pool.select(sorted(pool_indices))
    train = pool.select(sorted(set(range(len(pool))) - set(pool_indices)))
    if options.train_per_class:
        # a smaller training set from the same remaining paragraphs (the same for every seed); the held-out and
        # same-pool sets keep the size --per_class gives them, so the scores stay comparable across sizes
        train_labels = np.asarray(train["label"])
        kept = []
        for label in np.unique(train_labels):
            of_label = np.random.default_rng(1).permutation(np.flatnonzero(train_labels == label))
            if len(of_label) < options.train_per_class:
                raise SystemExit(
                    f"--train_per_class {options.train_per_class} exceeds the {len(of_label)} training paragraphs "
                    f"of class {label}; raise --per_class or lower --train_per_class."
                )
            kept += of_label[: options.train_per_class].tolist()
        train = train.select(sorted(kept))
    held_out = labelled_paragraphs(
        [str(texts / d / "eval.txt") for d in domains], tokenizer, 64, options.per_class // 2
    )
    members, steps = options.members, options.steps
    total = members * steps
    rows, staged = {}, {}
    variants = [
        ("one model", BaggingConfig, dict(n_estimators=1, bootstrap=False, oob_score=False), total),
        (
            "bagging",
            BaggingConfig,
            dict(
                n_estimators=members,
                max_samples=bag_size(options, steps, 16, len(train)),
                calibrate_vote=options.calibrate_vote,
            ),
            steps,
        ),
        ("boosting (SAMME)", BoostingConfig, dict(n_estimators=members, boosting="samme"), steps),
    ]
    variants = [variant for variant in variants if _selected(variant[0], options.classifier_variants)]
    for name, config_class, fields, member_steps in variants:
        learning_rate = options.cls_lr_one if name == "one model" and options.cls_lr_one else options.cls_lr
        if config_class is BaggingConfig:
            fields = {**fields, "random_state": seed}
        args = config_class(
            **common_args(
                work / f"cls_seed{seed}_{name.replace(' ', '_')}", member_steps, 16, learning_rate, options.use_lora
            ),
            seed=42 + 100 * seed,
            **fields,
        )
        trainer_class = BaggingTrainer if config_class is BaggingConfig else BoostingTrainer
        trainer = trainer_class(base, args, train, processing_class=tokenizer)
        load = load_average()
        ensemble, seconds = timed_train(trainer)
        if options.dump_probs and name in ("one model", "bagging"):
            dump_member_probabilities(
                trainer,
                Path(options.dump_probs) / f"seed{seed}_{name.replace(' ', '_')}.npz",
                {"train": train, "held_out": held_out, "same_pool": pool_test},
            )
        temperature = getattr(trainer, "vote_temperature_", 1.0)
        # a calibrated vote is scored twice: as trained (temperature 1) and with the out-of-bag temperature
        for temperature_label, vote_temperature in (("", 1.0), (" (temperature out of every bag)", temperature)):
            if temperature_label and not (name == "bagging" and options.calibrate_vote):
                continue
            ensemble.config.vote_temperature = vote_temperature
            metrics = classifier_metrics(ensemble, held_out, trainer.collator)
            same_pool = classifier_metrics(ensemble, pool_test, trainer.collator)
            metrics.update(pool_accuracy=same_pool["accuracy"], pool_ece=same_pool["ece"])
            metrics.update(pool_confidence=same_pool["confidence"], seconds=seconds, load=load)
            metrics.update(learning_rate=learning_rate, seed=seed)
            if name == "bagging":
                metrics["oob_accuracy"] = trainer.oob_score_
                metrics["oob_scores"] = trainer.oob_scores_
            rows[name + temperature_label] = metrics
        if name.startswith("boosting"):
            metrics["weights"] = [round(w, 3) for w in trainer.estimator_weights_]
            metrics["errors"] = [round(e, 3) for e in trainer.estimator_errors_]
            staged = {
                "train": trainer.staged_train_score_,
                "held_out": trainer.staged_score(held_out),
                "same_pool": trainer.staged_score(pool_test),
            }
            metrics["stopped_early"] = trainer.stopped_early_
        for row_name in [row_name for row_name in rows if row_name.startswith(name)]:
            print(row_name, json.dumps(rows[row_name], default=str), flush=True)
    return {
        "rows": rows,
        "staged": staged,
        "train_examples": len(train),
        "held_out_examples": len(held_out),
        "pool_examples": len(pool_test),
    }


def part_additive_cost(base: str, tokenizer, repeats: int = 5) -> dict:
    """Seconds of one training step (forward + backward, batch 8 x 64) of a new member against m frozen members,
    m = 0..3, interleaved so that the machine's load hits every m alike; full members and LoRA members on one base."""
    from transformers import AutoModelForCausalLM

    from hf_interop import EnsembleForCausalLM, load_builtin_corpus, pack_dataset
    from hf_interop.ensemble.boosting_math import additive_token_losses
    from hf_interop.ensemble.weighted_trainer import WeightedExampleCollator

    blocks = pack_dataset(load_builtin_corpus()["train"], tokenizer, block_size=64, max_blocks=8)
    batch = WeightedExampleCollator(tokenizer.pad_token_id, "causal_lm")([blocks[i] for i in range(8)])
    new_member = AutoModelForCausalLM.from_pretrained(base)
    frozen = {0: None}
    for count in (1, 2, 3):
        frozen[count] = EnsembleForCausalLM.from_members(
            [AutoModelForCausalLM.from_pretrained(base) for _ in range(count)], combination="product"
        )

    def step(count: int) -> float:
        start = time.perf_counter()
        logits = new_member(input_ids=batch["input_ids"]).logits
        if count == 0:
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
        else:
            with torch.no_grad():
                frozen_log_probs = frozen[count](input_ids=batch["input_ids"], use_cache=False).logits
            losses, mask = additive_token_losses(frozen_log_probs[:, :-1], logits[:, :-1], batch["labels"][:, 1:], 0.5)
            loss = losses.sum() / mask.sum()
        loss.backward()
        new_member.zero_grad()
        return time.perf_counter() - start

    for count in frozen:
        step(count)
    times = {count: [] for count in frozen}
    for _ in range(repeats):
        for count in frozen:
            times[count].append(step(count))
    median = {count: float(np.median(values)) for count, values in times.items()}
    return {"seconds": median, "ratio": {count: median[count] / median[0] for count in median}, "load": load_average()}


def staged_plot(staged: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axis = plt.subplots(figsize=(5, 3.2))
    for name, values in staged.items():
        axis.plot(range(1, len(values) + 1), values, marker="o", label=name)
    axis.set_xlabel("members")
    axis.set_ylabel("accuracy")
    axis.set_title("SAMME staged accuracy (domain classification)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument(
        "--steps", type=int, default=40, help="optimizer steps per member (one model: members x steps)"
    )
    parser.add_argument("--lm_blocks", type=int, default=256)
    parser.add_argument("--per_class", type=int, default=200)
    parser.add_argument(
        "--train_per_class",
        type=int,
        default=None,
        help="train the classifiers on only this many paragraphs per class (held-out sets stay as --per_class makes "
        "them): the small-data regime, where one model trained for all the steps overfits",
    )
    parser.add_argument("--lm_lr", type=float, default=3e-3)
    parser.add_argument("--cls_lr", type=float, default=1e-3)
    parser.add_argument(
        "--cls_lr_one", type=float, default=None, help="the single classifier's own rate (default: --cls_lr)"
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="classifier runs: one per seed, then mean and standard error"
    )
    parser.add_argument("--texts", default="outputs/texts", help="output folder of prepare_texts.py")
    parser.add_argument("--model", default=None, help="a real base checkpoint instead of the small Llama")
    parser.add_argument("--use_lora", action="store_true", help="members as LoRA adapters (with --model)")
    parser.add_argument(
        "--pretrain_steps",
        type=int,
        default=0,
        help="first train the small base this many steps on all training blocks of the corpus (a pretrained base)",
    )
    parser.add_argument("--result_name", default="bagging", help="benchmarks/results/<name>.md")
    parser.add_argument("--additive_cost", action="store_true", help="only time additive steps vs frozen members")
    parser.add_argument(
        "--classifier_variants",
        nargs="+",
        default=["all"],
        choices=("all", "one", "bagging", "boosting", "samme"),
        help="which to run",
    )
    parser.add_argument(
        "--lm_variants",
        nargs="+",
        default=["one", "bagging", "boosting"],
        choices=("one", "bagging", "boosting", "reweight", "additive"),
        help="causal-LM variants to run ('one' is the reference of every ratio: keep it; 'boosting' = both forms)",
    )
    parser.add_argument(
        "--max_samples",
        default="1.0",
        help="each bagged member's draw as a fraction of the training set, or 'read': what a member reads in its "
        "steps (steps x batch; then every unread example is out of bag)",
    )
    parser.add_argument(
        "--calibrate_vote",
        action="store_true",
        help="bagged classifiers fit their vote's temperature out of bag (scored with and without it)",
    )
    parser.add_argument(
        "--dump_probs", default=None, help="folder: save each classifier member's probabilities per split (npz)"
    )
    parser.add_argument("--skip_lm", action="store_true")
    parser.add_argument("--skip_classifier", action="store_true")
    options = parser.parse_args()
    texts = Path(options.texts)
    if not options.skip_classifier and not (texts / "jargon" / "eval.txt").is_file():
        import subprocess
        import sys

        script = Path(__file__).resolve().parents[1] / "recipes/smollm2-135m_merge_domains/prepare_texts.py"
        subprocess.run([sys.executable, str(script), str(texts)], check=True)

    from hf_interop import load_builtin_corpus
    from hf_interop.loading import load_tokenizer

    work = Path(tempfile.mkdtemp(prefix="bench_bagging_"))
    if options.model:
        from hf_interop.loading import resolve_model_alias

        base = resolve_model_alias(options.model)  # "default_teacher": the embedded SmolLM2-135M-Instruct
        tokenizer = load_tokenizer(base)
        model_line = f"base {options.model}, members {'LoRA r=8' if options.use_lora else 'full'}"
    else:
        corpus = load_builtin_corpus()
        sample = list(corpus["train"]["text"])
        for domain in ("fortunes", "jargon"):
            if (texts / domain / "train.txt").is_file():
                sample.append((texts / domain / "train.txt").read_text(encoding="utf-8")[:400_000])
        tokenizer = train_tokenizer(sample, work / "tokenizer")
        base = build_base(tokenizer, work / "base")
        kind = "LoRA r=8 members" if options.use_lora else "full members"
        model_line = f"small Llama (hidden 128, 2 layers, 1024-token BPE), one random initialisation, {kind}"
        if options.pretrain_steps:
            base = pretrain_base(base, tokenizer, work / "pretrained", options.pretrain_steps)
            model_line = (
                f"small Llama (hidden 128, 2 layers, 1024-token BPE) first trained {options.pretrain_steps} steps on "
                f"the corpus' training blocks, then {kind}"
            )
    if options.additive_cost:
        cost = part_additive_cost(base, tokenizer)
        lines = [
            f"Base: {model_line}. One training step (forward + backward, batch 8 x 64 tokens) of a new member "
            "against m frozen members (their product-of-experts log-probabilities under no_grad), median of 5, "
            f"interleaved; load average {cost['load']}.",
            "",
            "| frozen members m | seconds per step | vs plain step |",
            "|---|---|---|",
        ]
        for count, seconds in cost["seconds"].items():
            lines.append(f"| {count} | {seconds:.3f} | {cost['ratio'][count]:.2f}x |")
        write_result(options.result_name, "\n".join(lines), cost)
        return
    results = {
        "members": options.members,
        "steps_per_member": options.steps,
        "model": model_line,
        "lm_lr": options.lm_lr,
        "cls_lr": options.cls_lr,
        "cls_lr_one": options.cls_lr_one,
        "seeds": options.seeds,
        "max_samples": options.max_samples,
    }
    lines = [
        f"Base: {model_line}. {options.members} members x {options.steps} optimizer steps against one model trained "
        f"{options.members * options.steps} steps (equal total steps, same batch; learning rate "
        f"{options.lm_lr:g} for the causal LMs, {options.cls_lr:g} for the classifiers"
        f"{f' ({options.cls_lr_one:g} for the single classifier)' if options.cls_lr_one else ''}, constant; "
        "bagged members draw "
        f"{'what they read (steps x batch)' if options.max_samples == 'read' else options.max_samples + ' of the set'}"
        "). Load average (1/5/15 min) at the start of each variant beside it.",
        "",
    ]
    if not options.skip_lm:
        lm = part_causal_lm(base, tokenizer, work, options)
        results["causal_lm"] = lm
        single = lm["rows"]["one model"]
        lines += [
            f"### Causal LM: builtin corpus, {lm['train_blocks']} training blocks of 64 tokens, "
            f"{lm['test_blocks']} test blocks from other documents (the corpus' test split), {lm['pool_blocks']} "
            "same-pool blocks (a random 64 of the training documents' blocks, held out of training)",
            "",
            "| variant | test perplexity | vs one model | next-token ECE | same-pool perplexity | vs one model | "
            "same-pool ECE | out-of-bag perplexity | member weights | s / optimizer step | load |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, row in lm["rows"].items():
            oob = (
                f"{row['oob_perplexity']:.2f} (coverage {row['oob_coverage']:.2f})" if "oob_perplexity" in row else "-"
            )
            lines.append(
                f"| {name} | {row['perplexity']:.2f} | {row['perplexity'] / single['perplexity']:.3f} | "
                f"{row['ece']:.4f} | {row['pool_perplexity']:.2f} | "
                f"{row['pool_perplexity'] / single['pool_perplexity']:.3f} | {row['pool_ece']:.4f} | {oob} | "
                f"{row.get('weights', '-')} | {row['seconds_per_step']:.3f} | {row['load']} |"
            )
        lines.append("")
    if not options.skip_classifier:
        runs = [part_classifier(base, tokenizer, work, texts, options, seed) for seed in options.seeds]
        cls = runs[0]
        if len(runs) > 1:  # one row per variant and seed, then the mean table
            cls = {**runs[0], "rows": {}, "per_seed": runs}
            for run, seed in zip(runs, options.seeds, strict=True):
                cls["rows"].update({f"{name}, seed {seed}": row for name, row in run["rows"].items()})
        results["classifier"] = cls
        lines += [
            f"### Classifier: which source a paragraph comes from (3 classes), {cls['train_examples']} training and "
            f"{cls['held_out_examples']} held-out paragraphs from other documents (the eval files), "
            f"{cls['pool_examples']} same-pool paragraphs (a random fifth of the training files' paragraphs per class, "
            "held out of training)",
            "",
            "| variant | held-out accuracy | held-out ECE | held-out mean confidence | same-pool accuracy | "
            "same-pool ECE | same-pool mean confidence | out-of-bag accuracy | member weights (errors) | seconds | "
            "load |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, row in cls["rows"].items():
            oob = f"{row['oob_accuracy']:.3f}" if row.get("oob_accuracy") is not None else "-"
            weights = f"{row['weights']} ({row['errors']})" if "weights" in row else "-"
            lines.append(
                f"| {name} | {row['accuracy']:.3f} | {row['ece']:.4f} | {row['confidence']:.3f} | "
                f"{row['pool_accuracy']:.3f} | {row['pool_ece']:.4f} | {row['pool_confidence']:.3f} | {oob} | "
                f"{weights} | {row['seconds']:.0f} | {row['load']} |"
            )
        if len(runs) > 1:
            lines += ["", *seed_summary(runs, options.seeds)]
        # both rows of a calibrated bagging run carry its out-of-bag scores: one line per seed
        calibrated = {
            row["seed"]: row for row in cls["rows"].values() if "vote_temperature" in row.get("oob_scores", {})
        }
        for row in calibrated.values():
            scores = row["oob_scores"]
            lines += [
                "",
                f"Seed {row['seed']}: vote temperature {scores['vote_temperature']:.3f}, fitted on the full vote of "
                f"the {scores['calibration_examples']:.0f} training examples no member drew: their log loss "
                f"{scores['calibration_log_loss']:.4f} -> {scores['calibration_log_loss_calibrated']:.4f}, ECE "
                f"{scores['calibration_ece']:.4f} -> {scores['calibration_ece_calibrated']:.4f} (fitted on the same "
                "examples, so optimistic; the held-out columns are the test).",
            ]
        staged = cls["staged"] or {"train": [], "held_out": []}
        if staged["train"]:
            lines += [
                "",
                f"SAMME staged accuracy after each member (seed {options.seeds[0]}):",
                "",
                "| members | train | held-out (other documents) | same-pool |",
                "|---|---|---|---|",
            ]
            for index, (train_score, held, pool_score) in enumerate(
                zip(staged["train"], staged["held_out"], staged.get("same_pool", []), strict=False)
            ):
                lines.append(f"| {index + 1} | {train_score:.3f} | {held:.3f} | {pool_score:.3f} |")
            if len(cls.get("per_seed", [])) > 1:
                lines += ["", "Staged training accuracy of every seed:", ""]
                lines += [
                    f"- seed {run['rows'][name]['seed']}: " + ", ".join(f"{v:.3f}" for v in run["staged"]["train"])
                    for run in cls["per_seed"]
                    for name in run["rows"]
                    if name.startswith("boosting") and run["staged"]
                ]
            # one picture per result (the default result name "bagging" keeps the first run's file name)
            png = RESULTS_DIR / f"{options.result_name}_staged_samme.png"
            RESULTS_DIR.mkdir(exist_ok=True)
            if staged_plot(staged, png):
                lines += ["", f"![SAMME staged accuracy]({png.name})"]
    write_result(options.result_name, "\n".join(lines), results)


if __name__ == "__main__":
    main()
