"""Which stack trains and generates: Unsloth on a CUDA GPU (the reference recipe), else transformers + peft + trl
with the same LoRA settings. Every degradation is said with a WARNING; asking for a stack that can't run here is
an error.

A backend is one module of this package (a `Stack` subclass, see base.py) and one row of `STACKS`: BACKEND's
choices are its keys, and BACKEND=auto takes the first row that can run on this machine."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError, warn
from . import hf, unsloth
from .base import Backend, Stack

if TYPE_CHECKING:
    from ..settings import Settings

STACKS: dict[str, Stack] = {
    "unsloth": unsloth.STACK,
    "hf": hf.STACK,  # runs everywhere: auto's last resort
}

__all__ = ["STACKS", "Backend", "Stack", "choose_backend", "load_for_generation", "load_for_training"]


def _cuda() -> tuple[bool, bool]:
    import torch

    available = torch.cuda.is_available()
    return available, available and torch.cuda.is_bf16_supported()


CPU_BF16_CHECKS = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch.cpu's, private: tests pin them


def _cpu_bf16() -> bool | None:
    """Whether this CPU multiplies bf16 natively (AMX or AVX512-BF16); None where this torch can't say (it has
    neither of torch.cpu's private checks). Elsewhere torch emulates bf16, which is slower than fp32, so DTYPE=bf16
    is ignored there."""
    import torch

    cpu = getattr(torch, "cpu", None)
    checks = [check for name in CPU_BF16_CHECKS if (check := getattr(cpu, name, None)) is not None]
    return any(check() for check in checks) if checks else None


def _pick(settings: Settings, cuda: bool, world_size: int, say) -> str:
    """The registry key to run: BACKEND's own choice (refused where it can't run), or auto's first that can."""
    def problem(stack: Stack) -> str | None:
        why = stack.unavailable(cuda)
        if why is None and world_size > 1 and (ddp := stack.ddp_problem(settings)):
            why = f"on {world_size} processes, {ddp}"
        return why

    if settings.backend != "auto":
        why = problem(STACKS[settings.backend])
        if why:
            raise UserError(f"BACKEND={settings.backend}: {why}; BACKEND=auto takes what runs here")
        return settings.backend
    passed_over = []
    for name, stack in STACKS.items():
        why = problem(stack)
        if why is None:
            if passed_over:
                say(f"backend {name} ({stack.label}) instead of {'; '.join(passed_over)}")
            return name
        passed_over.append(f"{stack.label}: {why}")
    raise UserError("BACKEND=auto: no backend can run here: " + "; ".join(passed_over))


def choose_backend(settings: Settings, *, quiet: bool = False, world_size: int = 1) -> Backend:
    say = (lambda _m: None) if quiet else warn
    cuda, bf16_ok = _cuda()
    name = _pick(settings, cuda, world_size, say)

    autocast = None
    if not cuda:
        dtype = "fp32"
        native = _cpu_bf16() if settings.dtype == "bf16" else False
        if native:
            autocast = "bf16"
            say("no CUDA GPU: weights load in fp32 on the CPU (no 4-bit, no 8-bit optimizer); DTYPE=bf16: training "
                "computes in bf16 under autocast (this CPU has native bf16); generation stays fp32")
        elif settings.dtype not in ("auto", "fp32"):
            why = ""
            if settings.dtype == "bf16" and native is False:
                why = " (this CPU has no native bf16: AMX or AVX512-BF16)"
            elif settings.dtype == "bf16":
                why = (" (this torch has neither torch.cpu." + " nor torch.cpu.".join(CPU_BF16_CHECKS) +
                       " to tell whether the CPU has native bf16)")
            say(f"DTYPE={settings.dtype} ignored on the CPU{why}: training and generation run in fp32")
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
    if load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("LOAD_IN_4BIT=true needs the bitsandbytes package; install it or set LOAD_IN_4BIT=false")

    optim = settings.optim
    if "8bit" in optim and (not cuda or importlib.util.find_spec("bitsandbytes") is None):
        say(f"OPTIM={optim} needs bitsandbytes on a CUDA GPU; using adamw_torch")
        optim = "adamw_torch"
    return Backend(name, "cuda" if cuda else "cpu", dtype, load_in_4bit, optim, autocast)


def bytes_per_weight(backend: Backend) -> float:
    return 0.6 if backend.load_in_4bit else {"fp32": 4, "bf16": 2, "fp16": 2}[backend.dtype]


def load_for_training(settings: Settings, backend: Backend, model_path: Path, *, kbit_upcast: bool = False,
                      device_index: int = 0):
    """(model with LoRA adapters, tokenizer), after checking the weights fit in memory."""
    from ..models import preflight_memory

    preflight_memory(model_path, bytes_per_weight(backend), "training", gpu=backend.device == "cuda")
    return backend.stack.load_for_training(settings, backend, model_path, kbit_upcast=kbit_upcast,
                                           device_index=device_index)


def load_for_generation(settings: Settings, backend: Backend, model_path: Path, adapter: Path | None = None):
    """(model ready to generate, tokenizer): the base model, or the base with the trained adapter applied."""
    from ..models import preflight_memory

    preflight_memory(model_path, bytes_per_weight(backend), "asking the model", gpu=backend.device == "cuda")
    return backend.stack.load_for_generation(settings, backend, model_path, adapter)
