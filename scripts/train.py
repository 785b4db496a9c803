#!/usr/bin/env python3
"""Training stage: LoRA SFT with trl's SFTTrainer (Unsloth on a CUDA GPU, transformers + peft on the CPU).

Reads RUN_DIR/data/{train,eval}.jsonl; writes RUN_DIR/train/adapter/, metrics.jsonl, loss.png, trainer_state.json
and run.json. Checkpoints every SAVE_STEPS; a rerun with the same settings resumes from the last one.
"""
from cotune.cli import StageTimer, parse_settings, stage_lock, stage_parser
from cotune.errors import run_main


def main(argv=None):
    _, settings = parse_settings(stage_parser(__doc__), argv)
    timer = StageTimer("train")
    from cotune.training import run_train_stage

    with stage_lock(settings.stage_dir("train"), "train"):
        record = run_train_stage(settings)
    s = record["summary"]
    print(f"steps {s['global_step']}: training loss {s['first_loss']:.3f} -> {s['last_loss']:.3f}, held-out loss "
          f"{s['eval_loss_start']:.3f} -> {s['eval_loss_end']:.3f}, median {s['median_tokens_per_s']} tokens/s "
          f"({s['backend']} on {s['device']}, {s['dtype']})")
    timer.done(f"adapter in {settings.stage_dir('train')}/adapter")


if __name__ == "__main__":
    run_main(main)
