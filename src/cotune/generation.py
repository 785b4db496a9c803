"""The ask stage: the base model (`baseline`) or base + adapter (`after`) answers the probe question, greedy,
in exactly the prompt form used in training."""
from __future__ import annotations

import time
from pathlib import Path

from .errors import UserError
from .settings import Settings

WHICH = ("baseline", "after")


def generate_answer(model, tokenizer, prompt: str, max_new_tokens: int, device: str) -> dict:
    import torch

    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device)
    start = time.monotonic()
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    seconds = time.monotonic() - start
    new_tokens = output[0, inputs["input_ids"].shape[1]:].tolist()
    stopped = bool(new_tokens) and new_tokens[-1] == tokenizer.eos_token_id
    return {
        "answer": tokenizer.decode(new_tokens, skip_special_tokens=True),
        "completion_tokens": len(new_tokens),
        "stopped_on_eos": stopped,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(len(new_tokens) / seconds, 1) if seconds > 0 else None,
    }


def questions_to_ask(settings: Settings) -> list[tuple[str, str]]:
    """The probe question, then the first EVAL_QUESTIONS held-out questions (for format adherence)."""
    from .data import read_jsonl

    held_out = read_jsonl(settings.stage_dir("data") / "eval.jsonl") if settings.eval_questions else []
    return [("probe", settings.probe_question)] + [("held_out", r["question"])
                                                   for r in held_out[: settings.eval_questions]]


def run_ask_stage(settings: Settings, which: str) -> dict:
    from .backends import choose_backend, load_for_generation
    from .files import write_json_atomic, write_run_record
    from .models import base_model_path
    from .prompts import load_template

    template = load_template(settings.template)
    model_path = base_model_path(settings)
    adapter = None
    inputs: dict[str, Path] = {}
    if which == "after":
        adapter = settings.stage_dir("train") / "adapter"
        if not (adapter / "adapter_config.json").is_file():
            raise UserError(f"{adapter}: no trained adapter; run `make train` first")
        inputs["adapter"] = adapter
    backend = choose_backend(settings)
    model, tokenizer = load_for_generation(settings, backend, model_path, adapter)
    max_new = settings.max_new_tokens_before if which == "baseline" else settings.max_new_tokens_after
    answers = []
    for kind, question in questions_to_ask(settings):
        prompt = template.prompt(question)
        result = generate_answer(model, tokenizer, prompt, max_new, backend.device)
        result.update({"kind": kind, "question": question, "prompt": prompt,
                       "closed_reasoning": template.reasoning_close in result["answer"]})
        answers.append(result)
    record = {
        "model": "base" if which == "baseline" else "base + LoRA adapter",
        "backend": backend.name, "device": backend.device, "dtype": backend.dtype,
        "load_in_4bit": backend.load_in_4bit,
        "decoding": {"do_sample": False, "max_new_tokens": max_new, "eos_token_id": tokenizer.eos_token_id},
        "answers": answers,
    }
    out = settings.stage_dir(which)
    write_json_atomic(out / "answers.json", record)
    write_run_record(out, settings.public_dict(), inputs, {"answers": out / "answers.json"})
    return record
