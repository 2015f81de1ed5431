"""Whole runs with multifd channels (QEMU 10.1's multifd together with postcopy): every mode that
exists alongside multifd completes with destination RAM intact at 4 KiB and 2 MiB host pages;
the flush comes before the VM stops and the destination loads nothing behind it until every
channel is synced; zero pages are found and written where QEMU finds and writes them."""

from __future__ import annotations

import os
import signal

import pytest

import shmig
from shmig.config import ConfigError
from shmig.control import Ev
from shmig.plan import Kind

from helpers import BACKENDS, assert_ok

BASE = dict(ram=16 << 20, bandwidth=1e9 / 8, seed=3, deadline=60.0)


def run(**kw: object) -> tuple[shmig.Report, shmig.Migration]:
    m = shmig.Migration(shmig.Config(**{**BASE, **kw})).start()  # type: ignore[arg-type]
    try:
        return m.wait(), m
    finally:
        m.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("host_page", [4096, 2 << 20])
@pytest.mark.parametrize("mode,extra", [("precopy", {"max_rounds": 2}), ("vanilla", {}), ("preempt-full", {}),
                                        ("preempt-full", {"page_hint": True})])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_mode_over_four_channels_keeps_ram_intact(mode: str, extra: dict, host_page: int, backend: str) -> None:
    rep, m = run(mode=mode, host_page=host_page, multifd_channels=4, vcpus=2, fault_backend=backend, **extra)
    assert_ok(rep)
    mf = rep.multifd
    assert mf["channels"] == 4 and len(mf["channel_bytes"]) == 4
    assert all(b > 0 for b in mf["channel_bytes"]), mf  # multifd_send spreads packets over every channel
    # SYNC packets counted on both sides; the end of each channel only by its receiver (QEMU just
    # closes a multifd channel: nothing to count)
    assert 0 <= sum(mf["channel_bytes"]) - rep.ram["multifd_bytes"] <= 4 * 64
    assert [rep.ram["channel_bytes"][f"multifd{i}"] for i in range(4)] == mf["channel_bytes"]
    # precopy pages never go on the main channel: it carries postcopy's background pages only
    if mode == "precopy":
        assert rep.ram["channel_bytes"]["precopy"] == 0
    assert sorted(p.role.title for p in m.procs if p.role.kind is Kind.MULTIFD) == [
        f"mig/dst/recv_{i}" for i in range(4)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["vanilla", "preempt-full", "precopy"])
def test_flush_comes_before_the_vm_stops_and_the_package_waits_for_it(mode: str) -> None:
    rep, m = run(mode=mode, multifd_channels=3, precopy_rounds=2, max_rounds=2)
    assert_ok(rep)
    src = [e for e in m.events if e.role is not None and e.role.kind is Kind.SOURCE]
    names = [e.name for e in src]
    stop = names.index(Ev.STOP_VM)
    flushes = [i for i, n in enumerate(names) if n is Ev.MULTIFD_FLUSH]
    # one flush at the end of every precopy round, and one more: before the VM stops in postcopy
    # (ram_save_postcopy_prepare), after the last pages in precopy (ram_save_complete)
    assert len(flushes) == rep.precopy_rounds + 1 == rep.multifd["syncs"]
    if mode == "precopy":
        assert flushes[-1] > stop > flushes[-2]
    else:
        assert flushes[-1] < stop
        assert names.index(Ev.POSTCOPY_START) > stop
    synced = [e for e in m.events if e.name is Ev.MULTIFD_SYNCED]
    assert len(synced) == len(flushes)
    assert all(e.role is not None and e.role.kind is Kind.LISTEN for e in synced)
    # the destination ran the guest (or ended the stream) only after the last sync
    done = m.events[[e.name for e in m.events].index(Ev.RUNNING if mode != "precopy" else Ev.EOS)]
    assert synced[-1].t <= done.t or mode == "precopy"
    if mode == "precopy":
        listen_eos = next(e for e in m.events if e.name is Ev.EOS and e.role is not None and e.role.kind is Kind.LISTEN)
        assert synced[-1].t <= listen_eos.t
    # every receiver, multifd's included, read its channel to the end
    assert {e.role.title for e in m.events if e.name is Ev.EOS and e.role is not None} >= {
        "mig/dst/listen", "mig/dst/recv_0", "mig/dst/recv_1", "mig/dst/recv_2"}


@pytest.mark.timeout(60)
def test_the_backlog_of_the_multifd_sockets_is_paid_in_the_downtime() -> None:
    """The send side of the flush only waits for the sockets to take the SYNC packets; what they
    still hold when the VM stops is read before the package is loaded."""
    rep, _ = run(mode="vanilla", multifd_channels=4, socket_buffer=4 << 20)
    assert_ok(rep)
    mf = rep.multifd
    assert mf["recv_sync_wait_in_downtime_ms"] > 0
    assert mf["recv_sync_wait_in_downtime_ms"] <= rep.downtime_ms + 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("detection,found", [("multifd", False), ("legacy", True), ("none", False)])
def test_postcopy_pages_are_checked_for_zeroes_only_where_qemu_checks(detection: str, found: bool) -> None:
    """Straight into postcopy: every page goes on the main or preempt channel. With detection
    ``multifd`` only the multifd send threads look for zero pages, and they carry nothing in
    postcopy, so zero pages go whole; ``legacy`` has the migration thread look (save_zero_page)."""
    rep, _ = run(mode="preempt-full", multifd_channels=2, precopy_rounds=0, zero_fraction=0.5,
                 zero_page_detection=detection, dirty_rate=1 << 20)  # a slow writer leaves zero pages zero
    assert_ok(rep)
    assert (rep.ram["zero_pages"] > 1000) is found, rep.ram
    assert rep.ram["multifd_bytes"] < 4096 * 64  # a SYNC packet per channel, no pages


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode,skipped", [("precopy", True), ("vanilla", False)])
def test_zero_pages_from_multifd_are_written_as_multifd_recv_zero_page_process_says(mode: str, skipped: bool) -> None:
    """Without postcopy a zero page never received before is left alone (destination RAM starts
    zeroed); with postcopy every one is written, since it is marked received either way."""
    rep, _ = run(mode=mode, multifd_channels=2, zero_fraction=0.5, max_rounds=1, dirty_rate=1 << 20)
    assert_ok(rep)
    assert rep.ram["zero_pages"] > 1000
    assert (rep.multifd["zero_pages_skipped"] > 1000) is skipped, rep.multifd


def test_multifd_is_refused_where_qemu_has_no_such_combination() -> None:
    with pytest.raises(ConfigError, match="preempt-full"):
        shmig.Config(mode="preempt", multifd_channels=2).validate()
    with pytest.raises(ConfigError, match="255"):
        shmig.Config(multifd_channels=256).validate()
    with pytest.raises(ConfigError, match="at most 32"):
        shmig.Config(mode="vanilla", multifd_channels=33).validate()


@pytest.mark.timeout(60)
def test_a_page_sent_again_over_another_channel_never_loses_to_its_older_copy() -> None:
    """Many rounds over a small hot set: the same page goes out on different channels round after
    round, with a slow link queueing each round's packets. Only the per-round sync barrier keeps a
    receiver from placing a round's copy before another channel has placed the round before's."""
    rep, _ = run(mode="precopy", multifd_channels=4, vcpus=2, wss=2 << 20, max_rounds=6, downtime_limit=1e-6,
                 socket_buffer=1 << 20, bandwidth=400e6 / 8)
    assert_ok(rep)
    assert rep.multifd["syncs"] == rep.precopy_rounds + 1 >= 6


@pytest.mark.timeout(60)
@pytest.mark.parametrize("victim", ["mig/dst/recv_1", "mig/src"])
def test_a_multifd_receiver_or_the_source_killed_mid_precopy_fails_the_run_cleanly(victim: str) -> None:
    """The source's send threads and the listen thread's sync wait must not outlive the run: the
    killed process is named, every child is reaped (conftest checks /dev/shm)."""
    m = shmig.Migration(shmig.Config(**{**BASE, "bandwidth": 32e6, "socket_buffer": 256 << 10, "deadline": 30.0},
                                     mode="vanilla", multifd_channels=2)).start()
    try:
        (p,) = [p for p in m.procs if p.role.title == victim]
        assert m.wait_for(lambda s: s.phase == "precopy" and s.multifd_bytes > (2 << 20), timeout=20)
        os.kill(p.process.pid, signal.SIGKILL)
        rep = m.wait()
    finally:
        m.close()
    assert rep.status == "failed" and f"{victim} was killed by signal 9" in (rep.error or ""), rep.error
    assert all(q.process.exitcode is not None for q in m.procs)


@pytest.mark.parametrize("gbit", [1, 10])
def test_multifd_connections_each_settle_at_their_share_of_the_link(gbit: int) -> None:
    """N bulk connections on one link: Linux autotunes each from the rate it sees, its share, so
    their backlog together is near one connection's at 1 Gbit/s, not N times it (at 10 Gbit/s
    the send buffers' floor keeps each larger than a quarter)."""
    one = shmig.Config(bandwidth=gbit * 1e9 / 8, latency=50e-6)
    four = shmig.Config(bandwidth=gbit * 1e9 / 8, latency=50e-6, multifd_channels=4, mode="vanilla")
    single, each = one.socket_queue.capacity, four.multifd_socket_queue.capacity
    assert each < single
    assert 4 * each < (1.2 if gbit == 1 else 2.0) * single
    assert four.socket_queue == one.socket_queue  # the main and preempt channels are as before
    fixed = shmig.Config(bandwidth=gbit * 1e9 / 8, socket_buffer=1 << 20, multifd_channels=4, mode="vanilla")
    assert fixed.multifd_socket_queue == fixed.socket_queue  # --socket-buffer fixes every channel


def test_the_link_gives_multifd_channels_their_own_queue() -> None:
    import multiprocessing

    import numpy as np

    from shmig.link import Link, state_words
    cfg = shmig.Config(bandwidth=1e9 / 8, multifd_channels=2, mode="vanilla")
    q, mq = cfg.socket_queue, cfg.multifd_socket_queue
    link = Link(np.zeros(state_words(4), np.int64), cfg.bandwidth, 0.0, q.capacity, multiprocessing.Lock(),
                send_buffer=q.send, send_wake=q.send_wake, multifd_queue=mq)
    try:
        assert link.queues[0] == link.queues[1] == (q.capacity, q.wake_at, q.window)
        assert link.queues[2] == link.queues[3] == (mq.capacity, mq.wake_at, mq.window)
    finally:
        link.close()
