"""guest/vcpuN: the guest's workload, one process per vCPU, timed from outside the migration code.

Before switchover a vCPU writes source RAM and then bumps the dirty-log counters of what it wrote
(data first, so a sync never misses a write). After switchover it writes destination RAM, but only
pages already in receivedmap: the first missing page is a fault. The vCPU publishes what it waits
for in its wait slot, tells the fault thread, and sleeps on its eventfd until a receiver has placed
the whole host page. A fault's latency runs from finding the page missing to seeing it placed.
"""

from __future__ import annotations

import os
import select
import threading
import time

import numpy as np

from . import memory
from .config import TARGET_PAGE
from .control import Ctl
from .events import K
from .ledger import PROGRESS_EVERY_NS
from .pattern import ab_increment, stamp_pages
from .plan import Channel
from .process import Child
from .wire import FrameWriter, Msg
from .workload import AccessStream

CHUNK = 64  # accesses between looks at the phase word: bounds how late a vCPU pauses
# the uffd backend's vCPU checks nothing per access, so a chunk's overhead is its numpy calls:
# bigger chunks are what make it run at memory speed (tools/uffd_bench.py: 1024 is ~6x 64's rate)
UFFD_CHUNK = 1024
RECHECK = 0.05  # a wake-up can never be lost, but a sleeping vCPU re-checks this often anyway


class SleepClock:
    """The vCPU's own view of its faults: how long it slept on the destination. The uffd backend's
    vCPU cannot see a fault (the kernel stops it mid-access), so its blocktime comes from the fault
    thread's events (QEMU 10.1's view); this is the other side. Slept = wall time less its own CPU
    time (CLOCK_THREAD_CPUTIME_ID, exact) less its time runnable but waiting for a CPU (schedstat's
    run_delay, current while it runs) less the sleeps of its pacing: what is left is time blocked
    in a userfault, or, with the bitmap backend, on its eventfd. Same figure for both backends,
    from the kernel's accounting, not from either backend's stamps."""

    PATH = "/proc/thread-self/schedstat"  # "on-CPU ns, runqueue-wait ns, timeslices" (CONFIG_SCHED_INFO)

    def __init__(self) -> None:
        try:
            self.fd = os.open(self.PATH, os.O_RDONLY | os.O_CLOEXEC)
            self._wait()
        except (OSError, ValueError, IndexError):
            self.fd = -1
        self.base: tuple[int, int, int, int] | None = None
        self.paced_ns = 0  # slept for the guest's own reasons (Vcpu.sleep_paced)

    def _wait(self) -> int:
        return int(os.pread(self.fd, 128, 0).split()[1])

    def start(self) -> None:
        """The vCPU runs on the destination from now on."""
        if self.fd >= 0:
            self.base = (time.monotonic_ns(), time.thread_time_ns(), self._wait(), self.paced_ns)

    def slept_ns(self) -> int:
        """Slept since ``start``; -1 if it cannot be known."""
        if self.base is None:
            return -1
        wall, cpu, wait, paced = self.base
        return max(0, (time.monotonic_ns() - wall) - (time.thread_time_ns() - cpu) - (self._wait() - wait)
                   - (self.paced_ns - paced))


class Vcpu(Child):
    """guest/vcpuN. What it measures goes into its part of the ledger as it happens: its counters,
    QEMU's latency buckets, a row per fault (host page, start, end, accesses made before it), and a
    progress point every ``PROGRESS_EVERY_NS`` while it runs on the destination."""

    def setup(self) -> None:
        cfg = self.cfg
        v = self.vcpu = self.role.n
        self.stream = AccessStream(cfg.workload, cfg.wss_bytes // TARGET_PAGE, v, cfg.vcpus, cfg.seed)
        self.ab = cfg.workload == "ab"
        self.efd = self.efds[v]
        self.fault_w = FrameWriter(self.ends.channels[Channel.FAULT], "fault")
        self.stamps = self.mem.stamps[v]
        self.dirty = self.mem.dirty[v]  # this vCPU's own dirty-log counters: nobody else writes them
        if cfg.prefault and cfg.workload != "idle":
            memory.populate(self.mem.src[:cfg.wss_bytes])
            if self.shared.uffd is None:  # a uffd backend's destination page is present only once placed
                memory.populate(self.mem.dst[:cfg.wss_bytes])
        # --fault-backend uffd: this vCPU's own uffd over destination RAM, handed to the placers
        # and kept open (a missing page then blocks this process in the kernel until placed)
        self.uffd = None if self.shared.uffd is None else self.shared.uffd.register_vcpu(self.role, self.mem.dst_memfd)
        self.seq = 0
        led = self.ledger.vcpu(self.role)
        self.stats, self.lat_dist, self.fault_log, self.progress = led.stats, led.lat_dist, led.faults, led.progress
        self.woken_ns = 0  # when tracing: the last eventfd wake-up
        self.fence = threading.Lock()
        # pacing: the whole guest dirties at most dirty_rate bytes/s, shared by the vCPUs
        self.interval = None if cfg.dirty_rate is None else cfg.clock.real(TARGET_PAGE * cfg.vcpus / cfg.dirty_rate)
        self.next_t = time.monotonic()
        self.next_point = 0  # when the next progress point is due (monotonic ns)
        self.sleep = SleepClock()
        self.stats.slept_dst_ns = -1

    def ram(self, phase: int) -> tuple[np.ndarray, np.ndarray]:
        ram = self.mem.src if phase == memory.RUN_SRC else self.mem.dst
        return ram.view(np.uint64).reshape(-1, TARGET_PAGE // 8), ram.reshape(-1, TARGET_PAGE)

    def write(self, pages: np.ndarray, phase: int) -> None:
        if not pages.size:
            return
        u64, u8 = self.ram(phase)
        if self.ab:
            ab_increment(u8, pages, self.vcpu)
            self.stamps[pages] += 1
        else:
            self.seq += 1
            stamp_pages(u64, pages, self.vcpu, self.seq)
            self.stamps[pages] = self.seq
        if phase == memory.RUN_SRC:
            self.dirty[pages] += 1  # after the data: the dirty log never runs ahead of it

    def sleep_on_efd(self, timeout: float | None) -> None:
        r, _, _ = select.select([self.efd], [], [], timeout)
        if r:
            os.eventfd_read(self.efd)
            if self.tr:
                self.woken_ns = time.monotonic_ns()  # the fault's "vCPU woken" step

    def sleep_paced(self, timeout: float) -> None:
        """A sleep of the guest's own (its pacing; an idle guest), not a fault's (SleepClock)."""
        t = time.monotonic_ns()
        self.sleep_on_efd(timeout)
        self.sleep.paced_ns += time.monotonic_ns() - t

    def fault(self, tp: int) -> None:
        """Block until the host page holding target page ``tp`` is placed."""
        k = self.cfg.tp_per_hp
        hp = tp // k
        t0 = time.monotonic_ns()
        w = self.mem.wait[self.vcpu]
        w[1] = t0
        w[0] = hp
        with self.fence:  # wait-slot store before the receivedmap load (pairs with the receiver's)
            pass
        self.fault_w.send(Msg.FAULT, (self.vcpu, hp))
        received = self.mem.received
        while not received[tp]:
            if self.mem.ctl[memory.PHASE] == memory.QUIT:
                break
            self.sleep_on_efd(RECHECK)
        w[0] = -1
        t1 = time.monotonic_ns() if received[tp] else -1
        self.fault_log.append(hp, t0, t1, self.stats.accesses_dst)  # never full: nhost + 1 rows
        self.stats.faults += 1
        if self.tr:
            self.tr.put(K.FAULT, t0, t1 if t1 >= 0 else time.monotonic_ns(), hp, tp, t1 >= 0,
                        self.woken_ns if self.woken_ns >= t0 else 0)
        if t1 >= 0:  # QEMU's log2 bucket, so the controller can show the latency while it runs
            self.lat_dist[min(max(((t1 - t0) // 1000).bit_length() - 1, 0), len(self.lat_dist) - 1)] += 1

    def run_chunk(self, phase: int) -> int:
        """One chunk of accesses, each counted when it is made: on the destination a chunk may
        span several faults, and what came before a fault must not wait for the chunk's end."""
        pages = self.stream.next_chunk(UFFD_CHUNK if self.uffd is not None and phase == memory.RUN_DST else CHUNK)
        if phase == memory.RUN_SRC:
            self.write(pages, phase)
            self.count(len(pages), phase)
            return len(pages)
        if self.uffd is not None:  # at memory speed: a missing page is a real fault, taken by the kernel
            self.write(pages, phase)
            self.count(len(pages), phase)
            return len(pages)
        received = self.mem.received
        done = 0
        while done < len(pages):
            rest = pages[done:]
            present = received[rest].astype(bool)
            if present.all():
                self.write(rest, phase)
                self.count(len(rest), phase)
                return len(pages)
            m = int(np.argmin(present))
            self.write(rest[:m], phase)
            self.count(m, phase)
            done += m
            self.fault(int(rest[m]))  # its row holds the accesses made before it
            if self.mem.ctl[memory.PHASE] != memory.RUN_DST:
                break
        return done

    def count(self, n: int, phase: int) -> None:
        """``n`` accesses made, counted as they are made; on the destination a progress point every
        PROGRESS_EVERY_NS as well (with the fault rows, what the report reads the guest's progress
        at any moment from: it makes no access during a fault)."""
        st = self.stats
        if phase == memory.RUN_SRC:
            st.accesses_src += n
            return
        st.accesses_dst += n
        now = time.monotonic_ns()
        if now >= self.next_point:
            self.next_point = now + PROGRESS_EVERY_NS
            st.slept_dst_ns = self.sleep.slept_ns()
            if len(self.progress) < self.progress.cap - 1:  # the last row is kept for where it stopped
                self.progress.append(now, st.accesses_dst)
            else:
                st.progress_dropped += 1

    def run(self) -> None:
        ctl = self.mem.ctl
        idle = self.cfg.workload == "idle"
        ran = None
        ready = False  # told the controller the guest runs (after its first chunk, if it writes)
        if idle:
            self.ctrl(Ctl.READY, time.monotonic_ns())
            ready = True
        while True:
            phase = int(ctl[memory.PHASE])
            if phase == memory.QUIT:
                break
            if phase == memory.PAUSE:
                t_paused = time.monotonic_ns()
                self.ctrl(Ctl.PAUSED, t_paused)
                self.status("paused")
                while int(ctl[memory.PHASE]) == memory.PAUSE:
                    self.sleep_on_efd(RECHECK)
                if self.tr:
                    self.tr.put(K.PAUSED, t_paused, time.monotonic_ns())
                if int(ctl[memory.PHASE]) == memory.RUN_DST:
                    self.ctrl(Ctl.RESUMED, time.monotonic_ns())
                continue
            if ran != phase:
                self.status("running on the " + ("source" if phase == memory.RUN_SRC else "destination"))
                if phase == memory.RUN_DST:
                    self.stream.on_destination()
                    self.sleep.start()
                ran = phase
            if idle:
                self.sleep_paced(RECHECK)
                continue
            t0 = time.monotonic_ns()
            n = self.run_chunk(phase)
            if not ready:
                self.ctrl(Ctl.READY, time.monotonic_ns())
                ready = True
            if self.interval is not None:
                self.next_t = max(self.next_t, time.monotonic()) + n * self.interval
                left = self.next_t - time.monotonic()
                if left > 0:
                    self.sleep_paced(left)
            if phase == memory.RUN_SRC:
                self.stats.run_src_ns += time.monotonic_ns() - t0
            else:
                self.stats.run_dst_ns += time.monotonic_ns() - t0
        self.progress.append(time.monotonic_ns(), self.stats.accesses_dst)  # where it stopped
        self.stats.slept_dst_ns = self.sleep.slept_ns()
