"""What the userfaultfd layer costs and gains, measured on this machine (issue 20; not run in CI).

    python tools/uffd_bench.py                  # the figures quoted in the uffd branch's report
    python tools/uffd_bench.py --quick          # seconds: smaller sizes, fewer round trips
    python tools/uffd_bench.py --json out.json

1. Fault round trip: a forked vCPU reads a missing page of a memfd it registered with its own uffd;
   a forked placer polls the uffd it was passed, reads the event and UFFDIO_COPYs the page; the
   vCPU times the read (p50/p90 over N distinct pages). Beside it, bench.baselines.pipe_rtt_us:
   a one-byte ping-pong between two forked processes over two pipes. Both pinned to one CPU
   ("same CPU") and to two ("other CPU"). The placer's own share (event read to copy done) is
   shown too.
2. UFFDIO_COPY throughput (GB/s, 10^9 bytes/s) into a fresh memfd at 4 KiB, 64 KiB and 2 MiB per
   ioctl, and 2 MiB into hugetlb pages when the pool can be raised (it is restored afterwards);
   beside it the bitmap backend's placement, a numpy copy into populated shared memory.
3. Guest speed on pages it already has, in accesses per second of the vCPU's CPU time: shmig's
   own ``Vcpu.run_chunk`` (the bitmap backend: receivedmap checked in numpy before each chunk of
   64) against the same vCPU's ``write`` + ``count`` straight into a uffd-registered memfd whose
   every page is placed (the uffd backend: no check, a fault is the kernel's business), with
   chunks of 64 and larger, timing each chunk (the vCPU's own view of a stall).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.baselines import _fork, _reap, cpu_pair, pinned, pipe_rtt_us  # noqa: E402
from shmig import memfd, uffd  # noqa: E402
from shmig.config import Config  # noqa: E402
from shmig.memfd import MemfdRam  # noqa: E402
from shmig.uffd import Uffd  # noqa: E402

PAGE = 4096
HUGE = 2 << 20


# -- 1. fault round trip ---------------------------------------------------------------------------
def fault_rtt_us(n: int, cpus: tuple[int, int], warmup: int = 100) -> dict[str, float]:
    """p50/p90 of a userfault served by another process, from the faulting vCPU's side (us), and
    the placer's share (event read -> UFFDIO_COPY returned)."""
    total = n + warmup
    ram = MemfdRam(total * PAGE, "shmig-bench-rtt")
    a, b = socket.socketpair()
    res_r, res_w = os.pipe()
    srv_r, srv_w = os.pipe()

    def vcpu() -> None:
        os.sched_setaffinity(0, {cpus[0]})
        u = Uffd.open()
        u.register(ram.base, ram.size)
        uffd.send_uffd(b, u)  # and keeps its own reference
        b.recv(1)
        mv = ram.array.data
        t = np.empty(total, np.int64)
        clock = time.perf_counter_ns
        for i in range(total):
            t0 = clock()
            mv[i * PAGE]  # a user-mode read of a missing page: blocks in the kernel
            t[i] = clock() - t0
        os.write(res_w, t[warmup:].tobytes())

    def placer() -> None:
        os.sched_setaffinity(0, {cpus[1]})
        u = uffd.recv_uffd(a)
        src = np.full(PAGE, 0x5A, np.uint8)
        addr = uffd.buffer_address(src)
        p = select.poll()
        p.register(u.fd, select.POLLIN)
        s = np.empty(total, np.int64)
        a.send(b"g")
        done = 0
        while done < total:
            p.poll(-1)
            for f in u.read():
                u.copy(f.address, addr, PAGE)
                s[done] = time.monotonic_ns() - f.read_ns
                done += 1
        os.write(srv_w, s[warmup:].tobytes())

    pids = [_fork(vcpu), _fork(placer)]
    try:
        lat = np.frombuffer(_read_all(res_r, n * 8), np.int64) / 1e3
        srv = np.frombuffer(_read_all(srv_r, n * 8), np.int64) / 1e3
    finally:
        for pid in pids:
            _reap(pid, "uffd round trip")
        for fd in (res_r, res_w, srv_r, srv_w):
            os.close(fd)
        a.close()
        b.close()
        ram.close()
    p50, p90 = np.percentile(lat, [50, 90])
    return {"p50": float(p50), "p90": float(p90), "placer_p50": float(np.percentile(srv, 50))}


def _read_all(fd: int, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = os.read(fd, n - len(out))
        if not chunk:
            raise RuntimeError(f"uffd_bench: a measuring process ended after {len(out)} of {n} bytes")
        out += chunk
    return out


# -- 2. UFFDIO_COPY throughput ---------------------------------------------------------------------
def copy_gbs(per_copy: int, total: int, hugetlb: bool, repeat: int = 3) -> float:
    """Best of ``repeat``: UFFDIO_COPY of ``total`` bytes into a fresh memfd, ``per_copy`` each."""
    best = float("inf")
    src = np.random.default_rng(1).integers(0, 255, per_copy, np.uint8)
    addr = uffd.buffer_address(src)
    for _ in range(repeat):
        with MemfdRam(total, "shmig-bench-copy", HUGE if hugetlb else None) as ram, Uffd.open() as u:
            u.register(ram.base, ram.size, ram.page_size)
            t0 = time.perf_counter()
            for off in range(0, total, per_copy):
                u.copy(u.base + off, addr, per_copy)
            best = min(best, time.perf_counter() - t0)
    return total / best / 1e9


def numpy_place_gbs(per_copy: int, total: int, repeat: int = 3) -> float:
    """The bitmap backend's placement: a numpy copy into populated shared memory."""
    best = float("inf")
    src = np.random.default_rng(1).integers(0, 255, per_copy, np.uint8)
    with MemfdRam(total, "shmig-bench-numpy") as ram:
        dst = ram.array
        dst[::PAGE] = 1  # populated up front, as GuestMemory is
        for _ in range(repeat):
            t0 = time.perf_counter()
            for off in range(0, total, per_copy):
                dst[off:off + per_copy] = src
            best = min(best, time.perf_counter() - t0)
        del dst
    return total / best / 1e9


class hugetlb_pages:
    """``with hugetlb_pages(n) as ok:`` n free 2 MiB hugetlb pages, the pool restored afterwards."""

    def __init__(self, n: int):
        self.n = n
        self.old: int | None = None

    def __enter__(self) -> bool:
        pool = memfd.hugetlb_pool(HUGE)
        if pool is None:
            return False
        if pool.available < self.n:
            try:
                with open(f"{pool.path}/nr_hugepages", "w") as f:
                    f.write(str(pool.total + self.n - pool.available))
                self.old, self.path = pool.total, f"{pool.path}/nr_hugepages"
            except OSError:
                return False
        got = memfd.hugetlb_pool(HUGE)
        return got is not None and got.available >= self.n

    def __exit__(self, *exc: object) -> None:
        if self.old is not None:
            with open(self.path, "w") as f:
                f.write(str(self.old))


# -- 3. guest speed on present pages ----------------------------------------------------------------
def guest_rates(ram_bytes: int, seconds: float, workload: str) -> dict[str, float]:
    """Accesses per second of vCPU (thread) time on pages already there, both backends."""
    from shmig import guest, memory
    from tests.rig import Rig  # the in-process child rig: a real Vcpu over real shared memory

    rig = Rig(Config(ram=ram_bytes, workload=workload, mode="preempt"))
    mem = rig.mem
    _, w = rig.pipe()
    v = rig.child(guest.Vcpu, {"fault": w})
    placed = MemfdRam(ram_bytes, "shmig-bench-guest")
    u = Uffd.open()
    out: dict[str, float] = {}
    try:
        v.stream.on_destination()
        mem.received[:] = 1
        u.register(placed.base, placed.size)
        for off in range(0, ram_bytes, HUGE):  # every page placed through the uffd, as at the end of postcopy
            u.copy(u.base + off, uffd.buffer_address(mem.src[off:off + HUGE]), HUGE)
        phase = memory.RUN_DST

        def timed(step: Callable[[], int]) -> float:
            step()
            n, t0 = 0, time.thread_time()
            while time.thread_time() - t0 < seconds:
                for _ in range(32):
                    n += step()
            return n / (time.thread_time() - t0)

        out["bitmap"] = timed(lambda: v.run_chunk(phase))
        shm_dst = mem.dst
        mem.dst = placed.array  # the vCPU now writes the uffd-registered memfd
        try:
            stalls: list[int] = []

            def uffd_chunk(chunk: int) -> Callable[[], int]:
                def step() -> int:
                    t0 = time.monotonic_ns()
                    pages = v.stream.next_chunk(chunk)
                    v.write(pages, phase)
                    v.count(len(pages), phase)
                    if time.monotonic_ns() - t0 > 1_000_000:  # the vCPU's own view of a stall (none here)
                        stalls.append(t0)
                    return len(pages)
                return step

            for chunk in (64, 1024, 4096):
                out[f"uffd_chunk{chunk}"] = timed(uffd_chunk(chunk))
            assert not u.read(), "a fault on a page that was placed"
        finally:
            mem.dst = shm_dst
    finally:
        u.close()
        placed.close()
        v.__dict__.clear()  # its views of shared memory go before the segments close
        rig.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run in seconds")
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args()
    uffd.probe()  # one line and exit if userfaultfd is not permitted
    q = args.quick
    n_rtt = 300 if q else 3000
    total = (16 if q else 256) << 20
    res: dict[str, Any] = {"kernel": os.uname().release}
    pair = cpu_pair()
    cpu_sets = {"same CPU": (pair[0], pair[0]) if pair else (0, 0)}
    if pair:
        cpu_sets["other CPU"] = pair
    for name, cpus in cpu_sets.items():
        with pinned(cpus[0]):
            pipe = pipe_rtt_us(n_rtt, cpus=cpus)
        f = fault_rtt_us(n_rtt, cpus)
        res[f"rtt {name}"] = {"pipe_p50_us": round(pipe["p50"], 1), "uffd_p50_us": round(f["p50"], 1),
                              "uffd_p90_us": round(f["p90"], 1), "placer_p50_us": round(f["placer_p50"], 1),
                              "uffd_minus_pipe_us": round(f["p50"] - pipe["p50"], 1)}
        print(f"fault round trip, {name}: uffd p50 {f['p50']:.1f} us (p90 {f['p90']:.1f}; placer's share"
              f" {f['placer_p50']:.1f}), pipe p50 {pipe['p50']:.1f} us: +{f['p50'] - pipe['p50']:.1f} us")
    for per in (PAGE, 64 << 10, HUGE):
        g, base = copy_gbs(per, total, False), numpy_place_gbs(per, total)
        res[f"copy {per >> 10} KiB shmem GB/s"] = round(g, 2)
        res[f"numpy place {per >> 10} KiB GB/s"] = round(base, 2)
        print(f"UFFDIO_COPY {per >> 10:>5} KiB per ioctl into shmem: {g:5.2f} GB/s"
              f"   (numpy copy into populated shmem: {base:5.2f} GB/s)")
    with hugetlb_pages(total // HUGE) as ok:
        if ok:
            g = copy_gbs(HUGE, total, True)
            res["copy 2048 KiB hugetlb GB/s"] = round(g, 2)
            print(f"UFFDIO_COPY  2048 KiB per ioctl into hugetlb: {g:5.2f} GB/s")
        else:
            print("UFFDIO_COPY into hugetlb: skipped (cannot raise the 2 MiB pool)")
    for workload in ("random", "sequential"):
        rates = guest_rates((32 if q else 128) << 20, 0.3 if q else 2.0, workload)
        res[f"guest {workload} accesses/s"] = {k: round(v) for k, v in rates.items()}
        best = max(v for k, v in rates.items() if k != "bitmap")
        print(f"guest on present pages, {workload}: bitmap {rates['bitmap'] / 1e6:.2f} M accesses/s of vCPU time; uffd "
              + ", ".join(f"chunk {k[10:]}: {v / 1e6:.2f} M" for k, v in rates.items() if k != "bitmap")
              + f" ({best / rates['bitmap']:.1f}x at best, {rates['uffd_chunk64'] / rates['bitmap']:.1f}x at 64)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
