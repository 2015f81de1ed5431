"""shmig.multifd: QEMU 10.1's rules for multifd with postcopy, as a table the tests read against
ram.c (ram_save_target_page_legacy, save_zero_page), multifd-zero-page.c and multifd.c."""

from __future__ import annotations

import pytest

from shmig.errors import ConfigError
from shmig.multifd import (MAX_CHANNELS, Multifd, Route, ZeroCheck, ZeroPageDetection, sync_wait,
                           writes_zero_page)

Z = ZeroPageDetection


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


# ram_save_target_page_legacy: (channels, detection, in postcopy) -> who finds a zero page
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
    mib = 1 << 20
    assert sync_wait([10 * mib] * 4, 100 * mib) == pytest.approx(0.4)  # four queues, one link
    assert sync_wait([0, 0], 100 * mib) == 0.0
    assert sync_wait([10 * mib], None) == 0.0
    with pytest.raises(ValueError):
        sync_wait([-1], 1.0)
