"""shmig.tcp: the send and receive buffers Linux's autotuning gives one connection, on a fake clock.

Expected values are worked out by hand from the kernel's functions (net/ipv4/tcp_input.c:
tcp_sndbuf_expand, tcp_rcv_space_adjust, tcp_rcvbuf_grow; include/net/sock.h: the write-space
rule), not copied from the model's output.
"""

import pytest

from shmig.tcp import (ETH_ADVMSS, ETH_MSS, LINUX_5_DEFAULTS, LINUX_DEFAULTS, LOOPBACK_MSS,
                       NOTSENT_LOWAT_UNLIMITED, Connection, RcvbufGrowth, ReceiveBuffer, SendBuffer,
                       SocketQueue, SysctlError, TcpSysctls, cwnd_estimate, in_flight_estimate,
                       sndbuf_per_mss, space_from_win, steady_state, win_from_space)

KiB, MiB = 1024, 1024**2
US = 1000  # ns
GBIT, TEN_GBIT = 125e6, 1.25e9  # bytes/s


# --- the send buffer -----------------------------------------------------------------------------

def test_memory_per_segment_is_a_power_of_two_head_plus_the_skb():
    # 1448 + 320 (MAX_TCP_HEADER) + 320 (skb_shared_info) = 2088 -> 4096, + 256 (sk_buff)
    assert sndbuf_per_mss(ETH_MSS) == 4352
    assert sndbuf_per_mss(LOOPBACK_MSS) == 128 * KiB + 256  # loopback's 64 KiB segments


def test_send_buffer_starts_at_wmem_default_and_grows_to_twice_the_window():
    s = SendBuffer()
    assert s.sndbuf == 16 * KiB  # tcp_init_sock: tcp_wmem[1]
    assert s.established() == 2 * 10 * 4352  # tcp_init_buffer_space: TCP_INIT_CWND
    assert s.acked(cwnd=100, in_flight=50) == 2 * 100 * 4352


def test_send_buffer_is_capped_by_wmem_max_and_never_shrinks():
    s = SendBuffer()
    s.established()
    assert s.acked(cwnd=10_000, in_flight=1) == 4 * MiB
    assert s.acked(cwnd=20, in_flight=1) == 4 * MiB


def test_send_buffer_grows_only_when_the_writer_waits_and_the_window_is_not_full():
    s = SendBuffer()
    s.established()
    before = s.sndbuf
    assert s.acked(cwnd=100, in_flight=100) == before  # tcp_should_expand_sndbuf: cwnd full
    assert s.acked(cwnd=100, in_flight=10, writer_waiting=False) == before  # no SOCK_NOSPACE
    assert s.acked(cwnd=100, in_flight=99) > before


def test_blocked_writer_wakes_when_a_third_is_free():
    s = SendBuffer()
    s.sndbuf = 3000
    assert s.wake_at == 2000
    assert s.wakes_writer(queued=2000, unsent=0)  # 3000 - 2000 >= 2000 / 2
    assert not s.wakes_writer(queued=2002, unsent=0)
    assert s.has_room(queued=2999, unsent=0) and not s.has_room(queued=3000, unsent=0)


def test_notsent_lowat_limits_the_unsent_part_and_wakes_at_half_of_it():
    s = SendBuffer(TcpSysctls(notsent_lowat=128 * KiB))
    s.sndbuf = 4 * MiB
    assert s.has_room(queued=1 * MiB, unsent=128 * KiB - 1)
    assert not s.has_room(queued=1 * MiB, unsent=128 * KiB)
    assert s.wakes_writer(queued=1 * MiB, unsent=64 * KiB - 1)
    assert not s.wakes_writer(queued=1 * MiB, unsent=64 * KiB)
    q = SocketQueue.of(s, ReceiveBuffer(), in_flight=200 * KiB)
    assert q.send == 200 * KiB + 128 * KiB and q.send_wake == 200 * KiB + 64 * KiB


# --- the receive buffer (DRS) ----------------------------------------------------------------------

def test_receive_buffer_starts_at_rmem_default_with_ten_segments_of_space():
    r = ReceiveBuffer()
    assert r.rcvbuf == 128 * KiB and r.window == 64 * KiB  # 50% of truesize until measured
    assert r.space == 10 * ETH_ADVMSS


def test_window_and_space_conversions_are_inverse_at_the_default_ratio():
    assert win_from_space(128 * KiB, 128) == 64 * KiB
    assert space_from_win(64 * KiB, 128) == 128 * KiB
    assert win_from_space(space_from_win(100_000, 188), 188) in (99_999, 100_000)


@pytest.mark.parametrize("growth,window", [
    # copied 29200 after 14600: rcvwin = 2 * 29200, plus 2 * rcvwin * (29200 - 14600) / 14600
    (RcvbufGrowth.LINUX_6_18, 58400 + 2 * 58400),
    # <= 6.15 adds 16 * advmss to rcvwin before the slow-start term
    (RcvbufGrowth.LINUX_5, (58400 + 16 * 1460) * 3),
    # 6.16-6.17: 2 * copied only = 58400, whose truesize (116800) is below the 128 KiB start
    (RcvbufGrowth.LINUX_6_16, 64 * KiB),
])
def test_one_growth_step_follows_the_kernel_formula(growth, window):
    r = ReceiveBuffer(TcpSysctls(growth=growth))
    r.established(0)
    r.read(100 * US, 14600, rtt_ns=100 * US)  # no more than space: a new measure, no growth
    assert r.window == 64 * KiB
    r.read(200 * US, 14600 + 29200, rtt_ns=100 * US)
    assert r.window == window
    assert r.space == 29200


def test_no_measure_before_a_round_trip_has_passed():
    r = ReceiveBuffer()
    r.established(0)
    assert not r.read(99 * US, 10 * MiB, rtt_ns=100 * US)
    assert not r.read(100 * US, 10 * MiB, rtt_ns=0)  # no RTT estimate yet
    assert r.read(100 * US, 10 * MiB, rtt_ns=100 * US)


def test_unread_bytes_do_not_count_as_consumed_since_6_16():
    new, old = ReceiveBuffer(), ReceiveBuffer(LINUX_5_DEFAULTS)
    for r in (new, old):
        r.established(0)
        r.read(100 * US, 40_000, rtt_ns=100 * US, unread=30_000)
    assert new.rcvbuf == 128 * KiB  # 10000 consumed: less than space
    assert old.rcvbuf > 128 * KiB


def test_receive_buffer_is_capped_by_rmem_max_and_off_without_moderation():
    for sysctls, cap in ((LINUX_DEFAULTS, 32 * MiB), (LINUX_5_DEFAULTS, 6 * MiB),
                         (TcpSysctls(moderate_rcvbuf=False), 128 * KiB)):
        r = ReceiveBuffer(sysctls)
        r.established(0)
        copied = 0
        for i in range(1, 30):
            copied += 14600 << i
            r.read(i * 100 * US, copied, rtt_ns=100 * US)
        assert r.rcvbuf == cap


def test_slow_start_grows_the_window_sixfold_the_last_round_trip():
    """A sender doubling its rate each RTT: 6.18's DRS gives the window twice the bytes read in
    the last RTT, plus twice that again for each doubling: 2 + 4 = 6 times those bytes."""
    c = Connection()
    c.established(0)
    windows = []
    for i in range(1, 7):
        copied = 14600 * (2**i - 1)  # 14600, 29200, 58400, ... per round trip
        windows.append(c.round_trip(i * 100 * US, copied, 100 * US, cwnd=10 * 2**i, in_flight=0).window)
    assert windows[0] == 64 * KiB  # 14600: no more than the initial space
    assert windows[1:] == [6 * 14600 * 2**i for i in range(1, 6)]


# --- the queue of a bulk connection on a link ----------------------------------------------------

def test_cwnd_covers_twice_the_link_plus_what_small_queues_hold():
    # 1 Gbit/s, 100 us: 12500 bytes on the wire, 2 * 125e6 >> 10 = 244140 in the qdisc
    assert in_flight_estimate(GBIT, 100e-6) == 12_500 + 244_140
    assert cwnd_estimate(GBIT, 100e-6) == -(-2 * 256_640 // ETH_MSS)
    # 10 Gbit/s: small queues' cap, 1 MiB before 6.16, 4 MiB since
    assert in_flight_estimate(TEN_GBIT, 100e-6, LINUX_5_DEFAULTS) == 125_000 + 1 * MiB
    assert in_flight_estimate(TEN_GBIT, 100e-6) == 125_000 + (int(2 * TEN_GBIT) >> 10)
    with pytest.raises(ValueError):
        cwnd_estimate(0, 1e-3)


def test_one_gigabit_holds_far_less_than_ten_mib():
    q = steady_state(GBIT, 100e-6)
    assert 2.5 * MiB < q.send < 4 * MiB  # the send buffer follows cwnd, short of tcp_wmem[2]
    assert q.window < 2 * MiB  # DRS sizes the receive side from what one round trip carries
    full_10mib_ms = 10 * MiB / GBIT * 1e3  # 84 ms
    assert q.capacity / GBIT * 1e3 < full_10mib_ms / 2


def test_ten_gigabit_send_side_reaches_wmem_max():
    for sysctls in (LINUX_DEFAULTS, LINUX_5_DEFAULTS):
        assert steady_state(TEN_GBIT, 100e-6, sysctls).send == 4 * MiB


def test_default_sysctls_of_2022_cannot_hold_the_letters_vanilla_wait_at_ten_gigabit():
    """QEMU's letter: vanilla 10.68 ms at 10 Gbit/s, 13.4 MB of queue. Linux 5.x's defaults
    hold at most tcp_wmem[2] + half of tcp_rmem[2] = 7 MiB, 5.9 ms there."""
    q = steady_state(TEN_GBIT, 100e-6, LINUX_5_DEFAULTS)
    assert q.capacity <= SocketQueue.most(LINUX_5_DEFAULTS).capacity == 7 * MiB
    assert q.capacity / TEN_GBIT * 1e3 < 10.68


def test_a_longer_round_trip_grows_the_receive_side():
    short, long = steady_state(GBIT, 100e-6), steady_state(GBIT, 10e-3)
    assert long.window > short.window


def test_largest_queue_is_both_maxima():
    most = SocketQueue.most()
    assert most.send == 4 * MiB and most.window == 16 * MiB and most.capacity == 20 * MiB
    assert most.wake_at == most.window + (2 * 4 * MiB) // 3


# --- sysctls ----------------------------------------------------------------------------------------

def test_sysctls_from_cli_strings():
    s = TcpSysctls.from_strings(wmem="4096 16384 16MiB", rmem="4096,131072,6M", notsent_lowat="128KiB")
    assert s.wmem == (4096, 16384, 16 * MiB) and s.rmem == (4096, 131072, 6 * MiB)
    assert s.notsent_lowat == 128 * KiB
    assert TcpSysctls.from_strings(notsent_lowat="unlimited").notsent_lowat == NOTSENT_LOWAT_UNLIMITED
    assert TcpSysctls.from_strings() == LINUX_DEFAULTS


@pytest.mark.parametrize("kw,words", [
    ({"wmem": "4096 16384"}, "three sizes"),
    ({"rmem": "4096 1MiB 128KiB"}, "min <= default <= max"),
    ({"wmem": "4096 lots 4MiB"}, "--tcp-wmem"),
    ({"notsent_lowat": "-5"}, "--tcp-notsent-lowat"),
])
def test_bad_sysctls_are_one_line(kw, words):
    with pytest.raises(SysctlError, match=words) as e:
        TcpSysctls.from_strings(**kw)
    assert "\n" not in str(e.value)


def test_bad_sysctl_values_in_the_api():
    with pytest.raises(SysctlError):
        TcpSysctls(wmem=(0, 16384, 4 * MiB))
    with pytest.raises(SysctlError):
        TcpSysctls(notsent_lowat=0)
    with pytest.raises(ValueError):
        ReceiveBuffer(scaling_ratio=256)
