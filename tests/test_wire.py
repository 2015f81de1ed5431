"""shmig.wire: frames over real pipes, and what a reader does with garbage."""

from __future__ import annotations

import fcntl
import os
import random
import threading
import time

import msgpack
import numpy as np
import pytest

from shmig import fds as fds_mod
from shmig.fds import writev_all
from shmig.link import Link
from shmig.reader import FrameReader
from shmig.sockreader import SocketReader
from shmig.wire import (MAX_HEADER, MAX_PAYLOAD, PREFIX, ChannelClosed, Frame, FrameWriter, Msg, ProtocolError,
                        expect, pack_frame)

F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032



@pytest.fixture
def pipe():
    """A pipe whose ends are closed after the test (whatever the test already closed)."""
    fds = list(os.pipe())
    yield fds
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


@pytest.fixture
def socket_reader(pipe):
    """SocketReaders on the pipe's read end, closed (their threads ended) before the pipe is. A
    reader left open keeps its thread, and that thread would read whatever pipe the next test
    gets under the same descriptor number: it stole another test's frames once in ~15 runs on a
    loaded machine, which read as "the frame never came"."""
    made = []

    def make(name, **kw):
        made.append(SocketReader(pipe[0], name, **kw))
        return made[-1]
    yield make
    for reader in made:
        reader.close()
    pipe[0] = -1  # closed by the reader


def close(fds, which):
    os.close(fds[which])
    fds[which] = -1


class Sender(threading.Thread):
    """Runs ``fn`` in a thread; re-raises its exception in ``join_ok``."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn = fn
        self.exc = None

    def run(self):
        try:
            self.fn()
        except BaseException as e:  # noqa: BLE001
            self.exc = e

    def join_ok(self, timeout=10):
        self.join(timeout)
        assert not self.is_alive(), "sender thread hung"
        if self.exc is not None:
            raise self.exc


# --- round trips -------------------------------------------------------------

@pytest.mark.timeout(10)
def test_header_fields_round_trip(pipe):
    r, w = pipe
    wr = FrameWriter(w, "precopy")
    fields = (b"\x00\x01\xff", None, True, False, 7, -3, 2**40, 1.5, "name", [1, [2, "x"]], {"k": 1})
    n = wr.send(Msg.CTRL, fields, send_ns=123456789)
    rd = FrameReader(r, "precopy")
    f = rd.next_frame(timeout=5)
    assert isinstance(f, Frame)
    assert f.kind == Msg.CTRL
    assert f.send_ns == 123456789
    assert f.fields == [b"\x00\x01\xff", None, True, False, 7, -3, 2**40, 1.5, "name", [1, [2, "x"]], {"k": 1}]
    assert f.payload.nbytes == 0
    assert f.size == n == wr.bytes_out == rd.bytes_in
    assert wr.frames_out == rd.frames_in == 1
    assert "CTRL" in repr(f)


@pytest.mark.timeout(10)
def test_send_ns_defaults_to_now(pipe):
    r, w = pipe
    t0 = time.monotonic_ns()
    FrameWriter(w, "x").send(Msg.PING, (1,))
    t1 = time.monotonic_ns()
    f = FrameReader(r, "x").next_frame(timeout=5)
    assert t0 <= f.send_ns <= t1


@pytest.mark.timeout(10)
def test_ctrl_helper(pipe):
    r, w = pipe
    FrameWriter(w, "control").ctrl("stats", {"a": [1, 2]})
    f = FrameReader(r, "control").next_frame(timeout=5)
    assert f.kind == Msg.CTRL and f.fields == ["stats", {"a": [1, 2]}]


@pytest.mark.timeout(10)
def test_payload_from_several_numpy_buffers(pipe):
    r, w = pipe
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (3, 4096), dtype=np.uint8)       # 2-D pages
    b = rng.integers(0, 2**63, 100, dtype=np.uint64)           # another dtype
    c = np.arange(10, dtype=np.uint8)[::1]
    big = rng.integers(0, 256, (16, 4096), dtype=np.uint8)
    d = big[5:9]                                                # a contiguous slice of a larger array
    wr = FrameWriter(w, "precopy")
    n = wr.send(Msg.PAGES, (b"idx", None, False), [a, b, c, b"", bytearray(b"xyz"), d])
    rd = FrameReader(r, "precopy")
    f = rd.next_frame(timeout=5)
    expected = a.tobytes() + b.tobytes() + c.tobytes() + b"xyz" + d.tobytes()
    assert bytes(f.payload) == expected
    assert f.size == n == PREFIX.size + len(msgpack.packb([1, f.send_ns, b"idx", None, False])) + len(expected)
    # the payload is usable as pages straight away, as the destination does
    pages = np.frombuffer(f.payload[:a.nbytes], np.uint8).reshape(-1, 4096)
    assert np.array_equal(pages, a)


@pytest.mark.timeout(10)
def test_many_frames_back_to_back(pipe):
    r, w = pipe
    rng = random.Random(7)
    sizes = [rng.choice([0, 1, 100, 4096, 4096 * 3, 20000, 70000]) for _ in range(600)]
    datas = [bytes([i % 251]) * s for i, s in enumerate(sizes)]
    wr = FrameWriter(w, "precopy")

    def send():
        for i, d in enumerate(datas):
            wr.send(Msg.PAGES, (i, len(d)), [d])
        wr.send(Msg.EOS, ())

    s = Sender(send)
    s.start()
    readahead = 50_000
    rd = FrameReader(r, "precopy", readahead=readahead, max_frame=1 << 16)
    for i, d in enumerate(datas):
        f = rd.next_frame(timeout=5)
        assert f is not None
        assert f.kind == Msg.PAGES and f.fields == [i, len(d)]
        assert f.payload == d
        assert rd.buffered <= readahead  # nothing beyond the read-ahead once the frame is taken
    assert rd.next_frame(timeout=5).kind == Msg.EOS
    s.join_ok()
    assert rd.frames_in == wr.frames_out == len(datas) + 1
    assert rd.bytes_in == wr.bytes_out
    close(pipe, 1)
    with pytest.raises(ChannelClosed):
        rd.next_frame(timeout=5)


@pytest.mark.timeout(10)
def test_payload_larger_than_pipe_from_a_thread(pipe):
    r, w = pipe
    cap = fcntl.fcntl(w, F_GETPIPE_SZ)
    payload = np.random.default_rng(3).integers(0, 256, 4 * cap + 12345, dtype=np.uint8)
    wr = FrameWriter(w, "postcopy")
    s = Sender(lambda: wr.send(Msg.PAGES, ("big",), [payload[: cap], payload[cap:]]))
    s.start()
    rd = FrameReader(r, "postcopy", readahead=0, max_frame=1024)
    f = rd.next_frame(timeout=5)
    s.join_ok()
    assert f.fields == ["big"]
    assert np.array_equal(np.frombuffer(f.payload, np.uint8), payload)


@pytest.mark.timeout(10)
def test_reader_grows_for_a_frame_larger_than_max_frame(pipe):
    r, w = pipe
    rd = FrameReader(r, "control", readahead=0, max_frame=1024)
    cap0 = rd.cap
    big = os.urandom(cap0 + 100_000)
    wr = FrameWriter(w, "control")

    def send():
        wr.send(Msg.CTRL, ("stats",), [big])
        wr.send(Msg.CTRL, ("small",), [b"abc"])

    s = Sender(send)
    s.start()
    f = rd.next_frame(timeout=5)
    assert f.payload == big
    assert rd.cap >= f.size > cap0
    f = rd.next_frame(timeout=5)
    assert f.fields == ["small"] and f.payload == b"abc"
    s.join_ok()


@pytest.mark.timeout(10)
def test_peek_head_then_next_frame(pipe):
    r, w = pipe
    wr = FrameWriter(w, "precopy")
    n1 = wr.send(Msg.PAGES, (1,), [b"a" * 5000], send_ns=111)
    n2 = wr.send(Msg.PING, (2,), send_ns=222)
    rd = FrameReader(r, "precopy", readahead=0)
    assert rd.peek_head() == (n1, 111)
    assert rd.peek_head() == (n1, 111)  # peeking takes nothing
    f = rd.next_frame()
    assert (f.size, f.send_ns, f.fields) == (n1, 111, [1])
    assert rd.peek_head() == (n2, 222)
    f = rd.next_frame()
    assert (f.kind, f.send_ns) == (Msg.PING, 222)
    close(pipe, 1)
    with pytest.raises(ChannelClosed, match="precopy"):
        rd.peek_head()


@pytest.mark.timeout(10)
def test_peek_head_waits_for_a_frame_written_later(pipe):
    r, w = pipe
    data = pack_frame(Msg.PING, (5,), b"z" * 300, send_ns=99)
    rd = FrameReader(r, "return")

    def send():
        for i in range(0, len(data), 50):  # dribble it in
            os.write(w, data[i:i + 50])
            time.sleep(0.002)

    s = Sender(send)
    s.start()
    assert rd.peek_head() == (len(data), 99)
    s.join_ok()
    assert rd.next_frame(timeout=0).fields == [5]


@pytest.mark.timeout(10)
def test_has_frame_and_timeouts_on_partial_frames(pipe):
    r, w = pipe
    rd = FrameReader(r, "return")
    assert not rd.has_frame()
    assert rd.next_frame(timeout=0) is None
    data = pack_frame(Msg.REQ, (3, 4096), b"p" * 100)
    os.write(w, data[:5])                   # not even a whole prefix
    assert not rd.has_frame()
    assert rd.next_frame(timeout=0.01) is None
    os.write(w, data[5:-1])                 # all but the last byte
    assert not rd.has_frame()
    assert rd.next_frame(timeout=0.01) is None
    os.write(w, data[-1:] + data)           # the rest, and a second frame
    assert rd.has_frame()
    f = rd.next_frame(timeout=0)
    assert f.fields == [3, 4096] and f.payload == b"p" * 100
    assert rd.has_frame()
    assert rd.next_frame(timeout=0).kind == Msg.REQ
    assert not rd.has_frame()


@pytest.mark.timeout(10)
def test_readahead_zero_reads_exactly_one_frame(pipe):
    """With no read-ahead, everything behind the frame being taken stays in the pipe."""
    r, w = pipe
    wr = FrameWriter(w, "precopy")
    for i in range(20):
        wr.send(Msg.PAGES, (i,), [bytes(1000 + i)])
    rd = FrameReader(r, "precopy", readahead=0)
    taken = 0
    for i in range(20):
        f = rd.next_frame(timeout=5)
        assert f.fields == [i] and f.payload.nbytes == 1000 + i
        taken += f.size
        assert rd.buffered == 0
        assert rd.bytes_in == taken  # not a byte read beyond the frame
    assert taken == wr.bytes_out


class WatchedReader(FrameReader):
    """Checks the read-ahead bound after every read."""

    max_seen = 0
    violations = 0

    def fill(self):
        got = super().fill()
        head = self._need() if self.buffered >= PREFIX.size else PREFIX.size
        if self.buffered > max(self.readahead, head):
            self.violations += 1
        self.max_seen = max(self.max_seen, self.buffered)
        return got


@pytest.mark.timeout(10)
@pytest.mark.parametrize("readahead", [0, 1000, 30_000, 300_000])
def test_readahead_limit_is_respected(pipe, readahead):
    r, w = pipe
    fcntl.fcntl(w, F_SETPIPE_SZ, 1 << 20)
    rng = random.Random(readahead)
    sizes = [rng.choice([10, 4096, 9000, 65536, 200_000]) for _ in range(150)]
    wr = FrameWriter(w, "precopy")
    s = Sender(lambda: [wr.send(Msg.PAGES, (i,), [bytes(n)]) for i, n in enumerate(sizes)])
    s.start()
    rd = WatchedReader(r, "precopy", readahead=readahead, max_frame=1 << 16)
    biggest = 0
    for i, n in enumerate(sizes):
        if i % 3 == 0:
            rd.has_frame()
            rd.wait(0.001)
        f = rd.next_frame(timeout=5)
        assert f.fields == [i] and f.payload.nbytes == n
        biggest = max(biggest, f.size)
    s.join_ok()
    assert rd.violations == 0
    assert rd.max_seen <= max(readahead, biggest)
    if readahead >= 30_000:
        assert rd.max_seen >= min(readahead, 30_000)  # it does read ahead when allowed to


@pytest.mark.timeout(10)
def test_writer_to_closed_reader_is_channel_closed(pipe):
    r, w = pipe
    close(pipe, 0)
    wr = FrameWriter(w, "postcopy")
    with pytest.raises(ChannelClosed, match="postcopy"):
        wr.send(Msg.PING, (1,))


@pytest.mark.timeout(10)
def test_clean_close_between_frames(pipe):
    r, w = pipe
    wr = FrameWriter(w, "precopy")
    wr.send(Msg.EOS, ())
    close(pipe, 1)
    rd = FrameReader(r, "precopy")
    assert rd.next_frame(timeout=5).kind == Msg.EOS
    with pytest.raises(ChannelClosed, match="precopy channel closed"):
        rd.next_frame(timeout=5)
    with pytest.raises(ChannelClosed):
        rd.next_frame()  # stays closed; no hang without a timeout either
    assert not rd.has_frame()


# --- writev_all ------------------------------------------------------------------

@pytest.mark.timeout(10)
def test_writev_all_through_a_small_pipe(pipe):
    r, w = pipe
    fcntl.fcntl(w, F_SETPIPE_SZ, 4096)
    rng = np.random.default_rng(5)
    bufs = [rng.integers(0, 256, n, dtype=np.uint8) for n in (1, 4095, 70000, 0, 3, 300_000)]
    bufs.append(b"tail")
    expected = b"".join(bytes(b) for b in bufs)
    got = bytearray()

    def read():
        while len(got) < len(expected):
            chunk = os.read(r, 1000)
            if not chunk:
                break
            got.extend(chunk)

    s = Sender(read)
    s.start()
    assert writev_all(w, bufs) == len(expected)
    s.join_ok()
    assert bytes(got) == expected


@pytest.mark.parametrize("step", [1, 7, 4096, 5000])
def test_writev_all_finishes_partial_writes(monkeypatch, step):
    """Every partial-write boundary: inside a buffer, on a boundary, across empty buffers."""
    out = bytearray()
    calls = []
    rng = random.Random(step)

    def fake_writev(fd, views):
        total = sum(memoryview(v).nbytes for v in views)
        n = min(total, rng.randint(1, step))
        data = b"".join(bytes(v) for v in views)[:n]
        out.extend(data)
        calls.append(n)
        return n

    monkeypatch.setattr(fds_mod.os, "writev", fake_writev)
    bufs = [b"abc", b"", np.arange(5000, dtype=np.uint16), b"", b"", bytearray(b"x" * 4096),
            np.zeros((2, 3), np.uint8), memoryview(b"end")]
    expected = b"".join(bytes(memoryview(b)) if not isinstance(b, np.ndarray) else b.tobytes() for b in bufs)
    assert writev_all(99, bufs) == len(expected)
    assert bytes(out) == expected
    assert sum(calls) == len(expected)
    if step < len(expected):
        assert len(calls) > 1


def test_writev_all_single_full_write(pipe):
    r, w = pipe
    assert writev_all(w, [b"ab", b"cd"]) == 4
    assert os.read(r, 10) == b"abcd"


# --- garbage ---------------------------------------------------------------------

def feed(fds, data, name="precopy", close_writer=True, **kw):
    r, w = fds
    os.write(w, data)
    if close_writer:
        close(fds, 1)
    return FrameReader(r, name, **kw)


def drain(rd):
    """Read frames until an exception; return it (a reader must never hang on a closed pipe)."""
    n = 0
    while True:
        try:
            f = rd.next_frame(timeout=5)
        except Exception as e:  # noqa: BLE001
            return e, n
        assert f is not None, "next_frame timed out on a closed pipe"
        n += 1
        assert n < 10_000


@pytest.mark.timeout(10)
def test_random_bytes_are_a_protocol_error(pipe):
    rd = feed(pipe, random.Random(1).randbytes(3000))
    e, n = drain(rd)
    assert isinstance(e, ProtocolError) and "precopy channel" in str(e)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("seed", range(40))
def test_fuzz_garbage_never_hangs_or_crashes(seed):
    """Plausible prefixes with random headers and payloads: only ProtocolError or ChannelClosed."""
    rng = random.Random(seed)
    parts = []
    for _ in range(rng.randint(1, 6)):
        kind = rng.random()
        if kind < 0.3:
            parts.append(pack_frame(rng.choice(list(Msg)), (rng.randint(0, 9),), rng.randbytes(rng.randint(0, 50))))
        elif kind < 0.8:
            hlen, plen = rng.randint(1, 40), rng.randint(0, 40)
            parts.append(PREFIX.pack(hlen, plen) + rng.randbytes(hlen + plen))
        else:
            parts.append(rng.randbytes(rng.randint(1, 30)))
    data = b"".join(parts)
    cut = rng.randint(1, len(data))
    fds = list(os.pipe())
    try:
        rd = feed(fds, data[:cut], name="fuzz", readahead=rng.choice([0, 16, 4096]))
        e, n = drain(rd)
        assert isinstance(e, (ProtocolError, ChannelClosed)), repr(e)
        assert "fuzz" in str(e)
    finally:
        for fd in fds:
            if fd >= 0:
                os.close(fd)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("hlen,plen", [(MAX_HEADER + 1, 0), (2**32 - 1, 10), (0, 0), (10, MAX_PAYLOAD + 1)])
def test_malformed_prefix_is_caught_before_waiting(pipe, hlen, plen):
    """A prefix announcing an impossible frame is an error at once, even with the writer still open."""
    rd = feed(pipe, PREFIX.pack(hlen, plen) + b"\x90", close_writer=False)
    with pytest.raises(ProtocolError, match="precopy channel: malformed frame prefix"):
        rd.next_frame(timeout=5)
    with pytest.raises(ProtocolError):
        rd.has_frame()


@pytest.mark.timeout(10)
@pytest.mark.parametrize("header", [b"\xc1", b"\xd9\x05ab", msgpack.packb([1, 2]) + b"\x00", b"\x92\xa2\xff\xfe\x00"])
def test_non_msgpack_header(pipe, header):
    rd = feed(pipe, PREFIX.pack(len(header), 0) + header)
    with pytest.raises(ProtocolError, match="precopy channel: undecodable frame header"):
        rd.next_frame(timeout=5)


@pytest.mark.timeout(10)
def test_non_msgpack_header_in_peek_head(pipe):
    rd = feed(pipe, PREFIX.pack(1, 0) + b"\xc1")
    with pytest.raises(ProtocolError, match="precopy channel: undecodable"):
        rd.peek_head()


@pytest.mark.timeout(10)
@pytest.mark.parametrize("header", [
    {"kind": 1}, 5, "PAGES", [], [1], [99, 0], [0, 0], ["PAGES", 0], [1, "now"], [1, None], [1.0, 0],
])
def test_header_not_a_valid_list(pipe, header):
    h = msgpack.packb(header)
    rd = feed(pipe, PREFIX.pack(len(h), 0) + h)
    with pytest.raises(ProtocolError, match="precopy channel: unknown frame"):
        rd.next_frame(timeout=5)


@pytest.mark.timeout(10)
def test_truncated_frame_then_close_at_every_offset():
    data = pack_frame(Msg.PAGES, (b"\x01\x00\x00\x00", None, True), b"q" * 4096)
    for cut in sorted({1, 4, 7, 8, 9, 12, len(data) // 2, len(data) - 4096, len(data) - 1}):
        fds = list(os.pipe())
        try:
            rd = feed(fds, data + data[:cut], name="postcopy")
            assert rd.next_frame(timeout=5).payload == b"q" * 4096
            with pytest.raises(ProtocolError, match="postcopy channel: truncated frame") as ei:
                rd.next_frame(timeout=5)
            assert f"({cut} bytes of" in str(ei.value)
        finally:
            for fd in fds:
                if fd >= 0:
                    os.close(fd)


@pytest.mark.timeout(10)
def test_truncated_frame_in_peek_head(pipe):
    data = pack_frame(Msg.PING, (1,))
    rd = feed(pipe, data[:-1], name="return")
    with pytest.raises(ProtocolError, match="return channel: truncated"):
        rd.peek_head()


def test_expect():
    f = Frame(Msg.PONG, 0, [1, 2], memoryview(b""), 10)
    assert expect(f, Msg.PONG, 2, "return path") == [1, 2]
    assert expect(f, Msg.PONG, 0, "return path") == [1, 2]
    with pytest.raises(ProtocolError, match="return path channel: expected PING with 0 fields, got PONG with 2"):
        expect(f, Msg.PING, 0, "return path")
    with pytest.raises(ProtocolError, match="expected PONG with 3 fields, got PONG with 2"):
        expect(f, Msg.PONG, 3, "return path")


@pytest.mark.timeout(10)
def test_expect_on_a_received_frame(pipe):
    r, w = pipe
    FrameWriter(w, "precopy").send(Msg.HELLO, ())
    f = FrameReader(r, "precopy").next_frame(timeout=5)
    with pytest.raises(ProtocolError, match="precopy channel"):
        expect(f, Msg.PING, 1, "precopy")


# --- waiting ----------------------------------------------------------------------

@pytest.mark.timeout(10)
def test_wait_reads_what_arrives(pipe):
    r, w = pipe
    rd = FrameReader(r, "precopy")
    rd.wait(0)
    assert rd.buffered == 0
    os.write(w, pack_frame(Msg.PING, ()))
    rd.wait(5)
    assert rd.has_frame()


@pytest.mark.timeout(10)
def test_wait_sleeps_when_readahead_is_full(pipe):
    r, w = pipe
    wr = FrameWriter(w, "precopy")
    for i in range(20):
        wr.send(Msg.PAGES, (i,), [bytes(1000)])
    rd = FrameReader(r, "precopy", readahead=2048, max_frame=4096)
    while rd.fill():
        pass
    assert rd.buffered == 2048  # read-ahead full, more in the pipe
    calls = 0

    def counting_wait(timeout):
        nonlocal calls
        calls += 1
        rd.wait(timeout)

    Link.until(time.monotonic_ns() + 50_000_000, counting_wait)  # pace for 50 ms, as Link.carry does
    # a sleeping wait needs a handful of calls; the busy loop makes tens of thousands
    assert calls < 100, f"wait() was called {calls} times in 50 ms"


# --- direct mode: payloads left in the pipe for the caller --------------------------

@pytest.mark.timeout(10)
def test_direct_mode_reads_payload_into_scattered_views(pipe):
    r, w = pipe
    rng = np.random.default_rng(11)
    src = rng.integers(0, 256, (64, 4096), dtype=np.uint8)
    wr = FrameWriter(w, "precopy")
    batches = [[0, 1, 2], [10], [5, 6, 20, 21, 22, 40], list(range(30, 64))]

    def send():
        for b in batches:
            wr.send(Msg.PAGES, (b,), [src[b]])
        wr.send(Msg.PING, (1,))  # no payload
        wr.send(Msg.EOS, ())

    s = Sender(send)
    s.start()
    dst = np.zeros_like(src)
    rd = FrameReader(r, "precopy", readahead=1 << 20, direct=True)
    assert rd.readahead == 0
    for b in batches:
        size, _ = rd.peek_head()
        f = rd.next_frame(timeout=5)
        assert f.payload is None and "pending" in repr(f)
        assert f.size == size
        assert rd.pending == len(b) * 4096
        assert rd.buffered == 0  # not a byte of payload in the buffer
        rd.read_payload_into([dst[p] for p in b])  # one view per page, out of order is fine
        assert rd.pending == 0
    f = rd.next_frame(timeout=5)
    assert f.kind == Msg.PING and f.payload is not None and f.payload.nbytes == 0 and rd.pending == 0
    assert rd.next_frame(timeout=5).kind == Msg.EOS
    s.join_ok()
    used = sorted(p for b in batches for p in b)
    assert np.array_equal(dst[used], src[used])
    assert not dst[[p for p in range(64) if p not in used]].any()
    assert rd.bytes_in == wr.bytes_out


@pytest.mark.timeout(10)
def test_direct_mode_read_payload_into_the_buffer(pipe):
    r, w = pipe
    big = os.urandom(300_000)  # larger than the reader's buffer and the pipe
    wr = FrameWriter(w, "postcopy")
    s = Sender(lambda: (wr.send(Msg.PAGES, (1,), [big]), wr.send(Msg.PAGES, (2,), [b"small"])))
    s.start()
    rd = FrameReader(r, "postcopy", readahead=0, max_frame=1024, direct=True)
    rd.next_frame(timeout=5)
    assert rd.read_payload() == big
    rd.next_frame(timeout=5)
    assert rd.read_payload() == b"small"
    s.join_ok()
    assert rd.bytes_in == wr.bytes_out


@pytest.mark.timeout(10)
def test_direct_mode_payload_size_mismatch(pipe):
    r, w = pipe
    FrameWriter(w, "precopy").send(Msg.PAGES, (1,), [bytes(8192)])
    rd = FrameReader(r, "precopy", direct=True)
    rd.next_frame(timeout=5)
    with pytest.raises(ProtocolError, match="precopy channel: payload of 8192 bytes does not match"):
        rd.read_payload_into([bytearray(4096)])


@pytest.mark.timeout(10)
def test_direct_mode_truncated_payload(pipe):
    r, w = pipe
    data = pack_frame(Msg.PAGES, (1,), bytes(8192))
    os.write(w, data[:-100])
    close(pipe, 1)
    rd = FrameReader(r, "precopy", direct=True)
    f = rd.next_frame(timeout=5)
    assert f.payload is None
    with pytest.raises(ProtocolError, match="precopy channel: truncated frame"):
        rd.read_payload_into([bytearray(8192)])


@pytest.mark.timeout(10)
def test_direct_mode_unread_payload_is_reported(pipe):
    r, w = pipe
    wr = FrameWriter(w, "precopy")
    wr.send(Msg.PAGES, (1,), [bytes(4096)])
    wr.send(Msg.EOS, ())
    rd = FrameReader(r, "precopy", direct=True)
    rd.next_frame(timeout=5)
    with pytest.raises(RuntimeError, match="payload was not read"):
        rd.next_frame(timeout=5)


def test_socket_reader_keeps_every_frame_intact_while_its_thread_reads_ahead():
    """The kernel-like receive thread writes past ``end`` while frames are taken and the buffer is
    moved to the front: every payload must come out exactly as written, in order."""
    import random
    import threading


    r, w = os.pipe()
    rng = random.Random(7)
    sizes = [rng.choice([0, 1, 4096, 65536, 262144, 1 << 20]) for _ in range(300)]
    reader = SocketReader(r, "precopy", readahead=3 << 20, max_frame=(1 << 20) + 65536)

    def write() -> None:
        wr = FrameWriter(w, "precopy")
        for i, n in enumerate(sizes):
            wr.send(Msg.PAGES, (i,), [bytes([i % 251]) * n] if n else ())
        os.close(w)
    t = threading.Thread(target=write, daemon=True)
    t.start()
    try:
        for i, n in enumerate(sizes):
            if i % 3 == 0:
                reader.fill()  # the receiver's frame boundary, where the buffer may move
            f = reader.next_frame(timeout=10)
            assert f is not None and f.fields == [i]
            assert f.payload.nbytes == n
            if n:
                data = bytes(f.payload)
                assert data[0] == i % 251 and data.count(data[0]) == n, f"frame {i} corrupted"
        with pytest.raises(ChannelClosed):
            reader.next_frame(timeout=10)
    finally:
        t.join(10)
        os.close(r)


@pytest.mark.timeout(10)
def test_socket_reader_eof_while_waiting_is_a_closed_channel_not_a_timeout(pipe, socket_reader):
    """The writer goes away while the consumer waits for the read-ahead thread: ChannelClosed at
    once, not None after the timeout (which read as "nothing yet" and hid the close)."""

    w = pipe[1]
    reader = socket_reader("precopy", readahead=1 << 20, max_frame=1 << 16)
    threading.Timer(0.2, close, (pipe, 1)).start()  # the consumer is waiting by then
    t0 = time.monotonic()
    with pytest.raises(ChannelClosed, match="precopy channel closed"):
        reader.next_frame(timeout=5)
    assert time.monotonic() - t0 < 4


@pytest.mark.timeout(10)
def test_socket_reader_last_frame_read_before_the_consumer_waits(pipe, socket_reader):
    """Regression (a run hung once in ~1500 at its very end): the consumer finds its frame
    incomplete, the read-ahead thread then reads the stream's last bytes, and only then does the
    consumer wait. Nothing more will come, so it must see the frame is whole instead of waiting
    for a change that never happens."""

    w = pipe[1]
    reader = socket_reader("precopy", readahead=1 << 20, max_frame=1 << 16)
    FrameWriter(w, "precopy").send(Msg.CTRL, ("last", None))
    t0 = time.monotonic()
    while not reader._complete():  # the thread has read it all: the interleaving that hung
        assert time.monotonic() - t0 < 5
        time.sleep(0.001)
    t0 = time.monotonic()
    assert reader._await(5) and time.monotonic() - t0 < 1
    assert reader.next_frame(timeout=1).fields == ["last", None]


@pytest.mark.timeout(10)
def test_socket_reader_idle_consumer_reads_the_pipe_itself(pipe, socket_reader):
    """An urgent page's path: a consumer waiting on an idle channel is woken by the pipe directly,
    not by the read-ahead thread (one wake-up on the way, as recv() in the kernel), and the thread
    stays parked while nothing more is in the pipe."""

    w = pipe[1]
    reader = socket_reader("postcopy", readahead=1 << 20, max_frame=1 << 16)
    writer = FrameWriter(w, "postcopy")
    for i in range(3):
        threading.Timer(0.05, writer.send, (Msg.PAGES, (i,), [bytes(4096)])).start()
        f, end = None, time.monotonic() + 5
        while f is None and time.monotonic() < end:  # a loaded machine may wake it early: it looks again
            f = reader.next_frame(timeout=1)
        assert f is not None and f.fields == [i] and f.payload.nbytes == 4096
        assert not reader._pump_on and reader._parked, "the thread read for a waiting consumer"


@pytest.mark.timeout(20)
def test_socket_reader_thread_drains_a_stream_while_the_consumer_is_busy(pipe, socket_reader):
    """Once the pipe holds bytes the consumer has not read, the thread goes back to reading ahead:
    a sender of more than the pipe holds finishes while the consumer sits on its first frame, as a
    socket's receive buffer fills while the application is busy."""

    w = pipe[1]
    reader = socket_reader("precopy", readahead=8 << 20, max_frame=(1 << 20) + 65536)
    writer = FrameWriter(w, "precopy")
    writer.send(Msg.PAGES, (0,), [bytes(4096)])
    assert reader.next_frame(timeout=5).fields == [0]  # read by the consumer: the thread parked
    sender = Sender(lambda: [writer.send(Msg.PAGES, (i,), [bytes(1 << 19)]) for i in range(1, 13)])
    sender.start()  # 6 MiB: several times what the pipe holds
    time.sleep(0.05)
    reader.fill()  # the consumer's next frame boundary
    sender.join_ok(10)  # completes with the consumer busy (it reads nothing more meanwhile)
    assert reader.bytes_in >= writer.bytes_out - (1 << 20)  # all but what the pipe itself holds
    for i in range(1, 13):
        assert reader.next_frame(timeout=5).fields == [i]


@pytest.mark.timeout(20)
def test_socket_reader_close_stops_its_thread_while_the_writer_is_alive(pipe):
    """close() while the read-ahead thread watches a pipe whose writer is still open (a channel
    given up by the receiver, not broken by the sender): nothing will arrive to wake it, so close()
    must wake it itself, and return once it has ended, long before its 10 s limit."""

    r, w = pipe
    before = set(threading.enumerate())
    reader = SocketReader(r, "postcopy", readahead=1 << 20, max_frame=1 << 16)
    (thread,) = set(threading.enumerate()) - before
    writer = FrameWriter(w, "postcopy")
    writer.send(Msg.PAGES, (0,), [bytes(1 << 19)])  # half a MiB: the thread reads it ahead
    reader.fill()
    t0 = time.monotonic()
    while not reader._selecting:  # back in select(), waiting for more
        assert time.monotonic() - t0 < 5
        time.sleep(0.001)
    t0 = time.monotonic()
    reader.close()
    pipe[0] = -1  # closed by the reader
    assert time.monotonic() - t0 < 2 and not thread.is_alive()
