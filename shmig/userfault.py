"""The userfaultfd fault backend (``--fault-backend uffd``): who holds which vCPU's uffd, and how a
destination process places pages through them.

QEMU registers guest RAM with one userfaultfd in the destination's one process
(migration/postcopy-ram.c: ram_block_enable_notify). shmig's vCPUs are processes and a uffd
belongs to the mm that registered it, so each vCPU registers its own over the destination RAM (a
memfd, shmig.memfd) and hands it (SCM_RIGHTS) to every destination process that places pages:
mig/dst/listen (its fault thread reads the events, its listen thread places precopy-channel pages)
and mig/dst/preempt. That is QEMU's handling of a vhost-user back-end's shared uffd
(postcopy_register_shared_ufd), with the same duty after a placement: wake the other uffds
(postcopy_notify_shared_wake). The unix sockets for the hand-off are made before fork, one per
(vCPU, placer); each child keeps its own ends and closes the others at once, so a peer that dies
before the hand-off is seen as a closed socket, not waited for.

The order of a placement closes the one race of the scheme. A copy through vCPU 0's uffd puts the
page in the memfd's page cache and maps it into vCPU 0's page table (without waking: see
UffdPlacer); from then on a new fault of any vCPU on it finds the page (handle_userfault queues,
then looks: userfaultfd_must_wait), so only faults queued before the copy wait, and each is woken:
the receiver marks receivedmap, then wakes the uffd of every vCPU whose fault event on it the fault
thread has read (UffdPlacer's waiting slots); the fault thread, for an event it reads, writes the
slot, then looks at receivedmap, and wakes the faulting vCPU itself if the page is there ("if the
page is already received, wake")."""

from __future__ import annotations

import mmap
import socket
import threading
import time
from typing import Iterable

import numpy as np

from .ledger import ReceiverStats, VcpuLedger
from .memfd import MemfdRam
from .plan import Kind, Plan, Role
from .uffd import Uffd, UffdError, UffdGroup, recv_uffd, send_uffd

HANDOFF_TIMEOUT = 30.0  # seconds a placer waits for a vCPU's uffd (a vCPU's setup is milliseconds)


class UffdHandoff:
    """The hand-off sockets of one run, made by the controller before it forks the children."""

    def __init__(self, plan: Plan, nhost: int):
        self.vcpus = [r for r in plan.roles if r.kind is Kind.VCPU]
        # when each host page was placed (monotonic ns, 0: not yet), shared by the placers and the
        # fault thread: the end of a fault, as QEMU's mark_postcopy_blocktime_end takes it at the copy
        self._placed_map = mmap.mmap(-1, 8 * max(nhost, 1))
        self.placed = np.frombuffer(self._placed_map, np.int64)
        # the host page each vCPU's last fault event was on (-1: none yet), written by the fault
        # thread before it looks at receivedmap, read by the placers after they mark it: who to wake
        self._waiting_map = mmap.mmap(-1, 8 * max(len(self.vcpus), 1))
        self.waiting = np.frombuffer(self._waiting_map, np.int64)
        self.waiting[:] = -1
        self.placers = [r for r in plan.roles if r.kind in (Kind.LISTEN, Kind.PREEMPT)]
        self.socks: dict[tuple[Role, Role], tuple[socket.socket, socket.socket]] = {}
        try:
            for v in self.vcpus:
                for p in self.placers:
                    self.socks[(v, p)] = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except BaseException:
            self.close()
            raise

    def keep(self, role: Role) -> None:
        """In a child after fork: close every end that is not this role's."""
        for (v, p), (vs, ps) in self.socks.items():
            if v != role:
                vs.close()
            if p != role:
                ps.close()

    def register_vcpu(self, role: Role, ram: MemfdRam) -> Uffd:
        """guest/vcpuN's setup: a uffd of its own over all destination RAM (MISSING faults), sent
        to every placer. The vCPU keeps it open for its whole life: were the last reference to go,
        the kernel would complete a blocked fault with a zero page (fs/userfaultfd.c:
        userfaultfd_release)."""
        u = Uffd.open()
        try:
            u.register(ram.base, ram.size, ram.page_size)
            for p in self.placers:
                sock = self.socks[(role, p)][0]
                send_uffd(sock, u)
                sock.close()
        except BaseException:
            u.close()
            raise
        return u

    def group(self, role: Role) -> UffdGroup:
        """A placer's setup: every vCPU's uffd, in vCPU order."""
        uffds: list[Uffd] = []
        try:
            for v in self.vcpus:
                sock = self.socks[(v, role)][1]
                sock.settimeout(HANDOFF_TIMEOUT)
                try:
                    uffds.append(recv_uffd(sock))
                except (TimeoutError, socket.timeout):
                    raise UffdError(0, f"{role.title} waited {HANDOFF_TIMEOUT:.0f} s for {v.title}'s userfaultfd") from None
                except UffdError as e:
                    raise UffdError(e.errno, f"{role.title} got no userfaultfd from {v.title}: {e.strerror}") from None
                finally:
                    sock.close()
        except BaseException:
            for u in uffds:
                u.close()
            raise
        return UffdGroup(uffds)

    def close(self) -> None:
        """The controller's copies, once every child has its own (and on failure)."""
        for pair in self.socks.values():
            for s in pair:
                s.close()


class UffdPlacer:
    """A receiver's placement into destination RAM through the vCPUs' uffds (qemu_ufd_copy_ioctl):
    copy through vCPU 0's without waking (UFFDIO_COPY_MODE_DONTWAKE), mark receivedmap, stamp the
    fault's end, then wake the uffd of each vCPU whose fault the fault thread has read on it.

    Who to wake, without a syscall per vCPU per placement: the fault thread writes a vCPU's waiting
    slot before it looks at receivedmap (``waiting_on``), a placer marks receivedmap before it
    looks at the slots, with a locked instruction between store and load on both sides (as the
    bitmap backend's wait slots). So either the placer sees the slot and wakes the vCPU, or the
    fault thread sees the page placed and wakes it itself; a fault whose event is not read yet
    is always the fault thread's. A background placement nobody waits for costs no wake.

    Why not let the copy wake vCPU 0, as QEMU's one ioctl does: the end of a fault is stamped by the
    placer once the page is there (mark_postcopy_blocktime_end, after the ioctl). Stamped after a
    waking copy, it would also count whatever ran between the wake and the placer's next
    instruction: here, with more processes than CPUs, the woken vCPU itself (the mean copy took
    21 us with the wake, 13 without; the p50 8-25 us more), which is guest time, not a fault's. On QEMU's hosts a vCPU thread has its
    own CPU and the two orders measure alike. The extra ioctl costs ~1 us."""

    def __init__(self, group: UffdGroup, received: np.ndarray, page: int, placed: np.ndarray, waiting: np.ndarray,
                 tp_per_hp: int, stats: ReceiverStats):
        self.stats = stats  # uffd_copy_bytes / uffd_copy_ns: the placement rate
        self.group = group
        self.received = received  # per target page
        self.page = page  # target page size (receivedmap's unit)
        self.placed = placed  # per host page: when it was placed (UffdHandoff.placed)
        self.waiting = waiting  # per vCPU: the host page of its last fault event (UffdHandoff.waiting)
        self.k = tp_per_hp
        self.fence = threading.Lock()  # acquiring it is a locked instruction: a full barrier

    def copy(self, tp: int, src: int, n: int) -> None:
        """``n`` target pages from address ``src`` to target page ``tp`` (not yet marked)."""
        u = self.group.uffds[0]
        t0 = time.monotonic_ns()
        self.stats.uffd_copy_bytes += u.copy(u.base + tp * self.page, src, n * self.page, wake=False)
        self.stats.uffd_copy_ns += time.monotonic_ns() - t0

    def zero(self, tp: int, n: int) -> None:
        u = self.group.uffds[0]
        u.zeropage(u.base + tp * self.page, n * self.page, wake=False)

    def mark_and_wake(self, tps: np.ndarray | slice | int, first: int, end: int) -> None:
        """receivedmap for ``tps``, then the vCPUs waiting in target pages [first, end) woken: the
        fault ends at that wake."""
        self.received[tps] = 1
        self.placed[tps // self.k if isinstance(tps, np.ndarray) else first // self.k] = time.monotonic_ns()
        with self.fence:  # receivedmap stores before the waiting-slot loads (pairs with waiting_on)
            pass
        lo, hi = first // self.k, (end - 1) // self.k
        for v, hp in enumerate(self.waiting.tolist()):  # a handful of vCPUs at most
            if lo <= hp <= hi:
                self.group.wake(v, first * self.page, (end - first) * self.page)

    def waiting_on(self, vcpu: int, hp: int) -> bool:
        """The fault thread's side: ``vcpu``'s fault event on host page ``hp`` was read. Its slot
        is written, then receivedmap looked at: True if the page is placed already (the caller
        wakes the vCPU: the placer may have looked at the slot before it was written)."""
        self.waiting[vcpu] = hp
        with self.fence:  # the slot's store before the receivedmap load (pairs with mark_and_wake)
            pass
        return bool(self.received[hp * self.k])

    def place_pages(self, tps: np.ndarray, zero: np.ndarray | None, data: np.ndarray) -> None:
        """Target pages ``tps`` (ascending, none placed yet): the zero ones by UFFDIO_ZEROPAGE, the
        others from ``data`` (one row per non-zero page, in order), a run of consecutive pages per
        ioctl."""
        if len(tps) == 1:  # an urgent page (the fault path): scalars, not numpy calls on a 1-array
            tp = int(tps[0])
            if zero is not None and zero[0]:
                self.zero(tp, 1)
            else:
                self.copy(tp, int(np.ascontiguousarray(data).ctypes.data), 1)
            self.mark_and_wake(tp, tp, tp + 1)
            return
        nz = tps if zero is None else tps[~zero]
        if zero is not None:
            for a, n in page_runs(tps[zero]):
                self.zero(a, n)
        data = np.ascontiguousarray(data)
        base = int(data.ctypes.data)
        row = 0
        for a, n in page_runs(nz):
            self.copy(a, base + row * self.page, n)
            row += n
        self.mark_and_wake(tps, int(tps[0]), int(tps[-1]) + 1)


def page_runs(tps: np.ndarray) -> Iterable[tuple[int, int]]:
    """(first, count) of each run of consecutive target pages in ascending ``tps``."""
    if not tps.size:
        return []
    breaks = np.flatnonzero(np.diff(tps) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(tps)]))
    return zip(tps[starts].tolist(), (ends - starts).tolist())


class UffdFaultLog:
    """The vCPUs' fault logs (shmig.ledger) as the fault thread writes them for the uffd backend,
    where a vCPU cannot see its own faults (it is stopped in the kernel while one lasts): a row
    per fault from its first event's read (mark_postcopy_blocktime_begin) to the placement of its
    host page (mark_postcopy_blocktime_end, at the copy), or to the fault thread's own wake when the
    page was there already. The end is filled in once the page is placed (``settle``)."""

    def __init__(self, vcpus: list[VcpuLedger], placed: np.ndarray):
        self.vcpus = vcpus
        self.placed = placed
        self.open = [-1] * len(vcpus)  # the host page each vCPU last faulted on
        self.pending: list[tuple[int, int, int, int]] = []  # (vCPU, row, host page, t0)

    def fault(self, vcpu: int, hp: int, t0: int, woken_ns: int | None = None) -> None:
        """A fault event; a second event of the same vCPU on the same page (a retry after a wake
        over a wider range) is the same fault."""
        if self.open[vcpu] == hp:
            return
        self.open[vcpu] = hp
        led = self.vcpus[vcpu]
        row = len(led.faults)
        led.faults.append(hp, t0, -1, led.stats.accesses_dst)  # never full: nhost + 1 rows
        led.stats.faults += 1
        if woken_ns is not None:
            self._end(vcpu, row, t0, woken_ns)
        else:
            self.pending.append((vcpu, row, hp, t0))

    def settle(self) -> None:
        """End every logged fault whose page has been placed since."""
        left = []
        for vcpu, row, hp, t0 in self.pending:
            t1 = int(self.placed[hp])
            if t1:
                self._end(vcpu, row, t0, max(t1, t0))
            else:
                left.append((vcpu, row, hp, t0))
        self.pending = left

    def _end(self, vcpu: int, row: int, t0: int, t1: int) -> None:
        led = self.vcpus[vcpu]
        led.faults.rows()[row, 2] = t1
        dist = led.lat_dist  # QEMU's log2 buckets, as the bitmap backend's vCPU counts them
        dist[min(max(((t1 - t0) // 1000).bit_length() - 1, 0), len(dist) - 1)] += 1
