"""The source's RAM state, as QEMU's migration/ram.c keeps it: RAMState and PageSearchStatus.

``RamState`` owns the migration bitmap (one bit per target page: still to send), the scan position
of the background (``last_seen_block``/``last_page``), the queue of page requests
(``src_page_requests``) and 10.1's page hint. Its lock is QEMU's ``bitmap_mutex``, and it stays
inside: every call that reads or changes the bitmap takes it, and ``take`` tests and clears in one
step, as ``migration_bitmap_clear_dirty`` does, so two sending threads never send a page twice.
The one place QEMU holds the lock across sending is 8.0+'s urgent host page
(``ram_save_host_page_urgent``): ``exclusive()`` gives that, and nothing else.

``PageSearchStatus`` says where one sending thread is: which host page, which target page in it
next, on which channel, and whether the page was requested (QEMU 8.0+ keeps one per channel,
``rs->pss[RAM_CHANNEL_*]``).

``DirtyLog`` is KVM's dirty log as the source reads it at a sync: a counter per target page per
vCPU, bumped by the guest after it writes (data first). One writer per counter (each vCPU has its
own, as KVM's per-vCPU dirty rings are), so no bump is ever lost to another vCPU's read-modify-write.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .ledger import SourceStats
from .plan import Channel

SCAN_WINDOW = 8192  # host pages looked at per numpy call when searching for dirty pages


@dataclass
class PageSearchStatus:
    """Where a sending thread is: host page, next target offset in it, channel, requested or not."""

    host_page: int = -1
    offset: int = 0
    channel: Channel = Channel.PRECOPY
    urgent: bool = False


class RamState:
    """The migration bitmap, the background's scan position, the request queue and the page hint."""

    def __init__(self, npages: int, tp_per_hp: int, stats: SourceStats):
        self.k = tp_per_hp
        self.npages = npages
        self.nhost = npages // tp_per_hp
        self._dirty = np.ones(npages, dtype=bool)  # ram_init_bitmaps: everything is to send
        self._lock = threading.RLock()  # bitmap_mutex
        self._requests: collections.deque[int] = collections.deque()  # src_page_requests
        self.urgent = threading.Event()  # migration_make_urgent_request: rate_limit_sem
        self.scan_hp = 0  # last_seen_block/last_page, in host pages
        self.hint: int | None = None  # 10.1's page_hint: where the background scan goes on next
        self.stats = stats
        stats.remaining = npages
        stats.dirty_sync_count = 1  # ram_init_bitmaps syncs once

    # -- the bitmap -------------------------------------------------------------------------------------
    @property
    def remaining(self) -> int:
        return self.stats.remaining

    def dirty(self, hp: int) -> bool:
        """Does host page ``hp`` still have a target page to send?"""
        k = self.k
        if k == 1:  # a request's first question, on every fault: a scalar, not an array call
            return bool(self._dirty[hp])
        return bool(self._dirty[hp * k:(hp + 1) * k].any())

    def _find(self, limit: int) -> np.ndarray:
        if self.stats.remaining == 0:
            return np.empty(0, np.int64)
        k, n = self.k, self.nhost
        pos = self.scan_hp % n
        scanned = 0
        while scanned < n:
            end = min(pos + SCAN_WINDOW, n)
            if k == 1:
                idx = np.flatnonzero(self._dirty[pos:end])
            else:
                idx = np.flatnonzero(self._dirty[pos * k:end * k].reshape(-1, k).any(axis=1))
            if idx.size:
                return idx[:limit] + pos
            scanned += end - pos
            pos = end % n
        return np.empty(0, np.int64)

    def next_background(self, pss: PageSearchStatus) -> bool:
        """ram_find_and_save_block's search, for a huge host page: the next dirty host page from
        the scan position becomes ``pss``'s, in the same step (the return thread, which leaves a
        page the background is in to it, must never see it found but not yet claimed). False
        when nothing is dirty."""
        with self._lock:
            if self.hint is not None:
                self.scan_hp, self.hint = self.hint, None
            hps = self._find(1)
            if not hps.size:
                return False
            pss.host_page, pss.offset = int(hps[0]), 0
            self.scan_hp = pss.host_page + 1
            return True

    def take_next(self, limit: int) -> np.ndarray:
        """The next ``limit`` dirty 4 KiB host pages from the scan position, cleared as one step
        (a whole frame of the background, found and taken before another thread can take them);
        the scan goes on after the last."""
        with self._lock:
            if self.hint is not None:
                self.scan_hp, self.hint = self.hint, None
            hps = self._find(limit)
            if hps.size:
                self._clear(hps)
                self.scan_hp = int(hps[-1]) + 1
            return hps

    def take(self, hp: int, first: int = 0, n: int | None = None) -> np.ndarray:
        """migration_bitmap_clear_dirty over target pages ``first``..``first + n`` of host page
        ``hp``: the ones still dirty, cleared and returned in one step."""
        k = self.k
        base = hp * k
        end = base + (k if n is None else min(first + n, k))
        with self._lock:
            if k == 1 and n is None:  # a requested 4 KiB page: scalars only
                if not self._dirty[hp]:
                    return np.empty(0, np.int64)
                self._dirty[hp] = False
                self.stats.remaining -= 1
                return np.array([hp], np.int64)
            tps = np.flatnonzero(self._dirty[base + first:end]) + (base + first)
            if tps.size:
                self._clear(tps)
            return tps

    def take_pages(self, tps: np.ndarray) -> np.ndarray:
        """The given target pages that are still dirty, cleared (a precopy round's next frame)."""
        with self._lock:
            tps = tps[self._dirty[tps]]
            self._clear(tps)
            return tps

    def dirty_pages(self) -> np.ndarray:
        """Every dirty target page now (a precopy round's plan)."""
        with self._lock:
            return np.flatnonzero(self._dirty)

    def _clear(self, tps: np.ndarray) -> None:
        self._dirty[tps] = False
        self.stats.remaining -= len(tps)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """bitmap_mutex held across several steps: 8.0+'s urgent host page is sent whole under it,
        so the background thread waits for it (ram_save_host_page_urgent)."""
        with self._lock:
            yield

    def sync(self, changed: np.ndarray) -> int:
        """migration_bitmap_sync: every page whose dirty-log counter moved is dirty again.
        Returns how many were newly dirty."""
        with self._lock:
            newly = int(np.count_nonzero(changed & ~self._dirty))
            self._dirty |= changed
            self.stats.remaining += newly
            self.stats.dirty_sync_count += 1
            return newly

    def chunk_host_pages(self) -> np.ndarray:
        """postcopy_chunk_hostpages_pass: a huge host page is sent whole or not at all, so each is
        made all-dirty or all-clean; returns the dirty host pages as a bool per host page."""
        with self._lock:
            hdirty = self._dirty.reshape(-1, self.k).any(axis=1)
            if self.k > 1:
                self._dirty[:] = np.repeat(hdirty, self.k)
                self.stats.remaining = int(np.count_nonzero(self._dirty))
            return hdirty

    def reload(self, missing: np.ndarray) -> int:
        """ram_dirty_bitmap_reload after a postcopy recovery: exactly the pages the destination has
        not received are dirty. Returns how many of them had been sent before (lost in flight)."""
        with self._lock:
            resent = int(np.count_nonzero(missing & ~self._dirty))
            self._dirty[:] = missing
            self.stats.remaining = int(np.count_nonzero(missing))
            self.hint = None  # requests stay queued, as QEMU's src_page_requests do
            return resent

    # -- page requests ------------------------------------------------------------------------------
    def queue(self, hp: int) -> None:
        """ram_save_queue_pages: a request for the migration thread, which it is woken for."""
        self._requests.append(hp)
        self.urgent.set()

    def unqueue(self) -> int | None:
        """unqueue_page: the oldest request, or None."""
        try:
            return self._requests.popleft()
        except IndexError:
            return None

    def has_requests(self) -> bool:
        """postcopy_has_request."""
        return bool(self._requests)


class DirtyLog:
    """KVM's dirty log as the source sees it: every vCPU's counters, compared at each sync with
    what the previous sync saw."""

    def __init__(self, counters: np.ndarray):
        self.counters = counters  # (vcpus, npages) uint32, one row per vCPU
        self.last = counters.copy()

    def collect(self) -> np.ndarray:
        """The pages written since the previous collect (kvm_log_sync, per vCPU, merged)."""
        now = self.counters.copy()
        changed = (now != self.last).any(axis=0)
        self.last = now
        return changed
