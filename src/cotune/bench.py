"""Training-speed benchmark: each configuration in its own process (Unsloth patches transformers globally), on a
model of the configured architecture with RANDOM weights (speed and memory don't depend on weight values), on
rows whose lengths follow a lognormal spread (median 700 tokens, clipped to 128..max_seq_length) like real
chain-of-thought rows, never all at full length."""
from __future__ import annotations

import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Dense bf16 peak of the GPUs we state MFU for (no sparsity), in FLOP/s.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}

CONFIGS = {
    # name: (backend, micro-batch, accumulation, what it is); every one sees the same 8 sequences per optimizer step
    "unsloth-reference": ("unsloth", 2, 4, "the reference notebook's literal settings: Unsloth QLoRA, 2 x 4"),
    "cotune-fast": ("unsloth", 4, 2, "PRESET=fast: Unsloth QLoRA, 4 x 2"),
    "unsloth-8x1": ("unsloth", 8, 1, "Unsloth QLoRA, 8 x 1 (fastest, more memory)"),
    "plain-reference": ("hf", 2, 4, "transformers + bitsandbytes + peft + trl, same recipe, 2 x 4"),
}


def synthetic_lengths(n: int, max_len: int, seed: int, median: int = 700, sigma: float = 0.6) -> list[int]:
    rng = random.Random(seed)
    return [max(128 if max_len >= 256 else 8, min(max_len, int(rng.lognormvariate(math.log(median), sigma))))
            for _ in range(n)]


def worker(args) -> dict:
    """One configuration, in this process: load, train `steps` optimizer steps, time all but the warm-up."""
    backend_name, batch, accum, _ = CONFIGS[args.config]
    if backend_name == "unsloth":
        import unsloth  # noqa: F401  (must patch before transformers/trl are imported)
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from .backends import choose_backend, load_for_training
    from .settings import resolve

    settings = resolve({"base_model": args.model, "backend": backend_name, "batch_size": str(batch),
                        "grad_accum": str(accum), "max_steps": str(args.steps), "warmup_steps": "0",
                        "max_seq_length": str(args.max_len), "load_in_4bit": "true" if args.cuda else "false",
                        "gradient_checkpointing": "unsloth" if args.cuda else "false",
                        "optim": "adamw_8bit" if args.cuda else "adamw_torch"},
                       environ={}, dotenv_path=Path("/nonexistent"))
    backend = choose_backend(settings, quiet=True)
    model, tokenizer = load_for_training(settings, backend, Path(args.model))
    lengths = synthetic_lengths(args.rows, args.max_len, seed=0, median=args.median)
    rng = random.Random(1)
    vocab = min(len(tokenizer), model.config.vocab_size) - 1
    rows = [{"input_ids": [rng.randrange(3, vocab) for _ in range(n)]} for n in lengths]
    config = SFTConfig(output_dir=str(Path(args.out).parent / f"ckpt-{args.config}"), max_length=args.max_len,
                       per_device_train_batch_size=batch, gradient_accumulation_steps=accum, max_steps=args.steps,
                       learning_rate=2e-4, lr_scheduler_type="constant", optim=backend.optim, seed=3407,
                       logging_steps=1, save_strategy="no", report_to="none", bf16=backend.dtype == "bf16",
                       use_cpu=not args.cuda, dataloader_drop_last=True, data_seed=3407,
                       gradient_checkpointing=backend.name == "hf" and args.cuda,
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
            if logs and "loss" in logs and steps:
                steps[-1]["loss"] = logs["loss"]

    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=[Timer()])
    if args.cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    timed = steps[args.warmup:]
    tokens, seconds = sum(s["tokens"] for s in timed), sum(s["seconds"] for s in timed)
    n_params = sum(p.numel() for p in model.parameters())
    if hasattr(model, "get_base_model"):
        n_params = model.get_base_model().num_parameters()
    result = {
        "config": args.config, "description": CONFIGS[args.config][3], "backend": backend.name,
        "micro_batch": batch, "grad_accum": accum, "steps_timed": len(timed), "warmup_steps_excluded": args.warmup,
        "real_tokens_per_s": tokens / seconds if seconds else None,
        "median_step_s": statistics.median(s["seconds"] for s in timed) if timed else None,
        "losses": [s.get("loss") for s in steps], "n_params": n_params,
    }
    if args.cuda:
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        free, total = torch.cuda.mem_get_info()
        result.update({"gpu": name, "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                       "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
                       "device_used_at_end_gib": (total - free) / 2**30,
                       "mfu": 6 * n_params * result["real_tokens_per_s"] / peak if peak and result["real_tokens_per_s"] else None})
    Path(args.out).write_text(json.dumps(result, indent=1))
    return result


def markdown_table(results: list[dict]) -> str:
    gpu = results[0].get("gpu", "CPU")
    base = next((r for r in results if r["config"] == "plain-reference"), None)
    lines = [f"Device: {gpu}. Random weights; real (non-pad) tokens only; {results[0]['warmup_steps_excluded']} "
             f"warm-up steps excluded; N = {results[0]['n_params'] / 1e9:.2f}B parameters.", "",
             "| config | micro-batch x accum | real tokens/s | vs plain | median step (s) | peak allocated (GiB) | "
             "peak reserved (GiB) | MFU |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = r["real_tokens_per_s"] / base["real_tokens_per_s"] if base and base["real_tokens_per_s"] else None
        f = lambda v, d=2: "n/a" if v is None else f"{v:.{d}f}"  # noqa: E731
        lines.append(f"| {r['config']} | {r['micro_batch']} x {r['grad_accum']} | {f(r['real_tokens_per_s'], 0)} | "
                     f"{f(ratio)}x | {f(r['median_step_s'], 3)} | {f(r.get('peak_allocated_gib'))} | "
                     f"{f(r.get('peak_reserved_gib'))} | {f(r.get('mfu'), 3)} |")
    return "\n".join(lines) + "\n"


def run_all(model: Path, out: Path, configs: list[str], steps: int, warmup: int, rows: int, max_len: int,
            median: int, cuda: bool) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in configs:
        target = out / f"{name}.json"
        cmd = [sys.executable, "-m", "cotune.bench", "--worker", name, "--model", str(model), "--out", str(target),
               "--steps", str(steps), "--warmup", str(warmup), "--rows", str(rows), "--max-len", str(max_len),
               "--median", str(median)] + (["--cuda"] if cuda else [])
        start = time.monotonic()
        proc = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"bench config {name} failed (exit {proc.returncode})")
        results.append(json.loads(target.read_text()))
        print(f"{name}: {results[-1]['real_tokens_per_s']:.0f} real tokens/s ({time.monotonic() - start:.0f} s "
              "with load)", flush=True)
    (out / "bench.json").write_text(json.dumps(results, indent=1))
    (out / "bench.md").write_text(markdown_table(results))
    return results


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
