"""The report's status history: QEMU's MigrationStatus names, in QEMU's order for the version each
mode stands for (shmig.status), with times that never go back."""

import pytest

import shmig
from helpers import BACKENDS
from shmig.status import V10_0, V10_1, QemuVersion, Side, default_version, during, path, recovery

MiB = 1024**2


def statuses(r: shmig.Report, side: str = "source") -> list[str]:
    return [h["status"] for h in r.status_history[side]]


def assert_times_ordered(r: shmig.Report) -> None:
    for side in ("source", "destination"):
        t = [h["t_ms"] for h in r.status_history[side]]
        assert t == sorted(t) and t[0] >= 0.0, r.status_history
    assert r.status_history["source"][0]["t_ms"] == 0.0


def assert_paths(r: shmig.Report, mode: str, version: QemuVersion) -> None:
    for side in Side:
        assert statuses(r, side) == [str(s) for s in path(side, mode, version)], side


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["precopy", "vanilla", "preempt", "preempt-full"])
def test_each_mode_goes_through_qemus_statuses_in_order(mode, backend):
    r = shmig.run(shmig.Config(mode=mode, ram=16 * MiB, bandwidth=200 * MiB, workload="random", precopy_rounds=0,
                               fault_backend=backend))
    assert r.ok, r.error
    version = default_version(mode)
    assert r.status_history["qemu"] == str(version)
    assert_paths(r, mode, version)
    assert_times_ordered(r)
    h = {e["status"]: e["t_ms"] for e in r.status_history["source"]}
    d = {e["status"]: e["t_ms"] for e in r.status_history["destination"]}
    # the destination is active before the source's PONG, and completes before the source joins
    # its return thread on the destination's SHUT
    assert d["active"] <= h["active"] and d["completed"] <= h["completed"]
    if mode != "precopy":  # completed ends the postcopy phase
        assert r.phases[-1][0] == "postcopy" and h["completed"] == r.phases[-1][2]
    if mode == "preempt":  # 7.2: postcopy-active before the VM stopped, no device status
        assert "device" not in h and h["postcopy-active"] <= r.phases[-1][1]
    if mode in ("vanilla", "preempt-full"):  # 10.2: the package loads in postcopy-device
        # (with no latency the destination may run before the source stamped the package sent)
        assert h["device"] <= h["postcopy-device"] <= h["postcopy-active"] < h["completed"]
        # the destination runs the guest before the source hears of it (the package's PONG)
        assert d["postcopy-device"] <= d["postcopy-active"] <= h["postcopy-active"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode, version, fault", [("preempt-full", "10.2", "postcopy-channel@50%"),
                                                  ("preempt", "7.1", "postcopy-channel@50%"),
                                                  ("vanilla", "9.2", "return-path@50%")])
def test_a_recovery_adds_qemus_recovery_statuses(mode, version, fault):
    c = shmig.Config(mode=mode, ram=16 * MiB, bandwidth=200 * MiB, workload="random", qemu_version=version,
                     precopy_rounds=0, inject_faults=[fault], recover_after=0.02)
    r = shmig.run(c)
    assert r.ok, r.error
    v = QemuVersion.parse(version)
    for side in Side:
        base = [str(s) for s in path(side, mode, v)]
        i = base.index("postcopy-active") + 1
        assert statuses(r, side) == base[:i] + [str(s) for s in recovery(side, v)] + base[i:], side
    assert_times_ordered(r)
    src = {e["status"]: e["t_ms"] for e in r.status_history["source"]}  # the last of each
    dst = {e["status"]: e["t_ms"] for e in r.status_history["destination"]}
    # the destination resumes on RESUME and answers RESUME_ACK, which the source waits for
    assert dst["postcopy-recover"] <= dst["postcopy-active"] <= src["postcopy-active"]


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
@pytest.mark.parametrize("mode, version", [("vanilla", "7.1"), ("vanilla", "9.2"), ("preempt-full", "8.0"),
                                           ("preempt-full", "10.0"), ("precopy", "7.1"), ("precopy", "9.2")])
def test_the_history_follows_the_version_asked_for(mode, version):
    r = shmig.run(shmig.Config(mode=mode, ram=16 * MiB, bandwidth=200 * MiB, workload="random",
                               precopy_rounds=0, qemu_version=version))
    assert r.ok, r.error
    v = QemuVersion.parse(version)
    assert r.status_history["qemu"] == version and r.config["qemu_version"] == version
    assert_paths(r, mode, v)
    assert_times_ordered(r)


@pytest.mark.parametrize("mode, version, phases, expected", [
    ("vanilla", "9.2", ["setup", "precopy", "switchover", "postcopy", "completion"],
     ["setup", "active", "postcopy-active", "postcopy-active", "postcopy-active"]),
    ("vanilla", "10.2", ["precopy", "switchover", "postcopy", "postcopy-paused", "postcopy-recover"],
     ["active", "device", "postcopy-active", "postcopy-paused", "postcopy-recover-setup"]),
    ("preempt", "7.1", ["switchover", "postcopy-recover"], ["postcopy-active", "postcopy-recover"]),
    ("precopy", "9.2", ["precopy", "switchover", "completion"], ["active", "active", "active"]),
    ("precopy", "10.0", ["precopy", "switchover", "completion"], ["active", "device", "device"]),
])
def test_each_phase_has_qemus_status_for_the_version(mode, version, phases, expected):
    assert [str(during(p, mode, QemuVersion.parse(version))) for p in phases] == expected


@pytest.mark.timeout(60)
def test_the_timeline_and_the_live_line_name_qemus_status():
    from shmig.progress import status_text
    from shmig.timeline import Sample
    r = shmig.run(shmig.Config(mode="vanilla", ram=16 * MiB, bandwidth=100 * MiB, workload="random",
                               precopy_rounds=1, qemu_version="10.0"))
    assert r.ok, r.error
    seen = [s["status"] for s in r.timeline]
    assert seen[0] in ("setup", "active") and "postcopy-active" in seen
    order = [str(s) for s in path(Side.SOURCE, "vanilla", V10_0)]
    assert [order.index(s) for s in seen] == sorted(order.index(s) for s in seen)  # never back
    assert " postcopy-active " in status_text(Sample(**r.timeline[-1]), None)
