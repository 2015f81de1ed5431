"""mig/src: the migration thread (precopy scan, switchover, postcopy background) and the return thread.

Vocabulary follows QEMU's migration/ram.c: the migration bitmap (``dirty``, one bool per target
page) is set by a dirty-log sync and cleared as pages are sent; requests arrive on the return path
as whole host pages; the request-servicing policy (``policies``) decides which thread sends what on
which channel.
"""

from __future__ import annotations

import collections
import contextlib
import os
import select
import struct
import sys
import threading
import time
from typing import Any

import numpy as np

from . import memory
from .clock import Clock
from .config import TARGET_PAGE
from .events import K, Recorder
from .faults import CHANNELS, Fault, FaultInjector
from .policies import make_policy
from .process import Child
from .wire import (ChannelClosed, Frame, FrameReader, FrameWriter, Msg, ProtocolError, TruncatedFrame, drain_eventfd,
                   expect, frame_head, shutdown_pipe, writev_all)

FRAME_PAGES_PRECOPY = 256  # up to 1 MiB frames while nothing waits on the channel: throughput
FRAME_PAGES_POSTCOPY = 64  # 256 KiB frames once faults wait: the granularity of preemption checks (a
# quarter of a millisecond at 10 Gbit/s; smaller frames cost more Python per byte than the link does)
SPLICE_PAGES = 16  # runs at least this long are spliced rather than copied
BUFFER_DELAY = 0.1  # QEMU's rate-limit window (emulated seconds)
MAX_DISCARDS = 4096  # host page runs per DISCARD frame
ONE_PAGE = struct.Struct("<I")  # a PAGES frame's target page list when it holds one page


class RateLimiter:
    """QEMU's migration rate limit: a budget of ``rate * BUFFER_DELAY`` bytes per 100 ms window.

    Windows and rates are emulated time (``Clock``): dilated N times, a window lasts N times longer
    in real time and holds the same budget.
    """

    tr: Recorder | None = None  # the source's event recorder, when tracing

    def __init__(self, rate: float | None, clock: Clock):
        self.window_s = clock.real(BUFFER_DELAY)
        self.set_rate(rate)

    def set_rate(self, rate: float | None) -> None:
        self.budget = None if rate is None else rate * BUFFER_DELAY
        self.window = time.monotonic()
        self.used = 0

    def account(self, n: int) -> None:
        self.used += n

    def exceeded(self) -> bool:
        """migration_rate_exceeded; a window that has ended starts a new one (migration_update_counters)."""
        if self.budget is None:
            return False
        now = time.monotonic()
        if now - self.window >= self.window_s:
            self.window = now
            self.used = 0
        return self.used >= self.budget

    def sleep(self, wake: threading.Event | None = None) -> bool:
        """migration_rate_limit: with the budget spent, sleep until the window ends; a queued page
        request (``wake``, QEMU's rate_limit_sem) ends the sleep early. The event is left set, as
        QEMU posts the semaphore back: until the request is served, every later sleep returns at
        once. Returns True if a request ended the sleep."""
        if not self.exceeded():
            return False
        left = self.window + self.window_s - time.monotonic()
        if left <= 0:
            return False
        t0 = time.monotonic_ns()
        woken = wake.wait(left) if wake is not None else time.sleep(left)
        if self.tr:
            self.tr.put(K.RATE_LIMIT, t0, time.monotonic_ns(), bool(woken), wake is not None, int(self.budget or 0))
        if woken:
            return True
        self.exceeded()  # the window has ended: a new one starts before anything else is sent
        return False


class PostcopyPaused(Exception):
    """A channel broke during postcopy: the migration thread leaves what it was doing and pauses."""


BROKEN = (ChannelClosed, TruncatedFrame, PostcopyPaused)  # what pauses a postcopy migration


class Source(Child):
    proc_index = 0
    title = "mig/src"

    def setup(self) -> None:
        cfg = self.cfg
        self.k = cfg.tp_per_hp
        self.nhost = cfg.nhost
        self.src_pages = self.mem.pages(self.mem.src)
        self.src_fd = self.mem.src_fd
        if cfg.prefault:
            memory.populate(self.mem.src, write=False)
        self.dirty = np.ones(cfg.npages, dtype=bool)  # the migration bitmap: starts all-dirty
        self.remaining = cfg.npages
        self.last_log = self.mem.dirty.copy()
        self.dirty_sync_count = 1  # ram_init_bitmaps syncs once
        self.pre = FrameWriter(self.fds["precopy"], "precopy", self.link, 0)
        self.post = FrameWriter(self.fds["postcopy"], "postcopy", self.link, 1) if "postcopy" in self.fds else None
        self.return_reader = FrameReader(self.fds["return"], "return path", max_frame=1 << 16)
        self.bitmap_lock = threading.Lock()
        self.requests: collections.deque[int] = collections.deque()
        self.urgent = threading.Event()  # migration_make_urgent_request
        self.scan_hp = 0  # last_seen_block/last_page, in host pages
        self.phase = "setup"
        self.clock = cfg.clock
        self.limiter = RateLimiter(cfg.max_bandwidth, self.clock)
        self.limiter.tr = self.tr
        # a frame is at most a quarter of the socket buffer, so a queue always holds several
        self.precopy_frame_pages = max(1, min(FRAME_PAGES_PRECOPY, cfg.socket_buffer // TARGET_PAGE // 4))
        self.buf = np.empty((self.precopy_frame_pages, TARGET_PAGE), np.uint8)
        self.stats: dict[str, Any] = collections.defaultdict(int)
        self.stats["channel_bytes"] = {"precopy": 0, "postcopy": 0}
        self.rounds = 0
        self.start_postcopy_requested = False
        self.policy = make_policy(cfg, self)
        self.frame_pages = self.precopy_frame_pages
        self.events: dict[str, int] = {}
        # postcopy recovery: a broken channel pauses the migration (faults.py injects such breaks)
        self.faults = FaultInjector(cfg.inject_faults, self.clock)
        self.migration_ident = threading.get_ident()  # only the migration thread injects faults
        self.pausable = False  # from postcopy start until the last EOS: a broken channel pauses
        self.pausing: str | None = None  # why the channels were shut down; None while they work
        self.pause_lock = threading.Lock()
        self.fault_cond = threading.Condition()  # the faults still to inject; ``active`` changes
        self.active = False  # postcopy with its channels up: a fault may fire
        self.finished = False
        self.rp_wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # ends the return thread's wait
        self.pauses: list[dict[str, Any]] = []
        sys.setswitchinterval(0.0005)  # the return thread must not wait 5 ms for the GIL

    # -- sending ------------------------------------------------------------
    def send_pages(self, writer: FrameWriter, tps: np.ndarray, urgent: bool,
                   buf: np.ndarray | None = None) -> int:
        """One PAGES frame; zero pages go as flags only (QEMU's save_zero_page).

        A long run of consecutive non-zero pages is spliced from the guest RAM segment into the
        pipe (no copy in this process); other pages are written straight out of guest RAM, or
        gathered into a reused buffer when scattered.
        """
        self.between_frames(writer, tps)
        n = len(tps)
        first = int(tps[0])
        run = int(tps[-1]) - first == n - 1
        if run:
            pages = self.src_pages[first:first + n]
        else:
            pages = (self.buf if buf is None else buf)[:n]
            np.take(self.src_pages, tps, axis=0, out=pages)
        words = pages.view(np.uint64)
        if n == 1:  # an urgent 4 KiB page: scalars only (buffer_is_zero fails on word 0 mostly)
            nzero = int(words[0, 0] == 0 and not words[0].any())
            fields = (ONE_PAGE.pack(first), b"\x01" if nzero else None, urgent)
            payload = [] if nzero else [pages]
        else:
            maybe = np.flatnonzero(words[:, 0] == 0)
            zero = np.zeros(n, dtype=bool)
            if maybe.size:
                zero[maybe] = ~words[maybe].any(axis=1)
            nzero = int(np.count_nonzero(zero))
            fields = (tps.astype(np.uint32).tobytes(), zero.view(np.uint8).tobytes() if nzero else None, urgent)
            payload = [pages[~zero]] if nzero else [pages]
        if self.tr:
            t0, blocked = time.monotonic_ns(), writer.blocked_ns
        if nzero == 0 and run and n >= SPLICE_PAGES and self.src_fd is not None:
            sent = writer.send_file(Msg.PAGES, fields, self.src_fd, first * TARGET_PAGE, n * TARGET_PAGE)
        else:
            sent = writer.send(Msg.PAGES, fields, payload)
        if self.tr:
            self.trace_send(writer, t0, blocked, sent, n, first, urgent)
        st = self.stats
        st["normal_pages"] += n - nzero
        st["zero_pages"] += nzero
        st["transferred"] += sent
        st["channel_bytes"][writer.name] += sent
        st[self.phase + "_bytes"] += sent
        if writer is self.post:
            self.mem.counters[memory.C_POSTCOPY_BYTES] += sent
        else:
            self.mem.counters[memory.C_PRECOPY_BYTES] += sent
        return sent

    def trace_send(self, writer: FrameWriter, t0: int, blocked: int, sent: int, n: int, first: int,
                   urgent: bool) -> None:
        """A PAGES frame sent since ``t0``, and the write-space wait it began with (if any)."""
        t1 = time.monotonic_ns()
        self.tr.put(K.SEND_URGENT if urgent else K.SEND, t0, t1, writer.ch, writer.frames_out, sent, n, first,
                    self.link.queued(writer.ch), self.remaining)
        if writer.blocked_ns > blocked:
            self.tr.put(K.WRITE_SPACE, t0, min(t1, t0 + writer.blocked_ns - blocked), writer.ch)

    def clear(self, tps: np.ndarray) -> None:
        self.dirty[tps] = False
        self.remaining -= len(tps)
        self.mem.counters[memory.C_REMAINING] = self.remaining

    def host_dirty(self, hp: int) -> bool:
        k = self.k
        if k == 1:  # a request's first question, on every fault: a scalar, not an array call
            return bool(self.dirty[hp])
        return bool(self.dirty[hp * k:(hp + 1) * k].any())

    def host_tps(self, hp: int, first: int = 0) -> np.ndarray:
        """The dirty target pages of host page ``hp`` from target offset ``first`` on."""
        if self.k == 1:
            return np.array([hp] if self.dirty[hp] else [], np.int64)
        base = hp * self.k + first
        return np.flatnonzero(self.dirty[base:(hp + 1) * self.k]) + base

    def next_dirty_hosts(self, limit: int, window: int = 8192) -> np.ndarray:
        """Up to ``limit`` dirty host pages from the scan position on, wrapping once (find_dirty_block)."""
        if self.remaining == 0:
            return np.empty(0, np.int64)
        k, n = self.k, self.nhost
        pos = self.scan_hp % n
        scanned = 0
        while scanned < n:
            end = min(pos + window, n)
            if k == 1:
                idx = np.flatnonzero(self.dirty[pos:end])
            else:
                idx = np.flatnonzero(self.dirty[pos * k:end * k].reshape(-1, k).any(axis=1))
            if idx.size:
                return idx[:limit] + pos
            scanned += end - pos
            pos = end % n
        return np.empty(0, np.int64)

    def send_host_page(self, hp: int, writer: FrameWriter, urgent: bool, first: int = 0,
                       may_preempt: bool = False, lock: bool = False) -> int | None:
        """ram_save_host_page: the dirty target pages of one host page, frame by frame.

        Returns None when done, or the target offset where it stopped because ``may_preempt`` and a
        request is pending (QEMU 7.1 break-huge). With ``lock`` the bitmap lock is taken around each
        bitmap update and released while the frame is written (QEMU 8.0+ background thread).
        """
        k = self.k
        fp = self.frame_pages
        base = hp * k
        off = first
        while off < k:
            if may_preempt and self.requests:
                return off
            with self.bitmap_lock if lock else contextlib.nullcontext():
                tps = np.flatnonzero(self.dirty[base + off:base + min(off + fp, k)]) + base + off
                self.clear(tps)
            off = min(off + fp, k)
            if tps.size:
                n = self.send_pages(writer, tps, urgent)
                self.account(writer, n, urgent)
                if k > 1:  # rate limiting in the middle of a huge page, urgent or not, as QEMU
                    self.limiter.sleep(self.policy.rate_wake)
        return None

    def send_host_batch(self, hps: np.ndarray, writer: FrameWriter, urgent: bool) -> None:
        """Several 4 KiB host pages in one frame (each is whole, none is ever broken)."""
        self.clear(hps)
        n = self.send_pages(writer, hps, urgent)
        self.account(writer, n, urgent)

    def account(self, writer: FrameWriter, n: int, urgent: bool) -> None:
        """Count bytes against the source rate limit, as QEMU does per version (see policies)."""
        if self.policy.counts_against_limit(writer, urgent):
            self.limiter.account(n)

    # -- control ------------------------------------------------------------
    def on_ctrl(self, name: str) -> None:
        """A QMP-like command from the controller."""
        if name != "start_postcopy":
            raise ProtocolError(f"control channel: unexpected {name!r} for mig/src")
        self.start_postcopy_requested = self.cfg.postcopy  # refused without postcopy

    def poll_control(self) -> None:
        """Between frames: a command, or an error the return thread ran into."""
        if self.return_error is not None:
            raise self.return_error
        while self.ctrl_in.has_frame():
            self.on_ctrl(self.recv_ctrl()[0])

    def wait_ctrl(self, want: str, doing: str = "") -> Any:
        self.status(f"{doing}waiting for the controller's {want!r}")
        while True:
            name, obj = self.recv_ctrl()
            if name == want:
                return obj
            self.on_ctrl(name)

    def event(self, name: str, *info: Any) -> int:
        self.events[name] = super().event(name, *info)
        return self.events[name]

    # -- migration flow -----------------------------------------------------
    def sync(self) -> None:
        """migration_bitmap_sync: every page whose dirty-log counter moved is dirty again."""
        t0 = time.monotonic_ns()
        log = self.mem.dirty.copy()
        changed = log != self.last_log
        self.last_log = log
        newly = changed & ~self.dirty
        self.dirty |= changed
        self.remaining += int(np.count_nonzero(newly))
        self.mem.counters[memory.C_REMAINING] = self.remaining
        self.dirty_sync_count += 1
        if self.tr:
            self.tr.put(K.SYNC, t0, time.monotonic_ns(), int(np.count_nonzero(newly)), self.remaining,
                        self.dirty_sync_count)

    def run(self) -> None:
        self.mem.counters[memory.C_REMAINING] = self.remaining
        self.wait_ctrl("start")  # the guest is up and running: the migration starts
        # setup: the main channel first; the postcopy channel only once the main one is confirmed
        self.status("setup: PING on the main channel, waiting for PONG on the return path")
        self.pre.send(Msg.PING, (1,))
        expect(self.return_reader.next_frame(), Msg.PONG, 0, "return path")
        if self.post is not None:
            self.post.send(Msg.HELLO, ())
        self.phase = "precopy"
        self.event("setup_done")
        self.start_return_thread()
        switch = self.precopy()
        if switch == "postcopy":
            self.switchover_postcopy()
            self.postcopy()
        else:
            self.stop_and_copy()
            self.complete()
        self.event("completed")
        self.status("completed: waiting for the destination's SHUT on the return path")
        self.return_thread.join()
        if self.return_error is not None:
            raise self.return_error
        self.ctrl_out.ctrl("stats", self.final_stats())

    def precopy(self) -> str:
        """Rounds until the switch condition. Returns 'postcopy' or 'complete'."""
        cfg = self.cfg
        postcopy_rounds = cfg.precopy_rounds if cfg.postcopy else None
        self.limiter.set_rate(cfg.max_bandwidth)  # the first window starts with the migration
        while True:
            self.poll_control()
            if cfg.postcopy and (self.start_postcopy_requested or
                                 (postcopy_rounds is not None and self.rounds >= postcopy_rounds)):
                return "postcopy"
            self.status(f"precopy round {self.rounds + 1}")
            t_round = time.monotonic_ns()
            t0 = time.monotonic()
            before = self.stats["transferred"]
            self.precopy_round()
            if self.start_postcopy_requested:
                return "postcopy"
            elapsed = max(time.monotonic() - t0, 1e-6)
            self.rounds += 1
            self.mem.counters[memory.C_ROUNDS] = self.rounds
            self.sync()
            bw = (self.stats["transferred"] - before) / elapsed  # real bytes per real second
            threshold = bw * self.clock.real(cfg.downtime_limit)
            self.pre.send(Msg.ROUND, (self.rounds,))
            if self.tr:
                self.tr.put(K.ROUND, t_round, time.monotonic_ns(), self.rounds)
            if not cfg.postcopy or postcopy_rounds is None:
                if self.remaining * TARGET_PAGE <= threshold or self.rounds >= cfg.max_rounds:
                    self.stats["converged"] = self.remaining * TARGET_PAGE <= threshold
                    self.stats["expected_downtime_ms"] = round(
                        self.clock.emulated_ms(self.remaining * TARGET_PAGE / max(bw, 1.0) * 1e9), 3)
                    return "complete"

    def precopy_round(self, final: bool = False) -> None:
        """One pass over the dirty pages. The ``final`` one (stop-and-copy, QEMU's
        ram_save_complete) is neither rate limited nor interrupted by a command."""
        idx = np.flatnonzero(self.dirty)
        fp = self.frame_pages
        for i in range(0, len(idx), fp):
            if not final and i % (fp * 16) == 0:
                self.poll_control()
                if self.start_postcopy_requested:
                    return
            tps = idx[i:i + fp]
            self.clear(tps)
            n = self.send_pages(self.pre, tps, False)
            if not final:
                self.limiter.account(n)
                self.limiter.sleep()

    def stop_vm(self) -> None:
        """Ask the controller to pause the guest; downtime runs from here."""
        self.event("stop_vm")
        self.wait_ctrl("vm_stopped")
        if self.tr:
            self.tr.put(K.STOP_VM, self.events["stop_vm"], time.monotonic_ns())
        self.phase = "downtime"

    def stop_and_copy(self) -> None:
        self.status("stop-and-copy")
        self.stop_vm()
        self.sync()
        self.precopy_round(final=True)

    def switchover_postcopy(self) -> None:
        """postcopy_start: stop, last sync, whole host pages, discard, package; the guest resumes."""
        self.status("switchover: stopping the guest")
        self.stop_vm()
        self.sync()
        k = self.k
        hdirty = self.dirty.reshape(-1, k).any(axis=1)  # postcopy_chunk_hostpages_pass
        if k > 1:
            self.dirty[:] = np.repeat(hdirty, k)
            self.remaining = int(np.count_nonzero(self.dirty))
            self.mem.counters[memory.C_REMAINING] = self.remaining
        # runs of dirty host pages -> discard ranges
        d = np.diff(np.concatenate(([0], hdirty.view(np.int8), [0])))
        starts = np.flatnonzero(d == 1)
        ends = np.flatnonzero(d == -1)
        runs = np.stack([starts, ends - starts], axis=1).astype(np.uint32)
        t0 = time.monotonic_ns()
        for i in range(0, len(runs), MAX_DISCARDS):
            self.pre.send(Msg.DISCARD, (runs[i:i + MAX_DISCARDS].tobytes(),))
        self.stats["discarded_host_pages"] = int(hdirty.sum())
        if self.tr:
            self.tr.put(K.DISCARD, t0, time.monotonic_ns(), len(runs), self.stats["discarded_host_pages"])
        self.pre.send(Msg.PACKAGED, ())
        self.event("postcopy_start")
        self.phase = "postcopy"
        self.frame_pages = min(FRAME_PAGES_POSTCOPY, self.precopy_frame_pages)
        self.scan_hp = 0  # last_seen_block reset
        self.limiter.set_rate(self.cfg.max_postcopy_bandwidth)

    def finish_postcopy(self) -> None:
        if self.post is not None:
            with self.bitmap_lock:  # an urgent page being sent by the return thread finishes first
                self.post.send(Msg.EOS, ())

    def complete(self) -> None:
        """EOS on every channel: the destination has everything once it has loaded them."""
        self.finish_postcopy()
        self.pre.send(Msg.EOS, ())

    # -- postcopy recovery (migration.c postcopy_pause / postcopy_do_resume) -------------------------
    def postcopy(self) -> None:
        """The postcopy phase to its end; a broken channel pauses it until a recovery succeeds."""
        self.faults.arm(self.remaining)
        self.pausable = True
        self.set_active(True)
        timer = threading.Thread(target=self.fault_timer, name="faults", daemon=True)
        if self.faults.next_time_ns() is not None:
            timer.start()
        self.status("postcopy: background scan and page requests")
        while True:
            try:
                self.policy.run_postcopy()
                self.complete()
                break
            except BROKEN as e:
                self.postcopy_pause(str(e))
                while not self.postcopy_resume():
                    pass  # it broke again during the recovery: paused again (QEMU's double failure)
        self.pausable = False
        with self.fault_cond:
            self.finished = True
            self.fault_cond.notify()
        if timer.is_alive():
            timer.join()

    def set_active(self, active: bool) -> None:
        with self.fault_cond:
            self.active = active
            self.fault_cond.notify()

    def between_frames(self, writer: FrameWriter, tps: np.ndarray) -> None:
        """Before each frame: a fault that is due breaks its channel (in the migration thread, once the
        destination runs the guest), and a paused migration sends nothing more."""
        if (self.faults.pending and self.active and threading.get_ident() == self.migration_ident
                and self.mem.ctl[memory.DST_POSTCOPY]):
            with self.fault_cond:
                faults = self.faults.due(self.remaining)
            self.inject(faults, writer, tps)
        if self.pausing is not None:
            raise PostcopyPaused(self.pausing)

    def fault_timer(self) -> None:
        """Faults given as a time fire on time, whatever the migration thread is doing (blocked on a
        full queue, asleep on the rate limit): a connection drops whatever its sender does. One that
        comes due while the migration is paused is left to the recovery (postcopy_resume)."""
        with self.fault_cond:
            while not self.finished:
                t = self.faults.next_time_ns()
                if t is None:
                    return
                left = (t - time.monotonic_ns()) / 1e9
                if left > 0 or not self.active:
                    self.fault_cond.wait(left if left > 0 else None)
                elif not self.mem.ctl[memory.DST_POSTCOPY]:
                    self.fault_cond.wait(0.005)  # the destination is still loading the package
                else:
                    faults = self.faults.due(self.remaining)
                    if faults:
                        self.break_channels(faults)
                        self.request_pause(f"injected fault {faults[0]}")

    def inject(self, faults: list[Fault], writer: FrameWriter | None = None,
               tps: np.ndarray | None = None) -> None:
        """Break the channels of these faults, then pause (raises PostcopyPaused)."""
        if faults:
            self.break_channels(faults, writer, tps)
            self.request_pause(f"injected fault {faults[0]}")
            raise PostcopyPaused(self.pausing)

    def break_channels(self, faults: list[Fault], writer: FrameWriter | None = None,
                       tps: np.ndarray | None = None) -> None:
        """Break the channels of these faults as a dropped connection breaks. The channel ``writer``
        was about to send ``tps`` on breaks in the middle of that frame."""
        for f in faults:
            if f.what == "return-path":
                shutdown_pipe(self.return_reader.fd, write_end=False)
                continue
            w = self.pre if f.what == "precopy-channel" else self.post
            assert w is not None  # validated: no postcopy-channel fault without the channel
            if w is writer and tps is not None:  # this thread is the one writing it: no other frame interleaves
                self.write_partial_frame(w, tps)
            shutdown_pipe(w.fd, write_end=True)  # atomic: a frame another thread is writing ends short

    def write_partial_frame(self, writer: FrameWriter, tps: np.ndarray) -> None:
        """The first half of the frame of ``tps``: the receiver sees the channel close mid-frame."""
        data = np.take(self.src_pages, tps, axis=0).reshape(-1)
        head = frame_head(Msg.PAGES, (tps.astype(np.uint32).tobytes(), None, False), data.nbytes)
        try:
            writev_all(writer.fd, [head, data[:data.nbytes // 2]])
        except OSError:
            pass  # the receiver has gone already

    def request_pause(self, reason: str) -> None:
        """From any thread: shut every channel down (QEMU's migration_release_dst_files plus the
        shutdown of the main channel), so the destination pauses too, and wake both threads."""
        with self.pause_lock:
            if self.pausing is not None:
                return
            self.pausing = reason
        self.set_active(False)
        for w in (self.pre, self.post):
            if w is not None:
                shutdown_pipe(w.fd, write_end=True)
        shutdown_pipe(self.return_reader.fd, write_end=False)
        self.link.drop_queues()  # a sender waiting for room in a queue nobody will drain gives up
        self.return_error = PostcopyPaused(reason)
        os.eventfd_write(self.rp_wake, 1)
        self.urgent.set()

    def postcopy_pause(self, reason: str, during: str = "postcopy") -> None:
        """postcopy_pause: the channels are shut, the return thread ends, the controller is told."""
        self.request_pause(reason)
        self.return_thread.join()
        for fd in (self.pre.fd, self.return_reader.fd, *([self.post.fd] if self.post else [])):
            os.close(fd)
        self.stats["postcopy_pauses"] += 1
        self.status(f"postcopy-paused ({self.pausing}): waiting for the controller's 'resume'")
        self.pauses.append({"reason": self.pausing, "during": during,
                            "paused_ns": self.event("postcopy_paused", self.pausing)})

    def postcopy_resume(self) -> bool:
        """migrate resume=true (postcopy_do_resume): the new main channel and return path first; the
        destination's receivedmap reloads the dirty bitmap; only then the new preempt channel; then
        the RESUME handshake. False if a channel broke on the way (paused again)."""
        names = self.wait_ctrl("resume", doing=f"postcopy-paused ({self.pausing}): ")
        fds = self.take_channels(names)
        self.pre.fd = fds["precopy"]
        self.return_reader.reopen(fds["return"])
        if self.post is not None:
            self.post.fd = fds["postcopy"]
        drain_eventfd(self.rp_wake)
        self.pausing = None
        self.return_error = None
        try:
            self.status("postcopy-recover: asking for the destination's receivedmap")
            self.inject_in_recovery(("precopy-channel", "return-path"))
            self.pre.send(Msg.RECV_BITMAP, ())
            f = self.rp_next_frame()
            expect(f, Msg.RECV_BITMAP, 0, "return path")
            self.reload_dirty_bitmap(f)
            self.pauses[-1]["recv_bitmap_ns"] = self.event("recv_bitmap")
            if self.post is not None:  # postcopy_preempt_establish_channel, after the main channel
                self.post.send(Msg.HELLO, ())
                self.pauses[-1]["preempt_channel_ns"] = self.event("preempt_channel")
            self.inject_in_recovery()
            self.status("postcopy-recover: RESUME sent, waiting for RESUME_ACK")
            self.pre.send(Msg.RESUME, ())
            expect(self.rp_next_frame(), Msg.RESUME_ACK, 0, "return path")
        except BROKEN as e:
            self.postcopy_pause(str(e), during="recovery")
            return False
        self.stats["recoveries"] += 1
        self.pauses[-1]["resumed_ns"] = self.event("postcopy_resumed")
        self.start_return_thread()
        self.set_active(True)
        self.status("postcopy: background scan and page requests (recovered)")
        return True

    def inject_in_recovery(self, channels: tuple[str, ...] = CHANNELS) -> None:
        """A fault that came due while paused breaks a new channel as soon as it exists."""
        with self.fault_cond:
            faults = self.faults.due(self.remaining, channels, "recovery")
        self.inject(faults)

    def reload_dirty_bitmap(self, f: Frame) -> None:
        """ram_dirty_bitmap_reload: every page the destination has not received is dirty again
        (sent but lost on the way, or never sent); the request-servicing state starts afresh."""
        n = self.cfg.npages
        bits = np.frombuffer(f.payload if f.payload is not None else b"", np.uint8)
        if bits.size != (n + 7) // 8:
            raise ProtocolError(f"return path: receivedmap of {bits.size} bytes for {n} pages")
        missing = np.unpackbits(bits, count=n, bitorder="little") == 0
        resent = int(np.count_nonzero(missing & ~self.dirty))
        self.dirty[:] = missing
        self.remaining = int(np.count_nonzero(missing))
        self.mem.counters[memory.C_REMAINING] = self.remaining
        self.stats["postcopy_pages_resent"] += resent
        self.pauses[-1]["pages_resent"] = self.pauses[-1].get("pages_resent", 0) + resent
        self.policy.resume_prepare()

    def rp_next_frame(self) -> Frame:
        """The next return-path frame; a pause ends the wait (QEMU shuts the file down under it)."""
        rp = self.return_reader
        while not rp.has_frame():
            if rp.eof:
                return rp.next_frame()  # raises: closed, or closed mid-frame
            if self.pausing is not None:
                raise PostcopyPaused(self.pausing)
            select.select([rp.fd, self.rp_wake], [], [])
        return rp.next_frame(0)  # type: ignore[return-value]

    def start_return_thread(self) -> None:
        self.return_thread = threading.Thread(target=self.return_loop, name="return", daemon=True)
        self.return_thread.start()

    # -- the return thread --------------------------------------------------
    return_error: BaseException | None = None

    def return_loop(self) -> None:
        """source_return_path_thread: requests in, until the destination's SHUT."""
        try:
            rp = self.return_reader
            while True:
                f = self.rp_next_frame()
                t_rx = time.monotonic_ns() if self.tr else 0
                if f.kind == Msg.SHUT:
                    return
                if f.kind != Msg.REQ or len(f.fields) < 1:
                    raise ProtocolError(f"return path: unexpected {Msg(f.kind).name}")
                hp = f.fields[0]
                if not isinstance(hp, int) or isinstance(hp, bool) or not 0 <= hp < self.nhost:
                    raise ProtocolError(f"return path: request for host page {hp!r} outside RAM")
                self.link.deliver(f.send_ns, rp.wait)
                self.stats["postcopy_requests"] += 1  # per message, duplicates included, as QEMU
                self.mem.counters[memory.C_REQUESTS] += 1
                self.policy.on_request(hp)
                self.link.data_arrived(0)  # it came in on the main channel's socket
                if self.tr:
                    self.tr.put(K.REQUEST, t_rx, time.monotonic_ns(), hp, f.send_ns)
        except BROKEN as e:
            if self.pausable:  # postcopy_pause_return_path_thread
                self.request_pause(str(e))
            elif isinstance(e, ChannelClosed):
                self.return_error = ProtocolError(f"return path closed before SHUT ({e})")
            else:
                self.return_error = e
                self.urgent.set()
        except BaseException as e:  # surfaced by the migration thread
            self.return_error = e
            self.urgent.set()

    def final_stats(self) -> dict[str, Any]:
        st = dict(self.stats)
        st["sender_blocked_ms"] = {w.name: round(self.clock.emulated_ms(w.blocked_ns), 3)
                                   for w in (self.pre, self.post) if w is not None}
        st["dirty_sync_count"] = self.dirty_sync_count
        st["precopy_rounds"] = self.rounds
        st["events"] = self.events
        st["pauses"] = self.pauses
        st["faults_injected"] = self.faults.fired
        st["faults_not_injected"] = [str(f) for f in self.faults.pending]
        return st
