"""What each process did, recorded where it happened, for ``shmig run --trace`` (see trace.py).

Every shmig process records its own events; the controller reads them all at the end and writes
one trace. A hook is ``if self.tr: self.tr.put(...)``: with tracing off ``tr`` is None and the hook
is one attribute check. With tracing on an event is one ``struct.pack_into`` of twelve int64 into
a preallocated buffer: no Python object is kept per event (kinds are small integers, the names live
in trace.py), and no lock is taken, since each thread writes only its own slot.

The buffers are one anonymous shared mapping (the ``Arena``) that the controller creates before it
forks the children: a fixed slot per thread of every process, reserved but not committed
(``MAP_NORESERVE``: a page costs memory once written). So the controller reads what every process
recorded whatever became of it, a failed, killed or interrupted run included, which is the run
whose trace matters most; and nothing has to be sent at the end. Slots are sized so that no legal
run fills one (``Arena.for_run``); one that filled up anyway would drop what comes after and say
how much.

A row is ``t0, t1, kind, a..i``: start and end in ``time.monotonic_ns()`` (t1 == t0 for an
instant) and up to nine integer arguments whose meaning depends on the kind (listed below and
decoded by trace.py); the few strings (milestone names, a pause's reason) are interned per process
in the arena too. ``Arena.collect`` reads every slot back as a numpy structured array.
"""

from __future__ import annotations

import mmap
import struct
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .config import Config

ROW = struct.Struct("<12q")
_pack, _SIZE = ROW.pack_into, ROW.size
FIELDS = ("t0", "t1", "kind", "a", "b", "c", "d", "e", "f", "g", "h", "i")
DTYPE = np.dtype([(name, "<i8") for name in FIELDS])
SLOTS = 4  # threads per process that record (mig/src: migration, return; dst/listen: listen, fault)
SLOT_ROWS = 1 << 20  # events per thread by default (96 MiB of address space, committed as written)
SLOT_HEAD = struct.Struct("<qq32s")  # events dropped (slot full), thread id, thread name
NAMES_AT, PROC_HEAD = 256, 4096  # per process: slot heads, then interned names (NUL-separated)
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux's value; Python < 3.13 lacks the name


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


class Arena:
    """Every process's event slots in one shared mapping, made before the fork."""

    @classmethod
    def for_run(cls, cfg: Config, nprocs: int) -> "Arena":
        """Slots no legal run can fill: a thread records a few rows per frame it sends, carries or
        places (each frame holds a page at least, and no run sends more pages than its rounds,
        its postcopy and a resend per injected fault allow), a few per fault (a vCPU faults at
        most once per host page), and one per rate-limit window it sleeps through. Reserved, not
        committed: only what is written costs memory."""
        pages = (cfg.max_rounds + 3 + len(cfg.inject_faults)) * cfg.npages
        rows = 4 * pages + 4 * cfg.vcpus * (cfg.nhost + 1) + int(20 * cfg.deadline) + SLOT_ROWS
        return cls(nprocs, rows)

    def __init__(self, nprocs: int, slot_rows: int = SLOT_ROWS):
        self.nprocs = nprocs
        self.slot_rows = slot_rows
        self.rows_at = nprocs * PROC_HEAD
        self.map = mmap.mmap(-1, self.rows_at + nprocs * SLOTS * slot_rows * _SIZE,
                             flags=mmap.MAP_SHARED | MAP_NORESERVE)
        self.mv = memoryview(self.map)

    def slot_at(self, proc: int, slot: int) -> int:
        return self.rows_at + (proc * SLOTS + slot) * self.slot_rows * _SIZE

    def collect(self) -> dict[int, dict[str, Any]]:
        """Per process index: its interned names and, per thread, (tid, name, rows, dropped): a
        copy, so the mapping can go."""
        out: dict[int, dict[str, Any]] = {}
        for p in range(self.nprocs):
            head = p * PROC_HEAD
            names = bytes(self.mv[head + NAMES_AT:head + PROC_HEAD]).split(b"\0\0", 1)[0]
            threads = []
            for s in range(SLOTS):
                dropped, tid, name = SLOT_HEAD.unpack_from(self.mv, head + s * SLOT_HEAD.size)
                if not tid:
                    continue
                r = np.frombuffer(self.mv, DTYPE, self.slot_rows, self.slot_at(p, s))
                n = _written(r)
                threads.append((tid, name.rstrip(b"\0").decode(errors="replace"), r[:n].copy(), dropped))
                del r
            if threads:
                out[p] = {"names": [n.decode(errors="replace") for n in names.split(b"\0")] if names else [],
                          "threads": threads}
        return out

    def close(self) -> None:
        self.mv.release()
        self.map.close()


def _written(r: np.ndarray) -> int:
    """How many rows were written: they are a prefix, so a binary search finds its end without
    reading (and so committing) the pages past it."""
    lo, hi = 0, len(r)
    while lo < hi:
        mid = (lo + hi) // 2
        if r["kind"][mid] != 0:
            lo = mid + 1
        else:
            hi = mid
    return lo


class _Slot:
    """The rows one thread writes."""

    __slots__ = ("at", "n", "cap", "head", "dropped")

    def __init__(self, at: int, cap: int, head: int):
        self.at, self.n, self.cap, self.head, self.dropped = at, 0, cap, head, 0


class Recorder:
    """One process's events: a slot of the arena per thread (taken on the thread's first event)."""

    def __init__(self, title: str, arena: Arena, proc: int):
        self.main_thread = MAIN_THREADS.get(title, title.rpartition("/")[2])  # guest/vcpu0: vcpu0
        self.arena = arena
        self.mv = arena.mv
        self.proc = proc
        self.slots: dict[str, _Slot] = {}  # by thread name: a restarted thread goes on in its slot
        self.names: dict[str, int] = {}
        self.names_at = proc * PROC_HEAD + NAMES_AT
        self._lock = threading.Lock()  # taking a slot or interning a name: rare
        self._local = threading.local()

    def put(self, kind: int, t0: int, t1: int, a: int = 0, b: int = 0, c: int = 0, d: int = 0,
            e: int = 0, f: int = 0, g: int = 0, h: int = 0, i: int = 0) -> None:
        try:
            slot = self._local.slot
        except AttributeError:
            slot = self._attach()
        n = slot.n
        if n == slot.cap:
            self._drop(slot)
            return
        _pack(self.mv, slot.at + n * _SIZE, t0, t1, kind, a, b, c, d, e, f, g, h, i)
        slot.n = n + 1

    def instant(self, kind: int, a: int = 0, b: int = 0, c: int = 0, d: int = 0) -> None:
        """An event that takes no time, stamped now."""
        t = time.monotonic_ns()
        self.put(kind, t, t, a, b, c, d)

    def intern(self, name: str) -> int:
        """A small integer for a string a row refers to (-1 once the process's table is full)."""
        with self._lock:
            if name not in self.names:
                data = (name.encode()[:200].replace(b"\0", b" ") or b" ") + b"\0"
                end = self.names_at + sum(len(k.encode()[:200] or b" ") + 1 for k in self.names)
                if end + len(data) > (self.proc + 1) * PROC_HEAD:
                    return -1
                self.mv[end:end + len(data)] = data
                self.names[name] = len(self.names)
            return self.names[name]

    def _attach(self) -> _Slot:
        t = threading.current_thread()
        name = self.main_thread if t is threading.main_thread() else t.name
        with self._lock:
            slot = self.slots.get(name)
            if slot is None:
                i = len(self.slots)
                head = self.proc * PROC_HEAD + i * SLOT_HEAD.size
                if i < SLOTS:
                    slot = _Slot(self.arena.slot_at(self.proc, i), self.arena.slot_rows, head)
                else:  # more threads than slots: their events are dropped, and counted in the last
                    slot = _Slot(0, 0, self.proc * PROC_HEAD + (SLOTS - 1) * SLOT_HEAD.size)
                self.slots[name] = slot
                if i < SLOTS:
                    SLOT_HEAD.pack_into(self.mv, head, 0, threading.get_native_id(), name.encode()[:32])
        self._local.slot = slot
        return slot

    def _drop(self, slot: _Slot) -> None:
        slot.dropped += 1
        struct.pack_into("<q", self.mv, slot.head, slot.dropped)

