"""A Chrome/Perfetto trace of one migration (``shmig run --trace PATH``; open in ui.perfetto.dev).

Tracks: the migration's phases on the controller (each postcopy-paused stretch nested in
postcopy); every vCPU fault as an async slice on its vCPU (faults of different vCPUs overlap, so
they cannot be nested slices on one track); counters for bytes per channel, pages still to send,
pages received, faults outstanding, guest accesses.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .controller import Migration

PID = 1
PHASES = [("setup", None, "setup_done"), ("precopy", "setup_done", "stop_vm"),
          ("switchover (downtime)", "stop_vm", "running"), ("postcopy", "running", "complete")]


def chrome_trace(m: Migration) -> dict[str, Any]:
    t0 = m.t0
    us = lambda ns: (ns - t0) / 1e3  # noqa: E731
    ev: list[dict[str, Any]] = [
        {"ph": "M", "pid": PID, "name": "process_name", "args": {"name": f"shmig {m.cfg.mode}"}},
        {"ph": "M", "pid": PID, "tid": 0, "name": "thread_name", "args": {"name": "migration"}},
    ]
    times = dict(m.events, setup=t0)
    for name, a, b in PHASES:
        start = t0 if a is None else times.get(a)
        end = times.get(b)
        if start is not None and end is not None and end >= start:
            ev.append({"ph": "X", "pid": PID, "tid": 0, "name": name, "ts": us(start), "dur": (end - start) / 1e3})
    for a, b in m.pause_intervals:  # inside the postcopy slice: they nest
        ev.append({"ph": "X", "pid": PID, "tid": 0, "name": "postcopy-paused", "ts": us(a), "dur": (b - a) / 1e3})
    for p in m.procs:
        st = p.stats or {}
        if "faults" not in st:
            continue
        v = st["vcpu"]
        ev.append({"ph": "M", "pid": PID, "tid": 10 + v, "name": "thread_name", "args": {"name": p.title}})
        faults = np.frombuffer(st["faults"], np.int64).reshape(-1, 3)
        for i, (hp, start, end) in enumerate(faults.tolist()):
            if end < 0:
                continue
            common = {"pid": PID, "tid": 10 + v, "cat": "fault", "name": f"fault hp {hp}", "id": f"{v}:{i}"}
            ev.append({**common, "ph": "b", "ts": us(start)})
            ev.append({**common, "ph": "e", "ts": us(end)})
    for s in m.samples:
        ts = s["t_ms"] * 1e3
        ev.append({"ph": "C", "pid": PID, "name": "bytes sent", "ts": ts,
                   "args": {"precopy": s["precopy_bytes"], "postcopy": s["postcopy_bytes"]}})
        for key in ("remaining_pages", "received_pages", "faults_outstanding", "guest_accesses"):
            ev.append({"ph": "C", "pid": PID, "name": key, "ts": ts, "args": {key: s[key]}})
    return {"traceEvents": ev, "displayTimeUnit": "ms"}


def write_trace(path: str, m: Migration) -> None:
    with open(path, "w") as f:
        json.dump(chrome_trace(m), f)
