"""Fault path: how long a vCPU waits for a missing page when nothing else is in the way.

Postcopy of a guest with 4 KiB pages in ``preempt-full`` mode, with no link limit and an idle
background: the switch to postcopy comes right after channel setup (``precopy_rounds=0``, so
nothing is sent before the guest runs on the destination) and the background scan is throttled to
its minimum with ``max_postcopy_bandwidth`` (1 B/s: one frame per 100 ms rate-limit window). The
guest writes at random over all of RAM, so nearly every page is brought in by a fault: vCPU ->
fault pipe -> dst fault thread -> return pipe -> src return thread -> postcopy pipe -> dst preempt
receiver -> placement -> eventfd -> vCPU. Twice: with ``socket_buffer`` = 1 MiB (the pipe is the
queue: the receiver reads its pipe itself) and with the default 10 MiB (a receive thread reads
ahead while the receiver is busy; a receiver waiting on an idle channel reads the pipe itself, so
the two should measure alike).

7.1 ``preempt`` is not measured here any more: its requests are sent by the migration thread,
which obeys QEMU's rate limit, so behind a throttled background a request waits for the next
100 ms window (the gate; see tests/test_timing.py), and without the throttle the background, not
the fault path, brings the pages in.

Measured (``extra_info``, microseconds):
  p50_us, p99_us       (and mean/p90/max, faults = count) of the report's postcopy_latency_us
  pipe_rtt_us          baseline: median one-byte round trip between two forked processes over
                       two pipes (2000 round trips), placed by the scheduler (usually one CPU)
  ratio_vs_rtt         p50_us / pipe_rtt_us
  pipe_rtt_cross_cpu_us  context: the same round trip pinned to two different CPUs
  slept_us_per_fault   the vCPU's own view: what it slept on the destination (by the kernel's
                       accounting, guest.SleepClock) over the number of faults; the same figure
                       for both backends, where p50_us is each backend's own stamps
  cpu_us_per_fault     CPU time (user + system, /proc/<pid>/stat sampled every 10 ms from a thread
                       of this process) each migration process spent during the postcopy phase,
                       divided by the number of faults; ``cpu_us_per_fault_total`` sums them. It
                       says where a fault's time goes, and is far less noisy than the latency.
With several rounds, each figure is the median over the rounds, each round measuring the round
trips right before its migration.

Both fault backends (``--fault-backend bitmap`` and ``uffd``, issue 20; uffd skipped where
userfaultfd is not permitted): with uffd the vCPU faults in the kernel and the path is vCPU ->
userfaultfd -> dst fault thread -> ... -> UFFDIO_COPY, which wakes it. The uffd case also records
the guest's speed on pages it has, both backends in the same process (tools/uffd_bench.py's
guest_rates: accesses per second of vCPU time), as ``guest_rate_bitmap``, ``guest_rate_uffd`` (at
the uffd backend's chunk, guest.UFFD_CHUNK) and ``guest_speedup`` (issue 20's target: >= 5).

Target (not asserted): ratio_vs_rtt <= 3. Asserted: completion, integrity, faults happened.
Quick mode (``--benchmark-disable``): 4 MiB, one round.
"""

from __future__ import annotations

import os
import threading

import pytest

import shmig
from shmig import uffd
from bench.baselines import median, pipe_rtt_us

FULL_RAM = 32 << 20
QUICK_RAM = 4 << 20
FULL_ROUNDS = 3
TARGET = 3.0
TCK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TCK  # utime + stime


class PostcopyCpu:
    """CPU seconds each child spends while the controller is in the postcopy phase."""

    def __init__(self, mig: shmig.Migration, period: float = 0.01):
        self.mig = mig
        self.period = period
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cpu-sampler", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            if self.mig.phase not in ("postcopy", "completion"):
                continue
            for p in self.mig.procs:
                c = _cpu_s(p.process.pid)
                if c is None:
                    continue
                self.first.setdefault(p.title, c)
                if self.mig.phase == "postcopy" or p.title not in self.last:
                    self.last[p.title] = c

    def start(self) -> None:  # once the children exist: no thread may run while the controller forks
        self._thread.start()

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {t: self.last[t] - self.first[t] for t in self.last}


@pytest.mark.parametrize("backend", ["bitmap", "uffd"])
@pytest.mark.parametrize("queue", ["pipe", "default"])
def test_faultpath(benchmark, record, quick, queue, backend):
    if backend == "uffd" and uffd.refused():
        pytest.skip(uffd.refused())
    cfg = shmig.Config(mode="preempt-full", fault_backend=backend, ram=QUICK_RAM if quick else FULL_RAM, host_page=4096,
                       workload="random", zero_fraction=0.0, vcpus=1, bandwidth=None, latency=0.0,
                       precopy_rounds=0, max_postcopy_bandwidth=1.0, deadline=120.0,
                       socket_buffer=(1 << 20) if queue == "pipe" else shmig.Config().socket_buffer)
    rounds = 1 if quick else FULL_ROUNDS
    two_cpus = len(os.sched_getaffinity(0)) >= 2
    rtt: list[float] = []
    rtt_x: list[float] = []
    runs: list[tuple[shmig.Report, dict[str, float]]] = []

    def baseline():
        rtt.append(pipe_rtt_us()["p50"])
        if two_cpus:
            cpus = sorted(os.sched_getaffinity(0))[:2]
            rtt_x.append(pipe_rtt_us(cpus=(cpus[0], cpus[1]))["p50"])

    def migrate():
        mig = shmig.Migration(cfg)
        cpu = PostcopyCpu(mig)
        mig.start()
        cpu.start()
        try:
            rep = mig.wait()
        finally:
            used = cpu.stop()
        runs.append((rep, used))

    benchmark.group = "faultpath"
    benchmark.pedantic(migrate, setup=baseline, rounds=rounds, iterations=1)

    for r, _ in runs:
        assert r.ok, f"status={r.status} error={r.error!r} integrity={r.integrity}"
        assert r.postcopy_latency_us["count"] > 0, "no fault was measured"
    lat = [r.postcopy_latency_us for r, _ in runs]
    fig = {f"{k}_us": median([x[k] for x in lat]) for k in ("mean", "p50", "p90", "p99", "max")}
    fig["faults"] = int(median([x["count"] for x in lat]))
    # the vCPU's own view (guest.SleepClock): what it slept per fault, whichever backend stamped it
    slept = [sum(r.postcopy_vcpu_slept_ms) * 1e3 / r.postcopy_latency_us["count"] for r, _ in runs
             if None not in r.postcopy_vcpu_slept_ms]
    fig["slept_us_per_fault"] = round(median(slept), 1) if slept else None
    fig["pipe_rtt_us"] = median(rtt)
    fig["ratio_vs_rtt"] = median([x["p50"] / t for x, t in zip(lat, rtt)])
    fig["pipe_rtt_cross_cpu_us"] = median(rtt_x) if rtt_x else None
    titles = sorted({t for _, used in runs for t in used})
    per = {t: median([used.get(t, 0.0) / r.postcopy_latency_us["count"] * 1e6 for r, used in runs])
           for t in titles}
    fig["cpu_us_per_fault"] = {t: round(v, 1) for t, v in per.items()}
    fig["cpu_us_per_fault_total"] = round(sum(per.values()), 1)
    fig["postcopy_latency_dist"] = runs[len(runs) // 2][0].postcopy_latency_dist
    fig["background_bytes"] = int(median([r.ram["channel_bytes"]["precopy"] for r, _ in runs]))
    if backend == "uffd":
        from shmig.guest import UFFD_CHUNK
        from tools.uffd_bench import guest_rates

        rates = guest_rates(QUICK_RAM, 0.1 if quick else 1.0, "random")
        fig["guest_rate_bitmap"] = round(rates["bitmap"])
        fig["guest_rate_uffd"] = round(rates[f"uffd_chunk{UFFD_CHUNK}"])
        fig["guest_speedup"] = round(fig["guest_rate_uffd"] / fig["guest_rate_bitmap"], 2)
    record(show=("faults", "p50_us", "p99_us", "slept_us_per_fault", "pipe_rtt_us", "ratio_vs_rtt", "pipe_rtt_cross_cpu_us",
                 "cpu_us_per_fault_total", "target", "meets_target", "guest_speedup"),
           **fig, ram=cfg.ram, rounds=len(runs), target=TARGET, meets_target=fig["ratio_vs_rtt"] <= TARGET)


def test_hugetlb_placement(benchmark, record, quick):
    """Issue 20: a 2 MiB hugetlb run (``--fault-backend uffd --hugetlb``), everything in postcopy:
    the rate at which the receivers place pages with UFFDIO_COPY (their uffd_copy_bytes over
    uffd_copy_ns), recorded beside the 8 GB/s the issue expects; not asserted (a shared machine).
    The 2 MiB pool is raised for the run if it is short, and put back (tools/uffd_bench.py)."""
    if uffd.refused():
        pytest.skip(uffd.refused())
    from tools.uffd_bench import hugetlb_pages

    ram = (32 if quick else 256) << 20
    with hugetlb_pages(ram >> 21) as ok:
        if not ok:
            pytest.skip(f"no {ram >> 21} free 2MiB hugetlb pages, and the pool cannot be raised")
        cfg = shmig.Config(mode="preempt-full", ram=ram, host_page=2 << 20, fault_backend="uffd", hugetlb=True,
                           workload="random", vcpus=1, bandwidth=None, latency=0.0, precopy_rounds=0, deadline=120.0)
        runs: list[shmig.Report] = []
        benchmark.group = "faultpath"
        benchmark.pedantic(lambda: runs.append(shmig.run(cfg)), rounds=1 if quick else 3, iterations=1)
    for r in runs:
        assert r.ok, f"status={r.status} error={r.error!r} integrity={r.integrity}"
    rates = [sum(d["uffd_copy_bytes"] for d in r.destination.values())
             / max(sum(d["uffd_copy_ns"] for d in r.destination.values()), 1) for r in runs]  # bytes/ns = GB/s
    record(show=("place_gbs", "target_gbs", "meets_target"), place_gbs=round(median(rates), 2), target_gbs=8.0,
           meets_target=median(rates) >= 8.0, ram=ram, rounds=len(runs))
