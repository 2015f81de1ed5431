"""Hostile frames: random and mutated frames fed to every reader of the protocol.

The readers are the real ones, run in this process over real pipes and real shared memory: the
destination's receivers (Listen on the precopy channel, PreemptReceiver on the postcopy channel,
placing pages into guest RAM), the source's return thread (page requests), the fault thread (vCPU
faults) and the control channel (controller <-> children). Each must end in a ProtocolError (or,
at a frame boundary, ChannelClosed) that names its channel: never a hang, another exception, or a
write outside the destination's guest RAM. Examples are bounded and derandomized, so CI runs the
same cases every time in a few seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shmig
from helpers import wait_doing
from rig import Rig, pipe
from shmig import control
from shmig.config import Config
from shmig.control import Ctl, Ev
from shmig.destination import Listen, PreemptReceiver
from shmig.reader import FrameReader
from shmig.source import Source
from shmig.wire import PREFIX, ChannelClosed, Msg, ProtocolError, pack_frame

MiB = 1024**2
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])

# --- frames: random, structured, and mutations of valid ones ---------------------------------

values = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.binary(max_size=64)
                      | st.text(max_size=8) | st.floats(allow_nan=True),
                      lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                   max_size=3), max_leaves=4)
kinds = st.sampled_from([int(k) for k in Msg]) | st.integers(-5, 300)
send_times = st.just(0) | st.integers(0, 2**63 - 1) | st.integers(-2**63, -1)


@st.composite
def structured_frame(draw: st.DrawFn) -> bytes:
    """A well-framed message whose header and payload are anything msgpack can carry."""
    header = msgpack.packb([draw(kinds), draw(send_times), *draw(st.lists(values, max_size=4))])
    payload = draw(st.binary(max_size=64))
    return PREFIX.pack(len(header), len(payload)) + header + payload


@st.composite
def pages_frame(draw: st.DrawFn, npages: int, k: int) -> bytes:
    """A PAGES frame that is almost right: pages in and around RAM, zero flags that may or may not
    match, a payload that may be short or long."""
    n = draw(st.integers(0, 6))
    base = draw(st.integers(0, npages + 2))
    tps = np.array([draw(st.sampled_from([base + i, base // k * k + i, npages - 1, npages, 2**32 - 1]))
                    for i in range(n)], np.int64) % 2**32
    zero = draw(st.none() | st.binary(min_size=n, max_size=n) | st.binary(max_size=8))
    nz = n - (sum(1 for b in zero if b) if isinstance(zero, bytes) and len(zero) == n else 0)
    plen = max(0, nz * 4096 + draw(st.sampled_from([0, 0, 0, -4096, 4096, -1, 7])))
    return pack_frame(Msg.PAGES, (tps.astype(np.uint32).tobytes(), zero, draw(st.booleans())),
                      bytes([draw(st.integers(0, 255))]) * plen)


@st.composite
def discard_frame(draw: st.DrawFn, nhost: int) -> bytes:
    runs = draw(st.lists(st.tuples(st.integers(0, nhost + 1), st.integers(0, nhost + 1)), max_size=4))
    body = np.array(runs, np.uint32).tobytes() + draw(st.sampled_from([b"", b"\x01", b"\x01\x02\x03\x04"]))
    return pack_frame(Msg.DISCARD, (draw(st.sampled_from([body, None, 5, "x"])),))


def mutate(data: bytes, draw: st.DrawFn) -> bytes:
    """Flip, drop or insert bytes of a valid stream, or cut it short."""
    b = bytearray(data)
    for _ in range(draw(st.integers(0, 3))):
        if not b:
            break
        i = draw(st.integers(0, len(b) - 1))
        op = draw(st.sampled_from(["flip", "drop", "insert", "cut"]))
        if op == "flip":
            b[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "drop":
            del b[i]
        elif op == "insert":
            b[i:i] = draw(st.binary(min_size=1, max_size=4))
        else:
            del b[i:]
    return bytes(b)


@st.composite
def stream(draw: st.DrawFn, valid: st.SearchStrategy[bytes], first: bytes = b"") -> bytes:
    """``first`` (the channel's opening frame), then frames, some of them mutated, maybe garbage."""
    frames = draw(st.lists(valid | structured_frame() | st.binary(min_size=1, max_size=40), max_size=6))
    data = first + b"".join(frames)
    return mutate(data, draw) if draw(st.booleans()) else data


# --- real readers in this process -----------------------------------------------------------

CONFIGS = {
    "4KiB-direct": dict(mode="preempt", ram=4 * MiB, prefault=False),
    "2MiB-paced": dict(mode="preempt", ram=4 * MiB, host_page=2 * MiB, bandwidth=1e12, latency=1e-6, prefault=False),
}


@pytest.fixture(params=list(CONFIGS), scope="module")
def rig(request):
    r = Rig(Config(**CONFIGS[request.param]))
    yield r
    r.close()


@pytest.fixture(scope="module")
def rig4k():
    """For the readers whose checks do not depend on the host page size."""
    r = Rig(Config(**CONFIGS["4KiB-direct"]))
    yield r
    r.close()


@contextlib.contextmanager
def example(rig: Rig):
    """One example's pipes, closed when it ends; the configuration restored."""
    cfg = rig.cfg
    rig.mem.ctl[:] = 0  # the phase words a receiver sets (postcopy on the destination) start over
    try:
        yield rig
    finally:
        rig.release()
        rig.cfg = cfg


def assert_named_error(e: BaseException | None, channel: str) -> None:
    assert e is None or isinstance(e, (ProtocolError, ChannelClosed)), repr(e)
    if e is not None:
        assert channel in str(e), str(e)


def feed(rig: Rig, data: bytes) -> int:
    """A pipe holding ``data``, its writer closed: the reader gets exactly this, then EOF."""
    r, w = rig.pipe()
    assert len(data) <= 1 << 20
    os.write(w, data)
    os.close(w)
    return r


def run_receiver(rig: Rig, cls: type, data: bytes) -> BaseException | None:
    """Run a receiver over ``data``. The error it ended with; None if it loaded the channel to its
    EOS, or if the channel broke in postcopy and it paused, as it must (and then found no
    'recover' on its control channel)."""
    threads = set(threading.enumerate())  # another test's leftovers are not this receiver's
    with example(rig):
        r = feed(rig, data)
        fault_r, _ = rig.pipe()  # open but silent: the fault thread just waits
        _, ret_w = rig.pipe()
        channel = "precopy" if cls is Listen else "postcopy"
        rx = rig.child(cls, {channel: r, "return": ret_w, "fault": fault_r}, ctrl=pack_frame(Msg.CTRL, ("shut", None)))
        before = rig.fingerprint()
        try:
            rx.run()
            err = None
        except Exception as e:  # noqa: BLE001 - the caller's assertion says which ones are allowed
            err = e
        finally:
            if cls is Listen:
                rx.stopping.set()
                for t in set(threading.enumerate()) - threads:
                    if t.name == "fault":
                        t.join(5)
            for t in set(threading.enumerate()) - threads:  # a read-ahead thread ends at the pipe's EOF
                if t.name == f"{channel} socket":
                    t.join(5)
        paused = rx.stats.postcopy_pauses
        if paused:  # it closed its channel (and Listen its return path) itself
            rig.fds.remove(r)
            if cls is Listen:
                rig.fds.remove(ret_w)
            assert isinstance(err, ProtocolError) and "expected 'recover'" in str(err), repr(err)
            err = None
        assert rig.fingerprint() == before, "a receiver wrote outside the destination's guest RAM"
        assert not [t for t in set(threading.enumerate()) - threads if t.name in ("fault", f"{channel} socket")]
        return err


@pytest.mark.timeout(120)
@FUZZ
@given(data=st.data())
def test_precopy_channel(rig, data):
    cfg = rig.cfg
    valid = (pages_frame(cfg.npages, cfg.tp_per_hp) | discard_frame(cfg.nhost)
             | st.sampled_from([pack_frame(Msg.ROUND, (1,)), pack_frame(Msg.PACKAGED, ()), pack_frame(Msg.EOS, ())]))
    err = run_receiver(rig, Listen, data.draw(stream(valid, first=pack_frame(Msg.PING, (1,)))))
    assert_named_error(err, "precopy")


@pytest.mark.timeout(120)
@FUZZ
@given(data=st.data())
def test_postcopy_channel(rig, data):
    cfg = rig.cfg
    valid = pages_frame(cfg.npages, cfg.tp_per_hp) | st.just(pack_frame(Msg.EOS, ()))
    err = run_receiver(rig, PreemptReceiver, data.draw(stream(valid, first=pack_frame(Msg.HELLO, ()))))
    assert_named_error(err, "postcopy")


FOUND = {  # what fuzzing found, kept as fixed cases: (receiver, frames after the opening one, words)
    "discard-ranges-not-bytes": (Listen, pack_frame(Msg.DISCARD, (None,)), "bad DISCARD ranges"),
    "discard-ranges-odd-length": (Listen, pack_frame(Msg.DISCARD, (b"\x01\x00\x00\x00",)), "bad DISCARD ranges"),
    "payload-on-a-round": (Listen, pack_frame(Msg.ROUND, (1,), b"\0\0\0"), "ROUND frame with a payload"),
    "payload-on-eos": (PreemptReceiver, pack_frame(Msg.EOS, (), b"x"), "EOS frame with a payload"),
}


def _pages(*tps: int) -> bytes:
    """A PAGES frame of ``tps`` in that order, no zero page, its payload the right size."""
    return pack_frame(Msg.PAGES, (np.array(tps, np.uint32).tobytes(), None, False), b"\x5a" * (4096 * len(tps)))


# issue 22 item 15: contiguity was inferred from the first and last index ([0, 5, 2] wrote 0-2
# and marked 5 received) and a page twice inside a huge page completed it from stale rows
for _name, _tps in {"pages-out-of-order": (0, 5, 2), "pages-descending": (3, 2), "page-twice": (0, 0),
                    "page-twice-in-a-huge-page": (0, 1, 1), "page-back-inside-a-huge-page": (1, 2, 0)}.items():
    for _cls in (Listen, PreemptReceiver):
        FOUND[f"{_name}-{_cls.__name__}"] = (_cls, _pages(*_tps), "inconsistent PAGES frame")


@pytest.mark.parametrize("case", list(FOUND))
def test_found_by_fuzzing(rig, case):
    cls, frames, words = FOUND[case]
    first = pack_frame(Msg.PING, (1,)) if cls is Listen else pack_frame(Msg.HELLO, ())
    err = run_receiver(rig, cls, first + frames)
    assert isinstance(err, ProtocolError) and words in str(err), repr(err)


@pytest.mark.timeout(120)
@FUZZ
@given(data=st.data())
def test_fault_channel(rig4k, data):
    with example(rig4k) as rig:
        valid = st.builds(lambda v, hp: pack_frame(Msg.FAULT, (v, hp)), st.integers(-1, 2) | values,
                          st.integers(-1, rig.cfg.nhost + 1) | values)
        r = feed(rig, data.draw(stream(valid)))
        _, ret_w = rig.pipe()
        pre_r, _ = rig.pipe()
        rx = rig.child(Listen, {"precopy": pre_r, "return": ret_w, "fault": r})
        rx.fault_loop()  # the fault thread's body, until the pipe ends or a frame is refused
        assert isinstance(rx.fault_error, (ProtocolError, ChannelClosed))
        assert_named_error(rx.fault_error, "fault")


@pytest.mark.timeout(120)
@FUZZ
@given(data=st.data(), mode=st.sampled_from(["vanilla", "preempt", "preempt-full"]))
def test_return_path(rig, data, mode):
    with example(rig):
        rig.cfg = dataclasses.replace(rig.cfg, mode=mode)
        valid = (st.builds(lambda hp, n: pack_frame(Msg.REQ, (hp, n)), st.integers(-1, rig.cfg.nhost + 1) | values,
                           st.integers(0, 2 * MiB) | values)
                 | st.just(pack_frame(Msg.SHUT, ())))
        r = feed(rig, data.draw(stream(valid)))
        _, pre_w = rig.pipe()
        post_r, post_w = pipe()
        drain = threading.Thread(target=lambda: [None for _ in iter(lambda: os.read(post_r, 1 << 20), b"")])
        drain.start()  # preempt-full's return thread sends urgent pages itself
        try:
            src = rig.child(Source, {"precopy": pre_w, "postcopy": post_w, "return": r})
            src.return_path.loop()
        finally:
            os.close(post_w)
            drain.join(5)
            os.close(post_r)
        assert_named_error(src.return_path.error, "return path")


@FUZZ
@given(data=st.data())
def test_control_channel(data):
    """Both directions share one reader and one check (``control.parse``): what passes it is a
    message name with an object of the shape the receiver acts on."""
    valid = st.builds(lambda n, o: pack_frame(Msg.CTRL, (n, o)),
                      st.sampled_from([c.value for c in Ctl]) | values, values
                      | st.tuples(st.sampled_from([e.value for e in Ev]) | st.text(max_size=8),
                                  st.integers(-2**63, 2**64 - 1)).map(list))
    r, w = pipe()
    os.write(w, data.draw(stream(valid)))
    os.close(w)
    reader = FrameReader(r, "guest/vcpu0 control", max_frame=1 << 16)
    try:
        while True:
            try:
                name, obj = control.parse(reader.next_frame(timeout=5), "guest/vcpu0 control")
            except (ProtocolError, ChannelClosed) as e:
                assert "guest/vcpu0 control" in str(e)
                break
            assert isinstance(name, Ctl)
            if name is Ctl.EVENT:
                assert Ev(obj[0]) and isinstance(obj[1], int)
            elif name in (Ctl.READY, Ctl.PAUSED, Ctl.RESUMED):
                assert isinstance(obj, int) and not isinstance(obj, bool)
    finally:
        os.close(r)


# --- the controller on a live run: a corrupt control channel fails the run, never the controller

def inject_ctrl(m: shmig.Migration, title: str, data: bytes) -> None:
    """Write bytes into the controller's control input from ``title`` (through /proc, as a second
    writer on the child's end)."""
    (p,) = [p for p in m.sup.procs if p.title == title]
    fd = os.open(f"/proc/{p.process.pid}/fd/{p.child_ctrl_out}", os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("data,words", [
    (b"\x05\x00\x00\x00\x00\x00\x00\x00\xff\xff\xff\xff\xff", "undecodable"),
    (pack_frame(Msg.CTRL, ("event", "running")), "malformed 'event' message"),
    (pack_frame(Msg.CTRL, ("event", ["running", "now"])), "malformed 'event' message"),
    (pack_frame(Msg.CTRL, ("done", [1, 2])), "malformed 'done' message"),
    (pack_frame(Msg.CTRL, ("event", ["no such event", 1])), "malformed 'event' message"),
    (pack_frame(Msg.CTRL, ("ready", "yes")), "malformed 'ready' message"),
    (pack_frame(Msg.CTRL, (7, None)), "malformed message"),
    (pack_frame(Msg.PAGES, (b"", None, False)), "malformed message"),
    # issue 22: the declared limit of a control frame is enforced, not only the global ones
    (pack_frame(Msg.CTRL, ("error", "x" * 70000)), "larger than the channel's limit"),
])
def test_controller_refuses_a_corrupt_control_message(data, words):
    cfg = Config(mode="preempt", ram=8 * MiB, bandwidth=4 * MiB, precopy_rounds=None, deadline=30)
    m = shmig.Migration(cfg).start()
    r, waited = wait_doing(m, 0.3, inject_ctrl, m, "guest/vcpu0", data)
    assert waited < 10
    assert r.status == "failed" and "guest/vcpu0 control channel" in r.error and words in r.error, r.error


@pytest.mark.parametrize("frame,words", [
    (pack_frame(Msg.FAULT, (0, False)), "host page False outside RAM"),
    (pack_frame(Msg.FAULT, (0, 10**9)), "host page 1000000000 outside RAM"),
])
def test_fault_channel_found_by_fuzzing(rig4k, frame, words):
    with example(rig4k) as rig:
        _, ret_w = rig.pipe()
        pre_r, _ = rig.pipe()
        rx = rig.child(Listen, {"precopy": pre_r, "return": ret_w, "fault": feed(rig, frame)})
        rx.fault_loop()
        assert isinstance(rx.fault_error, ProtocolError) and words in str(rx.fault_error), repr(rx.fault_error)


@pytest.mark.timeout(30)
def test_send_time_in_the_future_is_refused_not_waited_for(rig4k):
    """The link holds a frame until its send time plus the latency: a corrupt send time far ahead
    would hold the return thread (or a receiver) until the run's deadline."""
    with example(rig4k) as rig:
        rig.cfg = dataclasses.replace(rig.cfg, mode="vanilla", latency=1e-3)
        r = feed(rig, pack_frame(Msg.REQ, (1, 4096), send_ns=time.monotonic_ns() + 3600 * 10**9))
        _, pre_w = rig.pipe()
        src = rig.child(Source, {"precopy": pre_w, "return": r})
        src.return_path.loop()  # returns with the error; waiting for the send time would hit the timeout
        assert isinstance(src.return_path.error, ProtocolError)
        assert "return path channel: frame sent" in str(src.return_path.error)
