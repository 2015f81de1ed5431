"""The report of one migration: QEMU ``query-migrate`` names in snake_case, plus what shmig adds.

Times are in milliseconds (``*_ms``) or microseconds (``*_us``), sizes in bytes. ``to_dict()`` is
the JSON document; ``summary()`` is the human table the CLI prints.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from . import stats
from .clock import Clock
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
    time_dilation: dict[str, Any] = field(default_factory=dict)
    host: dict[str, Any] = field(default_factory=dict)  # where it ran: hostname, cpus, worker (dask address; None here)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    # every resolved fault, by start time: [t_ms since the start, latency_us, vcpu]
    faults: list[list[float]] = field(default_factory=list)
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Report":
        """A saved report (``to_dict``/JSON) back; keys this version does not know are ignored and
        missing ones keep their defaults, so reports of other versions still load."""
        d = dict(d)
        if "guest_slowdown" in d:  # the same ratio, under the name it had before
            d.setdefault("guest_speed_ratio", d["guest_slowdown"])
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

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
        link = self.link
        if link.get("nominal_bps"):
            util = link.get("utilisation")
            rows.append(("link", f"{_gbps(link['nominal_bps'])} nominal, carried {_gbps(link.get('achieved_bps'))}"
                         f" while backlogged ({_n(None if util is None else util * 100, '.1f')}%)"))
        if self.time_dilation.get("factor", 1) != 1:
            rows.append(("time dilation", f"{self.time_dilation['factor']:g}x: the emulated world ran that"
                         " many times slower; every time here is emulated time"))
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
            if self.postcopy_pauses or c.get("inject_faults"):
                rows.append(("recovery", self._recovery_summary()))
            gp = self.guest_progress
            if gp:
                ratio, why = self.guest_speed_ratio, gp.get("speed_ratio_unavailable")
                speed = (f"{ratio:.3g}x its precopy rate (1 = full speed)" if ratio is not None
                         else "speed ratio unavailable" + (f": {why}" if why else ""))
                rows.append(("guest progress", f"{gp.get('postcopy_accesses', 0)} accesses in postcopy, {speed}"))
        integ = self.integrity
        rows.append(("integrity", f"ok, {integ['pages_checked']} pages checked" if integ.get("ok")
                     else f"FAILED: {integ.get('detail')}"))
        w = max(len(k) for k, _ in rows)
        lines += [f"  {k:<{w}}  {v}" for k, v in rows]
        warning = self.link_warning()
        if warning:
            lines.append(f"  warning: {warning}")
        return "\n".join(lines)

    def link_warning(self) -> str | None:
        """A limited link that ran below 95% of its rate: the machine, not the link, set the pace."""
        util = self.link.get("utilisation")
        if util is None or util >= LINK_KEPT_UP:
            return None
        return (f"the emulated {_gbps(self.link['nominal_bps'])} link carried only"
                f" {_gbps(self.link.get('achieved_bps'))} ({util:.0%}) while it had data queued: this"
                " machine could not keep up, so the figures are those of a slower link; rerun with"
                " --time-dilation auto")


    def _recovery_summary(self) -> str:
        text = (f"{_count(self.postcopy_pauses, 'pause')}, {_count(self.recoveries, 'recovery', 'recoveries')},"
                f" paused {self.postcopy_paused_ms:.1f} ms; {_count(self.postcopy_pages_resent, 'page')} and"
                f" {_count(self.postcopy_requests_resent, 'request')} sent again")
        if self.faults_injected:
            text += "; injected " + ", ".join(f"{f['fault']} at {f['postcopy_ms']:.0f} ms of postcopy"
                                              + (" (during a recovery)" if f["during"] == "recovery" else "")
                                              for f in self.faults_injected)
        if self.faults_not_injected:
            text += f"; never injected (the migration ended first): {', '.join(self.faults_not_injected)}"
        return text


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


MIN_BASELINE_S = 0.2
LINK_KEPT_UP = 0.95


def _gbps(bps: float | None) -> str:
    if bps is None:
        return "-"
    return f"{bps / 1e9:.2f} Gbit/s" if bps >= 1e9 else f"{bps / 1e6:.0f} Mbit/s"


def _n(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _ms(a: int | None, b: int | None) -> float | None:
    return None if a is None or b is None else round((b - a) / 1e6, 3)


class _Emulated:
    """Real monotonic stamps to emulated ones: ``t0 + (t - t0) / N`` (the run's Clock)."""

    def __init__(self, t0: int, clock: Clock):
        self.t0 = t0
        self.clock = clock

    def __call__(self, t: int | None) -> int | None:
        return None if t is None else self.t0 + int(self.clock.emulated_ns(t - self.t0))

    def duration(self, ns: float) -> float:
        return self.clock.emulated_ns(ns)

    def stamps(self, a: np.ndarray) -> np.ndarray:
        """An array of stamps, any shape; -1 (a fault never resolved) stays -1."""
        if self.clock.dilation == 1 or not a.size:
            return a
        out = (self.t0 + (a - self.t0) / self.clock.dilation).astype(np.int64)
        out[a < 0] = -1
        return out


def _accesses_until(vcpu: dict[str, Any], t_run: int | None, phase_ms: float | None, emu: _Emulated) -> int:
    """A vCPU's accesses on the destination during the postcopy phase only: once every page is
    there it runs unhindered until it is told to stop, which says nothing about the migration."""
    log = np.frombuffer(vcpu.get("progress", b""), np.int64).reshape(-1, 2)
    if len(log):
        log = np.stack([emu.stamps(log[:, 0]), log[:, 1]], axis=1)
    if t_run is None or phase_ms is None or not len(log):
        return int(vcpu["accesses_dst"])
    return int(round(np.interp(t_run + phase_ms * 1e6, log[:, 0], log[:, 1], left=0)))


def build_report(m: Migration) -> Report:
    cfg = m.cfg
    rep = Report(config=cfg.to_dict(), error=m.error, timeline=m.samples)
    rep.time_dilation = {"factor": cfg.clock.dilation, "calibration": m.calibration}
    if m.link is not None:
        rep.link = m.link.usage()
    rep.postcopy_pauses, rep.recoveries = m.postcopy_pauses, m.recoveries
    rep.postcopy_paused_ms = round(cfg.clock.emulated_ms(sum(b - a for a, b in m.pause_intervals)), 3)
    if m.error is not None:
        return rep
    # Every process stamps real monotonic time; from here on every stamp is emulated time (the
    # run's clock, time dilation undone), so each figure below is an emulated duration.
    emu = _Emulated(m.t0, cfg.clock)
    ev = {k: emu(t) for k, t in m.events.items()}
    by_title = {p.title: p.stats or {} for p in m.procs}
    src = by_title.get("mig/src", {})
    rep.link["sender_blocked_ms"] = src.get("sender_blocked_ms", {})  # waiting for write space
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
        placed = [emu(s.get("last_place_ns")) for k, s in by_title.items() if k.startswith("mig/dst")]
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
    rep.postcopy_pages_resent = int(src.get("postcopy_pages_resent", 0))
    rep.postcopy_requests_resent = int(by_title.get("mig/dst/listen", {}).get("requests_resent", 0))
    rep.faults_injected = list(src.get("faults_injected", []))
    rep.faults_not_injected = list(src.get("faults_not_injected", []))
    rep.pauses = [{"reason": pz["reason"], "during": pz["during"], "pages_resent": pz.get("pages_resent", 0),
                   **{f"{k}_t_ms": _ms(m.t0, emu(pz.get(f"{k}_ns"))) for k in
                      ("paused", "recv_bitmap", "preempt_channel", "resumed")}}
                  for pz in src.get("pauses", [])]

    vcpus = sorted((p.stats for p in m.procs if p.title.startswith("guest/")), key=lambda s: s["vcpu"])
    intervals = [emu.stamps(np.frombuffer(s["faults"], np.int64).reshape(-1, 3)[:, 1:]) for s in vcpus]
    all_f = np.concatenate(intervals) if intervals else np.empty((0, 2), np.int64)
    done = all_f[all_f[:, 1] >= 0]
    lat_ns = done[:, 1] - done[:, 0]
    rep.postcopy_latency_us = stats.latency_summary(lat_ns)
    rep.postcopy_latency_dist = stats.latency_dist(lat_ns)
    rep.postcopy_blocktime_ms, per = stats.blocktime(intervals, t_end)
    rep.postcopy_vcpu_blocktime_ms = [round(b, 3) for b in per]
    rep.postcopy_blocktime_ms = round(rep.postcopy_blocktime_ms, 3)
    rep.faults = fault_list(intervals, m.t0)
    rep.phases = phase_list(m.t0, ev) + [["postcopy-paused", _ms(m.t0, emu(a)), _ms(m.t0, emu(b))]
                                         for a, b in m.pause_intervals]  # each inside postcopy

    if ev.get("running") is None:  # ended by stop-and-copy: did it get there by converging?
        rep.converged = bool(src.get("converged", False))
    acc_src = sum(s["accesses_src"] for s in vcpus)
    per_vcpu = [_accesses_until(s, ev.get("running"), rep.postcopy_phase_ms, emu) for s in vcpus]
    acc_dst = sum(per_vcpu)
    run_src = emu.duration(sum(s["run_src_ns"] for s in vcpus)) / 1e9
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


def fault_list(intervals: list[np.ndarray], t0: int) -> list[list[float]]:
    """Every resolved fault as [t_ms, latency_us, vcpu], sorted by time: what a plot of faults over
    time needs, a few bytes per fault."""
    done = [iv[iv[:, 1] >= 0] for iv in intervals]
    if not done:
        return []
    f = np.concatenate(done)
    vcpu = np.repeat(np.arange(len(done)), [len(d) for d in done])
    order = np.argsort(f[:, 0], kind="stable")
    f, vcpu = f[order], vcpu[order]
    t_ms = np.round((f[:, 0] - t0) / 1e6, 3).tolist()
    lat_us = np.round((f[:, 1] - f[:, 0]) / 1e3, 1).tolist()
    return [list(row) for row in zip(t_ms, lat_us, vcpu.tolist())]


PHASES = (("setup", None, "setup_done"), ("precopy", "setup_done", "stop_vm"),
          ("switchover", "stop_vm", "running"), ("postcopy", "running", "complete"))


def phase_list(t0: int, events: dict[str, int]) -> list[list[Any]]:
    """[name, start_ms, end_ms] of each phase that happened (precopy mode: its stop-and-copy ends
    at the destination's end of stream)."""
    ev = dict(events)
    postcopy = "running" in ev
    if not postcopy:  # precopy: the downtime is the stop-and-copy, until the end of stream
        ev["running"] = ev.get("eos_mig/dst/listen", ev.get("complete"))
    out = []
    for name, a, b in PHASES if postcopy else PHASES[:-1]:
        start, end = (t0 if a is None else ev.get(a)), ev.get(b)
        if start is not None and end is not None and end >= start:
            out.append([name, round((start - t0) / 1e6, 3), round((end - t0) / 1e6, 3)])
    return out


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
    of these is bad input (ConfigError, one line)."""
    from .config import ConfigError

    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise ConfigError(f"{path} is not JSON ({e}): give a file written by shmig run|compare|sweep --json") from None
    entries = data if isinstance(data, list) else [data]
    runs = []
    for e in entries:
        rep = e.get("report", e) if isinstance(e, dict) else None
        if not isinstance(rep, dict) or not isinstance(rep.get("config"), dict) or "status" not in rep:
            raise ConfigError(f"{path} is not a shmig report: give a file written by shmig run|compare|sweep --json")
        c = rep["config"]
        runs.append(SavedRun(e.get("mode", c.get("mode")), e.get("host_page", c.get("host_page")),
                             Report.from_dict(rep), e.get("knob"), e.get("value")))
    if not runs:
        raise ConfigError(f"{path} holds no runs")
    return runs
