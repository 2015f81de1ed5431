"""mig/src: the migration thread (precopy scan, switchover, postcopy background) and the return thread.

Vocabulary follows QEMU's migration/ram.c: the migration bitmap (``dirty``, one bool per target
page) is set by a dirty-log sync and cleared as pages are sent; requests arrive on the return path
as whole host pages; the request-servicing policy (``policies``) decides which thread sends what on
which channel.
"""

from __future__ import annotations

import collections
import contextlib
import sys
import threading
import time
from typing import Any

import numpy as np

from . import memory
from .config import TARGET_PAGE
from .policies import make_policy
from .process import Child
from .wire import ChannelClosed, FrameReader, FrameWriter, Msg, ProtocolError, expect

FRAME_PAGES_PRECOPY = 256  # up to 1 MiB frames while nothing waits on the channel: throughput
FRAME_PAGES_POSTCOPY = 16  # 64 KiB frames once faults wait: the granularity of preemption checks
SPLICE_PAGES = 16  # runs at least this long are spliced rather than copied
BUFFER_DELAY = 0.1  # QEMU's rate-limit window
MAX_DISCARDS = 4096  # host page runs per DISCARD frame


class RateLimiter:
    """QEMU's migration rate limit: a budget of ``rate * BUFFER_DELAY`` bytes per 100 ms window."""

    def __init__(self, rate: float | None):
        self.rate = rate
        self.window = time.monotonic()
        self.used = 0

    def set_rate(self, rate: float | None) -> None:
        self.rate = rate
        self.window = time.monotonic()
        self.used = 0

    def account(self, n: int) -> None:
        self.used += n

    def _roll(self) -> float:
        now = time.monotonic()
        if now - self.window >= BUFFER_DELAY:
            self.window = now
            self.used = 0
        return now

    def exceeded(self) -> bool:
        if self.rate is None:
            return False
        self._roll()
        return self.used >= self.rate * BUFFER_DELAY

    def wait(self, wake: threading.Event | None) -> None:
        """Sleep until the window ends; a queued page request (``wake``) ends the sleep early."""
        while self.exceeded():
            left = self.window + BUFFER_DELAY - time.monotonic()
            if left <= 0:
                continue
            if wake is None:
                time.sleep(left)
            elif wake.wait(left):
                wake.clear()  # consumed, like QEMU's rate_limit_sem: the next wait sleeps again
                return


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
        self.pre = FrameWriter(self.fds["precopy"], "precopy")
        self.post = FrameWriter(self.fds["postcopy"], "postcopy") if "postcopy" in self.fds else None
        self.return_reader = FrameReader(self.fds["return"], "return path", max_frame=1 << 16)
        self.bitmap_lock = threading.Lock()
        self.requests: collections.deque[int] = collections.deque()
        self.urgent = threading.Event()  # migration_make_urgent_request
        self.scan_hp = 0  # last_seen_block/last_page, in host pages
        self.phase = "setup"
        self.limiter = RateLimiter(cfg.max_bandwidth)
        # a frame is at most a quarter of the socket buffer, so a queue always holds several
        self.precopy_frame_pages = max(FRAME_PAGES_POSTCOPY,
                                       min(FRAME_PAGES_PRECOPY, cfg.socket_buffer // TARGET_PAGE // 4))
        self.buf = np.empty((self.precopy_frame_pages, TARGET_PAGE), np.uint8)
        self.stats: dict[str, Any] = collections.defaultdict(int)
        self.stats["channel_bytes"] = {"precopy": 0, "postcopy": 0}
        self.rounds = 0
        self.start_postcopy_requested = False
        self.policy = make_policy(cfg, self)
        self.frame_pages = self.precopy_frame_pages
        self.events: dict[str, int] = {}
        sys.setswitchinterval(0.0005)  # the return thread must not wait 5 ms for the GIL

    # -- sending ------------------------------------------------------------
    def send_pages(self, writer: FrameWriter, tps: np.ndarray, urgent: bool,
                   buf: np.ndarray | None = None) -> int:
        """One PAGES frame; zero pages go as flags only (QEMU's save_zero_page).

        A long run of consecutive non-zero pages is spliced from the guest RAM segment into the
        pipe (no copy in this process); other pages are written straight out of guest RAM, or
        gathered into a reused buffer when scattered.
        """
        n = len(tps)
        first = int(tps[0])
        run = int(tps[-1]) - first == n - 1
        if run:
            pages = self.src_pages[first:first + n]
        else:
            pages = (self.buf if buf is None else buf)[:n]
            np.take(self.src_pages, tps, axis=0, out=pages)
        words = pages.view(np.uint64)
        maybe = np.flatnonzero(words[:, 0] == 0)  # buffer_is_zero: most pages fail on word 0
        zero = np.zeros(n, dtype=bool)
        if maybe.size:
            zero[maybe] = ~words[maybe].any(axis=1)
        nzero = int(np.count_nonzero(zero))
        fields = (tps.astype(np.uint32).tobytes(), zero.view(np.uint8).tobytes() if nzero else None, urgent)
        if nzero == 0 and run and n >= SPLICE_PAGES and self.src_fd is not None:
            sent = writer.send_file(Msg.PAGES, fields, self.src_fd, first * TARGET_PAGE, n * TARGET_PAGE)
        else:
            sent = writer.send(Msg.PAGES, fields, [pages[~zero]] if nzero else [pages])
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

    def clear(self, tps: np.ndarray) -> None:
        self.dirty[tps] = False
        self.remaining -= len(tps)
        self.mem.counters[memory.C_REMAINING] = self.remaining

    def host_dirty(self, hp: int) -> bool:
        k = self.k
        return bool(self.dirty[hp * k:(hp + 1) * k].any())

    def host_tps(self, hp: int, first: int = 0) -> np.ndarray:
        """The dirty target pages of host page ``hp`` from target offset ``first`` on."""
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
                if not urgent and k > 1:
                    self.limiter.wait(self.policy.rate_wake)
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

    def wait_ctrl(self, want: str) -> Any:
        self.status(f"waiting for the controller's {want!r}")
        while True:
            name, obj = self.recv_ctrl()
            if name == want:
                return obj
            self.on_ctrl(name)

    def event(self, name: str) -> None:
        self.events[name] = time.monotonic_ns()
        self.ctrl_out.ctrl("event", [name, self.events[name]])

    # -- migration flow -----------------------------------------------------
    def sync(self) -> None:
        """migration_bitmap_sync: every page whose dirty-log counter moved is dirty again."""
        log = self.mem.dirty.copy()
        changed = log != self.last_log
        self.last_log = log
        newly = changed & ~self.dirty
        self.dirty |= changed
        self.remaining += int(np.count_nonzero(newly))
        self.mem.counters[memory.C_REMAINING] = self.remaining
        self.dirty_sync_count += 1

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
        self.return_thread = threading.Thread(target=self.return_loop, name="return", daemon=True)
        self.return_thread.start()
        switch = self.precopy()
        if switch == "postcopy":
            self.switchover_postcopy()
            self.status("postcopy: background scan and page requests")
            self.policy.run_postcopy()
        else:
            self.stop_and_copy()
        self.finish_postcopy()
        self.pre.send(Msg.EOS, ())
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
        while True:
            self.poll_control()
            if cfg.postcopy and (self.start_postcopy_requested or
                                 (postcopy_rounds is not None and self.rounds >= postcopy_rounds)):
                return "postcopy"
            self.status(f"precopy round {self.rounds + 1}")
            t0 = time.monotonic()
            before = self.stats["transferred"]
            self.precopy_round()
            if self.start_postcopy_requested:
                return "postcopy"
            elapsed = max(time.monotonic() - t0, 1e-6)
            self.rounds += 1
            self.sync()
            bw = (self.stats["transferred"] - before) / elapsed
            threshold = bw * cfg.downtime_limit
            self.pre.send(Msg.ROUND, (self.rounds,))
            if not cfg.postcopy or postcopy_rounds is None:
                if self.remaining * TARGET_PAGE <= threshold or self.rounds >= cfg.max_rounds:
                    self.stats["converged"] = self.remaining * TARGET_PAGE <= threshold
                    self.stats["expected_downtime_ms"] = round(
                        self.remaining * TARGET_PAGE / max(bw, 1.0) * 1e3, 3)
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
                self.limiter.wait(None)

    def stop_vm(self) -> None:
        """Ask the controller to pause the guest; downtime runs from here."""
        self.event("stop_vm")
        self.wait_ctrl("vm_stopped")
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
        for i in range(0, len(runs), MAX_DISCARDS):
            self.pre.send(Msg.DISCARD, (runs[i:i + MAX_DISCARDS].tobytes(),))
        self.stats["discarded_host_pages"] = int(hdirty.sum())
        self.pre.send(Msg.PACKAGED, ())
        self.event("postcopy_start")
        self.phase = "postcopy"
        self.frame_pages = FRAME_PAGES_POSTCOPY
        self.scan_hp = 0  # last_seen_block reset
        self.limiter.set_rate(self.cfg.max_postcopy_bandwidth)

    def finish_postcopy(self) -> None:
        if self.post is not None:
            with self.bitmap_lock:  # an urgent page being sent by the return thread finishes first
                self.post.send(Msg.EOS, ())

    # -- the return thread --------------------------------------------------
    return_error: BaseException | None = None

    def return_loop(self) -> None:
        """source_return_path_thread: requests in, until the destination's SHUT."""
        try:
            rp = self.return_reader
            while True:
                f = rp.next_frame()
                if f.kind == Msg.SHUT:
                    return
                if f.kind != Msg.REQ or len(f.fields) < 1:
                    raise ProtocolError(f"return path: unexpected {Msg(f.kind).name}")
                hp = f.fields[0]
                if not isinstance(hp, int) or isinstance(hp, bool) or not 0 <= hp < self.nhost:
                    raise ProtocolError(f"return path: request for host page {hp!r} outside RAM")
                self.link.arrive(f.send_ns, rp.wait)
                self.stats["postcopy_requests"] += 1  # per message, duplicates included, as QEMU
                self.policy.on_request(hp)
        except ChannelClosed as e:
            self.return_error = ProtocolError(f"return path closed before SHUT ({e})")
        except BaseException as e:  # surfaced by the migration thread
            self.return_error = e
            self.urgent.set()

    def final_stats(self) -> dict[str, Any]:
        st = dict(self.stats)
        st["dirty_sync_count"] = self.dirty_sync_count
        st["precopy_rounds"] = self.rounds
        st["events"] = self.events
        return st
