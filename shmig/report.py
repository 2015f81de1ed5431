"""The report of one migration: QEMU ``query-migrate`` names in snake_case, plus what shmig adds.

Times are in milliseconds (``*_ms``) or microseconds (``*_us``), QEMU's own latency fields in
nanoseconds as QEMU reports them, sizes in bytes. ``to_dict()`` is the JSON document;
``summary()`` is the human table the CLI prints (summary.py); ``analysis.build_report`` makes a
report from a run's record.

Every resolved fault is kept (``faults``: start, latency and vCPU, as numpy columns, 18 bytes a
fault). In JSON they are columns (``{"t_ms": [...], "latency_us": [...], "vcpu": [...]}``, which
pandas reads with ``pd.DataFrame(report["faults"])``), inline up to ``INLINE_FAULTS`` faults and
beyond that in a companion ``.npz`` beside the JSON file, which the JSON names and every reader
here follows (``write_json`` / ``load_runs``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from . import schema, stats
from .errors import ConfigError
from .files import atomic_write

INLINE_FAULTS = 50_000  # more faults than this go to the companion .npz when written to a file


@dataclass(eq=False)
class FaultTable:
    """Every resolved fault, by start time: emulated ms since the start, latency in us, vCPU."""

    t_ms: np.ndarray = field(default_factory=lambda: np.empty(0, np.float64))
    latency_us: np.ndarray = field(default_factory=lambda: np.empty(0, np.float64))
    vcpu: np.ndarray = field(default_factory=lambda: np.empty(0, np.int16))

    COLUMNS = ("t_ms", "latency_us", "vcpu")

    def __len__(self) -> int:
        return len(self.t_ms)

    def columns(self) -> dict[str, np.ndarray]:
        return {c: getattr(self, c) for c in self.COLUMNS}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FaultTable) and all(
            np.array_equal(getattr(self, c), getattr(other, c)) for c in self.COLUMNS)

    def to_json(self) -> dict[str, list]:
        return {"t_ms": np.round(self.t_ms, 3).tolist(), "latency_us": np.round(self.latency_us, 1).tolist(),
                "vcpu": self.vcpu.tolist()}

    @classmethod
    def from_columns(cls, cols: dict[str, Any]) -> "FaultTable":
        t, lat, v = (np.asarray(cols[c]) for c in cls.COLUMNS)
        if not len(t) == len(lat) == len(v):
            raise ValueError("fault columns of different lengths")
        return cls(t.astype(np.float64), lat.astype(np.float64), v.astype(np.int16))

    @classmethod
    def from_rows(cls, rows: Any) -> "FaultTable":
        """The list of [t_ms, latency_us, vcpu] that reports before this version wrote."""
        a = np.asarray(rows, dtype=np.float64).reshape(-1, 3)
        return cls(a[:, 0].copy(), a[:, 1].copy(), a[:, 2].astype(np.int16))


class Companion:
    """The per-fault columns of the runs in one JSON file, in one ``.npz`` beside it."""

    def __init__(self, json_path: str):
        base = json_path[:-5] if json_path.endswith(".json") else json_path
        self.path = base + ".faults.npz"
        self.arrays: dict[str, np.ndarray] = {}

    def put(self, table: FaultTable) -> dict[str, Any]:
        """Keep ``table`` for the file; what the JSON says in its place."""
        key = f"run{len(self.arrays) // len(FaultTable.COLUMNS)}"
        for c, a in table.columns().items():
            self.arrays[f"{key}.{c}"] = a
        return {"npz": os.path.basename(self.path), "run": key, "count": len(table)}


@dataclass
class Report:
    status: str = "failed"  # "completed" or "failed"
    # each side's MigrationStatus history, QEMU's names and order for the release the run stands for
    # (Config.qemu): {"qemu": "10.2", "source": [{"status": "setup", "t_ms": 0.0}, ...],
    # "destination": [...]} (analysis.status_history)
    status_history: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    # how destination vCPUs met missing pages: "bitmap" (receivedmap + eventfd) or "uffd" (userfaultfd)
    fault_backend: str = "bitmap"
    total_time_ms: float | None = None
    setup_time_ms: float | None = None
    downtime_ms: float | None = None
    switchover_pause_ms: float | None = None
    postcopy_phase_ms: float | None = None
    dirty_sync_count: int = 0
    precopy_rounds: int = 0
    converged: bool | None = None  # precopy ended within downtime_limit (False: forced by max_rounds); None after postcopy
    ram: dict[str, Any] = field(default_factory=dict)
    throughput_mbps: float | None = None
    postcopy_requests: int = 0
    postcopy_bytes: int = 0
    postcopy_blocktime_ms: float = 0.0
    postcopy_vcpu_blocktime_ms: list[float] = field(default_factory=list)
    # the vCPU's own view of the same: what each slept on the destination (guest.SleepClock); None
    # where the kernel does not say (no schedstat)
    postcopy_vcpu_slept_ms: list[float | None] = field(default_factory=list)
    # QEMU 10.1's latency fields, as query-migrate reports them (ns)
    postcopy_latency: int = 0  # every fault's wait over the number of faults
    postcopy_vcpu_latency: list[int] = field(default_factory=list)  # the same, per vCPU
    postcopy_non_vcpu_latency: int = 0  # faults not taken by a vCPU (none here: every fault is a vCPU's)
    postcopy_latency_us: dict[str, float] = field(default_factory=dict)
    postcopy_latency_dist: list[int] = field(default_factory=lambda: [0] * stats.BUCKETS)
    preemptions: int = 0
    urgent_on_precopy: int = 0
    # postcopy recovery: how often a broken channel paused the migration, how long the guest waited
    # for it (faults stay blocked meanwhile, so blocktime and fault latency include it), what went again
    postcopy_pauses: int = 0
    recoveries: int = 0
    postcopy_paused_ms: float = 0.0
    postcopy_pages_resent: int = 0  # pages sent before the pause that the destination never received
    postcopy_requests_resent: int = 0  # requests still waited for at the RESUME
    faults_injected: list[dict[str, Any]] = field(default_factory=list)
    faults_not_injected: list[str] = field(default_factory=list)
    pauses: list[dict[str, Any]] = field(default_factory=list)
    guest_progress: dict[str, Any] = field(default_factory=dict)
    guest_speed_ratio: float | None = None  # postcopy access rate / precopy rate: 1.0 = full speed
    destination: dict[str, Any] = field(default_factory=dict)
    integrity: dict[str, Any] = field(default_factory=lambda: {"ok": False, "pages_checked": 0,
                                                                "first_bad_page": None})
    link: dict[str, Any] = field(default_factory=dict)
    multifd: dict[str, Any] = field(default_factory=dict)  # channels, bytes and syncs; empty when multifd is off
    time_dilation: dict[str, Any] = field(default_factory=dict)
    host: dict[str, Any] = field(default_factory=dict)  # hostname, cpus, worker (a cluster's, or None)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    faults: FaultTable = field(default_factory=FaultTable)  # every resolved fault, by start time
    # [name, start_ms, end_ms] of setup, precopy, switchover (downtime) and postcopy
    phases: list[list[Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "completed" and bool(self.integrity.get("ok"))

    @property
    def interrupted(self) -> bool:
        """Stopped by Ctrl-C (SIGINT), not failed on its own."""
        return self.status != "completed" and (self.error or "").startswith("interrupted")

    @property
    def guest_slowdown(self) -> float | None:
        """The former name of ``guest_speed_ratio`` (it read the wrong way round: 0.9 = 90% speed)."""
        return self.guest_speed_ratio

    def __post_init__(self) -> None:
        if not isinstance(self.faults, FaultTable):  # rows or columns, as a caller or a saved report has them
            self.faults = _faults_from_json(self.faults, ".")

    def to_dict(self, companion: Companion | None = None) -> dict[str, Any]:
        """The JSON document. With a ``companion``, a long fault table goes there instead."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d = json.loads(json.dumps({k: v for k, v in d.items() if k != "faults"}))  # a deep copy, plain types
        big = companion is not None and len(self.faults) > INLINE_FAULTS
        d["faults"] = companion.put(self.faults) if big else self.faults.to_json()  # type: ignore[union-attr]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], base_dir: str = ".") -> "Report":
        """A saved report (``to_dict``/JSON) back; keys this version does not know are ignored and
        missing ones keep their defaults, so reports of other versions still load. A fault table
        kept in a companion .npz is read from ``base_dir``."""
        d = dict(d)
        if "guest_slowdown" in d:  # the same ratio, under the name it had before
            d.setdefault("guest_speed_ratio", d["guest_slowdown"])
        if "faults" in d:
            d["faults"] = _faults_from_json(d["faults"], base_dir)
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def summary(self) -> str:
        from .summary import format_summary  # the text lives beside the model, not in it

        return format_summary(self)

    def link_warning(self) -> str | None:
        from .summary import link_warning

        return link_warning(self)


def _faults_from_json(obj: Any, base_dir: str) -> FaultTable:
    if isinstance(obj, FaultTable):
        return obj
    if isinstance(obj, dict) and "npz" in obj:
        path = os.path.join(base_dir, str(obj["npz"]))
        try:
            with np.load(path) as npz:
                cols = {c: npz[f"{obj['run']}.{c}"] for c in FaultTable.COLUMNS}
            if any(a.ndim != 1 or a.dtype.kind not in "iuf" for a in cols.values()):
                raise ValueError("its columns are not lists of numbers")
            return FaultTable.from_columns(cols)
        except (OSError, KeyError, ValueError, EOFError) as e:
            raise ConfigError(f"the report's fault table is in {path}, which cannot be read ({e}):"
                              f" keep the .faults.npz beside the JSON file") from None
    if isinstance(obj, dict):
        return FaultTable.from_columns(obj)
    return FaultTable.from_rows(obj)


def write_json(path: str, doc: Any, companion: Companion | None = None) -> None:
    """Write ``doc`` as JSON (and the companion's arrays beside it), each to a temporary file in
    the same directory first, then renamed over the target: a crash or a full disk leaves the
    previous file intact, never half of a new one."""
    if companion is not None and companion.arrays:
        atomic_write(companion.path, lambda f: np.savez(f, **companion.arrays), binary=True)
    atomic_write(path, lambda f: json.dump(doc, f, indent=2))


@dataclass
class SavedRun:
    """One run read back from a ``run``, ``compare`` or ``sweep`` JSON file."""

    mode: str
    host_page: int
    report: Report
    knob: str | None = None  # sweep files: the option swept and this run's value of it
    value: str | None = None


def load_runs(path: str) -> list[SavedRun]:
    """Every run in a JSON file written by ``shmig run|compare|sweep --json``; a file that is none
    of these, or holds something the tools could not read (``schema``), is bad input (ConfigError,
    one line naming where)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than json can read
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise ConfigError(f"{path} is not JSON ({why}): give a file written by shmig run|compare|sweep --json") from None
    entries = data if isinstance(data, list) else [data]
    base = os.path.dirname(os.path.abspath(path))
    runs = []
    for i, e in enumerate(entries):
        rep = e.get("report", e) if isinstance(e, dict) else None
        if not isinstance(rep, dict) or not isinstance(rep.get("config"), dict) or "status" not in rep:
            raise ConfigError(f"{path} is not a shmig report: give a file written by shmig run|compare|sweep --json")
        where = f"{path}: runs[{i}]" if isinstance(data, list) else f"{path}: report"
        if rep is e:
            schema.check_report(rep, where, Report)
        else:
            schema.check_entry(e, where, Report)
        c = rep["config"]
        runs.append(SavedRun(e.get("mode", c.get("mode")), e.get("host_page", c.get("host_page")),
                             Report.from_dict(rep, base), e.get("knob"), e.get("value")))
    if not runs:
        raise ConfigError(f"{path} holds no runs")
    return runs
