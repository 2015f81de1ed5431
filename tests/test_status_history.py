"""The report's status history: QEMU's MigrationStatus names, in QEMU's order for the version each
mode stands for (shmig.status), with times that never go back."""

import pytest

import shmig
from shmig.status import V10_1, QemuVersion, Side, default_version, path, recovery

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


@pytest.mark.parametrize("mode, version, why", [
    ("preempt", "9.0", "8.0 removed break-huge"),
    ("preempt-full", "7.2", "before 8.0"),
    ("vanilla", "6.2", "shmig emulates QEMU 7.1 to 10.2"),
    ("vanilla", "ten", "cannot read 'ten'"),
])
def test_a_version_the_mode_does_not_stand_for_is_one_line(mode, version, why):
    with pytest.raises(shmig.ConfigError, match=why):
        shmig.Config(mode=mode, qemu_version=version).validate()


def test_the_page_hint_needs_10_1():
    with pytest.raises(shmig.ConfigError, match="10.1"):
        shmig.Config(mode="preempt-full", page_hint=True, qemu_version="10.0").validate()
    assert shmig.Config(mode="preempt-full", page_hint=True, qemu_version="10.1").validate().qemu == V10_1


def test_the_cli_refuses_it_before_anything_runs(capsys):
    from shmig.cli import main
    assert main(["run", "--mode", "preempt", "--qemu-version", "9.0", "--ram", "8MiB"]) == 2
    assert "shmig: error: --mode preempt stands for QEMU 7.1 to 7.2, not 9.0" in capsys.readouterr().err


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode, version", [("vanilla", "7.1"), ("vanilla", "9.2"), ("preempt-full", "10.0"),
                                           ("precopy", "9.2")])
def test_the_history_follows_the_version_asked_for(mode, version):
    r = shmig.run(shmig.Config(mode=mode, ram=16 * MiB, bandwidth=200 * MiB, workload="random",
                               precopy_rounds=0, qemu_version=version))
    assert r.ok, r.error
    v = QemuVersion.parse(version)
    assert r.status_history["qemu"] == version and r.config["qemu_version"] == version
    assert statuses(r) == [str(s) for s in path(Side.SOURCE, mode, v)]
    assert_times_ordered(r)
