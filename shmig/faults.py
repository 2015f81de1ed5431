"""Fault injection for postcopy recovery: ``--inject-fault WHAT@WHEN`` breaks one channel mid-stream.

WHAT is the channel (``precopy-channel``, ``postcopy-channel``, ``return-path``); WHEN is either a
share of the pages left at postcopy start (``50%``: once half of them have been sent) or a time since
postcopy started (``300ms``). The source evaluates the faults between frames: it owns one end of
every channel, so it can break any of them the way a dropped TCP connection breaks, and the peer
finds out mid-stream (a truncated frame, EOF, EPIPE), exactly as QEMU's destination does.

A fault only fires once the destination runs the guest (QEMU pauses instead of failing only in
postcopy-active), and one whose time comes while the migration is paused fires during the next
recovery, as soon as its channel exists again: that is QEMU's "double failure" test.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from .clock import Clock
from .units import UnitError, parse_time

CHANNELS = ("precopy-channel", "postcopy-channel", "return-path")
MAX_FAULTS = 16
_SPEC = re.compile(r"^\s*([a-z-]+)\s*@\s*(.+?)\s*$")


class FaultSpecError(ValueError):
    """A fault spec that does not parse; the message says what was expected."""


@dataclass(frozen=True)
class Fault:
    """One channel break: ``what`` at ``fraction`` of the pages left, or ``after`` seconds of postcopy."""

    what: str
    fraction: float | None = None
    after: float | None = None

    @classmethod
    def parse(cls, spec: str) -> "Fault":
        m = _SPEC.match(str(spec))
        if not m:
            raise FaultSpecError(f"cannot read {spec!r}: use WHAT@WHEN, e.g. postcopy-channel@50% or"
                                 f" return-path@300ms")
        what, when = m.groups()
        if what not in CHANNELS:
            raise FaultSpecError(f"unknown channel {what!r} in {spec!r}: use one of {', '.join(CHANNELS)}")
        if when.endswith("%"):
            try:
                pct = float(when[:-1])
            except ValueError:
                raise FaultSpecError(f"cannot read {when!r} in {spec!r} as a percentage (e.g. 50%)") from None
            if not 0 <= pct < 100:  # also catches NaN
                raise FaultSpecError(f"{when} in {spec!r} must be at least 0% and below 100% of the pages"
                                     f" left at postcopy start")
            return cls(what, fraction=pct / 100)
        if re.fullmatch(r"[0-9.eE+-]+", when):
            raise FaultSpecError(f"{when!r} in {spec!r} has no unit: say {when}% (of the pages left) or"
                                 f" {when}ms (since postcopy started)")
        try:
            after = parse_time(when)
        except UnitError as e:
            raise FaultSpecError(f"{spec!r}: {e}") from None
        if not after >= 0:
            raise FaultSpecError(f"{when!r} in {spec!r} must not be negative")
        return cls(what, after=after)

    def __str__(self) -> str:
        if self.fraction is not None:
            return f"{self.what}@{self.fraction * 100:g}%"
        after: float = self.after  # type: ignore[assignment]
        return f"{self.what}@{after:g}s" if after >= 1 else f"{self.what}@{after * 1e3:g}ms"


class FaultInjector:
    """The source's list of faults still to fire, and a record of those that did."""

    def __init__(self, specs: list[str], clock: Clock = Clock()):
        self.clock = clock  # WHEN is emulated time, like every other duration
        self.pending = [Fault.parse(s) for s in specs]
        self.fired: list[dict[str, Any]] = []
        self.t0: int | None = None  # postcopy start, monotonic ns
        self.left0 = 0  # pages left at postcopy start

    def arm(self, left: int) -> None:
        """Postcopy has started with ``left`` pages still to send."""
        self.t0 = time.monotonic_ns()
        self.left0 = left

    def next_time_ns(self) -> int | None:
        """When the earliest fault given as a time is due (monotonic ns), if any."""
        times = [f.after for f in self.pending if f.after is not None]
        if self.t0 is None or not times:
            return None
        return self.t0 + self.clock.real_ns(min(times))

    def due(self, left: int, channels: tuple[str, ...] = CHANNELS, during: str = "postcopy") -> list[Fault]:
        """Faults whose moment has come, on channels that exist now; they leave the pending list."""
        if self.t0 is None or not self.pending:
            return []
        now = time.monotonic_ns()
        out = [f for f in self.pending if f.what in channels and (
            left <= self.left0 * (1 - f.fraction) if f.fraction is not None
            else now - self.t0 >= self.clock.real_ns(f.after))]  # type: ignore[arg-type]
        for f in out:
            self.pending.remove(f)
            self.fired.append({"fault": str(f), "postcopy_ms": round(self.clock.emulated_ms(now - self.t0), 3), "pages_left": left,
                               "during": during})
        return out
