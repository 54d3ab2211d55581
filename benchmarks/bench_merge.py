"""Peak memory of merging 3 SmolLM2-135M-size checkpoints, streamed, against one model's size.

Three perturbed copies of the real teacher checkpoint (`hf_interop.default_teacher_path()`, float32) are written
to a temporary folder; each measurement then runs in a fresh subprocess (so no allocator state carries over) and
reports the peak resident memory above the process's state after imports:

- loading one model (`load_causal_lm`), the reference "one model's size";
- `merge_checkpoints(..., "linear")` and `"ties"` (3 checkpoints + base), streamed;
- a naive in-memory average of 3 state dicts, for contrast.

Run: `python benchmarks/bench_merge.py` (about 2-3 minutes on 2 CPU cores). Target: streamed merges peak at
<= 1.5x one model's size.

`python benchmarks/bench_merge.py --quality [WORK_DIR]` compares the merge methods on three LoRA fine-tunes of
SmolLM2-135M-Instruct on real text domains (Python's language reference, Debian's fortunes, the Jargon File; see
`recipes/smollm2-135m_merge_domains/`), each trained by that recipe's adapt config for a short budget (30 steps of
4 x 128 tokens). It reports the held-out perplexity on each domain's eval documents and their mean for the base,
each fine-tune, uniform task arithmetic, TIES, greedy soup, breadcrumbs, DELLA, Model Stock and task arithmetic with
fitted per-model and per-layer coefficients (fitted, like the greedy soup's selection, on the separate fit
documents), with the peak RSS of each merge and fit in a fresh process. Fine-tunes are kept in WORK_DIR (default
/tmp/bench_merge_quality) for reruns. About 25 minutes on 2 shared CPU cores the first time.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import PeakRSS, write_result

MiB = 2**20


def _make_copies(teacher_dir: Path, root: Path, count: int = 3) -> list[Path]:
    import torch

    from hf_interop import load_causal_lm

    model, tokenizer = load_causal_lm(teacher_dir, dtype="float32")
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    copies = []
    for index in range(count):
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                parameter.copy_(original[name] + 1e-3 * torch.randn(parameter.shape, generator=generator))
        folder = root / f"copy{index}"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        copies.append(folder)
    return copies


def _child(task: str, args: list[str]) -> None:
    """Runs in a fresh process: measure one task, print JSON."""
    import torch  # imported before the baseline so the measurement is the task's own memory
    import transformers  # noqa: F401

    from hf_interop import load_causal_lm, merge_checkpoints

    start = time.perf_counter()
    with PeakRSS() as peak:
        if task == "load":
            # from_pretrained memory-maps the weights lazily; one forward pass touches them all
            model, _ = load_causal_lm(args[0], load_tokenizer_too=False)
            with torch.no_grad():
                model(input_ids=torch.ones(1, 8, dtype=torch.long))
        elif task in ("linear", "ties"):
            *checkpoints, base, output = args
            merge_checkpoints(
                checkpoints,
                task,
                base=base if task == "ties" else None,
                density=0.5 if task == "ties" else None,
                output_dir=output,
                show_progress=False,
            )
        elif task == "naive":
            from safetensors.torch import load_file

            states = [load_file(str(Path(folder) / "model.safetensors")) for folder in args]
            merged = {name: sum(state[name] for state in states) / len(states) for name in states[0]}
            del merged
    print(json.dumps({"task": task, "peak_bytes": peak.delta, "seconds": time.perf_counter() - start}))


def _run_child(task: str, args: list[str]) -> dict:
    output = subprocess.run(
        [sys.executable, __file__, "--child", task, *map(str, args)], capture_output=True, text=True, check=True
    )
    return json.loads(output.stdout.strip().splitlines()[-1])


def main() -> None:
    from hf_interop import default_teacher_path

    teacher_dir = default_teacher_path()
    model_bytes = (teacher_dir / "model.safetensors").stat().st_size
    with tempfile.TemporaryDirectory(prefix="bench_merge_") as tmp:
        root = Path(tmp)
        copies = _make_copies(teacher_dir, root)
        load = _run_child("load", [copies[0]])
        linear = _run_child("linear", [*copies, teacher_dir, root / "merged_linear"])
        ties = _run_child("ties", [*copies, teacher_dir, root / "merged_ties"])
        naive = _run_child("naive", copies)

    rows = [
        ("load one model + one forward pass", load),
        ("merge 3, linear, streamed", linear),
        ("merge 3 + base, ties, streamed", ties),
        ("merge 3, linear, naive in-memory", naive),
    ]
    lines = [
        f"Checkpoint: SmolLM2-135M-Instruct float32, model.safetensors = {model_bytes / MiB:.0f} MiB; 3 perturbed "
        "copies. Peak RSS above the process's state after imports, each task in a fresh process. Shared machine "
        "(other jobs ran at the same time; timings are indicative).",
        "",
        "| task | peak RSS (MiB) | x model file size | seconds |",
        "|---|---:|---:|---:|",
    ]
    for label, result in rows:
        lines.append(
            f"| {label} | {result['peak_bytes'] / MiB:.0f} | {result['peak_bytes'] / model_bytes:.2f} | "
            f"{result['seconds']:.1f} |"
        )
    target_met = max(linear["peak_bytes"], ties["peak_bytes"]) <= 1.5 * model_bytes
    lines += ["", f"Target (streamed merges <= 1.5x one model's size): {'met' if target_met else 'NOT met'}."]
    write_result(
        "merge",
        "\n".join(lines),
        {
            "model_bytes": model_bytes,
            "results": {label: result for label, result in rows},
            "target_met": target_met,
        },
    )


# ----------------------------------------------------------------------------------------------------------------
# --quality: merge methods compared on three domain fine-tunes of SmolLM2
# ----------------------------------------------------------------------------------------------------------------

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes" / "smollm2-135m_merge_domains"
FIT_BLOCKS_PER_DOMAIN = 4
EVAL_BLOCKS_PER_DOMAIN = 4
FIT_STEPS = 20
FIT_BATCH_SIZE = 4
FIT_LEARNING_RATE = 0.1
BLOCK_SIZE = 128


def _blocks(text_file: Path, tokenizer, max_blocks: int):
    from hf_interop import pack_dataset
    from hf_interop.data import load_text_dataset

    return pack_dataset(
        load_text_dataset(str(text_file), "all"), tokenizer, block_size=BLOCK_SIZE, max_blocks=max_blocks
    )


def _fit_blocks(texts: dict, tokenizer):
    from datasets import concatenate_datasets

    parts = [_blocks(files["fit"], tokenizer, FIT_BLOCKS_PER_DOMAIN) for files in texts.values()]
    return concatenate_datasets(parts).select_columns(["input_ids"])


def _quality_child(spec_json: str) -> None:
    """Runs in a fresh process: one merge, greedy soup or fit, with its peak RSS; prints JSON."""
    import torch  # noqa: F401 - imported before the baseline so the measurement is the task's own memory
    import transformers  # noqa: F401

    from hf_interop import fit_merge_coefficients, greedy_soup, load_tokenizer, merge_checkpoints

    spec = json.loads(spec_json)
    texts = {domain: {part: Path(path) for part, path in files.items()} for domain, files in spec["texts"].items()}
    fit_set = None
    if spec["task"] in ("soup", "fit", "soup_fit"):
        fit_set = _fit_blocks(texts, load_tokenizer(spec["checkpoints"][0]))
    extra: dict = {}
    start = time.perf_counter()
    with PeakRSS() as peak:
        if spec["task"] == "merge":
            merge_checkpoints(
                spec["checkpoints"], output_dir=spec["output_dir"], show_progress=False, **spec["options"]
            )
        elif spec["task"] == "soup":
            result = greedy_soup(spec["checkpoints"], fit_set, output_dir=spec["output_dir"], show_progress=False)
            extra = {"selected": result["selected"]}
        elif spec["task"] == "soup_fit":  # warm start: the fit starts from the greedy soup's choice
            soup = greedy_soup(spec["checkpoints"], fit_set, show_progress=False)
            chosen = {str(Path(path).resolve()) for path in soup["selected"]}
            flags = [str(Path(path).resolve()) in chosen for path in spec["checkpoints"]]
            initial = [1.0 / sum(flags) if flag else 0.0 for flag in flags]
            result = fit_merge_coefficients(
                spec["checkpoints"],
                fit_set,
                output_dir=spec["output_dir"],
                show_progress=False,
                initial_weights=initial,
                **spec["options"],
            )
            extra = {
                "selected": soup["selected"],
                "initial": initial,
                "coefficients": result["coefficients"],
                "history": result["history"],
            }
        else:
            result = fit_merge_coefficients(
                spec["checkpoints"], fit_set, output_dir=spec["output_dir"], show_progress=False, **spec["options"]
            )
            extra = {"coefficients": result["coefficients"], "history": result["history"]}
    print(json.dumps({"peak_bytes": peak.delta, "seconds": time.perf_counter() - start, **extra}))


def _run_quality_child(spec: dict) -> dict:
    output = subprocess.run(
        [sys.executable, __file__, "--quality-child", json.dumps(spec)], capture_output=True, text=True
    )
    if output.returncode != 0:
        raise RuntimeError(f"{spec['task']} failed:\n{output.stderr[-3000:]}")
    return json.loads(output.stdout.strip().splitlines()[-1])


def _fit_plan(granularity: str, base: Path, task: str = "fit") -> tuple[str, dict]:
    options = dict(method="task_arithmetic", granularity=granularity, num_steps=FIT_STEPS, batch_size=FIT_BATCH_SIZE)
    return task, dict(base=str(base), learning_rate=FIT_LEARNING_RATE, **options)


def quality(work_dir: Path, finetune_steps: int = 30) -> None:
    import importlib.util

    from hf_interop import default_teacher_path, evaluate_perplexity, load_causal_lm, load_tokenizer
    from hf_interop.cli import main as cli_main

    spec = importlib.util.spec_from_file_location("prepare_texts", RECIPE_DIR / "prepare_texts.py")
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    work_dir.mkdir(parents=True, exist_ok=True)
    texts = prepare.prepare_texts(work_dir / "texts")
    base = default_teacher_path()
    model_bytes = (base / "model.safetensors").stat().st_size

    finetunes, finetune_info = [], {}
    for domain, files in texts.items():
        output = work_dir / f"lora_{domain}"
        if not (output / "merged" / "model.safetensors").is_file():
            args = ["adapt", "--config", str(RECIPE_DIR / f"adapt_{domain}.yaml"), "--dataset", str(files["train"])]
            args += [
                "--eval_dataset",
                str(files["eval"]),
                "--output_dir",
                str(output),
                "--overwrite_output_dir",
                "true",
            ]
            args += ["--disable_tqdm", "true", "--max_steps", str(finetune_steps)]
            start = time.perf_counter()
            if cli_main(args) != 0:
                raise RuntimeError(f"the {domain} fine-tune failed")
            info = {"steps": finetune_steps, "seconds": round(time.perf_counter() - start)}
            (output / "bench_steps.json").write_text(json.dumps(info))
        finetune_info[domain] = json.loads((output / "bench_steps.json").read_text())
        print(f"fine-tune {domain}: {finetune_info[domain]}", flush=True)
        finetunes.append(str(output / "merged"))

    weights = [1.0, 1.0, 1.0]
    plans = {  # most telling and cheapest first: partial results are written after each row
        "task arithmetic, uniform (1.0 each)": ("merge", dict(method="task_arithmetic", base=str(base))),
        "task arithmetic, uniform (1/3 each = uniform soup)": (
            "merge",
            dict(method="task_arithmetic", base=str(base), weights=[1 / 3] * 3),
        ),
        "task arithmetic, fitted per layer": _fit_plan("layer", base),
        "greedy soup": ("soup", {}),
        "task arithmetic, fitted per layer from the greedy soup": _fit_plan("layer", base, "soup_fit"),
        "Model Stock": ("merge", dict(method="model_stock", base=str(base))),
        "DELLA (density 0.5, epsilon 0.15)": (
            "merge",
            dict(method="della", base=str(base), weights=weights, density=0.5, epsilon=0.15),
        ),
        "TIES (density 0.5)": ("merge", dict(method="ties", base=str(base), weights=weights, density=0.5)),
        "breadcrumbs (density 0.9, gamma 0.01)": (
            "merge",
            dict(method="breadcrumbs", base=str(base), weights=weights, density=0.9, gamma=0.01),
        ),
        "task arithmetic, fitted per model": _fit_plan("model", base),
    }
    text_paths = {domain: {part: str(path) for part, path in files.items()} for domain, files in texts.items()}
    tokenizer = load_tokenizer(str(base))
    eval_sets = {domain: _blocks(files["eval"], tokenizer, EVAL_BLOCKS_PER_DOMAIN) for domain, files in texts.items()}
    perplexities: dict[str, dict[str, float]] = {}
    measurements: dict[str, dict] = {}

    def evaluate(label: str, folder: str) -> None:
        model, _ = load_causal_lm(folder, load_tokenizer_too=False)
        perplexities[label] = {
            domain: evaluate_perplexity(model, blocks, batch_size=8, show_progress=False)["perplexity"]
            for domain, blocks in eval_sets.items()
        }
        perplexities[label]["mean"] = sum(perplexities[label].values()) / len(eval_sets)
        print(f"{label}: {perplexities[label]}", flush=True)

    evaluate("base (SmolLM2-135M-Instruct)", str(base))
    for domain, path in zip(texts, finetunes, strict=True):
        evaluate(f"fine-tune: {domain}", path)
    with tempfile.TemporaryDirectory(prefix="bench_merge_quality_", dir=work_dir) as tmp:
        for index, (label, (task, options)) in enumerate(plans.items()):
            output_dir = str(Path(tmp) / f"merge{index}")
            spec = {"task": task, "checkpoints": finetunes, "output_dir": output_dir, "options": options}
            measurements[label] = _run_quality_child({**spec, "texts": text_paths})
            print(f"{label}: {measurements[label]['seconds']:.0f} s", flush=True)
            evaluate(label, output_dir)
            shutil.rmtree(output_dir)
            _write_quality(perplexities, measurements, plans, finetune_info, model_bytes, list(texts))


def _write_quality(perplexities, measurements, plans, finetune_info, model_bytes, domains) -> None:
    budgets = ", ".join(
        f"{domain} {info['steps']} steps ({info['seconds']} s)" for domain, info in finetune_info.items()
    )
    lines = [
        f"Three LoRA fine-tunes (r 8, 4 x 128 tokens per step; {budgets}; `recipes/smollm2-135m_merge_domains/`) "
        f"of SmolLM2-135M-Instruct (float32, {model_bytes / MiB:.0f} MiB), one per domain. Perplexity on each "
        f"domain's held-out eval documents ({EVAL_BLOCKS_PER_DOMAIN} blocks of {BLOCK_SIZE} tokens); greedy soup and "
        f"the fitted coefficients ({FIT_STEPS} Adam steps of {FIT_BATCH_SIZE} blocks, lr {FIT_LEARNING_RATE}, from 1/3 each, or from the greedy soup's choice) use "
        f"the separate fit documents ({FIT_BLOCKS_PER_DOMAIN} blocks per domain). Peak RSS above the process's "
        "state after imports, each merge or fit in a fresh process. Shared, heavily loaded machine (timings are "
        "indicative).",
        "",
        f"| model | {' | '.join(domains)} | mean | peak RSS (MiB) | x model | seconds |",
        f"|---|{'---:|' * (len(domains) + 4)}",
    ]
    for label, values in perplexities.items():
        measured = measurements.get(label)
        memory = "- | - | -"
        if measured:
            memory = f"{measured['peak_bytes'] / MiB:.0f} | {measured['peak_bytes'] / model_bytes:.2f} | "
            memory += f"{measured['seconds']:.0f}"
        lines.append(
            f"| {label} | {' | '.join(f'{values[d]:.2f}' for d in domains)} | {values['mean']:.2f} | {memory} |"
        )
    done = [label for label in plans if label in perplexities]
    fitted = [perplexities[label]["mean"] for label in done if "fitted" in label]
    merges = [measurements[label]["peak_bytes"] for label in done if plans[label][0] == "merge"]
    fits = [measurements[label]["peak_bytes"] for label in done if plans[label][0] == "fit"]
    targets = {}
    if fitted:
        uniform = [perplexities[label]["mean"] for label in done if "uniform" in label]
        targets["fitted mean perplexity < uniform task arithmetic (1.0 and 1/3 each)"] = min(fitted) < min(uniform)
        if "greedy soup" in perplexities:
            targets["fitted mean perplexity < greedy soup"] = min(fitted) < perplexities["greedy soup"]["mean"]
        targets["fitting peak RSS <= 2.5x one model"] = max(fits) <= 2.5 * model_bytes
    if merges:
        targets["merges peak RSS <= 1.5x one model"] = max(merges) <= 1.5 * model_bytes
    lines += ["", "Targets: " + "; ".join(f"{name}: {'met' if met else 'NOT met'}" for name, met in targets.items())]
    if len(done) < len(plans):
        lines.append(f"\nPartial: {len(done)} of {len(plans)} rows measured so far.")
    for label in done:
        if "coefficients" in measurements[label]:
            shown = {
                group: [round(v, 3) for v in row]
                for group, row in list(measurements[label]["coefficients"].items())[:5]
            }
            history = [round(v, 3) for v in measurements[label]["history"]]
            lines.append(f"\n{label}: coefficients (first groups) {shown}; objective by step {history}")
        if "selected" in measurements[label]:
            lines.append(f"\ngreedy soup kept: {[Path(path).parent.name for path in measurements[label]['selected']]}")
    write_result(
        "merge_quality",
        "\n".join(lines),
        {
            "model_bytes": model_bytes,
            "finetunes": finetune_info,
            "perplexities": perplexities,
            "measurements": measurements,
            "targets": targets,
        },
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3:])
    elif len(sys.argv) > 1 and sys.argv[1] == "--quality-child":
        _quality_child(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "--quality":
        quality(
            Path(sys.argv[2]) if len(sys.argv) > 2 else Path("/tmp/bench_merge_quality"),
            int(sys.argv[3]) if len(sys.argv) > 3 else 30,
        )
    else:
        main()
