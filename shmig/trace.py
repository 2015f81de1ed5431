"""One Chrome/Perfetto trace of a whole migration (``shmig run --trace PATH``; open it in
ui.perfetto.dev or chrome://tracing).

Each child process records its own events (events.py) and hands them over when it exits; this
module turns them, with the controller's phases and samples, into the Trace Event JSON format:

* one process track per shmig process (real pids), one thread track per thread (real tids): the
  controller's phases; mig/src's migration and return threads; mig/dst/listen's listen and fault
  threads; mig/dst/preempt; each guest/vcpuN;
* slices for what took time (frames sent, write-space and link waits, rate-limit sleeps, dirty-log
  syncs, switchover steps, placements, faults, preempted huge pages), instants for the rest;
* flow arrows (``ph`` s/t/f, one id per fault) that follow a fault from the vCPU through the fault
  thread, the return thread, the frame that carried the page (its send, its trip over the link,
  its placement) back to the vCPU being woken;
* counters on the controller: bytes queued in each channel's socket, pages left to send, faults
  outstanding, guest accesses.

Times are emulated microseconds since the migration started, converted as the report converts
them (record.RunRecord.emulated), so a trace and its report agree. It reads the run's record,
never the controller.
"""

from __future__ import annotations

import bisect
import json
import os
import warnings
from collections import defaultdict
from typing import Any

import numpy as np

from .events import DTYPE, K
from .link import channel_names
from .analysis import phase_list
from .record import RunRecord
from .files import atomic_write
from .report import Report
from .wire import KINDS, Msg

FLOW = {"cat": "fault", "name": "fault"}  # a v1 flow is (id, cat, name): every step shares them
NS = 1e-3  # one nanosecond in microseconds: flow points sit just inside the slice they bind to


class _Flows:
    """Where each fault's steps happened, as slices: (pid, tid, start µs, duration µs)."""

    def __init__(self) -> None:
        # real start ns, vcpu, host page, the fault's slice, its args, its "woken" slice
        self.faults: list[tuple[int, int, int, tuple, dict[str, Any], tuple | None]] = []
        self.seen: dict[tuple[int, int], list[tuple[float, tuple]]] = defaultdict(list)  # (vcpu, hp)
        self.request: dict[int, tuple] = {}  # host page
        # frames, by channel and send time (the header's, which both sides know)
        self.send: dict[tuple[int, int], tuple] = {}
        self.recv: dict[tuple[int, int], tuple] = {}
        self.place: dict[tuple[int, int], tuple] = {}
        self.placed: list[tuple[int, int, int, int]] = []  # ch, send ns, first and last target page
        self.placed_at: list[float] = []  # when each began (µs)
        self.wake: dict[tuple[int, int], list[tuple[float, int, int]]] = defaultdict(list)  # (hp, vcpu)


class _Builder:
    def __init__(self, m: RunRecord, rep: Report):
        self.m = m
        self.rep = rep
        self.k = m.config.tp_per_hp
        self.ev: list[dict[str, Any]] = []
        self.flows = _Flows()
        self.sends: list[np.ndarray] = []  # per channel: [start ns, end ns, seq] of its PAGES frames
        self.channels = channel_names(m.config.multifd_channels)  # the link's channels by number
        self.queued: list[list[tuple[float, int]]] = [[] for _ in self.channels]
        self.remaining: list[tuple[float, int]] = []
        self.faulting: list[tuple[float, int]] = []
        self.pid0 = os.getpid()
        self.latency_ns = m.link_latency_ns

    def us(self, t: np.ndarray) -> np.ndarray:
        """Real monotonic ns -> emulated µs since the start (the report's conversion)."""
        return np.round((self.m.emulated_stamps(t) - self.m.t0) / 1e3, 3)

    def us1(self, t: int) -> float:
        return float(self.us(np.array([t], np.int64))[0])

    # -- output helpers ----------------------------------------------------------------------------
    def meta(self, pid: int, tid: int, name: str, value: Any) -> None:
        key = "sort_index" if name.endswith("sort_index") else "name"
        self.ev.append({"ph": "M", "ts": 0, "pid": pid, "tid": tid, "name": name, "args": {key: value}})

    def slice(self, pid: int, tid: int, name: str, ts: float, end: float, args: dict | None = None,
              cat: str = "shmig") -> tuple:
        e = {"ph": "X", "ts": ts, "dur": round(max(end - ts, 0.0), 3), "pid": pid, "tid": tid, "name": name,
             "cat": cat}
        if args:
            e["args"] = args
        self.ev.append(e)
        return pid, tid, ts, e["dur"]

    def instant(self, pid: int, tid: int, name: str, ts: float, args: dict | None = None) -> None:
        e = {"ph": "i", "s": "t", "ts": ts, "pid": pid, "tid": tid, "name": name, "cat": "shmig"}
        if args:
            e["args"] = args
        self.ev.append(e)

    def counter(self, name: str, ts: float, value: float) -> None:
        self.ev.append({"ph": "C", "ts": ts, "pid": self.pid0, "tid": self.pid0, "name": name,
                        "args": {"value": value}})

    # -- the whole trace ---------------------------------------------------------------------------
    def build(self) -> dict[str, Any]:
        m, pid0 = self.m, self.pid0
        self.meta(pid0, pid0, "process_name", f"shmig controller ({m.config.mode})")
        self.meta(pid0, pid0, "process_sort_index", 0)
        self.meta(pid0, pid0, "thread_name", "phases")
        # analysis.phase_list: the one source of phases (a failed run's report has none: its events do)
        phases = self.rep.phases or phase_list(m)
        for name, start, end in phases:
            self.slice(pid0, pid0, name, round(start * 1e3, 3), round(end * 1e3, 3), cat="phase")
        threads = []  # (pid, tid, process title, rows, interned names), every process's threads
        dropped = {}
        for i, p in enumerate(m.procs):
            title = p.role.title
            pid = p.pid or 0
            self.meta(pid, pid, "process_name", title)
            self.meta(pid, pid, "process_sort_index", i + 1)
            recorded = m.trace.get(p.role.index, {"threads": [], "names": []})
            for j, (tid, name, r, lost) in enumerate(sorted(recorded["threads"], key=lambda t: t[0] != pid)):
                self.meta(pid, tid, "thread_name", name + (f" ({lost} events dropped: slot full)" if lost else ""))
                self.meta(pid, tid, "thread_sort_index", j)
                if lost:
                    dropped[f"{title} {name}"] = lost
                threads.append((pid, tid, title, r[np.argsort(r["t0"], kind="stable")], recorded["names"]))
        every = np.concatenate([t[3] for t in threads]) if threads else np.empty(0, DTYPE)
        for ch in range(len(self.channels)):  # the source's frames, to find a received frame's send
            sent = every[((every["kind"] == K.SEND) | (every["kind"] == K.SEND_URGENT)) & (every["a"] == ch)]
            sent = sent[np.argsort(sent["t0"])]
            self.sends.append(np.stack([sent["t0"], sent["t1"], sent["b"]], axis=1))
        for pid, tid, title, r, names in threads:
            self.thread(pid, tid, title, r, names)
        if m.config.fault_backend == "uffd":
            self.uffd_faults()
        self.fault_flows()
        self.counters()
        return {"traceEvents": self.ev, "displayTimeUnit": "ms",
                "otherData": {"shmig": f"mode {m.config.mode}; times are emulated µs since the migration"
                                       f" started (time dilation {m.clock.dilation:g})",
                              "config": m.config.to_dict(), "error": m.error, "events_dropped": dropped}}

    def frame(self, ch: int, send_ns: int) -> int | None:
        """The sequence number of the frame the source sent on ``ch`` at ``send_ns`` (its header's
        stamp falls inside the source's send: a channel's sends never overlap)."""
        s = self.sends[ch]
        i = int(np.searchsorted(s[:, 0], send_ns, side="right")) - 1
        return int(s[i, 2]) if i >= 0 and send_ns <= s[i, 1] else None

    def thread(self, pid: int, tid: int, title: str, r: np.ndarray, names: list[str]) -> None:
        """One thread's rows as slices, instants, flow anchors and counter samples."""
        fl = self.flows
        vals = r.tolist()
        ts0, ts1 = self.us(r["t0"]).tolist(), self.us(r["t1"]).tolist()
        preempted: dict[int, tuple[float, int]] = {}
        paused: tuple[float, str] | None = None
        for i, (t0, t1, kind, a, b, c, d, e, f, g, h, j) in enumerate(vals):
            s, end = ts0[i], ts1[i]
            if kind in (K.SEND, K.SEND_URGENT):
                urgent = kind == K.SEND_URGENT
                fl.send[(a, b)] = self.slice(pid, tid, f"send {self.channels[a]}" + (" urgent" if urgent else ""), s, end, {
                    "frame": b, "bytes": c, "pages": d, "first_page": e, "host_page": e // self.k,
                    "queued_after": f, "pages_left": g})
                self.queued[a].append((end, f))
                self.remaining.append((end, g))
            elif kind == K.WRITE_SPACE:
                self.slice(pid, tid, f"wait for write space ({self.channels[a]})", s, end)
            elif kind == K.RATE_LIMIT:
                self.slice(pid, tid, "rate limit", s, end, {
                    "ended_by": "page request" if a else "window end", "a_request_could_end_it": bool(b),
                    "budget_bytes": c})
            elif kind == K.REQUEST:
                fl.request[a] = self.slice(pid, tid, f"REQ_PAGES hp {a}", s, end, {"host_page": a})
                arrived = self.us1(b + self.latency_ns)
                if self.latency_ns and arrived > s:
                    self.slice(pid, tid, "one-way latency", s, min(arrived, end))
            elif kind == K.SYNC:
                self.slice(pid, tid, "dirty-log sync", s, end, {"newly_dirty": a, "pages_left": b, "sync": c})
                self.remaining.append((end, b))
            elif kind == K.ROUND:
                self.slice(pid, tid, f"precopy round {a}", s, end)
            elif kind == K.MILESTONE:
                name = names[a] if 0 <= a < len(names) else "event"
                said = names[b] if 0 <= b < len(names) else None
                if paused is not None and name in ("postcopy_paused", "postcopy_resumed"):
                    self.slice(pid, tid, "postcopy paused", paused[0], s, {"reason": paused[1]})
                    paused = None
                if name == "postcopy_paused" and title == "mig/src":  # until resumed (or paused again)
                    paused = (s, said or "")
                self.instant(pid, tid, name, s, {"reason": said} if said else None)
            elif kind == K.STOP_VM:
                self.slice(pid, tid, "stop the guest", s, end)
            elif kind == K.DISCARD:
                self.slice(pid, tid, "send discard list", s, end, {"runs": a, "host_pages": b})
            elif kind == K.PREEMPT:
                preempted[a] = (s, b)
            elif kind == K.RESUME:
                if a in preempted:
                    start, at = preempted.pop(a)
                    self.slice(pid, tid, f"hp {a} preempted", start, s, {
                        "host_page": a, "interrupted_at_page": at, "resumed_at_page": b,
                        "resumed_as": "urgent, on precopy" if c else "background"})
            elif kind == K.RECV:
                self.link(pid, tid, Msg(d).name if d in KINDS else str(d), a, b, c, s, end, f, e, end)
            elif kind in (K.PLACE, K.PLACE_URGENT):
                taken = self.us1(g)
                self.link(pid, tid, "PAGES", a, b, c, s, taken, h, j, end)
                fl.place[(a, b)] = self.slice(pid, tid, "place urgent" if kind == K.PLACE_URGENT else "place", taken,
                                              end, {"frame": self.frame(a, b), "bytes": c, "pages": d,
                                                    "first_page": e, "last_page": f})
                fl.placed.append((a, b, e, f))
                fl.placed_at.append(taken)
            elif kind == K.WAKE:
                self.instant(pid, tid, f"wake vcpu{b}", s, {"host_page": a})
                fl.wake[(a, b)].append((s, c, d))
            elif kind == K.DISCARD_APPLIED:
                self.slice(pid, tid, "apply discard list", s, end, {"host_pages": a})
            elif kind == K.RUNNING:
                self.instant(pid, tid, "PACKAGED: the guest runs here", s)
            elif kind == K.FAULT_SEEN:  # an instant when nothing is sent: 1 µs wide, so an arrow can bind
                stop = end if c == 0 else min(s + 1.0, ts0[i + 1] if i + 1 < len(ts0) else s + 1.0)
                what = ("request", "already placed", "already requested", "request held (postcopy paused)")[c]
                fl.seen[(a, b)].append((s, self.slice(pid, tid, f"FAULT hp {b}: {what}", s, stop,
                                                      {"vcpu": a, "host_page": b})))
            elif kind == K.FAULT:
                self.fault(pid, tid, int(title.rpartition("vcpu")[2]), a, t0, s, end, bool(c),
                           {"host_page": a, "page": b}, self.us1(d) if d else None)
            elif kind == K.PAUSED:
                self.slice(pid, tid, "paused (switchover)", s, end)
        for hp, (start, at) in preempted.items():
            self.instant(pid, tid, f"hp {hp} preempted", start, {"interrupted_at_page": at})

    def uffd_faults(self) -> None:
        """The uffd backend's faults, on their vCPUs' tracks. A vCPU stopped in the kernel records
        nothing of its faults: they are the rows the fault thread logged for it (userfault.
        UffdFaultLog: from the event's read to the placement, QEMU 10.1's view), drawn where a
        bitmap vCPU draws its own, so that a fault is followed the same way with either backend."""
        pids = {p.role: p.pid or 0 for p in self.m.procs}
        for v in self.m.vcpus:
            pid, rows = pids.get(v.role, 0), v.faults
            if not len(rows):
                continue
            done = rows[:, 2] >= 0
            s, e = self.us(rows[:, 1]).tolist(), self.us(np.where(done, rows[:, 2], rows[:, 1])).tolist()
            for hp, t0, ok, start, end in zip(rows[:, 0].tolist(), rows[:, 1].tolist(), done.tolist(), s, e):
                self.fault(pid, pid, v.role.n, hp, t0, start, end, ok,
                           {"host_page": hp, "seen_by": "the fault thread's uffd event"})

    def fault(self, pid: int, tid: int, vcpu: int, hp: int, t0: int, s: float, end: float, resolved: bool,
              args: dict[str, Any], woken_at: float | None = None) -> None:
        """vCPU ``vcpu``'s fault on host page ``hp`` (real start ``t0``, drawn from ``s`` to ``end``),
        and the moment it saw the page (``woken_at``, where it knows), followed by a flow if resolved."""
        args["latency_us"] = round(end - s, 3)
        fault = self.slice(pid, tid, f"fault hp {hp}" + ("" if resolved else " (unresolved)"), s, end, args)
        woken = None if woken_at is None else self.slice(pid, tid, "woken: page present", woken_at, end)
        if resolved:
            self.flows.faults.append((t0, vcpu, hp, fault, args, woken))
        self.faulting += [(s, 1), (end, -1)]

    def link(self, pid: int, tid: int, what: str, ch: int, send_ns: int, nbytes: int, s: float, end: float,
             carried: int, queued: int, queued_at: float) -> None:
        """A frame from the head of channel ``ch``'s queue until the link had carried it and its
        one-way latency had passed; ``queued`` bytes were in the queue at ``queued_at``."""
        args = {"bytes": nbytes, "frame": self.frame(ch, send_ns)} if what == "PAGES" else {"bytes": nbytes}
        self.flows.recv[(ch, send_ns)] = self.slice(pid, tid, f"link {self.channels[ch]}: {what}", s, end, args)
        if self.latency_ns:  # from when the link had carried it
            self.slice(pid, tid, "one-way latency", min(max(s, self.us1(carried)), end), end)
        self.queued[ch].append((queued_at, queued))

    # -- flows ---------------------------------------------------------------------------------------
    def fault_flows(self) -> None:
        """One flow per resolved fault: vCPU -> fault thread -> return thread -> the frame that
        carried the page (sent, carried, placed) -> the vCPU woken. A step that happened before the
        previous one (the page was already on its way when the guest touched it) is left out."""
        fl = self.flows
        k = self.k
        placed = np.array(fl.placed, np.int64).reshape(-1, 4)
        placed_at = np.array(fl.placed_at)
        for fid, (_, vcpu, hp, start, args, woken) in enumerate(sorted(fl.faults), start=1):
            end = start[2] + start[3]
            steps = [start]
            seen = fl.seen.get((vcpu, hp), [])
            j = bisect.bisect_left([t for t, _ in seen], start[2])
            if j < len(seen):
                steps.append(seen[j][1])
            if hp in fl.request:
                steps.append(fl.request[hp])
            # the frame that woke it (a vCPU waits on a host page once: it is never discarded again)
            frame = next(((ch, sent) for t, ch, sent in fl.wake.get((hp, vcpu), []) if t >= start[2]), None)
            if frame is None and len(placed):  # it found the page by itself: the last frame holding it
                hit = np.flatnonzero((placed[:, 2] < (hp + 1) * k) & (placed[:, 3] >= hp * k) & (placed_at <= end))
                if hit.size:
                    frame = tuple(int(x) for x in placed[hit[np.argmax(placed_at[hit])], :2])
            if frame is not None:
                seq = self.frame(*frame)
                send = None if seq is None else fl.send.get((frame[0], seq))
                args["came_in"] = f"{self.channels[frame[0]]} frame {seq}" + (
                    "" if send is None else ", sent before the fault" if send[2] < start[2]
                    else ", sent after the request" if hp in fl.request and send[2] >= fl.request[hp][2]
                    else ", sent during the fault")
                steps += [x for x in (send, fl.recv.get(frame), fl.place.get(frame)) if x]
            pid, tid, ts, dur = woken or start
            last = round(ts + min(NS, dur / 2) if woken else ts + max(dur - NS, dur / 2), 3)  # the end's ts
            kept = [steps[0]]
            for st in steps[1:]:  # in time order, and before the vCPU has the page
                if kept[-1][2] <= st[2] and st[2] + min(NS, st[3] / 2) < last:
                    kept.append(st)
            for n, (pid_, tid_, ts_, dur_) in enumerate(kept):
                self.ev.append({"ph": "s" if n == 0 else "t", "id": fid, "pid": pid_, "tid": tid_,
                                "ts": round(ts_ + min(NS, dur_ / 2), 3), **FLOW})
            self.ev.append({"ph": "f", "bp": "e", "id": fid, "pid": pid, "tid": tid, "ts": last, **FLOW})

    # -- counters --------------------------------------------------------------------------------------
    def counters(self) -> None:
        for ch, samples in enumerate(self.queued):
            for ts, v in sorted(samples):
                self.counter(f"socket queue {self.channels[ch]} (bytes)", ts, v)
        for ts, v in sorted(self.remaining):
            self.counter("pages left to send", ts, v)
        n = 0
        for ts, delta in sorted(self.faulting):
            n += delta
            self.counter("faults outstanding", ts, n)
        for s in self.m.timeline:
            self.counter("guest accesses", s["t_ms"] * 1e3, s["guest_accesses"])


def chrome_trace(m: RunRecord, rep: Report) -> dict[str, Any]:
    """The Trace Event document of one finished migration and its report."""
    return _Builder(m, rep).build()


def write_trace_or_say(path: str, m: RunRecord, rep: Report) -> str | None:
    """The trace, whatever became of the run; a path that cannot be written costs the trace, never
    the report: the line that says why is returned (and raised as a RuntimeWarning for API users)."""
    try:
        write_trace(path, m, rep)
    except OSError as e:
        why = f"--trace {path}: cannot write it ({e.strerror or e})"
        warnings.warn(why, RuntimeWarning, stacklevel=3)
        return why
    return None


def write_trace(path: str, m: RunRecord, rep: Report) -> None:
    """Written aside and renamed into place: a failure leaves the previous trace whole."""
    doc = chrome_trace(m, rep)
    atomic_write(path, lambda f: json.dump(doc, f))
