"""File descriptors: pipes, eventfds and the few syscalls every process uses on them, in one place.

A channel is a pipe (the network of this emulation), sized with ``F_SETPIPE_SZ`` as far as the
kernel lets an unprivileged process (``/proc/sys/fs/pipe-max-size``, 1 MiB here without
CAP_SYS_RESOURCE); a wake-up is an eventfd. Nothing here knows about frames or the link.
"""

from __future__ import annotations

import fcntl
import os
from typing import Iterable


def pipe_max() -> int:
    """The largest pipe an unprivileged process may make (``/proc/sys/fs/pipe-max-size``)."""
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            return int(f.read())
    except OSError:
        return 1 << 20


def make_pipe(size: int | None = None) -> tuple[int, int]:
    """A pipe holding ``size`` bytes if the kernel lets us (beyond pipe-max-size needs
    CAP_SYS_RESOURCE), else as much as it allows; a receiver reads ahead for the rest."""
    r, w = os.pipe()
    if size:
        for want in (size, min(size, pipe_max())):
            try:
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, want)
                break
            except OSError:
                continue
    return r, w


def pipe_size(fd: int) -> int:
    """What a pipe holds (``F_GETPIPE_SZ``)."""
    return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)


def new_eventfd() -> int:
    """A non-blocking eventfd, closed on exec: every wake-up object of a run."""
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def shutdown_pipe(fd: int, write_end: bool) -> None:
    """QEMU's qemu_file_shutdown for a pipe end: from now on ``fd`` reads EOF or writes EPIPE, and the
    peer sees the channel close once no syscall still holds the old end. ``dup2`` swaps the file
    under the descriptor atomically, so another thread using ``fd`` never sees it closed or reused."""
    r, w = os.pipe()
    dead, other = (w, r) if write_end else (r, w)
    os.close(other)
    os.dup2(dead, fd, inheritable=False)
    os.close(dead)


def writev_all(fd: int, bufs: list, total: int | None = None) -> int:
    """``writev`` that finishes partial writes (a pipe write larger than its capacity may be split)."""
    if total is not None:  # the common case, one call whole: no views made
        n = os.writev(fd, bufs)
        if n == total:
            return total
        views = [memoryview(b).cast("B") for b in bufs]
    else:
        views = [memoryview(b).cast("B") for b in bufs]
        total = sum(v.nbytes for v in views)
        n = os.writev(fd, views)
    left = total - n
    while left:
        i = 0
        while n >= views[i].nbytes:
            n -= views[i].nbytes
            i += 1
        views = [views[i][n:], *views[i + 1:]]
        n = os.writev(fd, views)
        left -= n
    return total


def close_fds(fds: Iterable[int]) -> None:
    """Close every descriptor; one already closed (or never valid) is not an error here."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def drain_eventfd(efd: int) -> None:
    """Reset a non-blocking eventfd: the wake-ups it counted so far are consumed (or there were none)."""
    try:
        os.eventfd_read(efd)
    except BlockingIOError:
        pass
