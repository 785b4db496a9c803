#!/usr/bin/env bash
# GPU preflight: say exactly what is missing before a stage starts. COTUNE_SKIP_PREFLIGHT=1 bypasses it.
set -euo pipefail
if [[ "${COTUNE_SKIP_PREFLIGHT:-0}" != "1" ]]; then
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "error: no GPU visible in the container; run it with --gpus all (and the NVIDIA Container Toolkit on the host)," \
         "or set COTUNE_SKIP_PREFLIGHT=1 to run on the CPU" >&2
    exit 2
  fi
  python - <<'PY'
import sys
import torch
if not torch.cuda.is_available():
    driver = "unknown"
    try:
        import subprocess
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    sys.exit(f"error: a GPU is visible but CUDA {torch.version.cuda} can't use it (driver {driver}); this image "
             "needs an NVIDIA driver for CUDA 13.0 (580 or newer). Set COTUNE_SKIP_PREFLIGHT=1 to bypass")
free, total = torch.cuda.mem_get_info()
need = float(__import__("os").environ.get("COTUNE_MIN_GPU_GIB", "8"))
if free / 2**30 < need:
    sys.exit(f"error: {free / 2**30:.1f} GiB GPU memory free of {total / 2**30:.1f}; the configured model needs about "
             f"{need:.0f} GiB (COTUNE_MIN_GPU_GIB). Free the GPU or set COTUNE_SKIP_PREFLIGHT=1")
PY
fi
exec "$@"
