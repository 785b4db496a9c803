#!/usr/bin/env python3
"""Export stage: merge the LoRA adapter, convert to GGUF with llama.cpp's converter, quantize.

Reads RUN_DIR/train/adapter; writes RUN_DIR/export/merged/ (HF folder whose chat template renders the training
prompt) and <name>-Q8_0.gguf, plus the other types GGUF_QUANTS asks for (src/cotune/quants.py lists them). The merged
weights go to the converter in memory and are quantized on every core. Needs no network and no llama.cpp build.
"""
from cotune.cli import StageTimer, parse_settings, stage_lock, stage_parser
from cotune.errors import run_main


def main(argv=None):
    _, settings = parse_settings(stage_parser(__doc__), argv)
    timer = StageTimer("export")
    from cotune.export import run_export_stage

    with stage_lock(settings.stage_dir("export"), "export"):
        record = run_export_stage(settings)
    print(f"merged into {record['merge']['merged_into']}")
    for quant, info in record["ggufs"].items():
        print(f"{quant}: {settings.run_path / info['path']} ({info['bytes'] / 2**20:.1f} MiB, "
              f"sha256 {info['sha256'][:16]}...)")
    print("seconds: " + ", ".join(f"{step} {s:.1f}" for step, s in record["seconds"].items()))
    timer.done(f"{len(record['ggufs'])} GGUF file(s) in {settings.stage_dir('export')}")


if __name__ == "__main__":
    run_main(main)
