"""shmig.memory: segments in /dev/shm, their cleanup, the status rows and the dirty log."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading
import time
from multiprocessing import resource_tracker, shared_memory

import numpy as np
import pytest

from shmig import memory
from shmig.config import Config
from shmig.memory import STATUS_LEN, GuestMemory, leftovers, sweep_stale
from shmig.plan import Plan
from shmig.ramstate import DirtyLog

MiB = 1024**2


def guest_memory(cfg: Config) -> GuestMemory:
    """The memory of a run of ``cfg``: one status row per process of its plan."""
    return GuestMemory(cfg, Plan.of(cfg.vcpus, preempt_channel=True, data_channel_bytes=1 << 16).slots)



def mine() -> list[str]:
    return [n for n in leftovers() if n.startswith(f"shmig-{os.getpid()}-")]


@pytest.fixture
def mem():
    m = guest_memory(Config(ram=1 * MiB, vcpus=2, prefault=False))
    yield m
    m.close()


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def make_segment(name: str) -> None:
    """A segment as a killed run would leave it: created, never unlinked, not tracked by us."""
    shm = shared_memory.SharedMemory(name=name, create=True, size=4096)
    resource_tracker.unregister(shm._name, "shared_memory")
    shm.close()


def remove_segment(name: str) -> None:
    try:
        os.unlink(os.path.join(memory.SHM_DIR, name))
    except FileNotFoundError:
        pass


# --- segments -----------------------------------------------------------------------

def test_segments_are_visible_with_the_owner_prefix(mem):
    names = mine()
    assert len(names) == 3
    assert all(n.startswith(mem.token) for n in names)
    assert mem.token.startswith(f"shmig-{os.getpid()}-")
    assert sorted(n.rsplit("-", 1)[1] for n in names) == ["dst", "src", "state"]
    assert os.path.getsize(os.path.join(memory.SHM_DIR, f"{mem.token}-src")) == MiB
    assert os.path.getsize(os.path.join(memory.SHM_DIR, f"{mem.token}-dst")) == MiB


def test_two_runs_do_not_collide():
    a = guest_memory(Config(ram=MiB, prefault=False))
    try:
        b = guest_memory(Config(ram=MiB, prefault=False))
        try:
            assert a.token != b.token
            assert len(mine()) == 6
        finally:
            b.close()
    finally:
        a.close()


def test_unlink_removes_names_but_arrays_stay_usable(mem):
    mem.src[:] = 7
    mem.unlink()
    assert mine() == []
    mem.src[::4096] = 9
    mem.dst[:] = mem.src
    assert mem.dst[0] == 9 and mem.dst[1] == 7 and int(mem.dst.sum()) == 7 * MiB + 2 * 256
    mem.dirty[1, 3] += 1
    assert mem.dirty[1, 3] == 1
    mem.unlink()  # twice is fine
    mem.close()
    assert mine() == []


def test_close_leaves_nothing_and_is_idempotent():
    m = guest_memory(Config(ram=MiB, prefault=False))
    assert len(mine()) == 3
    m.close()
    assert mine() == []
    for view in ("src", "dirty"):  # a clear error after close, never a read of unmapped memory
        with pytest.raises(RuntimeError, match="guest memory is closed"):
            getattr(m, view)
    m.close()


def test_prefault_populates_and_zeroes():
    m = guest_memory(Config(ram=4 * MiB, prefault=True))
    try:
        assert not m.src.any() and not m.dst.any()
        m.dst[-1] = 1
    finally:
        m.close()


def test_failed_creation_cleans_up(monkeypatch):
    real = shared_memory.SharedMemory
    calls = []

    def flaky(name, create, size):
        calls.append(name)
        if name.endswith("-state"):
            raise OSError(28, "No space left on device")
        return real(name, create=create, size=size)

    monkeypatch.setattr(memory.shared_memory, "SharedMemory", flaky)
    with pytest.raises(OSError):
        guest_memory(Config(ram=MiB, prefault=False))
    assert len(calls) == 3
    assert mine() == []


def test_layout(mem):
    cfg = mem.cfg
    n = cfg.npages
    assert mem.src.shape == mem.dst.shape == (cfg.ram,)
    assert mem.pages(mem.src).shape == (n, 4096)
    assert np.shares_memory(mem.pages(mem.src), mem.src)
    assert mem.dirty.shape == (cfg.vcpus, n) and mem.dirty.dtype == np.uint32
    assert mem.received.shape == (n,) and mem.received.dtype == np.uint8
    assert mem.stamps.shape == (cfg.vcpus, n) and mem.stamps.dtype == np.uint64
    assert mem.wait.shape == (cfg.vcpus, 2) and (mem.wait[:, 0] == -1).all()
    assert mem.status.shape[1] == STATUS_LEN and mem.status.shape[0] >= cfg.vcpus + 3
    # the state arrays do not overlap: each keeps its own pattern
    arrays = ["ctl", "wait", "link", "status", "stamps", "dirty", "received"]
    for i, name in enumerate(arrays):
        getattr(mem, name)[...] = i + 1
    for i, name in enumerate(arrays):
        assert (getattr(mem, name) == i + 1).all(), name
        assert getattr(mem, name).ctypes.data % getattr(mem, name).itemsize == 0, f"{name} misaligned"
    # and the two RAM copies are separate
    mem.src[:] = 1
    assert not mem.dst.any()


# --- stale segments -------------------------------------------------------------------

def test_sweep_stale_removes_dead_owners_and_keeps_live_ones():
    dead = f"shmig-{dead_pid()}-test-x"
    live_proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    live = f"shmig-{live_proc.pid}-test-y"
    own = f"shmig-{os.getpid()}-test-z"
    odd = "shmig-notapid-test-w"
    try:
        for name in (dead, live, own, odd):
            make_segment(name)
        removed = sweep_stale()
        assert dead in removed
        assert live not in removed and own not in removed and odd not in removed
        present = set(leftovers())
        assert dead not in present
        assert {live, own, odd} <= present
        # once its owner is gone, the next sweep takes it
        live_proc.kill()
        live_proc.wait()
        assert live in sweep_stale()
        assert live not in leftovers()
    finally:
        live_proc.kill()
        live_proc.wait()
        for name in (dead, live, own, odd):
            remove_segment(name)
    assert not {dead, live, own, odd} & set(leftovers())


def test_sweep_stale_ignores_other_names():
    name = f"notshmig-{dead_pid()}-x"
    make_segment(name)
    try:
        assert name not in sweep_stale()
        assert os.path.exists(os.path.join(memory.SHM_DIR, name))
    finally:
        remove_segment(name)


def test_sweep_stale_spares_a_live_run(mem):
    assert not any(n.startswith(mem.token) for n in sweep_stale())
    assert len(mine()) == 3


# --- status rows ------------------------------------------------------------------------

def test_status_round_trip(mem):
    for proc in range(mem.status.shape[0]):
        assert mem.get_status(proc) == ""
    mem.set_status(0, "waiting for the return path (REQ)")
    mem.set_status(1, "placing host page 12 — µ")
    assert mem.get_status(0) == "waiting for the return path (REQ)"
    assert mem.get_status(1) == "placing host page 12 — µ"
    mem.set_status(0, "short")  # a shorter text clears the rest of the row
    assert mem.get_status(0) == "short"
    mem.set_status(2, "x" * 500)
    assert mem.get_status(2) == "x" * STATUS_LEN
    mem.set_status(2, "")
    assert mem.get_status(2) == ""


def test_status_visible_from_a_forked_child(mem):
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=mem.set_status, args=(3, "vcpu 1 faulted on host page 5"))
    p.start()
    p.join(10)
    assert p.exitcode == 0
    assert mem.get_status(3) == "vcpu 1 faulted on host page 5"


# --- the dirty log ---------------------------------------------------------------------

STARTED, COMPLETED, STOP = 0, 1, 2


def writer(mem: GuestMemory, seed: int, nwrites: int, vcpu: int = 0, pages=None) -> None:
    """A guest's vCPU: write a page (stamp = its new counter value), then bump its own dirty counter."""
    if pages is None:
        pages = np.random.default_rng(seed).integers(0, mem.cfg.npages, nwrites)
    src = mem.pages(mem.src).view(np.uint64)
    ctl = mem.ctl
    dirty = mem.dirty[vcpu]
    for j, p in enumerate(pages):
        if ctl[STOP]:
            break
        ctl[STARTED] = j + 1
        stamp = int(dirty[p]) + 1
        src[p, :] = stamp  # data first ...
        dirty[p] += 1  # ... then the counter
        ctl[COMPLETED] = j + 1


def check_sync(mem: GuestMemory, seed: int, nwrites: int, start, done, pause=lambda: None) -> int:
    """Start the writer (vCPU 0), collect the dirty log repeatedly; return how many writes were checked."""
    pages = np.random.default_rng(seed).integers(0, mem.cfg.npages, nwrites)
    src = mem.pages(mem.src).view(np.uint64)
    ctl = mem.ctl
    log = DirtyLog(mem.dirty)
    started_after_prev = int(ctl[STARTED])  # writes with index >= this began after the last collect
    start()  # only now: every write happens after the first collect, so some are always checked
    checked = 0
    while True:
        finished = done()
        completed = int(ctl[COMPLETED])  # writes with index < this ended before the next collect
        changed = log.collect()
        # the counter never runs ahead of the data: a page's content is at least as new as its counter
        assert (src[changed, 0] >= log.last[0, changed]).all()
        # no lost write: every page written between the two collects is reported dirty
        between = pages[started_after_prev:completed]
        if between.size:
            lost = between[~changed[between]]
            assert lost.size == 0, f"writes to pages {lost[:10]} not seen by the sync"
            checked += between.size
        started_after_prev = int(ctl[STARTED])
        if finished:
            return checked
        pause()


@pytest.mark.timeout(30)
def test_dirty_log_sync_loses_no_write_thread(mem):
    nwrites = 5_000
    t = threading.Thread(target=writer, args=(mem, 1, nwrites), daemon=True)
    checked = check_sync(mem, 1, nwrites, t.start, lambda: not t.is_alive(), pause=lambda: time.sleep(0.0002))
    t.join()
    assert int(mem.ctl[COMPLETED]) == nwrites
    assert int(mem.dirty.sum()) == nwrites
    assert checked > 0


@pytest.mark.timeout(30)
def test_dirty_log_sync_loses_no_write_process(mem):
    nwrites = 100_000
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=writer, args=(mem, 2, nwrites), daemon=True)
    try:
        checked = check_sync(mem, 2, nwrites, p.start, lambda: not p.is_alive())
    finally:
        mem.ctl[STOP] = 1
        p.join(10)
    assert p.exitcode == 0
    assert int(mem.ctl[COMPLETED]) == nwrites
    assert int(mem.dirty.sum()) == nwrites
    # the final counters say exactly how often each page was written, and the data agrees
    pages = np.random.default_rng(2).integers(0, mem.cfg.npages, nwrites)
    counts = np.bincount(pages, minlength=mem.cfg.npages)
    assert np.array_equal(mem.dirty[0], counts)
    src = mem.pages(mem.src).view(np.uint64)
    assert np.array_equal(src[:, 0], counts)
    assert checked > 0


@pytest.mark.timeout(60)
def test_two_vcpus_on_the_same_pages_lose_no_count(mem):
    """Issue 22 #11: two vCPUs dirtying the same pages at once. With one shared counter per page
    their read-modify-writes raced and a write could go unseen by the next sync; each vCPU has
    its own row now, so every write is counted and every collect sees it."""
    nwrites = 60_000
    hot = np.tile(np.arange(8), nwrites // 8)  # both vCPUs hammer the same eight pages
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=writer, args=(mem, 0, nwrites, v, hot), daemon=True) for v in (0, 1)]
    log = DirtyLog(mem.dirty)
    for p in procs:
        p.start()
    seen = 0
    while any(p.is_alive() for p in procs):
        seen += int(log.collect()[:8].sum())
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    assert int(mem.dirty.sum()) == 2 * nwrites  # not one increment lost
    assert np.array_equal(mem.dirty[0], mem.dirty[1])
    assert seen > 0


def test_sweep_leaves_another_pid_namespace_alone():
    """Issue 22: a pid means nothing outside its namespace (a container sharing /dev/shm), so a
    segment named in another namespace is never taken for a dead owner's."""
    ns = memory.pid_namespace()
    foreign = f"shmig-{dead_pid()}-ns{ns + 1}-test-f"
    ours = f"shmig-{dead_pid()}-ns{ns}-test-o"
    try:
        for name in (foreign, ours):
            make_segment(name)
        swept = memory.sweep()
        assert ours in swept.removed
        assert foreign in swept.foreign and foreign not in swept.removed
        assert foreign in leftovers()
    finally:
        for name in (foreign, ours):
            remove_segment(name)


def test_segments_carry_the_pid_namespace(mem):
    assert memory.segment_namespace(mine()[0]) == memory.pid_namespace()
    assert memory.segment_owner(mine()[0]) == os.getpid()


def test_clean_reports_what_it_could_not_remove(capsys, monkeypatch):
    """A dead owner's segment that cannot be unlinked (another user's, in sticky /dev/shm) is
    reported as such, not as a live owner's."""
    from shmig import cli
    stuck = f"shmig-{dead_pid()}-test-s"
    real_unlink = os.unlink

    def unlink(path, *a, **kw):
        if os.path.basename(str(path)) == stuck:
            raise PermissionError(1, "Operation not permitted", path)
        return real_unlink(path, *a, **kw)
    make_segment(stuck)
    try:
        monkeypatch.setattr(os, "unlink", unlink)
        assert cli.main(["clean"]) == 0
        monkeypatch.undo()
        out = capsys.readouterr().out
        assert f"could not remove (permission): {stuck}" in out
        assert not [line for line in out.splitlines() if "owner alive" in line and stuck in line]
    finally:
        monkeypatch.undo()
        remove_segment(stuck)
