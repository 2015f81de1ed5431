"""mig/src/send_N: the source's multifd send threads (QEMU's migration/multifd.c, send side).

With ``--multifd-channels N`` the migration thread no longer writes precopy pages itself. It takes
a packet of dirty pages from the bitmap and hands it to the next free channel (``multifd_send``:
wait on ``channels_ready`` until some channel has no pending job, starting the search after the
last one used); that channel's thread reads the pages from guest RAM, finds the zero ones
(``multifd_send_zero_page_detect``, with ``zero-page-detection=multifd``), writes the packet on
its own connection and counts it in ``multifd_bytes``, which the rate limit reads as it reads the
main channel's bytes (``migration_transferred_bytes``). So a channel blocked for write space holds
back one packet, not the migration thread: it goes on filling the other channels until every one
has a job pending.

``sync`` is ``multifd_send_sync_main``: each thread, once its pending packet is written, writes a
SYNC packet and posts ``sem_sync``; the migration thread waits for all of them. That wait is local
(the bytes are in the sockets, not at the destination). What it costs the destination, which
reads every channel up to its SYNC before it loads on, is in ``multifd.MultifdSync``.

The threads are threads of mig/src, as QEMU's are of the source QEMU: they share the GIL with
the migration thread, and release it where QEMU's threads block, in the write.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import numpy as np

from .config import TARGET_PAGE
from .wire import FrameWriter, Msg


class SendChannel:
    """One multifd channel's thread (MultiFDSendParams): at most one job pending (``pending_job``)."""

    def __init__(self, index: int, writer: FrameWriter, owner: "MultifdSend", packet_pages: int):
        self.index = index
        self.writer = writer
        self.owner = owner
        self.buf = np.empty((packet_pages, TARGET_PAGE), np.uint8)  # the packet's own gather buffer
        self.sem = threading.Semaphore(0)  # p->sem: a job or a sync request was posted
        self.sem_sync = threading.Semaphore(0)  # p->sem_sync: the SYNC packet is written
        self.pending_job: np.ndarray | None = None  # target pages taken from the bitmap
        self.pending_sync = False
        self.quit = False
        self.packets = 0
        self.thread = threading.Thread(target=self.run, name=f"send_{index}", daemon=True)

    def run(self) -> None:
        """multifd_send_thread."""
        owner = self.owner
        try:
            while True:
                owner.channels_ready.release()
                self.sem.acquire()
                if self.quit:
                    self.writer.send(Msg.EOS, ())  # the channel's end: its receiver exits
                    return
                if self.pending_job is not None:
                    owner.send_pages(self.index, self.pending_job, self.buf)
                    self.packets += 1
                    self.pending_job = None
                else:  # a sync request (multifd_send_sync_main)
                    owner.count_sync(self.writer.send(Msg.MULTIFD_SYNC, (self.packets,)))
                    self.pending_sync = False
                    self.sem_sync.release()
        except BaseException as e:  # multifd_send_error_propagate, then kick the main thread
            owner.error = owner.error or e
            owner.channels_ready.release()
            self.sem_sync.release()


class MultifdSend:
    """Every multifd send thread, and the migration thread's calls into them."""

    def __init__(self, writers: list[FrameWriter], send_pages: Callable[[int, np.ndarray, np.ndarray], int],
                 count_sync: Callable[[int], None], packet_pages: int):
        """``send_pages(channel, target pages, buffer)`` writes one packet and counts it
        (``PageSender.send_multifd``); ``count_sync(bytes)`` counts a SYNC packet."""
        self.send_pages = send_pages
        self.count_sync = count_sync
        self.packet_pages = packet_pages
        self.channels_ready = threading.Semaphore(0)
        self.error: BaseException | None = None
        self.next_channel = 0
        self.channels = [SendChannel(i, w, self, packet_pages) for i, w in enumerate(writers)]
        for c in self.channels:
            c.thread.start()

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def send(self, tps: np.ndarray) -> None:
        """multifd_send: a packet of target pages (already taken from the bitmap) to the next free
        channel; waits while every channel has a job pending."""
        self.channels_ready.acquire()
        self._check()
        n = len(self.channels)
        for j in range(n):
            c = self.channels[(self.next_channel + j) % n]
            if c.pending_job is None and not c.pending_sync:
                self.next_channel = (c.index + 1) % n
                c.pending_job = tps
                c.sem.release()
                return
        raise AssertionError("multifd: channels_ready posted with no channel free")

    def sync(self) -> int:
        """multifd_send_sync_main(MULTIFD_SYNC_ALL): a SYNC packet behind each channel's pending
        packet, and a wait until every one is written. The real ns it took."""
        t0 = time.monotonic_ns()
        for c in self.channels:
            self._check()
            c.pending_sync = True
            c.sem.release()
        for c in self.channels:
            self.channels_ready.acquire()
            c.sem_sync.acquire()
            self._check()
        return time.monotonic_ns() - t0

    def shutdown(self) -> None:
        """multifd_send_shutdown: each thread writes the end of its channel and exits. Called once
        nothing is pending (after the last sync)."""
        for c in self.channels:
            c.quit = True
            c.sem.release()
        for c in self.channels:
            c.thread.join()
        self._check()
