"""The controller's samples of a running migration: one every 100 ms of emulated time.

Each ``Sample`` is what the live status line shows and what the report's ``timeline`` keeps: the
phase, bytes sent on each channel, pages left and received, faults waiting and done, the guest's
accesses, precopy rounds, requests served, and the p50 fault latency so far (from QEMU's buckets,
the only figure a live display has before the per-fault logs are read). A run of any length keeps
them in one numpy array grown by doubling: a few dozen bytes a sample, not a dict each.
"""

from __future__ import annotations

import math
import time
from dataclasses import astuple, dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from .stats import dist_quantile
from .status import MigrationStatus

if TYPE_CHECKING:
    from .clock import Clock
    from .ledger import Ledger
    from .memory import GuestMemory

SAMPLE_EVERY = 0.1  # emulated seconds between samples
PHASES = ("setup", "precopy", "switchover", "postcopy", "postcopy-paused", "postcopy-recover", "completion")
STATUSES = tuple(MigrationStatus)


@dataclass(frozen=True)
class Sample:
    t_ms: float  # emulated ms since the migration started
    phase: str  # one of PHASES
    precopy_bytes: int  # written on the main channel so far
    postcopy_bytes: int  # written on the preempt channel so far
    multifd_bytes: int  # written on the multifd channels so far
    remaining_pages: int  # target pages still to send
    received_pages: int  # target pages in the destination's receivedmap
    faults_outstanding: int  # vCPUs waiting for a page now
    guest_accesses: int  # every access of every vCPU so far
    rounds: int  # precopy rounds completed
    requests: int  # page requests the source received
    faults_done: int  # faults resolved so far
    fault_p50_us: float | None  # emulated us, estimated from QEMU's log2 buckets
    status: str = "none"  # the source's QEMU status then (query-migrate's, status.during)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def take(cls, clock: Clock, led: Ledger, mem: GuestMemory, phase: str, t0: int,
             status: str = "none") -> "Sample":
        """One sample now, from what every process has counted so far (the ledger) and the
        destination's maps; ``t0``: when the migration started (real monotonic ns)."""
        src = led.source()
        vcpus = list(led.vcpus())
        dist = np.sum([v.lat_dist for v in vcpus], axis=0)  # the faults resolved so far, in QEMU's buckets
        p50 = dist_quantile(dist, 0.5)
        return cls(
            t_ms=round(clock.emulated_ms(time.monotonic_ns() - t0), 1),
            phase=phase,
            precopy_bytes=src.precopy_channel_bytes,
            postcopy_bytes=src.postcopy_channel_bytes,
            multifd_bytes=src.multifd_bytes,
            remaining_pages=src.remaining,
            received_pages=int(np.count_nonzero(mem.received)),
            faults_outstanding=int(np.count_nonzero(mem.wait[:, 0] >= 0)),
            guest_accesses=sum(v.stats.accesses_src + v.stats.accesses_dst for v in vcpus),
            rounds=src.precopy_rounds,
            requests=src.postcopy_requests,
            faults_done=int(dist.sum()),
            fault_p50_us=None if p50 is None else round(clock.emulated_ns(p50), 1),
            status=status,
        )


_DTYPE = np.dtype([(f.name, "f8" if f.name in ("t_ms", "fault_p50_us") else "u1" if f.name in ("phase", "status")
                    else "i8")
                   for f in fields(Sample)])


class Timeline:
    """Samples in order, stored compactly."""

    def __init__(self, capacity: int = 256):
        self._a = np.zeros(capacity, _DTYPE)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def append(self, s: Sample) -> None:
        if self._n == len(self._a):
            grown = np.zeros(2 * len(self._a), _DTYPE)
            grown[:self._n] = self._a
            self._a = grown
        row = list(astuple(s))
        row[1] = PHASES.index(s.phase)
        row[-2] = math.nan if s.fault_p50_us is None else s.fault_p50_us
        row[-1] = STATUSES.index(MigrationStatus(s.status))
        self._a[self._n] = tuple(row)
        self._n += 1

    def to_dicts(self) -> list[dict[str, Any]]:
        """The report's ``timeline``: one dict per sample (JSON; pandas reads it as records)."""
        out = []
        for row in self._a[:self._n].tolist():
            d = dict(zip(_DTYPE.names, row))  # type: ignore[arg-type]
            d["phase"] = PHASES[d["phase"]]
            d["status"] = str(STATUSES[d["status"]])
            d["t_ms"] = round(d["t_ms"], 1)
            p50 = d["fault_p50_us"]
            d["fault_p50_us"] = None if math.isnan(p50) else round(p50, 1)
            out.append(d)
        return out
