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


def _owner_alive_elsewhere(name: str) -> bool:
    """A segment of a run still going in another live process (someone else's test run on the same
    machine): not something this test left behind."""
    pid = shmig.memory.segment_owner(name)
    return pid is not None and pid != os.getpid() and shmig.memory.pid_alive(pid)


def our_leftovers() -> list[str]:
    """shmig.memory.leftovers(), minus segments of runs alive in other processes (on CI nothing
    else runs at the same time, and this is exactly leftovers())."""
    return [n for n in shmig.memory.leftovers() if not _owner_alive_elsewhere(n)]


@pytest.fixture(autouse=True)
def nothing_left_behind():
    """After each test: /dev/shm holds none of our segments and no child process is left."""
    yield
    alive = _reap_children()
    left = our_leftovers()
    assert not alive, f"child processes left alive after the test: {alive}"
    assert not left, f"/dev/shm segments left behind after the test: {left}"


@pytest.fixture
def shm_leftovers():
    """The leftover check itself, for tests that look in the middle (e.g. after killing a CLI)."""
    return our_leftovers
