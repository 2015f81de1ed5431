"""The socket queue a run's channels get: autotuned from the link and the sysctls, or fixed."""

import multiprocessing

import numpy as np
import pytest

from shmig import Config, ConfigError
from shmig.link import STATE_WORDS, Link
from shmig.tcp import LINUX_DEFAULTS, SocketQueue, steady_state

MiB = 1024**2
GBIT = 1e9 / 8


def cfg(**kw) -> Config:
    return Config.from_strings(ram="64MiB", **kw).validate()


def test_the_queue_follows_the_link():
    slow = cfg(bandwidth="1Gbit/s", latency="50us").socket_queue
    fast = cfg(bandwidth="10Gbit/s", latency="50us").socket_queue
    assert slow.capacity < fast.capacity
    # 1 Gbit/s: far less than the 84 ms a full 10 MiB queue would take to drain
    assert slow.capacity / GBIT < 0.05
    # 10 Gbit/s: more than 10 MiB (the cover letter's 10.68 ms vanilla wait is more than 10 MiB holds)
    assert fast.capacity > 10 * MiB
    # a longer round trip needs a larger window on the same link
    far = cfg(bandwidth="1Gbit/s", latency="1ms").socket_queue
    assert far.window > slow.window


def test_the_queue_is_the_models_steady_state():
    q = cfg(bandwidth="10Gbit/s", latency="50us").socket_queue
    assert q == steady_state(10 * GBIT, 100e-6, LINUX_DEFAULTS)


def test_the_sysctl_maxima_cap_it():
    q = cfg(bandwidth="10Gbit/s", latency="50us", tcp_rmem="4KiB 128KiB 6MiB", tcp_wmem="4KiB 16KiB 1MiB").socket_queue
    assert q.send == 1 * MiB
    assert q.window == 3 * MiB  # tcp_win_from_space(6 MiB) at the default 50% scaling ratio


def test_an_unlimited_link_gets_what_the_sysctls_allow():
    assert cfg().socket_queue == SocketQueue.most(LINUX_DEFAULTS)


def test_notsent_lowat_bounds_the_unsent_part():
    q = cfg(bandwidth="1Gbit/s", latency="50us", tcp_notsent_lowat="128KiB").socket_queue
    free = cfg(bandwidth="1Gbit/s", latency="50us").socket_queue
    assert q.send < free.send and q.send_wake < free.send_wake


def test_a_fixed_socket_buffer_overrides_autotuning():
    q = cfg(bandwidth="1Gbit/s", socket_buffer="10MiB").socket_queue
    assert (q.capacity, q.send, q.window) == (10 * MiB, 4 * MiB, 6 * MiB)
    q = cfg(socket_buffer="1MiB", send_buffer="256KiB").socket_queue
    assert (q.capacity, q.send, q.send_wake) == (1 * MiB, 256 * 1024, (2 * 256 * 1024) // 3)
    assert cfg(socket_buffer="1MiB").socket_queue.send == 1 * MiB  # the send part is at most the whole


@pytest.mark.parametrize("kw, msg", [
    ({"send_buffer": "1MiB"}, "--send-buffer is the send part of a fixed --socket-buffer"),
    ({"tcp_wmem": "4KiB 16KiB"}, "--tcp-wmem takes three sizes"),
    ({"tcp_rmem": "4KiB 1MiB 512KiB"}, "tcp_rmem 4096 1048576 524288: needs 0 < min <= default <= max"),
    ({"tcp_notsent_lowat": "lots"}, "--tcp-notsent-lowat"),
    ({"tcp_rmem": "4KiB 128KiB 4GiB"}, "lower them"),
])
def test_bad_sysctls_are_one_line(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        cfg(**kw)


def test_the_link_wakes_a_sender_where_the_queue_says():
    q = SocketQueue(send=300_000, send_wake=120_000, window=100_000)
    link = Link(np.zeros(STATE_WORDS, np.int64), None, 0.0, q.capacity, multiprocessing.get_context("fork").Lock(),
                send_buffer=q.send, send_wake=q.send_wake)
    try:
        assert (link.capacity, link.wake_at, link.rcvbuf) == (q.capacity, q.wake_at, q.window)
    finally:
        link.close()
