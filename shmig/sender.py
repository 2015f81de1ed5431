"""The source's page sending: PAGES frames on the data channels, and a host page walked as QEMU walks it.

``send`` is ``ram_save_target_page`` + ``save_zero_page`` for a frame of target pages at a time
(no Python per 4 KiB page): zero pages go as flags only; a long run of non-zero pages is spliced
from the guest RAM segment into the pipe (no copy in this process); other pages are written
straight out of guest RAM, or gathered into a reused buffer when scattered. Every byte is counted
where QEMU counts it (``ram_transferred_add``: precopy, downtime or postcopy) and, if the policy
says so, against the rate limit.

``save_host_page`` is ``ram_save_host_page``: the dirty target pages of one host page, frame by
frame, each taken from the bitmap as it is sent (``migration_bitmap_clear_dirty``), rate-limited
between frames of a huge page, and (7.1 break-huge) given up part-way when a request is pending.
``save_host_page_urgent`` is 8.0+'s ``ram_save_host_page_urgent``: the return thread's whole host
page, under the bitmap lock, never rate-limited, skipped if the background is in the middle of it.
"""

from __future__ import annotations

import enum
import struct
import threading
import time
from typing import Callable

import numpy as np

from .config import TARGET_PAGE, Config
from .events import K, Recorder
from .ledger import SourceStats
from .link import Link
from .multifd import ZeroCheck
from .plan import Channel
from .policies import Policy
from .ramstate import PageSearchStatus, RamState
from .ratelimit import RateLimiter
from .wire import FrameWriter, Msg

FRAME_PAGES_PRECOPY = 256  # up to 1 MiB frames while nothing waits on the channel: throughput
FRAME_PAGES_POSTCOPY = 64  # 256 KiB frames once faults wait: the granularity of preemption checks (a
# quarter of a millisecond at 10 Gbit/s; smaller frames cost more Python per byte than the link does)
SPLICE_PAGES = 16  # runs at least this long are spliced rather than copied
ONE_PAGE = struct.Struct("<I")  # a PAGES frame's target page list when it holds one page


def frame_pages(most: int, queue_bytes: int) -> int:
    """Target pages in a frame (or a multifd packet) on a channel whose socket queue holds
    ``queue_bytes``: at most ``most``, and at most a quarter of the queue, so a queue always holds
    several."""
    return max(1, min(most, queue_bytes // TARGET_PAGE // 4))


class Stage(enum.Enum):
    """Where ``ram_transferred_add`` counts a byte."""

    PRECOPY = "precopy"
    DOWNTIME = "downtime"
    POSTCOPY = "postcopy"


class PageSender:
    """The data channels' writers and everything that puts pages on them."""

    def __init__(self, cfg: Config, src_pages: np.ndarray, src_fd: int | None,
                 writers: dict[Channel, FrameWriter], ram: RamState, stats: SourceStats, limiter: RateLimiter,
                 policy: Policy, link: Link, before_frame: Callable[[FrameWriter, np.ndarray], None],
                 tr: Recorder | None = None, multifd_writers: list[FrameWriter] | None = None):
        self.k = cfg.tp_per_hp
        self.src_pages = src_pages
        self.src_fd = src_fd
        self.writers = writers
        self.ram = ram
        self.stats = stats
        self.limiter = limiter
        self.policy = policy
        self.link = link
        self.before_frame = before_frame  # fault injection and a pause look in between frames
        self.tr = tr
        self.stage = Stage.PRECOPY
        self.precopy_frame_pages = frame_pages(FRAME_PAGES_PRECOPY, cfg.socket_queue.capacity)
        self.frame_pages = self.precopy_frame_pages
        self.buf = np.empty((self.precopy_frame_pages, TARGET_PAGE), np.uint8)  # the migration thread's
        self.rp_buf = np.empty_like(self.buf)  # the return thread's own gather buffer
        self.rp_lock = threading.Lock()  # a thread that sends urgently sends one frame at a time
        # who looks for zero pages: the migration thread (save_zero_page), multifd's send threads
        # (zero-page-detection=multifd: the same test, in the thread that writes the packet), or in
        # postcopy with multifd nobody (its pages do not go through multifd): multifd.Multifd.zero_check
        self.multifd = cfg.multifd
        self.find_zero = self.multifd.zero_check(in_postcopy=False) is not ZeroCheck.NOBODY
        self.multifd_writers = multifd_writers or []  # the multifd channels' writers, by channel number
        self.count_lock = threading.Lock()  # the migration, return and multifd send threads all count

    def enter_postcopy(self) -> None:
        """Smaller frames once faults wait: the granularity at which 7.1 checks for requests."""
        self.stage = Stage.POSTCOPY
        self.frame_pages = min(FRAME_PAGES_POSTCOPY, self.precopy_frame_pages)
        self.find_zero = self.multifd.zero_check(in_postcopy=True) is not ZeroCheck.NOBODY

    # -- one frame ----------------------------------------------------------------------------------
    def send(self, channel: Channel, tps: np.ndarray, urgent: bool, buf: np.ndarray | None = None) -> int:
        """One PAGES frame of target pages ``tps`` (already taken from the bitmap) on ``channel``;
        returns the bytes written, counted where QEMU counts them."""
        writer = self.writers[channel]
        self.before_frame(writer, tps)
        sent, nzero = self.write_pages(writer, tps, urgent, self.buf if buf is None else buf)
        self.count(channel, writer, sent, len(tps) - nzero, nzero)
        if self.policy.counts_against_limit(channel, urgent):
            self.limiter.account(sent)
        return sent

    def send_multifd(self, index: int, tps: np.ndarray, buf: np.ndarray) -> int:
        """One multifd packet on multifd channel ``index``, from its send thread
        (multifd_send_thread): counted in ``multifd_bytes`` and, as every byte, against the rate
        limit (migration_transferred_bytes adds multifd_bytes)."""
        writer = self.multifd_writers[index]
        sent, nzero = self.write_pages(writer, tps, False, buf)
        with self.count_lock:
            self.count_pages(sent, len(tps) - nzero, nzero)
            self.stats.multifd_bytes += sent
            self.limiter.account(sent)
        return sent

    def count_sync(self, sent: int) -> None:
        """A multifd SYNC packet's bytes (multifd_send_thread: ``mig_stats.multifd_bytes``)."""
        with self.count_lock:
            self.count_pages(sent, 0, 0)
            self.stats.multifd_bytes += sent

    def write_pages(self, writer: FrameWriter, tps: np.ndarray, urgent: bool, buf: np.ndarray) -> tuple[int, int]:
        """Write one PAGES frame; (bytes written, zero pages in it)."""
        n = len(tps)
        first = int(tps[0])
        run = int(tps[-1]) - first == n - 1
        if run:
            pages = self.src_pages[first:first + n]
        else:
            pages = buf[:n]
            np.take(self.src_pages, tps, axis=0, out=pages)
        words = pages.view(np.uint64)
        if not self.find_zero:  # nobody looks for zero pages: every page goes whole
            nzero = 0
            fields = (ONE_PAGE.pack(first) if n == 1 else tps.astype(np.uint32).tobytes(), None, urgent)
            payload = [pages]
        elif n == 1:  # an urgent 4 KiB page: scalars only (buffer_is_zero fails on word 0 mostly)
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
        return sent, nzero

    def count(self, channel: Channel, writer: FrameWriter, sent: int, normal: int, zero: int) -> None:
        st = self.stats
        with self.count_lock:
            self.count_pages(sent, normal, zero)
        if channel is Channel.PRECOPY:
            st.precopy_channel_bytes += sent
            st.precopy_blocked_ns = writer.blocked_ns
        else:
            st.postcopy_channel_bytes += sent
            st.postcopy_blocked_ns = writer.blocked_ns

    def count_pages(self, sent: int, normal: int, zero: int) -> None:
        """Pages and bytes, in the stage QEMU counts them in (under ``count_lock``: multifd's send
        threads count too)."""
        st = self.stats
        st.normal_pages += normal
        st.zero_pages += zero
        st.transferred += sent
        if self.stage is Stage.POSTCOPY:
            st.postcopy_bytes += sent
        elif self.stage is Stage.PRECOPY:
            st.precopy_bytes += sent
        else:
            st.downtime_bytes += sent

    def trace_send(self, writer: FrameWriter, t0: int, blocked: int, sent: int, n: int, first: int,
                   urgent: bool) -> None:
        """A PAGES frame sent since ``t0``, and the write-space wait it began with (if any)."""
        assert self.tr is not None
        t1 = time.monotonic_ns()
        self.tr.put(K.SEND_URGENT if urgent else K.SEND, t0, t1, writer.ch, writer.frames_out, sent, n, first,
                    self.link.queued(writer.ch), self.ram.remaining)
        if writer.blocked_ns > blocked:
            self.tr.put(K.WRITE_SPACE, t0, min(t1, t0 + writer.blocked_ns - blocked), writer.ch)

    # -- host pages ---------------------------------------------------------------------------------
    def save_host_page(self, pss: PageSearchStatus, may_preempt: bool = False,
                       wake: threading.Event | None = None) -> bool:
        """ram_save_host_page from ``pss.offset``. True when the host page is done; False when it
        stopped because ``may_preempt`` and a request is pending (7.1 break-huge): ``pss.offset``
        then says where to resume. Between frames of a huge page the thread is rate-limited; a
        queued request (``wake``) ends that sleep."""
        k, fp, ram = self.k, self.frame_pages, self.ram
        while pss.offset < k:
            if may_preempt and ram.has_requests():
                return False
            tps = ram.take(pss.host_page, pss.offset, fp)
            pss.offset = min(pss.offset + fp, k)
            if tps.size:
                self.send(pss.channel, tps, pss.urgent)
                if k > 1:  # rate limiting in the middle of a huge page, urgent or not, as QEMU
                    self.limiter.sleep(wake)
        return True

    def save_host_page_urgent(self, hp: int, channel: Channel, background: PageSearchStatus) -> bool:
        """ram_save_host_page_urgent (8.0+, the return thread): host page ``hp`` whole, under the
        bitmap lock; left to the background if it is in the middle of it (pss_overlap). True if
        anything was sent."""
        ram, fp = self.ram, self.frame_pages
        with self.rp_lock, ram.exclusive():
            if hp == background.host_page or not ram.dirty(hp):
                return False
            tps = ram.take(hp)
            for i in range(0, len(tps), fp):
                self.send(channel, tps[i:i + fp], True, buf=self.rp_buf)
        return bool(tps.size)

    def save_batch(self, limit: int) -> np.ndarray:
        """The background's next frame of 4 KiB host pages (each whole: none is ever broken):
        found and taken from the bitmap as one step; returns them (empty: nothing is dirty)."""
        hps = self.ram.take_next(limit)
        if hps.size:
            self.send(Channel.PRECOPY, hps, False)
        return hps
