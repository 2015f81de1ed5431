"""Assertions the end-to-end test files share."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from typing import Any, Callable, Iterator

import pytest

import shmig
from shmig import uffd

# the fault backends (issue 20), for a test to run with each: uffd skipped, with the reason, where
# userfaultfd is not permitted
BACKENDS = ["bitmap", pytest.param("uffd", marks=pytest.mark.skipif(bool(uffd.refused()), reason=uffd.refused()))]


def assert_ok(r: shmig.Report) -> None:
    """Completed, integrity checked, and the report serialises."""
    assert r.ok, f"status={r.status} error={r.error!r} integrity={r.integrity}"
    assert r.to_json()


def proc_of(m: shmig.Migration, title: str) -> Any:
    """The controller's view of the child titled ``title``."""
    (p,) = [p for p in m.procs if p.title == title]
    return p


def assert_all_reaped(m: shmig.Migration) -> None:
    for p in m.procs:
        assert not p.process.is_alive(), f"{p.title} still alive"
        assert p.process.exitcode is not None, f"{p.title} not reaped"


def wait_doing(m: shmig.Migration, delay: float, action: Callable[..., Any], *args: Any) -> tuple[shmig.Report, float]:
    """``m.wait()`` while ``action(*args)`` runs ``delay`` s in: (report, seconds waited); every
    child must be reaped afterwards."""
    timer = threading.Timer(delay, action, args)
    timer.start()
    t0 = time.monotonic()
    try:
        r = m.wait()
    finally:
        timer.cancel()
    assert_all_reaped(m)
    return r, time.monotonic() - t0


@contextlib.contextmanager
def group_reaped(p: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """A program started in its own session: whatever the test does, its whole process group is
    gone (SIGKILL) and it is reaped when the block ends."""
    try:
        yield p
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def interrupt(p: subprocess.Popen, timeout: float = 30) -> tuple[Any, Any]:
    """Ctrl-C as a terminal sends it (SIGINT to the process group); (stdout, stderr) once it exits."""
    os.killpg(p.pid, signal.SIGINT)
    return p.communicate(timeout=timeout)
