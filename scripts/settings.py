#!/usr/bin/env python3
"""Settings helper for the Makefile: check the resolved settings, print one, or write a stage's settings stamp.

  settings.py check              resolve and validate; one line per problem, exit 2
  settings.py get NAME           print one resolved setting (run_dir, ...)
  settings.py names              the UPPER_CASE names of every setting
  settings.py stamp STAGE FILE   write what decides STAGE's outputs to FILE, touching it only when that changed
  settings.py env-example        print the text of .env.example
"""
import argparse
import json
import sys
from pathlib import Path

from cotune.errors import run_main

STAGE_GROUPS = {
    "data": ("data", "model", "train"),  # train: SEED picks the carved held-out rows
    "baseline": ("data", "model", "ask"),
    "train": ("data", "model", "lora", "train"),
    "after": ("data", "model", "lora", "train", "ask"),
    "export": ("data", "model", "lora", "train", "export"),
    "verify": ("data", "model", "lora", "train", "export", "ask"),
    "report": ("data", "model", "lora", "train", "export", "ask"),
}


def stamp_content(settings, stage: str) -> str:
    from cotune.data import dataset_location
    from cotune.files import sha256_file

    inputs = {}
    location = dataset_location(settings.dataset)
    if location is not None and location.is_file():
        inputs["dataset_sha256"] = sha256_file(location)
    if Path(settings.template).is_file():
        inputs["template_sha256"] = sha256_file(Path(settings.template))
    return json.dumps({"settings": settings.fingerprint(*STAGE_GROUPS[stage]), **inputs}, indent=1, sort_keys=True)


def main(argv=None):
    from cotune.settings import FIELDS, env_name, example_env, resolve

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("check", "get", "names", "stamp", "env-example"))
    parser.add_argument("args", nargs="*")
    args = parser.parse_args(argv)
    if args.command == "names":
        print(" ".join(env_name(n) for n in FIELDS))
        return
    if args.command == "env-example":
        sys.stdout.write(example_env())
        return
    settings = resolve()
    if args.command == "get":
        print(getattr(settings, args.args[0]))
    elif args.command == "stamp":
        stage, path = args.args[0], Path(args.args[1])
        content = stamp_content(settings, stage)
        if not path.is_file() or path.read_text() != content:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)


if __name__ == "__main__":
    run_main(main)
