"""The emulated world's one clock: time dilation.

A machine that cannot carry a 25 Gbit/s link in real time can still emulate one faithfully if the
whole emulated world runs N times slower (time-dilated network emulation, Gupta et al., NSDI 2006):
every duration the emulation enforces (link pacing, one-way latency, QEMU's 100 ms rate-limit
window and 50 ms iterate limit, guest pacing, the run's deadline) is stretched by N in real time,
every rate is divided by N, and every time reported is divided by N again. What cannot be dilated
is the machine itself: Python's own costs (a frame's header, a wake-up) shrink by N in emulated
time, so a dilated run shows the emulated mechanisms with a faster CPU than the real one.

Every module asks this clock; none does its own arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Clock:
    dilation: float = 1.0  # N: real seconds per emulated second

    def real(self, emulated_s: float) -> float:
        """How long an emulated duration lasts in real time (seconds)."""
        return emulated_s * self.dilation

    def real_ns(self, emulated_s: float) -> int:
        return int(emulated_s * self.dilation * 1e9)

    def rate(self, emulated_bps: float | None) -> float | None:
        """A rate (bytes per emulated second) as bytes per real second; None stays unlimited."""
        return None if emulated_bps is None else emulated_bps / self.dilation

    def emulated_ns(self, real_ns: float) -> float:
        """A measured real duration (ns) in emulated ns."""
        return real_ns / self.dilation

    def emulated_ms(self, real_ns: float) -> float:
        return real_ns / self.dilation / 1e6
