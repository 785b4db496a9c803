#!/usr/bin/env bash
# The image's entrypoint: a preflight that says exactly what is missing before a stage starts, then the stage.
# The cpu flavor runs anywhere. The cuda flavor refuses to start without a usable GPU; COTUNE_SKIP_PREFLIGHT=1
# bypasses that (make ... COTUNE_SKIP_PREFLIGHT=1), and the stages then say themselves that they run on the CPU.
# How much GPU memory a run needs is the stages' own memory preflight, which knows the model.
set -euo pipefail

# `docker run --user UID:GID` (make's default: the caller's ids, so outputs belong to the caller) gives a user
# with no home in the image: caches of matplotlib, torch and Triton then go to a private folder under /tmp.
if [[ ! -w "${HOME:-/nonexistent}" ]]; then
  export HOME="/tmp/cotune-home-$(id -u)"
  mkdir -p "${HOME}"
fi

flavor="${COTUNE_FLAVOR:-cuda}"
if [[ "${flavor}" == cuda && "${COTUNE_SKIP_PREFLIGHT:-0}" != "1" ]]; then
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "error: no GPU visible in the container; run it with --gpus all (and the NVIDIA Container Toolkit on the host)," \
         "or set COTUNE_SKIP_PREFLIGHT=1 to run on the CPU (slow), or use the cpu image (make image FLAVOR=cpu)" >&2
    exit 2
  fi
  python - <<'PY'
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True).stdout.strip() or "unknown"
    except OSError:
        driver = "unknown"
    print(f"error: a GPU is visible but CUDA {torch.version.cuda} can't use it (driver {driver}); this image needs "
          "an NVIDIA driver for CUDA 13.0 (580 or newer). Set COTUNE_SKIP_PREFLIGHT=1 to bypass", file=sys.stderr)
    sys.exit(2)
PY
fi
exec "$@"
