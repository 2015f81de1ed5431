"""End-to-end postcopy migrations: every request-servicing mode on small RAM, the discard path, the
preemption/overlap paths, the start_postcopy() API, and the one ratio that matters (preempt vs
vanilla fault latency)."""

from __future__ import annotations

import os

import pytest

import shmig
from helpers import BACKENDS, assert_ok
from shmig.compare import MODE_VARIANTS

KiB, MiB, GiB = 1024, 1024**2, 1024**3
TIMEOUT = 60

MODES = MODE_VARIANTS  # the modes of `shmig compare`



def cfg(**kw) -> shmig.Config:
    base = dict(mode="preempt", ram=16 * MiB, host_page=4 * KiB, deadline=60, workload="random")
    base.update(kw)
    if "ram" not in kw and base["host_page"] == 2 * MiB:
        base["ram"] = 32 * MiB
    return shmig.Config(**base)


def assert_postcopy_report(r: shmig.Report, c: shmig.Config) -> None:
    """What every completed postcopy report must satisfy, whatever the timing."""
    assert_ok(r)
    lat = r.postcopy_latency_us
    assert sum(r.postcopy_latency_dist) == lat["count"], (r.postcopy_latency_dist, lat)
    assert len(r.postcopy_latency_dist) == 24
    assert len(r.postcopy_vcpu_blocktime_ms) == c.vcpus, r.postcopy_vcpu_blocktime_ms
    assert all(b >= 0 for b in r.postcopy_vcpu_blocktime_ms)
    # all vCPUs blocked at once can last no longer than any one vCPU was blocked
    assert r.postcopy_blocktime_ms <= min(r.postcopy_vcpu_blocktime_ms) + 1e-3, (
        r.postcopy_blocktime_ms, r.postcopy_vcpu_blocktime_ms)
    if lat["count"]:
        assert 0 <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"], lat
    assert r.integrity["pages_checked"] == c.ram // 4096, r.integrity
    assert r.ram["total"] == c.ram
    assert r.downtime_ms is not None and r.downtime_ms > 0, r.downtime_ms
    assert r.postcopy_phase_ms is not None and r.postcopy_phase_ms >= 0
    # every page sent was received, and every request the fault thread sent reached the source
    dst = r.destination
    assert sum(d["pages"] for d in dst.values()) == r.ram["normal_pages"] + r.ram["zero_pages"], (dst, r.ram)
    assert r.postcopy_requests == dst["mig/dst/listen"]["requests_sent"], (r.postcopy_requests, dst)
    assert ("mig/dst/preempt" in dst) == c.uses_preempt_channel
    ch = r.ram["channel_bytes"]
    if c.mode == "vanilla":
        assert ch["postcopy"] == 0, ch  # one channel only
        assert r.preemptions == 0 and r.urgent_on_precopy == 0
    if c.mode != "preempt" or not c.break_huge or c.host_page == 4 * KiB:
        assert r.preemptions == 0, "only break-huge preempt interrupts a huge page"
        assert r.urgent_on_precopy == 0
    if c.precopy_rounds == 0:
        # nothing was sent before switchover: every page travels in postcopy
        assert r.ram["discarded_host_pages"] == c.ram // c.host_page, r.ram
        assert r.postcopy_bytes > 0
        assert r.ram["normal_pages"] + r.ram["zero_pages"] == c.ram // 4096, r.ram


# the matrix: every mode x 4KiB/2MiB x random/sequential x 0/1 precopy rounds; random runs on one vCPU,
# sequential on two (one sequential vCPU: test_single_vcpu_sequential_wake_race).
MATRIX = [(m, hp, w, pr) for m in MODES for hp in (4 * KiB, 2 * MiB) for w in ("random", "sequential")
          for pr in (0, 1)]


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("variant,host_page,workload,precopy_rounds", MATRIX,
                         ids=[f"{m}-{'4K' if hp == 4096 else '2M'}-{w}-r{pr}" for m, hp, w, pr in MATRIX])
@pytest.mark.parametrize("backend", BACKENDS)
def test_postcopy_modes(variant, host_page, workload, precopy_rounds, backend):
    vcpus = 2 if workload == "sequential" else 1
    # where the guest must fault, the link is slow enough that the background cannot send all of
    # RAM before the vCPU runs: unlimited, 16 MiB went in a few ms while a loaded CI machine had
    # not scheduled the vCPU yet, and no fault happened (once in ~1200 tests)
    link = dict(bandwidth=100 * MiB) if workload == "random" and precopy_rounds == 0 else {}
    c = cfg(fault_backend=backend, host_page=host_page, workload=workload, precopy_rounds=precopy_rounds, vcpus=vcpus,
            **link, **MODES[variant])
    r = shmig.run(c)
    assert_postcopy_report(r, c)
    lat = r.postcopy_latency_us
    if workload == "random" and precopy_rounds == 0:
        # the guest writes all over RAM right after switchover: it must fault, and faults make requests
        assert lat["count"] > 0, lat
        assert r.postcopy_requests > 0, (r.postcopy_requests, lat)
        if c.uses_preempt_channel and r.postcopy_requests >= 3:
            # at least one request was for a page neither sent nor in flight: it went on the
            # postcopy channel
            assert r.ram["channel_bytes"]["postcopy"] > 0, r.ram
    # with a few requests only, all may be for pages the (256 KiB per frame) background already sent
    if r.postcopy_requests >= 10 and c.uses_preempt_channel and host_page == 4 * KiB and workload == "random":
        assert r.ram["channel_bytes"]["postcopy"] > 0, r.ram


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.skipif(os.environ.get("SHMIG_BIG") != "1", reason="1GiB host pages need 2GiB of /dev/shm:"
                    " set SHMIG_BIG=1")
@pytest.mark.parametrize("variant", ["vanilla", "preempt", "preempt-full"])
def test_postcopy_1gib_host_page(variant):
    c = cfg(host_page=GiB, ram=GiB, precopy_rounds=0, bandwidth=2 * GiB, **MODES[variant])
    r = shmig.run(c)
    assert_postcopy_report(r, c)
    assert r.postcopy_latency_us["count"] > 0


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("host_page", [4 * KiB, 2 * MiB], ids=["4K", "2M"])
@pytest.mark.parametrize("variant", ["vanilla", "preempt", "preempt-full"])
def test_discard_path(variant, host_page, backend):
    """One precopy round while a random guest re-dirties pages: those pages are discarded on the
    destination at switchover (with uffd: holes punched) and must be re-sent; a stale page would
    fail the integrity check."""
    c = cfg(host_page=host_page, precopy_rounds=1, workload="random", bandwidth=100 * MiB,
            fault_backend=backend, **MODES[variant])
    r = shmig.run(c)
    assert_postcopy_report(r, c)
    disc = r.ram["discarded_host_pages"]
    assert disc > 0, r.ram
    assert r.destination["mig/dst/listen"].get("discarded_host_pages") == disc, r.destination
    assert r.precopy_rounds == 1
    assert r.guest_progress["precopy_accesses"] > 0


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("backend", BACKENDS)
def test_preempt_interrupts_huge_pages(backend):
    """2MiB pages through a slow link and a small socket buffer, random guest: the migration thread
    breaks background huge pages to serve requests, and the destination still ends up exact."""
    c = cfg(fault_backend=backend, mode="preempt", host_page=2 * MiB, bandwidth=100 * MiB, socket_buffer=1 * MiB,
            workload="random", precopy_rounds=0)
    r = shmig.run(c)
    assert_postcopy_report(r, c)
    assert r.preemptions > 0, (r.preemptions, r.postcopy_requests)
    assert r.preemptions <= r.postcopy_requests
    assert r.ram["channel_bytes"]["postcopy"] > 0


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("backend", BACKENDS)
def test_preempt_urgent_on_precopy(backend):
    """A sequential guest faults on exactly the huge page the background is sending: the request is
    for the interrupted page itself, which 7.1 finishes on the precopy channel. Among 32 huge
    pages it happens on a few faults in every run, so it is asserted, not just allowed."""
    c = cfg(fault_backend=backend, mode="preempt", host_page=2 * MiB, ram=64 * MiB, bandwidth=100 * MiB, socket_buffer=1 * MiB,
            workload="sequential", vcpus=2, precopy_rounds=0)
    r = shmig.run(c)
    assert_postcopy_report(r, c)
    assert r.urgent_on_precopy > 0, (r.urgent_on_precopy, r.preemptions, r.postcopy_requests)
    assert r.urgent_on_precopy <= r.preemptions


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("backend", BACKENDS)
def test_preempt_no_break_huge_never_interrupts(backend):
    c = cfg(fault_backend=backend, mode="preempt", break_huge=False, host_page=2 * MiB, bandwidth=100 * MiB,
            socket_buffer=1 * MiB, workload="sequential", vcpus=2, precopy_rounds=0)
    r = shmig.run(c)
    assert_postcopy_report(r, c)
    assert r.preemptions == 0 and r.urgent_on_precopy == 0


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("page_hint", [False, True], ids=["nohint", "hint"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_preempt_full_request_for_page_in_flight(page_hint, backend):
    """preempt-full: a sequential guest asks for the huge page the background thread is in the
    middle of; the return thread leaves it to the background. No torn or lost page."""
    c = cfg(fault_backend=backend, mode="preempt-full", page_hint=page_hint, host_page=2 * MiB, bandwidth=100 * MiB,
            socket_buffer=1 * MiB, workload="sequential", vcpus=2, precopy_rounds=0)
    r = shmig.run(c)
    assert_postcopy_report(r, c)
    assert r.postcopy_requests > 0
    assert r.destination["mig/dst/listen"]["duplicate_pages"] == 0
    assert r.destination["mig/dst/preempt"]["duplicate_pages"] == 0


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("variant", ["vanilla", "preempt", "preempt-full"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_postcopy_with_latency_and_limits(variant, backend):
    """One-way latency on every channel plus QEMU's postcopy rate limit, several vCPUs, hotset."""
    c = cfg(fault_backend=backend, latency=0.0005, max_postcopy_bandwidth=300 * MiB, workload="hotset", vcpus=3,
            precopy_rounds=1, **MODES[variant])
    r = shmig.run(c)
    assert_postcopy_report(r, c)


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("workload", ["idle", "ab"])
def test_postcopy_other_workloads(workload, backend):
    c = cfg(mode="preempt", workload=workload, vcpus=2, precopy_rounds=0, zero_fraction=0.5, fault_backend=backend)
    r = shmig.run(c)
    assert_postcopy_report(r, c)
    if workload == "idle":
        assert r.postcopy_latency_us["count"] == 0 and r.postcopy_requests == 0


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["vanilla", "preempt", "preempt-full"])
def test_start_postcopy_api(variant, backend):
    """QMP-style: precopy runs until start_postcopy(); the random guest and a slow link keep it from
    converging on its own. As QEMU's tests do, wait for a precopy round to end first."""
    c = cfg(ram=32 * MiB, bandwidth=50 * MiB, precopy_rounds=None, workload="random", socket_buffer=1 * MiB,
            fault_backend=backend, **MODES[variant])
    m = shmig.Migration(c).start()
    try:
        assert m.wait_for(lambda s: s.rounds >= 1, timeout=30), "no precopy round ended"
        assert m.last_sample.phase == "precopy"
        m.start_postcopy()
    finally:
        r = m.wait()
    assert_postcopy_report(r, c)
    assert r.dirty_sync_count >= 3  # setup's, the round's, the switchover's
    assert r.ram["precopy_bytes"] >= 32 * MiB * 0.9  # the whole first round went in precopy
    assert r.postcopy_bytes > 0, r.ram
    assert r.ram["discarded_host_pages"] > 0


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("backend", BACKENDS)
def test_preempt_latency_far_below_vanilla(backend):
    """The point of preemption: a requested page does not wait behind the full precopy channel.
    QEMU's cover letter saw 18x on p50 (4 KiB, 10 Gbit/s); demand at least 5x of 8.0+'s
    preempt-full. 7.1's one thread is slower behind a link this slow: a request that finds it
    blocked for write space, with less room freed since than its frame needs, waits until a third
    of the 4 MiB send buffer has drained (13 ms here): its median is still well below vanilla's."""
    base = dict(host_page=4 * KiB, ram=64 * MiB, bandwidth=100 * MiB, precopy_rounds=1,
                workload="random", socket_buffer=4 * MiB)
    runs = {m: shmig.run(cfg(fault_backend=backend, mode=m, **base)) for m in ("vanilla", "preempt", "preempt-full")}
    for r in runs.values():
        assert_ok(r)
        assert r.postcopy_latency_us["count"] > 0
    v50, p50, f50 = (runs[m].postcopy_latency_us["p50"] for m in ("vanilla", "preempt", "preempt-full"))
    assert f50 * 5 <= v50, f"preempt-full p50 {f50} us vs vanilla p50 {v50} us"
    assert p50 * 1.5 <= v50, f"preempt p50 {p50} us vs vanilla p50 {v50} us"


# -- bugs ------------------------------------------------------------------------------------------

@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("variant", ["vanilla", "preempt"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_single_vcpu_sequential_wake_race(variant, backend):
    """Regression: one sequential vCPU faults at the frontier of the background scan, so its wait
    slot changes while the receiver that just placed a frame looks for vCPUs to wake. Receiver.wake()
    used to run np.isin on the live shared view, which reads it twice and could index out of bounds
    ('mig/dst/listen: IndexError: index 16 is out of bounds'), killing about one run in five."""
    for i in range(12):
        c = cfg(fault_backend=backend, workload="sequential", vcpus=1, precopy_rounds=0, deadline=20, **MODES[variant])
        r = shmig.run(c)
        assert r.ok, f"run {i}: status={r.status} error={r.error!r}"


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("variant", ["preempt", "preempt-full"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_postcopy_mode_converging_in_precopy(variant, backend):
    """Postcopy enabled but never started (precopy_rounds=None, no start_postcopy()): an idle guest
    converges after one round and the migration completes as a precopy one, as in QEMU."""
    c = cfg(fault_backend=backend, ram=8 * MiB, workload="idle", precopy_rounds=None, deadline=2.5, **MODES[variant])
    r = shmig.run(c)
    assert_ok(r)
    assert r.postcopy_bytes == 0


@pytest.mark.timeout(TIMEOUT)
def test_vanilla_converging_in_precopy_reports_downtime():
    c = cfg(mode="vanilla", ram=8 * MiB, workload="idle", precopy_rounds=None)
    r = shmig.run(c)
    assert_ok(r)
    assert r.postcopy_bytes == 0
    assert r.downtime_ms is not None and r.downtime_ms > 0, r.downtime_ms


@pytest.mark.timeout(TIMEOUT)
def test_start_postcopy_refused_in_precopy_mode():
    c = cfg(mode="precopy", ram=32 * MiB, bandwidth=50 * MiB, workload="random", max_rounds=3)
    m = shmig.Migration(c).start()
    try:
        assert m.wait_for(lambda s: s.rounds >= 1, timeout=30), "no precopy round ended"
        with pytest.raises(RuntimeError, match="postcopy is not enabled in mode 'precopy'"):
            m.start_postcopy()  # QEMU: postcopy-ram is off
    finally:
        r = m.wait()
    assert_ok(r)
    assert r.postcopy_requests == 0, r.postcopy_requests
    assert r.ram["discarded_host_pages"] == 0, r.ram
    assert r.ram["postcopy_bytes"] == 0, r.ram


@pytest.mark.timeout(TIMEOUT)
def test_start_postcopy_after_wait_does_not_leak_into_next_run():
    first = shmig.Migration(cfg(mode="vanilla", ram=8 * MiB, workload="idle", precopy_rounds=0)).start()
    assert_ok(first.wait())
    # postcopy enabled but not started: an idle guest converges in precopy, nothing goes in postcopy
    second = shmig.Migration(cfg(mode="vanilla", ram=16 * MiB, workload="idle", precopy_rounds=None)).start()
    try:
        with pytest.raises(RuntimeError, match="not running"):
            first.start_postcopy()  # a finished migration refuses; it never acts on another
    finally:
        r = second.wait()
    assert_ok(r)
    assert r.postcopy_bytes == 0 and r.ram["discarded_host_pages"] == 0, r.ram


@pytest.mark.timeout(TIMEOUT)
def test_summary_of_a_quick_postcopy():
    """An idle guest and one precopy round leave nothing for postcopy: it ends at once. About one
    run in four hits it; 20 runs make it certain."""
    for i in range(20):
        r = shmig.run(cfg(ram=4 * MiB, workload="idle", precopy_rounds=1))
        assert_ok(r)
        assert "downtime" in r.summary()


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("backend", BACKENDS)
def test_registered_policy_runs_end_to_end(backend):
    """A user's policy (here: prefetch the neighbours of a requested page) is a mode like any other."""
    from shmig import policies

    class Prefetch(policies.PreemptFull):
        def on_request(self, hp: int) -> None:
            for p in range(hp, min(hp + 4, self.src.nhost)):
                super().on_request(p)

    policies.register("test-prefetch", Prefetch)
    try:
        # a slow background, so that the guest's faults are what moves pages
        c = cfg(fault_backend=backend, mode="test-prefetch", ram=8 * MiB, workload="sequential", precopy_rounds=0,
                max_postcopy_bandwidth=16 * MiB)
        assert c.validate().uses_preempt_channel
        r = shmig.run(c)
    finally:
        del policies.POLICIES["test-prefetch"]
    assert_ok(r)
    assert r.ram["channel_bytes"]["postcopy"] > 0
    with pytest.raises(shmig.ConfigError):
        cfg(fault_backend=backend, mode="test-prefetch").validate()


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_vcpus_own_view_of_their_faults(backend):
    """Beside the blocktime each backend stamps (the vCPU's own fault log; the fault thread's uffd
    events), each vCPU says how long it slept by the kernel's accounting (guest.SleepClock). The
    two bound each other, whatever the machine's load: a bitmap vCPU sleeps only inside its
    stamped faults (its stamps also hold its CPU and its waits for a CPU), a uffd vCPU sleeps
    through the whole of each event-stamped fault (it is woken only after the placement's stamp,
    and was asleep before its event was read). A paced guest's sleeps are not counted as faults'."""
    c = cfg(fault_backend=backend, mode="preempt-full", ram=32 * MiB, vcpus=2, precopy_rounds=0,
            max_postcopy_bandwidth=16 * MiB)  # the background slow: the guest's faults move the pages
    r = shmig.run(c)
    assert_postcopy_report(r, c)
    slept, blocked = r.postcopy_vcpu_slept_ms, r.postcopy_vcpu_blocktime_ms
    if None in slept:
        pytest.skip("no /proc/thread-self/schedstat here (CONFIG_SCHED_INFO)")
    assert len(slept) == c.vcpus and all(s >= 0 for s in slept), slept
    assert sum(blocked) >= 20, (blocked, r.postcopy_latency_us)  # enough faults to compare
    assert sum(slept) > 0, slept
    if backend == "bitmap":
        assert sum(slept) <= 1.02 * sum(blocked) + 1, (slept, blocked)
    else:
        assert sum(slept) >= 0.98 * sum(blocked) - 1, (slept, blocked)
    assert "vCPUs' view" in r.summary()
    paced = shmig.run(cfg(fault_backend=backend, mode="preempt-full", ram=8 * MiB, vcpus=1, precopy_rounds=1,
                          workload="idle"))
    assert_ok(paced)
    assert paced.postcopy_vcpu_slept_ms[0] < 0.2 * paced.total_time_ms, paced.postcopy_vcpu_slept_ms
