"""The verify stage: load the GGUF with llama-cpp-python and prove it answers in the trained form. Needs no torch,
so it runs on a laptop with nothing but the GGUF."""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from .errors import UserError
from .files import quiet_native_stderr, sha256_file, write_json_atomic
from .prompts import PromptTemplate
from .quants import file_type_name
from .settings import Settings

GGUF_MAGIC = b"GGUF"


def check_gguf_file(path: Path) -> None:
    if not path.exists():
        raise UserError(f"GGUF={path}: no such file; run `make export` or give the path of a .gguf file")
    if not path.is_file():
        raise UserError(f"GGUF={path}: not a file")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise UserError(f"GGUF={path}: not a GGUF file (it starts with {magic!r}, not b'GGUF'); give a .gguf made "
                        "by `make export`")


def load_gguf(path: Path, n_ctx: int, *, gpu: bool = True, threads: int | None = None, n_batch: int = 512):
    """(llama, on_gpu): every layer on the GPU where this llama-cpp-python build offloads and `gpu` allows."""
    import llama_cpp

    gpu = gpu and bool(llama_cpp.llama_supports_gpu_offload())
    threads = threads or max(1, os.cpu_count() or 1)
    try:
        with quiet_native_stderr():
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_gpu_layers=-1 if gpu else 0, seed=3407,
                                  verbose=False, n_threads=threads, n_threads_batch=threads, n_batch=n_batch)
    except (ValueError, RuntimeError) as err:
        raise UserError(f"GGUF={path}: llama.cpp can't load it ({err}); the file is truncated or corrupt, export "
                        "it again") from None
    return llm, gpu


def expected_eos(path: Path) -> tuple[int | None, str]:
    """The HF tokenizer's EOS id, from the export record beside the GGUF (absent when only the GGUF was copied)."""
    record = path.parent / "run.json"
    if record.is_file():
        with contextlib.suppress(ValueError, KeyError):
            return int(json.loads(record.read_text())["merge"]["eos_token_id"]), str(record)
    return None, ""


def render_chat_template(chat_template: str, question: str) -> str:
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    return env.from_string(chat_template).render(messages=[{"role": "user", "content": question}],
                                                 add_generation_prompt=True, bos_token="", eos_token="")


GREEDY = {"temperature": 0.0, "top_k": 1, "seed": 3407}


def answer_greedy(llm, prompt: str, max_tokens: int) -> dict:
    """One greedy answer, as verify and the report both ask it: the token budget is `max_tokens`, cut to what the
    context leaves after the prompt (at least 16)."""
    n_prompt = len(llm.tokenize(prompt.encode(), add_bos=False, special=True))
    budget = max(16, min(max_tokens, llm.n_ctx() - n_prompt - 1))
    start = time.monotonic()
    completion = llm.create_completion(prompt, max_tokens=budget, **GREEDY)
    choice = completion["choices"][0]
    return {"text": choice["text"], "finish_reason": choice["finish_reason"], "budget": budget,
            "prompt_tokens": n_prompt, "completion_tokens": completion["usage"]["completion_tokens"],
            "seconds": time.monotonic() - start}


def verify_gguf(path: Path, template: PromptTemplate, question: str, max_tokens: int) -> dict:
    check_gguf_file(path)
    prompt = template.prompt(question)
    llm, gpu = load_gguf(path, n_ctx=0)  # 0: the model's training context
    try:
        meta = llm.metadata
        n_ctx = llm.n_ctx()
        checks = []

        def check(name: str, passed: bool | None, detail: str) -> None:
            checks.append({"check": name, "passed": passed, "detail": detail})

        file_type = file_type_name(int(meta["general.file_type"])) if "general.file_type" in meta else "?"
        chat_template = meta.get("tokenizer.chat_template")
        check("chat template present", bool(chat_template), "tokenizer.chat_template in the GGUF metadata"
              if chat_template else "the GGUF has no tokenizer.chat_template")
        if chat_template:
            try:
                rendered = render_chat_template(chat_template, question)
                same = rendered == prompt
                check("chat template renders the training prompt", same,
                      "identical to the training prompt" if same else "differs from the training prompt form")
            except Exception as err:  # a template of another tool may need variables we don't pass
                check("chat template renders the training prompt", False, f"can't render it: {err}")
        eos_id = int(meta.get("tokenizer.ggml.eos_token_id", -1))
        want, source = expected_eos(path)
        if want is None:
            check("EOS id matches the HF tokenizer", None, f"GGUF EOS id {eos_id}; no export record beside the GGUF "
                                                           "to compare with (not counted)")
        else:
            check("EOS id matches the HF tokenizer", eos_id == want, f"GGUF {eos_id}, HF tokenizer {want} ({source})")

        reply = answer_greedy(llm, prompt, max_tokens)
        answer, finish, budget = reply["text"], reply["finish_reason"], reply["budget"]
        n_tokens, n_prompt, seconds = reply["completion_tokens"], reply["prompt_tokens"], reply["seconds"]
        check("answer is not empty", bool(answer.strip()), f"{len(answer.strip())} characters")
        check("stopped on EOS before the token limit", finish == "stop" and n_tokens < budget,
              f"finish_reason {finish!r} after {n_tokens} of at most {budget} tokens")
        opened = prompt.rstrip().endswith(template.reasoning_open)
        closed = template.reasoning_close in answer
        check("reasoning section opened and closed", opened and closed,
              f"{template.reasoning_open} ends the prompt, {template.reasoning_close} "
              f"{'appears' if closed else 'is missing'} in the answer")
    finally:
        llm.close()
        del llm
    passed = all(c["passed"] is not False for c in checks)
    return {
        "gguf": str(path), "sha256": sha256_file(path), "bytes": path.stat().st_size, "file_type": file_type,
        "architecture": meta.get("general.architecture"), "gpu_offload": gpu, "n_ctx": n_ctx,
        "question": question, "prompt": prompt, "answer": answer, "finish_reason": finish,
        "completion_tokens": n_tokens, "prompt_tokens": n_prompt, "seconds": round(seconds, 2),
        "tokens_per_s": round(n_tokens / seconds, 1) if seconds > 0 else None,
        "decoding": {**GREEDY, "max_tokens": budget},
        "checks": checks, "passed": passed, "verified_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def run_verify_stage(settings: Settings, gguf: Path | None) -> dict:
    from .export import gguf_path
    from .prompts import load_template

    path = gguf or gguf_path(settings, "Q8_0")
    report = verify_gguf(path, load_template(settings.template), settings.probe_question,
                         settings.max_new_tokens_after)
    write_json_atomic(settings.stage_dir("verify") / "report.json", report)
    return report
