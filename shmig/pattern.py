"""Expected guest RAM, derived never copied.

Each page's initial content is a cheap function of (seed, page index); guest
writes only touch the writing vCPU's own slot, so the expected RAM can be
regenerated chunk by chunk from the seed plus the per-vCPU stamp arrays.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .config import MAX_VCPUS, TARGET_PAGE as PAGE
from .memfd import MemfdRam

WORDS = PAGE // 8
CHUNK_PAGES = 4096  # 16 MiB per chunk: bounded memory, big enough to amortise numpy overhead

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_C1, _C2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
# word j of a non-zero page = hash + j*K; K odd so the 512 words are distinct -> never all zero
_JK = np.arange(WORDS, dtype=np.uint64) * np.uint64(_GOLDEN)
_ZERO_BITS = 24  # zero decision on the top 24 bits: exact for any fraction with 2^-24 resolution


def _mix_py(z: int) -> int:
    """splitmix64 finalizer on a Python int (for scalars, no overflow warnings)."""
    z = ((z ^ (z >> 30)) * _C1) & _M64
    z = ((z ^ (z >> 27)) * _C2) & _M64
    return z ^ (z >> 31)


def _unxorshift(y: int, s: int) -> int:
    x = y
    for _ in range(64 // s + 1):
        x = y ^ (x >> s)
    return x


def _unmix_py(h: int) -> int:
    """Inverse of _mix_py: lets the checker tell which page a misplaced page came from."""
    z = _unxorshift(h, 31)
    z = (z * pow(_C2, -1, 1 << 64)) & _M64
    z = _unxorshift(z, 27)
    z = (z * pow(_C1, -1, 1 << 64)) & _M64
    return _unxorshift(z, 30)


def _seed_off(seed: int) -> int:
    return _mix_py((seed * _GOLDEN + 0x632BE59BD9B4E019) & _M64)


def page_hash(seed: int, pages: np.ndarray) -> np.ndarray:
    """Per-page uint64 hash = splitmix64(seed_offset + page*GOLDEN), wrapping."""
    z = np.asarray(pages).astype(np.uint64) * np.uint64(_GOLDEN) + np.uint64(_seed_off(seed))
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_C1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_C2)
    return z ^ (z >> np.uint64(31))


def _page_of_hash(seed: int, h: int) -> int:
    return ((_unmix_py(h) - _seed_off(seed)) * pow(_GOLDEN, -1, 1 << 64)) & _M64


def _zero_from_hash(h: np.ndarray, zero_fraction: float) -> np.ndarray:
    thr = round(min(max(zero_fraction, 0.0), 1.0) * (1 << _ZERO_BITS))
    return (h >> np.uint64(64 - _ZERO_BITS)) < np.uint64(thr)


def zero_mask(seed: int, zero_fraction: float, pages: np.ndarray) -> np.ndarray:
    """True for pages whose initial content is all zero (deterministic per seed, page)."""
    return _zero_from_hash(page_hash(seed, pages), zero_fraction)


def initial_pages(seed: int, zero_fraction: float, pages: np.ndarray,
                  out: np.ndarray | None = None) -> np.ndarray:
    """uint8 [len(pages), 4096] initial content; written into `out` to reuse buffers."""
    pages = np.asarray(pages)
    if out is None:
        out = np.empty((len(pages), PAGE), dtype=np.uint8)
    o64 = out.view(np.uint64)
    h = page_hash(seed, pages)
    np.add(h[:, None], _JK[None, :], out=o64)
    o64[_zero_from_hash(h, zero_fraction)] = 0
    return out


def fill_initial(ram: np.ndarray, seed: int, zero_fraction: float) -> None:
    """Fill a whole flat uint8 RAM array in place, 16 MiB at a time."""
    ram2d = ram.reshape(-1, PAGE)
    for a in range(0, len(ram2d), CHUNK_PAGES):
        b = min(a + CHUNK_PAGES, len(ram2d))
        initial_pages(seed, zero_fraction, np.arange(a, b), out=ram2d[a:b])


def stamp_pages(ram_u64_2d: np.ndarray, pages: np.ndarray, vcpu: int, stamp: int) -> None:
    """Guest write: vCPU `vcpu` stores `stamp` into its own word of each page."""
    ram_u64_2d[pages, vcpu] = np.uint64(stamp)


def ab_increment(ram_u8_2d: np.ndarray, pages: np.ndarray, vcpu: int) -> None:
    """`ab` guest write: increment byte `vcpu` of each page (no duplicates in `pages`)."""
    ram_u8_2d[pages, vcpu] += np.uint8(1)


def _apply_stamps(out: np.ndarray, s: np.ndarray, ab: bool) -> None:
    """Apply stamps s [vcpus, n] to expected pages out uint8 [n, 4096]."""
    v = s.shape[0]
    if v == 0:
        return
    assert v <= MAX_VCPUS, "at most 64 vCPUs have a stamp slot"
    st = s.T
    if ab:
        out[:, :v] += (st & np.uint64(0xFF)).astype(np.uint8)
    else:
        o64 = out.view(np.uint64)
        o64[:, :v] = np.where(st != 0, st, o64[:, :v])


def expected_pages(seed: int, zero_fraction: float, pages: np.ndarray, stamps: np.ndarray,
                   ab: bool, out: np.ndarray | None = None) -> np.ndarray:
    """Initial content of `pages` with every vCPU's writes applied."""
    out = initial_pages(seed, zero_fraction, pages, out)
    _apply_stamps(out, np.asarray(stamps)[:, pages], ab)
    return out


@dataclass
class IntegrityResult:
    ok: bool
    pages_checked: int
    bad_pages: int
    first_bad_page: int | None
    detail: str | None

    def to_dict(self) -> dict:
        return asdict(self)


def _describe(p: int, found: np.ndarray, exp: np.ndarray, seed: int, zero_fraction: float,
              s: np.ndarray, ab: bool, npages: int) -> str:
    """One line saying how page p differs, guessing the likely cause."""
    f64, e64 = found.view(np.uint64), exp.view(np.uint64)
    head = f"page {p} (offset {p * PAGE:#x})"
    if not f64.any():
        return f"{head}: all zero, expected data (never placed?)"
    w = int(f64[WORDS - 1])
    if w != int(e64[WORDS - 1]):  # word 511 is never stamped: it names the page
        q = _page_of_hash(seed, (w - (WORDS - 1) * _GOLDEN) & _M64)
        if q < npages and q != p:
            return f"{head}: holds the content of page {q} (placed at the wrong offset)"
    init = initial_pages(seed, zero_fraction, np.array([p]))[0]
    vs = np.flatnonzero(s & np.uint64(0xFF) if ab else s)
    if vs.size and (found == init).all():
        v = int(vs[0])
        what = f"incremented it {int(s[v])} times" if ab else f"wrote stamp {int(s[v])}"
        return (f"{head}: holds its initial content but vCPU {v} {what} "
                "(a write was lost: stale page, a discard that did not happen?)")
    diff = np.flatnonzero(f64 != e64)
    nv = s.shape[0]
    if diff[-1] < ((nv + 7) // 8 if ab else nv):  # only vCPU slots differ
        lost = "(a write was lost: stale page, a discard that did not happen?)"
        if ab:
            v = int(np.flatnonzero(found[:nv] != exp[:nv])[0])
            return (f"{head}: vCPU {v} incremented it {int(s[v])} times but its byte is "
                    f"{int(found[v])}, expected {int(exp[v])} {lost}")
        v = int(diff[0])
        return f"{head}: vCPU {v}'s slot holds {int(f64[v])} but it wrote stamp {int(s[v])} {lost}"
    i = int(diff[0])
    return (f"{head}: {diff.size} of {WORDS} words differ, first at byte offset {i * 8:#x}: "
            f"expected {int(e64[i]):#018x} found {int(f64[i]):#018x}")


def check(ram: np.ndarray | MemfdRam, seed: int, zero_fraction: float, stamps: np.ndarray, ab: bool,
          chunk_pages: int = CHUNK_PAGES) -> IntegrityResult:
    """Regenerate expected RAM chunk by chunk and compare it with `ram` (flat uint8, or a memfd
    read by pread: a page never placed reads as zeros and stays missing, see shmig.memfd)."""
    if isinstance(ram, MemfdRam):
        npages, memfd = ram.size // PAGE, ram
        got_buf = np.empty((min(chunk_pages, npages), PAGE), dtype=np.uint8)

        def pages(a: int, b: int) -> np.ndarray:
            return memfd.read_pages(a * PAGE, (b - a) * PAGE, out=got_buf[: b - a])
    else:
        ram2d = ram.reshape(-1, PAGE)
        npages = len(ram2d)

        def pages(a: int, b: int) -> np.ndarray:
            return ram2d[a:b]
    stamps = np.asarray(stamps, dtype=np.uint64).reshape(-1, npages)
    buf = np.empty((min(chunk_pages, npages), PAGE), dtype=np.uint8)
    neq = np.empty((len(buf), WORDS), dtype=bool)
    bad, first, detail = 0, None, None
    for a in range(0, npages, chunk_pages):
        b = min(a + chunk_pages, npages)
        exp = initial_pages(seed, zero_fraction, np.arange(a, b), out=buf[: b - a])
        _apply_stamps(exp, stamps[:, a:b], ab)
        got = pages(a, b).reshape(-1, PAGE)
        rows = np.flatnonzero(np.not_equal(got.view(np.uint64), exp.view(np.uint64),
                                           out=neq[: b - a]).any(axis=1))
        if rows.size and first is None:
            first = a + int(rows[0])
            detail = _describe(first, got[rows[0]], exp[rows[0]], seed, zero_fraction,
                               stamps[:, first], ab, npages)
        bad += rows.size
    return IntegrityResult(bad == 0, npages, bad, first, detail)
