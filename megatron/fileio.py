"""Temporary files that become outputs other users read.

`create_temporary` opens a new file under a unique name for a write-then-rename, with the mode an
ordinary `open()` gives (``0o666`` less the umask, or a directory's default ACL). Not
``tempfile.mkstemp``: its files are mode 0600, so a dataset cache, a corpus or a tokenizer in a shared
directory would be readable by its writer only. The kernel applies the umask here, so the process-wide
umask is never read (only ``os.umask`` can read it, by changing it, racing other threads).

This module sits in the bottom layer: it imports nothing from megatron.
"""

from __future__ import annotations

import os
import secrets


def create_temporary(directory: str | os.PathLike, prefix: str, suffix: str = ".tmp") -> tuple[int, str]:
    """(file descriptor open for writing, path) of a new file `directory/PREFIXrandomSUFFIX`."""
    for _ in range(100):
        path = os.path.join(directory, f"{prefix}{secrets.token_hex(6)}{suffix}")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no unused temporary name in {directory}")
