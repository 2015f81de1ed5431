"""A series of runs, a compare's or a sweep's: its plan as a list of runs, each knowing its place,
and the partial result that ``--resume`` continues.

Every run of a plan has an index (its place in the plan): results are put back in that order,
wherever and in whatever order the runs finished, so a result never depends on who finished
first. The plan has an id, a hash of every run's place and Config as planned (``auto`` dilation
still ``auto``): each run saved with ``--json`` carries it, and ``--resume`` refuses a file whose
runs were planned otherwise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .config import Config, ConfigError
from .controller import run
from .report import Report, SavedRun, load_runs
from .timeline import Sample
from .units import fmt_size

LOST = "lost: "  # a run the cluster lost (not the migration's failure): --resume runs it again


class SeriesInterrupted(KeyboardInterrupt):
    """Ctrl-C during a series of runs (compare, sweep): the whole series stops, not just the run
    it landed in. ``results`` holds what had finished, for the caller to print and save."""

    def __init__(self, results: Any = None, total: int = 0):
        super().__init__("interrupted")
        self.results = results
        self.total = total


def run_one(cfg: Config, on_sample: Callable[[Sample], None] | None = None) -> Report:
    """One run of a series. A Ctrl-C, whether it lands in the run (which then reports itself
    interrupted) or around it, raises SeriesInterrupted."""
    try:
        rep = run(cfg, on_sample)
    except KeyboardInterrupt:
        raise SeriesInterrupted() from None
    if rep.interrupted:
        raise SeriesInterrupted()
    return rep


def lost(cfg: Config, reason: str, host: dict[str, Any] | None = None) -> Report:
    """The report of a run the cluster lost (its workers died, its process was killed, no worker
    was left to run it): failed, with the reason, and run again by --resume."""
    return Report(status="failed", error=LOST + reason, config=cfg.to_dict(), host=dict(host or {}))


def is_lost(rep: Report) -> bool:
    return (rep.error or "").startswith(LOST)


@dataclass(frozen=True)
class PlannedRun:
    """One run of a plan: a compare's (mode, host page, seed) or a sweep's (value, mode)."""

    index: int  # its place in the plan
    name: str  # how progress lines and errors name it: "vanilla with 4KiB host pages", "preempt socket-buffer=1MiB"
    config: Config
    mode: str  # compare: the label of what runs (preempt-nobreak); sweep: the --modes name
    host_page: int
    run: int = 0  # compare --repeat: the i-th run of the cell (seed + i)
    knob: str | None = None  # sweep: the option swept and this run's value of it
    value: str | None = None
    # compare with --time-dilation auto: the configs of the row (one per mode), whose largest
    # factor this run runs at; empty: the run calibrates itself (or has a factor)
    calibrate: tuple[Config, ...] = ()

    def key(self) -> dict[str, Any]:
        return {"mode": self.mode, "host_page": self.host_page, "run": self.run, "knob": self.knob,
                "value": self.value}

    def saved(self, report: Report) -> SavedRun:
        return SavedRun(self.mode, self.host_page, report, self.knob, self.value)

    def with_factor(self, factor: float) -> "PlannedRun":
        """The run with its ``auto`` dilation resolved."""
        return dataclasses.replace(self, config=dataclasses.replace(self.config, time_dilation=factor),
                                   calibrate=())


def _plain(cfg: Config) -> dict[str, Any]:
    """A Config as it reads back from JSON."""
    return json.loads(json.dumps(cfg.to_dict(), default=str))


@dataclass(frozen=True)
class Plan:
    """Every run of a compare or a sweep, in plan order, and the plan's id."""

    kind: str  # "compare" or "sweep"
    runs: tuple[PlannedRun, ...]
    id: str = field(init=False)

    def __post_init__(self) -> None:
        text = json.dumps({"kind": self.kind, "runs": [{**r.key(), "config": _plain(r.config)} for r in self.runs]},
                          sort_keys=True)
        object.__setattr__(self, "id", hashlib.sha256(text.encode()).hexdigest()[:16])

    def stamp(self, entries: list[dict[str, Any]], runs: Sequence[PlannedRun]) -> list[dict[str, Any]]:
        """``--json`` entries of ``runs``, each with the run's place in this plan (what --resume reads)."""
        return [{**e, "plan": {"id": self.id, "index": r.index, "runs": len(self.runs)}} for e, r in zip(entries, runs)]

    def ordered(self, results: dict[int, Report]) -> list[tuple[PlannedRun, Report]]:
        """The runs that have a result, in plan order."""
        return [(r, results[r.index]) for r in self.runs if r.index in results]

    def missing(self, done: dict[int, Report]) -> list[PlannedRun]:
        return [r for r in self.runs if r.index not in done]

    def resume(self, path: str) -> dict[int, Report]:
        """The runs of a partial result (``--json`` of an interrupted compare or sweep) that this
        plan need not run again, by index: a file of another plan is refused in one line that
        says what differs. Runs the cluster lost are left out, so they run again."""
        try:
            saved = load_runs(path)
        except ConfigError as e:
            raise ConfigError(f"--resume: {e}") from None
        with open(path) as f:  # load_runs read it already: the entries' stamps
            data = json.load(f)
        entries = data if isinstance(data, list) else [data]
        stamps = [e.get("plan") for e in entries]
        if not all(isinstance(st, dict) and isinstance(st.get("id"), str) and isinstance(st.get("index"), int)
                   for st in stamps):
            raise ConfigError(f"--resume {path}: its runs do not say which plan they belong to: give a file"
                              f" written by shmig compare|sweep --json")
        if any(st["id"] != self.id or not 0 <= st["index"] < len(self.runs) for st in stamps):
            kind = "sweep" if entries[0].get("knob") else "compare"
            raise ConfigError(f"--resume {path}: it was written by another plan"
                              + (f" (a {kind}, not a {self.kind})" if kind != self.kind else "")
                              + f": {self._difference(entries, saved)}; give the options of the command that"
                              " wrote it")
        done: dict[int, Report] = {}
        for st, s in zip(stamps, saved):
            i = st["index"]
            if i in done:
                raise ConfigError(f"--resume {path}: run {i} ({self.runs[i].name}) is in it twice")
            if not is_lost(s.report):
                done[i] = s.report
        return done

    def _difference(self, entries: list[dict[str, Any]], saved: list[SavedRun]) -> str:
        """The first thing a saved run and this plan's run at its place disagree on."""
        for e, s in zip(entries, saved):
            st = e["plan"]
            if st.get("runs") != len(self.runs):
                return f"it planned {st.get('runs')} runs, this command plans {len(self.runs)}"
            planned = self.runs[st["index"]]
            theirs = {k: e.get(k, v) for k, v in planned.key().items()}
            if theirs != planned.key():
                return f"its run {st['index']} is " + ", ".join(
                    f"{k} {theirs[k]} (here {v})" for k, v in planned.key().items() if theirs[k] != v)
            ours = _plain(planned.config)
            diff = [k for k, v in ours.items() if k in s.report.config and s.report.config[k] != v
                    and not (k == "time_dilation" and v == "auto")]
            if diff:
                return f"its run {st['index']} ({planned.name}) had " + ", ".join(
                    f"--{k.replace('_', '-')} {_show(k, s.report.config[k])} (here {_show(k, ours[k])})" for k in diff)
        return "its runs were planned otherwise"


SIZE_FIELDS = ("ram", "host_page", "wss", "socket_buffer", "send_buffer")


def _show(field_name: str, v: Any) -> str:
    return fmt_size(v) if field_name in SIZE_FIELDS and isinstance(v, int) else str(v)


def run_local(runs: Sequence[PlannedRun], begin: Callable[[int, PlannedRun], None],
              on_sample: Callable[[Sample], None] | None = None,
              log: Callable[[str], None] | None = None) -> dict[int, Report]:
    """Run ``runs`` here, one after the other: ``begin(k, run)`` before the k-th (from 1), a line
    to ``log`` for each that failed. Ctrl-C raises SeriesInterrupted with the results so far."""
    out: dict[int, Report] = {}
    for k, r in enumerate(runs, 1):
        begin(k, r)
        try:
            rep = run_one(r.config, on_sample)
        except SeriesInterrupted:
            raise SeriesInterrupted(out, len(runs)) from None
        out[r.index] = rep
        if log and not rep.ok:
            log(f"  {r.name}: {rep.status}: {rep.error}")
    return out
