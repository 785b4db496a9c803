#!/usr/bin/env bash
# Training on two GPUs of one offline host, in one go (about 8 minutes):
#  1. cotune's own train stage on 2 GPUs through torchrun, on a small Qwen3-shaped model with RANDOM weights: Unsloth
#     QLoRA against the same run on 1 GPU, Unsloth with GRADIENT_CHECKPOINTING=true, the plain stack in 4-bit; all at
#     once, while the Qwen3-8B-shaped model (RANDOM weights) is built;
#  2. the benchmark's multi-GPU comparison on that 8B shape: 1 GPU against 2 at 8 and 16 sequences per optimizer step,
#     for each way of sharing a step out between the GPUs (scripts/bench.py --ddp).
# Weight values change neither speed nor memory; nothing here is a quality figure.
# Usage: scripts/gpu_ddp_bench.sh TOKENIZER_DIR RUN_DIR [STEPS (default 10)]
set -euo pipefail
tok=$1 run=$2 steps=${3:-10}
root=$(pwd)
mkdir -p "$run"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
python - <<'PY'
import importlib.metadata as m, torch
def version(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return "absent"
print("versions:", {p: version(p) for p in ("torch", "unsloth", "unsloth_zoo", "transformers", "trl", "peft",
                                           "datasets", "bitsandbytes", "accelerate")})
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"gpu {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, uuid {p.uuid}")
PY
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader || true
nvidia-smi topo -m 2>/dev/null | head -4 || true
start=$(date +%s)

# --- 1. the train stage on 2 GPUs (small random model), while the 8B shape is built -------------------------------
python -m cotune.randmodel --shape qwen3-tiny --tokenizer "$tok" --out "$run/tiny" > "$run/tiny.log" 2>&1
if [ ! -f "$run/m8b/config.json" ]; then
  python -m cotune.randmodel --shape qwen3-8b --tokenizer "$tok" --out "$run/m8b" > "$run/m8b.log" 2>&1 &
  build=$!
fi
e2e() {  # NAME PROCESSES [settings flags...]: data, then train through cotune's own scripts
  local name=$1 nproc=$2; shift 2
  local dir="$run/e2e-$name" t0
  t0=$(date +%s)
  mkdir -p "$dir"
  local common=(--preset demo --base-model "$run/tiny" --run-dir "$dir" --load-in-4bit true --optim adamw_8bit
                --dtype auto --batch-size 2 --grad-accum 2 --max-steps 6 --warmup-steps 1 --save-steps 3
                --learning-rate 2e-4 "$@")
  local rc=0
  {
    python scripts/data.py "${common[@]}" &&
    UNSLOTH_COMPILE_LOCATION="$dir/unsloth_cache" timeout 420 python "$root/scripts/train.py" "${common[@]}" \
      --nproc-per-node "$nproc"
  } > "$dir/log.txt" 2>&1 || rc=$?
  echo "$rc $(( $(date +%s) - t0 ))" > "$dir/rc"
}
pids=()
e2e unsloth-2 2 --backend unsloth --gradient-checkpointing unsloth --offload-embedding true & pids+=($!)
e2e unsloth-1 1 --backend unsloth --gradient-checkpointing unsloth --offload-embedding true & pids+=($!)
e2e unsloth-gc-true-2 2 --backend unsloth --gradient-checkpointing true & pids+=($!)
e2e plain-2 2 --backend hf --gradient-checkpointing true & pids+=($!)
wait "${pids[@]}"
echo "phase 1 (train stage on 2 GPUs, 8B build): $(( $(date +%s) - start )) s"
python - "$run" <<'PY'
import json, pathlib, sys
run = pathlib.Path(sys.argv[1])
for d in sorted(run.glob("e2e-*")):
    rc, seconds = (d / "rc").read_text().split()
    log = (d / "log.txt").read_text(errors="replace").splitlines()
    out = {"job": d.name, "rc": int(rc), "seconds": int(seconds)}
    record = d / "train" / "run.json"
    if record.is_file():
        s = json.loads(record.read_text())["summary"]
        out.update({k: s.get(k) for k in ("backend", "dtype", "load_in_4bit", "global_step", "processes")})
    metrics = d / "train" / "metrics.jsonl"
    if metrics.is_file():
        entries = [json.loads(l) for l in metrics.read_text().splitlines()]
        out["losses"] = [round(e["loss"], 5) for e in entries if "loss" in e]
        out["eval"] = [round(e["eval_loss"], 5) for e in entries if "eval" in e]
    if (d / "train").is_dir():
        out["rng_files"] = sorted(p.name for p in (d / "train").glob("checkpoints/checkpoint-6/rng_state*"))
    out["warnings"] = [l for l in log if l.startswith(("WARNING", "error"))][:6]
    if int(rc) != 0:
        out["tail"] = log[-25:]
    print("E2E", json.dumps(out))
PY

# --- 2. the multi-GPU comparison on the 8B shape -------------------------------------------------------------------
if [ -n "${build:-}" ]; then wait "$build"; fi
tail -1 "$run/m8b.log" 2>/dev/null || true
# each run (1 GPU, then 2) starts no new plan after 150 s of training: the whole script stays within about 8 minutes
python scripts/bench.py --ddp --model "$run/m8b" --run-dir "$run" --steps "$steps" --warmup 3 --ddp-budget 150
echo "total: $(( $(date +%s) - start )) s; results: $run/bench/ddp.json, ddp.md"
