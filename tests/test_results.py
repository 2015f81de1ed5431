"""Every result of every run comes back (issue 16): whatever its size, whatever ends it.

A run's statistics and logs are written into the ledger (shared memory sized for the run) as they
are made; nothing that grows with the run travels in a frame. These tests make the frame cap small
(2 KiB instead of 1 MiB) so a regression cannot hide behind the machine's size: a run whose fault
list alone would not fit in one such frame must still hand back every fault.
"""

from __future__ import annotations

import json
import os
import signal

import msgpack
import numpy as np
import pytest

import shmig
import shmig.record
import shmig.reader
from shmig import cli
from helpers import assert_all_reaped, assert_ok
from test_cli import run_main

SMALL_CAP = 2048  # bytes of msgpack header per frame: every protocol frame of these runs fits


def many_faults(mode: str, vcpus: int) -> shmig.Config:
    """A run with thousands of faults in about a second: random access to a small guest right after
    setup, its background held to 16 MiB/s."""
    return shmig.Config(mode=mode, ram=16 << 20, vcpus=vcpus, workload="random", precopy_rounds=0,
                        max_postcopy_bandwidth=16 << 20, deadline=60)


@pytest.fixture
def small_cap(monkeypatch):
    monkeypatch.setattr(shmig.reader, "MAX_HEADER", SMALL_CAP)  # the children inherit it at fork


@pytest.mark.timeout(120)
@pytest.mark.parametrize("vcpus", [1, 4])
def test_a_fault_list_bigger_than_any_frame_comes_back_whole(small_cap, tmp_path, vcpus):
    m = shmig.Migration(many_faults("preempt-full", vcpus), trace=str(tmp_path / "t.json"))
    r = m.start().wait()
    assert_ok(r)
    assert m.trace_error is None and (tmp_path / "t.json").stat().st_size > 0
    # the precondition that makes this test mean something: the way results travelled before
    # (the fault list as one msgpack header per vCPU) would not have fitted under the cap
    biggest = max(len(msgpack.packb(v.faults.tolist())) for v in m.record.vcpus)
    assert biggest > SMALL_CAP, f"the run was too small to test the cap ({biggest} bytes)"
    # every fault is in the report, once, and agrees with QEMU's figures
    n = len(r.faults)
    assert n == r.postcopy_latency_us["count"] == sum(r.postcopy_latency_dist) > 0
    assert sorted(set(r.faults.vcpu.tolist())) == list(range(vcpus))
    assert np.all(np.diff(r.faults.t_ms) >= 0)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["vanilla", "preempt"])
def test_every_mode_completes_under_the_small_cap(small_cap, mode):
    r = shmig.run(many_faults(mode, 2))
    assert_ok(r)
    assert len(r.faults) == r.postcopy_latency_us["count"] > 0


@pytest.mark.timeout(60)
def test_a_failed_run_still_returns_what_it_measured(small_cap):
    """A run that fails (its deadline passes mid-postcopy) still reports every fault resolved so
    far, and the source's and receivers' counters."""
    cfg = shmig.Config(mode="preempt-full", ram=16 << 20, wss=2 << 20, workload="random", precopy_rounds=0,
                       zero_fraction=0.0, max_postcopy_bandwidth=1 << 20,
                       deadline=2)  # 16 s of background: it cannot finish
    r = shmig.run(cfg)
    assert r.status == "failed" and "deadline" in (r.error or "")
    assert len(r.faults) == r.postcopy_latency_us["count"] > 0
    assert r.ram["transferred"] > 0 and r.postcopy_requests > 0


def interrupt_during_integrity_check(monkeypatch) -> list[int]:
    """Ctrl-C (SIGINT to this process) in the middle of the hand-back: every child has gone and
    the integrity check is running. Returns a list the check appends to when it ran."""
    real = shmig.record.check
    ran: list[int] = []

    def check(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        ran.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(shmig.record, "check", check)
    return ran


@pytest.mark.timeout(60)
def test_ctrl_c_while_results_are_handed_back_costs_nothing(monkeypatch, shm_leftovers):
    ran = interrupt_during_integrity_check(monkeypatch)
    m = shmig.Migration(many_faults("preempt-full", 2)).start()
    r = m.wait()
    assert ran == [1]
    assert m.interrupted_late  # the Ctrl-C was seen ...
    assert_ok(r)  # ... and cost nothing: the finished run's report is whole
    assert len(r.faults) == r.postcopy_latency_us["count"] > 0
    assert_all_reaped(m)
    assert shm_leftovers() == []


@pytest.mark.timeout(60)
def test_cli_ctrl_c_while_results_are_handed_back_prints_them_and_exits_130(monkeypatch, capsys, tmp_path):
    interrupt_during_integrity_check(monkeypatch)
    js = tmp_path / "r.json"
    code, out, err = run_main(capsys, "run", "--mode", "preempt-full", "--ram", "16MiB", "--workload", "random",
                              "--precopy-rounds", "0", "--json", str(js))
    assert code == cli.EXIT_INTERRUPTED
    assert "shmig: interrupted" in err
    assert "integrity" in out.lower()  # the summary was printed
    saved = shmig.Report.from_dict(json.loads(js.read_text()), str(tmp_path))
    assert saved.ok and len(saved.faults) == saved.postcopy_latency_us["count"]
