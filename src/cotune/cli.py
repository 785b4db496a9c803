"""What every stage script shares: its argument parser, settings resolution and the stage lock."""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Iterator

from .errors import UserError
from .files import clean_stale_temporaries
from .settings import Settings, add_setting_flags, from_args


def stage_parser(doc: str) -> argparse.ArgumentParser:
    summary, _, details = (doc or "").strip().partition("\n")
    parser = argparse.ArgumentParser(description=summary, epilog=details.strip() or None,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setting_flags(parser)
    return parser


def parse_settings(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, Settings]:
    args = parser.parse_args(argv)
    return args, from_args(args)


@contextlib.contextmanager
def stage_lock(stage_dir: Path, stage: str) -> Iterator[None]:
    """One run of a stage per run folder at a time; a second one is refused, not interleaved."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    lock_path = stage_dir / ".lock"
    fh = open(lock_path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise UserError(f"{stage_dir}: another `{stage}` is running on this run folder ({holder}); wait for it "
                        "or use another RUN_DIR") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} since {time.strftime('%H:%M:%S')}")
    fh.flush()
    clean_stale_temporaries(stage_dir)
    try:
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


class StageTimer:
    """Prints how long a stage took, for `make demo`'s closing table."""

    def __init__(self, stage: str):
        self.stage, self.start = stage, time.monotonic()

    def done(self, summary: str) -> None:
        print(f"[{self.stage}] done in {time.monotonic() - self.start:.1f} s: {summary}", flush=True)
