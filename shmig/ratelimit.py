"""QEMU's migration rate limit (max-bandwidth, max-postcopy-bandwidth): a budget per 100 ms window.

migration/migration.c: ``migration_rate_exceeded`` says the window's budget is spent;
``migration_rate_limit`` sleeps until the window ends, unless a page request posts
``rate_limit_sem`` first. Where that sleep may end early, and where the gate holds a request back
until the window rolls over, is the migration thread's business (source.MigrationThread).
"""

from __future__ import annotations

import threading
import time

from .clock import Clock
from .events import K, Recorder

BUFFER_DELAY = 0.1  # QEMU's rate-limit window (emulated seconds)


class RateLimiter:
    """QEMU's migration rate limit: a budget of ``rate * BUFFER_DELAY`` bytes per 100 ms window.

    Windows and rates are emulated time (``Clock``): dilated N times, a window lasts N times longer
    in real time and holds the same budget.
    """

    tr: Recorder | None = None  # the source's event recorder, when tracing

    def __init__(self, rate: float | None, clock: Clock):
        self.window_s = clock.real(BUFFER_DELAY)
        self.set_rate(rate)

    def set_rate(self, rate: float | None) -> None:
        self.budget = None if rate is None else rate * BUFFER_DELAY
        self.window = time.monotonic()
        self.used = 0

    def account(self, n: int) -> None:
        self.used += n

    def exceeded(self) -> bool:
        """migration_rate_exceeded; a window that has ended starts a new one (migration_update_counters)."""
        if self.budget is None:
            return False
        now = time.monotonic()
        if now - self.window >= self.window_s:
            self.window = now
            self.used = 0
        return self.used >= self.budget

    def sleep(self, wake: threading.Event | None = None) -> bool:
        """migration_rate_limit: with the budget spent, sleep until the window ends; a queued page
        request (``wake``, QEMU's rate_limit_sem) ends the sleep early. The event is left set, as
        QEMU posts the semaphore back: until the request is served, every later sleep returns at
        once. Returns True if a request ended the sleep."""
        if not self.exceeded():
            return False
        left = self.window + self.window_s - time.monotonic()
        if left <= 0:
            return False
        t0 = time.monotonic_ns()
        woken = wake.wait(left) if wake is not None else time.sleep(left)
        if self.tr:
            self.tr.put(K.RATE_LIMIT, t0, time.monotonic_ns(), bool(woken), wake is not None, int(self.budget or 0))
        if woken:
            return True
        self.exceeded()  # the window has ended: a new one starts before anything else is sent
        return False
