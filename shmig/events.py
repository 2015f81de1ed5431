"""What each process did, recorded where it happened, for ``shmig run --trace`` (see trace.py).

Every shmig process records its own events; the controller merges them into one trace at the end.
A hook is ``if self.tr: self.tr.put(...)``: with tracing off ``tr`` is None and the hook is one
attribute check. With tracing on an event is one ``struct.pack_into`` of ten int64 into a
preallocated per-thread buffer: no Python object is kept per event (kinds are small integers, the
names live in trace.py), and no lock is taken, since each thread writes only its own buffer.

A row is ``t0, t1, kind, a..i``: start and end in ``time.monotonic_ns()`` (t1 == t0 for an
instant) and up to nine integer arguments whose meaning depends on the kind (listed below and
decoded by trace.py); the few strings (milestone names, a pause's reason) are interned per process.
The buffers go to the controller as bytes in "trace" control messages after the process's run;
``rows()`` reads them back as a numpy structured array.
"""

from __future__ import annotations

import struct
import threading
import time
from typing import Iterator

import numpy as np

ROW = struct.Struct("<12q")
_pack, _SIZE = ROW.pack_into, ROW.size
FIELDS = ("t0", "t1", "kind", "a", "b", "c", "d", "e", "f", "g", "h", "i")
DTYPE = np.dtype([(name, "<i8") for name in FIELDS])
INITIAL_ROWS = 4096  # per thread; doubles when full
CHUNK_ROWS = 2700  # rows per control message (259200 bytes, well under a frame header's limit)


class K:
    """Event kinds, and what their arguments a..i hold (plain ints: an IntEnum member costs a
    descriptor call at every hook)."""

    # mig/src
    SEND = 1  # a PAGES frame written: a channel, b frame seq on the channel, c bytes, d pages,
    # e first target page, f bytes queued on the channel after it, g pages left to send
    SEND_URGENT = 2  # the same, for requested pages
    WRITE_SPACE = 3  # the sender blocked for write space: a channel (t0..t1 inside a SEND)
    RATE_LIMIT = 4  # a rate-limit sleep: a 1 if a page request ended it (else the window did),
    # b 1 if a request could end it, c the window's budget in bytes
    REQUEST = 5  # the return thread took a REQ_PAGES off the return path and handed it to the
    # policy: a host page, b the frame's send time (the one-way latency runs from it)
    SYNC = 6  # dirty-log sync: a pages newly dirty, b pages left to send, c sync count
    ROUND = 7  # a precopy round: a its number
    MILESTONE = 8  # Child.event (setup_done, stop_vm, postcopy_paused, ...): a its name, b what it
    # said (-1: nothing), as indices in the process's interned names
    STOP_VM = 9  # the source waits for the guest to stop (switchover)
    DISCARD = 10  # the discard list sent: a runs, b host pages
    PREEMPT = 11  # 7.1 break-huge: host page a interrupted before target page b
    RESUME = 12  # host page a resumed at target page b; c 1 if urgently (it was requested itself)
    # mig/dst/listen, mig/dst/preempt
    RECV = 13  # a frame other than PAGES taken off the wire (t0: it was whole at the head of the
    # queue; t1: the link had carried it and its latency had passed): a channel, b its send time
    # (the header's: it names the frame on both sides, whatever was lost in a broken channel),
    # c bytes, d Msg kind, e bytes queued after it, f when the link finished carrying it
    PLACE = 14  # a PAGES frame taken off the wire (t0, as RECV) and placed (by t1): a channel,
    # b its send time, c bytes, d pages, e first and f last target page, g when it was taken (the
    # placement began), h when the link finished carrying it, i bytes queued once it was placed
    PLACE_URGENT = 15  # the same, for a frame of requested pages
    WAKE = 16  # a placed host page a woke vCPU b (the frame: c channel, d its send time)
    DISCARD_APPLIED = 17  # a host pages dropped from receivedmap
    RUNNING = 18  # PACKAGED loaded: the guest runs on the destination
    FAULT_SEEN = 19  # fault thread: vCPU a faulted on host page b; c 0: REQ_PAGES written on the
    # return path (by t1), 1: the page was already placed, 2: already requested, 3: the request
    # waits for a postcopy recovery
    # guest/vcpuN
    FAULT = 20  # a fault: a host page, b target page, c 1 if resolved, d when an eventfd
    # wake-up last ended a sleep (0: none during this fault)
    PAUSED = 21  # the vCPU is paused for switchover


# the thread a process starts with, named as QEMU names the thread doing that work
MAIN_THREADS = {"mig/src": "migration", "mig/dst/listen": "listen", "mig/dst/preempt": "preempt"}


class _Buffer:
    """One thread's rows, in a bytearray that doubles when full."""

    __slots__ = ("name", "tid", "data", "off")

    def __init__(self, name: str, tid: int):
        self.name = name
        self.tid = tid
        self.data = bytearray(INITIAL_ROWS * ROW.size)
        self.off = 0


class Recorder:
    """One process's events, one buffer per thread (created on the thread's first event)."""

    def __init__(self, title: str):
        self.main_thread = MAIN_THREADS.get(title, title.rpartition("/")[2])  # guest/vcpu0: vcpu0
        self.buffers: list[_Buffer] = []
        self.names: dict[str, int] = {}
        self._local = threading.local()

    def put(self, kind: int, t0: int, t1: int, a: int = 0, b: int = 0, c: int = 0, d: int = 0,
            e: int = 0, f: int = 0, g: int = 0, h: int = 0, i: int = 0) -> None:
        try:
            buf = self._local.buf
        except AttributeError:
            buf = self._attach()
        off = buf.off
        if off == len(buf.data):
            buf.data.extend(bytes(off))
        _pack(buf.data, off, t0, t1, kind, a, b, c, d, e, f, g, h, i)
        buf.off = off + _SIZE

    def instant(self, kind: int, a: int = 0, b: int = 0, c: int = 0, d: int = 0) -> None:
        """An event that takes no time, stamped now."""
        t = time.monotonic_ns()
        self.put(kind, t, t, a, b, c, d)

    def intern(self, name: str) -> int:
        """A small integer for a string a row refers to (``chunks`` carries the table)."""
        return self.names.setdefault(name, len(self.names))

    def _attach(self) -> _Buffer:
        t = threading.current_thread()
        name = self.main_thread if t is threading.main_thread() else t.name
        buf = _Buffer(name, threading.get_native_id())
        self._local.buf = buf
        self.buffers.append(buf)
        return buf

    def chunks(self) -> Iterator[list]:
        """[thread id, thread name, rows as bytes, interned names] messages, each at most
        CHUNK_ROWS rows."""
        step = CHUNK_ROWS * ROW.size
        names = list(self.names)
        for buf in list(self.buffers):
            data = memoryview(buf.data)[:buf.off]
            for i in range(0, buf.off, step):
                yield [buf.tid, buf.name, bytes(data[i:i + step]), names]


def rows(data: bytes) -> np.ndarray:
    """A thread's rows (``Recorder.chunks`` joined) as a structured array."""
    return np.frombuffer(data, DTYPE)
