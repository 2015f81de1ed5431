"""The ledger: what every process of a run measures, in memory the controller reads whatever became
of the run.

Each child's figures are a typed record of int64 counters (``SourceStats``, ``ListenStats``,
``ReceiverStats``, ``VcpuStats``), written in place by the one process that owns it; each vCPU's
faults and progress are rows appended to logs. All of it lives in one anonymous shared mapping the
controller makes before it forks the children (as the trace's arena does, events.py), so:

* nothing a child measured has to travel in a message at the end: no statistic, however large a
  run makes it, can outgrow a frame (the control channel carries only small messages);
* a run that fails, is interrupted, or loses a child to SIGKILL still has every figure counted up
  to that moment, and the controller reports it;
* the controller samples the live figures (its timeline, the progress line) without asking.

Sizes: a vCPU faults at most once per host page (a placed page never leaves receivedmap during
postcopy; discards happen before the guest resumes), plus one fault left open when it is told to
quit, so its fault log holds ``nhost + 1`` rows and can never overflow. The progress log holds a
point every ``PROGRESS_EVERY`` of real time the guest runs on the destination, for as long as the
run's deadline allows (it stops adding points, and says how many it dropped, if a run outlived
that). The mapping is reserved, not committed (``MAP_NORESERVE``): a page costs memory once a row
is written into it, so a 1 TiB reservation for a small run costs nothing.

A row is appended with one ``struct.pack_into`` and then counted (the count is a word of the mapping
too): a reader that sees the count sees the row.
"""

from __future__ import annotations

import mmap
import struct
from typing import Any, Iterator, TypeVar

import numpy as np

from .plan import Kind, Plan, Role

MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux's value; Python < 3.13 lacks the name
PROGRESS_EVERY_NS = 10_000_000  # a vCPU's progress point on the destination, every 10 ms of real time
PROGRESS_MAX = 1 << 24  # points at most (46 hours of running at one per 10 ms)
LAT_BUCKETS = 24  # QEMU's BLOCKTIME_LATENCY_BUCKET_N (stats.BUCKETS)

R = TypeVar("R", bound="Record")


class Field:
    """One int64 counter of a record. Exactly one process writes it (an aligned 8-byte store,
    atomic on every platform this runs on); the controller may read it at any time."""

    __slots__ = ("name", "doc", "index")

    def __init__(self, doc: str = ""):
        self.doc = doc
        self.index = -1
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Record | None, owner: type | None = None) -> int:
        if obj is None:
            return self  # type: ignore[return-value]  # the class attribute: the Field itself
        return obj._w[self.index]

    def __set__(self, obj: Record, value: int) -> None:
        obj._w[self.index] = value


class Record:
    """Typed counters over int64 words: a subclass declares ``name = Field("what it counts")``;
    a renamed or misspelt field is an AttributeError (and a type error for mypy), never a 0."""

    FIELDS: tuple[Field, ...] = ()
    WORDS = 0

    def __init_subclass__(cls) -> None:
        seen: dict[str, Field] = {}
        for klass in reversed(cls.__mro__):
            for name, v in vars(klass).items():
                if isinstance(v, Field):
                    seen[name] = v
        for i, f in enumerate(seen.values()):
            if f.index not in (-1, i):
                raise TypeError(f"{cls.__name__}.{f.name}: a field moved between records")
            f.index = i
        cls.FIELDS = tuple(seen.values())
        cls.WORDS = len(cls.FIELDS)

    def __init__(self, words: memoryview | None = None):
        self._w = memoryview(bytearray(8 * self.WORDS)).cast("q") if words is None else words

    @classmethod
    def nbytes(cls) -> int:
        return 8 * cls.WORDS

    def copy(self: R) -> R:
        """A private copy: what the controller keeps once the mapping is gone."""
        return type(self)(memoryview(bytearray(self._w.tobytes())).cast("q"))

    def to_dict(self) -> dict[str, int]:
        return {f.name: self._w[f.index] for f in self.FIELDS}

    def release(self) -> None:
        self._w.release()


class SourceStats(Record):
    """mig/src: QEMU's MigrationStats (``ram``) and what shmig adds."""

    normal_pages = Field("target pages sent with their data")
    zero_pages = Field("target pages sent as a zero flag (save_zero_page)")
    transferred = Field("bytes written on every channel")
    precopy_bytes = Field("bytes sent before the guest stopped")
    downtime_bytes = Field("bytes sent while the guest was stopped")
    postcopy_bytes = Field("bytes sent once the guest ran on the destination")
    precopy_channel_bytes = Field("bytes written on the main (precopy) channel")
    postcopy_channel_bytes = Field("bytes written on the preempt (postcopy) channel")
    precopy_blocked_ns = Field("real ns the sender waited for write space on the main channel")
    postcopy_blocked_ns = Field("real ns the sender waited for write space on the preempt channel")
    multifd_bytes = Field("bytes written on the multifd channels, SYNC packets included (QEMU's multifd-bytes)")
    multifd_syncs = Field("multifd_send_sync_main calls: a SYNC packet on every channel")
    multifd_sync_wait_ns = Field("real ns the migration thread waited for the send threads to write their SYNC")
    remaining = Field("target pages still to send (the migration bitmap's weight)")
    dirty_sync_count = Field("dirty-log syncs (QEMU's dirty-sync-count)")
    precopy_rounds = Field("precopy rounds completed")
    converged = Field("precopy mode: 1 if the rest fitted downtime-limit, 0 if max-rounds forced it, -1 before")
    expected_downtime_ns = Field("precopy mode: the rest at the measured bandwidth (emulated ns), -1 before")
    discarded_host_pages = Field("host pages in the switchover's discard list")
    completion_pages = Field("postcopy: target pages sent in the completion step (before 10.1; none since)")
    postcopy_requests = Field("page requests received, one per message, duplicates included (as QEMU)")
    preemptions = Field("7.1 break-huge: background huge pages interrupted by a request")
    urgent_on_precopy = Field("7.1: requests for the interrupted page itself, finished on the main channel")
    postcopy_pages_resent = Field("pages sent before a pause that the destination never received")
    postcopy_pauses = Field("times the source went postcopy-paused")
    recoveries = Field("postcopy recoveries completed")


class ReceiverStats(Record):
    """mig/dst/listen and mig/dst/preempt: what a data channel's receiver loaded and placed."""

    frames = Field("frames taken off the channel")
    pages = Field("target pages in PAGES frames")
    zero_pages = Field("of which zero pages")
    bytes = Field("bytes taken off the channel")
    duplicate_pages = Field("target pages that arrived already placed (never overwritten)")
    link_wait_ns = Field("real ns spent waiting for the link to carry frames")
    last_place_ns = Field("monotonic ns of the last postcopy placement (0: none)")
    partial_host_pages_dropped = Field("huge pages only partly assembled when the channel broke")
    postcopy_pauses = Field("times this receiver went postcopy-paused")
    uffd_copy_bytes = Field("bytes placed by UFFDIO_COPY (--fault-backend uffd)")
    uffd_copy_ns = Field("real ns spent in those UFFDIO_COPY calls")


class ListenStats(ReceiverStats):
    """mig/dst/listen adds the fault thread's and the switchover's figures."""

    discarded_host_pages = Field("host pages dropped from receivedmap by the discard list")
    faults_seen = Field("vCPU faults read by the fault thread")
    faults_deduplicated = Field("faults on a page already requested (no second request)")
    requests_sent = Field("REQ_PAGES messages written on the return path")
    requests_resent = Field("requests sent again at a RESUME (lost in a broken channel)")
    multifd_flushes = Field("RAM_SAVE_FLAG_MULTIFD_FLUSH read: waits for every multifd channel's SYNC")
    multifd_sync_wait_ns = Field("real ns the listen thread waited in multifd_recv_sync_main, in all")
    uffd_unregistered = Field("vCPU ranges unregistered once every page was placed (--fault-backend uffd)")


class MultifdStats(ReceiverStats):
    """A multifd receive thread's record."""

    syncs = Field("SYNC packets read (each waited for the listen thread's release)")
    zero_pages_skipped = Field("zero pages not written: never received before and postcopy off"
                               " (multifd_recv_zero_page_process)")


class VcpuStats(Record):
    """guest/vcpuN: what it did on each side, and its faults in QEMU's buckets as they happen."""

    accesses_src = Field("page accesses on the source (precopy)")
    accesses_dst = Field("page accesses on the destination (postcopy)")
    run_src_ns = Field("real ns it ran on the source")
    run_dst_ns = Field("real ns it ran on the destination")
    faults = Field("faults taken, resolved or not")
    slept_dst_ns = Field("real ns it slept on the destination, not counting its pacing: blocked in"
                         " its faults, by its own clocks (guest.SleepClock); -1: not known")
    progress_dropped = Field("progress points not logged: the log was full")


class Log:
    """Rows of int64 columns appended by one process. The first word of its region is the count."""

    def __init__(self, mv: memoryview, offset: int, columns: tuple[str, ...], cap: int):
        self.columns = columns
        self.cap = cap
        self._mv = mv
        self._count = mv[offset:offset + 8].cast("q")
        self._at = offset + 8
        self._row = struct.Struct(f"<{len(columns)}q")
        self._pack = self._row.pack_into
        self._size = self._row.size

    @staticmethod
    def nbytes(columns: int, cap: int) -> int:
        return 8 + 8 * columns * cap

    def __len__(self) -> int:
        return self._count[0]

    @property
    def full(self) -> bool:
        return self._count[0] >= self.cap

    def append(self, *values: int) -> bool:
        """Add a row; False (and nothing written) if the log is full."""
        n = self._count[0]
        if n >= self.cap:
            return False
        self._pack(self._mv, self._at + n * self._size, *values)
        self._count[0] = n + 1
        return True

    def rows(self) -> np.ndarray:
        """The rows so far, as an (n, columns) int64 view of the mapping."""
        n = len(self)
        return np.frombuffer(self._mv, np.int64, n * len(self.columns), self._at).reshape(n, len(self.columns))

    def release(self) -> None:
        self._count.release()


FAULT_COLUMNS = ("host_page", "t0", "t1", "accesses")  # t1 = -1: never resolved; accesses at t0
PROGRESS_COLUMNS = ("t", "accesses")


class VcpuLedger:
    """One vCPU's part: its counters, its QEMU latency buckets, its fault log and progress log."""

    def __init__(self, stats: VcpuStats, lat_dist: np.ndarray, faults: Log, progress: Log):
        self.stats = stats
        self.lat_dist = lat_dist
        self.faults = faults
        self.progress = progress


def _stats_class(role: Role) -> type[Record]:
    return {Kind.SOURCE: SourceStats, Kind.LISTEN: ListenStats, Kind.PREEMPT: ReceiverStats,
            Kind.VCPU: VcpuStats, Kind.MULTIFD: MultifdStats}[role.kind]


class _Closed(dict):  # type: ignore[type-arg]
    """A closed ledger's records: empty (close stays idempotent), and a look-up is one clear error."""

    def __getitem__(self, key: object) -> Any:
        raise RuntimeError("the ledger is closed: its migration has ended (Migration.close)")


class Ledger:
    """Every process's record and logs in one mapping, made before the fork, sized for the run."""

    def __init__(self, plan: Plan, nhost: int, real_deadline_s: float):
        self.plan = plan
        fault_cap = nhost + 1
        progress_cap = int(min(PROGRESS_MAX, real_deadline_s * 1e9 / PROGRESS_EVERY_NS + 64))
        layout: list[tuple[Role, str, int]] = []  # (role, part, bytes)
        for r in plan.roles:
            layout.append((r, "stats", _stats_class(r).nbytes()))
            if r.kind is Kind.VCPU:
                layout += [(r, "lat_dist", 8 * LAT_BUCKETS),
                           (r, "faults", Log.nbytes(len(FAULT_COLUMNS), fault_cap)),
                           (r, "progress", Log.nbytes(len(PROGRESS_COLUMNS), progress_cap))]
        size = sum(-(-n // 64) * 64 for _, _, n in layout)  # every part on its own cache line
        self.map = mmap.mmap(-1, max(size, 64), flags=mmap.MAP_SHARED | MAP_NORESERVE)
        self.mv = memoryview(self.map)
        self._stats: dict[Role, Record] = {}
        self._vcpus: dict[Role, VcpuLedger] = {}
        at = 0
        parts: dict[tuple[Role, str], int] = {}
        for r, part, n in layout:
            parts[(r, part)] = at
            at += -(-n // 64) * 64
        for r in plan.roles:
            cls = _stats_class(r)
            off = parts[(r, "stats")]
            self._stats[r] = cls(self.mv[off:off + cls.nbytes()].cast("q"))
            if r.kind is Kind.VCPU:
                lat = np.frombuffer(self.mv, np.int64, LAT_BUCKETS, parts[(r, "lat_dist")])
                self._vcpus[r] = VcpuLedger(self._stats[r], lat,  # type: ignore[arg-type]
                                            Log(self.mv, parts[(r, "faults")], FAULT_COLUMNS, fault_cap),
                                            Log(self.mv, parts[(r, "progress")], PROGRESS_COLUMNS, progress_cap))
        self._stats[plan.source].converged = -1  # type: ignore[attr-defined]
        self._stats[plan.source].expected_downtime_ns = -1  # type: ignore[attr-defined]

    # -- typed access --------------------------------------------------------------------------------
    def stats(self, role: Role) -> Record:
        return self._stats[role]

    def source(self) -> SourceStats:
        return self._stats[self.plan.source]  # type: ignore[return-value]

    def receiver(self, role: Role) -> ReceiverStats:
        return self._stats[role]  # type: ignore[return-value]

    def listen(self) -> ListenStats:
        return self._stats[self.plan.listen]  # type: ignore[return-value]

    def vcpu(self, role: Role) -> VcpuLedger:
        return self._vcpus[role]

    def vcpus(self) -> Iterator[VcpuLedger]:
        return (self._vcpus[r] for r in self.plan.vcpus)

    def close(self) -> None:
        """Release every view; the mapping goes once no array still uses it (a numpy view someone
        kept holds the mapping alive rather than pointing at freed memory)."""
        for rec in self._stats.values():
            rec.release()
        for v in self._vcpus.values():
            v.faults.release()
            v.progress.release()
        self._vcpus = self._stats = _Closed()  # type: ignore[assignment]
        try:
            self.mv.release()
            self.map.close()
        except BufferError:
            pass  # an array still uses it: it is unmapped when that array goes


def snapshot(led: Ledger) -> dict[str, Any]:
    """Every counter of every process now, by title (the status line of a hang uses it)."""
    return {r.title: led.stats(r).to_dict() for r in led.plan.roles}
