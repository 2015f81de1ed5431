"""Postcopy recovery (issue 9), modelled on QEMU's tests/qtest/migration/postcopy-tests.c: a channel
broken during postcopy pauses both sides instead of failing; a recovery over new channels (in QEMU's
order) completes the migration with nothing lost; a second failure during the recovery is survived;
a process killed while paused or recovering ends the run cleanly. Faults are injected by the source,
which breaks its own end of a channel mid-stream (``--inject-fault``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import shmig
from helpers import BACKENDS, assert_all_reaped, assert_ok, proc_of
from shmig import cli, supervisor
from shmig.compare import MODE_VARIANTS
from shmig.faults import Fault, FaultInjector, FaultSpecError
from shmig.fds import pipe_max, shutdown_pipe
from shmig.reader import FrameReader
from shmig.wire import ChannelClosed, FrameWriter, Msg, ProtocolError, TruncatedFrame, pack_frame

KiB, MiB = 1024, 1024**2
TIMEOUT = 60


def cfg(variant: str = "preempt", host_page: int = 4 * KiB, **kw) -> shmig.Config:
    """A postcopy migration that lasts long enough to be broken half way: everything goes in
    postcopy through a 50MiB/s link, a random guest faulting all the while."""
    base = dict(ram=16 * MiB if host_page == 4 * KiB else 32 * MiB, host_page=host_page, bandwidth=50 * MiB,
                precopy_rounds=0, workload="random", deadline=40, **MODE_VARIANTS[variant])
    base.update(kw)
    return shmig.Config(**base)


def assert_recovered(r: shmig.Report, c: shmig.Config, pauses: int = 1, recoveries: int = 1) -> None:
    """Completed byte for byte after ``pauses`` pauses and ``recoveries`` recoveries, each recovery
    in QEMU's order, and what the report says about them adds up."""
    assert_ok(r)
    assert (r.postcopy_pauses, r.recoveries) == (pauses, recoveries), (r.pauses, r.faults_injected)
    assert len(r.pauses) == pauses and r.faults_injected
    assert r.postcopy_paused_ms >= recoveries * (c.recover_after or 0) * 1e3, r.postcopy_paused_ms
    done = [p for p in r.pauses if p["resumed_t_ms"] is not None]
    assert len(done) == recoveries
    for p in done:  # main channel and return path, receivedmap, then the preempt channel, then RESUME
        assert p["paused_t_ms"] <= p["recv_bitmap_t_ms"] <= p["resumed_t_ms"], p
        if c.uses_preempt_channel:
            assert p["recv_bitmap_t_ms"] <= p["preempt_channel_t_ms"] <= p["resumed_t_ms"], p
        else:
            assert p["preempt_channel_t_ms"] is None, p
    assert r.postcopy_pages_resent == sum(p["pages_resent"] for p in r.pauses)
    dst = r.destination
    # what the source received is at most what the destination sent: requests in flight are lost
    assert r.postcopy_requests <= dst["mig/dst/listen"]["requests_sent"], (r.postcopy_requests, dst)
    assert dst["mig/dst/listen"]["postcopy_pauses"] == pauses
    if c.uses_preempt_channel:
        assert dst["mig/dst/preempt"]["postcopy_pauses"] == pauses


# -- the fault spec, the option and its validation --------------------------------------------------

@pytest.mark.parametrize("spec,fault", [
    ("postcopy-channel@50%", Fault("postcopy-channel", fraction=0.5)),
    ("return-path@0%", Fault("return-path", fraction=0.0)),
    ("precopy-channel@300ms", Fault("precopy-channel", after=0.3)),
    (" return-path @ 1.5s ", Fault("return-path", after=1.5)),
])
def test_fault_spec(spec, fault):
    assert Fault.parse(spec) == fault
    assert Fault.parse(str(fault)) == fault


@pytest.mark.parametrize("spec,words", [
    ("postcopy-channel", "use WHAT@WHEN"),
    ("network@50%", "unknown channel 'network'"),
    ("return-path@100%", "below 100%"),
    ("return-path@-5%", "at least 0%"),
    ("return-path@half%", "as a percentage"),
    ("return-path@50", "has no unit: say 50% (of the pages left) or 50ms"),
    ("return-path@3xs", "unknown time unit"),
    ("return-path@", "use WHAT@WHEN"),
])
def test_bad_fault_spec(spec, words):
    with pytest.raises(FaultSpecError) as e:
        Fault.parse(spec)
    assert words in str(e.value)


def test_fault_injector_fires_once_when_due_and_only_on_existing_channels():
    inj = FaultInjector(["postcopy-channel@50%", "return-path@0ms", "precopy-channel@3600s"])
    assert inj.due(100) == []  # not armed: postcopy has not started
    inj.arm(1000)
    assert [str(f) for f in inj.due(1000, ("precopy-channel", "return-path"))] == ["return-path@0ms"]
    assert inj.due(501) == []
    assert [str(f) for f in inj.due(500, during="recovery")] == ["postcopy-channel@50%"]
    assert inj.due(0) == []
    assert [str(f) for f in inj.pending] == ["precopy-channel@3600s"]
    assert [(f["fault"], f["pages_left"], f["during"]) for f in inj.fired] == [
        ("return-path@0ms", 1000, "postcopy"), ("postcopy-channel@50%", 500, "recovery")]


def run_main(capsys, *argv):
    try:
        code = cli.main(list(argv))
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv,words", [
    (["--mode", "precopy", "--inject-fault", "return-path@50%"], "mode precopy has none: use --mode vanilla"),
    (["--mode", "vanilla", "--inject-fault", "postcopy-channel@50%"], "mode vanilla has no postcopy (preempt)"),
    (["--inject-fault", "postcopy@50%"], "unknown channel 'postcopy'"),
    (["--inject-fault", "return-path@50"], "has no unit"),
    (["--recover-after", "soon"], "--recover-after: cannot read 'soon'"),
    (["--recover-after", "10s", "--deadline", "5s"], "--recover-after must be between 0 and the deadline"),
    (["--inject-fault", "return-path@1%"] * 17, "at most 16 faults"),
])
def test_bad_fault_options_exit_2_with_one_line(capsys, argv, words):
    code, err = run_main(capsys, "run", "--ram", "8MiB", *argv)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shmig: error: ") and words in lines[0], err


def test_config_refuses_a_single_string():
    with pytest.raises(shmig.ConfigError, match=r"inject_faults must be a list of specs, e.g. \['postcopy-channel@50%'\]"):
        shmig.Config(inject_faults="postcopy-channel@50%").validate()


# -- the pieces a broken channel is made of ----------------------------------------------------------

def test_shutdown_pipe_breaks_both_ends_like_a_dropped_connection():
    """A shut-down write end gets EPIPE and its reader sees the frame it was in the middle of end
    short; a shut-down read end reads EOF and its writer gets EPIPE. The descriptors stay valid."""
    r, w = os.pipe()
    try:
        frame = pack_frame(Msg.PAGES, (b"\0\0\0\0", None, False), b"p" * 4096)
        os.write(w, frame[:100])
        shutdown_pipe(w, write_end=True)
        with pytest.raises(ChannelClosed, match="precopy channel: the receiver has gone"):
            FrameWriter(w, "precopy").send(Msg.PING, ())
        with pytest.raises(TruncatedFrame, match="precopy channel: truncated frame"):
            FrameReader(r, "precopy").next_frame(timeout=5)
        r2, w2 = os.pipe()
        shutdown_pipe(r2, write_end=False)
        assert os.read(r2, 10) == b""
        with pytest.raises(BrokenPipeError):
            os.write(w2, b"x")
        os.close(r2), os.close(w2)
    finally:
        os.close(r), os.close(w)


def test_truncated_frame_is_a_protocol_error_and_reopen_forgets_the_old_pipe():
    assert issubclass(TruncatedFrame, ProtocolError)  # outside postcopy it fails the run as before
    r, w = os.pipe()
    rd = FrameReader(r, "postcopy", readahead=1 << 16)
    os.write(w, pack_frame(Msg.PING, (1,)) + pack_frame(Msg.PING, (2,))[:7])
    assert rd.next_frame(timeout=5).fields == [1]
    rd.fill()
    assert rd.buffered == 7
    r2, w2 = os.pipe()
    rd.reopen(r2)
    os.close(r), os.close(w)
    assert rd.buffered == 0 and not rd.eof
    os.write(w2, pack_frame(Msg.HELLO, ()))
    assert rd.next_frame(timeout=5).kind == Msg.HELLO
    os.close(r2), os.close(w2)


# -- the done-when runs, small ------------------------------------------------------------------------

MATRIX = [
    ("vanilla", 4 * KiB, "precopy-channel"), ("vanilla", 2 * MiB, "return-path"),
    ("preempt", 4 * KiB, "postcopy-channel"), ("preempt", 4 * KiB, "return-path"),
    ("preempt", 4 * KiB, "precopy-channel"),
    ("preempt", 2 * MiB, "postcopy-channel"),  # 7.1 must forget the huge page it had interrupted
    ("preempt-nobreak", 2 * MiB, "postcopy-channel"),
    ("preempt-full", 4 * KiB, "postcopy-channel"),  # the return thread, sending urgent pages, pauses too
    ("preempt-full", 2 * MiB, "return-path"),
    ("preempt-full-hint", 4 * KiB, "precopy-channel"),
]


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant,host_page,what", MATRIX,
                         ids=[f"{v}-{'4K' if hp == 4 * KiB else '2M'}-{w}" for v, hp, w in MATRIX])
def test_one_fault_is_survived(variant, host_page, what, backend):
    c = cfg(variant, host_page, inject_faults=[f"{what}@50%"], fault_backend=backend)
    r = shmig.run(c)
    assert_recovered(r, c)
    (f,) = r.faults_injected
    assert f["fault"] == f"{what}@50%" and f["during"] == "postcopy"
    # the link was full when it broke: what was queued in the channels is lost and goes again
    assert r.postcopy_pages_resent > 0, r.pauses
    assert "recovery" in r.summary() and "1 pause, 1 recovery" in r.summary()


@pytest.fixture
def socket_reader(monkeypatch):
    """Pipes no larger than pipe-max-size (as without CAP_SYS_RESOURCE): each receiver reads its
    channel ahead with a thread of its own (wire.SocketReader), which must stop and start again."""
    real = supervisor.make_pipe
    monkeypatch.setattr(supervisor, "make_pipe",
                        lambda size=None: real(min(size, pipe_max()) if size else size))


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("variant,host_page,what", [("preempt", 4 * KiB, "postcopy-channel"),
                                                    ("preempt-full", 2 * MiB, "precopy-channel"),
                                                    ("vanilla", 4 * KiB, "return-path")])
def test_one_fault_with_read_ahead_threads(socket_reader, variant, host_page, what):
    c = cfg(variant, host_page, inject_faults=[f"{what}@50%"])
    r = shmig.run(c)
    assert_recovered(r, c)


@pytest.mark.timeout(TIMEOUT)
def test_cli_done_when_run(tmp_path):
    """The issue's command, on 32MiB: integrity ok and one recovery, read back from --json."""
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, "-m", "shmig", "run", "--ram", "32MiB", "--mode", "preempt",
                        "--bandwidth", "100MiB/s", "--inject-fault", "postcopy-channel@50%", "--json", str(out)],
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stdout + p.stderr
    d = json.loads(out.read_text())
    assert d["integrity"]["ok"] and d["recoveries"] == 1 and d["postcopy_pauses"] == 1, d["pauses"]
    assert "1 pause, 1 recovery" in p.stdout


@pytest.mark.timeout(TIMEOUT)
def test_two_faults_in_a_row():
    """The issue's double failure (30% then 31% of 128MiB): the second break comes right after the
    first recovery. On 16MiB, 1% is less than one 256KiB frame, so the second comes at 35%."""
    c = cfg("preempt", inject_faults=["postcopy-channel@30%", "return-path@35%"])
    r = shmig.run(c)
    assert_recovered(r, c, pauses=2, recoveries=2)
    assert [f["fault"] for f in r.faults_injected] == ["postcopy-channel@30%", "return-path@35%"]


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("variant,second", [("preempt", "postcopy-channel"), ("preempt-full", "return-path"),
                                            ("vanilla", "precopy-channel")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_failure_during_recovery(variant, second, backend):
    """QEMU's double-failure tests: the second fault is due while the migration is paused, so it
    breaks a new channel during the recovery handshake; both sides pause again, and the second
    recovery completes the migration."""
    first = "return-path" if second != "return-path" else "precopy-channel"
    c = cfg(variant, inject_faults=[f"{first}@20%", f"{second}@300ms"], recover_after=0.4, fault_backend=backend)
    r = shmig.run(c)
    assert_recovered(r, c, pauses=2, recoveries=1)
    assert [f["during"] for f in r.faults_injected] == ["postcopy", "recovery"], r.faults_injected
    assert [p["during"] for p in r.pauses] == ["postcopy", "recovery"], r.pauses
    assert r.pauses[0]["resumed_t_ms"] is None  # one pause episode, from the first break to the resume


# -- the Python API: recover() as migrate-recover + migrate resume=true --------------------------------

@pytest.mark.timeout(TIMEOUT)
def test_recover_by_hand_nothing_moves_while_paused():
    """recover_after=None: the migration stays postcopy-paused until recover(). Meanwhile no page is
    placed and a vCPU that faulted stays blocked on its page; after the recovery its request goes
    again, and its fault latency includes the whole pause, as a guest feels it."""
    c = cfg("preempt", inject_faults=["postcopy-channel@40%"], recover_after=None)
    m = shmig.Migration(c).start()
    try:
        with pytest.raises(RuntimeError, match="nothing to recover"):
            m.recover()
        assert m.wait_for_pause(timeout=20), m.phase
        assert m.phase == "postcopy-paused"
        for title in ("mig/src", "mig/dst/listen", "mig/dst/preempt"):
            (p,) = [p for p in m.sup.procs if p.title == title]
            assert m.mem.get_status(p.role.index).startswith("postcopy-paused"), title
        deadline = time.monotonic() + 10
        while m.mem.wait[0, 0] < 0:  # the random guest faults at once on a missing page
            assert time.monotonic() < deadline, "the vCPU never blocked"
            time.sleep(0.01)
        page, received = int(m.mem.wait[0, 0]), int(np.count_nonzero(m.mem.received))
        time.sleep(0.3)
        assert int(m.mem.wait[0, 0]) == page, "the vCPU got its page while nothing was connected"
        assert int(np.count_nonzero(m.mem.received)) == received, "pages were placed while paused"
        m.recover()
        assert m.phase == "postcopy-recover"
    finally:
        r = m.wait()
    assert_recovered(r, c)
    assert r.postcopy_paused_ms >= 300
    assert "postcopy-paused" in [s["phase"] for s in r.timeline]
    assert r.postcopy_latency_us["max"] >= 300_000, r.postcopy_latency_us
    assert r.postcopy_requests_resent >= 1, r.destination  # the blocked vCPU's page, at least


@pytest.mark.timeout(TIMEOUT)
def test_nobody_recovers_before_the_deadline():
    c = cfg("vanilla", inject_faults=["return-path@10%"], recover_after=None, deadline=2)
    t0 = time.monotonic()
    r = shmig.run(c)
    assert time.monotonic() - t0 < 10
    assert r.status == "failed" and r.postcopy_pauses == 1 and r.recoveries == 0
    assert "deadline of 2s passed during postcopy-paused (recover_after=None and recover() was not called)" \
        in r.error, r.error
    assert "mig/src: postcopy-paused (injected fault return-path@10%)" in r.error, r.error


# -- SIGKILL while paused or recovering ----------------------------------------------------------------

KILL_PAUSED = ["mig/src", "mig/dst/listen", "mig/dst/preempt", "guest/vcpu0"]


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("victim", KILL_PAUSED)
def test_kill_while_paused(victim, shm_leftovers):
    m = shmig.Migration(cfg("preempt", inject_faults=["return-path@20%"], recover_after=None)).start()
    try:
        assert m.wait_for_pause(timeout=20)
        os.kill(proc_of(m, victim).process.pid, signal.SIGKILL)
    finally:
        r = m.wait()
    assert_all_reaped(m)
    assert not shm_leftovers()
    assert r.status == "failed"
    assert r.error.startswith(f"{victim} was killed by signal 9 during postcopy-paused"), r.error


CHANNEL_PROCS = ["mig/src", "mig/dst/listen", "mig/dst/preempt"]


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("victim", CHANNEL_PROCS)
def test_kill_while_recovering(victim, shm_leftovers):
    """The other channel processes are stopped (SIGSTOP) before recover(), so the recovery cannot
    finish and nobody reacts to the death before the controller sees it: the victim dies, for sure,
    in postcopy-recover."""
    m = shmig.Migration(cfg("preempt", inject_faults=["precopy-channel@20%"], recover_after=None)).start()
    stopped = [proc_of(m, t).process.pid for t in CHANNEL_PROCS if t != victim]
    try:
        assert m.wait_for_pause(timeout=20)
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        m.recover()
        os.kill(proc_of(m, victim).process.pid, signal.SIGKILL)
        assert not m.wait_for_pause(timeout=20)  # the run has failed
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        r = m.wait()
    assert_all_reaped(m)
    assert not shm_leftovers()
    assert r.status == "failed"
    assert r.error.startswith(f"{victim} was killed by signal 9 during postcopy-recover"), r.error
