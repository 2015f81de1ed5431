"""shmig.multifd: QEMU 10.1's rules for multifd with postcopy, as a table the tests read against
ram.c (ram_save_target_page, save_zero_page), multifd-zero-page.c and multifd.c."""

from __future__ import annotations

import multiprocessing
import types

import numpy as np
import pytest

from shmig import link as link_mod
from shmig.errors import ConfigError
from shmig.link import CHANNELS, STATE_WORDS, Link, channel_names, state_words
from shmig.multifd import (MAX_CHANNELS, Multifd, Route, ZeroCheck, ZeroPageDetection, sync_wait,
                           writes_zero_page)

Z = ZeroPageDetection
MiB = 1 << 20


def test_off_by_default_with_qemus_default_detection():
    m = Multifd.of(0)
    assert not m.enabled and m.zero_page_detection is Z.MULTIFD
    assert list(m.link_indices()) == [] and not m.flushes_before_postcopy()


def test_channels_follow_the_main_and_preempt_channels_on_the_link():
    assert list(Multifd.of(4).link_indices()) == [2, 3, 4, 5]


@pytest.mark.parametrize("bad", [-1, MAX_CHANNELS + 1, 2.0, True, "4"])
def test_bad_channel_count_is_one_line(bad):
    with pytest.raises(ConfigError, match="--multifd-channels") as ei:
        Multifd.of(bad)
    assert "\n" not in str(ei.value)


def test_bad_detection_names_the_choices():
    with pytest.raises(ConfigError, match="none, legacy, multifd"):
        Multifd.of(2, "zlib")


@pytest.mark.parametrize("channels", [0, 4])
@pytest.mark.parametrize("postcopy", [False, True])
def test_pages_go_over_multifd_only_in_precopy(channels, postcopy):
    want = Route.MULTIFD if channels and not postcopy else Route.PSS
    assert Multifd.of(channels).route(postcopy) is want


# ram_save_target_page: (channels, detection, in postcopy) -> who finds a zero page
ZERO_TABLE = [
    (0, "multifd", False, ZeroCheck.MIGRATION_THREAD),  # multifd off: save_zero_page, whatever the setting
    (0, "multifd", True, ZeroCheck.MIGRATION_THREAD),
    (0, "legacy", True, ZeroCheck.MIGRATION_THREAD),
    (0, "none", False, ZeroCheck.NOBODY),
    (4, "multifd", False, ZeroCheck.SEND_THREAD),
    (4, "multifd", True, ZeroCheck.NOBODY),  # postcopy bypasses multifd, and legacy detection is off
    (4, "legacy", False, ZeroCheck.MIGRATION_THREAD),
    (4, "legacy", True, ZeroCheck.MIGRATION_THREAD),
    (4, "none", False, ZeroCheck.NOBODY),
    (4, "none", True, ZeroCheck.NOBODY),
]


@pytest.mark.parametrize("channels,detection,postcopy,who", ZERO_TABLE)
def test_who_finds_a_zero_page(channels, detection, postcopy, who):
    assert Multifd.of(channels, detection).zero_check(postcopy) is who


def test_zero_pages_are_always_written_with_postcopy_on():
    assert writes_zero_page(postcopy_ram=True, received=False)
    assert writes_zero_page(postcopy_ram=True, received=True)
    assert writes_zero_page(postcopy_ram=False, received=True)  # sent again: the old contents go
    assert not writes_zero_page(postcopy_ram=False, received=False)  # memory starts zeroed


def test_sync_wait_is_the_whole_backlog_on_the_shared_link():
    assert sync_wait([10 * MiB] * 4, 100 * MiB) == pytest.approx(0.4)  # four queues, one link
    assert sync_wait([0, 0], 100 * MiB) == 0.0
    assert sync_wait([10 * MiB], None) == 0.0
    with pytest.raises(ValueError):
        sync_wait([-1], 1.0)


# -- the link grows a socket queue per multifd channel ---------------------------------------------

def test_channel_names_follow_qemus_threads():
    assert channel_names(2) == ("precopy", "postcopy", "multifd0", "multifd1")
    assert channel_names() == CHANNELS and state_words() == STATE_WORDS


def test_link_sized_for_multifd_shares_one_clock_across_every_queue(monkeypatch):
    """Four multifd channels of 1 MiB each on a 100 MiB/s link: each has its own queue, and the
    link carries all four in 40 ms (one link), not 10 ms (four links)."""
    now = [10**12]

    def sleep(s: float) -> None:
        now[0] += int(s * 1e9) + 1

    monkeypatch.setattr(link_mod, "time", types.SimpleNamespace(monotonic_ns=lambda: now[0]))
    m = Multifd.of(4)
    link = Link(np.zeros(state_words(2 + m.channels), np.int64), 100 * MiB, 0.0, 16 * MiB,
                multiprocessing.get_context("fork").Lock())
    try:
        assert link.channels == 6
        t0 = now[0]
        for ch in m.link_indices():
            link.sent(ch, MiB)
        assert [link.queued(ch) for ch in range(6)] == [0, 0, MiB, MiB, MiB, MiB]
        done = max(link.carry(ch, MiB, t0, sleep) for ch in m.link_indices())
        assert (done - t0) / 1e9 == pytest.approx(sync_wait([MiB] * 4, 100 * MiB), rel=0.01)
        assert all(link.queued(ch) == 0 for ch in range(6))
        link.sent(5, MiB)
        link.drop_queues()  # a broken connection loses every queue, multifd's too
        assert link.queued(5) == 0
    finally:
        link.close()


# -- zero-page-detection on today's channels (multifd off) ------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("detection", ["legacy", "none"])
def test_zero_page_detection_none_sends_zero_pages_whole(detection):
    """save_zero_page returns at once with zero-page-detection=none: a zero page is a normal page
    (its 4 KiB on the wire), and the destination still ends with the guest's RAM."""
    import shmig
    from helpers import assert_ok

    c = shmig.Config(mode="preempt-full", ram=16 * MiB, precopy_rounds=0, zero_fraction=0.5, workload="idle",
                     zero_page_detection=detection, deadline=60)
    r = shmig.run(c)
    assert_ok(r)
    assert r.config["zero_page_detection"] == detection
    if detection == "none":
        assert r.ram["zero_pages"] == 0, r.ram
        assert r.ram["normal_pages"] >= c.npages, r.ram
    else:
        assert r.ram["zero_pages"] > c.npages // 4, r.ram  # about half the pages are zero


def test_unknown_zero_page_detection_is_a_config_error():
    import shmig

    with pytest.raises(ConfigError, match="--zero-page-detection must be one of none, legacy, multifd"):
        shmig.Config(ram=16 * MiB, zero_page_detection="zlib").validate()
