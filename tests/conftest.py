"""Shared fixtures: every test must leave nothing behind (no /dev/shm segment, no child process)."""

from __future__ import annotations

import multiprocessing
import os

import pytest

import shmig
import shmig.memory


def _reap_children(timeout: float = 5.0) -> list[str]:
    """Join every multiprocessing child still known to this process; return those still alive."""
    for p in multiprocessing.active_children():  # active_children() itself reaps finished ones
        p.join(timeout)
    return [f"{p.name} (pid {p.pid})" for p in multiprocessing.active_children()]


@pytest.fixture(autouse=True)
def nothing_left_behind():
    """After each test: /dev/shm holds none of our segments and no child process is left."""
    yield
    alive = _reap_children()
    left = shmig.memory.leftovers()
    assert not alive, f"child processes left alive after the test: {alive}"
    assert not left, f"/dev/shm segments left behind after the test: {left}"


def assert_ok(report: shmig.Report) -> None:
    """A run completed and its destination RAM is exactly what the guest wrote."""
    assert report.ok, (f"status={report.status} error={report.error!r} integrity={report.integrity}")


def lingering_migration_processes() -> list[str]:
    """Command lines of shmig children (mig/..., guest/vcpuN) still alive anywhere on the machine."""
    found = []
    me = os.getpid()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if state == b"Z":
            continue
        if args.startswith(("mig/", "guest/vcpu")):
            found.append(f"{pid}: {args}")
    return found


@pytest.fixture
def ok():
    return assert_ok
