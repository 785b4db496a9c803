# syntax=docker/dockerfile:1
# cotune's CUDA image: Unsloth training stack + llama-cpp-python built with CUDA + llama.cpp's converter.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-devel-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
ARG LLAMA_CPP_PYTHON=0.3.36
ARG CUDA_ARCHITECTURES="80;86;89;90"

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    COTUNE_CACHE=/opt/cotune-cache HF_HOME=/hf-cache UNSLOTH_DISABLE_STATISTICS=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential cmake git ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

# The GPU set in one resolver pass, torch from the CUDA wheel index.
COPY requirements/gpu.txt /tmp/requirements-gpu.txt
RUN pip install --extra-index-url "${TORCH_INDEX}" -r /tmp/requirements-gpu.txt

# llama-cpp-python with CUDA; the build fails here if its CUDA backend would not load (no silent CPU fallback).
RUN CMAKE_ARGS="-DGGML_CUDA=on -DGGML_NATIVE=off -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES}" \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" pip install "llama-cpp-python==${LLAMA_CPP_PYTHON}" \
 && LIB="$(python -c 'import llama_cpp, pathlib; print(pathlib.Path(llama_cpp.__file__).parent / "lib")')" \
 && ls "${LIB}"/libggml-cuda.so \
 && ! ldd "${LIB}"/libggml-cuda.so | grep -q "not found"

# The converter of exactly that llama-cpp-python version (from its source distribution), and this package.
COPY pyproject.toml README.md /opt/cotune/
COPY src /opt/cotune/src
COPY scripts /opt/cotune/scripts
COPY docker/entrypoint.sh /usr/local/bin/cotune-entrypoint
RUN pip install --no-deps /opt/cotune \
 && python -m cotune.converter fetch \
 && chmod 0755 /usr/local/bin/cotune-entrypoint \
 && mkdir -p /work /hf-cache && chmod 0777 /work /hf-cache

WORKDIR /work
ENTRYPOINT ["/usr/local/bin/cotune-entrypoint"]
CMD ["python", "/opt/cotune/scripts/verify.py", "--help"]
