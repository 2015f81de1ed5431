"""The live status line of ``shmig run``, ``compare`` and ``sweep`` (rich, an optional extra).

The controller calls ``sample(Sample)`` every 100 ms from its own event loop; the line is redrawn
right there (``auto_refresh=False``), so no display thread runs in a process that forks the next
run's children. Off when stderr is not a terminal, with ``-q``, or without rich: then the CLI passes
no callback at all and a run pays nothing.
"""

from __future__ import annotations

import collections
import sys
import time
from typing import Any

from .config import TARGET_PAGE
from .timeline import Sample
from .units import fmt_size

RATE_WINDOW = 10  # samples (1 s) the throughput is averaged over


def rich_available() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def status_text(s: Sample, rate_bps: float | None) -> str:
    """One line from one controller sample: QEMU's status, round, bytes sent and left, throughput,
    requests served, faults waiting, the p50 so far (from QEMU's buckets, hence the ~)."""
    sent = s.precopy_bytes + s.postcopy_bytes + s.multifd_bytes
    parts = [f"{s.t_ms / 1e3:6.1f}s", f"{s.status:<15}"]  # QEMU's name for the phase (status.during)
    if s.phase in ("precopy", "switchover"):
        parts.append(f"round {s.rounds + (s.phase == 'precopy')}")
    parts.append(f"sent {fmt_size(sent)}" + (f" ({fmt_size(s.postcopy_bytes)} on the postcopy channel)"
                                             if s.postcopy_bytes else ""))
    parts.append(f"left {fmt_size(s.remaining_pages * TARGET_PAGE)}")
    if rate_bps is not None:
        parts.append(f"{rate_bps * 8 / 1e6:,.0f} Mbit/s")
    parts.append(f"{s.requests} requests")
    parts.append(f"{s.faults_outstanding} faults waiting")
    if s.fault_p50_us is not None:
        p50 = s.fault_p50_us
        parts.append(f"p50 ~{p50 / 1e3:.1f} ms" if p50 >= 1000 else f"p50 ~{p50:.0f} us")
    return "  ".join(parts)


def cells_text(total: int, done: int, failed: int, running: list[str], elapsed: float) -> str:
    """The line of a series on a cluster: runs done, failed and running (by name), and time left:
    the runs still to go at the rate runs have finished so far (several finish per run time)."""
    left = "time left: ?" if not done else f"~{_duration(elapsed / done * (total - done))} left"
    parts = [f"{done}/{total} done"] + ([f"{failed} failed"] if failed else [])
    parts += [f"{len(running)} running" + (": " + ", ".join(running) if running else ""), left]
    return " · ".join(parts)


class LiveStatus:
    """A live line on stderr for one run or a series of runs ("run 2 of 6", time left).

    Use as a context manager; ``begin(label)`` before each run, ``sample`` as the run's
    ``on_sample``, ``log`` for lines that must stay (printed above the live line). With
    ``announce``, a series without a live line says "run i/n: label" on a line of its own."""

    def __init__(self, total_runs: int = 1, enabled: bool = True, announce: bool = False):
        self.total = total_runs
        self.enabled = enabled and rich_available()
        self.announce = announce
        self.index = 0
        self.label = ""
        self.t_run = time.monotonic()
        self.t_cells: float | None = None  # when the first cell went to a cluster
        self.durations: list[float] = []
        self.samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=RATE_WINDOW + 1)
        self._live: Any = None
        self._console: Any = None

    def __enter__(self) -> "LiveStatus":
        if self.enabled:
            from rich.console import Console
            from rich.live import Live

            self._console = Console(stderr=True)
            self._live = Live(console=self._console, auto_refresh=False, transient=True,
                              redirect_stdout=False, redirect_stderr=False)
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    @property
    def on_sample(self) -> Any:
        """The callback to hand to a run: None when nothing is shown, so the run pays nothing."""
        return self.sample if self._live is not None else None

    def begin(self, label: str) -> None:
        now = time.monotonic()
        if self.index:
            self.durations.append(now - self.t_run)
        self.index += 1
        self.label = label
        self.t_run = now
        self.samples.clear()
        if self.announce and self._live is None:
            self.log(f"run {self.index}/{self.total}: {label}")

    def eta(self) -> str:
        """Time left: the runs still to go at the mean duration of those done so far."""
        if self.total <= 1:
            return ""
        if not self.durations:
            return "time left: ?"
        mean = sum(self.durations) / len(self.durations)
        left = mean * (self.total - self.index + 1) - (time.monotonic() - self.t_run)
        return f"~{_duration(max(left, 0.0))} left"

    def sample(self, s: Sample) -> None:
        self.samples.append((s.t_ms, s.precopy_bytes + s.postcopy_bytes + s.multifd_bytes))
        rate = None
        if len(self.samples) >= 2:
            (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
            rate = (b1 - b0) / ((t1 - t0) / 1e3) if t1 > t0 else None
        line = status_text(s, rate)
        if self.total > 1 or self.label:
            head = f"run {self.index}/{self.total}" if self.total > 1 else ""
            head = " · ".join(x for x in (head, self.label, self.eta()) if x)
            line = f"[{head}] {line}"
        self._show(line)

    def cells(self, done: int, failed: int, running: list[str]) -> None:
        """A series on a cluster: several runs at once, elsewhere, sending no samples."""
        if self.t_cells is None:
            self.t_cells = time.monotonic()
        self._show(cells_text(self.total, done, failed, running, time.monotonic() - self.t_cells))

    def _show(self, line: str) -> None:
        if self._live is not None:
            from rich.text import Text

            self._live.update(Text(line, no_wrap=True, overflow="ellipsis"), refresh=True)

    def log(self, msg: str) -> None:
        """A line that stays: above the live line when there is one, else plainly on stderr."""
        if self._console is not None:
            self._console.print(msg, markup=False, highlight=False)
        else:
            print(msg, file=sys.stderr, flush=True)
