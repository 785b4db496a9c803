"""Build a model of a given architecture with random weights, for hosts that can't download one (throughput and
memory don't depend on weight values; nothing it says is a quality figure). `python -m cotune.randmodel --help`."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

SHAPES = {
    # name: (hidden, layers, heads, kv_heads, intermediate, head_dim, vocab or None for the tokenizer's size)
    "qwen3-micro": (64, 2, 4, 2, 128, 16, None),  # the benchmark's CPU smoke mode
    "qwen3-tiny": (1024, 8, 16, 8, 3072, 128, None),
    "qwen3-8b": (4096, 36, 32, 8, 12288, 128, 151936),  # Qwen3-8B's own shape: 8.19B parameters
}


def build(shape: str, tokenizer_dir: Path, out: Path, seed: int = 0, adapter: Path | None = None) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    hidden, layers, heads, kv_heads, intermediate, head_dim, vocab = SHAPES[shape]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen3Config(vocab_size=vocab or len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=intermediate,
                         head_dim=head_dim, max_position_embeddings=32768, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, dtype="bfloat16")
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(torch.bfloat16 if device == "cuda" else torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    print(f"{shape}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M random weights -> {out}")
    if adapter is not None:
        save_random_adapter(model, out, adapter, seed)
    return out


def save_random_adapter(model, base: Path, adapter: Path, seed: int) -> None:
    """A LoRA adapter of the reference recipe's shape (its rank, alpha and target modules) with random non-zero
    weights, so that timing the export (merge, conversion) needs no training run first."""
    import torch
    from peft import LoraConfig, get_peft_model

    from .settings import Settings

    recipe = Settings()  # the defaults: the reference recipe
    config = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules=list(recipe.target_modules))
    peft_model = get_peft_model(model, config)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 1e-3)
    peft_model.peft_config["default"].base_model_name_or_path = str(base)
    peft_model.save_pretrained(adapter)
    print(f"random LoRA adapter -> {adapter}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-tiny")
    parser.add_argument("--tokenizer", type=Path, required=True, help="folder with a tokenizer llama.cpp knows")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, default=None, help="also write a random LoRA adapter (r 16) here")
    args = parser.parse_args()
    build(args.shape, args.tokenizer, args.out, adapter=args.adapter)


if __name__ == "__main__":
    main()
