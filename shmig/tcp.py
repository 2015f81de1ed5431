"""The socket buffers Linux gives one TCP connection, as its autotuning sizes them.

A page request written behind a channel's queue waits for that queue, and the queue is what the
kernel lets one connection hold: the sender's send buffer (unsent plus unacknowledged bytes) and
the receiver's receive queue (received, not yet read). Neither starts at its maximum:

* **Send buffer** (``sk_sndbuf``): ``tcp_wmem[1]`` (16 KiB) at ``tcp_init_sock()``; when the
  connection is established ``tcp_init_buffer_space()`` calls ``tcp_sndbuf_expand()``, and again
  ``tcp_new_space()`` whenever an ACK frees room while the writer waits for it (``SOCK_NOSPACE``,
  ``tcp_check_space()``) and the congestion window is not full (``tcp_should_expand_sndbuf()``).
  ``tcp_sndbuf_expand()`` (net/ipv4/tcp_input.c) sizes it for the worst case of one skb per segment:
  ``2 * max(TCP_INIT_CWND, cwnd, reordering + 1) * per_mss``, ``per_mss`` being the segment plus
  ``MAX_TCP_HEADER`` and ``skb_shared_info`` rounded up to a power of two, plus ``struct sk_buff``
  (4352 bytes for a 1448-byte MSS: about three times the payload), capped at ``tcp_wmem[2]``. It
  never shrinks (only memory pressure moderates it).
* **Receive buffer** (``sk_rcvbuf``): ``tcp_rmem[1]`` (128 KiB) at start; Dynamic Right-Sizing,
  ``tcp_rcv_space_adjust()``, runs when the application reads, at most once per receiver RTT
  estimate: if the application read more in the last RTT than in the RTT of the last growth
  (``rcvq_space.space``), the buffer grows to hold twice that, plus a slow-start allowance, in
  truesize (``tcp_space_from_win()``), capped at ``tcp_rmem[2]``; it never shrinks either. The
  window advertised, hence what the receive queue may hold, is ``tcp_win_from_space(sk_rcvbuf)``:
  the payload share of the buffer (``scaling_ratio``/256, 50% until measured).
* A writer finds room while ``sk_wmem_queued < sk_sndbuf`` and fewer than ``tcp_notsent_lowat``
  bytes are unsent (``sk_stream_memory_free()``, ``tcp_stream_memory_free()``), and once blocked it
  is woken only when a third of the buffer is free (``sk_stream_wspace() >=
  sk_stream_min_wspace()``) and fewer than half of ``tcp_notsent_lowat`` are unsent.

So the queue follows the link: DRS sizes the receive side from the bytes the destination reads
per round trip (a few bandwidth-delay products: small on a LAN), and the send side follows the
congestion window, which the link's rate and round trip, and what TCP small queues let wait in the
sender's qdisc, decide. The kernel moved: ``tcp_rmem[2]`` is 32 MiB since Linux 6.16 (572be9bf9d0d,
6 MiB from 2012 until then), ``tcp_limit_output_bytes`` 4 MiB (9ea3bfa61b09, 1 MiB before), and
DRS's formula changed twice (``RcvbufGrowth``). ``LINUX_DEFAULTS`` are today's (this machine runs
6.18), ``LINUX_5_DEFAULTS`` those of the hosts of QEMU's 2022 preemption letters.

This module is a pure model: no processes, no clock of its own. Times are integer nanoseconds of
emulated time passed in by the caller (integers, as the kernel's microseconds: a measure one round
trip long is one round trip long), so tests drive it with a fake clock and the link with its own.

How the emulated link (``shmig/link.py``) should use it: one ``Connection`` per data channel, kept
by the channel's receiver, which is where shmig's link carries bytes. Once per round trip
(``rtt_ns``: twice ``--latency`` plus what the sender's qdisc holds, never less than
``LOOPBACK_RTT_NS``) it calls ``Connection.round_trip(now_ns, copied, rtt_ns, cwnd, in_flight)``
with the bytes its consumer took off the channel so far, ``cwnd`` from ``cwnd_estimate()`` (the link
has no congestion control of its own) and ``in_flight = min(cwnd * mss, bytes queued)``, and
stores the returned ``SocketQueue`` in the link's shared state for that channel. ``send`` bounds
the sender's side, ``sent - carried`` (``Link.capacity`` counts both ends there today: right while
the destination reads slower than the link, one window too long while it keeps up), ``send_wake``
is ``Link.wake_at`` counted the same way, and ``window`` is ``Link.rcvbuf``: what the kernel goes on
receiving while the receiving thread is busy placing a huge page, and what a destination slower
than the link leaves unread (its read-ahead). The pipe and read-ahead are allocated for
``SocketQueue.most(sysctls)``, the largest the queue can grow to. ``--socket-buffer`` stays a fixed
size that overrides all of this, as ``setsockopt()`` with ``SO_SNDBUF``/``SO_RCVBUF`` locks a
buffer against autotuning (``SOCK_SNDBUF_LOCK``, ``SOCK_RCVBUF_LOCK``).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from .units import UnitError, parse_size

KiB, MiB = 1024, 1024**2

TCP_INIT_CWND = 10  # include/net/tcp.h
TCP_RMEM_TO_WIN_SCALE = 8  # scaling_ratio is the payload share of truesize, in 256ths
TCP_DEFAULT_SCALING_RATIO = 1 << (TCP_RMEM_TO_WIN_SCALE - 1)  # 50% until tcp_measure_rcv_mss() measures it
# x86_64 distribution kernel: MAX_TCP_HEADER = L1_CACHE_ALIGN(128 + MAX_HEADER) with
# LL_MAX_HEADER 128 and tunnels (+48); SKB_DATA_ALIGN(sizeof(struct skb_shared_info)) with
# MAX_SKB_FRAGS 17; SKB_DATA_ALIGN(sizeof(struct sk_buff))
MAX_TCP_HEADER = 320
SHINFO_SIZE = 320
SKB_SIZE = 256
NOTSENT_LOWAT_UNLIMITED = 2**32 - 1  # tcp_notsent_lowat's default (UINT_MAX)
ETH_MSS = 1448  # mss_cache of a 1500-byte MTU with timestamps
ETH_ADVMSS = 1460
LOOPBACK_MSS = 65483  # 65536-byte MTU of lo, with timestamps
TCP_REORDERING = 3  # net.ipv4.tcp_reordering
SK_PACING_SHIFT = 10  # TCP small queues: about 1 ms at the pacing rate (tcp_small_queue_check)
SS_PACING_RATIO = 2.0  # tcp_pacing_ss_ratio 200%: pacing rate in slow start, per delivery rate
LOOPBACK_RTT_NS = 20_000  # a round trip never measures below this: loopback's order


class RcvbufGrowth(enum.Enum):
    """How ``tcp_rcv_space_adjust()`` grows the receive buffer once the application read ``copied``
    bytes in an RTT, more than the ``space`` of the last growth (net/ipv4/tcp_input.c)."""

    # 2.6.x - 6.15: rcvwin = 2 * copied + 16 * advmss, plus 2 * rcvwin * (copied - space) / space
    # for a sender still doubling its rate
    LINUX_5 = "5.x-6.15"
    # 6.16 - 6.17: tcp_rcvbuf_grow(), "tcp: fix sk_rcvbuf overshoot" (65c5287892e9): 2 * copied only,
    # copied net of what still waits unread ("receive queue awareness", ea33537d8292)
    LINUX_6_16 = "6.16-6.17"
    # 6.18 on: "tcp: fix too slow tcp_rcvbuf_grow() action" (aa251c84636c) brings the slow-start
    # allowance back, without the 16 * advmss cushion
    LINUX_6_18 = "6.18+"


class SysctlError(ValueError):
    """A TCP sysctl that cannot be: one line saying what to change."""


def _triple(name: str, value: tuple[int, int, int]) -> None:
    if len(value) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise SysctlError(f"{name} is three sizes, min default max (e.g. 4096 16384 4194304), got {value!r}")
    lo, mid, hi = value
    if not 0 < lo <= mid <= hi:
        raise SysctlError(f"{name} {lo} {mid} {hi}: needs 0 < min <= default <= max")


@dataclass(frozen=True)
class TcpSysctls:
    """The ``net.ipv4`` settings that size a connection's buffers (Documentation/networking/ip-sysctl.rst)."""

    wmem: tuple[int, int, int] = (4 * KiB, 16 * KiB, 4 * MiB)  # tcp_wmem: min, default, max
    # tcp_rmem: Linux 6.16+ (572be9bf9d0d); the max is lower on hosts with little RAM
    # (tcp_init(): at most 1/128 of the memory pressure threshold)
    rmem: tuple[int, int, int] = (4 * KiB, 128 * KiB, 32 * MiB)
    notsent_lowat: int = NOTSENT_LOWAT_UNLIMITED  # tcp_notsent_lowat
    moderate_rcvbuf: bool = True  # tcp_moderate_rcvbuf: DRS on
    limit_output_bytes: int = 4 * MiB  # tcp_limit_output_bytes: TCP small queues' cap (6.16+)
    growth: RcvbufGrowth = RcvbufGrowth.LINUX_6_18

    def __post_init__(self) -> None:
        _triple("tcp_wmem", self.wmem)
        _triple("tcp_rmem", self.rmem)
        if not 0 < self.notsent_lowat <= NOTSENT_LOWAT_UNLIMITED:
            raise SysctlError(f"tcp_notsent_lowat must be between 1 and {NOTSENT_LOWAT_UNLIMITED}"
                              f" (unlimited), got {self.notsent_lowat}")
        if self.limit_output_bytes <= 0:
            raise SysctlError(f"tcp_limit_output_bytes must be positive, got {self.limit_output_bytes}")

    @classmethod
    def from_strings(cls, wmem: str | None = None, rmem: str | None = None,
                     notsent_lowat: str | None = None, base: "TcpSysctls | None" = None) -> "TcpSysctls":
        """CLI values: ``wmem="4096 16384 4MiB"`` (spaces or commas, sizes as ``--ram`` takes them),
        ``notsent_lowat="128KiB"`` or ``"unlimited"``; None keeps ``base``'s (Linux's defaults)."""
        base = base or LINUX_DEFAULTS

        def triple(name: str, text: str) -> tuple[int, int, int]:
            parts = text.replace(",", " ").split()
            if len(parts) != 3:
                raise SysctlError(f"--tcp-{name} takes three sizes, min default max (e.g. '4096 16384 4MiB'),"
                                  f" got {text!r}")
            try:
                lo, mid, hi = (parse_size(p) for p in parts)
            except UnitError as e:
                raise SysctlError(f"--tcp-{name}: {e}") from None
            return lo, mid, hi

        lowat = base.notsent_lowat
        if notsent_lowat is not None:
            if notsent_lowat.strip().lower() in ("unlimited", "-1"):
                lowat = NOTSENT_LOWAT_UNLIMITED
            else:
                try:
                    lowat = parse_size(notsent_lowat)
                except UnitError as e:
                    raise SysctlError(f"--tcp-notsent-lowat: {e}") from None
        return cls(wmem=base.wmem if wmem is None else triple("wmem", wmem),
                   rmem=base.rmem if rmem is None else triple("rmem", rmem),
                   notsent_lowat=lowat, moderate_rcvbuf=base.moderate_rcvbuf,
                   limit_output_bytes=base.limit_output_bytes, growth=base.growth)


LINUX_DEFAULTS = TcpSysctls()  # Linux 6.18
# Linux 5.x-6.15 (QEMU's 2022 letters): tcp_rmem[2] 6 MiB, tcp_limit_output_bytes 1 MiB
LINUX_5_DEFAULTS = TcpSysctls(rmem=(4 * KiB, 128 * KiB, 6 * MiB), limit_output_bytes=1 * MiB,
                              growth=RcvbufGrowth.LINUX_5)


def _roundup_pow_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


def sndbuf_per_mss(mss: int) -> int:
    """``tcp_sndbuf_expand()``'s memory per segment: the worst case of one skb per segment (no
    GSO), its head kmalloc'd in a power of two."""
    return _roundup_pow_of_two(mss + MAX_TCP_HEADER + SHINFO_SIZE) + SKB_SIZE


def win_from_space(space: int, scaling_ratio: int) -> int:
    """``tcp_win_from_space()``: the payload a buffer of ``space`` bytes of truesize holds."""
    return (space * scaling_ratio) >> TCP_RMEM_TO_WIN_SCALE


def space_from_win(win: int, scaling_ratio: int) -> int:
    """``tcp_space_from_win()``: the truesize a window of ``win`` bytes of payload needs."""
    return (win << TCP_RMEM_TO_WIN_SCALE) // scaling_ratio


def in_flight_estimate(rate: float, rtt: float, sysctls: TcpSysctls = LINUX_DEFAULTS) -> int:
    """The bytes a bulk sender that only the link limits has in flight, in steady state: the link's
    bandwidth-delay product plus what TCP small queues let wait in the sender's own qdisc
    (``tcp_small_queue_check()``: ``sk_pacing_rate >> sk_pacing_shift``, about 1 ms at the pacing
    rate, which slow start sets to twice the delivery rate, ``tcp_update_pacing_rate()``; at most
    ``tcp_limit_output_bytes``). ``rate`` in bytes/s, ``rtt`` in seconds."""
    if not rate > 0 or not rtt > 0:
        raise ValueError(f"a link needs a positive rate and round trip, got {rate} B/s, {rtt} s")
    qdisc = min(sysctls.limit_output_bytes, int(SS_PACING_RATIO * rate) >> SK_PACING_SHIFT)
    return int(rate * rtt) + qdisc


def cwnd_estimate(rate: float, rtt: float, mss: int = ETH_MSS, sysctls: TcpSysctls = LINUX_DEFAULTS) -> int:
    """The congestion window (segments) that sender reaches: slow start grows it while it is below
    twice the segments in flight (``tcp_is_cwnd_limited()``), and no loss ends slow start on an
    emulated link."""
    return max(TCP_INIT_CWND, math.ceil(2 * in_flight_estimate(rate, rtt, sysctls) / mss))


@dataclass
class SendBuffer:
    """The sending socket's ``sk_sndbuf`` and the write-space rules that block and wake its writer."""

    sysctls: TcpSysctls = LINUX_DEFAULTS
    mss: int = ETH_MSS
    sndbuf: int = field(init=False)

    def __post_init__(self) -> None:
        self.sndbuf = self.sysctls.wmem[1]  # tcp_init_sock()

    def expand(self, cwnd: int, reordering: int = TCP_REORDERING) -> int:
        """``tcp_sndbuf_expand()``: room for twice the congestion window (Cubic needs 1.7x in fast
        recovery, rounded up), in worst-case memory per segment, at most ``tcp_wmem[2]``."""
        nr_segs = max(TCP_INIT_CWND, cwnd, reordering + 1)
        sndmem = 2 * nr_segs * sndbuf_per_mss(self.mss)
        if self.sndbuf < sndmem:
            self.sndbuf = min(sndmem, self.sysctls.wmem[2])
        return self.sndbuf

    def established(self, cwnd: int = TCP_INIT_CWND) -> int:
        """``tcp_init_buffer_space()``, when the connection enters ESTABLISHED."""
        return self.expand(cwnd)

    def acked(self, cwnd: int, in_flight: int, writer_waiting: bool = True) -> int:
        """An ACK freed queued bytes (``tcp_check_space()``): if the writer waits for room,
        ``tcp_new_space()`` expands the buffer unless the congestion window is full
        (``tcp_should_expand_sndbuf()``; ``in_flight`` in segments)."""
        if writer_waiting and in_flight < cwnd:
            self.expand(cwnd)
        return self.sndbuf

    def has_room(self, queued: int, unsent: int) -> bool:
        """``sk_stream_memory_free()``: a write may queue more (``queued`` is ``sk_wmem_queued``,
        unsent plus unacknowledged; ``unsent`` is ``write_seq - snd_nxt``)."""
        return queued < self.sndbuf and unsent < self.sysctls.notsent_lowat

    def wakes_writer(self, queued: int, unsent: int) -> bool:
        """``__sk_stream_is_writeable(sk, 1)``: a blocked writer is woken (a third of the buffer
        free, and half of ``tcp_notsent_lowat``)."""
        return self.sndbuf - queued >= queued >> 1 and (unsent << 1) < self.sysctls.notsent_lowat

    @property
    def wake_at(self) -> int:
        """The most bytes queued at which a blocked writer is woken (about two thirds)."""
        return (2 * self.sndbuf) // 3


@dataclass
class ReceiveBuffer:
    """The receiving socket's ``sk_rcvbuf``, grown by Dynamic Right-Sizing as the application reads."""

    sysctls: TcpSysctls = LINUX_DEFAULTS
    advmss: int = ETH_ADVMSS
    scaling_ratio: int = TCP_DEFAULT_SCALING_RATIO  # payload per truesize, in 256ths
    rcvbuf: int = field(init=False)
    space: int = field(init=False)  # rcvq_space.space: bytes read in the RTT of the last growth
    _seq: int = field(init=False, default=0)  # rcvq_space.seq: bytes read when this measure began
    _time: int | None = field(init=False, default=None)  # rcvq_space.time (ns)

    def __post_init__(self) -> None:
        if not 0 < self.scaling_ratio < 1 << TCP_RMEM_TO_WIN_SCALE:
            raise ValueError(f"scaling_ratio is in 256ths, between 1 and 255, got {self.scaling_ratio}")
        self.rcvbuf = self.sysctls.rmem[1]  # tcp_init_sock()
        # tcp_init_buffer_space(): min(rcv_ssthresh, rcv_wnd, TCP_INIT_CWND * advmss)
        self.space = min(TCP_INIT_CWND * self.advmss, self.window)

    @property
    def window(self) -> int:
        """``window_clamp``: the most the peer may send unread, ``tcp_win_from_space(sk_rcvbuf)``."""
        return win_from_space(self.rcvbuf, self.scaling_ratio)

    def established(self, now_ns: int, copied: int = 0) -> None:
        """``tcp_init_buffer_space()``: the first measure starts."""
        self._seq, self._time = copied, now_ns

    def read(self, now_ns: int, copied: int, rtt_ns: int, unread: int = 0) -> bool:
        """``tcp_rcv_space_adjust()``, called when the application has read ``copied`` bytes in
        all at ``now_ns``, with ``unread`` bytes still queued and the receiver's RTT estimate
        ``rtt_ns`` (0 = none yet). Returns whether the buffer grew."""
        if self._time is None:
            self.established(now_ns, copied)
            return False
        if now_ns - self._time < rtt_ns or rtt_ns <= 0:
            return False
        got = copied - self._seq
        if self.sysctls.growth is not RcvbufGrowth.LINUX_5:
            got -= unread  # ea33537d8292: what still waits unread was not consumed
        grew = False
        if got > self.space:
            grew = self._grow(got)
            self.space = got
        self._seq, self._time = copied, now_ns
        return grew

    def _grow(self, newval: int) -> bool:
        """The growth step of ``tcp_rcv_space_adjust()`` / ``tcp_rcvbuf_grow()`` (no reordering:
        an emulated link delivers in order, so the out-of-order term is 0)."""
        if not self.sysctls.moderate_rcvbuf:
            return False
        old, growth = self.space, self.sysctls.growth
        rcvwin = 2 * newval
        if growth is RcvbufGrowth.LINUX_5:
            rcvwin += 16 * self.advmss
        if growth is not RcvbufGrowth.LINUX_6_16:
            rcvwin += 2 * (rcvwin * (newval - old) // old)  # a sender in slow start doubles its rate
        rcvbuf = min(space_from_win(rcvwin, self.scaling_ratio), self.sysctls.rmem[2])
        if rcvbuf > self.rcvbuf:
            self.rcvbuf = rcvbuf
            return True
        return False


@dataclass(frozen=True)
class SocketQueue:
    """What one channel's connection holds in front of a byte written now (bytes of payload).

    The two ends fill in turn: while the destination reads as fast as the link delivers, the
    backlog is on the sending side (``send``: the send buffer, unsent plus unacknowledged, with
    what waits in the sender's qdisc) and the receive queue is empty; the receive side (up to
    ``window``) fills only while the destination reads slower than the link, or not at all (a
    thread busy placing a huge page). The send buffer counts memory (truesize), which for the
    GSO skbs of a bulk sender (up to 64 KiB each) is within a few percent of the payload."""

    send: int  # the most the sender may have queued (sk_sndbuf, or tcp_notsent_lowat's limit)
    send_wake: int  # a sender blocked for room is woken once its queue is down to this
    window: int  # the most the receive queue may hold unread (window_clamp)

    @property
    def capacity(self) -> int:
        """Both ends full: the longest queue a request can find in front of it."""
        return self.send + self.window

    @property
    def wake_at(self) -> int:
        """A blocked sender's wake-up point counted over both ends, as ``Link.wake_at`` counts it."""
        return self.window + self.send_wake

    @classmethod
    def of(cls, send: SendBuffer, recv: ReceiveBuffer, in_flight: int | None = None) -> "SocketQueue":
        """The queue of a connection whose sender has ``in_flight`` bytes unacknowledged (needed
        only with a ``tcp_notsent_lowat``: it limits the unsent part)."""
        lowat = send.sysctls.notsent_lowat
        room, wake = send.sndbuf, send.wake_at
        if lowat < NOTSENT_LOWAT_UNLIMITED:
            flight = 0 if in_flight is None else in_flight
            room, wake = min(room, flight + lowat), min(wake, flight + lowat // 2)
        return cls(send=room, send_wake=wake, window=recv.window)

    @classmethod
    def most(cls, sysctls: TcpSysctls = LINUX_DEFAULTS,
             scaling_ratio: int = TCP_DEFAULT_SCALING_RATIO) -> "SocketQueue":
        """The largest the queue can grow to: both buffers at their maxima (what a channel's pipe
        and read-ahead must be able to hold)."""
        sndbuf = sysctls.wmem[2]
        return cls(send=sndbuf, send_wake=(2 * sndbuf) // 3,
                   window=win_from_space(sysctls.rmem[2], scaling_ratio))


@dataclass
class Connection:
    """Both ends of one data channel's TCP connection, stepped by the caller's clock."""

    sysctls: TcpSysctls = LINUX_DEFAULTS
    mss: int = ETH_MSS
    advmss: int = ETH_ADVMSS
    scaling_ratio: int = TCP_DEFAULT_SCALING_RATIO
    send: SendBuffer = field(init=False)
    recv: ReceiveBuffer = field(init=False)

    def __post_init__(self) -> None:
        self.send = SendBuffer(self.sysctls, self.mss)
        self.recv = ReceiveBuffer(self.sysctls, self.advmss, self.scaling_ratio)

    def established(self, now_ns: int) -> SocketQueue:
        """The three-way handshake is done (``tcp_init_buffer_space()`` on both sides)."""
        self.send.established()
        self.recv.established(now_ns)
        return self.queue()

    def round_trip(self, now_ns: int, copied: int, rtt_ns: int, cwnd: int, in_flight: int,
                   unread: int = 0, writer_waiting: bool = True) -> SocketQueue:
        """At ``now_ns`` the receiving application has read ``copied`` bytes in all (``unread`` still
        queued); the sender's congestion window is ``cwnd`` segments with ``in_flight`` bytes
        unacknowledged, and its writer is blocked for room (``writer_waiting``: a bulk sender)."""
        self.send.acked(cwnd, -(-in_flight // self.mss), writer_waiting)
        self.recv.read(now_ns, copied, rtt_ns, unread)
        return self.queue(in_flight)

    def queue(self, in_flight: int | None = None) -> SocketQueue:
        return SocketQueue.of(self.send, self.recv, in_flight)


def steady_state(rate: float, rtt: float, sysctls: TcpSysctls = LINUX_DEFAULTS, mss: int = ETH_MSS,
                 advmss: int = ETH_ADVMSS, scaling_ratio: int = TCP_DEFAULT_SCALING_RATIO,
                 rtts: int = 64) -> SocketQueue:
    """The queue one bulk connection settles at on a link of ``rate`` bytes/s and base round trip
    ``rtt`` seconds, its destination reading as fast as the link delivers.

    A fluid model of the kernel's loop: the sender starts in slow start, cwnd 10, doubling each
    round trip while it is below twice the segments in flight (``tcp_is_cwnd_limited()``); in
    flight is what the congestion window, the receive window and TCP small queues let out
    (``in_flight_estimate()``); what is in flight beyond the bandwidth-delay product waits in the
    sender's qdisc, so the round trip both ends measure is ``rtt`` plus that wait; each round trip
    the destination reads what was in flight. Both buffers follow the kernel's rules for ``rtts``
    round trips (they only grow, so the last value is the steady one)."""
    cap = in_flight_estimate(rate, rtt, sysctls)
    bdp = int(rate * rtt)
    conn = Connection(sysctls, mss, advmss, scaling_ratio)
    q = conn.established(0)
    cwnd, copied, now_ns = TCP_INIT_CWND, 0, 0
    for _ in range(rtts):
        flight = min(cwnd * mss, cap, conn.recv.window)
        rtt_ns = max(1, round((rtt + max(0, flight - bdp) / rate) * 1e9))
        now_ns += rtt_ns
        copied += flight
        q = conn.round_trip(now_ns, copied, rtt_ns, cwnd, flight)
        segs = -(-flight // mss)
        if cwnd < 2 * segs:
            cwnd = min(2 * cwnd, 2 * segs)
    return q
