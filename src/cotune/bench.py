"""Training-speed benchmark: each configuration in its own process (Unsloth patches transformers globally), on a
model of the configured architecture with RANDOM weights (speed and memory don't depend on weight values), on
rows whose lengths follow a lognormal spread (median 700 tokens, clipped to 128..max_seq_length) like real
chain-of-thought rows, never all at full length."""
from __future__ import annotations

import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Dense bf16 peak of the GPUs we state MFU for (no sparsity), in FLOP/s.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}

CONFIGS = {
    # name: (backend, settings over the reference recipe, what it is). Every one sees the same 8 sequences per
    # optimizer step (micro-batch x accumulation = 8), so all of them learn the same thing.
    "unsloth-reference": ("unsloth", {"batch_size": 2, "grad_accum": 4},
                          "the reference notebook's literal settings: Unsloth QLoRA, 2 x 4"),
    "cotune-fast": ("unsloth", {"preset": "fast"},
                    "PRESET=fast: Unsloth QLoRA, 4 x 2, input embedding in host RAM"),
    "unsloth-8x1": ("unsloth", {"batch_size": 8, "grad_accum": 1}, "Unsloth QLoRA, 8 x 1"),
    "unsloth-8x1-nogc": ("unsloth", {"batch_size": 8, "grad_accum": 1, "gradient_checkpointing": "false"},
                         "Unsloth QLoRA, 8 x 1, no gradient checkpointing: the speed ceiling, at a memory cost"),
    "plain-reference": ("hf", {"batch_size": 2, "grad_accum": 4},
                        "transformers + bitsandbytes + peft + trl as trl runs QLoRA (frozen weights in bf16), 2 x 4"),
    "plain-peft-fp32": ("hf", {"batch_size": 2, "grad_accum": 4, "kbit_upcast": True},
                        "the plain stack with peft's prepare_model_for_kbit_training (fp32 embeddings, head, norms), "
                        "2 x 4"),
}
DEFAULT_CONFIGS = ("cotune-fast", "unsloth-reference", "plain-reference")


class MemorySampler:
    """Device-wide used memory (every process and the CUDA context, not only PyTorch's allocations), sampled in a
    thread every 20 ms; its maximum is the peak the card saw."""

    def __init__(self, interval: float = 0.02):
        import threading

        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import torch

        while not self._stop.is_set():
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def synthetic_lengths(n: int, max_len: int, seed: int, median: int = 700, sigma: float = 0.6) -> list[int]:
    rng = random.Random(seed)
    return [max(128 if max_len >= 256 else 8, min(max_len, int(rng.lognormvariate(math.log(median), sigma))))
            for _ in range(n)]


def worker(args) -> dict:
    """One configuration, in this process: load, train `steps` optimizer steps, time all but the warm-up."""
    backend_name, overrides, description = CONFIGS[args.config]
    overrides = dict(overrides)
    kbit_upcast = overrides.pop("kbit_upcast", False)
    if backend_name == "unsloth":
        os.environ.setdefault("UNSLOTH_LOG_MFU", "1")  # Unsloth's own LoRA-aware MFU, logged beside ours
        import unsloth  # noqa: F401  (must patch before transformers/trl are imported)
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from .backends import choose_backend, gradient_checkpointing_value, load_for_training
    from .models import count_parameters
    from .settings import resolve

    cli = {"base_model": args.model, "backend": backend_name, "max_steps": str(args.steps), "warmup_steps": "0",
           "max_seq_length": str(args.max_len)}
    if not args.cuda:
        cli.update({"load_in_4bit": "false", "gradient_checkpointing": "false", "optim": "adamw_torch"})
    cli.update({k: str(v) for k, v in overrides.items()})
    settings = resolve(cli, environ={}, dotenv_path=Path("/nonexistent"))
    batch, accum = settings.batch_size, settings.grad_accum
    backend = choose_backend(settings, quiet=True)
    checkpointing = gradient_checkpointing_value(settings, backend)
    model, tokenizer = load_for_training(settings, backend, Path(args.model), kbit_upcast=kbit_upcast)
    lengths = synthetic_lengths(args.rows, args.max_len, seed=0, median=args.median)
    rng = random.Random(1)
    vocab = min(len(tokenizer), model.config.vocab_size) - 1
    rows = [{"input_ids": [rng.randrange(3, vocab) for _ in range(n)]} for n in lengths]
    config = SFTConfig(output_dir=str(Path(args.out).parent / f"ckpt-{args.config}"), max_length=args.max_len,
                       per_device_train_batch_size=batch, gradient_accumulation_steps=accum, max_steps=args.steps,
                       learning_rate=2e-4, lr_scheduler_type="constant", optim=backend.optim, seed=3407,
                       logging_steps=1, save_strategy="no", report_to="none", bf16=backend.dtype == "bf16",
                       use_cpu=not args.cuda, dataloader_drop_last=True, data_seed=3407,
                       gradient_checkpointing=backend.name == "hf" and checkpointing is True,
                       gradient_checkpointing_kwargs={"use_reentrant": False},
                       include_num_input_tokens_seen="non_padding")
    steps: list[dict] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if args.cuda:
                torch.cuda.synchronize()
            self.t0, self.tokens0 = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, a, state, control, **kw):
            if args.cuda:
                torch.cuda.synchronize()
            steps.append({"step": state.global_step, "seconds": time.perf_counter() - self.t0,
                          "tokens": state.num_input_tokens_seen - self.tokens0})

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and steps:
                for key in ("loss", "train_mfu", "train_hfu"):
                    if key in logs:
                        steps[-1][key] = logs[key]

    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=[Timer()])
    if args.cuda:
        torch.cuda.reset_peak_memory_stats()
        with MemorySampler() as sampler:
            trainer.train()
    else:
        trainer.train()
    timed = steps[args.warmup:]
    tokens, seconds = sum(s["tokens"] for s in timed), sum(s["seconds"] for s in timed)
    base_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    n_params = count_parameters(Path(args.model))  # the checkpoint's own weights, LoRA adapters not counted
    unsloth_mfu = [s["train_mfu"] for s in timed if "train_mfu" in s]
    unsloth_hfu = [s["train_hfu"] for s in timed if "train_hfu" in s]
    result = {
        "config": args.config, "description": description, "backend": backend.name,
        "micro_batch": batch, "grad_accum": accum,
        "gradient_checkpointing": str(checkpointing).lower(),
        "embedding_device": str(base_model.get_input_embeddings().weight.device.type),
        "steps_timed": len(timed), "warmup_steps_excluded": args.warmup, "steps": args.steps, "rows": args.rows,
        "max_len": args.max_len, "median": args.median, "host": platform.node(),
        "real_tokens_per_s": tokens / seconds if seconds else None,
        "median_step_s": statistics.median(s["seconds"] for s in timed) if timed else None,
        "losses": [s.get("loss") for s in steps], "n_params": n_params,
        "unsloth_mfu": statistics.median(unsloth_mfu) if unsloth_mfu else None,
        "unsloth_hfu": statistics.median(unsloth_hfu) if unsloth_hfu else None,
    }
    if args.cuda:
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        result.update({"gpu": name, "gpu_uuid": str(torch.cuda.get_device_properties(0).uuid),
                       "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                       "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
                       "peak_device_gib": sampler.peak / 2**30,
                       "mfu": 6 * n_params * result["real_tokens_per_s"] / peak if peak and result["real_tokens_per_s"] else None})
    Path(args.out).write_text(json.dumps(result, indent=1))
    return result


def _loss_gap(r: dict, base: dict | None) -> float | None:
    """Largest per-step loss difference from the plain stack's over the steps both logged."""
    if base is None or r is base:
        return None
    pairs = [(x, y) for x, y in zip(r["losses"], base["losses"]) if x is not None and y is not None]
    return max(abs(x - y) for x, y in pairs) if pairs else None


def markdown_table(results: list[dict]) -> str:
    gpu = results[0].get("gpu", "CPU")
    base = next((r for r in results if r["config"] == "plain-reference"), None)
    lines = [f"Device: {gpu}. Random weights; real (non-pad) tokens only; {results[0]['warmup_steps_excluded']} "
             f"warm-up steps excluded; N = {results[0]['n_params'] / 1e9:.2f}B parameters; MFU = 6·N·tokens/s over "
             "the GPU's dense bf16 peak; Unsloth MFU is Unsloth's own LoRA-aware count (no weight gradients for "
             "frozen weights, attention included, recompute excluded).", "",
             "| config | micro-batch x accum | checkpointing | embedding on | real tokens/s | vs plain | median step (s) "
             "| peak allocated (GiB) | vs plain | peak on device (GiB) | MFU | Unsloth MFU | max loss gap vs plain |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, d=2: "n/a" if v is None else f"{v:.{d}f}"  # noqa: E731

    def ratio(r, key):
        ok = base and base.get(key) and r.get(key) is not None
        return f"{r[key] / base[key]:.2f}x" if ok else "n/a"

    for r in results:
        lines.append(f"| {r['config']} | {r['micro_batch']} x {r['grad_accum']} | {r.get('gradient_checkpointing')} | "
                     f"{r.get('embedding_device')} | {f(r['real_tokens_per_s'], 0)} | "
                     f"{ratio(r, 'real_tokens_per_s')} | {f(r['median_step_s'], 3)} | "
                     f"{f(r.get('peak_allocated_gib'))} | {ratio(r, 'peak_allocated_gib')} | "
                     f"{f(r.get('peak_device_gib'))} | {f(r.get('mfu'), 3)} | {f(r.get('unsloth_mfu'), 3)} | "
                     f"{f(_loss_gap(r, base), 4)} |")
    return "\n".join(lines) + "\n"


def run_all(model: Path, out: Path, configs: list[str], steps: int, warmup: int, rows: int, max_len: int,
            median: int, cuda: bool) -> list[dict]:
    """Each configuration in a fresh process, one after the other. A configuration that fails (out of memory, say)
    is reported and the rest still run. Results of other configurations already in `out` join the table only when
    they were measured on this very GPU (same UUID) with the same steps and data."""
    out.mkdir(parents=True, exist_ok=True)
    results, failed = {}, []
    for name in configs:
        target = out / f"{name}.json"
        target.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "cotune.bench", "--worker", name, "--model", str(model), "--out", str(target),
               "--steps", str(steps), "--warmup", str(warmup), "--rows", str(rows), "--max-len", str(max_len),
               "--median", str(median)] + (["--cuda"] if cuda else [])
        start = time.monotonic()
        proc = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True)
        if proc.returncode != 0 or not target.is_file():
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            print(f"bench config {name} FAILED (exit {proc.returncode}); going on with the others", flush=True)
            failed.append(name)
            continue
        results[name] = json.loads(target.read_text())
        print(f"{name}: {results[name]['real_tokens_per_s']:.0f} real tokens/s ({time.monotonic() - start:.0f} s "
              "with load)", flush=True)
    if results:
        ref = next(iter(results.values()))
        for earlier in sorted(out.glob("*.json")):
            if earlier.stem in results or earlier.stem not in CONFIGS:
                continue
            r = json.loads(earlier.read_text())
            same = ("host", "gpu_uuid", "steps", "rows", "max_len", "median", "warmup_steps_excluded")
            if all(r.get(k) == ref.get(k) for k in same):
                results[earlier.stem] = r
    ordered = [results[c] for c in CONFIGS if c in results]
    if ordered:
        (out / "bench.json").write_text(json.dumps(ordered, indent=1))
        (out / "bench.md").write_text(markdown_table(ordered))
    if failed:
        raise SystemExit(f"bench: {len(failed)} configuration(s) failed: {', '.join(failed)} (output above)")
    return ordered


def decode_bench(gguf: Path, *, gpu: bool, threads: int | None, new_tokens: int = 256, prompt_tokens: int = 512,
                 repeats: int = 3) -> dict:
    """Prompt processing and greedy decode speed of a GGUF through llama-cpp-python (every layer on the GPU where the
    build offloads and `gpu` allows, else the CPU; the result says which), after one untimed warm-up: the
    same library verify and users' laptops run. Decode is timed on `new_tokens` tokens with EOS masked, so a model
    that would stop early still decodes the full count."""
    import llama_cpp

    from .verification import check_gguf_file, load_gguf

    check_gguf_file(gguf)
    threads = threads or os.cpu_count()
    start = time.perf_counter()
    llm, offload = load_gguf(gguf, prompt_tokens + new_tokens + 16, gpu=gpu, threads=threads, n_batch=prompt_tokens)
    load_s = time.perf_counter() - start
    try:
        eos = llm.token_eos()
        ids = list(range(3, 3 + prompt_tokens))  # fixed ids: the length is what counts, not the text
        no_eos = {eos: -1e9} if eos is not None and eos >= 0 else None

        def one(n_prompt: int, n_new: int) -> tuple[float, int]:
            llm.reset()
            t0 = time.perf_counter()
            res = llm.create_completion(ids[:n_prompt], max_tokens=n_new, temperature=0.0, logit_bias=no_eos)
            return time.perf_counter() - t0, res["usage"]["completion_tokens"]

        one(16, 8)  # warm-up: kernels, buffers
        prompt = [one(prompt_tokens, 1)[0] for _ in range(repeats)]
        decode = [one(16, new_tokens) for _ in range(repeats)]
    finally:
        llm.close()
    best_decode = min(decode, key=lambda d: d[0])
    return {"gguf": str(gguf), "bytes": gguf.stat().st_size, "gpu_offload": offload, "threads": threads,
            "load_s": load_s, "prompt_tokens": prompt_tokens,
            "prompt_tokens_per_s": prompt_tokens / statistics.median(prompt),
            "decode_tokens": best_decode[1],
            "decode_tokens_per_s": statistics.median(n / t for t, n in decode),
            "llama_cpp_python": llama_cpp.__version__}


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description="worker entry of the benchmark (scripts/bench.py runs it)")
    p.add_argument("--worker", dest="config", choices=sorted(CONFIGS), required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rows", type=int, default=400)
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--median", type=int, default=700)
    p.add_argument("--cuda", action="store_true")
    worker(p.parse_args())


if __name__ == "__main__":
    main()
