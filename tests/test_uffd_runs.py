"""End-to-end runs with ``--fault-backend uffd`` (issue 20): real kernel page faults on memfd
destination RAM, each vCPU blocked in the kernel until a receiver's UFFDIO_COPY places its page.
Every mode at 4 KiB and 2 MiB host pages, real hugetlb pages where the pool allows, a postcopy
recovery with the uffds kept across the pause, and a receiver or vCPU killed mid-fault."""

from __future__ import annotations

import os
import signal
import time

import pytest

import shmig
from helpers import assert_all_reaped, proc_of
from shmig import uffd
from shmig.compare import MODE_VARIANTS
from test_postcopy import assert_postcopy_report
from test_recovery import assert_recovered

KiB, MiB = 1024, 1024**2
TIMEOUT = 60

REFUSED = uffd.refused()
pytestmark = pytest.mark.skipif(bool(REFUSED), reason=REFUSED or "userfaultfd permitted")


def cfg(variant: str, host_page: int = 4 * KiB, **kw) -> shmig.Config:
    base = dict(ram=16 * MiB if host_page == 4 * KiB else 32 * MiB, host_page=host_page, precopy_rounds=0,
                workload="random", vcpus=2, deadline=40, fault_backend="uffd", **MODE_VARIANTS[variant])
    base.update(kw)
    return shmig.Config(**base)


MATRIX = [(v, hp) for v in ("vanilla", "preempt", "preempt-full") for hp in (4 * KiB, 2 * MiB)]


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("variant,host_page", MATRIX, ids=[f"{v}-{'4K' if hp == 4 * KiB else '2M'}" for v, hp in MATRIX])
def test_uffd_modes(variant, host_page):
    """Everything in postcopy, a random guest on two vCPUs: it faults in the kernel, every fault is
    read by the fault thread and resolved by a placement, and RAM is byte for byte the source's."""
    c = cfg(variant, host_page)
    r = shmig.run(c)
    assert_postcopy_report(r, c)
    assert r.config["fault_backend"] == "uffd" and r.to_dict()["fault_backend"] == "uffd"
    assert "faults by uffd" in r.summary()
    lat = r.postcopy_latency_us
    assert lat["count"] > 0 and r.postcopy_requests > 0, (lat, r.postcopy_requests)
    listen = r.destination["mig/dst/listen"]
    # every logged fault was read from a uffd (a retry of the same fault is read again, not logged)
    assert listen["faults_seen"] >= lat["count"], (listen, lat)
    assert len(r.faults.vcpu) == lat["count"] and set(r.faults.vcpu.tolist()) <= {0, 1}, r.faults
    # postcopy_ram_incoming_cleanup: once every page was placed, both vCPUs' ranges left userfaultfd
    assert listen["uffd_unregistered"] == c.vcpus, listen


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("variant", ["vanilla", "preempt-full"])
def test_uffd_discard_punches_holes(variant):
    """One precopy round under a random guest: the pages it dirtied again are discarded (holes
    punched in the memfd) and must fault and be sent again; a stale page would fail integrity."""
    c = cfg(variant, precopy_rounds=1, bandwidth=100 * MiB, vcpus=1)
    r = shmig.run(c)
    assert_postcopy_report(r, c)
    assert r.ram["discarded_host_pages"] > 0, r.ram


@pytest.mark.timeout(TIMEOUT)
def test_uffd_hugetlb_2m():
    """Real 2 MiB hugetlb pages, each placed whole by one UFFDIO_COPY (the pool is raised for the
    test where it is short and put back, as tools/uffd_bench.py does; skipped if it cannot be)."""
    from tools.uffd_bench import hugetlb_pages

    with hugetlb_pages(16) as ok:
        if not ok:
            pytest.skip("no 16 free 2MiB hugetlb pages, and the pool cannot be raised: `sysctl vm.nr_hugepages=16`")
        c = cfg("preempt-full", 2 * MiB, hugetlb=True)
        r = shmig.run(c)
    assert_postcopy_report(r, c)
    assert r.config["hugetlb"] is True
    assert r.postcopy_latency_us["count"] > 0


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("variant,host_page,what", [("preempt-full", 4 * KiB, "precopy-channel"),
                                                    ("preempt", 2 * MiB, "return-path")])
def test_uffd_recovery(variant, host_page, what):
    """A channel broken in postcopy: the vCPUs stay blocked in the kernel on their uffds across the
    pause, and the recovery resolves their faults."""
    c = cfg(variant, host_page, bandwidth=50 * MiB, vcpus=1, inject_faults=[f"{what}@50%"])
    r = shmig.run(c)
    assert_recovered(r, c)


def open_fault(m: shmig.Migration) -> tuple[int, int]:
    """(vCPU, host page) of a fault the fault thread has read and nobody has resolved yet (the
    controller's loop runs while it looks)."""
    found: list[tuple[int, int]] = []

    def look(_sample: object) -> bool:
        for v, r in enumerate(m.plan.vcpus):
            rows = m.ledger.vcpu(r).faults.rows()
            if len(rows) and rows[-1, 2] == -1:
                found.append((v, int(rows[-1, 0])))
                return True
        return False

    assert m.wait_for(look, timeout=20), "no vCPU fault was open within 20 s"
    return found[0]


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("variant,victim", [("vanilla", "mig/dst/listen"), ("preempt-full", "mig/dst/listen"),
                                            ("preempt-full", "mig/dst/preempt"), ("preempt-full", "guest/vcpu0")])
def test_sigkill_mid_fault(variant, victim, shm_leftovers):
    """A placer or a vCPU killed while a vCPU waits in the kernel for a page: the run fails with the
    one line naming it, every child is reaped, nothing is left behind, and no vCPU went on past its
    fault without the page being placed (its uffd reference keeps the fault blocked: were the last
    reference gone, the kernel would have completed it with a zero page the vCPU did not write)."""
    # 100 ms each way: a requested page takes 200 ms, time enough to look and kill mid-fault
    # (in vanilla the listen process holds the only uffd references besides the vCPUs' own)
    m = shmig.Migration(cfg(variant, ram=64 * MiB, latency=0.1, bandwidth=20 * MiB, deadline=30)).start()
    try:
        v, hp = open_fault(m)
        st = m.ledger.vcpu(m.plan.vcpus[v]).stats
        before = st.accesses_dst
        os.kill(proc_of(m, victim).process.pid, signal.SIGKILL)
        time.sleep(0.2)
        if not m.mem.received[hp * m.cfg.tp_per_hp]:  # nobody placed it: the vCPU must still wait
            assert st.accesses_dst == before, (victim, v, hp)
    finally:
        r = m.wait()
    assert_all_reaped(m)
    assert not shm_leftovers()
    assert r.status == "failed"
    assert r.error.startswith(f"{victim} was killed by signal 9 during "), r.error
