"""Output files written whole or not at all."""

from __future__ import annotations

import os
import stat
import tempfile
from typing import IO, Any, Callable


def atomic_write(path: str, write: Callable[[IO[Any]], None], binary: bool = False) -> None:
    """``write(f)`` into a temporary file beside ``path``, flushed to disk, then renamed over it:
    a crash or a full disk leaves the previous file intact, never half of a new one.

    Only a regular file (or a new name) is replaced: a device, a FIFO or /dev/stdout is written
    in place, since renaming over one would swap the device for a file."""
    try:
        special = not stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        special = False
    if special:
        with open(path, "wb" if binary else "w") as f:
            write(f)
        return
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".shmig-", dir=d)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
