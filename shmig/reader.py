"""Reading frames off a pipe into one preallocated buffer, without a copy through msgpack.

The length prefix tells where a header ends and its payload begins: the header is decoded (once),
the payload is handed out as a view of the buffer, or (``direct``) left in the pipe for the caller
to read straight into destination RAM. A malformed prefix, an undecodable or unknown header, a
send time in the future, and a pipe that closes mid-frame are protocol errors naming the channel.
"""

from __future__ import annotations

import os
import select
import time

import msgpack

from .wire import (FUTURE_NS, KINDS, MAX_HEADER, MAX_PAYLOAD, PREFIX, ChannelClosed, Frame, ProtocolError,
                   TruncatedFrame)


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
                 direct: bool = False, strict: bool = False):
        self.fd = fd
        self.name = name
        self.direct = direct
        # the buffer is sized for frames up to max_frame and grows for a larger one; ``strict``: no
        # frame of this channel is ever larger (the control channel), so a larger one is corrupt
        self.limit = max_frame if strict else None
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
        if self.limit is not None and PREFIX.size + hlen + plen > self.limit:
            raise ProtocolError(f"{self.name} channel: frame of {PREFIX.size + hlen + plen} bytes is larger"
                                f" than the channel's limit of {self.limit}")
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
