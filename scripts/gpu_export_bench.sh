#!/usr/bin/env bash
# Export timing at a full model shape on a GPU host with no network: a model of that architecture with RANDOM
# weights and a random LoRA adapter of the reference recipe's shape (r 16, seven projections) go through cotune's
# own export stage (load the base in NF4 as trained, dequantize, merge, save, llama.cpp's converter to Q8_0,
# sha256). Weight values don't change the time; nothing here is a quality figure.
# Usage: scripts/gpu_export_bench.sh TOKENIZER_DIR RUN_DIR [SHAPE (default qwen3-8b)]
# Then time decoding: python scripts/bench.py --gguf RUN_DIR/export/*-Q8_0.gguf [--cpu]
set -euo pipefail
tok=$1 run=$2 shape=${3:-qwen3-8b}
model="$run/$shape-random"
start=$(date +%s)
python -m cotune.randmodel --shape "$shape" --tokenizer "$tok" --out "$model" --adapter "$run/train/adapter"
echo "random model and adapter: $(( $(date +%s) - start )) s"
python scripts/export.py --base-model "$model" --run-dir "$run" --gguf-quants Q8_0
python - "$run/export/run.json" <<'PY'
import json, sys
record = json.load(open(sys.argv[1]))
seconds = record["seconds"]
print("export seconds:", {k: round(v, 1) for k, v in seconds.items()}, f"total {sum(seconds.values()):.1f}")
print("merge:", record["merge"]["merged_into"], "| Q8_0 bytes:", record["ggufs"]["Q8_0"]["bytes"])
PY
