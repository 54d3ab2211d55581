#!/usr/bin/env bash
# Installs llama-cpp-python's OpenAI-compatible server into the given Python, for the served-teacher tests.
# PyPI ships llama-cpp-python as source only, so the wheel is built once (about 10 min on 2 cores) into a cache
# folder outside the checkout and reused by every later `make test` and CI run on the machine.
# Usage: .ci/install_llama_cpp.sh PYTHON VERSION CACHE_DIR
set -euo pipefail
PY="$1"
VERSION="$2"
CACHE="$3"
if "$PY" -c "import llama_cpp, llama_cpp.server, sys; sys.exit(0 if llama_cpp.__version__ == '$VERSION' else 1)" 2>/dev/null; then
    exit 0
fi
mkdir -p "$CACHE"
WHEEL=$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$WHEEL" ]; then
    echo "Building llama-cpp-python $VERSION once into $CACHE (about 10 min on 2 cores; reused afterwards)..."
    START=$(date +%s)
    # Portable CPU build (AVX2/FMA/F16C, no -march=native): the cached wheel also runs on the CPUs of later machines.
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF" \
        "$PY" -m pip wheel -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -w "$CACHE"
    echo "Built llama-cpp-python $VERSION in $(( $(date +%s) - START )) s."
    WHEEL=$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl | head -n 1)
fi
"$PY" -m pip install -q "${WHEEL}[server]"
