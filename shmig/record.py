"""The record of one run, as the controller saw it end: what the report, the trace and the plots read.

The controller produces exactly one ``RunRecord`` per run, finished or failed: the configuration
that ran, every event the children sent with its time, the controller's own marks, its timeline,
what the link carried, and, read out of the ledger once every child had gone, each process's
counters and each vCPU's fault and progress logs (private copies: the record outlives the shared
memory). ``analysis.build_report`` turns it into the ``Report``; ``trace.chrome_trace`` into a
Perfetto trace. Neither ever sees the controller.

Times in the record are real ``time.monotonic_ns()`` stamps, as the processes took them; ``emulated``
converts them (time dilation undone) the one way every reader must.
"""

from __future__ import annotations

import enum
import os
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .clock import Clock
from .config import Config
from .control import Ev
from .ledger import Ledger, ReceiverStats, SourceStats, VcpuStats
from .pattern import IntegrityResult, check
from .plan import Kind, Plan, Role

if TYPE_CHECKING:
    from .events import Arena
    from .link import Link
    from .memory import GuestMemory
    from .supervisor import Proc
    from .timeline import Timeline


class Mark(str, enum.Enum):
    """What the controller itself saw happen."""

    GUEST_STOPPED = "guest_stopped"  # every vCPU acknowledged the pause (the last one's time)
    GUEST_RESUME_REQUESTED = "guest_resume_requested"  # the controller told the vCPUs to run on the destination
    GUEST_RESUMED = "guest_resumed"  # every vCPU acknowledged running again
    COMPLETE = "complete"  # every receiver read EOS, every page was in receivedmap
    RECOVER = "recover"  # the controller started a postcopy recovery (QEMU: migrate with resume=true)


@dataclass(frozen=True)
class Event:
    """An event a child sent (``role`` set) or a mark of the controller's (``role`` None)."""

    name: Ev | Mark
    t: int  # real monotonic ns
    role: Role | None = None
    info: tuple[Any, ...] = ()


@dataclass
class VcpuRecord:
    role: Role
    stats: VcpuStats
    faults: np.ndarray  # (n, 4) int64: host page, start ns, end ns (-1: never resolved), accesses before it
    progress: np.ndarray  # (m, 2) int64: ns, accesses on the destination so far
    lat_dist: np.ndarray  # QEMU's 24 log2 buckets, as the vCPU counted them


@dataclass
class ProcRecord:
    role: Role
    pid: int | None
    exitcode: int | None


@dataclass
class RunRecord:
    config: Config
    plan: Plan
    t0: int  # the guest ran and the migration started (real monotonic ns)
    error: str | None = None
    events: list[Event] = field(default_factory=list)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    link: dict[str, Any] = field(default_factory=dict)
    link_latency_ns: int = 0  # real ns, one way
    calibration: list[dict[str, Any]] = field(default_factory=list)
    source: SourceStats | None = None
    receivers: dict[Role, ReceiverStats] = field(default_factory=dict)
    vcpus: list[VcpuRecord] = field(default_factory=list)
    procs: list[ProcRecord] = field(default_factory=list)
    integrity: IntegrityResult | None = None
    trace: dict[int, dict[str, Any]] = field(default_factory=dict)  # events.Arena.collect(), when traced
    host: dict[str, Any] = field(default_factory=dict)

    @property
    def clock(self) -> Clock:
        return self.config.clock

    # -- events -------------------------------------------------------------------------------------
    def first(self, name: Ev | Mark, kind: Kind | None = None) -> int | None:
        """When ``name`` first happened (of a process of ``kind``, if given), real ns."""
        for e in self.events:
            if e.name == name and (kind is None or (e.role is not None and e.role.kind is kind)):
                return e.t
        return None

    def last(self, name: Ev | Mark, kind: Kind | None = None) -> int | None:
        t = None
        for e in self.events:
            if e.name == name and (kind is None or (e.role is not None and e.role.kind is kind)):
                t = e.t
        return t

    def of(self, name: Ev | Mark, kind: Kind | None = None) -> list[Event]:
        return [e for e in self.events if e.name == name and (kind is None or (e.role is not None
                                                                                   and e.role.kind is kind))]

    # -- time ---------------------------------------------------------------------------------------
    def emulated(self, t: int | None) -> int | None:
        """A real stamp as an emulated one: ``t0 + (t - t0) / N`` (N: the time dilation)."""
        return None if t is None else self.t0 + int(self.clock.emulated_ns(t - self.t0))

    @classmethod
    def collect(cls, cfg: Config, plan: Plan, t0: int, error: str | None, events: list[Event], timeline: Timeline,
                calibration: list[dict[str, Any]], *, link: Link | None, procs: list[Proc], ledger: Ledger | None,
                mem: GuestMemory | None, arena: Arena | None) -> "RunRecord":
        """The record of a run whose children have all gone: the controller's own figures, the
        ledger, the link's usage, the integrity check of a run that did not fail, the trace."""
        rec = cls(config=cfg, plan=plan, t0=t0, error=error, events=list(events), timeline=timeline.to_dicts(),
                  calibration=calibration, host={"hostname": socket.gethostname(), "cpus": os.cpu_count(),
                                                 "worker": None})
        if link is not None:
            rec.link = link.usage()
            rec.link_latency_ns = link.latency_ns
        rec.procs = [ProcRecord(p.role, p.process.pid, p.process.exitcode) for p in procs]
        if ledger is not None:
            rec.copy_ledger(ledger)
        if error is None and mem is not None:
            rec.integrity = check(mem.dst_memfd or mem.dst, cfg.seed, cfg.zero_fraction, mem.stamps, cfg.workload == "ab")
        if arena is not None:  # every child is gone: what they recorded is all there is
            rec.trace = arena.collect()
        return rec

    def copy_ledger(self, led: Ledger) -> None:
        """Everything every process counted, copied out of the ledger before it is unmapped."""
        self.source = led.source().copy()
        self.receivers = {r: led.receiver(r).copy() for r in self.plan.receivers}
        for r in self.plan.vcpus:
            v = led.vcpu(r)
            self.vcpus.append(VcpuRecord(r, v.stats.copy(), v.faults.rows().copy(), v.progress.rows().copy(),
                                         v.lat_dist.copy()))

    def real_stamp(self, t: int) -> int:
        """The real monotonic stamp of emulated stamp ``t`` (emulated_stamps' inverse)."""
        return int(self.t0 + (t - self.t0) * self.clock.dilation)

    def emulated_stamps(self, a: np.ndarray) -> np.ndarray:
        """An array of stamps, any shape; -1 (a fault never resolved) stays -1."""
        n = self.clock.dilation
        if n == 1 or not a.size:
            return a
        out = (self.t0 + (a - self.t0) / n).astype(np.int64)
        out[a < 0] = -1
        return out

    def ms(self, t: int | None) -> float | None:
        """Emulated ms since the start, of a real stamp."""
        e = self.emulated(t)
        return None if e is None else round((e - self.t0) / 1e6, 3)
