#!/usr/bin/env python3
"""Data stage: render the Q&A rows with the prompt template and write train/eval JSONL.

Reads DATASET (hub id, local .jsonl/.json/.csv/.parquet, or cotune:sample), checks the columns, renders every
row with TEMPLATE plus EOS, drops rows longer than MAX_SEQ_LENGTH (counted), splits off the held-out rows and
writes RUN_DIR/data/{train,eval}.jsonl, stats.json and run.json.
"""
from cotune.cli import StageTimer, parse_settings, stage_lock, stage_parser
from cotune.errors import run_main


def main(argv=None):
    _, settings = parse_settings(stage_parser(__doc__), argv)
    timer = StageTimer("data")
    from cotune.data import run_data_stage

    with stage_lock(settings.stage_dir("data"), "data"):
        stats = run_data_stage(settings)
    t, e = stats["train"], stats["eval"]
    print(f"train rows {t['rows']} (tokens min {t['min']} / median {t['median']} / max {t['max']}), "
          f"held-out rows {e['rows']}, dropped as too long: {stats['dropped_overlong']}")
    timer.done(f"wrote {settings.stage_dir('data')}/train.jsonl and eval.jsonl")


if __name__ == "__main__":
    run_main(main)
