"""The ask stage: the base model (`baseline`) or base + adapter (`after`) answers the probe question, greedy,
in exactly the prompt form used in training."""
from __future__ import annotations

import time
from pathlib import Path

from .errors import UserError
from .settings import Settings


def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, device: str,
                     batch_size: int) -> list[dict]:
    """Greedy answers, `batch_size` prompts decoding side by side (left-padded): a batch costs about its longest
    answer instead of the sum of all, since on a CPU each decoding step is mostly fixed cost."""
    import torch

    eos = tokenizer.eos_token_id
    answers = []
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for first in range(0, len(prompts), batch_size):
            batch = prompts[first:first + batch_size]
            inputs = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            start = time.monotonic()
            with torch.no_grad():
                output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                        pad_token_id=tokenizer.pad_token_id)
            seconds = time.monotonic() - start
            rows = [row[: row.index(eos) + 1] if eos in row else row  # after EOS a finished row holds padding
                    for row in output[:, inputs["input_ids"].shape[1]:].tolist()]
            for row in rows:
                stopped = bool(row) and row[-1] == eos
                answer = tokenizer.decode(row, skip_special_tokens=True)
                if not stopped:  # cut at the token limit, maybe inside a character: its first bytes decode to U+FFFD
                    answer = answer.rstrip("\ufffd")
                answers.append({
                    "answer": answer,
                    "completion_tokens": len(row),
                    "stopped_on_eos": stopped,
                    "seconds": round(seconds, 2),  # the batch's
                    "tokens_per_s": round(sum(map(len, rows)) / seconds, 1) if seconds > 0 else None,
                    "batch_size": len(batch),
                })
    finally:
        tokenizer.padding_side = padding_side
    return answers


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
    if adapter is not None and backend.stack.fold_adapter_to_ask(backend):
        model = model.merge_and_unload()
    max_new = settings.max_new_tokens_before if which == "baseline" else settings.max_new_tokens_after
    questions = questions_to_ask(settings)
    prompts = [template.prompt(question) for _, question in questions]
    batch_size = len(prompts) if backend.stack.asks_in_one_batch else 1
    products = None
    if backend.device == "cpu":
        from .cpu import faster_decoding_products

        products = faster_decoding_products(model, batch_size)
        print(products, flush=True)
    answers = generate_answers(model, tokenizer, prompts, max_new, backend.device, batch_size=batch_size)
    for (kind, question), prompt, result in zip(questions, prompts, answers):
        result.update({"kind": kind, "question": question, "prompt": prompt,
                       "closed_reasoning": template.reasoning_close in result["answer"]})
    record = {
        "model": "base" if which == "baseline" else "base + LoRA adapter",
        "backend": backend.name, "device": backend.device, "dtype": backend.dtype,
        "load_in_4bit": backend.load_in_4bit,
        "decoding": {"do_sample": False, "max_new_tokens": max_new, "eos_token_id": tokenizer.eos_token_id,
                     **({"cpu_products": products} if products else {})},
        "answers": answers,
    }
    out = settings.stage_dir(which)
    write_json_atomic(out / "answers.json", record)
    write_run_record(out, settings.public_dict(), inputs, {"answers": out / "answers.json"})
    return record
