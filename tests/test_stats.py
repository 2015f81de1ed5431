"""Hand-computed checks of QEMU-compatible postcopy statistics."""

import numpy as np
import pytest

from shmig.stats import BUCKETS, blocktime, format_dist, latency_dist, latency_summary

MS = 1_000_000


def iv(*pairs):
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def bucket_of(ns):
    d = latency_dist(np.array([ns], dtype=np.int64))
    assert sum(d) == 1
    return d.index(1)


# --- latency_dist ---------------------------------------------------------

@pytest.mark.parametrize(
    "ns,bucket",
    [
        (0, 0), (999, 0),            # 0 us -> bucket 0
        (1000, 0), (1999, 0),        # 1 us
        (2000, 1), (3999, 1),        # 2..3 us
        (4000, 2),
        (127_000, 6), (127_999, 6),
        (128_000, 7),
        ((1 << 23) * 1000, 23),
        ((1 << 24) * 1000 - 1, 23),  # 2^24 us - 1 ns = 2^24-1 us
        ((1 << 24) * 1000, 23),      # clamp
        (10**15, 23),
        (2**62, 23),
    ],
)
def test_bucket_boundaries(ns, bucket):
    assert bucket_of(ns) == bucket


def test_bucket_just_below_power_of_two():
    assert bucket_of(((1 << 22) - 1) * 1000) == 21
    assert bucket_of((1 << 22) * 1000) == 22


def test_dist_counts_and_empty():
    d = latency_dist(np.array([0, 1500, 2500, 3500, 70_000, 200_000], dtype=np.int64))
    assert len(d) == BUCKETS == 24
    assert d[0] == 2 and d[1] == 2 and d[6] == 1 and d[7] == 1 and sum(d) == 6
    assert all(isinstance(c, int) for c in d)
    assert latency_dist(np.array([], dtype=np.int64)) == [0] * 24


# --- latency_summary ------------------------------------------------------

def test_summary_known_array():
    s = latency_summary(np.array([1000, 2000, 3000, 4000, 10000], dtype=np.int64))
    # us = [1,2,3,4,10]; p90 at rank 3.6 -> 4 + 0.6*6 = 7.6; p99 at 3.96 -> 9.76
    assert s == {"count": 5, "mean": 4.0, "p50": 3.0, "p90": 7.6, "p99": 9.8, "max": 10.0}
    assert isinstance(s["count"], int)


def test_summary_sub_us_rounding():
    s = latency_summary(np.array([1234, 5678], dtype=np.int64))
    assert s["mean"] == 3.5 and s["max"] == 5.7 and s["p50"] == 3.5


def test_summary_empty():
    assert latency_summary(np.array([], dtype=np.int64)) == {
        "count": 0, "mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}


# --- blocktime ------------------------------------------------------------

def test_one_vcpu_total_is_sum():
    assert blocktime([iv((0, 1 * MS), (2 * MS, 5 * MS))]) == (4.0, [4.0])


def test_two_vcpus_partial_overlap():
    # v0 [0,10], v1 [4,15] -> all blocked [4,10] = 6 ms
    assert blocktime([iv((0, 10 * MS)), iv((4 * MS, 15 * MS))]) == (6.0, [10.0, 11.0])


def test_nested_intervals():
    # v1's two faults lie inside v0's: all blocked 1 + 3 ms
    total, per = blocktime([iv((0, 10 * MS)), iv((2 * MS, 3 * MS), (5 * MS, 8 * MS))])
    assert (total, per) == (4.0, [10.0, 4.0])


def test_three_vcpus_and_unsorted_input():
    v0 = iv((0, 10 * MS))
    v1 = iv((20 * MS, 21 * MS), (2 * MS, 6 * MS))  # unsorted on purpose
    v2 = iv((5 * MS, 9 * MS))
    assert blocktime([v0, v1, v2]) == (1.0, [10.0, 5.0, 4.0])  # [5,6]


def test_touching_intervals_are_continuous():
    # v0 blocked [0,2] then [2,5] back to back; v1 [1,4] -> all blocked [1,4]
    total, per = blocktime([iv((0, 2 * MS), (2 * MS, 5 * MS)), iv((1 * MS, 4 * MS))])
    assert (total, per) == (3.0, [5.0, 3.0])
    # touching across vCPUs: v0 ends when v1 starts -> never all blocked
    assert blocktime([iv((0, 2 * MS)), iv((2 * MS, 4 * MS))]) == (0.0, [2.0, 2.0])


def test_unresolved_with_end_ns():
    v0, v1 = iv((0, -1)), iv((3 * MS, 7 * MS))
    assert blocktime([v0, v1], end_ns=10 * MS) == (4.0, [10.0, 4.0])


def test_unresolved_without_end_ns_is_dropped():
    v0, v1 = iv((0, -1)), iv((3 * MS, 7 * MS))
    assert blocktime([v0, v1]) == (0.0, [0.0, 4.0])
    # only the open fault is dropped, resolved ones still count
    v0 = iv((0, 5 * MS), (6 * MS, -1))
    assert blocktime([v0, v1]) == (2.0, [5.0, 4.0])


def test_empty_inputs():
    assert blocktime([]) == (0.0, [])
    empty = np.empty((0, 2), dtype=np.int64)
    assert blocktime([empty, empty, empty]) == (0.0, [0.0, 0.0, 0.0])
    # one vCPU never faults -> never all blocked, per-vCPU still reported
    assert blocktime([iv((0, 3 * MS)), empty]) == (0.0, [3.0, 0.0])


def test_fractional_ms():
    assert blocktime([iv((0, 1500))]) == (0.0015, [0.0015])


# --- format_dist ----------------------------------------------------------

def test_format_dist():
    d = [0] * 24
    d[6], d[9], d[10], d[15], d[20], d[23] = 5, 7, 42, 3, 1, 2
    assert format_dist(d).splitlines() == [
        "  [    64 us -   128 us ]:          5",
        "  [   512 us -     1 ms ]:          7",
        "  [     1 ms -     2 ms ]:         42",
        "  [    32 ms -    65 ms ]:          3",
        "  [      1 s -      2 s ]:          1",
        "  [      8 s -     16 s ]:          2",
    ]


def test_format_dist_empty():
    assert format_dist([0] * 24) == ""
