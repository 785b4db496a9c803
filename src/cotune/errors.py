"""User errors, and the one place that turns them into a clean exit."""
from __future__ import annotations

import atexit
import ctypes
import os
import sys
import threading
from typing import Callable


class UserError(Exception):
    """Something the user can fix: printed as `error: <message>` with no traceback, exit status 2."""


def run_main(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run a stage's main; user errors become one line per problem and exit 2, bugs keep their traceback. A stage
    that ended, well or with a user error, leaves through `leave`."""
    try:
        main(argv)
    except UserError as err:
        for line in str(err).splitlines() or ["unknown error"]:
            print(f"error: {line}", file=sys.stderr)
        leave(2)
    except KeyboardInterrupt:
        print("error: interrupted; outputs of this stage were not marked done", file=sys.stderr)
        sys.exit(130)
    leave(0)


def leave(status: int) -> None:
    """Exit with `status` without the interpreter's teardown: the exit handlers run and the output is flushed, but
    the module-by-module freeing of every object is skipped. With torch and transformers loaded it takes about a
    second, for memory the process gives back anyway, and six of the demo's stages load them. Every output is
    already written and closed (atomically) when a stage returns. Where a thread that is not a daemon still runs,
    the usual exit waits for it instead."""
    if any(t.is_alive() and not t.daemon and t is not threading.current_thread() for t in threading.enumerate()):
        sys.exit(status)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader gone or a stream closed: nothing more can reach it
            pass
    try:
        ctypes.CDLL(None).fflush(None)  # what native code (llama.cpp) left in C's stdio buffers
    except (OSError, AttributeError):
        pass
    os._exit(status)


def warn(message: str) -> None:
    """Every degradation is said aloud, on stderr, behind the same prefix."""
    print(f"WARNING: {message}", file=sys.stderr, flush=True)
