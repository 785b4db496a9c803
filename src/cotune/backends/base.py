"""What a training backend is: the interface every stack in this package implements, and the resolved choice
(`Backend`) the stages pass around. Standard library only at import time: the settings check reads the registry."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..settings import Settings


class Stack:
    """One way to load, train and ask a model. A new backend subclasses this in its own module of this package and
    adds one row to `STACKS` in `__init__.py`; BACKEND's choices are that table's keys."""
    label = ""                    # how WARNINGs and errors name it
    # how a step's sequences are split over processes (distributed.SPLITS): the plain stack pads each micro-batch
    # to its longest row, which transformers' batch_rebalance prices
    split = "batch_rebalance"
    asks_in_one_batch = True      # the ask stage generates every question in one call (else one at a time)
    padding_free = False          # micro-batches hold their rows' tokens only (else padded to the longest row)
    trainer_checkpointing = True  # gradient checkpointing is switched on by trl's SFTConfig (else by the loader)

    def unavailable(self, cuda: bool) -> str | None:
        """Why this stack can't run on this machine, with what to do; None where it can."""
        return None

    def ddp_problem(self, settings: Settings) -> str | None:
        """What in these settings this stack can't do on several processes; None where it can."""
        return None

    def patch(self) -> None:
        """Run before transformers, peft and trl are imported (a stack that patches them does it here)."""

    def checkpointing(self, setting: str):
        """The model's gradient checkpointing for GRADIENT_CHECKPOINTING=unsloth|true|false."""
        return setting != "false"

    def load_for_training(self, settings: Settings, backend: Backend, model_path: Path, *, kbit_upcast: bool,
                          device_index: int):
        """(model with LoRA adapters, tokenizer)."""
        raise NotImplementedError

    def load_for_generation(self, settings: Settings, backend: Backend, model_path: Path, adapter: Path | None):
        """(model ready to generate, tokenizer): the base model, or the base with the trained adapter applied."""
        raise NotImplementedError

    def fold_adapter_to_ask(self, backend: Backend) -> bool:
        """Whether the ask stage merges the adapter into the weights before generating (same weights, faster)."""
        return False


@dataclass(frozen=True)
class Backend:
    name: str         # a key of STACKS
    device: str       # "cuda" or "cpu"
    dtype: str        # "bf16", "fp16" or "fp32"
    load_in_4bit: bool
    optim: str
    # "bf16" where the weights stay fp32 on the CPU but training's matmuls run under torch.autocast in bf16
    # (DTYPE=bf16 on a CPU with native bf16: AMX or AVX512-BF16); None otherwise. Generation stays in fp32.
    autocast: str | None = None

    @property
    def stack(self) -> Stack:
        from . import STACKS

        return STACKS[self.name]

    def torch_dtype(self):
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.dtype]
