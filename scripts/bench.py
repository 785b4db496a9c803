#!/usr/bin/env python3
"""Benchmark: training tokens/s, step time, peak GPU memory and MFU of cotune's training stage against the plain
Hugging Face stack and the reference notebook's literal settings, one process per configuration, in one run.

The model is built with random weights in the configured architecture (Qwen3-8B's shape by default); rows have a
lognormal length spread. Results: RUN_DIR/bench/bench.json and bench.md (naming the GPU). `--smoke` runs the plain
stack on a tiny model on the CPU in seconds, to prove the harness.

`--ddp` compares 1 process with N (torchrun DDP, N = every visible GPU) at 8 and 16 sequences per optimizer step,
for each way of splitting a step between the processes: RUN_DIR/bench/ddp.json and ddp.md. A default run on a
machine with 2 or more GPUs does this after the single-GPU configurations; `--smoke --ddp` runs it on 2 CPU processes.

`--capacity` finds, for cotune and the plain stack, the longest single sequence that trains a few steps under each
memory limit (`--limits 24,80` GiB; on a CPU `--smoke` the limit is address space beyond the loaded model), by
bisection in one process (or over the lengths `--lengths CONFIG=N,N` gives), each result confirmed in a fresh one:
RUN_DIR/bench/capacity.json and capacity.md.

`--gguf FILE` instead times prompt processing and decoding of a GGUF through llama-cpp-python (on the GPU when the
build offloads, else on the CPU; `--cpu` forces the CPU): RUN_DIR/bench/decode-<name>.json.

`--cpu-speedups` instead measures the plain stack's two CPU speed-ups (cotune.cpu), each off and on, side by side in
one process on the embedded model: decoding the demo's three questions and LoRA training steps on two sample rows,
with whether the tokens and losses stay the same; then the held-out loss as the training stage takes it on the CPU,
trl's evaluate() against the opening every row shares run once: RUN_DIR/bench/cpu-speedups.json and .md.
"""
import argparse
from pathlib import Path

from cotune.errors import UserError, run_main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU: tiny random model, plain stack, a few steps")
    parser.add_argument("--shape", default=None, help="random-model shape [default: qwen3-8b, qwen3-micro with --smoke]")
    parser.add_argument("--model", type=Path, default=None, help="an existing model folder instead of building one")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer for the random model [embedded SmolLM2's]")
    parser.add_argument("--configs", default=None, help="comma-separated subset of the configurations")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per configuration [20; 4 smoke], per length with --capacity [3], or "
                             "training steps per variant with --cpu-speedups [4]")
    parser.add_argument("--warmup", type=int, default=None, help="first steps not timed [3; 1 smoke]")
    parser.add_argument("--profile", action="store_true",
                        help="also profile 2 optimizer steps after the timed ones: bench/CONFIG-profile.txt, the "
                             "operators that took the most GPU (or CPU) time")
    parser.add_argument("--ddp", action="store_true", help="only the 1-vs-N processes comparison (DDP)")
    parser.add_argument("--ddp-budget", type=float, default=0,
                        help="with --ddp: seconds per run (1 and N processes) after which no new plan starts [none]")
    parser.add_argument("--capacity", action="store_true",
                        help="only the capacity search: the longest single sequence each stack trains under each limit")
    parser.add_argument("--limits", default="24,80", help="with --capacity: memory limits in GiB [24,80]")
    parser.add_argument("--cap", type=int, default=131072, help="with --capacity: longest length searched [131072]")
    parser.add_argument("--start", type=int, default=8192, help="with --capacity: first length tried [8192]")
    parser.add_argument("--granularity", type=int, default=4096, help="with --capacity: search step [4096]")
    parser.add_argument("--rope", default="yarn:4:32768",
                        help="with --capacity: ROPE_SCALING [yarn:4:32768, Qwen3's documented long-context setting]")
    parser.add_argument("--lengths", action="append", default=[], metavar="CONFIG=N[,N]",
                        help="with --capacity: try these lengths for CONFIG instead of searching (repeatable)")
    parser.add_argument("--run-dir", type=Path, default=Path("artifacts"))
    parser.add_argument("--gguf", type=Path, default=None, help="time prompt processing and decoding of this GGUF")
    parser.add_argument("--cpu", action="store_true", help="with --gguf: decode on the CPU even where a GPU offloads")
    parser.add_argument("--threads", type=int, default=None, help="with --gguf: CPU threads [OMP_NUM_THREADS, else all cores]")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="with --gguf or --cpu-speedups: tokens decoded per timing [256; 128]")
    parser.add_argument("--cpu-speedups", action="store_true",
                        help="only the CPU speed-ups, each off and on, on the embedded model")
    parser.add_argument("--eval-rows", type=int, default=8,
                        help="with --cpu-speedups: held-out rows the two held-out loss computations take [8, the demo's]")
    args = parser.parse_args(argv)
    if args.gguf is not None:
        return decode(args)
    if args.cpu_speedups:
        from cotune.bench_cpu import cpu_speedups, table

        print(table(cpu_speedups(args.run_dir / "bench", new_tokens=args.new_tokens or 128, steps=args.steps or 4,
                                 eval_rows=args.eval_rows)))
        return

    import torch

    from cotune.bench import (CAPACITY_CONFIGS, CAPACITY_STEPS, CONFIGS, DEFAULT_CONFIGS, capacity, capacity_table,
                              ddp_comparison, run_all)
    from cotune.distributed import visible_gpus
    from cotune.models import resolve_model_path
    from cotune.randmodel import build
    from cotune.settings import EMBEDDED_MODEL

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        raise UserError("no CUDA GPU: the benchmark measures GPU training; use --smoke on a CPU")
    table = CAPACITY_CONFIGS if args.capacity else CONFIGS
    configs = args.configs.split(",") if args.configs else (
        list(CAPACITY_CONFIGS) if args.capacity else ["plain-reference"] if args.smoke else list(DEFAULT_CONFIGS))
    unknown = [c for c in configs if c not in table]
    if unknown:
        raise UserError(f"--configs: unknown {', '.join(unknown)}; choose from {', '.join(table)}")
    out = args.run_dir / "bench"
    model = args.model
    if model is None:
        shape = args.shape or ("qwen3-micro" if args.smoke else "qwen3-8b")
        model = out / f"model-{shape}-random"
        if not (model / "config.json").is_file():
            build(shape, args.tokenizer or resolve_model_path(EMBEDDED_MODEL), model)
            if cuda:  # built on the GPU: give its memory back before the measured processes start (BATCH_FIT sizes
                import gc  # the batch to what is free; 33 GiB held here once cost a run 16 recomputed layers)

                gc.collect()
                torch.cuda.empty_cache()
    if args.capacity:
        lengths = dict(item.split("=", 1) for item in args.lengths)
        results = capacity(model, out, configs, [float(v) for v in args.limits.split(",")], cap=args.cap,
                           start=args.start, granularity=args.granularity, rope=args.rope, cuda=cuda,
                           lengths=lengths, steps=args.steps or CAPACITY_STEPS)
        print(capacity_table(results))
        return
    steps, warmup = args.steps or (4 if args.smoke else 20), args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    rows, max_len, median = (32, 128, 64) if args.smoke else (400, 2048, 700)
    if not args.ddp:
        run_all(model, out, configs, steps, warmup, rows, max_len, median, cuda, profile=args.profile)
        print((out / "bench.md").read_text())
    gpus = visible_gpus()
    if args.ddp or (gpus >= 2 and not args.configs):
        if cuda and gpus < 2:
            raise UserError(f"--ddp: {gpus} GPU visible; the comparison needs 2 or more")
        print(f"multi-GPU comparison: 1 process against {gpus if cuda else 2} at 8 and 16 sequences per step", flush=True)
        if args.smoke:
            ddp_comparison(model, out, 2, steps, warmup, rows, max_len, median, cuda, sequences=(8,))
        else:
            ddp_comparison(model, out, gpus, steps, warmup, rows, max_len, median, cuda, budget=args.ddp_budget)
        print((out / "ddp.md").read_text())


def decode(args) -> None:
    import json

    from cotune.bench import decode_bench

    result = decode_bench(args.gguf, gpu=not args.cpu, threads=args.threads,
                          new_tokens=args.new_tokens or 256)
    out = args.run_dir / "bench"
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"decode-{args.gguf.stem}{'-gpu' if result['gpu_offload'] else '-cpu'}.json"
    target.write_text(json.dumps(result, indent=1))
    where = "GPU (all layers offloaded)" if result["gpu_offload"] else f"CPU, {result['threads']} threads"
    print(f"{args.gguf.name} ({result['bytes'] / 2**30:.2f} GiB) on the {where}: load {result['load_s']:.1f} s, "
          f"prompt {result['prompt_tokens_per_s']:.0f} tokens/s ({result['prompt_tokens']} tokens), decode "
          f"{result['decode_tokens_per_s']:.1f} tokens/s ({result['decode_tokens']} tokens); llama-cpp-python "
          f"{result['llama_cpp_python']} -> {target}")


if __name__ == "__main__":
    run_main(main)
