"""Issue 22: inputs that passed validation and then broke a run (items 2, 3, 5, 6, 8, 9).

Each test failed before its fix: an empty compare exited 0, ``--repeat`` past the last seed ran
the first seed before refusing, overflowing units were a traceback or ``inf``, a tiny dirty rate
crashed the vCPU, ``--send-buffer`` above ``--socket-buffer`` was accepted and misreported, and
``Config(inject_faults=None)`` was a raw TypeError.
"""

from __future__ import annotations

import math

import pytest

import shmig.compare
from shmig.config import MAX_DEADLINE, MAX_RATE, Config, ConfigError
from shmig.units import UnitError, parse_rate, parse_size, parse_time

from test_cli import refused
from test_config import error_of

MiB = 1024**2


@pytest.fixture
def no_run(monkeypatch):
    """A compare that starts a run fails the test: every cell is checked before the first runs."""
    def started(*a, **kw):
        raise AssertionError("a run started before the plan was refused")
    monkeypatch.setattr(shmig.series, "run_one", started)


# --- item 2: an empty plan ------------------------------------------------------------

def test_compare_with_nothing_to_run_is_refused(capsys, no_run):
    line = refused(capsys, "compare", "--preset", "cover-letter", "--modes", "preempt-nobreak",
                   "--host-pages", "4KiB", "-q")
    assert "nothing to run" in line and "preempt-nobreak" in line


def test_plan_of_nothing_is_refused():
    with pytest.raises(ConfigError, match="nothing to run"):
        shmig.compare.plan({"ram": 16 * MiB}, [], [4096])


# --- item 3: every seed of --repeat before the first run --------------------------------

def test_repeat_past_the_last_seed_is_refused_before_any_run(capsys, no_run):
    line = refused(capsys, "compare", "--ram", "4MiB", "--modes", "vanilla", "--seed",
                   str(2**64 - 1), "--repeat", "2", "-q")
    assert "--repeat 2" in line and "2^64-1" in line


def test_repeat_up_to_the_last_seed_plans():
    plans = shmig.compare.plan({"ram": 4 * MiB, "seed": 2**64 - 2}, ["vanilla"], [4096], repeat=2)
    assert [n for _, n in plans.values()] == [2]


# --- item 5: values that overflow once their unit is applied ----------------------------

@pytest.mark.parametrize("parse,text", [(parse_size, "1e308T"), (parse_rate, "1e308TB/s"),
                                        (parse_time, "1e308min"), (parse_rate, "1e308Tbit/s")])
def test_units_that_overflow_are_refused(parse, text):
    with pytest.raises(UnitError, match="too large"):
        parse(text)


@pytest.mark.parametrize("argv,text", [
    (("--ram", "1e308T"), "--ram"),
    (("--bandwidth", "1e308TB/s"), "--bandwidth"),
    (("--deadline", "1e308min"), "--deadline"),
    (("--deadline", "2000000s"), "at most"),
    (("--bandwidth", "2TiB/s"), "at most"),
])
def test_cli_refuses_values_out_of_range(capsys, argv, text):
    assert text in refused(capsys, "run", "--ram", "4MiB", *argv)


@pytest.mark.parametrize("kw", [dict(deadline=math.inf), dict(deadline=MAX_DEADLINE * 2),
                                dict(bandwidth=math.inf), dict(max_bandwidth=MAX_RATE * 2),
                                dict(dirty_rate=math.inf), dict(downtime_limit=math.inf)])
def test_api_refuses_infinite_or_absurd_values(kw):
    error_of(Config(ram=4 * MiB, **kw))


def test_largest_values_are_accepted():
    Config(ram=4 * MiB, deadline=MAX_DEADLINE, bandwidth=MAX_RATE).validate()


# --- item 6: a dirty rate too small for any write ----------------------------------------

def test_tiny_dirty_rate_is_refused_with_the_smallest_accepted_value():
    msg = error_of(Config(ram=4 * MiB, dirty_rate=1e-10, vcpus=2, deadline=8.0))
    assert "at least 1024B/s" in msg  # two 4KiB pages in 8s
    Config(ram=4 * MiB, dirty_rate=1024.0, vcpus=2, deadline=8.0).validate()


# --- item 8: the send buffer is a part of the socket buffer ---------------------------------

def test_send_buffer_above_socket_buffer_is_refused(capsys):
    line = refused(capsys, "run", "--ram", "4MiB", "--socket-buffer", "1MiB", "--send-buffer", "2MiB")
    assert "--send-buffer 2MiB must be at most --socket-buffer 1MiB" in line


def test_the_send_buffer_used_is_the_one_given_or_all_of_a_smaller_socket():
    small = Config(ram=4 * MiB, socket_buffer=1 * MiB).validate()  # a smaller socket: all of it
    assert small.socket_queue.send == 1 * MiB
    given = Config(ram=4 * MiB, socket_buffer=1 * MiB, send_buffer=256 * 1024).validate()
    assert given.socket_queue.send == given.to_dict()["send_buffer"] == 256 * 1024


# --- item 9: types the API did not check -----------------------------------------------------

@pytest.mark.parametrize("kw,text", [(dict(inject_faults=None), "inject_faults must be a list"),
                                     (dict(inject_faults=[1]), "inject_faults must be a list"),
                                     (dict(time_dilation=[2]), "time_dilation must be a number"),
                                     (dict(time_dilation="4"), "time_dilation must be a number")])
def test_api_types_are_one_line(kw, text):
    with pytest.raises(ConfigError, match=text) as ei:
        Config(**kw)
    assert "\n" not in str(ei.value)


# --- item 13: a policy from the current directory leaves sys.path as it was -------------------

def test_policy_from_the_cwd_does_not_stay_on_sys_path(tmp_path, monkeypatch):
    import sys

    from shmig import policies
    (tmp_path / "holes_cwd_policy.py").write_text("class Mine:\n    name = 'mine'\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "holes_cwd_policy", raising=False)
    before = list(sys.path)
    cls = policies._import_class("holes_cwd_policy:Mine")
    sys.modules.pop("holes_cwd_policy", None)
    assert cls.name == "mine"  # the module in the current directory was found ...
    assert sys.path == before  # ... and the directory is not left where later imports look


# --- item 14: memory outside /dev/shm ------------------------------------------------------

def test_memory_outside_shm_is_counted_before_anything_is_allocated(monkeypatch):
    import shmig.config
    from shmig.destination import MAX_FRAME, channel_room
    assert shmig.config.RECEIVER_FRAME == MAX_FRAME
    big = Config(ram=4 * MiB, socket_buffer=1024 * MiB)
    assert big.heap_bytes() >= 2 * 2 * channel_room(big.socket_buffer)  # two receivers' read-ahead, doubled
    monkeypatch.setattr(shmig.config, "mem_available", lambda: 1024 * MiB)
    msg = error_of(big)
    assert "of receive buffers" in msg and "--socket-buffer" in msg
    Config(ram=4 * MiB).validate()  # the defaults fit in 1GiB
