"""Postcopy's completion per QEMU release: before 10.1 the migration thread completed once less than
``threshold-size`` (the measured bandwidth times downtime-limit) was pending and sent the rest in
ram_save_complete, outside the rate limit; since 10.1 (7aaa1fc072) it completes only when nothing
is pending, so the completion sends no page."""

import pytest

import shmig

MiB = 1024**2


def run(version: str) -> shmig.Report:
    r = shmig.run(shmig.Config(mode="vanilla", ram=16 * MiB, bandwidth=400 * MiB, max_postcopy_bandwidth=20 * MiB,
                               workload="idle", precopy_rounds=0, qemu_version=version))
    assert r.ok, r.error
    return r


@pytest.mark.timeout(60)
def test_since_10_1_no_page_is_sent_in_the_completion_before_it_the_tail_under_threshold_is():
    new, old = run("10.1"), run("9.2")
    assert new.ram["completion_pages"] == 0
    # 9.2: what 300 ms (downtime-limit) at the measured 20 MiB/s carries, 1536 pages, within a margin
    expected = 20 * MiB * 0.3 / 4096
    assert 0.5 * expected < old.ram["completion_pages"] < 1.5 * expected, old.ram
    # that tail went at the link's rate, not max-postcopy-bandwidth: the postcopy phase is shorter
    # by about a third (16 MiB at 20 MiB/s is 800 ms, of which 300 ms went at 400 MiB/s)
    assert old.postcopy_phase_ms < 0.85 * new.postcopy_phase_ms, (old.postcopy_phase_ms, new.postcopy_phase_ms)
