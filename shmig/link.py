"""The emulated network link both data channels share.

Pacing is done by the receivers, on purpose: a frame stays queued in its channel (pipe plus
read-ahead buffer, together ``socket_buffer`` bytes) until the link has carried it, so a requested
page written behind a full queue waits exactly as it does behind a full TCP socket.

The link is a virtual clock in shared memory: ``free_at`` is when it finishes what has been
reserved so far. A receiver reserves at most one quantum (64 KiB, a burst of packets) at a time and
waits for it to pass, so two busy channels interleave quantum by quantum and share the link fairly,
as two TCP flows do, while one busy channel alone gets all of it.
"""

from __future__ import annotations

import multiprocessing
import time
from typing import Callable

import numpy as np

QUANTUM = 64 * 1024
FREE_AT = 0


class Link:
    def __init__(self, state: np.ndarray, bandwidth: float | None, latency: float,
                 lock: multiprocessing.synchronize.Lock):
        self.state = state  # int64[4] in shared memory; [FREE_AT] in monotonic ns
        self.ns_per_byte = None if bandwidth is None else 1e9 / bandwidth
        self.latency_ns = int(latency * 1e9)
        self.lock = lock

    @property
    def limited(self) -> bool:
        return self.ns_per_byte is not None

    def carry(self, nbytes: int, wait: Callable[[float], None]) -> int:
        """Take ``nbytes`` off the wire; ``wait(seconds)`` sleeps while reading ahead. Returns ns waited."""
        if self.ns_per_byte is None:
            return 0
        t0 = time.monotonic_ns()
        while nbytes > 0:
            q = nbytes if nbytes < 2 * QUANTUM else QUANTUM  # a frame's tail rides with its last quantum
            with self.lock:
                now = time.monotonic_ns()
                start = max(now, int(self.state[FREE_AT]))
                done = start + int(q * self.ns_per_byte)
                self.state[FREE_AT] = done
            self._until(done, wait)
            nbytes -= q
        return time.monotonic_ns() - t0

    def reset(self) -> None:
        """A postcopy recovery: the link's reservations belonged to the old connections."""
        with self.lock:
            self.state[FREE_AT] = 0

    def arrive(self, send_ns: int, wait: Callable[[float], None]) -> None:
        """A frame is not applied before it was sent plus the one-way latency."""
        if self.latency_ns:
            self._until(send_ns + self.latency_ns, wait)

    @staticmethod
    def _until(t_ns: int, wait: Callable[[float], None]) -> None:
        while True:
            left = t_ns - time.monotonic_ns()
            if left <= 0:
                return
            wait(left / 1e9)
