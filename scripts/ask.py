#!/usr/bin/env python3
"""Ask stage: the model answers the probe question, greedy, in the training prompt form.

`ask.py baseline` asks the base model (before training); `ask.py after` asks base + the trained adapter.
Writes RUN_DIR/<baseline|after>/answers.json (question, prompt, answer, tokens, time, backend, decoding).
"""
import sys

from cotune.cli import StageTimer, parse_settings, stage_lock, stage_parser
from cotune.errors import run_main


def main(argv=None):
    parser = stage_parser(__doc__)
    parser.add_argument("which", choices=("baseline", "after"), help="base model, or base + trained adapter")
    args, settings = parse_settings(parser, argv)
    timer = StageTimer(args.which)
    from cotune.ask import run_ask_stage

    with stage_lock(settings.stage_dir(args.which), args.which):
        record = run_ask_stage(settings, args.which)
    answer = record["answers"][0]
    print(f"Q: {answer['question']}\nA: {answer['answer']}\n"
          f"({answer['completion_tokens']} tokens, {'stopped on EOS' if answer['stopped_on_eos'] else 'hit the limit'}"
          f", {answer['tokens_per_s']} tokens/s, backend {record['backend']} on {record['device']})")
    timer.done(f"wrote {settings.stage_dir(args.which)}/answers.json")


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
