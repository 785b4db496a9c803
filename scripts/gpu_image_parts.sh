#!/usr/bin/env bash
# The cuda image's parts on a GPU host without Docker (no container runtime there): its builder stage's
# llama-cpp-python wheel compiled with the Dockerfile's CMake flags, the GPU stages from the image's requirement set
# (shipped as wheels), verify through that CUDA build, and the sizes of what the runtime stage would install.
# Usage: scripts/gpu_image_parts.sh LLAMA_SRC TOKENIZER_DIR RUN_DIR [CUDA_ARCHITECTURES (default 90)]
set -euo pipefail
src=$1 tok=$2 run=$3 arch=${4:-90}
site=$(python - <<'PY'
import os, torch
print(os.path.dirname(os.path.dirname(torch.__file__)))
PY
)
echo "gpu: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -n1)"
# The Dockerfile's builder flags for the cuda flavor (LLAMA_CMAKE_ARGS), with this host's architecture.
start=$(date +%s)
CMAKE_ARGS="-DGGML_CUDA=on -DGGML_NATIVE=off -DCMAKE_CUDA_ARCHITECTURES=${arch}" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
  python -m pip wheel -q --no-build-isolation --no-deps "$src" -w /tmp/llw > /tmp/llw.log 2>&1 &
build=$!
# Meanwhile the GPU stages (Unsloth, 4-bit) on a small random Qwen3-architecture model.
bash scripts/gpu_smoke.sh "$tok" "$run" --max-steps 20 --warmup-steps 2 --save-steps 10 --max-new-tokens-after 32 --gguf-quants Q8_0 \
  > /tmp/smoke.log 2>&1 && echo "GPU stages: ok ($(grep -c 'done in' /tmp/smoke.log) stages)" || { tail -n 40 /tmp/smoke.log; exit 1; }
grep -E '^\[[a-z]+\] done in' /tmp/smoke.log
wait "$build" || { tail -n 30 /tmp/llw.log; exit 1; }
echo "llama-cpp-python CUDA wheel (arch ${arch}): $(( $(date +%s) - start )) s, $(du -m /tmp/llw/*.whl | cut -f1) MiB"
python -m pip install -q --no-deps --target /tmp/llsite /tmp/llw/*.whl
lib=/tmp/llsite/llama_cpp/lib
ls "$lib"/libggml-cuda.so && ! ldd "$lib"/libggml-cuda.so | grep "not found" && echo "libggml-cuda.so: every library found"
PYTHONPATH=/tmp/llsite:${PYTHONPATH:-} python - <<'PY'
import llama_cpp
print("llama_supports_gpu_offload:", llama_cpp.llama_supports_gpu_offload())
PY
# verify through the CUDA build: a random model must FAIL its checks (no EOS, no </think>), cleanly
PYTHONPATH=/tmp/llsite:${PYTHONPATH:-} python scripts/verify.py --gguf "$(ls "$run"/export/*-Q8_0.gguf)" \
  --run-dir "$run/verify-cuda" 2>&1 | tail -n 12 || true
echo "sizes of the runtime's Python packages on this host (MiB):"
du -sm "$site"/torch "$site"/nvidia "$site"/triton 2>/dev/null || true
du -sm /tmp/site 2>/dev/null || true
