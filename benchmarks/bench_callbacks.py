"""What the evaluation callbacks cost, side by side in one run.

    .venv/bin/python benchmarks/bench_callbacks.py

1. Held-out evaluation: `HeldOutEvaluationCallback.compute` (perplexity alone; with a reference model: + top-1
   agreement and KL) against `hf_interop.evaluate_perplexity` on the same blocks.
2. Agreement/KL from logits: the callbacks' torch reduction (`prediction_statistics`) against the project's
   `evaluate` modules (`kl_divergence` + `top1_agreement`), which go through Arrow.
3. Checkpoint-ensemble report (latest, K-checkpoint ensemble, weight average) against one perplexity evaluation.

Model: a random Llama (hidden 256, 4 layers, vocabulary 4096) on the builtin corpus, float32, CPU.
"""

from __future__ import annotations

import copy
import time

import torch
from _common import PeakRSS, time_call, write_result


def build_setup():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from hf_interop import load_builtin_corpus, pack_dataset

    corpus = load_builtin_corpus()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus["train"]["text"], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    blocks = pack_dataset(corpus["validation"], fast, block_size=128, max_blocks=32)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    student = LlamaForCausalLM(config).eval()
    torch.manual_seed(1)
    reference = LlamaForCausalLM(config).eval()
    return blocks, student, reference


def main() -> None:
    import hf_interop.metrics
    from hf_interop import evaluate_perplexity
    from hf_interop.callbacks import CheckpointEnsembleCallback, HeldOutEvaluationCallback
    from hf_interop.evaluation import prediction_statistics

    start = time.perf_counter()
    blocks, student, reference = build_setup()
    parameters = sum(p.numel() for p in student.parameters()) / 1e6
    rows, data = [], {"parameters_millions": parameters, "blocks": len(blocks), "block_size": 128}

    # 1. held-out evaluation
    baseline = time_call(lambda: evaluate_perplexity(student, blocks, batch_size=8, show_progress=False))
    alone = HeldOutEvaluationCallback(blocks, batch_size=8)
    with_reference = HeldOutEvaluationCallback(blocks, reference_model=reference, batch_size=8)
    time_alone = time_call(lambda: alone.compute(student))
    time_reference = time_call(lambda: with_reference.compute(student))
    rows.append(("held-out eval: evaluate_perplexity (baseline)", baseline, 1.0))
    rows.append(("held-out eval: callback, perplexity only", time_alone, time_alone / baseline))
    rows.append(("held-out eval: callback + reference (top-1, KL)", time_reference, time_reference / baseline))

    # 2. agreement and KL from logits
    with torch.no_grad():
        input_ids = torch.tensor(blocks[:32]["input_ids"])
        model_logits = student(input_ids=input_ids).logits
        reference_logits = reference(input_ids=input_ids).logits
    labels = input_ids.clone()
    flat_model = model_logits[:, :-1].reshape(-1, model_logits.shape[-1]).numpy()
    flat_reference = reference_logits[:, :-1].reshape(-1, model_logits.shape[-1]).numpy()
    kl_metric = hf_interop.metrics.load("kl_divergence")
    agreement_metric = hf_interop.metrics.load("top1_agreement")

    def with_evaluate_modules():
        kl_metric.compute(predictions=flat_model, references=flat_reference)
        agreement_metric.compute(predictions=flat_model, references=flat_reference)

    time_torch = time_call(lambda: prediction_statistics(model_logits, labels, reference_logits))
    with PeakRSS() as evaluate_memory:
        time_evaluate = time_call(with_evaluate_modules, repeats=1, warmup=0)
    with PeakRSS() as torch_memory:
        prediction_statistics(model_logits, labels, reference_logits)
    positions = flat_model.shape[0]
    rows.append((f"KL + top-1 on {positions}x{flat_model.shape[1]} logits: torch", time_torch, 1.0))
    rows.append(("KL + top-1, same logits: evaluate modules (Arrow)", time_evaluate, time_evaluate / time_torch))
    data["logits_memory_mb"] = {"torch": torch_memory.delta / 2**20, "evaluate": evaluate_memory.delta / 2**20}

    # 3. checkpoint ensembles: K snapshots of the (perturbed) student
    for num_checkpoints in (2, 4):
        callback = CheckpointEnsembleCallback(blocks, num_checkpoints=num_checkpoints, batch_size=8)
        snapshot_model = copy.deepcopy(student)
        for index in range(num_checkpoints):
            with torch.no_grad():
                for parameter in snapshot_model.parameters():
                    parameter.add_(torch.randn_like(parameter) * 1e-3 * (index + 1))
            state = {name: tensor.detach().clone() for name, tensor in snapshot_model.state_dict().items()}
            callback.snapshots.append((index, state))
        seconds = time_call(lambda callback=callback: callback.compare(student), repeats=1)
        rows.append((f"checkpoint-ensemble report, K={num_checkpoints}", seconds, seconds / baseline))

    table = ["| measurement | seconds | ratio to its baseline |", "|---|---:|---:|"]
    table += [f"| {name} | {seconds:.3f} | {ratio:.2f}x |" for name, seconds, ratio in rows]
    notes = (
        f"\nModel: Llama h256 L4, vocabulary 4096 ({parameters:.1f}M parameters), {len(blocks)} held-out blocks of 128 "
        "tokens, batch 8, float32 on CPU. Medians of 3 runs (the evaluate-module row: 1 run). Peak extra memory for "
        f"KL + top-1: torch {data['logits_memory_mb']['torch']:.0f} MB, evaluate modules "
        f"{data['logits_memory_mb']['evaluate']:.0f} MB. Taken on a shared machine (other jobs running), so "
        "absolute seconds are noisy; ratios within this run are comparable. Baselines: rows 1-3 and 6-7 against "
        "`evaluate_perplexity`, row 5 against row 4.\n"
    )
    data["rows"] = [{"name": name, "seconds": seconds, "ratio": ratio} for name, seconds, ratio in rows]
    data["total_seconds"] = time.perf_counter() - start
    write_result("callbacks", "\n".join(table) + "\n" + notes, data)


if __name__ == "__main__":
    main()
