#!/usr/bin/env python3
"""Verify stage: load the Q8_0 GGUF with llama-cpp-python and prove it answers in the trained form.

Asks the probe question in exactly the training prompt form and passes only if the answer is non-empty, ends on
EOS before the token limit, closes the reasoning section, and the GGUF carries a chat template that renders that
prompt and the tokenizer's EOS id. Writes RUN_DIR/verify/report.json for the run's Q8_0, and
RUN_DIR/verify/others/NAME.json for any other file given with --gguf; exit 1 when a check fails. Needs no torch:
`make verify GGUF=path/to/model.gguf` works on a laptop.
"""
from pathlib import Path

from cotune.cli import StageTimer, parse_settings, stage_lock, stage_parser
from cotune.errors import run_main


def main(argv=None):
    parser = stage_parser(__doc__)
    parser.add_argument("--gguf", type=Path, default=None, help="GGUF file to verify [default: the export's Q8_0]; "
                        "its report goes to RUN_DIR/verify/others/, never over the run's own")
    args, settings = parse_settings(parser, argv)
    timer = StageTimer("verify")
    from cotune.verify import excerpt, run_verify_stage

    with stage_lock(settings.stage_dir("verify"), "verify"):
        report, where = run_verify_stage(settings, args.gguf)
    print(f"GGUF {report['gguf']} ({report['file_type']}, {report['architecture']}, "
          f"{'GPU offload' if report['gpu_offload'] else 'CPU'})\nQ: {report['question']}\n"
          f"A: {excerpt(report['answer'], str(where))}")
    for c in report["checks"]:
        mark = {True: "PASS", False: "FAIL", None: "SKIP"}[c["passed"]]
        print(f"  {mark}  {c['check']}: {c['detail']}")
    timer.done(f"{'PASSED' if report['passed'] else 'FAILED'}; report in {where}")
    if not report["passed"]:
        raise SystemExit(1)


if __name__ == "__main__":
    run_main(main)
