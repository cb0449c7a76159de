"""The error handling the command-line tools share (`tools/*.py`).

A user's mistake reaches a tool as a `ValueError` (a missing file, a bad flag value, an inconsistent
checkpoint) with a message written for the user; `run_tool` prints that message as one `error:` line
instead of a traceback and returns exit status 2, argparse's status for bad usage.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

USER_ERROR_STATUS = 2


def run_tool(action: Callable[[], int | None]) -> int:
    """Run `action()` and return its exit status (None counts as 0, as for `sys.exit`); when it raises
    ValueError, print `error: MESSAGE` on stderr and return USER_ERROR_STATUS."""
    try:
        status = action()
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return USER_ERROR_STATUS
    return 0 if status is None else status
