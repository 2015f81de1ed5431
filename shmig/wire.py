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
import struct
import time
from typing import Any, Protocol, Sequence

import msgpack

from .fds import writev_all

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
    MULTIFD_SYNC = 16  # a multifd channel's SYNC packet (MULTIFD_FLAG_SYNC): every page before it was sent
    MULTIFD_FLUSH = 17  # RAM_SAVE_FLAG_MULTIFD_FLUSH on the main channel: wait for every channel's SYNC


KINDS = frozenset(int(k) for k in Msg)


class ProtocolError(Exception):
    """A malformed, truncated or unexpected frame: the run stops, naming the channel."""


class ChannelClosed(EOFError):
    """The other end closed the pipe at a frame boundary."""


class TruncatedFrame(ProtocolError):
    """The pipe closed in the middle of a frame: a broken channel (during postcopy, a reason to pause,
    as a dropped connection is; anywhere else, a protocol error like any other)."""



class SocketQueue(Protocol):
    """What a data channel's writer asks of the emulated link (``link.Link``): room in the socket
    queue before a frame is made, and the frame counted once it is queued."""

    def wait_for_space(self, ch: int, nbytes: int) -> int: ...

    def sent(self, ch: int, nbytes: int) -> None: ...


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


class FrameWriter:
    """Sends frames on one pipe; counts what it sent.

    A data channel's writer goes through the link's socket queue (``link``, channel ``ch``): a
    frame that does not fit waits for Linux's write-space wake-up, and what is written is queued
    until the link has carried it.
    """

    def __init__(self, fd: int, name: str, link: SocketQueue | None = None, ch: int = 0):
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


def expect(frame: Frame, kind: Msg, nfields: int, channel: str) -> list:
    """Check a frame's kind and arity; a mismatch is a protocol error naming the channel."""
    if frame.kind != kind or len(frame.fields) < nfields:
        raise ProtocolError(f"{channel} channel: expected {kind.name} with {nfields} fields,"
                            f" got {Msg(frame.kind).name} with {len(frame.fields)}")
    return frame.fields
