"""From a run's record to its report: every figure derived the way QEMU derives it.

Every process stamps real monotonic time; here each stamp becomes emulated time (the run's clock,
time dilation undone), so each figure is an emulated duration. A failed or interrupted run gets
every figure its record holds (its counters, faults and timeline up to the failure); only the
integrity check needs a finished run.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

import numpy as np

from . import stats
from .config import TARGET_PAGE
from .control import Ev
from .faults import Fault
from .plan import Kind
from .record import Mark, RunRecord, VcpuRecord
from .report import FaultTable, Report
from .status import (TERMINAL, V8_2, V9_1, V10_0, V10_2, MigrationStatus, QemuVersion, Side, StatusHistory,
                     StatusOrderError)

MIN_BASELINE_S = 0.2  # a guest that ran less than this on the source has no measured speed


def _ms(a: int | None, b: int | None) -> float | None:
    return None if a is None or b is None else round((b - a) / 1e6, 3)


def build_report(rec: RunRecord) -> Report:
    cfg = rec.config
    rep = Report(config=cfg.to_dict(), error=rec.error, timeline=rec.timeline, host=dict(rec.host),
                 fault_backend=cfg.fault_backend)
    rep.time_dilation = {"factor": cfg.clock.dilation, "calibration": rec.calibration}
    rep.link = dict(rec.link)
    src = rec.source
    em, t0 = rec.emulated, rec.t0
    t_end = em(rec.first(Mark.COMPLETE))
    t_stop = em(rec.first(Ev.STOP_VM))
    t_run = em(rec.first(Ev.RUNNING))
    rep.total_time_ms = _ms(t0, t_end)
    rep.setup_time_ms = _ms(t0, em(rec.first(Ev.SETUP_DONE)))
    if t_run is not None:  # postcopy happened
        rep.downtime_ms = _ms(t_stop, t_run)
        # every vCPU acknowledged running again, or (it quit before it could) the resume itself
        resumed = rec.first(Mark.GUEST_RESUMED) or rec.first(Mark.GUEST_RESUME_REQUESTED)
        rep.switchover_pause_ms = _ms(em(rec.first(Mark.GUEST_STOPPED)), em(resumed))
        # QEMU's postcopy phase ends at the source's ``completed``: after every receiver read its
        # EOS, the destination sent SHUT and the source joined its return thread
        rep.postcopy_phase_ms = _ms(t_run, postcopy_end(rec))
    else:
        eos = em(rec.first(Ev.EOS, Kind.LISTEN))
        rep.downtime_ms = _ms(t_stop, eos)
        rep.switchover_pause_ms = _ms(em(rec.first(Mark.GUEST_STOPPED)), eos)
    if src is not None:
        _source_figures(rep, rec)
    listen = rec.receivers.get(rec.plan.listen)
    rep.postcopy_requests_resent = listen.requests_resent if listen is not None else 0  # type: ignore[attr-defined]
    rep.destination = {r.title: _receiver_dict(rec, s.to_dict()) for r, s in rec.receivers.items()}
    _recovery_figures(rep, rec)
    _fault_figures(rep, rec, t_end)
    rep.phases = phase_list(rec) + [["postcopy-paused", a, b] for a, b in _pause_intervals(rec)]
    _guest_progress(rep, rec, t_run)
    try:
        rep.status_history = status_history(rec)
    except StatusOrderError as e:  # a bug of shmig's: the run's other results still stand
        rep.status_history = {"error": str(e)}
    if rec.integrity is not None:
        rep.integrity = rec.integrity.to_dict()
        rep.status = "completed"
        if not rec.integrity.ok:
            rep.error = f"integrity check failed: {rec.integrity.detail}"
    return rep


def _source_figures(rep: Report, rec: RunRecord) -> None:
    src = rec.source
    assert src is not None
    cfg = rec.config
    blocked = {"precopy": src.precopy_blocked_ns}
    if rec.config.uses_preempt_channel:
        blocked["postcopy"] = src.postcopy_blocked_ns
    rep.link["sender_blocked_ms"] = {k: round(cfg.clock.emulated_ms(v), 3) for k, v in blocked.items()}
    rep.dirty_sync_count = src.dirty_sync_count
    rep.precopy_rounds = src.precopy_rounds
    rep.ram = {
        "total": cfg.ram,
        "transferred": src.transferred,
        "normal_pages": src.normal_pages,
        "zero_pages": src.zero_pages,
        "normal_bytes": src.normal_pages * TARGET_PAGE,
        "precopy_bytes": src.precopy_bytes,
        "downtime_bytes": src.downtime_bytes,
        "postcopy_bytes": src.postcopy_bytes,
        "multifd_bytes": src.multifd_bytes,
        "channel_bytes": {"precopy": src.precopy_channel_bytes, "postcopy": src.postcopy_channel_bytes,
                          **{f"multifd{r.n}": rec.receivers[r].bytes for r in rec.plan.multifd
                             if r in rec.receivers}},
        "discarded_host_pages": src.discarded_host_pages,
        "completion_pages": src.completion_pages,  # postcopy before 10.1: the rest, sent in the completion
        "expected_downtime_ms": (None if src.expected_downtime_ns < 0
                                 else round(src.expected_downtime_ns / 1e6, 3)),
    }
    if rep.total_time_ms:
        rep.throughput_mbps = round(src.transferred * 8 / 1e6 / (rep.total_time_ms / 1e3), 1)
    rep.postcopy_requests = src.postcopy_requests
    rep.postcopy_bytes = src.postcopy_bytes
    rep.preemptions = src.preemptions
    rep.urgent_on_precopy = src.urgent_on_precopy
    rep.postcopy_pages_resent = src.postcopy_pages_resent
    rep.postcopy_pauses = src.postcopy_pauses
    rep.recoveries = src.recoveries
    if rec.first(Ev.RUNNING) is None and src.converged >= 0:  # ended by stop-and-copy: converged?
        rep.converged = bool(src.converged)
    if cfg.multifd.enabled:
        _multifd_figures(rep, rec)


def _multifd_figures(rep: Report, rec: RunRecord) -> None:
    """Which multifd channels ran, what each carried, and what their syncs cost: the source's wait
    for its send threads (local), and the destination's in multifd_recv_sync_main, with the part
    of it inside the downtime (the guest stopped, the destination not yet running it): the
    backlog the multifd sockets still held when the VM stopped."""
    src, cfg, ms = rec.source, rec.config, rec.clock.emulated_ms
    assert src is not None
    listen = rec.receivers.get(rec.plan.listen)
    recv = [rec.receivers.get(r) for r in rec.plan.multifd]
    stop = rec.first(Ev.STOP_VM, Kind.SOURCE)
    resumed = rec.first(Ev.RUNNING) or rec.first(Ev.EOS, Kind.LISTEN)
    in_downtime = 0
    if stop is not None and resumed is not None:
        for e in rec.of(Ev.MULTIFD_SYNCED, Kind.LISTEN):
            began = e.info[1] if len(e.info) > 1 and isinstance(e.info[1], int) else e.t
            in_downtime += max(0, min(e.t, resumed) - max(began, stop))
    recv_wait = getattr(listen, "multifd_sync_wait_ns", 0)  # none without the listen receiver's record
    rep.multifd = {
        "channels": cfg.multifd_channels,
        "zero_page_detection": cfg.zero_page_detection,
        "channel_bytes": [0 if r is None else r.bytes for r in recv],
        "syncs": src.multifd_syncs,
        "send_sync_wait_ms": round(ms(src.multifd_sync_wait_ns), 3),
        "recv_sync_wait_ms": round(ms(recv_wait), 3),
        "recv_sync_wait_in_downtime_ms": round(ms(min(in_downtime, recv_wait)), 3),
        "zero_pages_skipped": sum(0 if r is None else r.zero_pages_skipped for r in recv),  # type: ignore[attr-defined]
    }


def _receiver_dict(rec: RunRecord, d: dict[str, int]) -> dict[str, Any]:
    d["link_wait_ms"] = round(rec.clock.emulated_ms(d.pop("link_wait_ns")), 3)
    return d


def _pause_intervals(rec: RunRecord) -> list[tuple[float | None, float | None]]:
    """(paused, resumed) ms of every postcopy pause: from the first process that paused to the
    source's RESUME_ACK."""
    out: list[tuple[float | None, float | None]] = []
    start = None
    for e in rec.events:
        if e.name is Ev.POSTCOPY_PAUSED and start is None:
            start = e.t
        elif e.name is Ev.POSTCOPY_RESUMED and e.role is not None and e.role.kind is Kind.SOURCE:
            out.append((rec.ms(start if start is not None else e.t), rec.ms(e.t)))
            start = None
    return out


def _recovery_figures(rep: Report, rec: RunRecord) -> None:
    """Postcopy pauses and recoveries, from the source's events as they came."""
    rep.postcopy_paused_ms = round(sum((b or 0) - (a or 0) for a, b in _pause_intervals(rec)), 3)
    pauses: list[dict[str, Any]] = []
    for e in rec.events:
        if e.role is None or e.role.kind is not Kind.SOURCE:
            continue
        if e.name is Ev.POSTCOPY_PAUSED:
            reason, during = (list(e.info) + ["", "postcopy"])[:2]
            pauses.append({"reason": reason, "during": during, "pages_resent": 0, "paused_t_ms": rec.ms(e.t),
                           "recv_bitmap_t_ms": None, "preempt_channel_t_ms": None, "resumed_t_ms": None})
        elif pauses and e.name is Ev.RECV_BITMAP:
            pauses[-1]["recv_bitmap_t_ms"] = rec.ms(e.t)
            pauses[-1]["pages_resent"] += int(e.info[0]) if e.info else 0
        elif pauses and e.name is Ev.PREEMPT_CHANNEL:
            pauses[-1]["preempt_channel_t_ms"] = rec.ms(e.t)
        elif pauses and e.name is Ev.POSTCOPY_RESUMED:
            pauses[-1]["resumed_t_ms"] = rec.ms(e.t)
        elif e.name is Ev.FAULT_INJECTED:
            fault, left, during, postcopy_ms = (list(e.info) + [None] * 4)[:4]
            rep.faults_injected.append({"fault": fault, "postcopy_ms": postcopy_ms, "pages_left": left,
                                        "during": during})
    rep.pauses = pauses
    fired = Counter(f["fault"] for f in rep.faults_injected)
    for spec in rec.config.inject_faults:
        name = str(Fault.parse(spec))
        if fired[name]:
            fired[name] -= 1
        else:
            rep.faults_not_injected.append(name)


def _intervals(rec: RunRecord, v: VcpuRecord) -> np.ndarray:
    """A vCPU's faults as emulated (start, end) stamps; end -1: never resolved."""
    return rec.emulated_stamps(v.faults[:, 1:3])


def _fault_figures(rep: Report, rec: RunRecord, t_end: int | None) -> None:
    """Latency, blocktime and the fault table, as QEMU 10.1 reports them (stats.py)."""
    # one step at a time, each one's temporaries gone before the next: a run may hold millions of
    # faults, and the controller's memory per fault is what this function holds at its peak
    intervals = [_intervals(rec, v) for v in rec.vcpus]
    total, per = stats.blocktime(intervals, t_end)
    rep.postcopy_blocktime_ms = round(total, 3)
    rep.postcopy_vcpu_blocktime_ms = [round(b, 3) for b in per]
    rep.postcopy_vcpu_slept_ms = [None if v.stats.slept_dst_ns < 0 else round(rec.clock.emulated_ms(v.stats.slept_dst_ns), 3)
                                  for v in rec.vcpus]
    done = [iv if (iv[:, 1] >= 0).all() else iv[iv[:, 1] >= 0] for iv in intervals]  # a view when it can
    del intervals
    lat = [d[:, 1] - d[:, 0] for d in done]
    # postcopy-vcpu-latency and postcopy-latency: resolved faults' waits over their number, in ns
    rep.postcopy_vcpu_latency = [int(x.sum() // len(x)) if len(x) else 0 for x in lat]
    all_lat = np.concatenate(lat) if lat else np.empty(0, np.int64)
    del lat
    rep.postcopy_latency = int(all_lat.sum() // len(all_lat)) if len(all_lat) else 0
    rep.postcopy_non_vcpu_latency = 0  # every fault here is a vCPU's
    rep.postcopy_latency_us = stats.latency_summary(all_lat)
    rep.postcopy_latency_dist = stats.latency_dist(all_lat)
    rep.faults = fault_table(done, all_lat, rec.t0)


def fault_table(done: list[np.ndarray], lat_ns: np.ndarray, t0: int) -> FaultTable:
    """Every resolved fault as (t_ms, latency_us, vcpu), sorted by start: what a plot of faults
    over time needs, 18 bytes a fault. ``lat_ns``: their latencies, in the order of ``done``."""
    if not len(lat_ns):
        return FaultTable()
    t = np.concatenate([d[:, 0] for d in done])
    order = np.argsort(t, kind="stable")
    t_ms = (t[order] - t0) / 1e6
    del t
    vcpu = np.repeat(np.arange(len(done), dtype=np.int16), [len(d) for d in done])[order]
    return FaultTable(t_ms, lat_ns[order] / 1e3, vcpu)


def accesses_at(rec: RunRecord, v: VcpuRecord, t: int) -> int:
    """How many accesses vCPU ``v`` had made on the destination by emulated time ``t``: its
    progress points, and its faults (it makes none while it waits, so the count holds from a
    fault's start to its end), interpolated in between."""
    f, p = v.faults, v.progress
    if not len(f) and not len(p):
        return int(v.stats.accesses_dst)
    resolved = f if (f[:, 2] >= 0).all() else f[f[:, 2] >= 0]
    # each series is in time order (a vCPU's faults come one after another): the points either
    # side of t are found by bisection, without merging the series (a copy per fault)
    real_t = rec.real_stamp(t)
    before, after = (-1, 0), None
    for ts, acc in ((f[:, 1], f[:, 3]), (resolved[:, 2], resolved[:, 3]), (p[:, 0], p[:, 1])):
        i = int(np.searchsorted(ts, real_t, side="right"))
        if i > 0 and int(ts[i - 1]) >= before[0]:
            before = (int(ts[i - 1]), int(acc[i - 1]))
        if i < len(ts) and (after is None or int(ts[i]) < after[0]):
            after = (int(ts[i]), int(acc[i]))
    if before[0] < 0:
        return 0
    if after is None or after[0] == before[0]:
        return before[1]
    x0, x1 = rec.emulated_stamps(np.array([before[0], after[0]], np.int64)).tolist()
    return int(round(before[1] + (after[1] - before[1]) * (t - x0) / (x1 - x0)))


def _guest_progress(rep: Report, rec: RunRecord, t_run: int | None) -> None:
    cfg = rec.config
    vcpus = rec.vcpus
    phase_ms = rep.postcopy_phase_ms
    after_placed = None
    if t_run is None or phase_ms is None:
        per_vcpu = [int(v.stats.accesses_dst) for v in vcpus]
    else:
        per_vcpu = [accesses_at(rec, v, t_run + int(phase_ms * 1e6)) for v in vcpus]
        placed = last_placed(rec)
        if placed is not None:  # the tail: every page was there, the migration not yet completed
            after_placed = sum(per_vcpu) - sum(accesses_at(rec, v, placed) for v in vcpus)
    acc_src = sum(v.stats.accesses_src for v in vcpus)
    acc_dst = sum(per_vcpu)
    run_src = rec.clock.emulated_ns(sum(v.stats.run_src_ns for v in vcpus)) / 1e9
    postcopy_s = (phase_ms or 0) / 1e3
    # the guest's normal speed: measured on the source when it ran there long enough to tell,
    # else the rate it is paced at; a few ms of running (postcopy right after setup) say nothing
    run_src_ms = run_src / max(len(vcpus), 1) * 1e3
    rate_src: float | None
    if run_src_ms >= MIN_BASELINE_S * 1e3:
        rate_src = acc_src / run_src
    elif cfg.dirty_rate is not None:
        rate_src = cfg.dirty_rate / TARGET_PAGE / cfg.vcpus
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
        "postcopy_bytes_accessed": acc_dst * TARGET_PAGE,
        "per_vcpu_postcopy_accesses": per_vcpu,
        "accesses_after_last_placed": after_placed,
        "precopy_rate_per_vcpu": None if rate_src is None else round(rate_src, 1),
        "postcopy_rate_per_vcpu": None if rate_dst is None else round(rate_dst, 1),
        "precopy_run_ms_per_vcpu": round(run_src_ms, 1),
        "speed_ratio_unavailable": why,
    }
    if why is None and rate_src and rate_dst is not None:
        rep.guest_speed_ratio = round(rate_dst / rate_src, 4)


def status_history(rec: RunRecord) -> dict[str, Any]:
    """Each side's statuses (QEMU's ``query-migrate`` ``status``) with their emulated times, at the
    points of shmig's run where QEMU enters them (shmig.status's docstring, migration.c), for the
    QEMU release the run stands for (``Config.qemu``)."""
    version = rec.config.qemu
    return {"qemu": str(version), "source": _source_history(rec, version).to_json(rec.t0),
            "destination": _destination_history(rec, version).to_json(rec.t0)}


def _stamper(rec: RunRecord, h: StatusHistory) -> Callable[[MigrationStatus, int | None], None]:
    """``enter(status, real ns)``: a status is never stamped before the one it follows (two processes
    on two cores stamp their own clocks' readings of nearly the same moment)."""
    def enter(status: MigrationStatus, t: int | None) -> None:
        if t is not None:
            h.enter(status, max(rec.emulated(t) or 0, h.entries[-1][1] if h.entries else 0))
    return enter


def _ended(rec: RunRecord, h: StatusHistory, done: int | None) -> None:
    """``completed`` where the side completes, or ``failed`` at the run's last event."""
    enter = _stamper(rec, h)
    if done is not None and rec.error is None:
        enter(MigrationStatus.COMPLETED, done)
    elif rec.error is not None and h.current not in TERMINAL:
        enter(MigrationStatus.FAILED, max((e.t for e in rec.events), default=rec.t0))


def _source_history(rec: RunRecord, version: QemuVersion) -> StatusHistory:
    """shmig has no package PING: 10.2's ``postcopy-active`` is stamped where its PONG would reach
    the source, one link latency after the destination ran. ``postcopy-recover`` is entered when the
    recovery's first new channel is used (the receivedmap reload or the new preempt channel,
    whichever the source reported first)."""
    cfg = rec.config
    h = StatusHistory(Side.SOURCE, cfg.mode, version)
    enter = _stamper(rec, h)
    src = [e for e in rec.events if e.role is not None and e.role.kind is Kind.SOURCE]
    enter(MigrationStatus.SETUP, rec.t0)
    enter(MigrationStatus.ACTIVE, rec.first(Ev.SETUP_DONE, Kind.SOURCE))
    stopped = rec.first(Mark.GUEST_STOPPED) or rec.first(Ev.STOP_VM, Kind.SOURCE)
    if stopped is not None and rec.first(Ev.STOP_VM, Kind.SOURCE) is not None:
        if cfg.postcopy and version < V10_0:  # 7.x-9.2 entered postcopy-active before stopping the VM
            enter(MigrationStatus.POSTCOPY_ACTIVE, rec.first(Ev.STOP_VM, Kind.SOURCE))
        if version >= V10_0:
            enter(MigrationStatus.DEVICE, stopped)
        if cfg.postcopy and version >= V10_2:
            enter(MigrationStatus.POSTCOPY_DEVICE, rec.first(Ev.POSTCOPY_START, Kind.SOURCE))
        if cfg.postcopy and version >= V10_0:
            ran = rec.first(Ev.RUNNING)
            pong = None if ran is None else ran + (rec.link_latency_ns if version >= V10_2 else 0)
            enter(MigrationStatus.POSTCOPY_ACTIVE, pong if version >= V10_2 else rec.first(Ev.POSTCOPY_START,
                                                                                         Kind.SOURCE))
    for e in src:
        if e.name is Ev.POSTCOPY_PAUSED and h.current is not MigrationStatus.POSTCOPY_PAUSED:
            enter(MigrationStatus.POSTCOPY_PAUSED, e.t)
        elif e.name in (Ev.RECV_BITMAP, Ev.PREEMPT_CHANNEL) and h.current is MigrationStatus.POSTCOPY_PAUSED:
            if version >= V9_1:
                recover = [m.t for m in rec.of(Mark.RECOVER) if m.t <= e.t]
                enter(MigrationStatus.POSTCOPY_RECOVER_SETUP, recover[-1] if recover else e.t)
            enter(MigrationStatus.POSTCOPY_RECOVER, e.t)
        elif e.name is Ev.POSTCOPY_RESUMED and h.current is MigrationStatus.POSTCOPY_RECOVER:
            enter(MigrationStatus.POSTCOPY_ACTIVE, e.t)
    _ended(rec, h, rec.first(Ev.COMPLETED, Kind.SOURCE))
    return h


def _destination_history(rec: RunRecord, version: QemuVersion) -> StatusHistory:
    """From mig/dst/listen's events: ``active`` on the first PING (the main channel is up), the
    package's ``postcopy-device`` (10.2) and ``postcopy-active`` where it is loaded (shmig's package
    carries no device state: the two begin together), ``completed`` at the main channel's EOS.
    A recovery: ``postcopy-paused`` where the main channel broke, ``postcopy-recover`` when the
    controller hands over the new channels (QEMU: the new main channel is accepted,
    postcopy_try_recover), ``postcopy-active`` on RESUME."""
    cfg = rec.config
    h = StatusHistory(Side.DESTINATION, cfg.mode, version)
    enter = _stamper(rec, h)
    if version >= V8_2:
        enter(MigrationStatus.SETUP, rec.t0)  # migrate-incoming: the receivers listen before the migration starts
    enter(MigrationStatus.ACTIVE, rec.first(Ev.INCOMING, Kind.LISTEN))
    ran = rec.first(Ev.RUNNING, Kind.LISTEN)
    if cfg.postcopy and ran is not None:
        if version >= V10_2:
            enter(MigrationStatus.POSTCOPY_DEVICE, ran)
        enter(MigrationStatus.POSTCOPY_ACTIVE, ran)
    for e in rec.events:
        if e.role is not None and e.role.kind is not Kind.LISTEN:
            continue
        if e.name is Ev.POSTCOPY_PAUSED and h.current is not MigrationStatus.POSTCOPY_PAUSED:
            enter(MigrationStatus.POSTCOPY_PAUSED, e.t)
        elif e.name is Mark.RECOVER and h.current is MigrationStatus.POSTCOPY_PAUSED:
            enter(MigrationStatus.POSTCOPY_RECOVER, e.t)
        elif e.name is Ev.INCOMING_RESUMED and h.current is MigrationStatus.POSTCOPY_RECOVER:
            enter(MigrationStatus.POSTCOPY_ACTIVE, e.t)
    _ended(rec, h, rec.first(Ev.EOS, Kind.LISTEN))
    return h


def last_placed(rec: RunRecord) -> int | None:
    """When the destination placed its last page (emulated ns)."""
    placed = [rec.emulated(r.last_place_ns) for r in rec.receivers.values() if r.last_place_ns]
    return max(placed, default=None)  # type: ignore[type-var]


def postcopy_end(rec: RunRecord) -> int | None:
    """The end of the postcopy phase (emulated ns): the source's ``completed``; a run that did not
    get there ends where its record does (every EOS read, else the last page placed)."""
    return (rec.emulated(rec.first(Ev.COMPLETED, Kind.SOURCE)) or rec.emulated(rec.first(Mark.COMPLETE))
            or last_placed(rec))


PHASES = (("setup", None, Ev.SETUP_DONE), ("precopy", Ev.SETUP_DONE, Ev.STOP_VM),
          ("switchover", Ev.STOP_VM, Ev.RUNNING), ("postcopy", Ev.RUNNING, Ev.COMPLETED))


def phase_list(rec: RunRecord) -> list[list[Any]]:
    """[name, start_ms, end_ms] of each phase that happened (precopy mode: its stop-and-copy ends
    at the destination's end of stream)."""
    at = {name: rec.emulated(rec.first(name)) for name in (Ev.SETUP_DONE, Ev.STOP_VM, Ev.RUNNING, Mark.COMPLETE)}
    at[Ev.COMPLETED] = postcopy_end(rec)
    postcopy = at[Ev.RUNNING] is not None
    if not postcopy:  # precopy: the downtime is the stop-and-copy, until the end of stream
        at[Ev.RUNNING] = rec.emulated(rec.first(Ev.EOS, Kind.LISTEN)) or at[Mark.COMPLETE]
    out = []
    t0 = rec.t0
    for name, a, b in PHASES if postcopy else PHASES[:-1]:
        start, end = (t0 if a is None else at[a]), at[b]
        if start is not None and end is not None and end >= start:
            out.append([name, round((start - t0) / 1e6, 3), round((end - t0) / 1e6, 3)])
    return out
