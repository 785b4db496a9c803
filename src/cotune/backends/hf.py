"""The plain stack: transformers + peft + trl, on a CUDA GPU or the CPU, with the same LoRA settings as Unsloth."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError, warn
from .base import Backend, Stack


def nf4_config(compute_dtype):
    """QLoRA's 4-bit NF4 quantization, the same for training, generation and the merge."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=True)


def load_hf_model(model_path: Path, backend: Backend, device_index: int = 0, rope: str = ""):
    """The base model: safetensors only, no remote code, NF4 when the backend asks for it, positions stretched as
    ROPE_SCALING (`rope`) says; on a GPU, whole on this process's own device (4-bit weights placed on another one
    break DDP)."""
    from transformers import AutoModelForCausalLM

    from ..models import model_config

    if backend.device == "cpu":
        from ..cpu import gqa_attention_without_copies

        gqa_attention_without_copies()
    config = model_config(model_path, rope)
    return AutoModelForCausalLM.from_pretrained(
        model_path, dtype=backend.torch_dtype(), use_safetensors=True, trust_remote_code=False,
        **({"config": config} if config is not None else {}),
        quantization_config=nf4_config(backend.torch_dtype()) if backend.load_in_4bit else None,
        device_map={"": device_index} if backend.device == "cuda" else None)


class PlainStack(Stack):
    label = "transformers + peft + trl"  # runs wherever torch does: Stack.unavailable's None

    def load_for_training(self, settings, backend, model_path, *, kbit_upcast, device_index):
        """On a 4-bit base the other weights stay in the compute dtype, as trl's own QLoRA path does; `kbit_upcast`
        instead runs peft's `prepare_model_for_kbit_training`, which keeps fp32 copies of every weight that isn't
        4-bit (embeddings, head, norms) -- the benchmark measures both."""
        import torch
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        from ..models import load_tokenizer

        if settings.offload_embedding == "true":
            warn("OFFLOAD_EMBEDDING=true ignored: only the Unsloth backend keeps the embedding in host RAM")
        if settings.tiled_mlp:
            warn("TILED_MLP=true ignored: only the Unsloth backend runs the MLP in slices of the sequence")
        torch.manual_seed(settings.random_state)
        model = load_hf_model(model_path, backend, device_index, settings.rope_scaling)
        tokenizer = load_tokenizer(model_path)
        if backend.load_in_4bit and (kbit_upcast or backend.dtype == "fp16"):
            # fp16 keeps peft's fp32 copies: fp16 norms and heads are where QLoRA's instabilities came from.
            # Checkpointing itself is switched on by the trainer (SFTConfig).
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                            bias=settings.lora_bias, target_modules=list(settings.target_modules),
                            use_rslora=settings.use_rslora, task_type="CAUSAL_LM")  # USE_LOFTQ is refused
        try:
            model = get_peft_model(model, config)
        except ValueError as err:
            raise UserError(f"TARGET_MODULES={','.join(settings.target_modules)}: {err}") from None
        if backend.device == "cpu":
            from ..cpu import lora_update_in_the_product

            lora_update_in_the_product(model)
        return model, tokenizer

    def load_for_generation(self, settings, backend, model_path, adapter):
        from ..models import load_tokenizer

        model = load_hf_model(model_path, backend, rope=settings.rope_scaling)
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter)
        model.eval()
        return model, load_tokenizer(model_path)

    def fold_adapter_to_ask(self, backend):
        # the same weights with the adapter folded in (exact up to rounding): one matmul per projection, not three
        return not backend.load_in_4bit


STACK = PlainStack()
