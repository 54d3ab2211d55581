"""`make demo`: the main job on the embedded default (SmolLM2-135M teacher, builtin corpus), no arguments."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class DemoSettings:
    """Knobs of the demo; the defaults are what `make demo` runs."""

    block_size: int = 128
    eval_batch_size: int = 8
    output_dir: str = "demo_outputs"
    show_progress: bool = True


def run_demo(settings: DemoSettings | None = None) -> dict:
    """Load the real teacher and report its held-out perplexity on the builtin corpus."""
    import torch

    from .data import load_builtin_corpus, pack_dataset
    from .evaluation import evaluate_perplexity
    from .loading import default_teacher_path, load_causal_lm

    settings = settings or DemoSettings()
    torch.manual_seed(0)
    started = time.perf_counter()
    print("hf_interop demo: SmolLM2-135M-Instruct teacher on the builtin corpus (Python's language reference)")
    teacher_dir = default_teacher_path()
    teacher, tokenizer = load_causal_lm(teacher_dir, dtype="float32")
    corpus = load_builtin_corpus()
    validation = pack_dataset(corpus["validation"], tokenizer, block_size=settings.block_size)
    result = evaluate_perplexity(
        teacher,
        validation,
        batch_size=settings.eval_batch_size,
        show_progress=settings.show_progress,
        description="Teacher perplexity",
    )
    num_parameters = sum(p.numel() for p in teacher.parameters())
    print()
    print(f"{'model':<28}{'parameters':>14}{'held-out ppl':>15}{'tokens/s':>12}")
    print(
        f"{'teacher (SmolLM2-135M)':<28}{num_parameters / 1e6:>13.1f}M{result['perplexity']:>15.2f}"
        f"{result['tokens_per_second']:>12.0f}"
    )
    print(f"\nheld-out tokens: {result['num_tokens']}, total time {time.perf_counter() - started:.0f} s")
    return {"teacher": result}
