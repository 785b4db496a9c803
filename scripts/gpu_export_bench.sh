#!/usr/bin/env bash
# Export timing at a full model shape on an offline GPU host, as the stage is and as it was: a model of that
# architecture with RANDOM weights and a random LoRA adapter of the reference recipe's shape (r 16, seven projections)
# go through
#   after:  cotune's export stage (merged weights handed to llama.cpp's converter in memory, tensors quantized on
#           every core, sha256 taken while writing, the merged folder saved meanwhile), and
#   before: the export stage of commit 8e43c79 (merge, save, llama.cpp's converter as a subprocess reading the saved
#           folder, then sha256 of everything),
# then the two Q8_0 files are compared key by key and tensor by tensor, and every step's seconds are printed as JSON
# (also written to $OUT/export-bench.json when OUT is set). Weight values don't change the time; nothing here is a
# quality figure. Peak disk: about 3 x the model's bf16 size (50 GB for qwen3-8b); about 7 minutes for qwen3-8b.
#
# On a machine with the project set up (network, `make setup`), once:
#   scripts/gpu_export_bench.sh prepare      # .gpu/: tokenizer, llama.cpp's converter, the old stage; .whl/: wheels
# On the GPU host, from the checkout with .gpu/ and .whl/ beside it:
#   scripts/gpu_export_bench.sh run RUN_DIR [SHAPE (default qwen3-8b)]
set -euo pipefail
before_commit=8e43c79  # the export stage as it was: converter as a subprocess on the saved folder

if [[ ${1:-} == prepare ]]; then
  py=${PYTHON:-.venv/bin/python}
  rm -rf .gpu && mkdir -p .gpu/tokenizer
  # the last line: on a fresh machine embedded_hf_folder() first prints that it prepares the folder
  embedded=$(PYTHONPATH=src $py -c 'from cotune.models import embedded_hf_folder; print(embedded_hf_folder())' | tail -n 1)
  for f in "$embedded"/{tokenizer,special_tokens,chat_template}*; do [[ -e $f ]] && cp "$f" .gpu/tokenizer/; done
  [[ -f .gpu/tokenizer/tokenizer.json ]] || { echo "no tokenizer.json in $embedded: .gpu/tokenizer is empty" >&2; exit 1; }
  cp -r "$(PYTHONPATH=src $py -c 'from cotune.converter import converter_dir; print(converter_dir())')" .gpu/converter
  git show "$before_commit:src/cotune/export.py" > .gpu/export_before.py
  bash ../shared/offline-gpu/fetch_wheels.sh >/dev/null  # bitsandbytes for the NF4 merge (and the training stack)
  du -sh .gpu .whl
  exit 0
fi

[[ ${1:-} == run ]] || { echo "usage: $0 prepare | run RUN_DIR [SHAPE]" >&2; exit 2; }
run=$2 shape=${3:-qwen3-8b}
export COTUNE_CONVERTER=$PWD/.gpu/converter CUBLAS_WORKSPACE_CONFIG=:4096:8
model="$run/$shape-random"
mkdir -p "$run"
python - <<'PY'
import os, torch
print("host:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU", f"{os.cpu_count()} CPUs,",
      torch.__version__)
PY
df -h "$run" | tail -1
clock() { date +%s.%N; }

# How the converter's own Q8_0 code scales over tensors: threads (what the export uses) against forked processes
python - "$run/quantize-scaling.json" <<'PY'
import json, multiprocessing, os, sys, time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
import numpy as np
from cotune.converter import converter_gguf

gguf = converter_gguf()
arrays = [np.random.default_rng(i).standard_normal((4096, 4096), dtype=np.float32) for i in range(32)]

def quantize(i):
    return gguf.quants.quantize(arrays[i], gguf.GGMLQuantizationType.Q8_0).nbytes

result = {"elements": sum(a.size for a in arrays)}
for workers in (1, 4, 8, 16):
    start = time.monotonic()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(quantize, range(len(arrays))))
    result[f"threads_{workers}_s"] = round(time.monotonic() - start, 2)
start = time.monotonic()
with ProcessPoolExecutor(16, mp_context=multiprocessing.get_context("fork")) as pool:
    list(pool.map(quantize, range(len(arrays))))
result["processes_16_s"] = round(time.monotonic() - start, 2)
print("Q8_0 quantize scaling:", json.dumps(result))
json.dump(result, open(sys.argv[1], "w"))
PY

t0=$(clock)
python -m cotune.randmodel --shape "$shape" --tokenizer .gpu/tokenizer --out "$model" --adapter "$run/adapter"
t1=$(clock)
for side in after before; do mkdir -p "$run/$side/train" && cp -r "$run/adapter" "$run/$side/train/adapter"; done

# after: the stage as it is now
python scripts/export.py --base-model "$model" --run-dir "$run/after" --gguf-quants Q8_0
t2=$(clock)
rm -rf "$run/after/export/merged"  # its hash is in run.json; the disk is needed for the old stage's copy

# before: the same stage script with the old export module
rm -rf "$run/oldsrc" && mkdir -p "$run/oldsrc" && cp -r src/cotune "$run/oldsrc/" && cp .gpu/export_before.py "$run/oldsrc/cotune/export.py"
PYTHONPATH="$run/oldsrc:${PYTHONPATH:-}" python scripts/export.py --base-model "$model" --run-dir "$run/before" --gguf-quants Q8_0
t3=$(clock)

python - "$run" "$t0" "$t1" "$t2" "$t3" <<'PY'
import json, os, sys, time
from pathlib import Path
from cotune.converter import gguf_differences

run, (t0, t1, t2, t3) = Path(sys.argv[1]), map(float, sys.argv[2:])
records = {side: json.loads((run / side / "export" / "run.json").read_text()) for side in ("before", "after")}
files = {side: Path(r["ggufs"]["Q8_0"]["path"]) for side, r in records.items()}
start = time.monotonic()
differences = gguf_differences(files["before"], files["after"])
from cotune.converter import converter_gguf
n_tensors = len(converter_gguf().GGUFReader(files["after"]).tensors)
result = {
    "random_model_and_adapter_s": round(t1 - t0, 1),
    "before": {"stage_wall_s": round(t3 - t2, 1), **{k: round(v, 1) for k, v in records["before"]["seconds"].items()}},
    "after": {"stage_wall_s": round(t2 - t1, 1), "threads": records["after"]["threads"],
              **{k: round(v, 1) for k, v in records["after"]["seconds"].items()}},
    "merged_folders_identical": records["before"]["outputs"]["merged"]["sha256"] == records["after"]["outputs"]["merged"]["sha256"],
    "q8_0_sha256": {side: r["ggufs"]["Q8_0"]["sha256"] for side, r in records.items()},
    "q8_0_bytes": records["after"]["ggufs"]["Q8_0"]["bytes"],
    "q8_0_tensors_compared": n_tensors,
    "q8_0_differences": differences,  # [] = same metadata and every tensor's type, shape and bytes
    "compare_s": round(time.monotonic() - start, 1),
    "q8_0_quantize_scaling": json.loads((run / "quantize-scaling.json").read_text()),
}
print(json.dumps(result, indent=1))
if os.environ.get("OUT"):
    (Path(os.environ["OUT"]) / "export-bench.json").write_text(json.dumps(result, indent=1) + "\n")
PY
