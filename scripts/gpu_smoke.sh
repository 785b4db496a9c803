#!/usr/bin/env bash
# The GPU path on an offline host, through cotune's own stage scripts: a small Qwen3-architecture model with
# RANDOM weights (no download possible; throughput does not depend on weight values, answers are noise), trained
# with the Unsloth backend in 4-bit, asked, merged and converted to GGUF Q8_0.
# Usage: scripts/gpu_smoke.sh TOKENIZER_DIR RUN_DIR [extra settings flags...]
set -euo pipefail
tok=$1 run=$2; shift 2
model="$run/qwen3-tiny-random"
python - <<'PY'
import importlib.metadata as m, torch
print("versions:", {p: m.version(p) for p in ("torch", "unsloth", "unsloth_zoo", "transformers", "trl", "peft",
                                             "datasets", "bitsandbytes", "accelerate")})
print("gpu:", torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
PY
python -m cotune.randmodel --shape qwen3-tiny --tokenizer "$tok" --out "$model"
common=(--preset demo --base-model "$model" --run-dir "$run" --backend unsloth --load-in-4bit true
        --optim adamw_8bit --gradient-checkpointing unsloth --dtype auto --gguf-quants Q8_0 "$@")
python scripts/data.py "${common[@]}"
python scripts/train.py "${common[@]}"
python scripts/ask.py after "${common[@]}"
python scripts/export.py "${common[@]}"
