"""Unsloth on a CUDA GPU: the reference recipe's stack (its own kernels, offloaded checkpointing, padding-free
micro-batches)."""
from __future__ import annotations

import importlib.util

from .base import Stack

# What Unsloth (the pinned version) cannot do on N processes under torchrun DDP, as found on two H200s:
# (setting, value) -> why. BACKEND=auto falls back to the plain stack with a WARNING; BACKEND=unsloth is refused.
UNDER_DDP_FAILS: dict[tuple[str, str], str] = {}

OFFLOAD_EMBEDDING = {"auto": "auto", "true": True, "false": False}  # Unsloth's own "auto" sentinel


class UnslothStack(Stack):
    label = "Unsloth"
    split = "tokens"  # padding-free micro-batches: their work grows with tokens
    padding_free = True
    asks_in_one_batch = False  # Unsloth's fast generation asks one question at a time
    trainer_checkpointing = False  # get_peft_model(use_gradient_checkpointing=...) switches it on

    def unavailable(self, cuda):
        if not cuda:
            return "no CUDA GPU is visible (Unsloth trains on NVIDIA GPUs)"
        if importlib.util.find_spec("unsloth") is None:
            return "the unsloth package is not installed here (the CUDA image has it: `make image`)"
        return None

    def ddp_problem(self, settings):
        for (name, value), why in UNDER_DDP_FAILS.items():
            if str(getattr(settings, name)) == value:
                return f"{name.upper()}={value}: {why}"
        return None

    def patch(self):
        importlib.import_module("unsloth")  # patches transformers, trl and peft: before any of them is imported

    def checkpointing(self, setting):
        return {"unsloth": "unsloth", "true": True, "false": False}[setting]

    def load_for_training(self, settings, backend, model_path, *, kbit_upcast, device_index):
        from unsloth import FastLanguageModel  # must come before transformers/peft/trl are used

        from ..models import rope_scaling

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(model_path), max_seq_length=settings.max_seq_length, dtype=backend.torch_dtype(),
            load_in_4bit=backend.load_in_4bit, offload_embedding=OFFLOAD_EMBEDDING[settings.offload_embedding],
            device_map={"": device_index}, rope_scaling=rope_scaling(settings.rope_scaling, model_path),
            unsloth_tiled_mlp=settings.tiled_mlp)
        model = FastLanguageModel.get_peft_model(
            model, r=settings.lora_r, target_modules=list(settings.target_modules), lora_alpha=settings.lora_alpha,
            lora_dropout=settings.lora_dropout, bias=settings.lora_bias,
            use_gradient_checkpointing=self.checkpointing(settings.gradient_checkpointing),
            random_state=settings.random_state, use_rslora=settings.use_rslora, loftq_config=None)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model, tokenizer

    def load_for_generation(self, settings, backend, model_path, adapter):
        from unsloth import FastLanguageModel

        from ..models import rope_scaling

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(adapter or model_path), max_seq_length=settings.max_seq_length,
            dtype=backend.torch_dtype(), load_in_4bit=backend.load_in_4bit,
            rope_scaling=rope_scaling(settings.rope_scaling, model_path))
        FastLanguageModel.for_inference(model)
        return model, tokenizer


STACK = UnslothStack()
