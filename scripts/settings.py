#!/usr/bin/env python3
"""Settings helper for the Makefile: check the resolved settings, print one, or write a stage's settings stamp.

  settings.py check              resolve and validate; one line per problem, exit 2
  settings.py get NAME           print one resolved setting (run_dir, ...); never a secret
  settings.py names              the UPPER_CASE names of every setting
  settings.py stamp STAGE FILE   keep FILE (RUN/.stamps/STAGE.json) older than the stage's record when the record was
                                 made with the settings and inputs asked for now, newer when not
  settings.py env-example        print the text of .env.example
"""
import argparse
import sys
from pathlib import Path

from cotune.errors import UserError, run_main


def main(argv=None):
    from cotune.settings import FIELDS, STAGE_SETTINGS, env_name, example_env, resolve

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("check")
    commands.add_parser("get").add_argument("name")
    commands.add_parser("names")
    stamp = commands.add_parser("stamp")
    stamp.add_argument("stage", choices=sorted(STAGE_SETTINGS))
    stamp.add_argument("file", type=Path)
    commands.add_parser("env-example")
    args = parser.parse_args(argv)
    if args.command == "names":
        print(" ".join(env_name(n) for n in FIELDS))
        return
    if args.command == "env-example":
        sys.stdout.write(example_env())
        return
    if args.command == "get":
        name = args.name.lower()
        if name not in FIELDS:
            raise UserError(f"{args.name}: no such setting (see .env.example)")
        if FIELDS[name].metadata["secret"]:
            raise UserError(f"{env_name(name)} is a secret; it is read from .env or the environment and never printed")
    settings = resolve()
    if args.command == "get":
        value = getattr(settings, args.name.lower())
        print(",".join(value) if isinstance(value, list) else value)
    elif args.command == "stamp":
        from cotune.files import write_stage_stamp

        run = args.file.parent.parent if args.file.parent.name == ".stamps" else settings.run_path
        write_stage_stamp(run, args.stage, settings, args.file)


if __name__ == "__main__":
    run_main(main)
