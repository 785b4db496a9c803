"""Training-speed benchmark: each configuration in its own process (Unsloth patches transformers globally), on a
model of the configured architecture with RANDOM weights (speed and memory don't depend on weight values), on
rows whose lengths follow a lognormal spread (median 700 tokens, clipped to 128..max_seq_length) like real
chain-of-thought rows, never all at full length."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .distributed import SPLITS
from .errors import UserError

# Dense bf16 peak of the GPUs we state MFU for (no sparsity), in FLOP/s.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}

# What the benchmark sets otherwise than the training stage, on top of the stage's own SFTConfig builder: a constant
# rate (losses of configurations compare step by step), every step logged, no checkpoints, whole batches only, a fixed
# data order, and the trainer counting real (non-padding) tokens.
BENCH_OVERRIDES = dict(lr_scheduler_type="constant", logging_steps=1, save_strategy="no", dataloader_drop_last=True,
                       data_seed=3407, include_num_input_tokens_seen="non_padding")

CONFIGS = {
    # name: (backend, settings over the reference recipe, what it is). Every one sees the same 8 sequences per
    # optimizer step (micro-batch x accumulation = 8), so all of them learn the same thing.
    "unsloth-reference": ("unsloth", {"batch_size": 2, "grad_accum": 4},
                          "the reference notebook's literal settings: Unsloth QLoRA, 2 x 4"),
    "cotune-fast": ("unsloth", {"preset": "fast"},
                    "PRESET=fast: Unsloth QLoRA, the batch fitted to the card (BATCH_FIT=auto), input embedding in "
                    "host RAM"),
    "cotune-fast-24g": ("unsloth", {"preset": "fast", "gpu_memory_limit_gib": 24},
                        "PRESET=fast under GPU_MEMORY_LIMIT_GIB=24: the batch fitted to a 24 GiB card"),
    "cotune-fast-gpu-embedding": ("unsloth", {"preset": "fast", "offload_embedding": "false"},
                                  "PRESET=fast with the input embedding on the GPU: what keeping it in host RAM costs"),
    "cotune-fast-4x2": ("unsloth", {"preset": "fast", "batch_fit": "off"},
                        "PRESET=fast without the fit: Unsloth QLoRA, 4 x 2, input embedding in host RAM"),
    "unsloth-reference-tiled": ("unsloth", {"batch_size": 2, "grad_accum": 4, "tiled_mlp": "true"},
                                "the reference settings with TILED_MLP=true: what the MLP's slicing costs"),
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


def synthetic_rows(n: int, max_len: int, median: int, vocab: int) -> list[dict]:
    """Pre-tokenized rows of random ids with lognormal lengths: the same rows in every configuration and process."""
    rng = random.Random(1)
    return [{"input_ids": [rng.randrange(3, vocab - 1) for _ in range(length)]}
            for length in synthetic_lengths(n, max_len, seed=0, median=median)]


def step_timer(steps: list[dict], cuda: bool):
    """A trainer callback that appends each optimizer step's seconds, real tokens (every process's, as the trainer
    counts them) and logged loss/MFU to `steps`."""
    import torch
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.t0, self.tokens0 = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            steps.append({"step": state.global_step, "seconds": time.perf_counter() - self.t0,
                          "tokens": state.num_input_tokens_seen - self.tokens0})

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and steps:
                for key in ("loss", "train_mfu", "train_hfu"):
                    if key in logs:
                        steps[-1][key] = logs[key]

    return Timer


PROFILE_STEPS = 2  # optimizer steps profiled after the timed ones (--profile), never part of the timing


def step_profiler(out: Path, first_step: int, cuda: bool):
    """A trainer callback that runs torch.profiler over PROFILE_STEPS optimizer steps from `first_step` on and writes
    the operators that took the most time (on the GPU where there is one, else on the CPU) to `out`."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    class Profiler(TrainerCallback):
        prof = None

        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == first_step and self.prof is None:
                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
                self.prof = profile(activities=activities)
                if cuda:
                    torch.cuda.synchronize()
                self.prof.start()
                self.t0 = time.perf_counter()  # after start() and before stop(): both take seconds of their own

        def on_step_end(self, a, state, control, **kw):
            if self.prof is not None and state.global_step == first_step + PROFILE_STEPS:
                if cuda:
                    torch.cuda.synchronize()
                wall = time.perf_counter() - self.t0
                self.prof.stop()
                key = "self_device_time_total" if cuda else "self_cpu_time_total"
                table = self.prof.key_averages()
                # what the device worked: its own events (kernels, copies), as the table's footer adds them up
                busy = sum(e.self_device_time_total for e in table if e.device_type == DeviceType.CUDA and
                           not e.is_user_annotation) if cuda else sum(e.self_cpu_time_total for e in table)
                busy /= 1e6
                out.write_text(f"{PROFILE_STEPS} optimizer steps from step {first_step + 1}: {wall:.2f} s wall, "
                               f"{busy:.2f} s of {'GPU' if cuda else 'CPU'} operator time ({busy / wall:.0%}); "
                               f"sorted by {key}\n" + table.table(sort_by=key, row_limit=40) + "\n")
                self.prof = None

    return Profiler


def worker(args) -> dict:
    """One configuration, in this process: load, train `steps` optimizer steps, time all but the warm-up."""
    backend_name, overrides, description = CONFIGS[args.config]
    overrides = dict(overrides)
    kbit_upcast = overrides.pop("kbit_upcast", False)
    from .backends import STACKS

    if backend_name == "unsloth":
        os.environ.setdefault("UNSLOTH_LOG_MFU", "1")  # Unsloth's own LoRA-aware MFU, logged beside ours
    STACKS[backend_name].patch()  # before transformers/trl are imported
    import torch
    from datasets import Dataset
    from trl import SFTTrainer

    from .backends import choose_backend, load_for_training
    from .batchfit import fit_batch, keep_recomputed, memory_budget
    from .distributed import plan
    from .models import count_parameters
    from .settings import resolve
    from .train import sft_config

    profiled = PROFILE_STEPS if args.profile else 0  # after the timed steps, so that they time as without it
    cli = {"base_model": args.model, "backend": backend_name, "max_steps": str(args.steps + profiled),
           "warmup_steps": "0", "max_seq_length": str(args.max_len)}
    if not args.cuda:
        cli.update({"load_in_4bit": "false", "gradient_checkpointing": "false", "optim": "adamw_torch"})
    cli.update({k: str(v) for k, v in overrides.items()})
    settings = resolve(cli, environ={}, dotenv_path=Path("/nonexistent"))
    backend = choose_backend(settings, quiet=True)
    checkpointing = backend.stack.checkpointing(settings.gradient_checkpointing)
    budget = memory_budget(settings, backend)
    model, tokenizer = load_for_training(settings, backend, Path(args.model), kbit_upcast=kbit_upcast)
    rows = synthetic_rows(args.rows, args.max_len, args.median, min(len(tokenizer), model.config.vocab_size))
    settings, fit, _ = fit_batch(settings, backend, model, [len(r["input_ids"]) for r in rows], budget)
    batch, accum = settings.batch_size, settings.grad_accum
    config = sft_config(settings, backend, plan(settings, nproc_per_node=1, nnodes=1), "random",
                        Path(args.out).parent / f"ckpt-{args.config}", eval_on_start=False, **BENCH_OVERRIDES)
    steps: list[dict] = []
    Timer = step_timer(steps, args.cuda)
    callbacks = [Timer(), *keep_recomputed(model, fit)]
    if args.profile:
        callbacks.append(step_profiler(Path(args.out).with_name(f"{args.config}-profile.txt"), args.steps, args.cuda)())
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=callbacks)
    if args.cuda:
        torch.cuda.reset_peak_memory_stats()
        with MemorySampler() as sampler:
            trainer.train()
    else:
        trainer.train()
    timed = steps[args.warmup:args.steps]
    tokens, seconds = sum(s["tokens"] for s in timed), sum(s["seconds"] for s in timed)
    base_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    n_params = count_parameters(Path(args.model))  # the checkpoint's own weights, LoRA adapters not counted
    unsloth_mfu = [s["train_mfu"] for s in timed if "train_mfu" in s]
    unsloth_hfu = [s["train_hfu"] for s in timed if "train_hfu" in s]
    result = {
        "config": args.config, "description": description, "backend": backend.name,
        "micro_batch": batch, "grad_accum": accum,
        "gradient_checkpointing": str(checkpointing).lower() if fit is None else recompute_summary(fit),
        "batch_fit": fit,
        "gpu_memory_limit_gib": settings.gpu_memory_limit_gib or None,
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


# ------------------------------------------------------------------------------------------------- capacity mode
# The longest single sequence (batch 1) that trains under a memory limit, per stack. cotune's is the reference
# recipe's stack with what it offers for long rows: Unsloth's offloaded checkpointing (activations in host RAM), its
# chunked cross-entropy (no full logits), the input embedding in host RAM.
CAPACITY_CONFIGS = {
    "cotune-long": ("unsloth", {"gradient_checkpointing": "unsloth", "offload_embedding": "true", "tiled_mlp": "true"},
                    "Unsloth QLoRA, batch 1, offloaded checkpointing, input embedding in host RAM, MLP in slices "
                    "(TILED_MLP=true)"),
    "cotune-long-untiled": ("unsloth", {"gradient_checkpointing": "unsloth", "offload_embedding": "true"},
                            "Unsloth QLoRA, batch 1, offloaded checkpointing, input embedding in host RAM"),
    "plain-long": ("hf", {"gradient_checkpointing": "true"},
                   "transformers + bitsandbytes + peft + trl QLoRA as trl runs it, batch 1, gradient checkpointing"),
}
CAPACITY_STEPS = 3  # optimizer steps a length must train to count (the first compiles and allocates)


def recompute_summary(fit: dict) -> str:
    """How many layers the fitted run recomputed: at most (the longest micro-batch's count) and on average over the
    micro-batches it trained."""
    seen = {int(k): v for k, v in (fit.get("micro_batches_by_recomputed_layers") or {}).items()}
    mean = sum(k * v for k, v in seen.items()) / sum(seen.values()) if seen else None
    return f"per micro-batch, at most {fit['recomputed_layers']}/{fit['layers']} layers" + (
        f" (mean {mean:.1f})" if mean is not None else "")


def out_of_memory(err: BaseException) -> bool:
    """A try that ran out of memory (the GPU's allocator under its cap, or the CPU's under RLIMIT_AS)."""
    import torch

    text = str(err).lower()
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text or \
        "can't allocate memory" in text or "not enough memory" in text


def cpu_limit(limit_bytes: float) -> None:
    """On the CPU (the harness's smoke test): at most `limit_bytes` of address space beyond what the process holds
    now, through RLIMIT_AS, so that a try past it fails the way an allocation on a full card does."""
    import resource

    size = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (size + int(limit_bytes), resource.RLIM_INFINITY))


def next_length(tried: dict[int, bool], start: int, cap: int, granularity: int) -> int | None:
    """The bisection: double from `start` until a length fails (or `cap` passes), then halve the gap between the
    longest that passed and the shortest that failed down to `granularity`; None when the search is done."""
    passed = [n for n, ok in tried.items() if ok]
    failed = [n for n, ok in tried.items() if not ok]
    lo, hi = max(passed, default=0), min(failed, default=None)
    if hi is None:
        if not tried:
            return min(start, cap)
        return None if lo >= cap else min(cap, lo * 2)
    if hi - lo <= granularity or hi <= granularity:
        return None
    mid = (lo + hi) // 2 // granularity * granularity
    return mid if lo < mid < hi else None


def capacity_worker(args) -> None:
    """One stack under one memory limit, in this process: load once, then train CAPACITY_STEPS steps of one row of
    each length the search asks for (or of --lengths), recovering from a try that runs out of memory."""
    import gc

    backend_name, overrides, description = CAPACITY_CONFIGS[args.capacity_worker]
    from .backends import STACKS

    STACKS[backend_name].patch()
    import torch
    from datasets import Dataset
    from trl import SFTTrainer

    from .backends import choose_backend, load_for_training
    from .batchfit import memory_budget
    from .distributed import plan
    from .settings import resolve
    from .train import sft_config

    cli = {"base_model": args.model, "backend": backend_name, "max_steps": str(args.steps), "warmup_steps": "0",
           "max_seq_length": str(args.cap), "batch_size": "1", "grad_accum": "1", "rope_scaling": args.rope,
           "gpu_memory_limit_gib": str(args.limit_gib if args.cuda else 0), **overrides}
    if not args.cuda:
        cli.update({"load_in_4bit": "false", "gradient_checkpointing": "true", "optim": "adamw_torch"})
    settings = resolve(cli, environ={}, dotenv_path=Path("/nonexistent"))
    backend = choose_backend(settings, quiet=True)
    memory_budget(settings, backend)
    model, tokenizer = load_for_training(settings, backend, Path(args.model))
    vocab = min(len(tokenizer), model.config.vocab_size)
    if not args.cuda:
        cpu_limit(args.limit_gib * 2**30)
    result = {"config": args.capacity_worker, "description": description, "backend": backend.name,
              "limit_gib": args.limit_gib, "rope_scaling": args.rope, "cap": args.cap, "granularity": args.granularity,
              "steps": args.steps, "host": platform.node(), "tries": [],
              "gpu": torch.cuda.get_device_name(0) if args.cuda else None}
    tried: dict[int, bool] = {}
    given = iter([int(n) for n in args.lengths.split(",")]) if args.lengths else None
    rng = random.Random(1)
    while True:
        length = next(given, None) if given is not None else \
            next_length(tried, args.start, args.cap, args.granularity)
        if length is None:
            break
        rows = [{"input_ids": [rng.randrange(3, vocab - 1) for _ in range(length)]} for _ in range(args.steps)]
        run = dataclasses.replace(settings, max_seq_length=length)
        config = sft_config(run, backend, plan(run, nproc_per_node=1, nnodes=1), "random",
                            Path(args.out).parent / f"ckpt-{args.capacity_worker}", eval_on_start=False,
                            **BENCH_OVERRIDES)
        steps: list[dict] = []
        trainer, error = None, None
        if args.cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                                 processing_class=tokenizer, callbacks=[step_timer(steps, args.cuda)()])
            trainer.train()
        except Exception as err:  # noqa: BLE001 -- only running out of memory is an answer; the rest is re-raised
            if not out_of_memory(err):
                raise
            error = str(err).splitlines()[0][:300]
        ok = error is None and len(steps) == args.steps
        tried[length] = ok
        result["tries"].append({
            "length": length, "ok": ok, "error": error,
            "step_seconds": [s["seconds"] for s in steps],
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if args.cuda else None,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if args.cuda else None,
            # offloaded checkpoints live in host RAM, which can bound a long row before the card does; the process's
            # peak so far (Linux reports KiB), not this length's alone
            "peak_host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20})
        print(f"{args.capacity_worker} under {args.limit_gib:g} GiB: {length:,} tokens "
              f"{'trained' if ok else 'ran out of memory'}", flush=True)
        if trainer is not None:
            trainer.accelerator.free_memory()
        del trainer
        model.zero_grad(set_to_none=True)
        gc.collect()
        if args.cuda:
            torch.cuda.empty_cache()
        Path(args.out).write_text(json.dumps(result, indent=1))  # after every try: a crash keeps these
    passed = [t["length"] for t in result["tries"] if t["ok"]]
    result["longest"] = max(passed, default=None)
    Path(args.out).write_text(json.dumps(result, indent=1))


def run_worker(args: list[str], target: Path, what: str) -> tuple[dict | None, bool]:
    """One measurement in a fresh process (`python -m cotune.bench ARGS --out TARGET`): what it wrote to `target`,
    if anything (a capacity worker writes after every try, so one that died still leaves its tries), and whether it
    finished. One that didn't has the tail of its output printed, and that it FAILED."""
    target.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-m", "cotune.bench", *args, "--out", str(target)],
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True)
    ok = proc.returncode == 0 and target.is_file()
    if not ok:
        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
        print(f"{what}: the worker FAILED (exit {proc.returncode})", flush=True)
    return (json.loads(target.read_text()) if target.is_file() else None), ok


def fresh_longest(tries: list[dict]) -> dict | None:
    """The longest try that trained, with its length, if nothing ran out of memory before it in its process: then
    nothing had been recovered from, and that process was as fresh as a new one would be. Else None: it must train
    again in a fresh process to count."""
    passed = [i for i, t in enumerate(tries) if t["ok"]]
    if not passed:
        return None
    at = max(passed, key=lambda i: tries[i]["length"])
    longest = tries[at]["length"]
    # and nothing as long or shorter ran out anywhere in it (a length given twice that once ran out is in doubt)
    clean = all(t["ok"] for t in tries[:at]) and not any(not t["ok"] and t["length"] <= longest for t in tries)
    return {"length": longest, **tries[at]} if clean else None


def capacity(model: Path, out: Path, configs: list[str], limits: list[float], *, cap: int, start: int,
             granularity: int, rope: str, cuda: bool, steps: int = CAPACITY_STEPS,
             lengths: dict | None = None) -> list[dict]:
    """For each stack and limit: the search in one process. Its longest length counts if nothing ran out of memory
    before it there (`fresh_longest`); else it is trained again in a fresh process and counts only if it trains there
    (if it doesn't, one `granularity` shorter is tried the same way).
    `lengths` (config -> "N,N"): run these lengths instead of searching."""
    out.mkdir(parents=True, exist_ok=True)
    results, failed_runs = [], []

    def worker(name, limit, target, given):
        what = f"capacity {name} under {limit:g} GiB"
        began = time.monotonic()
        args = ["--capacity-worker", name, "--model", str(model), "--limit-gib", str(limit), "--cap", str(cap),
                "--start", str(start), "--granularity", str(granularity), "--rope", rope, "--steps", str(steps)]
        args += (["--lengths", given] if given else []) + (["--cuda"] if cuda else [])
        result, ok = run_worker(args, target, what)
        if not ok:
            failed_runs.append(f"{name} under {limit:g} GiB")
        print(f"{what}: {time.monotonic() - began:.0f} s with load", flush=True)
        return result

    for limit in limits:
        for name in configs:
            tag = f"{name}-{limit:g}g"
            search = worker(name, limit, out / f"capacity-{tag}.json", (lengths or {}).get(name))
            # from the tries themselves: a worker that died after some tries still wrote them
            tries = (search or {}).get("tries", [])
            longest = max((t["length"] for t in tries if t["ok"]), default=None)
            confirmed = fresh_longest(tries)
            for candidate in ([longest, longest - granularity] if longest and not confirmed else []):
                if candidate <= 0:
                    break
                again = worker(name, limit, out / f"capacity-{tag}-confirm.json", str(candidate))
                if again and again.get("longest") == candidate:
                    confirmed = {"length": candidate, **again["tries"][-1]}
                    break
            failed = [t["length"] for t in tries if not t["ok"]]
            results.append({"config": name, "limit_gib": limit, "description": CAPACITY_CONFIGS[name][2], "steps": steps,
                            "longest_confirmed": confirmed and confirmed["length"],
                            "shortest_failed": min(failed, default=None), "confirm": confirmed,
                            "given_lengths": (lengths or {}).get(name),
                            "search": search and search["tries"], "rope_scaling": rope, "cap": cap,
                            "gpu": search and search.get("gpu")})
            (out / "capacity.json").write_text(json.dumps(results, indent=1))
    (out / "capacity.md").write_text(capacity_table(results))
    if failed_runs:
        print(capacity_table(results))
        raise UserError(f"bench --capacity: {len(failed_runs)} run(s) failed: {', '.join(failed_runs)} (output above)")
    return results


def capacity_table(results: list[dict]) -> str:
    gpu = next((r["gpu"] for r in results if r.get("gpu")), None) or "CPU"
    f = lambda v, d=2: "n/a" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = [f"Device: {gpu}. Random weights; one sequence per step (batch 1), "
             f"{results[0].get('steps', CAPACITY_STEPS)} steps per length; "
             f"ROPE_SCALING={results[0]['rope_scaling'] or 'none'}; lengths searched up to {results[0]['cap']:,} (or only "
             "those given). A "
             "length counts once it trained in a process where nothing had run out of memory before it (else it is "
             "trained again in a fresh one).", "",
             "| config | memory limit (GiB) | longest trained (tokens) | shortest that ran out | vs plain | "
             "median step at longest (s) | peak allocated at longest (GiB) |", "|---|---|---|---|---|---|---|"]
    plain = {r["limit_gib"]: r["longest_confirmed"] for r in results if r["config"].startswith("plain")}
    for r in results:
        c = r["confirm"] or {}
        steps = c.get("step_seconds") or []
        base = plain.get(r["limit_gib"])
        failed = f"{r['shortest_failed']:,}" if r["shortest_failed"] else (
            "none of " + ", ".join(f"{int(n):,}" for n in r["given_lengths"].split(",")) if r.get("given_lengths")
            else f"none up to {r['cap']:,}")
        lines.append(f"| {r['config']} | {r['limit_gib']:g} | {r['longest_confirmed'] or 'none'} | {failed} | "
                     f"{f(r['longest_confirmed'] / base) + 'x' if base and r['longest_confirmed'] else 'n/a'} | "
                     f"{f(statistics.median(steps[1:]) if len(steps) > 1 else None)} | "
                     f"{f(c.get('peak_allocated_gib'))} |")
    return "\n".join(lines) + "\n"


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
            median: int, cuda: bool, profile: bool = False) -> list[dict]:
    """Each configuration in a fresh process, one after the other. A configuration that fails (out of memory, say)
    is reported and the rest still run. Results of other configurations already in `out` join the table only when
    they were measured on this very GPU (same UUID) with the same steps and data."""
    out.mkdir(parents=True, exist_ok=True)
    results, failed = {}, []
    for name in configs:
        start = time.monotonic()
        args = ["--worker", name, "--model", str(model), "--steps", str(steps), "--warmup", str(warmup), "--rows",
                str(rows), "--max-len", str(max_len), "--median", str(median)] + (["--cuda"] if cuda else []) + (
                    ["--profile"] if profile else [])
        result, ok = run_worker(args, out / f"{name}.json", f"bench config {name}")
        if not ok:
            failed.append(name)
            continue
        results[name] = result
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
        raise UserError(f"bench: {len(failed)} configuration(s) failed: {', '.join(failed)} (output above)")
    return ordered


# The multi-GPU comparison: 1 process against N (torchrun DDP) at the same sequences per optimizer step, for each way
# of sharing a step out between the processes (distributed.SPLITS), Unsloth QLoRA (the plain stack on a CPU smoke run).
DDP_SEQUENCES = (8, 16)  # the reference recipe's sequences per optimizer step, and twice it
DDP_MICRO = 4  # sequences per micro-batch on one GPU, as PRESET=fast


def real_tokens(batch) -> int:
    """Non-pad tokens of a collated micro-batch (padding-free batches have no attention mask and no pad)."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


def balance(by_rank: list[list[tuple[int, int]]], accum: int, steps: list[int]) -> dict:
    """How evenly the processes' work was shared, from each process's (real, computed) tokens per micro-batch in the
    order it took them (computed = padded; the same as real in padding-free batches). `imbalance`: the busiest
    process's computed tokens in a step over the mean; `slot_imbalance`: the sum over accumulation slots of the
    busiest process's micro-batch over the mean per process (the processes also meet at every micro-batch)."""
    def micro(rank, k, slot):
        return rank[k * accum + slot] if k * accum + slot < len(rank) else (0, 0)

    per_step, per_slot, real, computed = [], [], 0, 0
    for k in steps:
        work = [[micro(rank, k, slot)[1] for slot in range(accum)] for rank in by_rank]
        mean = sum(map(sum, work)) / len(work)
        if mean:
            per_step.append(max(map(sum, work)) / mean)
            per_slot.append(sum(max(w[slot] for w in work) for slot in range(accum)) / mean)
        real += sum(micro(rank, k, slot)[0] for rank in by_rank for slot in range(accum))
        computed += sum(map(sum, work))
    return {"tokens_by_rank": [[sum(micro(rank, k, s)[0] for s in range(accum)) for rank in by_rank] for k in steps],
            "imbalance": statistics.mean(per_step) if per_step else None,
            "slot_imbalance": statistics.mean(per_slot) if per_slot else None,
            "padding_share": 1 - real / computed if computed else None}


def ddp_backend(cuda: bool) -> str:
    """The stack the DDP comparison trains with: the reference recipe's on a GPU, the plain stack on the CPU."""
    return "unsloth" if cuda else "hf"


def ddp_worker(args) -> None:
    """One process of the comparison (one of N under torchrun, or alone): load the model once, then train every
    (sequences per step, split) plan from the same initial LoRA weights; rank 0 writes what all measured."""
    import gc

    from .backends import STACKS, choose_backend, load_for_training

    STACKS[ddp_backend(args.cuda)].patch()  # before transformers/trl are imported
    import torch
    from datasets import Dataset
    from trl import SFTTrainer

    from .distributed import decided_by_writer, end_process_group, gathered, plan, start_process_group, this_process
    from .settings import resolve
    from .train import sft_config, trainer_class

    me = this_process()
    cli = {"base_model": args.model, "backend": ddp_backend(args.cuda), "max_steps": str(args.steps),
           "warmup_steps": "0", "max_seq_length": str(args.max_len), "batch_size": str(args.micro),
           "grad_accum": "1", "offload_embedding": "false"}
    if not args.cuda:
        cli.update({"load_in_4bit": "false", "gradient_checkpointing": "false", "optim": "adamw_torch"})
    settings = resolve(cli, environ={}, dotenv_path=Path("/nonexistent"))
    backend = choose_backend(settings, quiet=True, world_size=me.world_size)
    start_process_group(me, backend.device)
    started = time.perf_counter()
    model, tokenizer = load_for_training(settings, backend, Path(args.model), device_index=me.local_rank)
    load_seconds = time.perf_counter() - started
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    dataset = Dataset.from_list(synthetic_rows(args.rows, args.max_len, args.median,
                                               min(len(tokenizer), model.config.vocab_size)))
    plans: list[dict] = []
    result = {"world_size": me.world_size, "backend": backend.name, "micro": args.micro, "steps": args.steps,
              "warmup_steps_excluded": args.warmup, "rows": args.rows, "max_len": args.max_len,
              "median": args.median, "load_seconds": load_seconds, "host": platform.node(), "plans": plans,
              "gpu": torch.cuda.get_device_name(0) if args.cuda else None, "skipped": []}
    began = time.monotonic()
    for sequences, split in [(int(n), name) for n, name in (p.split(":") for p in args.plans.split(","))]:
        # every process starts the next plan only if rank 0 sees time left, so that all of them stop together
        if decided_by_writer(me, lambda: args.budget and time.monotonic() - began > args.budget):
            result["skipped"].append(f"{sequences}:{split}")
            continue
        with torch.no_grad():  # every plan starts from the same LoRA weights
            for name, param in model.named_parameters():
                if name in initial:
                    param.copy_(initial[name])
                    param.grad = None
        layout = plan(dataclasses.replace(settings, grad_accum=sequences // args.micro),
                      nproc_per_node=me.local_world_size, nnodes=me.world_size // me.local_world_size)
        config = sft_config(settings, backend, layout, split, Path(args.out).parent / "ckpt-ddp",
                            eval_on_start=False, **BENCH_OVERRIDES, disable_tqdm=True)
        steps: list[dict] = []
        counted: list[tuple[int, int]] = []  # (real, padded) tokens of each micro-batch this process trained on
        trainer = trainer_class(SFTTrainer, split)(model=model, args=config, train_dataset=dataset,
                                            processing_class=tokenizer, callbacks=[step_timer(steps, args.cuda)()])
        collate = trainer.data_collator

        def counting(features, collate=collate, counted=counted):
            batch = collate(features)
            counted.append((real_tokens(batch), int(batch["input_ids"].numel())))
            return batch

        trainer.data_collator = counting
        if args.cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        sampler = type(trainer._get_train_sampler(dataset)).__name__
        by_rank = gathered(me, counted)
        peaks = gathered(me, torch.cuda.max_memory_allocated() / 2**30 if args.cuda else None)
        trainer.accelerator.free_memory()
        del trainer
        gc.collect()
        if args.cuda:
            torch.cuda.empty_cache()
        if not me.is_writer:
            continue
        timed = list(range(args.warmup, len(steps)))
        plans.append({
            "sequences_per_step": sequences, "split": split, "sampler": sampler, "layout": layout.record(),
            "step_seconds": [s["seconds"] for s in steps], "losses": [s.get("loss") for s in steps],
            "tokens": [s["tokens"] for s in steps], **balance(by_rank, layout.grad_accum, timed),
            "timed_seconds": sum(steps[k]["seconds"] for k in timed),
            "timed_tokens": sum(steps[k]["tokens"] for k in timed),
            "median_step_s": statistics.median(steps[k]["seconds"] for k in timed) if timed else None,
            "peak_allocated_gib_by_rank": peaks})
        Path(args.out).write_text(json.dumps(result, indent=1))  # after every plan: a later failure keeps these
        print(f"{me.world_size} process(es), {sequences} sequences per step, {split}: median step "
              f"{plans[-1]['median_step_s']:.3f} s", flush=True)
    if me.is_writer:
        Path(args.out).write_text(json.dumps(result, indent=1))
    end_process_group()


def ddp_comparison(model: Path, out: Path, nproc: int, steps: int, warmup: int, rows: int, max_len: int,
                   median: int, cuda: bool, sequences=DDP_SEQUENCES, splits=tuple(SPLITS),
                   micro: int = DDP_MICRO, budget: float = 0) -> dict:
    """1 process, then `nproc` through torchrun, each training every plan (cotune's split first; with a `budget` in
    seconds, each run starts no plan after it); a table of what N processes gain on the plans both ran."""
    from .backends import STACKS

    out.mkdir(parents=True, exist_ok=True)
    ours = STACKS[ddp_backend(cuda)].split
    ordered = sorted(splits, key=lambda name: name != ours)
    plans = ",".join(f"{n}:{split}" for split in ordered for n in sequences)
    runs, failed = {}, []
    for world in (1, nproc):
        target = out / f"ddp-{world}.json"
        target.unlink(missing_ok=True)
        entry = ["-m", "cotune.bench", "--ddp-worker", "--model", str(model), "--out", str(target), "--plans", plans,
                 "--micro", str(micro), "--steps", str(steps), "--warmup", str(warmup), "--rows", str(rows),
                 "--max-len", str(max_len), "--median", str(median), "--budget", str(budget)] + (
                    ["--cuda"] if cuda else [])
        launcher = [] if world == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world)]
        start = time.monotonic()
        proc = subprocess.run([sys.executable, *launcher, *entry], env={**os.environ, "PYTHONUNBUFFERED": "1"},
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-6000:], file=sys.stderr)
            print(f"bench: the {world}-process run FAILED (exit {proc.returncode}; output above)", flush=True)
            failed.append(world)
        if target.is_file():
            runs[world] = json.loads(target.read_text())
        print(f"{world} process(es): {time.monotonic() - start:.0f} s with load", flush=True)
    if len(runs) < 2:
        raise UserError(f"bench: no comparison: the {' and '.join(map(str, failed))}-process run(s) measured nothing")
    result = {"one": runs[1], "many": runs[nproc], "rows": ddp_rows(runs[1], runs[nproc]), "failed": failed}
    (out / "ddp.json").write_text(json.dumps(result, indent=1))
    (out / "ddp.md").write_text(ddp_table(result))
    if failed:
        raise UserError(f"bench: the {' and '.join(map(str, failed))}-process run(s) failed part-way; "
                         f"the table ({out / 'ddp.md'}) has the plans both finished")
    return result


def ddp_rows(one: dict, many: dict) -> list[dict]:
    """For each plan: N processes against 1 on the same steps (same sequences in every step, same timed steps)."""
    by_plan = {(p["sequences_per_step"], p["split"]): p for p in one["plans"]}
    rows = []
    for p in many["plans"]:
        base = by_plan.get((p["sequences_per_step"], p["split"]))
        if base is None:
            continue
        pairs = [(a, b) for a, b in zip(p["losses"], base["losses"]) if a is not None and b is not None]
        rows.append({
            "sequences_per_step": p["sequences_per_step"], "split": p["split"], "sampler": p["sampler"],
            "one_median_step_s": base["median_step_s"], "many_median_step_s": p["median_step_s"],
            "speedup": base["timed_seconds"] / p["timed_seconds"] if p["timed_seconds"] else None,
            "one_tokens_per_s": base["timed_tokens"] / base["timed_seconds"] if base["timed_seconds"] else None,
            "many_tokens_per_s": p["timed_tokens"] / p["timed_seconds"] if p["timed_seconds"] else None,
            "imbalance": p["imbalance"], "slot_imbalance": p["slot_imbalance"], "padding_share": p["padding_share"],
            "max_loss_gap": max(abs(a - b) for a, b in pairs) if pairs else None,
            "layout_one": base["layout"], "layout_many": p["layout"],
            "peak_allocated_gib": max((g for g in p["peak_allocated_gib_by_rank"] if g is not None), default=None)})
    return rows


def ddp_table(result: dict) -> str:
    from .backends import STACKS

    one, many = result["one"], result["many"]
    n, ours = many["world_size"], STACKS[one["backend"]].split
    f = lambda v, d=3: "n/a" if v is None else f"{v:.{d}f}"  # noqa: E731
    base = {r["sequences_per_step"]: r for r in result["rows"] if r["split"] == ours}
    lines = [f"Device: {many.get('gpu') or 'CPU'}, {n} processes against 1. Random weights; {one['backend']}; "
             f"{many['steps']} steps per plan, the first {many['warmup_steps_excluded']} not timed. Speed-up: time of "
             f"the same timed steps (same sequences) on 1 process over on {n}. Imbalance: the busiest process's tokens "
             f"over the mean, per step (slot: summed over the micro-batches of a step). cotune's split for "
             f"{one['backend']}: {ours}.", "",
             f"| sequences per step | split | micro-batch x accum, 1 / {n} | median step 1 (s) | median step {n} (s) | "
             f"speed-up | vs 1 process with {ours} | tokens/s on {n} | imbalance | slot imbalance | padding | "
             f"max loss gap | peak allocated per GPU (GiB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        same = base.get(r["sequences_per_step"])
        versus = r["many_tokens_per_s"] / same["one_tokens_per_s"] if same and same["one_tokens_per_s"] else None
        lines.append(f"| {r['sequences_per_step']} | {r['split']}{' (cotune)' if r['split'] == ours else ''} | "
                     f"{r['layout_one']['micro_batch']} x {r['layout_one']['grad_accum']} / "
                     f"{r['layout_many']['micro_batch']} x {r['layout_many']['grad_accum']} | "
                     f"{f(r['one_median_step_s'])} | {f(r['many_median_step_s'])} | {f(r['speedup'], 2)}x | "
                     f"{f(versus, 2)}x | {f(r['many_tokens_per_s'], 0)} | {f(r['imbalance'])} | "
                     f"{f(r['slot_imbalance'])} | {f(r['padding_share'] and 100 * r['padding_share'], 1)} % | "
                     f"{f(r['max_loss_gap'], 4)} | {f(r['peak_allocated_gib'], 2)} |")
    return "\n".join(lines) + "\n"


def decode_bench(gguf: Path, *, gpu: bool, threads: int | None, new_tokens: int = 256, prompt_tokens: int = 512,
                 repeats: int = 3) -> dict:
    """Prompt processing and greedy decode speed of a GGUF through llama-cpp-python (every layer on the GPU where the
    build offloads and `gpu` allows, else the CPU; the result says which), after one untimed warm-up: the
    same library verify and users' laptops run. Decode is timed on `new_tokens` tokens with EOS masked, so a model
    that would stop early still decodes the full count."""
    import llama_cpp

    from .cpu import cpu_threads
    from .verify import check_gguf_file, load_gguf

    check_gguf_file(gguf)
    threads = threads or cpu_threads()
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
    p.add_argument("--worker", dest="config", choices=sorted(CONFIGS))
    p.add_argument("--ddp-worker", action="store_true", help="one process of the 1-vs-N processes comparison")
    p.add_argument("--plans", default="8:tokens", help="SEQUENCES:SPLIT,... (--ddp-worker)")
    p.add_argument("--micro", type=int, default=DDP_MICRO, help="sequences per micro-batch on one process")
    p.add_argument("--budget", type=float, default=0, help="seconds after which no new plan starts (0: none)")
    p.add_argument("--capacity-worker", choices=sorted(CAPACITY_CONFIGS), help="one stack's capacity search")
    p.add_argument("--limit-gib", type=float, default=24)
    p.add_argument("--cap", type=int, default=131072, help="longest length searched")
    p.add_argument("--start", type=int, default=8192, help="first length tried")
    p.add_argument("--granularity", type=int, default=4096)
    p.add_argument("--rope", default="", help="ROPE_SCALING for the capacity search")
    p.add_argument("--lengths", default="", help="comma-separated lengths to try instead of searching")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=20)  # (--capacity-worker: steps per length)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rows", type=int, default=400)
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--median", type=int, default=700)
    p.add_argument("--cuda", action="store_true")
    p.add_argument("--profile", action="store_true", help="(--worker) profile PROFILE_STEPS steps after the timed ones")
    args = p.parse_args()
    if args.capacity_worker:
        capacity_worker(args)
    elif args.ddp_worker:
        ddp_worker(args)
    elif args.config:
        worker(args)
    else:
        p.error("give --worker CONFIG or --ddp-worker")


if __name__ == "__main__":
    main()
