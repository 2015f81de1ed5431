"""The report's status history: QEMU's MigrationStatus names, in QEMU's order for the version each
mode stands for (shmig.status), with times that never go back."""

import pytest

import shmig
from shmig.status import Side, default_version, path, recovery

MiB = 1024**2


def statuses(r: shmig.Report) -> list[str]:
    return [h["status"] for h in r.status_history["source"]]


def assert_times_ordered(r: shmig.Report) -> None:
    t = [h["t_ms"] for h in r.status_history["source"]]
    assert t == sorted(t) and t[0] == 0.0, r.status_history


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["precopy", "vanilla", "preempt", "preempt-full"])
def test_each_mode_goes_through_qemus_statuses_in_order(mode):
    r = shmig.run(shmig.Config(mode=mode, ram=16 * MiB, bandwidth=200 * MiB, workload="random", precopy_rounds=0))
    assert r.ok, r.error
    version = default_version(mode)
    assert r.status_history["qemu"] == str(version)
    assert statuses(r) == [str(s) for s in path(Side.SOURCE, mode, version)]
    assert_times_ordered(r)
    h = {e["status"]: e["t_ms"] for e in r.status_history["source"]}
    if mode != "precopy":  # completed ends the postcopy phase
        assert r.phases[-1][0] == "postcopy" and h["completed"] == r.phases[-1][2]
    if mode == "preempt":  # 7.2: postcopy-active before the VM stopped, no device status
        assert "device" not in h and h["postcopy-active"] <= r.phases[-1][1]
    if mode in ("vanilla", "preempt-full"):  # 10.2: the package loads in postcopy-device
        # (with no latency the destination may run before the source stamped the package sent)
        assert h["device"] <= h["postcopy-device"] <= h["postcopy-active"] < h["completed"]


@pytest.mark.timeout(60)
def test_a_recovery_adds_qemus_recovery_statuses():
    c = shmig.Config(mode="preempt-full", ram=16 * MiB, bandwidth=200 * MiB, workload="random",
                     precopy_rounds=0, inject_faults=["postcopy-channel@50%"], recover_after=0.02)
    r = shmig.run(c)
    assert r.ok, r.error
    version = default_version("preempt-full")
    base = [str(s) for s in path(Side.SOURCE, "preempt-full", version)]
    i = base.index("postcopy-active") + 1
    assert statuses(r) == base[:i] + [str(s) for s in recovery(Side.SOURCE, version)] + base[i:]
    assert_times_ordered(r)
