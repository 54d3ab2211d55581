"""Ensembles: generation speed with one KV cache per member, and held-out perplexity of combined checkpoints.

Part 1 (speed): greedy generation of 128 new tokens with a 3-member ensemble, against (a) the sum of the three
members' own `generate()` and (b) a no-cache baseline that re-encodes the whole text at every step (what
DeePEn/UniTE-style ensembling does). Two member sets: three small students trained here on the builtin corpus,
and the real SmolLM2-135M teacher with two tiny students sharing its tokenizer.

Part 2 (quality): perplexity on the builtin corpus' test split of each student, the uniform mixture and product
ensembles, and ensembles whose weights `fit_ensemble_weights` learned on the validation split.

Run: `HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_ensemble.py [--skip_teacher] [--work_dir DIR]` (a few
minutes on 2 idle CPU cores; trained students are kept in the work dir and reused).
"""

from __future__ import annotations

import math
import statistics
import time

from _common import PeakRSS, time_call, write_result

NEW_TOKENS = 128
PROMPT_TOKENS = 64
# The SmolLM2 set is also timed after a longer prompt: a cached step costs about the same at any length on a CPU
# (reading the weights), re-encoding grows with the text, so the no-cache ratio depends on the prompt as well.
TEACHER_PROMPT_TOKENS = (64, 256)
STUDENT_FAMILIES = ("llama", "qwen2", "gpt2")
TRAIN_STEPS = 200
TRAIN_BATCH = 8


def train_corpus_tokenizer(corpus, vocab_size=2048):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus["train"]["text"], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<pad>"
    )


def student_config(family, vocab_size, tokenizer):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=96, n_layer=2, n_head=4, n_positions=512, **ids)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=96,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        **ids,
    )
    return LlamaConfig(**common) if family == "llama" else Qwen2Config(**common)


def train_student(family, seed, tokenizer, blocks):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(student_config(family, len(tokenizer), tokenizer), dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=TRAIN_STEPS, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(TRAIN_STEPS):
        rows = blocks[torch.randint(len(blocks), (TRAIN_BATCH,), generator=generator).tolist()]
        input_ids = torch.tensor(rows["input_ids"])
        loss = model(input_ids=input_ids, labels=input_ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def time_generation(name, pairs, prompt_ids, repeats=3, no_cache_repeats=1):
    """Seconds for NEW_TOKENS greedy tokens: ensemble (cached), members' own generate (sum), ensemble without cache.

    The no-cache runs come after the cached rounds and are interleaved with one more cached run each, so the ratio
    of the two is taken from neighbouring runs.
    """
    import torch

    from hf_interop import EnsembleForCausalLM

    ensemble = EnsembleForCausalLM.from_members(pairs, combination="mixture")
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    attention_mask = torch.ones_like(prompt_ids)
    outputs = {}

    def run(key, model, **extra):
        outputs[key] = model.generate(prompt_ids, attention_mask=attention_mask, **kwargs, **extra)

    with torch.no_grad():
        # Interleaved rounds (ensemble, then each member), medians per model: the load of a shared machine drifts,
        # and timing the ensemble and the members in separate blocks would turn that drift into a ratio.
        run("cached", ensemble)  # warm-up
        for model, _ in pairs:
            run("member", model)
        ensemble_times, member_times = [], [[] for _ in pairs]
        for _ in range(repeats):
            ensemble_times.append(time_call(lambda: run("cached", ensemble), repeats=1, warmup=0))
            for index, (model, _) in enumerate(pairs):
                member_times[index].append(time_call(lambda model=model: run("member", model), repeats=1, warmup=0))
        no_cache_times = []
        for _ in range(no_cache_repeats):
            no_cache_times.append(time_call(lambda: run("no_cache", ensemble, use_cache=False), repeats=1, warmup=0))
            ensemble_times.append(time_call(lambda: run("cached", ensemble), repeats=1, warmup=0))
    no_cache_s = statistics.median(no_cache_times)
    ensemble_s = statistics.median(ensemble_times)
    member_s = [statistics.median(times) for times in member_times]
    return {
        "members": name,
        "prompt_tokens": prompt_ids.shape[1],
        "ensemble_s": ensemble_s,
        "ensemble_runs_s": ensemble_times,
        "no_cache_runs_s": no_cache_times,
        "members_sum_s": sum(member_s),
        "member_s": member_s,
        "no_cache_s": no_cache_s,
        "ratio_vs_sum": ensemble_s / sum(member_s),
        "speedup_vs_no_cache": no_cache_s / ensemble_s,
        "cached_equals_no_cache": bool(torch.equal(outputs["cached"], outputs["no_cache"])),
    }


def load_or_train_students(work_dir, tokenizer, blocks, start):
    """Students are saved under `work_dir` (atomically) and reused by later runs."""
    from transformers import AutoModelForCausalLM

    from hf_interop.utils import atomic_directory

    students = []
    for seed, family in enumerate(STUDENT_FAMILIES):
        folder = work_dir / f"student_{family}_seed{seed}_steps{TRAIN_STEPS}"
        if (folder / "config.json").is_file():
            students.append(AutoModelForCausalLM.from_pretrained(folder).eval())
            continue
        student = train_student(family, seed, tokenizer, blocks["train"])
        with atomic_directory(folder, overwrite=True) as tmp:
            student.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        students.append(student)
        print(f"trained student {family} ({time.perf_counter() - start:.0f} s)", flush=True)
    return students


def main() -> None:
    import argparse

    import torch

    from hf_interop import (
        EnsembleForCausalLM,
        evaluate_perplexity,
        fit_ensemble_weights,
        load_builtin_corpus,
        load_default_teacher,
        pack_dataset,
    )
    from hf_interop.ensemble.combination import combine_log_probs
    from hf_interop.ensemble.weights import collect_member_log_probs
    from hf_interop.utils import hf_interop_cache_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", default=str(hf_interop_cache_dir() / "bench_ensemble"))
    parser.add_argument("--skip_teacher", action="store_true", help="skip the SmolLM2 generation timing")
    parser.add_argument(
        "--parts",
        default="cache,speculative,verify_cost,proxy_tuning",
        help="comma-separated: cache (parts 1-2), speculative (part 3), verify_cost (what a k-token verification "
        "forward costs), proxy_tuning (part 4, needs apt-get download)",
    )
    cli = parser.parse_args()
    from pathlib import Path

    work_dir = Path(cli.work_dir)
    parts = set(cli.parts.split(","))
    if "speculative" in parts or "proxy_tuning" in parts or "verify_cost" in parts:
        teacher, teacher_tokenizer = load_default_teacher()
        students = load_or_distil_students(work_dir, teacher, teacher_tokenizer)
        if "speculative" in parts:
            run_speculative(teacher, teacher_tokenizer, students)
        if "verify_cost" in parts:
            run_verify_cost([teacher, *students])
        if "proxy_tuning" in parts:
            run_proxy_tuning(work_dir, teacher, teacher_tokenizer, students)
        del teacher, students
    if "cache" not in parts:
        return
    torch.manual_seed(0)
    start = time.perf_counter()
    corpus = load_builtin_corpus()
    tokenizer = train_corpus_tokenizer(corpus)
    blocks = pack_dataset(corpus, tokenizer, block_size=128)
    students = load_or_train_students(work_dir, tokenizer, blocks, start)
    train_s = time.perf_counter() - start
    pairs = [(student, tokenizer) for student in students]

    # ---------------------------------------------------------------- part 2: held-out perplexity
    validation, test = blocks["validation"], blocks["test"]
    # Members' full test distributions, computed once; every ensemble's perplexity follows from them exactly.
    reference = EnsembleForCausalLM.from_members(pairs)
    test_log_probs, test_targets = collect_member_log_probs(reference, test, batch_size=16, full_distribution=True)

    def perplexity_from(combination, weights):
        combined = combine_log_probs(test_log_probs, combination, weights)
        return math.exp(-combined.gather(-1, test_targets[:, None]).double().mean().item())

    rows = []
    for index, family in enumerate(STUDENT_FAMILIES):
        nll = -test_log_probs[index].gather(-1, test_targets[:, None]).double().mean().item()
        rows.append({"model": f"student {family}", "weights": "-", "perplexity": math.exp(nll)})
    best_member = min(row["perplexity"] for row in rows)
    for combination in ("mixture", "product"):
        rows.append(
            {
                "model": f"{combination}, uniform",
                "weights": "1/3 each",
                "perplexity": perplexity_from(combination, None),
            }
        )
    fits = {}
    fit_start = time.perf_counter()
    for combination in ("mixture", "product"):
        learned = EnsembleForCausalLM.from_members(pairs, combination=combination)
        fits[combination] = fit_ensemble_weights(
            learned, validation, max_tokens=20000 if combination == "mixture" else 4000
        )
        rows.append(
            {
                "model": f"{combination}, learned",
                "weights": ", ".join(f"{weight:.2f}" for weight in fits[combination].weights),
                "perplexity": perplexity_from(combination, fits[combination].weights),
            }
        )
        if combination == "mixture":
            # the same number through the real forward pass (generate()-ready model, not the cached tensors)
            forward_ppl = evaluate_perplexity(learned, test, batch_size=16, show_progress=False)["perplexity"]
    fit_s = time.perf_counter() - fit_start
    rows.append(
        {
            "model": "mixture, PackLLM init only",
            "weights": ", ".join(f"{weight:.2f}" for weight in fits["mixture"].initial_weights),
            "perplexity": perplexity_from("mixture", fits["mixture"].initial_weights),
        }
    )
    print(f"perplexities done ({time.perf_counter() - start:.0f} s)", flush=True)

    # ---------------------------------------------------------------- part 1: generation speed
    prompt = torch.tensor([test[0]["input_ids"][:PROMPT_TOKENS]])
    sizes = ", ".join(f"{sum(p.numel() for p in student.parameters()) / 1e6:.2f}M" for student in students)
    speed = [time_generation(f"3 corpus students (llama, qwen2, gpt2: {sizes} params)", pairs, prompt)]
    print(f"student generation timed ({time.perf_counter() - start:.0f} s)", flush=True)
    memory_note = ""
    if not cli.skip_teacher:
        from transformers import LlamaConfig, LlamaForCausalLM

        with PeakRSS() as memory:
            teacher, teacher_tokenizer = load_default_teacher()
            tiny = []
            for seed in (1, 2):
                torch.manual_seed(seed)
                config = LlamaConfig(
                    vocab_size=len(teacher_tokenizer),
                    hidden_size=64,
                    intermediate_size=128,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                    tie_word_embeddings=True,
                    bos_token_id=teacher_tokenizer.bos_token_id,
                    eos_token_id=teacher_tokenizer.eos_token_id,
                )
                tiny.append(LlamaForCausalLM(config).eval())
            teacher_text_ids = teacher_tokenizer(corpus["test"][0]["text"], return_tensors="pt").input_ids
            for prompt_tokens in TEACHER_PROMPT_TOKENS:
                speed.append(
                    time_generation(
                        "SmolLM2-135M + 2 tiny random students on its tokenizer",
                        [(teacher, teacher_tokenizer)] + [(model, teacher_tokenizer) for model in tiny],
                        teacher_text_ids[:, :prompt_tokens],
                        repeats=2,
                        no_cache_repeats=2,
                    )
                )
                print(f"SmolLM2 set timed at a {prompt_tokens}-token prompt ({time.perf_counter() - start:.0f} s)")
        memory_note = f" SmolLM2 part peak RSS +{memory.delta / 2**30:.2f} GiB."
    total_s = time.perf_counter() - start

    lines = [
        f"Greedy generation of {NEW_TOKENS} new tokens after a prompt of test-split text, batch 1, float32. The "
        "ensemble and its members are timed in interleaved rounds (3 rounds; SmolLM2 set: 2), then the no-cache "
        "ensemble (1 run; SmolLM2 set: 2, each followed by another cached ensemble run); every column is the median "
        "of its runs, and each row's numbers come from the same run.",
        "",
        "| members | prompt tokens | ensemble (cached) s | sum of members' own generate() s | no-cache re-encoding s | "
        "ensemble / sum | no-cache / ensemble | cached == no-cache tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in speed:
        lines.append(
            f"| {row['members']} | {row['prompt_tokens']} | {row['ensemble_s']:.2f} | {row['members_sum_s']:.2f} | "
            f"{row['no_cache_s']:.2f} | "
            f"{row['ratio_vs_sum']:.2f}x | {row['speedup_vs_no_cache']:.1f}x | {row['cached_equals_no_cache']} |"
        )
    lines += [
        "",
        "Targets: ensemble <= 1.15x the sum of its members' generate(); >= 5x faster than re-encoding without a cache.",
        "",
        f"Held-out perplexity on the builtin corpus' test split ({test_targets.numel()} tokens in {len(test)} blocks of "
        f"128, 2048-token BPE trained on the train split). Students: 3 families x seeds 0-2, {TRAIN_STEPS} AdamW "
        f"steps of {TRAIN_BATCH} x 128 tokens each; weights learned on the validation split (members frozen, their "
        "log-probs collected once; mixture on 20k tokens, product on 4k).",
        "",
        "| model | weights | test perplexity | vs best member |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['weights']} | {row['perplexity']:.2f} | "
            f"{(row['perplexity'] / best_member - 1) * 100:+.1f}% |"
        )
    learned_mixture = next(row["perplexity"] for row in rows if row["model"] == "mixture, learned")
    lines += [
        "",
        "Target: a learned-weight 3-member ensemble below its best member.",
        "",
        f"Check: the learned mixture through `EnsembleForCausalLM.forward` (evaluate_perplexity) gives "
        f"{forward_ppl:.3f} vs {learned_mixture:.3f} from the collected member log-probs. Fitting both weight sets "
        f"(collecting validation log-probs included) took {fit_s:.1f} s; training the students {train_s:.0f} s "
        f"(0 when reused from the work dir); whole benchmark {total_s:.0f} s.{memory_note}",
    ]
    data = {
        "speed": speed,
        "perplexity": rows,
        "best_member_perplexity": best_member,
        "learned_mixture_forward_perplexity": forward_ppl,
        "fits": {
            name: {"weights": fit.weights, "initial_weights": fit.initial_weights, "validation_nll": fit.nll}
            for name, fit in fits.items()
        },
        "train_seconds": train_s,
        "total_seconds": total_s,
        "learned_below_best_member": min(row["perplexity"] for row in rows if "learned" in row["model"]) < best_member,
    }
    write_result("ensemble", "\n".join(lines), data)


# ------------------------------------------------------------------------------------------------------------------
# Part 3: speculative ensemble decoding (generate(proposer=...)) on SmolLM2-135M + two students distilled from it
# Part 4: proxy-tuning with combination="arithmetic" on a second real text domain (the Jargon File)
# ------------------------------------------------------------------------------------------------------------------

SPECULATIVE_STUDENTS = ((6, 0), (3, 1))  # (decoder layers taken from SmolLM2's 30, seed)
DISTIL_STEPS = 150
DISTIL_BATCH = 4
DISTIL_TOKENS = 128  # tokens of each block used
JARGON_DEB = "jargon-text"  # Debian package: the Jargon File 4.4.7 (public domain), `apt-get download jargon-text`
LORA_STEPS = 100
LORA_BATCH = 4
PROXY_ALPHAS = (0.1, 0.25, 0.5, 1.0)


def distil_student(teacher, num_layers, seed, blocks, steps=DISTIL_STEPS):
    """A depth-pruned SmolLM2 (`init_student_from_teacher`, uniform layers) trained briefly on the teacher's logits."""
    import torch

    from hf_interop import init_student_from_teacher

    torch.manual_seed(seed)
    student = init_student_from_teacher(teacher, num_layers=num_layers)
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-4, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(steps):
        if step % 10 == 0:
            print(
                f"  {num_layers}-layer student: KD step {step}/{steps} ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
        rows = blocks[torch.randint(len(blocks), (DISTIL_BATCH,), generator=generator).tolist()]
        input_ids = torch.tensor(rows["input_ids"])[:, :DISTIL_TOKENS]
        with torch.no_grad():
            teacher_log_probs = torch.log_softmax(teacher(input_ids=input_ids).logits.float(), -1)
        student_log_probs = torch.log_softmax(student(input_ids=input_ids).logits.float(), -1)
        # forward KL(teacher || student), mean over tokens
        loss = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return student.eval()


def load_or_distil_students(work_dir, teacher, tokenizer):
    """The two students, distilled on the builtin corpus' train split; kept in `work_dir` and reused by later runs."""
    from transformers import AutoModelForCausalLM

    from hf_interop import load_builtin_corpus, pack_dataset
    from hf_interop.utils import atomic_directory

    students = []
    for num_layers, seed in SPECULATIVE_STUDENTS:
        folder = work_dir / f"smollm2_student_L{num_layers}_seed{seed}_kd{DISTIL_STEPS}x{DISTIL_BATCH}x{DISTIL_TOKENS}"
        if not (folder / "config.json").is_file():
            start = time.perf_counter()
            blocks = pack_dataset(load_builtin_corpus(), tokenizer, block_size=128)["train"]
            student = distil_student(teacher, num_layers, seed, blocks)
            with atomic_directory(folder, overwrite=True) as tmp:
                student.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
            print(f"distilled a {num_layers}-layer student ({time.perf_counter() - start:.0f} s)", flush=True)
        students.append(AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval())
    return students


SPECULATIVE_PROMPTS = 3  # the first PROMPT_TOKENS tokens of test blocks 0, 1, 2
# (label, proposer, k): a member index, "prompt_lookup" (drafts copied from the text), or a separate model
SPECULATIVE_VARIANTS = (
    ("prompt lookup, k=4", "prompt_lookup", 4),
    ("prompt lookup, k=8", "prompt_lookup", 8),
    ("SmolLM2 (member 0) proposes, k=4", 0, 4),
    ("3-layer student (member 2) proposes, k=3", 2, 3),
    ("6-layer student (member 1) proposes, k=3", 1, 3),
)


def run_speculative(teacher, tokenizer, students, rounds=2):
    """Greedy 128 tokens after each of three prompts: plain ensemble generate(), speculative variants, members' own."""
    import os

    import torch

    from hf_interop import EnsembleForCausalLM, load_builtin_corpus, pack_dataset

    blocks = pack_dataset(load_builtin_corpus(), tokenizer, block_size=128)
    models = [teacher, *students]
    ensemble = EnsembleForCausalLM.from_members([(model, tokenizer) for model in models], combination="mixture")
    prompts = [torch.tensor([blocks["test"][i]["input_ids"][:PROMPT_TOKENS]]) for i in range(SPECULATIVE_PROMPTS)]
    options = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    variants = [("plain", None, None), *SPECULATIVE_VARIANTS]
    times = {(name, i): [] for name, _, _ in variants for i in range(len(prompts))}
    member_times = {(m, i): [] for m in range(len(models)) for i in range(len(prompts))}
    outputs, stats = {}, {}

    def run_variant(name, proposer, k, i):
        if proposer is None:
            outputs[name, i] = ensemble.generate(prompts[i], **options)
            return
        result = ensemble.generate(
            prompts[i], **options, proposer=proposer, num_draft_tokens=k, return_dict_in_generate=True
        )
        outputs[name, i] = result.sequences
        stats[name, i] = (result.num_accepted, result.num_drafted, result.num_rounds)

    loads = []
    with torch.no_grad():
        run_variant("plain", None, None, 0)  # warm-up
        for _ in range(rounds):  # interleaved: every prompt, variant and member once per round
            loads.append(os.getloadavg()[0])
            for i in range(len(prompts)):
                for name, proposer, k in variants:
                    times[name, i].append(
                        time_call(lambda n=name, p=proposer, k=k, i=i: run_variant(n, p, k, i), 1, 0)
                    )
                for m, model in enumerate(models):
                    member_times[m, i].append(
                        time_call(
                            lambda m=model, i=i: m.generate(
                                prompts[i], attention_mask=torch.ones_like(prompts[i]), **options
                            ),
                            1,
                            0,
                        )
                    )
    median = {key: statistics.median(values) for key, values in times.items()}
    member_s = [sum(statistics.median(member_times[m, i]) for i in range(len(prompts))) for m in range(len(models))]
    plain_total = sum(median["plain", i] for i in range(len(prompts)))
    rows = []
    for name, _, _ in variants:
        per_prompt = [median[name, i] for i in range(len(prompts))]
        accepted = sum(stats.get((name, i), (0, 0, 0))[0] for i in range(len(prompts)))
        drafted = sum(stats.get((name, i), (0, 0, 0))[1] for i in range(len(prompts)))
        rows.append(
            {
                "variant": name,
                "seconds": sum(per_prompt),
                "per_prompt_s": per_prompt,
                "per_prompt_vs_plain": [t / median["plain", i] for i, t in enumerate(per_prompt)],
                "per_prompt_acceptance": [
                    stats[name, i][0] / stats[name, i][1] if (name, i) in stats and stats[name, i][1] else None
                    for i in range(len(prompts))
                ],
                "vs_plain": sum(per_prompt) / plain_total,
                "vs_members_sum": sum(per_prompt) / sum(member_s),
                "acceptance_rate": accepted / drafted if drafted else None,
                "rounds": sum(stats.get((name, i), (0, 0, NEW_TOKENS))[2] for i in range(len(prompts))),
                "identical_to_plain": all(
                    bool(torch.equal(outputs[name, i], outputs["plain", i])) for i in range(len(prompts))
                ),
            }
        )
    sizes = [sum(p.numel() for p in model.parameters()) / 1e6 for model in models]
    continuations = [
        repr(tokenizer.decode(outputs["plain", i][0, PROMPT_TOKENS : PROMPT_TOKENS + 24])) for i in range(len(prompts))
    ]
    lines = [
        f"Greedy generation of {NEW_TOKENS} new tokens (min_new_tokens={NEW_TOKENS}) after each of {len(prompts)} "
        f"prompts ({PROMPT_TOKENS} tokens of builtin-corpus test blocks 0-{len(prompts) - 1}), batch 1, float32. "
        f"Ensemble: uniform mixture of SmolLM2-135M-Instruct ({sizes[0]:.1f}M) and two students built by "
        "`init_student_from_teacher` (uniform layer selection: "
        + ", ".join(
            f"{layers} layers, {size:.1f}M" for (layers, _), size in zip(SPECULATIVE_STUDENTS, sizes[1:], strict=True)
        )
        + f") and distilled for {DISTIL_STEPS} AdamW steps of {DISTIL_BATCH} x {DISTIL_TOKENS} tokens on the teacher's "
        f"logits (builtin corpus train split). {rounds} interleaved rounds (every prompt: every variant, then every "
        f"member), medians per prompt, summed over prompts. Load average (1 min) at each round's start: {loads}.",
        "",
        "| variant | s (3 prompts) | vs plain ensemble | per prompt vs plain | acceptance rate (per prompt) | rounds | "
        "tokens == plain |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        acceptance = "-" if row["acceptance_rate"] is None else f"{row['acceptance_rate']:.2f}"
        if row["acceptance_rate"] is not None:
            acceptance += (
                " (" + ", ".join("-" if a is None else f"{a:.2f}" for a in row["per_prompt_acceptance"]) + ")"
            )
        lines.append(
            f"| {row['variant']} | {row['seconds']:.2f} | {row['vs_plain']:.2f}x | "
            + ", ".join(f"{r:.2f}x" for r in row["per_prompt_vs_plain"])
            + f" | {acceptance} | {row['rounds']} | {row['identical_to_plain']} |"
        )
    lines += [
        "",
        f"Members' own generate() (3 prompts): {', '.join(f'{s:.2f} s' for s in member_s)} (sum {sum(member_s):.2f} s).",
        "",
        "Plain ensemble continuations (first 24 tokens): " + "; ".join(continuations),
        "",
        "Target: identical greedy tokens and <= 0.8x the plain ensemble's wall time.",
    ]
    data = {"rows": rows, "member_s": member_s, "plain_s": plain_total, "params_m": sizes, "loads": loads}
    write_result("ensemble_speculative", "\n".join(lines), data)


def run_verify_cost(models, context=100, repeats=15):
    """Milliseconds of one cached forward over n new tokens (n = 1..7) after a 100-token context, per model: what a
    speculative round's verification costs against a one-token decoding step. Sizes interleaved, medians."""
    import random

    import torch

    from hf_interop._compat import cache_argument

    names = ["SmolLM2-135M", *[f"{layers}-layer student" for layers, _ in SPECULATIVE_STUDENTS]]
    sizes = (1, 2, 3, 4, 5, 7)
    generator = torch.Generator().manual_seed(0)
    rows = {}
    with torch.no_grad():
        for name, model in zip(names, models, strict=True):
            cache = model(input_ids=torch.randint(0, 40000, (1, context), generator=generator), use_cache=True)
            cache = cache.past_key_values
            times = {n: [] for n in sizes}
            order = [n for n in sizes for _ in range(repeats)]
            random.Random(0).shuffle(order)
            for n in order:
                ids = torch.randint(0, 40000, (1, n), generator=generator)
                start = time.perf_counter()
                model(input_ids=ids, use_cache=True, logits_to_keep=n, **{cache_argument(): cache})
                times[n].append(time.perf_counter() - start)
                cache.crop(-n)
            rows[name] = {n: 1000 * statistics.median(values) for n, values in times.items()}
    lines = [
        f"One cached forward over n new tokens after a {context}-token context (`logits_to_keep=n`), float32, batch 1; "
        f"sizes interleaved in a seeded order, {repeats} runs each, median milliseconds (x the one-token step).",
        "",
        "| model | " + " | ".join(f"n={n}" for n in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[n]:.1f} ({row[n] / row[1]:.2f}x)" for n in sizes) + " |")
    write_result("ensemble_verify_cost", "\n".join(lines), {"ms": rows, "context": context})


def jargon_file_text(download_dir):
    """The Jargon File's entries, from Debian's `jargon-text` package (`apt-get download`, `dpkg-deb -x`)."""
    import gzip
    import subprocess

    download_dir.mkdir(parents=True, exist_ok=True)
    extracted = download_dir / "extracted"
    text_path = extracted / "usr/share/doc/jargon-text/jargon.txt.gz"
    if not text_path.is_file():
        subprocess.run(["apt-get", "download", JARGON_DEB], cwd=download_dir, check=True)
        deb = next(download_dir.glob(f"{JARGON_DEB}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(extracted)], check=True)
    text = gzip.decompress(text_path.read_bytes()).decode("utf-8", errors="replace")
    # the body (after the glossary's index) holds the entries; keep paragraphs long enough to be prose
    paragraphs = [" ".join(block.split()) for block in text.split("\n\n")]
    return [paragraph for paragraph in paragraphs if len(paragraph) > 200]


def run_proxy_tuning(work_dir, teacher, tokenizer, students, max_test_blocks=8):
    """SmolLM2 steered by (LoRA-tuned small student - small student) on the Jargon File: held-out perplexity."""
    import copy

    import torch
    from datasets import Dataset, DatasetDict
    from peft import LoraConfig, get_peft_model

    from hf_interop import EnsembleForCausalLM, evaluate_perplexity, pack_dataset

    start = time.perf_counter()
    paragraphs = jargon_file_text(work_dir / "jargon")
    # every 10th entry is held out for the test, the 10th after the 5th for choosing alpha (no entry is split)
    corpus = DatasetDict(
        {
            "train": Dataset.from_dict({"text": [p for i, p in enumerate(paragraphs) if i % 10 not in (0, 5)]}),
            "validation": Dataset.from_dict({"text": [p for i, p in enumerate(paragraphs) if i % 10 == 5]}),
            "test": Dataset.from_dict({"text": [p for i, p in enumerate(paragraphs) if i % 10 == 0]}),
        }
    )
    blocks = pack_dataset(corpus, tokenizer, block_size=128)
    test = blocks["test"].select(range(min(max_test_blocks, len(blocks["test"]))))
    validation = blocks["validation"].select(range(min(max_test_blocks, len(blocks["validation"]))))
    small_base = students[-1]
    tuned = get_peft_model(
        copy.deepcopy(small_base),
        LoraConfig(
            r=16,
            lora_alpha=32,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            lora_dropout=0.0,
        ),
    )
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    tuned.train()
    for step in range(LORA_STEPS):
        if step % 20 == 0:
            print(f"  LoRA step {step}/{LORA_STEPS} ({time.perf_counter() - start:.0f} s)", flush=True)
        rows = blocks["train"][torch.randint(len(blocks["train"]), (LORA_BATCH,), generator=generator).tolist()]
        input_ids = torch.tensor(rows["input_ids"])
        loss = tuned(input_ids=input_ids, labels=input_ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tuned = tuned.merge_and_unload().eval()
    train_s = time.perf_counter() - start

    def perplexity(model, blocks=test):
        return evaluate_perplexity(model, blocks, batch_size=8, show_progress=False)["perplexity"]

    results = {"SmolLM2-135M alone": perplexity(teacher)}
    results["small student (base, before LoRA)"] = perplexity(small_base)
    results["small student + LoRA (tuned)"] = perplexity(tuned)
    validation_perplexity = {}
    for alpha in PROXY_ALPHAS:  # DExperts' alpha: how hard the small model's change steers the large one
        proxy = EnsembleForCausalLM.from_members(
            [(teacher, tokenizer), (tuned, tokenizer), (small_base, tokenizer)], [1.0, alpha, -alpha], "arithmetic"
        )
        validation_perplexity[alpha] = perplexity(proxy, validation)
        results[f"proxy-tuned SmolLM2, arithmetic [1, {alpha:g}, -{alpha:g}]"] = perplexity(proxy)
    chosen = min(validation_perplexity, key=validation_perplexity.get)
    results[f"proxy-tuned SmolLM2, alpha chosen on validation ({chosen:g})"] = results[
        f"proxy-tuned SmolLM2, arithmetic [1, {chosen:g}, -{chosen:g}]"
    ]
    lines = [
        f"Held-out perplexity on the Jargon File (Debian package `{JARGON_DEB}` 4.4.7, public domain: `apt-get download "
        f"{JARGON_DEB}`, `dpkg-deb -x`; entries longer than 200 characters, every 10th held out for the test, every 10th from the 5th for choosing alpha; {len(test)} test "
        f"blocks of 128 SmolLM2 tokens). Small model: the {SPECULATIVE_STUDENTS[-1][0]}-layer student of part 3; "
        f"tuned with LoRA (r=16, all linear layers) for {LORA_STEPS} AdamW steps of {LORA_BATCH} x 128 tokens on the train "
        f"entries ({train_s:.0f} s with loading the text), then merged. Proxy-tuning "
        '(https://huggingface.co/papers/2401.08565) is `combination="arithmetic"` over (SmolLM2, tuned small, small '
        "base).",
        "",
        "| model | held-out perplexity |",
        "|---|---|",
    ]
    lines += [f"| {name} | {value:.2f} |" for name, value in results.items()]
    lines += [
        "",
        "Validation perplexity by alpha (the chosen one is the lowest): "
        + ", ".join(f"{alpha:g}: {value:.2f}" for alpha, value in validation_perplexity.items()),
        "",
        "Target: the proxy-tuned combination below SmolLM2 alone on the tuning domain.",
    ]
    data = {"perplexity": results, "validation_perplexity": validation_perplexity, "alpha": chosen, "train_s": train_s}
    write_result("ensemble_proxy_tuning", "\n".join(lines), data)


if __name__ == "__main__":
    main()
