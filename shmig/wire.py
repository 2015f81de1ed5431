"""Frames on the pipes: ``[u32 header length][u32 payload length][msgpack header][raw payload]``.

The header is a msgpack array ``[kind, send_ns, *fields]``. Page data never goes through msgpack:
it follows the header as raw bytes, written straight out of guest RAM with ``writev`` and scattered
into destination RAM straight out of the receive buffer, so a batch costs one header, no matter how
many pages it holds. The length prefix (rather than a streaming ``Unpacker``) is what makes that
possible: the reader knows where the header ends and the payload begins without copying the payload
through msgpack's buffer, and a malformed length is caught before a byte of payload is trusted.
"""

from __future__ import annotations

import enum
import os
import select
import struct
import threading
import time
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import msgpack

if TYPE_CHECKING:
    from .link import Link

PREFIX = struct.Struct("<II")
MAX_HEADER = 1 << 20
MAX_PAYLOAD = 1 << 26
HEAD_ROOM = 2048  # bounds a data frame's prefix and header (page indices, zero flags) for the room check
PIPE_BUF = 4096  # writes up to this size are atomic, so several vCPUs may share the fault pipe
FUTURE_NS = 1_000_000_000  # every process stamps frames with one clock: a later send time is corrupt


class Msg(enum.IntEnum):
    PAGES = 1  # fields: target page indices (uint32 bytes), zero-page flags (uint8 bytes), urgent
    DISCARD = 2  # fields: host page runs (uint32 start,count pairs as bytes)
    PACKAGED = 3  # CMD_PACKAGED: LISTEN + device state + RUN; the guest resumes on the destination
    EOS = 4  # RAM_SAVE_FLAG_EOS at the end of the migration on this channel
    PING = 5
    PONG = 6
    HELLO = 7  # first frame of the postcopy (preempt) channel
    REQ = 8  # return path: MIG_RP_MSG_REQ_PAGES for one host page; fields: host page, len
    SHUT = 9  # return path: MIG_RP_MSG_SHUT
    FAULT = 10  # vCPU -> fault thread: fields: vcpu, host page
    CTRL = 11  # controller <-> child: fields: name, object
    ROUND = 12  # precopy round boundary (for the destination's stats only)
    RECV_BITMAP = 13  # recovery: MIG_CMD_RECV_BITMAP on the main channel; the reply (MIG_RP_MSG_RECV_BITMAP)
    #                   on the return path carries receivedmap as a little-endian bitmap payload
    RESUME = 14  # recovery: MIG_CMD_POSTCOPY_RESUME
    RESUME_ACK = 15  # recovery: MIG_RP_MSG_RESUME_ACK


KINDS = frozenset(int(k) for k in Msg)


class ProtocolError(Exception):
    """A malformed, truncated or unexpected frame: the run stops, naming the channel."""


class ChannelClosed(EOFError):
    """The other end closed the pipe at a frame boundary."""


class TruncatedFrame(ProtocolError):
    """The pipe closed in the middle of a frame: a broken channel (during postcopy, a reason to pause,
    as a dropped connection is; anywhere else, a protocol error like any other)."""


def shutdown_pipe(fd: int, write_end: bool) -> None:
    """QEMU's qemu_file_shutdown for a pipe end: from now on ``fd`` reads EOF or writes EPIPE, and the
    peer sees the channel close once no syscall still holds the old end. ``dup2`` swaps the file
    under the descriptor atomically, so another thread using ``fd`` never sees it closed or reused."""
    r, w = os.pipe()
    dead, other = (w, r) if write_end else (r, w)
    os.close(other)
    os.dup2(dead, fd, inheritable=False)
    os.close(dead)


def pack_header(kind: int, fields: Sequence[Any], send_ns: int | None = None) -> bytes:
    return msgpack.packb([int(kind), time.monotonic_ns() if send_ns is None else send_ns, *fields])


def pack_frame(kind: int, fields: Sequence[Any] = (), payload: bytes | memoryview = b"",
               send_ns: int | None = None) -> bytes:
    """One whole frame as bytes (control messages, tests)."""
    return frame_head(kind, fields, len(payload), send_ns) + bytes(payload)


def frame_head(kind: int, fields: Sequence[Any], plen: int, send_ns: int | None = None) -> bytes:
    """Prefix and header of a frame whose payload (``plen`` bytes) follows."""
    h = pack_header(kind, fields, send_ns)
    return PREFIX.pack(len(h), plen) + h


def writev_all(fd: int, bufs: list, total: int | None = None) -> int:
    """``writev`` that finishes partial writes (a pipe write larger than its capacity may be split)."""
    if total is not None:  # the common case, one call whole: no views made
        n = os.writev(fd, bufs)
        if n == total:
            return total
        views = [memoryview(b).cast("B") for b in bufs]
    else:
        views = [memoryview(b).cast("B") for b in bufs]
        total = sum(v.nbytes for v in views)
        n = os.writev(fd, views)
    left = total - n
    while left:
        i = 0
        while n >= views[i].nbytes:
            n -= views[i].nbytes
            i += 1
        views = [views[i][n:], *views[i + 1:]]
        n = os.writev(fd, views)
        left -= n
    return total


def close_fds(fds: Iterable[int]) -> None:
    """Close every descriptor; one already closed (or never valid) is not an error here."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def drain_eventfd(efd: int) -> None:
    """Reset a non-blocking eventfd: the wake-ups it counted so far are consumed (or there were none)."""
    try:
        os.eventfd_read(efd)
    except BlockingIOError:
        pass


class FrameWriter:
    """Sends frames on one pipe; counts what it sent.

    A data channel's writer goes through the link's socket queue (``link``, channel ``ch``): a
    frame that does not fit waits for Linux's write-space wake-up, and what is written is queued
    until the link has carried it.
    """

    def __init__(self, fd: int, name: str, link: Link | None = None, ch: int = 0):
        self.fd = fd
        self.name = name
        self.link = link
        self.ch = ch
        self.bytes_out = 0
        self.frames_out = 0
        self.blocked_ns = 0  # time spent waiting for write space
        self._packer = msgpack.Packer()  # reused: packb makes one per call (pack runs under the GIL)

    def send(self, kind: int, fields: Sequence[Any] = (), payload: Sequence[Any] = (),
             send_ns: int | None = None) -> int:
        # inline on purpose: this runs at every hop of a fault's path, where each Python call counts
        if not payload:
            plen = 0
        elif len(payload) == 1:
            plen = memoryview(payload[0]).nbytes
        else:
            plen = sum(memoryview(p).nbytes for p in payload)
        if self.link is not None:
            self._wait_space(plen)
        h = self._packer.pack([int(kind), time.monotonic_ns() if send_ns is None else send_ns, *fields])
        head = PREFIX.pack(len(h), plen) + h
        size = len(head) + plen
        self._queue(size)
        try:
            if plen == 0 and size <= PIPE_BUF:  # the common small message: one atomic write
                if os.write(self.fd, head) != size:
                    raise ProtocolError(f"{self.name} channel: short write of a small frame")
            else:
                writev_all(self.fd, [head, *payload], size)
        except BrokenPipeError:
            raise self._gone() from None
        self.bytes_out += size
        self.frames_out += 1
        return size

    def send_file(self, kind: int, fields: Sequence[Any], fd: int, offset: int, nbytes: int) -> int:
        """A frame whose payload is ``nbytes`` of file ``fd`` at ``offset``, spliced into the pipe:
        the kernel moves page references instead of copying the bytes."""
        self._wait_space(nbytes)
        head = frame_head(kind, fields, nbytes)
        size = len(head) + nbytes
        self._queue(size)
        try:
            writev_all(self.fd, [head], len(head))
            end = offset + nbytes
            while offset < end:
                offset += os.splice(fd, self.fd, end - offset, offset_src=offset)
        except BrokenPipeError:
            raise self._gone() from None
        self.bytes_out += size
        self.frames_out += 1
        return size

    def _wait_space(self, plen: int) -> None:
        """A data channel's frame waits for room in the socket queue before its header (and send
        time) is made: it enters the queue when the sender gets past this."""
        if self.link is not None:
            self.blocked_ns += self.link.wait_for_space(self.ch, plen + HEAD_ROOM)

    def _queue(self, size: int) -> None:
        """A data channel's frame is queued before it is written, so the receiver never carries
        what is not counted."""
        if self.link is not None:
            self.link.sent(self.ch, size)

    def _gone(self) -> ChannelClosed:
        return ChannelClosed(f"{self.name} channel: the receiver has gone")

    def ctrl(self, name: str, obj: Any = None) -> None:
        self.send(Msg.CTRL, (name, obj))


class Frame:
    """A received frame; ``payload`` is a view into the reader's buffer, valid until the next frame."""

    __slots__ = ("kind", "send_ns", "fields", "payload", "size")

    def __init__(self, kind: int, send_ns: int, fields: list, payload: memoryview | None, size: int):
        self.kind = kind
        self.send_ns = send_ns
        self.fields = fields
        self.payload = payload
        self.size = size

    def __repr__(self) -> str:
        plen = "pending" if self.payload is None else self.payload.nbytes
        return f"Frame({Msg(self.kind).name}, fields={len(self.fields)}, payload={plen})"


class FrameReader:
    """Reads frames from a pipe into one preallocated buffer.

    ``readahead`` bytes may be drained from the pipe ahead of the frame being applied: that is how a
    socket buffer larger than a pipe can hold is emulated (what is in this buffer is still "in the
    socket": the receiver has not taken it off the wire yet).

    In ``direct`` mode (no read-ahead) only the prefix and header are read into the buffer; a
    frame's payload is then left in the pipe for the caller to read straight into its destination
    (``read_payload_into``), saving a copy on the data path.
    """

    def __init__(self, fd: int, name: str, readahead: int = 65536, max_frame: int = 1 << 16,
                 direct: bool = False):
        self.fd = fd
        self.name = name
        self.direct = direct
        self.readahead = 0 if direct else readahead
        self.pending = 0  # direct mode: payload bytes of the last frame still in the pipe
        self._peeked: tuple[int, tuple[list, int, int]] | None = None
        # twice what may be buffered at once: the buffered bytes move to the front only once the
        # front half is free, so each byte is moved at most once however deep the read-ahead
        self.cap = 2 * (readahead + max_frame + 65536)
        self.buf = bytearray(self.cap)
        self.mv = memoryview(self.buf)
        self.start = 0
        self.end = 0
        self.eof = False
        self.bytes_in = 0
        self.frames_in = 0
        self._watch(fd)

    def _watch(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self._readable = select.poll()  # asked before a read: a read of an empty pipe raises, and
        self._readable.register(fd, select.POLLIN)  # an exception costs more than this syscall

    # -- buffer management ------------------------------------------------
    @property
    def buffered(self) -> int:
        return self.end - self.start

    def _need(self) -> int:
        """Bytes needed for the frame at the head of the buffer (or its prefix)."""
        if self.end - self.start < PREFIX.size:
            return PREFIX.size
        hlen, plen = PREFIX.unpack_from(self.buf, self.start)
        if hlen > MAX_HEADER or plen > MAX_PAYLOAD or hlen == 0:
            raise ProtocolError(f"{self.name} channel: malformed frame prefix (header {hlen} bytes,"
                                f" payload {plen} bytes)")
        return PREFIX.size + hlen + (0 if self.direct else plen)

    def _make_room(self, need: int) -> bool:
        """At a frame boundary: grow the buffer for a frame larger than it (e.g. a big stats
        message), or move the buffered bytes to the front when the tail is too short for the frame
        or the front half is spent. True if the bytes moved."""
        n = self.buffered
        if need > self.cap:
            self.cap = need + 65536
            buf = bytearray(self.cap)
            buf[:n] = self.mv[self.start:self.end]
            self.buf, self.mv = buf, memoryview(buf)
        elif self.start >= self.cap // 2 or self.cap - self.end < need - n:
            self.mv[:n] = self.mv[self.start:self.end]
        else:
            return False
        self.start, self.end = 0, n
        self._peeked = None
        return True

    def fill(self) -> int:
        """Non-blocking: read what the pipe has, up to the read-ahead limit. Returns bytes read."""
        if self.eof:
            return 0
        need = self._need()
        want = max(self.readahead, need) - self.buffered
        if want <= 0:
            return 0
        if self.cap - self.end < want:
            self._make_room(need)
            want = min(want, self.cap - self.end)
            if want <= 0:
                return 0
        if not self._readable.poll(0):
            return 0
        try:
            got = os.readv(self.fd, [self.mv[self.end:self.end + want]])
        except BlockingIOError:
            return 0
        if got == 0:
            self.eof = True
            return 0
        self.end += got
        self.bytes_in += got
        return got

    def wait(self, timeout: float | None) -> None:
        """Sleep up to ``timeout``, reading ahead whatever arrives meanwhile (up to the limit)."""
        if self.eof or self.pending or max(self.readahead, self._need()) <= self.buffered:
            if timeout:  # nothing may be read now: a readable pipe must not turn this into a spin
                time.sleep(timeout)
            return
        r, _, _ = select.select([self.fd], [], [], timeout)
        if r:
            self.fill()

    def _complete(self) -> bool:
        n = self.end - self.start
        return n >= PREFIX.size and n >= self._need()

    def next_frame(self, timeout: float | None = None, take: bool = True) -> Frame | None:
        """The next whole frame; None on timeout. Raises ChannelClosed at EOF between frames."""
        if self.pending:
            raise RuntimeError(f"{self.name}: the previous frame's payload was not read")
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._complete():
            if self.fill():
                continue
            if self.eof:
                if self.buffered:
                    raise TruncatedFrame(f"{self.name} channel: truncated frame ({self.buffered} bytes"
                                        f" of {self._need()} before the pipe closed)")
                raise ChannelClosed(f"{self.name} channel closed")
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            if not self._await(left) and left is not None:
                return None
        return self._take() if take else None

    def _await(self, timeout: float | None) -> bool:
        """Sleep until more bytes may be read (or ``timeout``); True if they may."""
        r, _, _ = select.select([self.fd], [], [], timeout)
        return bool(r)

    def peek_head(self) -> tuple[int, int]:
        """(size, send_ns) of the next frame, waiting until it is whole, without taking it."""
        self.next_frame(timeout=None, take=False)  # returns once a whole frame is buffered
        header, hlen, plen = self._header()
        return PREFIX.size + hlen + plen, header[1]

    def _header(self) -> tuple[list, int, int]:
        """The decoded header at the head of the buffer (decoded once, however often asked)."""
        if self._peeked is not None and self._peeked[0] == self.start:
            return self._peeked[1]
        hlen, plen = PREFIX.unpack_from(self.buf, self.start)
        h0 = self.start + PREFIX.size
        try:
            header = msgpack.unpackb(self.mv[h0:h0 + hlen], use_list=True, raw=False)
        except Exception as e:  # msgpack raises several types for garbage
            raise ProtocolError(f"{self.name} channel: undecodable frame header ({type(e).__name__}:"
                                f" {e})") from None
        if (not isinstance(header, list) or len(header) < 2 or not isinstance(header[0], int)
                or header[0] not in KINDS or not isinstance(header[1], int)):
            raise ProtocolError(f"{self.name} channel: unknown frame {str(header)[:80]}")
        if header[1] > time.monotonic_ns() + FUTURE_NS:  # the link would hold it until then: a hang
            raise ProtocolError(f"{self.name} channel: frame sent {(header[1] - time.monotonic_ns()) / 1e9:.3g}s"
                                f" in the future")
        self._peeked = (self.start, (header, hlen, plen))
        return header, hlen, plen

    def _take(self) -> Frame:
        header, hlen, plen = self._header()
        self._peeked = None
        h0 = self.start + PREFIX.size
        size = PREFIX.size + hlen + plen
        if self.direct:
            payload = None if plen else self.mv[0:0]
            self.pending = plen
            self.start += PREFIX.size + hlen
        else:
            payload = self.mv[h0 + hlen:h0 + hlen + plen]
            self.start += size
        self._rewind()
        self.frames_in += 1
        return Frame(header[0], header[1], header[2:], payload, size)

    def _rewind(self) -> None:
        if self.start == self.end:
            self.start = self.end = 0

    def read_payload_into(self, views: list) -> None:
        """Direct mode: read the pending payload straight into ``views`` (which add up to it)."""
        views = [memoryview(v).cast("B") for v in views]
        if sum(v.nbytes for v in views) != self.pending:
            raise ProtocolError(f"{self.name} channel: payload of {self.pending} bytes does not match"
                                f" its header")
        while views:
            try:
                n = os.readv(self.fd, views[:1024])
            except BlockingIOError:
                select.select([self.fd], [], [])
                continue
            if n == 0:
                raise TruncatedFrame(f"{self.name} channel: truncated frame ({self.pending} payload bytes"
                                    f" missing when the pipe closed)")
            self.pending -= n
            self.bytes_in += n
            while views and n >= views[0].nbytes:
                n -= views[0].nbytes
                views.pop(0)
            if n:
                views[0] = views[0][n:]

    def read_payload(self) -> memoryview:
        """Direct mode: the pending payload, read into the buffer; valid until the next frame."""
        n = self.pending
        if self.cap < n:
            self.cap = n + 65536
            self.buf = bytearray(self.cap)
            self.mv = memoryview(self.buf)
        self.start = self.end = 0
        view = self.mv[:n]
        self.read_payload_into([view])
        return view

    def close(self) -> None:
        """A broken channel is given up (a postcopy pause)."""
        os.close(self.fd)

    def reopen(self, fd: int) -> None:
        """Read a new pipe from now on (a recovered channel): what was read ahead belonged to the old
        one and is dropped, as a broken connection's receive queue is."""
        self.fd = fd
        self.start = self.end = self.pending = 0
        self._peeked = None
        self.eof = False
        self._watch(fd)

    def has_frame(self) -> bool:
        """True if a whole frame is buffered (after a non-blocking read)."""
        while not self._complete():
            if not self.fill():
                return False
        return True


class SocketReader(FrameReader):
    """A data channel's receive side when the pipe cannot hold the whole socket buffer: a thread
    drains the pipe into the read-ahead buffer while the consumer is busy, as the kernel fills a
    socket's receive buffer while the application is busy. So the sender's writes complete as fast
    as memory copies them, not at the pace the receiver happens to look at its pipe.

    A consumer that waits for bytes reads the pipe itself, as a thread blocked in recv() is woken
    by the kernel directly, and the thread is parked meanwhile: a frame that finds the consumer
    idle costs one wake-up on its way (an urgent page's path), not two. The thread is set going
    again as soon as the pipe holds bytes the consumer has not read (a stream, not one message),
    and whenever the consumer sleeps (the link's pacing).

    Bytes are only ever written past ``end``, by one reader at a time; the consumer moves the
    buffered bytes to the front (or grows the buffer) only at a frame boundary and never while the
    thread is reading.
    """

    def __init__(self, fd: int, name: str, readahead: int, max_frame: int):
        super().__init__(fd, name, readahead=readahead, max_frame=max_frame)
        lock = threading.Lock()
        self._cond = threading.Condition(lock)  # the consumer waits on it (and close)
        self._pump_cv = threading.Condition(lock)  # the thread is parked on it
        self._start_pump()

    def _start_pump(self) -> None:
        self._pump_on = True  # the thread may watch and read the pipe (the consumer does not)
        self._parked = False  # the thread waits on _pump_cv
        self._selecting = False  # the thread is waiting for the pipe to become readable
        self._reading = False  # the thread is inside readv
        self._pump_alive = True
        self._error: BaseException | None = None
        self._park = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # moves the thread off the pipe
        threading.Thread(target=self._pump, name=f"{self.name} socket", daemon=True).start()

    def _room(self) -> int:
        """Under the lock: bytes that may be read now at ``end``."""
        return min(self.cap - self.end, max(self.readahead, self._need()) - self.buffered)

    def _pump(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self.eof and not (self._pump_on and self._room() > 0):
                        self._parked = True
                        self._pump_cv.wait()
                    self._parked = False
                    if self.eof:
                        return
                    self._selecting = True
                select.select([self.fd, self._park], [], [])  # readable: data, or the writer has gone
                with self._cond:
                    self._selecting = False
                    drain_eventfd(self._park)
                    if self.eof or not self._pump_on or (n := self._room()) <= 0:
                        continue
                    self._reading = True
                    at = self.end
                got = -1
                try:
                    got = os.readv(self.fd, [self.mv[at:at + n]])
                except BlockingIOError:
                    pass
                finally:
                    with self._cond:  # the bytes count where they were read, before anything moves
                        self._reading = False
                        self._got(got)
                        self._cond.notify_all()
                if got == 0:
                    return
        except BaseException as e:  # surfaced to the consumer as a closed channel
            with self._cond:
                self._error = e
                self.eof = True
        finally:
            with self._cond:
                self._pump_alive = False
                self._cond.notify_all()

    def _got(self, got: int) -> None:
        """Under the lock: the outcome of a readv at ``end`` (-1: nothing was there)."""
        if got > 0:
            self.end += got
            self.bytes_in += got
        elif got == 0:
            self.eof = True

    def _unpark(self) -> None:
        """Under the lock: the thread's reason to wait may have gone."""
        if self._parked:
            self._pump_cv.notify()

    def _resume_pump(self, only_if_unread: bool) -> None:
        """Set the thread going again (with ``only_if_unread``: if the pipe holds bytes)."""
        if self._pump_on or (only_if_unread and not self._readable.poll(0)):
            return
        with self._cond:
            self._pump_on = True
            self._unpark()

    def fill(self) -> int:
        """At a frame boundary: set the thread going if bytes came while the consumer was busy, and
        make room for it if the buffer's tail is short."""
        self._resume_pump(only_if_unread=True)
        need = self._need()
        if self.cap - self.end >= max(self.readahead, need) - self.buffered and need <= self.cap:
            return 0
        with self._cond:
            while self._reading:
                self._cond.wait()
            if self._make_room(need):
                self._unpark()
        return 0

    def _await(self, timeout: float | None) -> bool:
        if self._error is not None:
            raise ProtocolError(f"{self.name} channel: receiving failed ({self._error})")
        with self._cond:
            # the caller found the frame incomplete before taking the lock: the bytes it lacked may
            # have come in since, and if they were the stream's last, nothing else would wake us
            end = self.end

            def ready() -> bool:
                return self.end != end or self.eof or self._complete()
            if ready():
                return True
            n = self._room()
            if self._reading or n <= 0 or not self._pump_alive:  # the thread's read will say
                self._cond.wait_for(ready, timeout)
                return ready()  # EOF while waiting: the caller says ChannelClosed, not a timeout
            self._pump_on = False
            if self._selecting:
                os.eventfd_write(self._park, 1)
            at = self.end
        got = -1
        try:
            r, _, _ = select.select([self.fd], [], [], timeout)
            if r:
                got = os.readv(self.fd, [self.mv[at:at + n]])
        except BlockingIOError:
            pass
        finally:
            with self._cond:
                self._got(got)
        if got > 0:
            self._resume_pump(only_if_unread=True)
        return got >= 0

    def wait(self, timeout: float | None) -> None:
        if timeout:
            self._resume_pump(only_if_unread=False)
            time.sleep(timeout)  # the thread reads meanwhile

    def _rewind(self) -> None:
        # never back to the front here: the frame just taken is still being placed from there,
        # and the thread would read new bytes over it; fill() moves bytes at the next boundary
        if self._pump_on:  # only the consumer changes it: no lock needed to look
            with self._cond:
                self._unpark()  # a frame was taken: room for the thread

    def close(self) -> None:
        """The thread reads EOF from now on and ends (room is made for it, in case it waits for
        some), and only then is the descriptor closed: it never reads one that was reused."""
        shutdown_pipe(self.fd, write_end=False)
        with self._cond:
            self.start = self.end = 0  # what it held is lost with the channel
            self._peeked = None
            self._pump_on = True
            self._unpark()
            if self._selecting:  # select() still watches the old pipe, whose writer may be alive
                os.eventfd_write(self._park, 1)
            if not self._cond.wait_for(lambda: not self._pump_alive, timeout=10):
                raise ProtocolError(f"{self.name} channel: its receiving thread did not stop")
        os.close(self.fd)
        os.close(self._park)

    def reopen(self, fd: int) -> None:
        super().reopen(fd)
        self._start_pump()


def expect(frame: Frame, kind: Msg, nfields: int, channel: str) -> list:
    """Check a frame's kind and arity; a mismatch is a protocol error naming the channel."""
    if frame.kind != kind or len(frame.fields) < nfields:
        raise ProtocolError(f"{channel} channel: expected {kind.name} with {nfields} fields,"
                            f" got {Msg(frame.kind).name} with {len(frame.fields)}")
    return frame.fields


# what a control message carries, by name (children -> controller and back); a name not listed
# here passes with any object and is the receiver's to refuse
CTRL_OBJECTS: dict[str, tuple[type, ...]] = {
    "error": (str,), "stats": (dict,), "event": (list,), "ready": (int,), "paused": (int,),
    "resumed": (int,),
}


def ctrl_fields(frame: Frame | None, channel: str) -> tuple[str, Any]:
    """(name, object) of a control message, checked before anyone acts on it: a corrupt control
    channel is a protocol error naming it, never an exception in the controller's bookkeeping."""
    if frame is None or frame.kind != Msg.CTRL or len(frame.fields) < 2 or not isinstance(frame.fields[0], str):
        raise ProtocolError(f"{channel} channel: malformed message"
                            + ("" if frame is None else f" {Msg(frame.kind).name} {str(frame.fields)[:60]}"))
    name, obj = frame.fields[0], frame.fields[1]
    want = CTRL_OBJECTS.get(name)
    ok = want is None or (isinstance(obj, want) and not isinstance(obj, bool))
    if ok and name == "event":
        ok = len(obj) >= 2 and isinstance(obj[0], str) and isinstance(obj[1], int) and not isinstance(obj[1], bool)
    elif ok and name == "stats":
        ok = all(isinstance(k, str) for k in obj)
    if not ok:
        raise ProtocolError(f"{channel} channel: malformed {name!r} message ({str(obj)[:60]})")
    return name, obj
