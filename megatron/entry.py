"""The error handling the command-line tools share (`tools/*.py`).

A user's mistake reaches a tool as a `ValueError` (a missing file, a bad flag value, an inconsistent
checkpoint) with a message written for the user; `run_tool` prints that message as one `error:` line
instead of a traceback and returns exit status 2, argparse's status for bad usage.
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

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


def os_error_text(error: OSError) -> str:
    """'No space left on device (ENOSPC)': an OSError's reason and errno name, without the traceback."""
    name = errno.errorcode.get(error.errno, f"errno {error.errno}") if error.errno is not None else None
    return f"{error.strerror or error}" + (f" ({name})" if name else "")


def check_writable_directory(directory: str | os.PathLike, label: str) -> None:
    """ValueError `LABEL: cannot write in DIRECTORY: REASON (ERRNO)` when no file can be created in
    `directory` (read-only, no permission, full): a tool fails before its work, not after it. A
    directory still to be created is checked at its nearest existing parent, where it would be."""
    directory = Path(directory)
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise ValueError(f"{label}: cannot write in {directory}: {os_error_text(error)}") from None
