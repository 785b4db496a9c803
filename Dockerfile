# cotune's image, in two flavors from this one file (make image FLAVOR=cuda|cpu):
#   cuda (default): for GPU servers; Unsloth's pinned set (requirements/gpu.txt), llama-cpp-python built with CUDA.
#   cpu:            the same stages on the CPU set (requirements/cpu.txt); CI, demos and verifying without a GPU.
# Two stages each: a builder compiles llama-cpp-python into a wheel and fetches llama.cpp's converter from the same
# source distribution; the runtime installs that wheel with the requirement set and carries no build tree, no
# CUDA toolkit headers and no pip cache.
#
# Build-time inputs that are never baked into the image (both optional):
#   --secret id=ca_bundle,src=FILE  a CA bundle for pip, behind a TLS-inspecting proxy (make image CA_BUNDLE=FILE)
#   docker/wheels/ in the context   a site wheelhouse offered to pip before the index (make image WHEELS=DIR)
ARG FLAVOR=cuda
ARG CUDA_DEVEL_IMAGE=nvidia/cuda:13.0.1-devel-ubuntu24.04
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
ARG DEBIAN_IMAGE=debian:bookworm-slim
# Where pip finds torch: "default" is PyTorch's index for the flavor (cu130 or cpu), "none" only PyPI and the
# wheelhouse, anything else an index URL (a site mirror).
ARG TORCH_INDEX=default

# ------------------------------------------------------------------ builders (one per flavor; BuildKit builds one)
FROM ${CUDA_DEVEL_IMAGE} AS builder-cuda
ARG CUDA_ARCHITECTURES="80;86;89;90"
ENV LLAMA_CMAKE_ARGS="-DGGML_CUDA=on -DGGML_NATIVE=off -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES}"

FROM ${DEBIAN_IMAGE} AS builder-cpu
ENV LLAMA_CMAKE_ARGS="-DGGML_NATIVE=off"

# hadolint ignore=DL3006
FROM builder-${FLAVOR} AS builder
ARG LLAMA_CPP_PYTHON=0.3.36
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential cmake git ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/build
# The wheel is compiled here unless the site wheelhouse already holds this version's wheel. The sdist is kept for
# the converter (convert_hf_to_gguf.py, conversion/, gguf-py/ of exactly this version).
RUN --mount=type=secret,id=ca_bundle \
    --mount=type=bind,source=docker/wheels,target=/wheels \
    --mount=type=cache,target=/root/.cache/pip \
    if [[ -s /run/secrets/ca_bundle ]]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
 && /opt/build/bin/pip download -q --no-deps --no-binary llama-cpp-python -d /sdist "llama-cpp-python==${LLAMA_CPP_PYTHON}" \
 && CMAKE_ARGS="${LLAMA_CMAKE_ARGS}" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" /opt/build/bin/pip wheel -q --no-deps \
    --find-links /wheels --find-links /sdist -w /out "llama-cpp-python==${LLAMA_CPP_PYTHON}" \
 && ls -l /out

# ------------------------------------------------------------------ runtimes
FROM ${CUDA_RUNTIME_IMAGE} AS runtime-cuda
# Triton (Unsloth's kernels) compiles its small C launchers at first use: gcc and the Python headers stay.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev libgomp1 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
ENV COTUNE_FLAVOR=cuda COTUNE_REQUIREMENTS=gpu.txt

FROM ${DEBIAN_IMAGE} AS runtime-cpu
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv libgomp1 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
ENV COTUNE_FLAVOR=cpu COTUNE_REQUIREMENTS=cpu.txt

# hadolint ignore=DL3006
FROM runtime-${FLAVOR} AS runtime
ARG FLAVOR
ARG LLAMA_CPP_PYTHON=0.3.36
ARG TORCH_INDEX
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    COTUNE_CONVERTER=/opt/cotune/llama.cpp-converter COTUNE_CACHE=/hf-cache/cotune HF_HOME=/hf-cache \
    HOME=/home/cotune UNSLOTH_DISABLE_STATISTICS=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
LABEL org.opencontainers.image.title="cotune" cotune.flavor="${FLAVOR}"

# The flavor's pinned set in one resolver pass, with the builder's llama-cpp-python wheel and the embedded model.
COPY requirements/ /tmp/requirements/
RUN --mount=type=secret,id=ca_bundle \
    --mount=type=bind,source=docker/wheels,target=/wheels \
    --mount=type=bind,from=builder,source=/out,target=/built \
    if [[ -s /run/secrets/ca_bundle ]]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
 && case "${TORCH_INDEX}" in \
      default) index="https://download.pytorch.org/whl/$([[ ${FLAVOR} == cuda ]] && echo cu130 || echo cpu)" ;; \
      none) index="" ;; \
      *) index="${TORCH_INDEX}" ;; \
    esac \
 && python3 -m venv /opt/venv \
 && pip install -q --find-links /built --find-links /wheels ${index:+--extra-index-url "${index}"} \
        -r "/tmp/requirements/${COTUNE_REQUIREMENTS}" \
 && pip install -q --no-deps -r /tmp/requirements/embedded.txt \
 && python -c "import llama_cpp, torch; print('llama_cpp', llama_cpp.__version__, 'torch', torch.__version__)"
# The cuda flavor must not fall back to llama.cpp's CPU backend without saying so: fail the build instead.
RUN if [[ "${FLAVOR}" == cuda ]]; then \
      LIB="$(python -c 'import llama_cpp, pathlib; print(pathlib.Path(llama_cpp.__file__).parent / "lib")')" \
      && ls "${LIB}"/libggml-cuda.so && ! ldd "${LIB}"/libggml-cuda.so | grep "not found"; \
    fi

COPY pyproject.toml README.md /opt/cotune/
COPY src /opt/cotune/src
COPY scripts /opt/cotune/scripts
COPY docker/entrypoint.sh /usr/local/bin/cotune-entrypoint
RUN --mount=type=secret,id=ca_bundle \
    --mount=type=bind,from=builder,source=/sdist,target=/sdist \
    if [[ -s /run/secrets/ca_bundle ]]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
 && pip install -q --no-deps /opt/cotune \
 && python -m cotune.converter fetch "/sdist/llama_cpp_python-${LLAMA_CPP_PYTHON}.tar.gz" \
 && rm -rf /opt/cotune/build \
 && useradd --create-home --uid 10001 --user-group --shell /bin/bash cotune \
 && mkdir -p /work/run /hf-cache \
 && chown cotune:cotune /work/run /hf-cache

USER 10001:10001
WORKDIR /work
ENTRYPOINT ["/usr/local/bin/cotune-entrypoint"]
CMD ["python", "/opt/cotune/scripts/verify.py", "--help"]
