"""The report of one migration: QEMU ``query-migrate`` names in snake_case, plus what shmig adds.

Times are in milliseconds (``*_ms``) or microseconds (``*_us``), sizes in bytes. ``to_dict()`` is
the JSON document; ``summary()`` is the human table the CLI prints.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from . import stats
from .pattern import check
from .units import fmt_size

if TYPE_CHECKING:
    from .controller import Migration


@dataclass
class Report:
    status: str = "failed"  # "completed" or "failed"
    error: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
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
    postcopy_latency_us: dict[str, float] = field(default_factory=dict)
    postcopy_latency_dist: list[int] = field(default_factory=lambda: [0] * stats.BUCKETS)
    preemptions: int = 0
    urgent_on_precopy: int = 0
    guest_progress: dict[str, Any] = field(default_factory=dict)
    guest_speed_ratio: float | None = None  # postcopy access rate / precopy rate: 1.0 = full speed
    destination: dict[str, Any] = field(default_factory=dict)
    integrity: dict[str, Any] = field(default_factory=lambda: {"ok": False, "pages_checked": 0,
                                                                "first_bad_page": None})
    timeline: list[dict[str, Any]] = field(default_factory=list)

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def summary(self) -> str:
        c = self.config
        lines = [f"shmig {c.get('mode')}: {self.status}" + (" (did not converge)" if self.converged is False else "")
                 + (f" — {self.error}" if self.error else "")]
        if self.total_time_ms is None:
            return "\n".join(lines)
        ram = self.ram
        lat = self.postcopy_latency_us
        rows = [
            ("RAM", f"{fmt_size(c['ram'])}, host page {fmt_size(c['host_page'])}, workload {c['workload']}"),
            ("total time", f"{_n(self.total_time_ms, '.1f')} ms (setup {_n(self.setup_time_ms, '.1f')} ms)"),
            ("downtime", f"{_n(self.downtime_ms, '.2f')} ms (guest paused {_n(self.switchover_pause_ms, '.2f')} ms)"),
            ("transferred", f"{fmt_size(ram.get('transferred', 0))} at {_n(self.throughput_mbps, '.0f')} Mbps,"
             f" {ram.get('normal_pages', 0)} normal + {ram.get('zero_pages', 0)} zero pages"),
            ("channels", ", ".join(f"{k} {fmt_size(v)}" for k, v in ram.get("channel_bytes", {}).items())),
            ("dirty syncs", f"{self.dirty_sync_count} ({self.precopy_rounds} precopy rounds)"),
        ]
        if self.converged is not None:
            limit = f"the {c['downtime_limit'] * 1e3:g} ms downtime-limit"
            rows.append(("converged", f"yes: downtime {_n(self.downtime_ms, '.1f')} ms, within {limit}"
                         if self.converged else f"NO: forced to stop-and-copy after {self.precopy_rounds}"
                         f" rounds (--max-rounds {c['max_rounds']}): downtime {_n(self.downtime_ms, '.1f')} ms"
                         f" against {limit}"))
        if c.get("mode") != "precopy":
            rows += [
                ("postcopy", f"{self.postcopy_phase_ms:.1f} ms, {fmt_size(self.postcopy_bytes)},"
                 f" {self.postcopy_requests} requests, {self.preemptions} preemptions,"
                 f" {self.urgent_on_precopy} urgent on precopy"
                 if self.postcopy_phase_ms is not None else "-"),
                ("fault latency", f"n={lat.get('count', 0)} mean {lat.get('mean', 0):.0f} us,"
                 f" p50 {lat.get('p50', 0):.0f} us, p90 {lat.get('p90', 0):.0f} us,"
                 f" p99 {lat.get('p99', 0):.0f} us, max {lat.get('max', 0):.0f} us"),
                ("blocktime", f"{self.postcopy_blocktime_ms:.1f} ms (per vCPU "
                 + ", ".join(f"{b:.1f}" for b in self.postcopy_vcpu_blocktime_ms) + " ms)"),
            ]
            gp = self.guest_progress
            if gp:
                ratio = self.guest_speed_ratio
                rows.append(("guest progress", f"{gp.get('postcopy_accesses', 0)} accesses in postcopy, "
                             + (f"{ratio:.3g}x its precopy rate (1 = full speed)" if ratio is not None
                                else f"speed ratio unavailable: {gp.get('speed_ratio_unavailable')}")))
        integ = self.integrity
        rows.append(("integrity", f"ok, {integ['pages_checked']} pages checked" if integ.get("ok")
                     else f"FAILED: {integ.get('detail')}"))
        w = max(len(k) for k, _ in rows)
        lines += [f"  {k:<{w}}  {v}" for k, v in rows]
        return "\n".join(lines)


MIN_BASELINE_S = 0.2


def _n(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _ms(a: int | None, b: int | None) -> float | None:
    return None if a is None or b is None else round((b - a) / 1e6, 3)


def _accesses_until(vcpu: dict[str, Any], t_run: int | None, phase_ms: float | None) -> int:
    """A vCPU's accesses on the destination during the postcopy phase only: once every page is
    there it runs unhindered until it is told to stop, which says nothing about the migration."""
    log = np.frombuffer(vcpu.get("progress", b""), np.int64).reshape(-1, 2)
    if t_run is None or phase_ms is None or not len(log):
        return int(vcpu["accesses_dst"])
    return int(round(np.interp(t_run + phase_ms * 1e6, log[:, 0], log[:, 1], left=0)))


def build_report(m: Migration) -> Report:
    cfg = m.cfg
    rep = Report(config=cfg.to_dict(), error=m.error, timeline=m.samples)
    if m.error is not None:
        return rep
    ev = m.events
    by_title = {p.title: p.stats or {} for p in m.procs}
    src = by_title.get("mig/src", {})
    src.get("events", {})
    t_end = ev.get("complete")
    rep.total_time_ms = _ms(m.t0, t_end)
    rep.setup_time_ms = _ms(m.t0, ev.get("setup_done"))
    t_stop = ev.get("stop_vm")
    if ev.get("running") is not None:  # postcopy happened
        rep.downtime_ms = _ms(t_stop, ev.get("running"))
        # every vCPU acknowledged running again, or (it quit before it could) the resume itself
        resumed = ev.get("guest_resumed", ev.get("guest_resume_requested"))
        rep.switchover_pause_ms = _ms(ev.get("guest_stopped"), resumed)
        # postcopy ends when the last page is placed (the EOS and the controller come after)
        placed = [s.get("last_place_ns") for k, s in by_title.items() if k.startswith("mig/dst")]
        t_placed = max((t for t in placed if t), default=None)
        rep.postcopy_phase_ms = _ms(ev.get("running"), t_placed or t_end)
    else:
        rep.downtime_ms = _ms(t_stop, ev.get("eos_mig/dst/listen"))
        rep.switchover_pause_ms = _ms(ev.get("guest_stopped"), ev.get("eos_mig/dst/listen"))
    rep.dirty_sync_count = int(src.get("dirty_sync_count", 0))
    rep.precopy_rounds = int(src.get("precopy_rounds", 0))
    ch = src.get("channel_bytes", {})
    rep.ram = {
        "total": cfg.ram,
        "transferred": int(src.get("transferred", 0)),
        "normal_pages": int(src.get("normal_pages", 0)),
        "zero_pages": int(src.get("zero_pages", 0)),
        "normal_bytes": int(src.get("normal_pages", 0)) * 4096,
        "precopy_bytes": int(src.get("precopy_bytes", 0)),
        "downtime_bytes": int(src.get("downtime_bytes", 0)),
        "postcopy_bytes": int(src.get("postcopy_bytes", 0)),
        "channel_bytes": {"precopy": int(ch.get("precopy", 0)), "postcopy": int(ch.get("postcopy", 0))},
        "discarded_host_pages": int(src.get("discarded_host_pages", 0)),
        "expected_downtime_ms": src.get("expected_downtime_ms"),
    }
    if rep.total_time_ms:
        rep.throughput_mbps = round(rep.ram["transferred"] * 8 / 1e6 / (rep.total_time_ms / 1e3), 1)
    rep.postcopy_requests = int(src.get("postcopy_requests", 0))
    rep.postcopy_bytes = rep.ram["postcopy_bytes"]
    rep.preemptions = int(src.get("preemptions", 0))
    rep.urgent_on_precopy = int(src.get("urgent_on_precopy", 0))

    vcpus = sorted((p.stats for p in m.procs if p.title.startswith("guest/")), key=lambda s: s["vcpu"])
    intervals = [np.frombuffer(s["faults"], np.int64).reshape(-1, 3)[:, 1:] for s in vcpus]
    all_f = np.concatenate(intervals) if intervals else np.empty((0, 2), np.int64)
    done = all_f[all_f[:, 1] >= 0]
    lat_ns = done[:, 1] - done[:, 0]
    rep.postcopy_latency_us = stats.latency_summary(lat_ns)
    rep.postcopy_latency_dist = stats.latency_dist(lat_ns)
    rep.postcopy_blocktime_ms, per = stats.blocktime(intervals, t_end)
    rep.postcopy_vcpu_blocktime_ms = [round(b, 3) for b in per]
    rep.postcopy_blocktime_ms = round(rep.postcopy_blocktime_ms, 3)

    if ev.get("running") is None:  # ended by stop-and-copy: did it get there by converging?
        rep.converged = bool(src.get("converged", False))
    acc_src = sum(s["accesses_src"] for s in vcpus)
    per_vcpu = [_accesses_until(s, ev.get("running"), rep.postcopy_phase_ms) for s in vcpus]
    acc_dst = sum(per_vcpu)
    run_src = sum(s["run_src_ns"] for s in vcpus) / 1e9
    postcopy_s = (rep.postcopy_phase_ms or 0) / 1e3
    # the guest's normal speed: measured on the source when it ran there long enough to tell,
    # else the rate it is paced at; a few ms of running (postcopy right after setup) say nothing
    run_src_ms = run_src / max(len(vcpus), 1) * 1e3
    if run_src_ms >= MIN_BASELINE_S * 1e3:
        rate_src: float | None = acc_src / run_src
    elif cfg.dirty_rate is not None:
        rate_src = cfg.dirty_rate / 4096 / cfg.vcpus
    else:
        rate_src = None
    rate_dst = acc_dst / (postcopy_s * len(vcpus)) if postcopy_s > 0 and vcpus else None
    if cfg.workload == "idle":
        why = "the guest is idle (--workload idle)"
    elif rate_dst is None:
        why = "there was no postcopy phase to measure"
    elif rate_src is None:
        why = (f"no precopy baseline: the guest ran {run_src_ms:.0f} ms on the source, and"
               f" {MIN_BASELINE_S * 1e3:.0f} ms are needed to measure its speed (use more"
               f" --precopy-rounds, or pace it with --dirty-rate)")
    else:
        why = None
    rep.guest_progress = {
        "precopy_accesses": acc_src,
        "postcopy_accesses": acc_dst,
        "postcopy_bytes_accessed": acc_dst * 4096,
        "per_vcpu_postcopy_accesses": per_vcpu,
        "precopy_rate_per_vcpu": None if rate_src is None else round(rate_src, 1),
        "postcopy_rate_per_vcpu": None if rate_dst is None else round(rate_dst, 1),
        "precopy_run_ms_per_vcpu": round(run_src_ms, 1),
        "speed_ratio_unavailable": why,
    }
    if why is None and rate_src and rate_dst is not None:
        rep.guest_speed_ratio = round(rate_dst / rate_src, 4)
    rep.destination = {k: v for k, v in by_title.items() if k.startswith("mig/dst")}

    res = check(m.mem.dst, cfg.seed, cfg.zero_fraction, m.mem.stamps, cfg.workload == "ab")
    rep.integrity = res.to_dict()
    rep.status = "completed"
    if not res.ok:
        rep.error = f"integrity check failed: {res.detail}"
    return rep
