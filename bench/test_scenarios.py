"""Scenarios: the postcopy-preempt cover letter's grid behind a 100 MiB/s link.

Modes vanilla, preempt with x-postcopy-preempt-break-huge=off ("preempt-nobreak"), preempt and
preempt-full, each with 4 KiB and 2 MiB host pages; 256 MiB of guest RAM, one vCPU writing at
random over all of it as fast as it can, one precopy round then postcopy, the link shared by both
channels at 100 MiB/s, everything else at shmig's defaults (10 MiB socket buffer per channel,
10% zero pages).

Recorded per run (``extra_info``): the report's postcopy latency fields (``postcopy_latency_us``
and ``postcopy_latency_dist`` as they are, plus flat ``lat_*_us`` copies), requests, blocktime,
preemptions, downtime and total time. Benchmarks are grouped by host page ("scenarios 4KiB",
"scenarios 2MiB"), so pytest-benchmark's tables (and ``--benchmark-compare``) put the four modes
of one page size together, and the end-of-run figures table shows their latencies side by side
(with a compared run's on the line below each).

No target: this suite is for comparing modes and runs. Asserted: completion and integrity.
Quick mode (``--benchmark-disable``): 16 MiB.
"""

from __future__ import annotations

import pytest

import shmig
from shmig.compare import MODE_VARIANTS

FULL_RAM = 256 << 20
QUICK_RAM = 16 << 20
LINK = 100 * 2**20  # 100 MiB/s
MODES = ["vanilla", "preempt-nobreak", "preempt", "preempt-full"]
HOST_PAGES = {"4KiB": 4096, "2MiB": 2 << 20}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("page", list(HOST_PAGES))
def test_scenario(benchmark, record, quick, page, mode):
    cfg = shmig.Config(ram=QUICK_RAM if quick else FULL_RAM, host_page=HOST_PAGES[page], workload="random",
                       bandwidth=LINK, precopy_rounds=1, deadline=110.0, **MODE_VARIANTS[mode])
    reports: list[shmig.Report] = []
    benchmark.group = f"scenarios {page}"
    benchmark.pedantic(lambda: reports.append(shmig.run(cfg)), rounds=1, iterations=1)
    r = reports[0]
    assert r.ok, f"status={r.status} error={r.error!r} integrity={r.integrity}"
    lat = r.postcopy_latency_us
    record(show=("lat_count", "lat_mean_us", "lat_p50_us", "lat_p90_us", "lat_p99_us", "lat_max_us",
                 "blocktime_ms", "preemptions", "total_time_ms"),
           **{f"lat_{k}" if k == "count" else f"lat_{k}_us": v for k, v in lat.items()},
           postcopy_latency_us=lat, postcopy_latency_dist=r.postcopy_latency_dist,
           postcopy_requests=r.postcopy_requests, postcopy_bytes=r.postcopy_bytes,
           blocktime_ms=r.postcopy_blocktime_ms, preemptions=r.preemptions,
           urgent_on_precopy=r.urgent_on_precopy, downtime_ms=r.downtime_ms, total_time_ms=r.total_time_ms,
           postcopy_phase_ms=r.postcopy_phase_ms,
           guest_postcopy_accesses=r.guest_progress.get("postcopy_accesses"),
           mode=mode, host_page=cfg.host_page, ram=cfg.ram, link_bytes_per_s=LINK)
