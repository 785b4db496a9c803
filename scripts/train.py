#!/usr/bin/env python3
"""Training stage: LoRA SFT with trl's SFTTrainer (Unsloth on a CUDA GPU, transformers + peft on the CPU).

Reads RUN_DIR/data/{train,eval}.jsonl; writes RUN_DIR/train/adapter/, metrics.jsonl, loss.png, trainer_state.json
and run.json. Checkpoints every SAVE_STEPS; a rerun with the same settings resumes from the last one.
NPROC_PER_NODE > 1 (or NNODES > 1) starts this script again on that many processes through torchrun (DDP: one GPU
each, or gloo between CPU processes); BATCH_SIZE x GRAD_ACCUM sequences per optimizer step are split between them.
"""
import sys

from cotune.cli import StageTimer, parse_settings, stage_lock, stage_parser
from cotune.errors import UserError, run_main


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    _, settings = parse_settings(stage_parser(__doc__), argv)
    from cotune.distributed import die_with_launcher, launch, launched, plan, report_user_error, this_process, under_torchrun

    if under_torchrun():  # one of the N processes
        die_with_launcher()
        try:
            return train_here(settings, lock=this_process().is_writer and not launched())
        except UserError as err:
            if report_user_error(this_process(), str(err)):
                sys.exit(2)
            raise
    layout = plan(settings)
    if layout.world_size == 1:
        return train_here(settings, lock=True)

    timer = StageTimer("train")
    from cotune.models import base_model_path
    from cotune.train import preflight

    writer_node = settings.node_rank == 0
    with stage_lock(settings.stage_dir("train"), "train") if writer_node else _no_lock():
        done = preflight(settings, layout) if layout.nnodes == 1 else None
        if done is not None:
            return report(settings, timer, done)
        base_model_path(settings)  # fetched or prepared once, before the processes start
        print(f"starting {layout.nproc_per_node} training processes on this machine through torchrun: "
              f"{layout.describe()}", flush=True)
        launch(settings, layout, __file__, argv)
    if writer_node:
        report(settings, timer)


def train_here(settings, lock: bool):
    timer = StageTimer("train")
    from cotune.distributed import launched
    from cotune.train import run_train_stage

    with stage_lock(settings.stage_dir("train"), "train") if lock else _no_lock():
        record = run_train_stage(settings)
    if record is not None and not launched():  # cotune's launcher reports for the processes it started
        report(settings, timer, record)


def report(settings, timer, record=None):
    import json

    record = record or json.loads((settings.stage_dir("train") / "run.json").read_text())
    s = {k: "n/a" if v is None else v for k, v in record["summary"].items()}
    f = lambda v: v if v == "n/a" else f"{v:.3f}"  # noqa: E731
    print(f"steps {s['global_step']}: training loss {f(s['first_loss'])} -> {f(s['last_loss'])}, held-out loss "
          f"{f(s['eval_loss_start'])} -> {f(s['eval_loss_end'])}, median {s['median_tokens_per_s']} tokens/s "
          f"({s['backend']} on {s['device']}, {s['dtype']}"
          f"{' under ' + s['autocast'] + ' autocast' if s.get('autocast') not in (None, 'n/a') else ''})")
    timer.done(f"adapter in {settings.stage_dir('train')}/adapter")


def _no_lock():
    import contextlib

    return contextlib.nullcontext()


if __name__ == "__main__":
    run_main(main)
