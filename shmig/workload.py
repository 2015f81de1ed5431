"""The guest's access streams: which target pages each vCPU writes next.

Deterministic for (workload, wss_pages, vcpu, vcpus, seed) so a run can be
replayed and the expected RAM derived.
"""
from __future__ import annotations

import numpy as np

WORKLOADS = ("idle", "sequential", "random", "hotset", "ab")
HOT_ACCESS_FRACTION = 0.9  # hotset: share of accesses that go to the hot region
HOT_REGION_DIVISOR = 10  # hotset: hot region = first max(1, wss_pages // 10) pages


class AccessStream:
    """One vCPU's endless stream of target-page indices, produced in chunks."""

    def __init__(self, workload: str, wss_pages: int, vcpu: int, vcpus: int, seed: int) -> None:
        if workload not in WORKLOADS:
            raise ValueError(f"unknown workload {workload!r}, expected one of {WORKLOADS}")
        if wss_pages < 1 or not 0 <= vcpu < vcpus:
            raise ValueError("need wss_pages >= 1 and 0 <= vcpu < vcpus")
        self.workload, self.wss_pages, self.vcpu, self.vcpus, self.seed = (
            workload, wss_pages, vcpu, vcpus, seed)
        size = wss_pages // vcpus  # slice v of vcpus equal slices; the last takes the remainder
        self.lo = vcpu * size
        self.hi = wss_pages if vcpu == vcpus - 1 else self.lo + size
        self.hot_pages = max(1, wss_pages // HOT_REGION_DIVISOR)
        self._rng = np.random.Generator(np.random.PCG64([seed, vcpu]))
        self._pos = 0  # sequential/ab: accesses made so far
        # a sequential guest is somewhere in its sweep when the migration starts, not at its start
        self._start = int(self._rng.integers(0, max(1, self.hi - self.lo))) if workload == "sequential" else 0
        self._empty = np.empty(0, dtype=np.int64)

    def on_destination(self) -> None:
        """The guest resumed on the destination: a random stream starts afresh from (seed, vCPU),
        so every mode of a compare faults on the same pages in the same order with the same seed,
        whatever the source phase's timing let the guest do before (paired comparisons). A sweep
        keeps its place."""
        if self.workload in ("random", "hotset"):
            self._rng = np.random.Generator(np.random.PCG64([self.seed, self.vcpu, 1]))

    @property
    def passes(self) -> int:
        """Completed sweeps over the vCPU's slice (sequential/ab; 0 otherwise)."""
        n = self.hi - self.lo
        return self._pos // n if n and self.workload in ("sequential", "ab") else 0

    def next_chunk(self, n: int) -> np.ndarray:
        """Next up to n int64 page indices in [0, wss_pages) (ab: shorter at a pass end)."""
        w, slen = self.workload, self.hi - self.lo
        if n <= 0 or w == "idle":
            return self._empty
        if w == "random":
            return self._rng.integers(0, self.wss_pages, n, dtype=np.int64)
        if w == "hotset":
            hot = self._rng.random(n) < HOT_ACCESS_FRACTION
            return np.where(hot, self._rng.integers(0, self.hot_pages, n, dtype=np.int64),
                            self._rng.integers(0, self.wss_pages, n, dtype=np.int64))
        if slen == 0:  # more vCPUs than pages: this vCPU has nothing to sweep
            return self._empty
        off = (self._start + self._pos) % slen
        if w == "ab":
            n = min(n, slen - off)  # never span two passes: no duplicates in a chunk
        idx = np.arange(off, off + n, dtype=np.int64)
        if w == "sequential":
            idx %= slen
        self._pos += n
        return idx + self.lo
