#!/usr/bin/env bash
# One-shot check on a lent CUDA machine: the gpu-marked tests, then benchmarks/bench_gpu.py.
#
# Run from the repository root as the whole device command, with the wheels carried in `.whl/` (the machine has
# torch, accelerate, pyarrow, pandas, tokenizers, ... but not datasets, evaluate, trl, dill, multiprocess, and an
# older transformers/peft; see the report that added this file for how `.whl/` was filled):
#
#     bash benchmarks/gpu_check.sh            # with carry [".whl"]; writes logs and results under $OUT
#
# For the Liger-Kernel backend put its wheel in `.whl/` too (`pip download --no-deps -d .whl liger-kernel`; it needs
# the machine's triton): the gpu tests then compare it with our eager and compiled paths, and bench_gpu.py's loss
# section adds `hf_liger` rows beside `hf_compiled` (torch.compile, Triton) and `hf_chunked` (eager). Without the
# wheel those are skipped.
#
# `.whl/hf_interop_cache/gpt2-tokenizer-from-openai-whisper/` holds the GPT-2 tokenizer converted by
# `hf_interop.cross_tokenizer.load_gpt2_tokenizer`, which the cross-tokenizer GPU tests need (openai-whisper, its
# source, is not installed there). Worst case about 9.5 minutes: tests are cut at 200 s, the benchmark at 320 s.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | grep -v "Running pip as the 'root' user" || true
export PYTHONPATH=/tmp/site:$PWD
export HF_INTEROP_CACHE=$PWD/.whl/hf_interop_cache
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRL_EXPERIMENTAL_SILENCE=1

nvidia-smi -L 2>&1 | tee "$OUT/nvidia_smi.txt"
python3 - <<'EOF' 2>&1 | tee "$OUT/versions.txt"
import importlib

import torch

print("python", __import__("sys").version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
for name in ("transformers", "datasets", "evaluate", "trl", "peft", "accelerate", "huggingface_hub", "tokenizers",
             "safetensors", "pyarrow", "pandas", "fsspec", "dill", "multiprocess", "numpy", "triton", "liger_kernel"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')} ({module.__file__})")
    except Exception as error:  # noqa: BLE001
        print(f"{name}: IMPORT FAILED: {type(error).__name__}: {error}")
EOF

# Only the files that hold gpu-marked tests (the others would be collected and deselected anyway).
timeout -k 10 200 python3 -m pytest -m gpu -q -p no:cacheprovider \
    tests/distill/test_distillation_trainer.py tests/losses/test_chunked_loss.py tests/losses/test_compiled_loss.py \
    tests/ensemble/test_ensemble_cross_tokenizer.py \
    tests/ensemble/test_ensemble_causal_lm.py tests/losses/test_cross_tokenizer_losses.py tests/distill/test_multiprocess.py 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

timeout -k 10 320 python3 benchmarks/bench_gpu.py --budget-s 280 2>&1 | tee "$OUT/bench_gpu.log"
bench_rc=${PIPESTATUS[0]}
# bench_gpu.py rewrites results/gpu.* after every section, so a run cut short still leaves the sections it finished
cp benchmarks/results/gpu.md benchmarks/results/gpu.json "$OUT/" 2>/dev/null || true

echo "gpu tests exit $tests_rc; bench_gpu exit $bench_rc" | tee "$OUT/summary.txt"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
