"""End-to-end precopy migrations on small RAM: every workload, both small host page sizes, the link
and rate-limit knobs, and the report fields a precopy run must fill in."""

from __future__ import annotations

import pytest

import shmig
from helpers import assert_ok
from shmig.config import WORKLOADS

KiB, MiB = 1024, 1024**2
TIMEOUT = 60


def cfg(**kw) -> shmig.Config:
    base = dict(mode="precopy", ram=16 * MiB, host_page=4 * KiB, deadline=60, workload="random", max_rounds=5)
    base.update(kw)
    return shmig.Config(**base)


def assert_precopy_fields(r: shmig.Report, c: shmig.Config) -> None:
    assert_ok(r)
    ram = r.ram
    assert ram["total"] == c.ram
    assert ram["normal_pages"] + ram["zero_pages"] >= c.ram // 4096, ram
    assert ram["channel_bytes"]["postcopy"] == 0, ram
    assert ram["channel_bytes"]["precopy"] > 0, ram
    assert ram["postcopy_bytes"] == 0 and r.postcopy_bytes == 0
    assert r.postcopy_requests == 0
    assert r.postcopy_latency_us.get("count", 0) == 0
    assert r.dirty_sync_count >= 2, r.dirty_sync_count
    assert r.precopy_rounds >= 1
    assert r.downtime_ms is not None and r.downtime_ms > 0, r.downtime_ms
    assert r.total_time_ms is not None and r.total_time_ms > 0
    assert r.integrity["pages_checked"] == c.ram // 4096, r.integrity
    dst = r.destination["mig/dst/listen"]
    assert dst["pages"] == ram["normal_pages"] + ram["zero_pages"], (dst, ram)
    assert "mig/dst/preempt" not in r.destination


# every workload on both host page sizes; vCPU counts mixed in (1 or 2)
CASES = [(hp, w, 1 + (i + j) % 2) for i, hp in enumerate((4 * KiB, 2 * MiB)) for j, w in enumerate(WORKLOADS)]


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("host_page,workload,vcpus", CASES,
                         ids=[f"{'4K' if hp == 4096 else '2M'}-{w}-{v}vcpu" for hp, w, v in CASES])
def test_precopy_workloads(host_page, workload, vcpus):
    c = cfg(host_page=host_page, workload=workload, vcpus=vcpus,
            ram=16 * MiB if host_page == 4 * KiB else 32 * MiB)
    r = shmig.run(c)
    assert_precopy_fields(r, c)
    assert r.config["workload"] == workload and r.config["vcpus"] == vcpus
    if workload == "idle":
        assert r.guest_progress["precopy_accesses"] == 0


@pytest.mark.timeout(TIMEOUT)
def test_precopy_bandwidth_limited():
    c = cfg(ram=16 * MiB, bandwidth=200 * MiB, dirty_rate=20 * MiB, max_rounds=5)
    r = shmig.run(c)
    assert_precopy_fields(r, c)
    # one full round alone is 16 MiB through a 200 MiB/s link: at least ~80 ms (generous: half)
    assert r.total_time_ms >= 0.5 * 16 / 200 * 1e3, r.total_time_ms
    # every byte crossed the emulated link: the average rate cannot beat it (200 MiB/s = 1678 Mbit/s)
    assert r.throughput_mbps <= 1.05 * 200 * MiB * 8 / 1e6, r.throughput_mbps


@pytest.mark.timeout(TIMEOUT)
def test_precopy_max_bandwidth_limited():
    c = cfg(ram=16 * MiB, max_bandwidth=100 * MiB, dirty_rate=10 * MiB, max_rounds=4)
    r = shmig.run(c)
    assert_precopy_fields(r, c)
    assert r.total_time_ms >= 0.5 * 16 / 100 * 1e3, r.total_time_ms


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("host_page", [4 * KiB, 2 * MiB], ids=["4K", "2M"])
def test_precopy_latency(host_page):
    c = cfg(ram=16 * MiB if host_page == 4 * KiB else 32 * MiB, host_page=host_page, latency=0.001,
            workload="hotset", vcpus=2)
    r = shmig.run(c)
    assert_precopy_fields(r, c)
    assert r.downtime_ms >= 1.0 * 0.5, r.downtime_ms  # the last frame still needs its 1 ms


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("zero_fraction", [0.0, 0.9])
def test_precopy_zero_fraction(zero_fraction):
    c = cfg(ram=16 * MiB, zero_fraction=zero_fraction, workload="sequential", dirty_rate=5 * MiB)
    r = shmig.run(c)
    assert_precopy_fields(r, c)
    npages = c.ram // 4096
    zero, normal = r.ram["zero_pages"], r.ram["normal_pages"]
    if zero_fraction == 0.0:
        assert zero == 0, r.ram
        assert normal >= npages
    else:
        # the first round alone meets ~90% zero pages; zero pages travel as flags only
        assert zero >= 0.7 * npages, r.ram
        assert r.ram["channel_bytes"]["precopy"] < 0.5 * c.ram, r.ram


@pytest.mark.timeout(TIMEOUT)
def test_precopy_zero_pages_are_cheap_on_the_wire():
    """Same RAM, 0% vs 90% zero pages, idle guest: the zero-heavy run moves far fewer bytes."""
    dense = shmig.run(cfg(zero_fraction=0.0, workload="idle"))
    sparse = shmig.run(cfg(zero_fraction=0.9, workload="idle"))
    assert_ok(dense)
    assert_ok(sparse)
    assert sparse.ram["transferred"] * 3 < dense.ram["transferred"], (sparse.ram, dense.ram)


@pytest.mark.timeout(TIMEOUT)
def test_precopy_seed_and_several_vcpus():
    c = cfg(ram=8 * MiB, vcpus=4, seed=12345, workload="ab")
    r = shmig.run(c)
    assert_precopy_fields(r, c)
    assert len(r.guest_progress["per_vcpu_postcopy_accesses"]) == 4


@pytest.mark.timeout(TIMEOUT)
def test_guest_runs_during_precopy():
    """A guest writing at random as fast as it can must have written something during precopy."""
    for i in range(20):
        r = shmig.run(cfg(ram=1 * MiB, workload="random"))
        assert_ok(r)
        assert r.guest_progress["precopy_accesses"] > 0, f"run {i}: the guest never ran during precopy"
