"""Teardown on every bad path: a child killed, a malformed frame, Ctrl-C, kill -9 of everything, a
deadline. Each must end promptly with a failed report (or exit code) that says what happened, with
every child reaped and nothing left in /dev/shm (the autouse fixture in conftest.py checks both)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import shmig
from shmig.plan import Channel
import shmig.memory
from helpers import assert_all_reaped, group_reaped, interrupt, proc_of, wait_doing
from shmig.wire import Msg, pack_frame

MiB = 1024**2
ROLES = ["mig/src", "mig/dst/listen", "mig/dst/preempt", "guest/vcpu0"]


def slow_cfg(**kw) -> shmig.Config:
    """A preempt migration that lasts a few seconds: 64MiB through a 20MiB/s link."""
    base = dict(mode="preempt", ram=64 * MiB, bandwidth=20 * MiB, workload="random", deadline=60,
                precopy_rounds=0)
    base.update(kw)
    return shmig.Config(**base)


def session_processes(sid: int) -> list[str]:
    """Live (non-zombie) processes of session ``sid``, with their command lines."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        state, session = fields[0], int(fields[3])  # after the command: state, ppid, pgrp, session
        if session == sid and state not in (b"Z", b"X"):
            found.append(f"{pid}: {args}")
    return found


def migration_processes(sid: int) -> list[str]:
    """shmig children (command line mig/... or guest/vcpuN) still alive in session ``sid``."""
    return [p for p in session_processes(sid) if p.split(": ", 1)[1].startswith(("mig/", "guest/vcpu"))]


def wait_until(cond, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


# -- a child dies ---------------------------------------------------------------------------------

KILLS = ([(r, signal.SIGKILL, 0.5) for r in ROLES] + [(r, signal.SIGKILL, 0.0) for r in ROLES]
         + [("mig/src", signal.SIGTERM, 0.5), ("guest/vcpu0", signal.SIGTERM, 0.5)])


@pytest.mark.timeout(30)
@pytest.mark.parametrize("role,sig,delay", KILLS,
                         ids=[f"{r}-{s.name}-{'setup' if d == 0 else 'running'}" for r, s, d in KILLS])
def test_child_killed(role, sig, delay, shm_leftovers):
    m = shmig.Migration(slow_cfg()).start()
    r, _ = wait_doing(m, delay, os.kill, proc_of(m, role).process.pid, sig)
    assert r.status == "failed" and not r.ok
    assert r.error and "deadline" not in r.error, r.error  # the death ended it, not the 60 s deadline
    assert r.error in r.summary()
    assert_all_reaped(m)
    assert not shm_leftovers()
    assert role in r.error, r.error
    assert f"killed by signal {int(sig)}" in r.error, r.error


@pytest.mark.timeout(30)
def test_killed_cause_wins_over_its_consequences():
    """Deterministic form of the race test_child_killed sometimes hits: kill mig/src while the
    controller is not looking, let mig/dst/listen notice and report, then wait()."""
    m = shmig.Migration(slow_cfg()).start()
    try:
        time.sleep(0.5)
        os.kill(proc_of(m, "mig/src").process.pid, signal.SIGKILL)
        assert wait_until(lambda: not proc_of(m, "mig/dst/listen").process.is_alive(), 10)
    finally:
        r = m.wait()
    assert_all_reaped(m)
    assert r.status == "failed"
    assert "mig/src" in r.error and "killed by signal 9" in r.error, r.error


# -- malformed frames -----------------------------------------------------------------------------

def inject(m: shmig.Migration, title: str, channel: str, data: bytes) -> None:
    """Write raw bytes into one of a child's pipes (through /proc, as a second writer)."""
    p = proc_of(m, title)
    fd = os.open(f"/proc/{p.process.pid}/fd/{p.channels[Channel(channel)]}", os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


GARBAGE = {
    # the postcopy channel is quiet during precopy: whatever is written there is the next frame
    "postcopy-garbage": ("mig/dst/preempt", "postcopy", b"\xff" * 64, "malformed frame"),
    "postcopy-unknown-kind": ("mig/dst/preempt", "postcopy", pack_frame(99, ()), "unknown frame"),
    "postcopy-bad-pages": ("mig/dst/preempt", "postcopy",
                           pack_frame(Msg.PAGES, (b"\0\0\0\0", None, True), b"x" * 10), "inconsistent PAGES"),
    "postcopy-unexpected": ("mig/dst/preempt", "postcopy", pack_frame(Msg.PING, ()), "unexpected PING"),
    "fault-out-of-ram": ("mig/dst/listen", "fault", pack_frame(Msg.FAULT, (0, 10**9)), "outside RAM"),
}


def run_injecting(cfg: shmig.Config, title: str, channel: str, data: bytes) -> tuple[shmig.Report, float]:
    """Run ``cfg`` and, 0.3 s in, write ``data`` into ``title``'s ``channel``: (report, seconds)."""
    m = shmig.Migration(cfg).start()
    return wait_doing(m, 0.3, inject, m, title, channel, data)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", list(GARBAGE))
def test_malformed_frame_stops_the_run(case):
    title, channel, data, words = GARBAGE[case]
    r, seconds = run_injecting(slow_cfg(precopy_rounds=None), title, channel, data)
    assert seconds < 10
    assert r.status == "failed"
    assert title in r.error and channel in r.error and words in r.error, r.error


@pytest.mark.timeout(30)
def test_bad_request_on_return_path_during_postcopy():
    r, seconds = run_injecting(slow_cfg(precopy_rounds=0), "mig/src", "return", pack_frame(Msg.REQ, (10**9, 4096)))
    assert seconds < 10
    assert r.status == "failed"
    assert "mig/src" in r.error and "return path" in r.error and "outside RAM" in r.error, r.error


@pytest.mark.timeout(30)
def test_bad_request_on_return_path_during_precopy():
    r, _ = run_injecting(slow_cfg(precopy_rounds=None), "mig/src", "return", pack_frame(Msg.REQ, (10**9, 4096)))
    assert r.status == "failed"
    assert "return path" in r.error and "deadline" not in r.error, r.error  # found at once, not at the deadline


@pytest.mark.timeout(30)
def test_unknown_control_message():
    m = shmig.Migration(slow_cfg(precopy_rounds=None)).start()
    try:
        time.sleep(0.3)
        m.procs[0].ctrl_out.send(Msg.CTRL, ("bogus", None))
    finally:
        r = m.wait()
    assert r.status == "failed"
    assert "mig/src" in r.error and "bogus" in r.error, r.error
    assert_all_reaped(m)


# -- Ctrl-C and kill -9 of the whole CLI ----------------------------------------------------------

CLI = [sys.executable, "-m", "shmig", "run", "--mode", "preempt", "--ram", "64MiB", "--bandwidth", "20MiB/s"]


@pytest.mark.timeout(40)
@pytest.mark.parametrize("rounds", ["1", "0"], ids=["in-precopy", "in-postcopy"])
def test_ctrl_c_cli(rounds, shm_leftovers):
    p = subprocess.Popen(CLI + ["--precopy-rounds", rounds], start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with group_reaped(p):
        time.sleep(1.0)
        assert p.poll() is None, p.communicate()
        out, err = interrupt(p, timeout=20)
    assert p.returncode == 130, (p.returncode, out, err)
    assert b"interrupted" in out + err, (out, err)
    assert wait_until(lambda: not session_processes(p.pid), 5), session_processes(p.pid)
    assert not migration_processes(p.pid)
    assert not shm_leftovers()


def _own_segments(pid: int) -> list[str]:
    return [n for n in shmig.memory.leftovers() if n.startswith(f"{shmig.memory.PREFIX}{pid}-")]


@pytest.mark.timeout(40)
@pytest.mark.parametrize("when", ["during-setup", "running"])
def test_kill_9_process_group(when, shm_leftovers):
    """kill -9 of the CLI and all its children. Killed while it sets up, its segments are still
    named in /dev/shm (nobody could unlink them): the next run must sweep them."""
    p = subprocess.Popen(CLI, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if when == "during-setup":  # the moment its first segment appears
            assert wait_until(lambda: _own_segments(p.pid) or p.poll() is not None, 20)
        else:
            time.sleep(1.0)
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
    assert p.returncode == -signal.SIGKILL
    # every child died with the group (and PR_SET_PDEATHSIG would have killed any straggler)
    assert wait_until(lambda: not migration_processes(p.pid), 5), migration_processes(p.pid)
    if when == "during-setup":
        assert _own_segments(p.pid), "killed too late to leave segments behind"
    r = shmig.run(shmig.Config(mode="preempt", ram=8 * MiB, precopy_rounds=0, deadline=30))
    assert r.ok, r.error
    assert not _own_segments(p.pid), "the next run did not remove the killed run's segments"
    assert not shm_leftovers()


@pytest.mark.timeout(30)
def test_next_run_sweeps_stale_segments():
    """A segment named after a dead owner (a run killed before it could unlink) is removed by the
    next run; a segment of a live owner is left alone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = os.path.join(shmig.memory.SHM_DIR, f"{shmig.memory.PREFIX}{dead.pid}-deadbeef-src")
    with open(stale, "wb") as f:
        f.write(b"\0" * 4096)
    try:
        assert os.path.basename(stale) in shmig.memory.leftovers()
        r = shmig.run(shmig.Config(mode="vanilla", ram=8 * MiB, precopy_rounds=0, deadline=30))
        assert r.ok, r.error
        assert not os.path.exists(stale), "the next run did not sweep a dead owner's segment"
    finally:
        if os.path.exists(stale):
            os.unlink(stale)


# -- the deadline ---------------------------------------------------------------------------------

@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode,precopy_rounds", [("preempt", 1), ("preempt", 0), ("precopy", 1)],
                         ids=["preempt-in-precopy", "preempt-in-postcopy", "precopy"])
def test_deadline(mode, precopy_rounds):
    c = shmig.Config(mode=mode, ram=64 * MiB, bandwidth=5 * MiB, deadline=1.5, precopy_rounds=precopy_rounds)
    r = shmig.run(c)  # the test's timeout is the guard against a teardown that hangs
    assert r.status == "failed" and not r.ok
    assert "deadline" in r.error, r.error
    # who was doing what: every live process, with its status after a colon
    names = ["mig/src", "mig/dst/listen", "guest/vcpu0"] + (["mig/dst/preempt"] if mode != "precopy" else [])
    for n in names:
        assert f"{n}: " in r.error, r.error
    assert ("precopy" if precopy_rounds else "postcopy") in r.error, r.error
