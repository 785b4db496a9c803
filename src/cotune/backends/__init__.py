"""Which stack trains and generates: Unsloth on a CUDA GPU (the reference recipe), else transformers + peft + trl
with the same LoRA settings. Every degradation is said with a WARNING; asking for Unsloth where it can't run is
an error."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError, warn
from .settings import Settings


@dataclass(frozen=True)
class Backend:
    name: str         # "unsloth" or "hf"
    device: str       # "cuda" or "cpu"
    dtype: str        # "bf16", "fp16" or "fp32"
    load_in_4bit: bool
    optim: str

    def torch_dtype(self):
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.dtype]


def _cuda() -> tuple[bool, bool]:
    import torch

    available = torch.cuda.is_available()
    return available, available and torch.cuda.is_bf16_supported()


# What Unsloth (the pinned version) cannot do on N processes under torchrun DDP, as found on two H200s:
# (setting, value) -> why. BACKEND=auto falls back to the plain stack with a WARNING; BACKEND=unsloth is refused.
UNSLOTH_UNDER_DDP_FAILS: dict[tuple[str, str], str] = {}


def unsloth_ddp_problem(settings: Settings) -> str | None:
    for (name, value), why in UNSLOTH_UNDER_DDP_FAILS.items():
        if str(getattr(settings, name)) == value:
            return f"{name.upper()}={value}: {why}"
    return None


def choose_backend(settings: Settings, *, quiet: bool = False, world_size: int = 1) -> Backend:
    say = (lambda _m: None) if quiet else warn
    cuda, bf16_ok = _cuda()
    unsloth_installed = importlib.util.find_spec("unsloth") is not None
    if settings.backend == "unsloth":
        if not cuda:
            raise UserError("BACKEND=unsloth: no CUDA GPU is visible (Unsloth trains on NVIDIA GPUs); use "
                            "BACKEND=auto or hf on this machine")
        if not unsloth_installed:
            raise UserError("BACKEND=unsloth: the unsloth package is not installed here; use the CUDA image "
                            "(`make image`) or BACKEND=hf")
        name = "unsloth"
    elif settings.backend == "hf":
        name = "hf"
    elif cuda and unsloth_installed:
        name = "unsloth"
    else:
        name = "hf"
        reason = "no CUDA GPU is visible" if not cuda else "the unsloth package is not installed"
        say(f"backend hf (transformers + peft + trl) instead of Unsloth: {reason}")
    problem = unsloth_ddp_problem(settings) if name == "unsloth" and world_size > 1 else None
    if problem and settings.backend == "unsloth":
        raise UserError(f"BACKEND=unsloth on {world_size} processes: {problem}; change that setting, train on one "
                        "process, or use BACKEND=auto (the plain stack then)")
    if problem:
        name = "hf"
        say(f"backend hf (transformers + peft + trl) instead of Unsloth on {world_size} processes: {problem}")

    if not cuda:
        dtype = "fp32"
        if settings.dtype not in ("auto", "fp32"):
            say(f"DTYPE={settings.dtype} ignored on the CPU: training and generation run in fp32")
        else:
            say("no CUDA GPU: weights load in fp32 on the CPU (no 4-bit, no 8-bit optimizer); slow beyond small models")
    elif settings.dtype == "auto":
        dtype = "bf16" if bf16_ok else "fp16"
    elif settings.dtype == "bf16" and not bf16_ok:
        raise UserError("DTYPE=bf16: this GPU has no bf16 support; use DTYPE=fp16 or auto")
    else:
        dtype = settings.dtype

    load_in_4bit = settings.load_in_4bit and cuda
    if settings.load_in_4bit and not cuda:
        say("LOAD_IN_4BIT=true ignored: 4-bit (bitsandbytes) needs a CUDA GPU; loading in fp32")
    if load_in_4bit and name == "hf" and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("LOAD_IN_4BIT=true needs the bitsandbytes package; install it or set LOAD_IN_4BIT=false")

    optim = settings.optim
    if "8bit" in optim and (not cuda or importlib.util.find_spec("bitsandbytes") is None):
        say(f"OPTIM={optim} needs bitsandbytes on a CUDA GPU; using adamw_torch")
        optim = "adamw_torch"
    return Backend(name, "cuda" if cuda else "cpu", dtype, load_in_4bit, optim)


def gradient_checkpointing_value(settings: Settings, backend: Backend):
    """Unsloth's own offloaded checkpointing where it runs; plain checkpointing on the HF stack."""
    if settings.gradient_checkpointing == "false":
        return False
    if settings.gradient_checkpointing == "unsloth":
        return "unsloth" if backend.name == "unsloth" else True
    return True


def nf4_config(compute_dtype):
    """QLoRA's 4-bit NF4 quantization, the same for training, generation and the merge."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=True)


def load_hf_model(model_path: Path, backend: Backend, device_index: int = 0):
    """The base model on the plain stack: safetensors only, no remote code, NF4 when the backend asks for it; on a
    GPU, whole on this process's own device (4-bit weights placed on another one break DDP)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model_path, dtype=backend.torch_dtype(), use_safetensors=True, trust_remote_code=False,
        quantization_config=nf4_config(backend.torch_dtype()) if backend.load_in_4bit else None,
        device_map={"": device_index} if backend.device == "cuda" else None)


def bytes_per_weight(backend: Backend) -> float:
    return 0.6 if backend.load_in_4bit else {"fp32": 4, "bf16": 2, "fp16": 2}[backend.dtype]


OFFLOAD_EMBEDDING = {"auto": "auto", "true": True, "false": False}  # Unsloth's own "auto" sentinel


def load_for_training(settings: Settings, backend: Backend, model_path: Path, *, kbit_upcast: bool = False,
                      device_index: int = 0):
    """(model with LoRA adapters, tokenizer). On the plain stack a 4-bit base keeps its other weights in the compute
    dtype, as trl's own QLoRA path does; `kbit_upcast` instead runs peft's `prepare_model_for_kbit_training`, which
    keeps fp32 copies of every weight that isn't 4-bit (embeddings, head, norms) -- the benchmark measures both."""
    from .models import load_tokenizer, preflight_memory

    preflight_memory(model_path, bytes_per_weight(backend), "training", gpu=backend.device == "cuda")

    if backend.name == "unsloth":
        from unsloth import FastLanguageModel  # must come before transformers/peft/trl are used

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(model_path), max_seq_length=settings.max_seq_length, dtype=backend.torch_dtype(),
            load_in_4bit=backend.load_in_4bit, offload_embedding=OFFLOAD_EMBEDDING[settings.offload_embedding],
            device_map={"": device_index})
        model = FastLanguageModel.get_peft_model(
            model, r=settings.lora_r, target_modules=list(settings.target_modules), lora_alpha=settings.lora_alpha,
            lora_dropout=settings.lora_dropout, bias=settings.lora_bias,
            use_gradient_checkpointing=gradient_checkpointing_value(settings, backend),
            random_state=settings.random_state, use_rslora=settings.use_rslora, loftq_config=None)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model, tokenizer

    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if settings.offload_embedding == "true":
        warn("OFFLOAD_EMBEDDING=true ignored: only the Unsloth backend keeps the embedding in host RAM")
    torch.manual_seed(settings.random_state)
    model = load_hf_model(model_path, backend, device_index)
    tokenizer = load_tokenizer(model_path)
    if backend.load_in_4bit and (kbit_upcast or backend.dtype == "fp16"):
        # fp16 keeps peft's fp32 copies: fp16 norms and heads are where QLoRA's instabilities came from.
        # Checkpointing itself is switched on by the trainer (SFTConfig).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                        bias=settings.lora_bias, target_modules=list(settings.target_modules),
                        use_rslora=settings.use_rslora, task_type="CAUSAL_LM",
                        init_lora_weights="loftq" if settings.use_loftq else True)
    try:
        model = get_peft_model(model, config)
    except ValueError as err:
        raise UserError(f"TARGET_MODULES={','.join(settings.target_modules)}: {err}") from None
    return model, tokenizer


def load_for_generation(settings: Settings, backend: Backend, model_path: Path, adapter: Path | None = None):
    """(model ready to generate, tokenizer): the base model, or the base with the trained adapter applied."""
    from .models import load_tokenizer, preflight_memory

    preflight_memory(model_path, bytes_per_weight(backend), "asking the model", gpu=backend.device == "cuda")

    if backend.name == "unsloth":
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(adapter or model_path), max_seq_length=settings.max_seq_length,
            dtype=backend.torch_dtype(), load_in_4bit=backend.load_in_4bit)
        FastLanguageModel.for_inference(model)
        return model, tokenizer

    model = load_hf_model(model_path, backend)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return model, load_tokenizer(model_path)
