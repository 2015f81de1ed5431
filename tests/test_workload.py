import numpy as np
import pytest

from shmig.workload import WORKLOADS, AccessStream


def take(s: AccessStream, n: int, chunk: int = 256) -> np.ndarray:
    return np.concatenate([s.next_chunk(chunk) for _ in range(n // chunk)])


@pytest.mark.parametrize("w", WORKLOADS)
def test_deterministic_and_in_range(w):
    a = take(AccessStream(w, 1000, 1, 4, 9), 4096)
    b = take(AccessStream(w, 1000, 1, 4, 9), 4096)
    assert np.array_equal(a, b) and a.dtype == np.int64
    assert ((a >= 0) & (a < 1000)).all()
    if w in ("random", "hotset"):
        assert not np.array_equal(a, take(AccessStream(w, 1000, 1, 4, 10), 4096))
        assert not np.array_equal(a, take(AccessStream(w, 1000, 2, 4, 9), 4096))


def test_idle_empty():
    s = AccessStream("idle", 1000, 0, 1, 0)
    assert s.next_chunk(100).size == 0 and s.passes == 0


def test_sequential_slices_and_wrap():
    wss, vcpus = 1003, 4
    for v in range(vcpus):
        s = AccessStream("sequential", wss, v, vcpus, 0)
        lo, hi = v * 250, (1003 if v == 3 else (v + 1) * 250)
        got = np.concatenate([s.next_chunk(97) for _ in range(10)])  # chunks wrap
        start = got[0] - lo  # a seeded point in the sweep, the same for the same seed
        assert 0 <= start < hi - lo
        assert start == AccessStream("sequential", wss, v, vcpus, 0).next_chunk(1)[0] - lo
        want = lo + (start + np.arange(970)) % (hi - lo)
        assert np.array_equal(got, want)
        assert s.passes == 970 // (hi - lo)


def test_ab_chunks_within_a_pass():
    s = AccessStream("ab", 1000, 2, 3, 0)  # slice [666, 1000), 334 pages
    seen = []
    for _ in range(20):
        c = s.next_chunk(100)
        assert len(np.unique(c)) == len(c) and np.all(np.diff(c) == 1)
        seen.append(c)
    allp = np.concatenate(seen)
    assert allp.min() == 666 and allp.max() == 999
    assert [len(c) for c in seen[:4]] == [100, 100, 100, 34]
    assert s.passes == len(allp) // 334


def test_hotset_concentration():
    s = AccessStream("hotset", 10_000, 0, 2, 5)
    a = take(s, 200_000)
    hot = (a < 1000).mean()  # 0.9 + 0.1 * 0.1
    assert abs(hot - 0.91) < 0.03
    assert a.max() > 9000


def test_cheap():
    import time
    for w in WORKLOADS:
        s = AccessStream(w, 1 << 20, 0, 4, 1)
        t = time.perf_counter()
        for _ in range((1 << 20) // 256):
            s.next_chunk(256)
        assert time.perf_counter() - t < 1.0, w


def test_random_stream_restarts_on_the_destination_whatever_ran_before():
    a = AccessStream("random", 1000, 0, 1, seed=7)
    b = AccessStream("random", 1000, 0, 1, seed=7)
    a.next_chunk(5)
    b.next_chunk(50)  # a source phase of another length
    a.on_destination()
    b.on_destination()
    assert (a.next_chunk(20) == b.next_chunk(20)).all()
    s = AccessStream("sequential", 1000, 0, 1, seed=7)
    first = s.next_chunk(3)
    s.on_destination()  # a sweep keeps its place
    assert s.next_chunk(1)[0] == (first[-1] + 1) % 1000
