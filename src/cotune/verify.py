"""The verify stage: load the GGUF with llama-cpp-python and prove it answers in the trained form. Needs no torch,
so it runs on a laptop with nothing but the GGUF."""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from .cpu import cpu_threads
from .errors import UserError
from .files import quiet_native_stderr, sha256_file, write_json_atomic
from .prompts import PromptTemplate
from . import quants
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


def load_gguf(path: Path, n_ctx: int, *, gpu: bool = True, threads: int | None = None, n_batch: int = 512,
              logits_all: bool = False):
    """(llama, on_gpu): every layer on the GPU where this llama-cpp-python build offloads and `gpu` allows;
    `logits_all` keeps every position's logits (the report's teacher-forced fidelity reads them)."""
    import llama_cpp

    gpu = gpu and bool(llama_cpp.llama_supports_gpu_offload())
    threads = threads or cpu_threads()
    try:
        with quiet_native_stderr():
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_gpu_layers=-1 if gpu else 0, seed=3407,
                                  verbose=False, n_threads=threads, n_threads_batch=threads, n_batch=n_batch,
                                  logits_all=logits_all)
    except (ValueError, RuntimeError) as err:
        raise UserError(f"GGUF={path}: llama.cpp can't load it ({err}); the file is truncated or corrupt, export "
                        "it again") from None
    return llm, gpu


CONTEXT_MARGIN = 16  # tokens beyond prompt and answer budget: BOS, and the EOS the answer stops on


def context_needed(path: Path, prompts: list[str], max_tokens: int) -> tuple[int, int | None]:
    """(context to load the GGUF with, the model's trained context): the longest prompt plus the answer budget plus a
    margin, never more than the model was trained on. The whole trained context would be ~40k tokens for Qwen3-8B,
    5-6 GiB of KV cache, and verify must run on a laptop. Reads only the GGUF's metadata and vocabulary."""
    import llama_cpp

    try:
        with quiet_native_stderr():
            vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    except (ValueError, RuntimeError) as err:
        raise UserError(f"GGUF={path}: llama.cpp can't load it ({err}); the file is truncated or corrupt, export "
                        "it again") from None
    try:
        meta = vocab.metadata
        trained = int(meta.get(f"{meta.get('general.architecture')}.context_length", 0)) or None
        longest = max(len(vocab.tokenize(p.encode(), add_bos=True, special=True)) for p in prompts)
    finally:
        vocab.close()
    needed = longest + max_tokens + CONTEXT_MARGIN
    return (needed if trained is None else min(trained, needed)), trained


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
    # llama-cpp-python holds back the bytes of a character cut by the token limit, so the text ends on a whole one
    return {"text": choice["text"], "finish_reason": choice["finish_reason"], "budget": budget,
            "prompt_tokens": n_prompt, "completion_tokens": completion["usage"]["completion_tokens"],
            "seconds": time.monotonic() - start}


def excerpt(text: str, where: str, head: int = 480, tail: int = 160, lines: int = 12) -> str:
    """The start and end of a long answer, for the terminal: an untrained model may write thousands of tokens, which
    the report file keeps whole."""
    if len(text) <= head + tail and text.count("\n") < 2 * lines:
        return text
    start = "\n".join(text[:head].split("\n")[:lines])
    end = "\n".join(text[-tail:].split("\n")[-(lines // 2):]).lstrip("\n")
    hidden = len(text) - len(start) - len(end)
    return f"{start}\n[... {hidden} more characters; the whole answer is in {where} ...]\n{end}"


def verify_gguf(path: Path, template: PromptTemplate, question: str, max_tokens: int) -> dict:
    check_gguf_file(path)
    prompt = template.prompt(question)
    n_ctx, trained_ctx = context_needed(path, [prompt], max_tokens)
    llm, gpu = load_gguf(path, n_ctx=n_ctx)
    try:
        meta = llm.metadata
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

        print(f"asking {path.name} the probe question (context {n_ctx} tokens, at most {max_tokens} new)", flush=True)
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
        "n_ctx_train": trained_ctx, "question": question, "prompt": prompt, "answer": answer, "finish_reason": finish,
        "completion_tokens": n_tokens, "prompt_tokens": n_prompt, "seconds": round(seconds, 2),
        "tokens_per_s": round(n_tokens / seconds, 1) if seconds > 0 else None,
        "decoding": {**GREEDY, "max_tokens": budget},
        "checks": checks, "passed": passed, "verified_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def run_q8_0(settings: Settings) -> Path:
    """The run's Q8_0 GGUF: the file the run's export recorded, looked up by name in this run folder (a moved or
    copied run folder reads its own files); before any export, where export writes it."""
    record = settings.stage_dir("export") / "run.json"
    if record.is_file():
        info = json.loads(record.read_text(encoding="utf-8")).get("ggufs", {}).get("Q8_0")
        if info:
            return settings.stage_dir("export") / Path(info["path"]).name
    return quants.gguf_path(settings, quants.REQUIRED)


def verify_report_path(settings: Settings, gguf: Path | None) -> tuple[Path, Path, bool]:
    """(GGUF to verify, where its report goes, whether it is the run's own Q8_0). Only the run's Q8_0 writes
    verify/report.json, which the report and push read; any other file's report goes to verify/others/, so
    verifying another file never replaces the run's."""
    own = run_q8_0(settings)
    path = gguf or own
    is_own = gguf is None or (path.is_file() and own.is_file() and path.samefile(own))
    out = settings.stage_dir("verify")
    return path, (out / "report.json" if is_own else out / "others" / f"{path.name}.json"), is_own


def run_verify_stage(settings: Settings, gguf: Path | None) -> tuple[dict, Path]:
    from .files import run_relative, stage_fingerprint
    from .prompts import load_template

    path, report_path, is_own = verify_report_path(settings, gguf)
    report = verify_gguf(path, load_template(settings.template), settings.probe_question,
                         settings.max_new_tokens_after)
    if is_own:
        public = settings.public_dict()
        report.update(gguf=run_relative(path, settings.run_path), settings=public,
                      stage_fingerprint=stage_fingerprint("verify", public))
    write_json_atomic(report_path, report)
    return report, report_path
