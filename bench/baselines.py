"""Baselines, measured in the same run as the figures they are compared with.

* ``pipe_throughput``: one forked process writes N bytes in 1 MiB writes into one pipe enlarged to
  1 MiB (``F_SETPIPE_SZ``); this process reads them with ``os.readv`` into one preallocated 1 MiB
  buffer. The fastest a byte can cross between two processes here, i.e. the ceiling of shmig's
  data path. Where the scheduler puts the two matters a lot on a VM (same CPU: cache-hot and no
  cross-CPU wake-ups; measured here ~45-50 Gbit/s against ~13 on two CPUs), so it can be pinned.
* ``pipe_rtt_us``: two forked processes ping-pong one byte over two pipes; the median of many round
  trips. The floor of shmig's fault path, which crosses four processes and four pipes/eventfds.
  Optionally pinned to two different CPUs, to show what a cross-CPU wake-up costs here.
* ``memcpy_seconds``: numpy copy of N bytes between two already touched arrays.
* ``numpy_first_touch_seconds``: ``np.empty`` plus a write to every 4 KiB page, the cost shmig's
  shared-memory prefault is compared with (optionally without transparent huge pages).

Rates are in Gbit/s (10^9 bits per second), like the report's ``throughput_mbps`` (Mbit/s).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import statistics
import sys
import time
import traceback
from typing import Callable

import numpy as np

F_SETPIPE_SZ = 1031
MADV_NOHUGEPAGE = 15
_libc = ctypes.CDLL(None, use_errno=True)
CHUNK = 1 << 20
PAGE = 4096


def gbps(nbytes: float, seconds: float) -> float:
    return nbytes * 8 / seconds / 1e9


def _fork(fn: Callable[[], None]) -> int:
    """Run ``fn`` in a forked child that never returns into pytest."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stderr.flush()
            finally:
                os._exit(code)
    return pid


def _reap(pid: int, what: str) -> None:
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{what} baseline process exited with {code}")


def pipe_max() -> int:
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            return int(f.read())
    except OSError:
        return CHUNK


def pipe_throughput(nbytes: int, chunk: int = CHUNK, cpus: tuple[int, int] | None = None) -> float:
    """Seconds to move ``nbytes`` from a forked writer to this process through one pipe.

    ``cpus`` pins (writer, reader) to these CPUs for the transfer (this process's affinity is
    restored afterwards); by default the scheduler places them.
    """
    if cpus is not None:
        with pinned(cpus[1]):
            return _pipe_throughput(nbytes, chunk, cpus[0])
    return _pipe_throughput(nbytes, chunk, None)


def _pipe_throughput(nbytes: int, chunk: int, writer_cpu: int | None) -> float:
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, min(chunk, pipe_max()))
    except OSError:
        pass

    def writer() -> None:
        if writer_cpu is not None:
            os.sched_setaffinity(0, {writer_cpu})
        os.close(r)
        os.close(go_w)
        src = memoryview(bytearray(b"\x5a" * chunk))
        os.read(go_r, 1)
        left = nbytes
        while left:
            left -= os.write(w, src[:min(chunk, left)])

    pid = _fork(writer)
    os.close(w)
    os.close(go_r)
    buf = memoryview(bytearray(chunk))
    got = 0
    try:
        t0 = time.perf_counter()
        os.write(go_w, b"g")
        while got < nbytes:
            n = os.readv(r, [buf])
            if n == 0:
                break
            got += n
        t1 = time.perf_counter()
    finally:
        os.close(r)
        os.close(go_w)
        _reap(pid, "pipe writer")
    if got != nbytes:
        raise RuntimeError(f"pipe baseline: read {got} of {nbytes} bytes")
    return t1 - t0


def pipe_rtt_us(n: int = 2000, warmup: int = 100, cpus: tuple[int, int] | None = None) -> dict[str, float]:
    """One-byte round trips between two forked processes over two pipes: median (and p90) in us.

    ``cpus`` pins the two processes to these CPUs (e.g. (0, 1): every wake-up crosses CPUs);
    by default the scheduler places them, usually on one CPU, as a sync wake-up invites it to.
    """
    ping_r, ping_w = os.pipe()
    pong_r, pong_w = os.pipe()
    res_r, res_w = os.pipe()
    total = n + warmup

    def pin(i: int) -> None:
        if cpus is not None:
            os.sched_setaffinity(0, {cpus[i]})

    def echo() -> None:
        pin(0)
        for _ in range(total):
            os.read(ping_r, 1)
            os.write(pong_w, b"o")

    def pinger() -> None:
        pin(1)
        t = np.empty(total, np.int64)
        clock = time.perf_counter_ns
        for i in range(total):
            t0 = clock()
            os.write(ping_w, b"i")
            os.read(pong_r, 1)
            t[i] = clock() - t0
        data = t[warmup:].tobytes()
        view = memoryview(data)
        while view:
            view = view[os.write(res_w, view):]

    pids = [_fork(echo), _fork(pinger)]
    for fd in (ping_r, ping_w, pong_r, pong_w, res_w):
        os.close(fd)
    chunks = []
    try:
        while True:
            b = os.read(res_r, 1 << 16)
            if not b:
                break
            chunks.append(b)
    finally:
        os.close(res_r)
        for pid in pids:
            _reap(pid, "pipe round trip")
    ns = np.frombuffer(b"".join(chunks), np.int64)
    if ns.size != n:
        raise RuntimeError(f"pipe round trip baseline: got {ns.size} of {n} samples")
    p50, p90 = np.percentile(ns, [50, 90]) / 1e3
    return {"p50": float(p50), "p90": float(p90)}


def memcpy_seconds(nbytes: int, repeat: int = 3) -> float:
    """Fastest of ``repeat`` numpy copies of ``nbytes`` between two touched arrays."""
    src = np.ones(nbytes, np.uint8)
    dst = np.zeros(nbytes, np.uint8)
    dst.fill(1)  # np.zeros may be lazily mapped: touch it before timing
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return best


def numpy_first_touch_seconds(nbytes: int, huge: bool = True) -> float:
    """A plain allocation of ``nbytes`` and one write per 4 KiB page (the first touch), then freed.

    ``huge=False`` forbids transparent huge pages on it first (MADV_NOHUGEPAGE), so every 4 KiB
    page faults on its own, as in tmpfs without huge pages.
    """
    t0 = time.perf_counter()
    a = np.empty(nbytes, np.uint8)
    if not huge:
        lo = a.ctypes.data & ~(PAGE - 1)
        _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(a.ctypes.data + nbytes - lo), MADV_NOHUGEPAGE)
    a[::PAGE] = 1
    dt = time.perf_counter() - t0
    del a
    return dt


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def thp_setting(which: str) -> str:
    """The bracketed value of /sys/kernel/mm/transparent_hugepage/<which> ('?' if unknown)."""
    try:
        with open(f"/sys/kernel/mm/transparent_hugepage/{which}") as f:
            s = f.read()
        return s[s.index("[") + 1:s.index("]")]
    except (OSError, ValueError):
        return "?"


def cpu_pair() -> tuple[int, int] | None:
    """Two CPUs this process may run on, or None on a one-CPU machine."""
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[0], cpus[1]) if len(cpus) >= 2 else None


class pinned:
    """``with pinned(cpu):`` this process (and every child it forks meanwhile) runs on one CPU."""

    def __init__(self, cpu: int):
        self.cpu = cpu

    def __enter__(self) -> "pinned":
        self.old = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {self.cpu})
        return self

    def __exit__(self, *exc: object) -> None:
        os.sched_setaffinity(0, self.old)
