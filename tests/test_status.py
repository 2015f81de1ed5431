"""shmig.status: QEMU's MigrationStatus names and the order each side goes through them.

The expected orders are read off QEMU's sources (migration/migration.c, savevm.c, postcopy-ram.c at
the commits named in shmig/status.py), one version at a time.
"""

import pytest

from shmig.status import (LATEST, MODE_VERSIONS, MigrationStatus, QemuVersion, Side, StatusHistory,
                          StatusOrderError, VersionError, check_version, default_version, path,
                          recovery, transitions)

S = MigrationStatus
SRC, DST = Side.SOURCE, Side.DESTINATION
V = QemuVersion.parse


def names(statuses):
    return [str(s) for s in statuses]


def test_names_are_qapis_in_qapis_order():
    assert [str(s) for s in MigrationStatus] == [
        "none", "setup", "cancelling", "cancelled", "active", "postcopy-device", "postcopy-active",
        "postcopy-paused", "postcopy-recover-setup", "postcopy-recover", "completed", "failed",
        "colo", "pre-switchover", "device", "wait-unplug"]


@pytest.mark.parametrize("mode,version,src,dst", [
    # 10.2: device (10.0) and postcopy-device (10.2) on the source; postcopy-device on the destination
    ("preempt-full", "10.2", "setup active device postcopy-device postcopy-active completed",
     "setup active postcopy-device postcopy-active completed"),
    ("vanilla", "10.2", "setup active device postcopy-device postcopy-active completed",
     "setup active postcopy-device postcopy-active completed"),
    # 10.0 and 10.1: device, then postcopy-active at the end of postcopy_start()
    ("preempt-full", "10.1", "setup active device postcopy-active completed",
     "setup active postcopy-active completed"),
    ("vanilla", "10.0", "setup active device postcopy-active completed",
     "setup active postcopy-active completed"),
    # 8.2 - 9.2: postcopy-active from the start of postcopy_start(), switchover included
    ("preempt-full", "9.2", "setup active postcopy-active completed",
     "setup active postcopy-active completed"),
    # 7.1 - 8.1: the destination has no setup state (4111a732e8)
    ("preempt", "7.1", "setup active postcopy-active completed", "active postcopy-active completed"),
    ("preempt-full", "8.0", "setup active postcopy-active completed", "active postcopy-active completed"),
    # precopy: device since 10.0 on the source only
    ("precopy", "10.2", "setup active device completed", "setup active completed"),
    ("precopy", "9.2", "setup active completed", "setup active completed"),
])
def test_each_side_goes_through_qemus_statuses_in_order(mode, version, src, dst):
    assert names(path(SRC, mode, V(version))) == src.split()
    assert names(path(DST, mode, V(version))) == dst.split()


def test_recovery_has_recover_setup_on_the_source_since_9_1():
    assert names(recovery(SRC, V("10.2"))) == [
        "postcopy-paused", "postcopy-recover-setup", "postcopy-recover", "postcopy-active"]
    assert names(recovery(SRC, V("9.0"))) == ["postcopy-paused", "postcopy-recover", "postcopy-active"]
    assert names(recovery(DST, V("10.2"))) == ["postcopy-paused", "postcopy-recover", "postcopy-active"]


def stamp(side, mode, version, statuses):
    h = StatusHistory(side, mode, V(version))
    for t, s in enumerate(statuses):
        h.enter(s, t)
    return h


def test_a_full_history_with_two_recoveries_is_accepted():
    h = stamp(SRC, "preempt-full", "10.2",
              [*path(SRC, "preempt-full", V("10.2"))[:-1], *recovery(SRC, V("10.2")),
               S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER_SETUP, S.POSTCOPY_PAUSED,  # a failed attempt
               S.POSTCOPY_RECOVER_SETUP, S.POSTCOPY_RECOVER, S.POSTCOPY_ACTIVE, S.COMPLETED])
    assert h.completed
    assert h.first(S.POSTCOPY_ACTIVE) == 4 and h.first(S.COMPLETED) == len(h.entries) - 1


@pytest.mark.parametrize("side,mode,version,statuses,bad", [
    # postcopy-device is 10.2's
    (SRC, "preempt-full", "10.1", ["setup", "active", "device", "postcopy-device"], "postcopy-device"),
    # from postcopy-device the source fails, it does not pause (the VM still runs there)
    (SRC, "vanilla", "10.2", ["setup", "active", "device", "postcopy-device", "postcopy-paused"],
     "postcopy-paused"),
    # completed only after postcopy-active
    (DST, "vanilla", "10.2", ["setup", "active", "postcopy-device", "completed"], "completed"),
    # no recover-setup before 9.1
    (SRC, "preempt-full", "9.0", ["setup", "active", "postcopy-active", "postcopy-paused",
                                  "postcopy-recover-setup"], "postcopy-recover-setup"),
    # precopy never pauses
    (SRC, "precopy", "10.2", ["setup", "active", "postcopy-paused"], "postcopy-paused"),
    # nothing after completed
    (SRC, "precopy", "10.2", ["setup", "active", "device", "completed", "failed"], "failed"),
])
def test_out_of_order_statuses_are_refused_where_they_go_wrong(side, mode, version, statuses, bad):
    h = StatusHistory(side, mode, V(version))
    for t, s in enumerate(statuses[:-1]):
        h.enter(s, t)
    with pytest.raises(StatusOrderError, match=f"-> {bad}"):
        h.enter(statuses[-1], len(statuses))


def test_failed_is_reachable_from_every_status_not_yet_ended():
    for side in (SRC, DST):
        edges = transitions(side, "preempt-full", LATEST)
        assert all(S.FAILED in after for after in edges.values())
        assert S.COMPLETED not in edges and S.FAILED not in edges  # nothing follows them


def test_time_must_not_go_backwards_and_json_is_relative():
    h = StatusHistory(SRC, "precopy", LATEST)
    h.enter("setup", 1_000_000)
    with pytest.raises(StatusOrderError, match="before setup"):
        h.enter("active", 999_999)
    h.enter("active", 3_500_000)
    assert h.to_json(1_000_000) == [{"status": "setup", "t_ms": 0.0}, {"status": "active", "t_ms": 2.5}]
    assert not h.completed


def test_each_mode_stands_for_its_qemu_versions():
    assert default_version("preempt") == V("7.2")
    assert default_version("preempt-full") == default_version("vanilla") == LATEST
    assert default_version("my-policy") == LATEST  # a policy of the user's own
    check_version("preempt", V("7.1"))
    check_version("preempt-full", V("8.0"), page_hint=False)
    with pytest.raises(VersionError, match="preempt-full"):
        check_version("preempt", V("8.0"))
    with pytest.raises(VersionError, match=r"use --mode preempt\)"):
        check_version("preempt-full", V("7.2"))
    with pytest.raises(VersionError, match="page-hint"):
        check_version("preempt-full", V("10.0"), page_hint=True)
    with pytest.raises(VersionError, match="multifd"):
        check_version("vanilla", V("10.0"), multifd=True)
    check_version("precopy", V("9.0"), multifd=True)
    with pytest.raises(VersionError, match="emulates QEMU 7.1 to 10.2"):
        check_version("vanilla", V("6.2"))
    assert set(MODE_VERSIONS) == {"precopy", "vanilla", "preempt", "preempt-full"}


@pytest.mark.parametrize("text,version", [("10.2", (10, 2)), (" 7.1 ", (7, 1)), ("10.1.2", (10, 1))])
def test_versions_parse_and_order(text, version):
    assert QemuVersion.parse(text) == QemuVersion(*version)
    assert V("9.2") < V("10.0") < V("10.2")
    assert str(V("10.1")) == "10.1"


@pytest.mark.parametrize("text", ["10", "ten.two", "10.-1", "", "1.2.3.4"])
def test_bad_versions_are_one_line(text):
    with pytest.raises(VersionError, match="QEMU version") as e:
        QemuVersion.parse(text)
    assert "\n" not in str(e.value)
