"""Destination-side postcopy statistics computed the way QEMU reports them.

QEMU (10.1+) accounts fault latency in whole microseconds into 24 power-of-two
buckets (``postcopy-latency-dist``) and reports ``postcopy-blocktime`` as the time
during which *all* vCPUs were blocked at once, plus a per-vCPU blocktime list.
The emulator records each fault as a (start_ns, end_ns) interval; this module
turns those records into the same numbers, vectorised with numpy.
"""

from __future__ import annotations

import numpy as np

BUCKETS = 24
"""QEMU's ``BLOCKTIME_LATENCY_BUCKET_N``: bucket N covers [2^N us, 2^(N+1) us)."""

_NS_PER_US = 1000
_NS_PER_MS = 1_000_000


def latency_dist(lat_ns: np.ndarray) -> list[int]:
    """Count latencies per bucket exactly like ``blocktime_latency_account``.

    QEMU truncates to whole microseconds, uses ``63 - clz64(us)`` (0 us -> bucket 0)
    and clamps everything >= 2^24 us into the top bucket.
    """
    us = np.asarray(lat_ns, dtype=np.int64).ravel() // _NS_PER_US
    # Clip before the float conversion: everything >= 2^24 lands in the top
    # bucket anyway, and small ints are exact in float64, so frexp is exact.
    us = np.clip(us, 0, 1 << BUCKETS)
    _, exp = np.frexp(us.astype(np.float64))  # us = m * 2**exp, m in [0.5, 1)
    idx = np.where(us > 0, exp - 1, 0)
    idx = np.minimum(idx, BUCKETS - 1)
    return [int(c) for c in np.bincount(idx, minlength=BUCKETS)]


def latency_summary(lat_ns: np.ndarray) -> dict:
    """Count, mean and p50/p90/p99/max in microseconds (0.1 us resolution).

    Gives the detail QEMU's single ``postcopy-latency`` average hides.
    """
    us = np.asarray(lat_ns, dtype=np.float64).ravel() / _NS_PER_US
    if us.size == 0:
        return {"count": 0, "mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    p50, p90, p99 = np.percentile(us, [50, 90, 99])
    return {
        "count": int(us.size),
        "mean": round(float(us.mean()), 1),
        "p50": round(float(p50), 1),
        "p90": round(float(p90), 1),
        "p99": round(float(p99), 1),
        "max": round(float(us.max()), 1),
    }


def _resolve(iv: np.ndarray, end_ns: int | None) -> np.ndarray:
    """Return (n, 2) int64 intervals with unresolved ends (< 0) closed or dropped."""
    iv = np.asarray(iv, dtype=np.int64).reshape(-1, 2)
    open_ = iv[:, 1] < 0
    if not open_.any():
        return iv
    if end_ns is None:
        return iv[~open_]
    iv = iv.copy()
    iv[open_, 1] = np.maximum(iv[open_, 0], int(end_ns))
    return iv


def _merge(iv: np.ndarray) -> np.ndarray:
    """Union of one vCPU's intervals, so touching/overlapping faults count once."""
    if iv.shape[0] <= 1:
        return iv
    iv = iv[np.argsort(iv[:, 0], kind="stable")]
    reach = np.maximum.accumulate(iv[:, 1])
    # A new run starts where the start is past everything covered so far.
    new = np.empty(iv.shape[0], dtype=bool)
    new[0] = True
    new[1:] = iv[1:, 0] > reach[:-1]
    starts = iv[new, 0]
    last = np.r_[np.flatnonzero(new)[1:] - 1, iv.shape[0] - 1]
    return np.column_stack([starts, reach[last]])


def blocktime(intervals: list[np.ndarray], end_ns: int | None = None) -> tuple[float, list[float]]:
    """QEMU's (``postcopy-blocktime``, ``postcopy-vcpu-blocktime``) in ms.

    Per vCPU: the sum of its fault durations. Total: the measure of time when
    every vCPU had an outstanding fault, which is what QEMU accrues as
    ``now - last_begin`` whenever a resolution ends an all-blocked stretch.
    Found with a sorted +1/-1 event sweep and a cumsum.
    """
    nv = len(intervals)
    resolved = [_resolve(iv, end_ns) for iv in intervals]
    per_vcpu = [float((r[:, 1] - r[:, 0]).sum()) / _NS_PER_MS for r in resolved]
    if nv == 0 or any(r.shape[0] == 0 for r in resolved):
        return 0.0, per_vcpu  # some vCPU never blocked: never all blocked at once
    merged = [_merge(r) for r in resolved]
    del resolved
    if nv == 1:  # one vCPU: all blocked whenever it is
        return float((merged[0][:, 1] - merged[0][:, 0]).sum()) / _NS_PER_MS, per_vcpu
    # ends first, so that a stable sort puts an end before a start at the same time; a few bytes
    # per fault (int8 steps, int32 levels): a run's report may hold millions of faults
    ends = sum(len(m) for m in merged)
    times = np.concatenate([m[:, 1] for m in merged] + [m[:, 0] for m in merged])
    del merged
    order = np.argsort(times, kind="stable")
    times = times[order]
    step = (order >= ends).view(np.int8) * np.int8(2) - np.int8(1)  # start +1, end -1
    del order
    level = np.cumsum(step, dtype=np.int32)  # level[i] holds on [times[i], times[i+1])
    del step
    all_blocked = np.flatnonzero(level[:-1] == nv)
    total_ns = int((times[all_blocked + 1] - times[all_blocked]).sum())
    return total_ns / _NS_PER_MS, per_vcpu


def _time_str(us: int) -> str:
    """QEMU's ``format_time_str`` (after the 10.1 fixes): integer-divide by 1000."""
    units = ("us", "ms", "s")
    i = 0
    while us >= 1000 and i + 1 < len(units):
        us //= 1000
        i += 1
    return f"{us} {units[i]}"


def format_dist(dist: list[int]) -> str:
    """Render non-empty buckets like HMP ``info migrate``'s latency distribution.

    Same ``  [ %8s - %8s ]: %10d`` layout and truncating labels as QEMU
    (so 2^16 us shows as ``65 ms``); QEMU prints every bucket and says ``sec``,
    here empty buckets are skipped and seconds are ``s``.
    """
    lines = [
        f"  [ {_time_str(1 << n):>8} - {_time_str(1 << (n + 1)):>8} ]: {int(c):>10}"
        for n, c in enumerate(dist)
        if c
    ]
    return "\n".join(lines)


def dist_quantile(dist: np.ndarray | list[int], q: float) -> float | None:
    """A latency quantile (us) estimated from QEMU's log2 buckets alone, interpolated geometrically
    inside its bucket (so within a factor of 2): what a live display can know before the per-fault
    records come back at the end of a run. None without faults."""
    counts = np.asarray(dist, dtype=np.float64).ravel()
    total = counts.sum()
    if total <= 0:
        return None
    cum = np.cumsum(counts)
    b = int(np.searchsorted(cum, q * total))
    frac = (q * total - (cum[b] - counts[b])) / counts[b]
    return float(2.0 ** (b + frac)) if b else float(2.0 * frac)
