"""Multifd together with postcopy (QEMU 10.1): which channel a page takes, where a zero page is
found and whether the destination writes it, and what the flush before the VM stops waits for.

Since 10.1 (e274188612 "migration: enable multifd and postcopy together") the ``multifd`` and
``postcopy-ram`` capabilities may be on together. These are QEMU's rules, kept as data and small
functions so that the source, the destination and the report read them from one place:

- A page goes over multifd only while the migration is not in postcopy; in postcopy it goes on the
  page search status's channel, main or preempt (``ram_save_target_page`` in ram.c:
  ``if (migrate_multifd() && !migration_in_postcopy()) return ram_save_multifd_page(...)``).
- Zero pages: with ``zero-page-detection=legacy``, or with multifd off, the migration thread tests
  the page (``save_zero_page``) and sends a zero-page flag; with ``multifd`` the multifd send
  thread tests it (``multifd_send_zero_page_detect``), so in postcopy, where multifd is not used,
  nobody does and a zero page goes as a whole page; with ``none`` nobody ever does.
- The destination writes a zero page that came over multifd only if it was received before,
  *or* postcopy is on (``multifd_recv_zero_page_process`` in multifd-zero-page.c): otherwise the
  receivedmap would say "received" for a page never written, and a postcopy fault on it would never
  be served.
- Before the VM stops, ``postcopy_start`` (migration.c) calls ``qemu_savevm_state_postcopy_prepare``
  whose RAM hook ``ram_save_postcopy_prepare`` runs ``multifd_ram_flush_and_sync``: the partly
  filled batch is sent, ``multifd_send_sync_main`` puts a SYNC packet on every channel and waits
  until every send thread has *written* it (``sem_sync``: a local wait, not the destination's),
  then ``RAM_SAVE_FLAG_MULTIFD_FLUSH`` goes on the main channel, followed by ``RAM_SAVE_FLAG_EOS``.
  Only then does the VM stop (``migration_stop_vm``). So the send side of the flush runs while the
  guest still runs on the source; what the multifd sockets still hold when the VM stops is paid in
  the switchover: the destination's main thread, on reading the FLUSH flag, waits in
  ``multifd_recv_sync_main`` until every receive thread has read its SYNC packet, and the
  postcopy package (LISTEN, RUN) is behind that flag on the main channel.
"""

from __future__ import annotations

import enum
import os
import select
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import ConfigError
from .fds import close_fds, new_eventfd

PACKET_PAGES = 128  # target pages per multifd packet: MULTIFD_PACKET_SIZE (512 KiB, multifd.h) / 4 KiB
QEMU_DEFAULT_CHANNELS = 2  # DEFAULT_MIGRATE_MULTIFD_CHANNELS (options.c)
MAX_CHANNELS = 255  # multifd-channels is a uint8 that must be at least 1 (migrate_params_check)
MAX_EMULATED_CHANNELS = 32  # shmig's own bound: each channel is a receiver process and about nine descriptors,
# and select() stops at descriptor 1024 (48 channels with 64 vCPUs still run; 96 do not)
FIRST_LINK_INDEX = 2  # the link numbers the main channel 0 and the preempt channel 1


class ZeroPageDetection(enum.Enum):
    """QEMU's ``zero-page-detection`` parameter (9.0+, qapi/migration.json ZeroPageDetection)."""

    NONE = "none"
    LEGACY = "legacy"
    MULTIFD = "multifd"


class Route(enum.Enum):
    """Which channel carries a page."""

    MULTIFD = "multifd"  # one of the multifd channels (multifd_send picks the next free one)
    PSS = "pss"  # the page search status's channel: main, or preempt for an urgent page


class ZeroCheck(enum.Enum):
    """Who tests a page for zeroes before it is sent."""

    MIGRATION_THREAD = "migration thread"  # save_zero_page: a zero-page flag on the main/preempt channel
    SEND_THREAD = "multifd send thread"  # multifd_send_zero_page_detect: the page's offset in the packet's zero list
    NOBODY = "nobody"  # the page is sent whole


@dataclass(frozen=True)
class Multifd:
    """The run's multifd settings: ``channels`` (0 = the capability off) and the zero-page
    detection in force."""

    channels: int = 0
    zero_page_detection: ZeroPageDetection = ZeroPageDetection.MULTIFD

    @classmethod
    def of(cls, channels: int, zero_page_detection: str | None = None) -> "Multifd":
        """Validated settings from the options ``--multifd-channels`` and ``--zero-page-detection``
        (None: QEMU's default, ``multifd``). Raises ConfigError, one line saying what to change."""
        if isinstance(channels, bool) or not isinstance(channels, int) or not 0 <= channels <= MAX_CHANNELS:
            raise ConfigError(f"--multifd-channels must be a whole number from 0 (multifd off) to {MAX_CHANNELS},"
                              f" not {channels!r}")
        if zero_page_detection is None:
            return cls(channels)
        names = [z.value for z in ZeroPageDetection]
        if zero_page_detection not in names:
            raise ConfigError(f"--zero-page-detection must be one of {', '.join(names)}, not {zero_page_detection!r}")
        return cls(channels, ZeroPageDetection(zero_page_detection))

    @property
    def enabled(self) -> bool:
        return self.channels > 0

    def link_indices(self) -> range:
        """The link's numbers for the multifd channels, after the main and the preempt channel."""
        return range(FIRST_LINK_INDEX, FIRST_LINK_INDEX + self.channels)

    def route(self, in_postcopy: bool) -> Route:
        """The channel a page takes (ram_save_target_page)."""
        return Route.MULTIFD if self.enabled and not in_postcopy else Route.PSS

    def zero_check(self, in_postcopy: bool) -> ZeroCheck:
        """Who finds a zero page (save_zero_page, multifd_send_zero_page_detect)."""
        if self.zero_page_detection is ZeroPageDetection.NONE:
            return ZeroCheck.NOBODY
        if not self.enabled or self.zero_page_detection is ZeroPageDetection.LEGACY:
            return ZeroCheck.MIGRATION_THREAD
        return ZeroCheck.SEND_THREAD if self.route(in_postcopy) is Route.MULTIFD else ZeroCheck.NOBODY

    def flushes_before_postcopy(self) -> bool:
        """ram_save_postcopy_prepare flushes and syncs multifd before the VM stops."""
        return self.enabled


def writes_zero_page(postcopy_ram: bool, received: bool) -> bool:
    """Whether the destination writes zeroes for a zero page that came over multifd
    (multifd_recv_zero_page_process): without postcopy, destination memory starts zeroed, so only
    a page sent again needs it. With postcopy on it is always written: the page is marked received
    either way, and a vCPU that touched a received page never written would fault with nobody to
    serve it (the fault thread requests only pages the receivedmap lacks)."""
    return postcopy_ram or received


def sync_wait(queued_bytes: Iterable[int], bandwidth: float | None) -> float:
    """Seconds the destination's main thread waits in multifd_recv_sync_main after the VM stopped,
    when the multifd sockets still hold ``queued_bytes`` (one figure per channel) and the link carries
    ``bandwidth`` bytes/s (None: unlimited). Every channel must be read up to its SYNC packet, and
    they share one link, so the wait is the whole backlog's transfer time, not the largest queue's."""
    total = sum(queued_bytes)
    if total < 0:
        raise ValueError("a socket queue holds no negative bytes")
    return 0.0 if bandwidth is None or total == 0 else total / bandwidth


class MultifdSync:
    """``multifd_recv_sync_main`` across the destination's processes.

    A multifd receive thread that reads a SYNC packet posts ``synced`` and then waits on its own
    ``release`` before it reads on (multifd_recv_thread: ``qemu_sem_post(&multifd_recv_state->
    sem_sync)``, ``qemu_sem_wait(&p->sem_sync)``). The listen thread, on
    ``RAM_SAVE_FLAG_MULTIFD_FLUSH``, waits until every channel has posted and then releases each.
    That barrier is what keeps a page sent in one round over one channel from being overwritten by
    its older copy still queued on another: no channel reads past a sync before all have reached
    it. A release per channel (not one shared counter) so a fast channel cannot take a slow one's
    release and run into the next round's pages early. Eventfds made before the fork; they
    survive a receiver's exit, so a wait is ended by the controller's deadline, never lost."""

    def __init__(self, channels: int):
        self.channels = channels
        self.synced = new_eventfd()
        self.release = [new_eventfd() for _ in range(channels)]

    def fds(self) -> set[int]:
        return {self.synced, *self.release}

    def close(self) -> None:
        close_fds(self.fds())

    @staticmethod
    def _take(fd: int) -> int:
        """Block until the eventfd counts something; its count, consumed."""
        while True:
            select.select([fd], [], [])
            try:
                return os.eventfd_read(fd)
            except BlockingIOError:
                continue  # another reader took it first (never here: one reader per eventfd)

    def arrived(self, channel: int) -> None:
        """Receive thread ``channel`` has read its SYNC: tell the listen thread, wait for release."""
        os.eventfd_write(self.synced, 1)
        self._take(self.release[channel])

    def wait_all(self) -> None:
        """The listen thread on MULTIFD_FLUSH: every channel has read its SYNC; release them all."""
        got = 0
        while got < self.channels:
            got += self._take(self.synced)
        if got != self.channels:
            raise RuntimeError(f"multifd sync: {got} SYNC packets for {self.channels} channels")
        for fd in self.release:
            os.eventfd_write(fd, 1)
