"""The human side of a report: the summary ``shmig run`` prints, and the warning a slow machine earns."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .units import fmt_size

if TYPE_CHECKING:
    from .report import Report

LINK_KEPT_UP = 0.95  # a limited link that carried less than this while backlogged: the machine set the pace


def format_summary(self: Report) -> str:
    """The human table ``shmig run`` prints and ``shmig report`` prints again."""
    c = self.config
    lines = [f"shmig {c.get('mode')}: {self.status}" + (" (did not converge)" if self.converged is False else "")
             + (f" — {self.error}" if self.error else "")]
    if self.total_time_ms is None:
        return "\n".join(lines)
    ram = self.ram
    lat = self.postcopy_latency_us
    rows = [
        ("RAM", f"{fmt_size(c['ram'])}, host page {fmt_size(c['host_page'])}, workload {c['workload']}"
                + ("" if self.fault_backend == "bitmap" else f", faults by {self.fault_backend}" + (" on hugetlb" if c.get("hugetlb") else ""))),
        ("total time", f"{_n(self.total_time_ms, '.1f')} ms (setup {_n(self.setup_time_ms, '.1f')} ms)"),
        ("downtime", f"{_n(self.downtime_ms, '.2f')} ms (guest paused {_n(self.switchover_pause_ms, '.2f')} ms)"),
        ("transferred", f"{fmt_size(ram.get('transferred', 0))} at {_n(self.throughput_mbps, '.0f')} Mbps,"
         f" {ram.get('normal_pages', 0)} normal + {ram.get('zero_pages', 0)} zero pages"),
        ("channels", ", ".join(f"{k} {fmt_size(v)}" for k, v in ram.get("channel_bytes", {}).items())),
        ("dirty syncs", f"{self.dirty_sync_count} ({self.precopy_rounds} precopy rounds)"),
    ]
    mf = self.multifd
    if mf:
        rows.append(("multifd", f"{mf['channels']} channels, {mf['syncs']} syncs; the destination waited"
                     f" {mf['recv_sync_wait_ms']:.1f} ms for them, {mf['recv_sync_wait_in_downtime_ms']:.1f} ms"
                     " of it in the downtime"))
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
            ("blocktime", f"{self.postcopy_blocktime_ms:.1f} ms" + (
                " (every vCPU blocked at once)" if len(self.postcopy_vcpu_blocktime_ms) > 1 else "")),
        ]
        if len(self.postcopy_vcpu_blocktime_ms) > 1:
            rows.append(("per vCPU", _spread(self)))
        slept = self.postcopy_vcpu_slept_ms
        if slept and None not in slept and self.postcopy_vcpu_blocktime_ms:
            rows.append(("vCPUs' view", f"slept {sum(slept):.1f} ms in faults by their own clocks, against"
                         f" {sum(self.postcopy_vcpu_blocktime_ms):.1f} ms blocked by the "
                         + ("fault thread's events" if self.fault_backend == "uffd" else "vCPUs' fault stamps")))
        if self.postcopy_pauses or c.get("inject_faults"):
            rows.append(("recovery", _recovery_summary(self)))
        gp = self.guest_progress
        if gp:
            ratio, why = self.guest_speed_ratio, gp.get("speed_ratio_unavailable")
            speed = (f"{ratio:.3g}x its precopy rate (1 = full speed)" if ratio is not None
                     else "speed ratio unavailable" + (f": {why}" if why else ""))
            tail = gp.get("accesses_after_last_placed")
            rows.append(("guest progress", f"{gp.get('postcopy_accesses', 0)} accesses in postcopy"
                         + (f" ({tail} after the last page was placed)" if tail is not None else "") + f", {speed}"))
    hist = self.status_history
    for side, label in (("source", f"status (QEMU {hist.get('qemu')})"), ("destination", "  destination")):
        if hist.get(side):
            rows.append((label, " -> ".join(f"{h['status']} {h['t_ms']:.1f}" for h in hist[side]) + " ms"))
    integ = self.integrity
    rows.append(("integrity", f"ok, {integ['pages_checked']} pages checked" if integ.get("ok")
                 else f"FAILED: {integ.get('detail')}"))
    w = max(len(k) for k, _ in rows)
    lines += [f"  {k:<{w}}  {v}" for k, v in rows]
    warning = link_warning(self)
    if warning:
        lines.append(f"  warning: {warning}")
    return "\n".join(lines)

def link_warning(self: Report) -> str | None:
    """A limited link that ran below 95% of its rate: the machine, not the link, set the pace."""
    util = self.link.get("utilisation")
    if util is None or util >= LINK_KEPT_UP:
        return None
    return (f"the emulated {_gbps(self.link['nominal_bps'])} link carried only"
            f" {_gbps(self.link.get('achieved_bps'))} ({util:.0%}) while it had data queued: this"
            " machine could not keep up, so the figures are those of a slower link; rerun with"
            " --time-dilation auto")


def _recovery_summary(self: Report) -> str:
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


def _spread(self: Report) -> str:
    """Per-vCPU blocktime and mean latency (QEMU's postcopy-vcpu-blocktime and -vcpu-latency):
    the least and most blocked vCPU, and the mean over them."""
    bt = self.postcopy_vcpu_blocktime_ms
    lat = [ns / 1e3 for ns in self.postcopy_vcpu_latency] or [0.0] * len(bt)
    lo, hi = min(range(len(bt)), key=bt.__getitem__), max(range(len(bt)), key=bt.__getitem__)
    return (f"blocktime {bt[lo]:.1f} ms (vcpu{lo}) to {bt[hi]:.1f} ms (vcpu{hi}), mean {sum(bt) / len(bt):.1f} ms;"
            f" mean latency {min(lat):.0f} to {max(lat):.0f} us")


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def _gbps(bps: float | None) -> str:
    if bps is None:
        return "-"
    return f"{bps / 1e9:.2f} Gbit/s" if bps >= 1e9 else f"{bps / 1e6:.0f} Mbit/s"


def _n(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)
