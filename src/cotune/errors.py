"""User errors, and the one place that turns them into a clean exit."""
from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """Something the user can fix: printed as `error: <message>` with no traceback, exit status 2."""


def run_main(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run a stage's main; user errors become one line per problem and exit 2, bugs keep their traceback."""
    try:
        main(argv)
    except UserError as err:
        for line in str(err).splitlines() or ["unknown error"]:
            print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted; outputs of this stage were not marked done", file=sys.stderr)
        sys.exit(130)


def warn(message: str) -> None:
    """Every degradation is said aloud, on stderr, behind the same prefix."""
    print(f"WARNING: {message}", file=sys.stderr, flush=True)
