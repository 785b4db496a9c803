"""cotune: fine-tune a causal LM with LoRA on a chain-of-thought Q&A dataset and ship it as a verified GGUF."""

__version__ = "0.1.0"
