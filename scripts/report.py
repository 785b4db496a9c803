#!/usr/bin/env python3
"""Report stage: one self-contained HTML page (and a Markdown twin) on whether the fine-tune works and the GGUF
keeps it.

Held-out loss and perplexity before/after, the probe question answered by the base model, the fine-tuned model
and the Q8_0 GGUF side by side, format adherence on held-out questions, teacher-forced top-1 agreement of each GGUF
with the merged model (and |Δlogit| against the F16 GGUF where one was written), settings, versions and hashes. Writes
RUN_DIR/report/{report.html,report.md,report.json,loss.png}.
"""
from cotune.cli import StageTimer, parse_settings, stage_lock, stage_parser
from cotune.errors import run_main


def main(argv=None):
    _, settings = parse_settings(stage_parser(__doc__), argv)
    timer = StageTimer("report")
    from cotune.report import run_report_stage

    with stage_lock(settings.stage_dir("report"), "report"):
        report = run_report_stage(settings)
    for quant, entry in report["fidelity"]["per_gguf"].items():
        print(f"{quant}: top-1 agreement with the merged model {entry['top1_agreement_with_merged']:.4f} "
              f"over {report['fidelity']['positions']} positions")
    timer.done(f"report in {settings.stage_dir('report')}/report.html")


if __name__ == "__main__":
    run_main(main)
