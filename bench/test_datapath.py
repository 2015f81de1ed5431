"""Data path: how fast shmig moves guest RAM, against the fastest a pipe can move bytes here.

An unthrottled precopy migration (no link limit, no rate limit) of 256 MiB of an idle guest with
no zero pages, once with 4 KiB and once with 2 MiB host pages: every page is read out of source
RAM, framed, written through the precopy pipe and put into destination RAM exactly once. (In
precopy the host page size only changes the scan's bookkeeping, so both should match.)

Measured (``extra_info``; rates in Gbit/s, 10^9 bit/s, like the report's Mbit/s):
  bytes          ram.transferred of the report (page data plus frame headers)
  seconds        the precopy phase: (total_time_ms - setup_time_ms) of the report, i.e. from the
                 end of channel setup to the last page placed (child start-up excluded)
  gbps           bytes / seconds; ``gbps_total`` uses the whole total_time_ms instead
  pipe_gbps      baseline: a forked process writes the same number of bytes in 1 MiB writes
                 through one 1 MiB pipe to this process, which reads them with os.readv into a
                 1 MiB buffer; the fastest of three transfers (it is the ceiling)
  ratio_vs_pipe  gbps / pipe_gbps                                   <- the target's figure
  memcpy_gbps    numpy copy of the same number of bytes (one core's memory bandwidth)
Context, because on this kind of VM where the scheduler places two processes decides the figures
(one CPU: cache-hot, no cross-CPU wake-ups; measured ~3-4x faster for the pipe):
  pipe_same_cpu_gbps, pipe_cross_cpu_gbps   the pipe baseline with writer and reader pinned
  one_cpu_gbps   the same migration with every process pinned to one CPU
  ratio_vs_pipe_same_cpu = one_cpu_gbps / pipe_same_cpu_gbps: like for like, placement-proof
With several rounds every figure is the median over the rounds; each round measures its
baselines right before the migration it is compared with.

The migration runs with ``socket_buffer`` = 1 MiB, the largest pipe this machine gives without
CAP_SYS_RESOURCE: the fast path, where the pipe is the whole socket queue and payloads are read
straight into destination RAM. The default 10 MiB queue needs a read-ahead buffer (a receive
thread drains the pipe into it, as the kernel fills a socket buffer), which costs one more copy:
  gbps_with_queue   the same migration with the default 10 MiB socket buffer
  queue_cost        gbps / gbps_with_queue

Target (not asserted, machines are noisy): ratio_vs_pipe >= 0.6 with 2 MiB pages, >= 0.4 with
4 KiB pages. Asserted: completion, integrity, and a loose sanity bound (ratio_vs_pipe > 0.05).
Quick mode (``--benchmark-disable``): 32 MiB, one round.
"""

from __future__ import annotations

import dataclasses

import pytest

import shmig
from bench.baselines import cpu_pair, gbps, median, memcpy_seconds, pinned, pipe_throughput

FULL_RAM = 256 << 20
QUICK_RAM = 32 << 20
FULL_ROUNDS = 3
PIPE_REPEAT = 3  # the pipe baseline of a round is the fastest of this many transfers
TARGET = {4096: 0.4, 2 << 20: 0.6}
PIPE_MAX = 1 << 20  # /proc/sys/fs/pipe-max-size here


def precopy_gbps(r: shmig.Report) -> float:
    return gbps(r.ram["transferred"], (r.total_time_ms - r.setup_time_ms) / 1e3)


def check(r: shmig.Report, cfg: shmig.Config) -> None:
    assert r.ok, f"status={r.status} error={r.error!r} integrity={r.integrity}"
    assert r.ram["zero_pages"] == 0 and r.ram["normal_pages"] == cfg.npages


@pytest.mark.parametrize("host_page", [4096, 2 << 20], ids=["4KiB", "2MiB"])
def test_datapath(benchmark, record, quick, host_page):
    ram = QUICK_RAM if quick else FULL_RAM
    rounds = 1 if quick else FULL_ROUNDS
    cfg = shmig.Config(mode="precopy", ram=ram, host_page=host_page, workload="idle", zero_fraction=0.0,
                       bandwidth=None, max_bandwidth=None, socket_buffer=PIPE_MAX, deadline=120.0)
    queued_cfg = dataclasses.replace(cfg, socket_buffer=shmig.Config().socket_buffer)
    pair = cpu_pair()
    rounds_fig: list[dict] = []
    reports: list[shmig.Report] = []
    queued: list[shmig.Report] = []

    def baselines():
        f = {"pipe_s": min(pipe_throughput(cfg.ram) for _ in range(PIPE_REPEAT))}
        if pair is not None:
            f["pipe_same_cpu_s"] = pipe_throughput(cfg.ram, cpus=(pair[0], pair[0]))
            f["pipe_cross_cpu_s"] = pipe_throughput(cfg.ram, cpus=pair)
            with pinned(pair[0]):  # the children inherit the affinity
                one = shmig.run(cfg)
            check(one, cfg)
            f["one_cpu_gbps"] = precopy_gbps(one)
        rounds_fig.append(f)

    def migrate():
        reports.append(shmig.run(cfg))
        queued.append(shmig.run(queued_cfg))

    benchmark.group = "datapath"
    benchmark.pedantic(migrate, setup=baselines, rounds=rounds, iterations=1)

    per = []
    for r, q, b in zip(reports, queued, rounds_fig):
        check(r, cfg)
        check(q, queued_cfg)
        g = precopy_gbps(r)
        p = {"bytes": r.ram["transferred"], "seconds": (r.total_time_ms - r.setup_time_ms) / 1e3, "gbps": g,
             "gbps_total": gbps(r.ram["transferred"], r.total_time_ms / 1e3),
             "pipe_gbps": gbps(cfg.ram, b["pipe_s"]), "ratio_vs_pipe": g / gbps(cfg.ram, b["pipe_s"]),
             "total_time_ms": r.total_time_ms, "setup_time_ms": r.setup_time_ms,
             "gbps_with_queue": precopy_gbps(q), "queue_cost": g / precopy_gbps(q)}
        if pair is not None:
            same = gbps(cfg.ram, b["pipe_same_cpu_s"])
            p.update(pipe_same_cpu_gbps=same, pipe_cross_cpu_gbps=gbps(cfg.ram, b["pipe_cross_cpu_s"]),
                     one_cpu_gbps=b["one_cpu_gbps"], ratio_vs_pipe_same_cpu=b["one_cpu_gbps"] / same)
        per.append(p)
    fig = {k: median([p[k] for p in per]) for k in per[0]}
    fig["bytes"] = int(fig["bytes"])
    fig["memcpy_gbps"] = gbps(cfg.ram, memcpy_seconds(cfg.ram))
    target = TARGET[host_page]
    record(show=("bytes", "seconds", "gbps", "pipe_gbps", "ratio_vs_pipe", "gbps_with_queue", "queue_cost",
                 "memcpy_gbps", "one_cpu_gbps",
                 "pipe_same_cpu_gbps", "ratio_vs_pipe_same_cpu", "pipe_cross_cpu_gbps", "target",
                 "meets_target"),
           **fig, ram=cfg.ram, host_page=host_page, rounds=len(per),
           ratio_vs_pipe_rounds=[round(p["ratio_vs_pipe"], 4) for p in per],
           target=target, meets_target=fig["ratio_vs_pipe"] >= target)
    assert fig["ratio_vs_pipe"] > 0.05, f"data path absurdly slow: {fig}"
