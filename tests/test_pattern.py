import numpy as np
import pytest

from shmig.pattern import (PAGE, IntegrityResult, ab_increment, check, expected_pages,
                           fill_initial, initial_pages, stamp_pages, zero_mask)

SEED, ZF = 7, 0.25


def make_ram(npages: int, zf: float = ZF) -> np.ndarray:
    ram = np.empty(npages * PAGE, dtype=np.uint8)
    fill_initial(ram, SEED, zf)
    return ram


def test_deterministic_and_seed_dependent():
    pages = np.arange(1000)
    a = initial_pages(SEED, ZF, pages)
    assert np.array_equal(a, initial_pages(SEED, ZF, pages))
    assert not np.array_equal(a, initial_pages(SEED + 1, ZF, pages))
    assert np.array_equal(zero_mask(SEED, ZF, pages), zero_mask(SEED, ZF, pages))


def test_zero_fraction():
    pages = np.arange(100_000)
    assert abs(zero_mask(SEED, 0.1, pages).mean() - 0.1) < 0.02
    assert not zero_mask(SEED, 0.0, pages).any()
    assert zero_mask(SEED, 1.0, pages).all()


def test_nonzero_pages_never_all_zero_and_zero_pages_zero():
    pages = np.arange(20_000)
    init = initial_pages(SEED, ZF, pages)
    zm = zero_mask(SEED, ZF, pages)
    allzero = ~init.any(axis=1)
    assert np.array_equal(allzero, zm)


def test_fill_initial_matches_initial_pages():
    npages = 10_000  # spans chunks, with a partial last chunk
    ram = make_ram(npages)
    assert np.array_equal(ram.reshape(-1, PAGE), initial_pages(SEED, ZF, np.arange(npages)))
    out = np.empty((5, PAGE), dtype=np.uint8)
    assert initial_pages(SEED, ZF, np.arange(5), out=out) is out


def stamped(npages=9000, vcpus=4, ab=False):
    """RAM plus stamps after several vCPUs wrote, some pages more than once."""
    rng = np.random.default_rng(1)
    ram = make_ram(npages)
    r64, r8 = ram.reshape(-1, PAGE).view(np.uint64), ram.reshape(-1, PAGE)
    stamps = np.zeros((vcpus, npages), dtype=np.uint64)
    for seq in range(1, 40):
        v = seq % vcpus
        pages = rng.choice(npages, 500, replace=False)
        if ab:
            ab_increment(r8, pages, v)
            stamps[v, pages] += 1
        else:
            stamp_pages(r64, pages, v, seq)
            stamps[v, pages] = seq
    return ram, stamps


@pytest.mark.parametrize("ab", [False, True])
def test_check_ok(ab):
    ram, stamps = stamped(ab=ab)
    assert (stamps > 1).any()  # some pages written twice
    res = check(ram, SEED, ZF, stamps, ab, chunk_pages=4096)
    assert res == IntegrityResult(True, 9000, 0, None, None)
    assert set(res.to_dict()) == {"ok", "pages_checked", "bad_pages", "first_bad_page", "detail"}
    assert np.array_equal(ram.reshape(-1, PAGE)[100:200],
                          expected_pages(SEED, ZF, np.arange(100, 200), stamps, ab))


def first_nonzero_page(start: int) -> int:
    return start + int(np.flatnonzero(~zero_mask(SEED, ZF, np.arange(start, start + 100)))[0])


def test_check_zeroed_page():
    ram, stamps = stamped()
    p = first_nonzero_page(5000)
    ram[p * PAGE:(p + 1) * PAGE] = 0
    res = check(ram, SEED, ZF, stamps, False)
    assert not res.ok and res.bad_pages == 1 and res.first_bad_page == p
    assert f"page {p} (offset {p * PAGE:#x}): all zero, expected data" in res.detail


def test_check_lost_stamp():
    ram, stamps = stamped()
    p = first_nonzero_page(6000)
    stamps[:, p] = 0
    stamps[2, p] = 77  # vCPU 2 wrote, but the page still holds its initial content
    ram.reshape(-1, PAGE)[p] = initial_pages(SEED, ZF, [p])[0]
    res = check(ram, SEED, ZF, stamps, False)
    assert res.first_bad_page == p and res.bad_pages == 1
    assert "holds its initial content but vCPU 2 wrote stamp 77" in res.detail
    stamps[1, p] = 5  # vCPU 1's write did land; vCPU 2's did not
    stamp_pages(ram.reshape(-1, PAGE).view(np.uint64), [p], 1, 5)
    res = check(ram, SEED, ZF, stamps, False)
    assert "vCPU 2's slot holds" in res.detail and "stamp 77" in res.detail


def test_check_swapped_pages():
    ram, stamps = stamped()
    p, q = first_nonzero_page(3000), first_nonzero_page(7000)
    r = ram.reshape(-1, PAGE)
    r[[p, q]] = r[[q, p]]
    res = check(ram, SEED, ZF, stamps, False)
    assert res.bad_pages == 2 and res.first_bad_page == p
    assert f"holds the content of page {q} (placed at the wrong offset)" in res.detail


def test_check_flipped_byte():
    ram, stamps = stamped()
    p = 4321
    ram[p * PAGE + 1000] ^= 0x10
    res = check(ram, SEED, ZF, stamps, False)
    assert res.bad_pages == 1 and res.first_bad_page == p
    assert "1 of 512 words differ, first at byte offset 0x3e8" in res.detail


def test_ab_wraparound():
    npages, v = 64, 3
    ram = make_ram(npages)
    r8 = ram.reshape(-1, PAGE)
    stamps = np.zeros((4, npages), dtype=np.uint64)
    pages = np.arange(0, npages, 2)
    for _ in range(300):
        ab_increment(r8, pages, v)
    stamps[v, pages] = 300
    init = initial_pages(SEED, ZF, pages)
    assert np.array_equal(r8[pages, v], (init[:, v].astype(int) + 300) % 256)
    assert check(ram, SEED, ZF, stamps, True).ok
    stamps[v, 0] = 299
    res = check(ram, SEED, ZF, stamps, True)
    assert res.bad_pages == 1 and "vCPU 3 incremented it 299 times" in res.detail
