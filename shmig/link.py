"""The emulated network link the data channels share (main, preempt, and multifd's), and the
socket queue in front of each.

Pacing is done by the receivers, on purpose: a frame stays queued in its channel (pipe plus
read-ahead buffer, together ``socket_buffer`` bytes) until the link has carried it, so a requested
page written behind a full queue waits exactly as it does behind a full TCP socket.

The link is a virtual clock in shared memory: ``free_at`` is when it finishes what has been
reserved so far. A receiver reserves at most one quantum (64 KiB, a burst of packets) at a time, so
two busy channels interleave quantum by quantum and share the link fairly, as two TCP flows do.
A quantum starts when the link is free and its bytes were sent, not when the receiver got round
to it: a receiver that wakes late (an oversleep, a page placement that took a while) catches up
within a bounded burst, as ``tbf``'s bucket lets it, so the link carries its nominal rate whenever
the machine keeps up. The one-way latency is propagation: a frame arrives ``latency`` after its
last byte was carried, while the link already carries the next one (so the burst allowance covers
the latency too).

The socket queue of each channel is ``sent - carried`` bytes, at most ``socket_buffer``: the
sender's and the receiver's socket buffers together, as when the destination is what drains them.
A sender that finds no room for its next frame sleeps until a third of its own send buffer
(``send_buffer``) has drained, and is woken by the receiver that carried it there: Linux's
write-space rule (``sk_stream_wspace() >= sk_stream_min_wspace()``, queued <= 2/3 of
``sk_sndbuf``; the receive buffer does not count), not "as soon as one frame fits". One thing
wakes it earlier: data arriving on the socket. QEMU's return path is the main channel's socket
read the other way, and its socket is blocking, so a sender asleep in ``sk_stream_wait_memory()``
is on the wait queue ``sock_def_readable()`` wakes for every incoming message (a page request):
it then writes what fits, and finishes its frame if the room is there (``data_arrived``).

While a receiving thread is busy placing a huge page (QEMU's UFFDIO_COPY of its temporary page),
the kernel goes on receiving into the socket's receive buffer: the link may carry that channel's
bytes during the stall, up to the receive buffer (``stalled``), and the receiver takes them when
it is back; beyond that the window is closed and the link waits, as TCP's does.

What the link carried is measured over the time its queues held data, so the report can say when
the machine, not the emulated link, set the pace.
"""

from __future__ import annotations

import multiprocessing.synchronize
import os
import select
import time
from typing import Callable, NamedTuple

import numpy as np

from .clock import Clock
from .fds import close_fds, drain_eventfd, new_eventfd
from .tcp import SocketQueue

QUANTUM = 64 * 1024
BURST_S = 0.005  # real time a late receiver may make up beyond the latency: a few scheduler time slices (tbf's bucket)
WAKE_FRACTION = 2 / 3  # a blocked sender resumes once its send buffer is at most this full
RECHECK = 0.05  # a wake-up is never lost, but a blocked sender re-checks this often anyway
CHANNELS = ("precopy", "postcopy")  # channels 0 and 1; multifd's follow (shmig.multifd.FIRST_LINK_INDEX)

# layout of the shared int64 state
FREE_AT, BUSY_SINCE, BUSY_NS, CARRIED_ALL, QUEUED_ALL, FIRST_AT = range(6)
_CH0 = 8  # then per channel: sent, carried, a sender waiting for space
SENT, CARRIED, WAITING = range(3)


def state_words(channels: int = len(CHANNELS)) -> int:
    """The int64 words of the shared state of a link with ``channels`` socket queues."""
    return _CH0 + 3 * channels


def channel_names(multifd_channels: int = 0) -> tuple[str, ...]:
    """The link's channels by number: main, preempt, then ``multifdN`` (QEMU's thread names)."""
    return CHANNELS + tuple(f"multifd{i}" for i in range(multifd_channels))


STATE_WORDS = state_words()


class _Queue(NamedTuple):
    """One channel's socket queue, as the link applies it."""

    capacity: int  # bytes the connection holds in front of a byte written now
    wake_at: int  # a writer blocked for space wakes once the queue is down to this
    rcvbuf: int  # what the kernel takes in while the receiver reads nothing


class _Closed:
    """What a closed link's state becomes: every access is one clear error."""

    def __getitem__(self, i: object) -> int:
        raise RuntimeError("the link is closed: its migration has ended (Migration.close)")

    __setitem__ = __getitem__


class Link:
    def __init__(self, state: np.ndarray, bandwidth: float | None, latency: float, socket_buffer: int,
                 lock: multiprocessing.synchronize.Lock, clock: Clock = Clock(), send_buffer: int | None = None,
                 send_wake: int | None = None, multifd_queue: SocketQueue | None = None):
        """``socket_buffer`` (of which ``send_buffer`` is the send part, woken at ``send_wake``) is
        the main and the preempt channel's queue; ``multifd_queue`` each multifd channel's (by
        default the same): N connections sharing the link each settle at their share of it."""
        state[:] = 0
        self.channels = (len(state) - _CH0) // 3  # as many socket queues as the state was sized for
        state[BUSY_SINCE] = -1
        # int64[state_words(channels)] in shared memory; times in monotonic ns. Read and written through a
        # memoryview: a Python int per access costs a third of a numpy scalar's, on every frame
        self.state = memoryview(state).cast("B").cast("q")
        real_bw = clock.rate(bandwidth)
        self.nominal = bandwidth  # bytes per emulated second, None = unlimited
        self.ns_per_byte = None if real_bw is None else 1e9 / real_bw
        self.latency_ns = clock.real_ns(latency)
        self.capacity = socket_buffer
        # the send buffer is at most the whole queue; the receive buffer's part stays full while
        # the sender waits: only the send buffer drains
        sndbuf = socket_buffer if send_buffer is None else min(send_buffer, socket_buffer)
        # (send_wake: tcp_notsent_lowat may wake it earlier, tcp.SocketQueue.of)
        self.wake_at = socket_buffer - sndbuf + (int(sndbuf * WAKE_FRACTION) if send_wake is None else send_wake)
        self.rcvbuf = socket_buffer - sndbuf
        main = _Queue(self.capacity, self.wake_at, self.rcvbuf)
        mf = main if multifd_queue is None else _Queue(multifd_queue.capacity, multifd_queue.wake_at, multifd_queue.window)
        self.queues = [main if ch < len(CHANNELS) else mf for ch in range(self.channels)]
        # this receiver's last stall, per channel: (began, ended, bytes the kernel may still have taken)
        self.stalls: list[tuple[int, int, int] | None] = [None] * self.channels
        self.window_closed = [False] * self.channels  # the stall outlasted the receive buffer
        self.lock = lock
        self.clock = clock
        quantum_ns = 0 if self.ns_per_byte is None else 2 * QUANTUM * self.ns_per_byte
        self.slack_ns = self.latency_ns + int(max(BURST_S * 1e9, quantum_ns))
        # per channel: the receiver's "write space" wake-up of a blocked sender, and the wake-up
        # incoming data (the return path's messages, on the main channel) gives it
        self.space_fds = [new_eventfd() for _ in range(self.channels)]
        self.data_fds = [new_eventfd() for _ in range(self.channels)]

    def close(self) -> None:
        """Drop the view of shared memory before the controller unmaps it: a link used after its
        migration closed raises (``_Closed``) instead of reading an unmapped page (SIGSEGV)."""
        close_fds(self.space_fds + self.data_fds)
        if isinstance(self.state, memoryview):
            self.state.release()
        self.state = _Closed()

    def _w(self, ch: int, field: int) -> int:
        return _CH0 + 3 * ch + field

    def queued(self, ch: int) -> int:
        """Bytes in channel ``ch``'s socket queue: sent and not yet carried by the link."""
        return int(self.state[self._w(ch, SENT)] - self.state[self._w(ch, CARRIED)])

    # -- the sending side (sk_stream_wait_memory) ------------------------------------------------
    def wait_for_space(self, ch: int, nbytes: int) -> int:
        """Before a frame of ``nbytes`` goes on channel ``ch``: if it does not fit in the queue,
        sleep until a third of the send buffer has drained. Returns real ns spent blocked."""
        q = self.queues[ch]
        if self.queued(ch) + nbytes <= q.capacity:
            return 0
        t0 = time.monotonic_ns()
        fd, data_fd = self.space_fds[ch], self.data_fds[ch]
        drain_eventfd(data_fd)  # data that came before the sender slept wakes nobody
        waiting = self._w(ch, WAITING)
        try:
            while True:
                with self.lock:  # flag and queue under the receiver's lock: no lost wake-up
                    self.state[waiting] = 1
                    if self.queued(ch) <= q.wake_at:
                        break
                r, _, _ = select.select([fd, data_fd], [], [], RECHECK)
                if fd in r:
                    drain_eventfd(fd)
                if data_fd in r:  # woken by incoming data: it takes what room there is
                    drain_eventfd(data_fd)
                    with self.lock:
                        if self.queued(ch) + nbytes <= q.capacity:
                            break
        finally:
            self.state[waiting] = 0
        return time.monotonic_ns() - t0

    def data_arrived(self, ch: int) -> None:
        """A message came in on channel ``ch``'s socket (the return path: channel 0): it wakes a
        sender already asleep on the socket, and no other."""
        if self.state[self._w(ch, WAITING)]:
            os.eventfd_write(self.data_fds[ch], 1)

    def sent(self, ch: int, nbytes: int) -> None:
        """A frame of ``nbytes`` was written into channel ``ch``."""
        with self.lock:
            self.state[self._w(ch, SENT)] += nbytes
            self._queue_change(nbytes)

    # -- the receiving side ------------------------------------------------------------------------
    def carry(self, ch: int, nbytes: int, send_ns: int, wait: Callable[[float], None]) -> int:
        """Take ``nbytes`` of a frame sent at ``send_ns`` off the wire; ``wait(seconds)`` sleeps
        (reading ahead). Returns when the link finished carrying it (monotonic ns)."""
        if self.ns_per_byte is None:  # nothing to pace: the whole frame leaves the queue at once
            with self.lock:
                self._carried(ch, nbytes)
            return send_ns
        done = send_ns
        while nbytes > 0:
            q = nbytes if nbytes < 2 * QUANTUM else QUANTUM  # a frame's tail rides with its last quantum
            with self.lock:
                now = time.monotonic_ns()
                earliest = now - self.slack_ns
                stall = self.stalls[ch]
                if stall is not None and send_ns >= stall[1]:
                    stall = self.stalls[ch] = None  # sent after the receiver was back
                if stall is not None:  # received into the socket while the receiver was busy
                    earliest = min(earliest, stall[0])
                free = int(self.state[FREE_AT])
                start = max(free, send_ns, earliest)
                done = start + int(q * self.ns_per_byte)
                if stall is not None:
                    left = stall[2] - q
                    behind = done < now - self.slack_ns
                    self.stalls[ch] = (stall[0], stall[1], left) if left > 0 and behind else None
                    self.window_closed[ch] = left <= 0 and behind
                elif self.window_closed[ch]:
                    # the receive buffer was full until now: the link waited for the receiver's
                    # window, not for the machine (that time is not backlogged time)
                    self.window_closed[ch] = False
                    self.state[BUSY_NS] -= max(0, start - free)
                self.state[FREE_AT] = done
                self._carried(ch, q, start)
            self.until(done, wait)
            nbytes -= q
        return done

    def stalled(self, ch: int, t0: int, t1: int) -> None:
        """Channel ``ch``'s receiver read nothing from ``t0`` to ``t1``: the kernel received
        meanwhile what was sent, as much as the receive buffer holds, and the link may have
        carried that then."""
        self.stalls[ch] = (t0, t1, self.queues[ch].rcvbuf)

    def _carried(self, ch: int, q: int, start: int | None = None) -> None:
        """Under the lock: ``q`` bytes left channel ``ch``'s queue (the link began carrying them at
        ``start``); wake its sender if waiting."""
        if self.state[CARRIED_ALL] == 0:
            # the first frame ever taken: until then the receivers were starting up, not the link
            first = time.monotonic_ns() if start is None else start
            self.state[FIRST_AT] = first
            if self.state[BUSY_SINCE] >= 0:
                self.state[BUSY_SINCE] = first
        self.state[self._w(ch, CARRIED)] += q
        self.state[CARRIED_ALL] += q
        self._queue_change(-q)
        if self.state[self._w(ch, WAITING)] and self.queued(ch) <= self.queues[ch].wake_at:
            os.eventfd_write(self.space_fds[ch], 1)

    def _queue_change(self, delta: int) -> None:
        """Under the lock: track the time either queue held data (the link was backlogged)."""
        before = int(self.state[QUEUED_ALL])
        after = before + delta
        self.state[QUEUED_ALL] = after
        now = time.monotonic_ns()
        if before <= 0 < after:
            self.state[BUSY_SINCE] = now
        elif after <= 0 < before and self.state[BUSY_SINCE] >= 0:
            # busy until the last quantum reserved leaves the wire (in the past, if it was carried
            # while its receiver was stalled: the kernel received it then)
            end = max(int(self.state[FREE_AT]), int(self.state[BUSY_SINCE]))
            self.state[BUSY_NS] += end - int(self.state[BUSY_SINCE])
            self.state[BUSY_SINCE] = -1

    def deliver(self, t_ns: int, wait: Callable[[float], None]) -> None:
        """A frame whose last byte left at ``t_ns`` is not applied before the one-way latency."""
        if self.latency_ns:
            self.until(t_ns + self.latency_ns, wait)

    @staticmethod
    def until(t_ns: int, wait: Callable[[float], None]) -> None:
        while True:
            left = t_ns - time.monotonic_ns()
            if left <= 0:
                return
            wait(left / 1e9)

    # -- postcopy recovery -------------------------------------------------------------------------
    def drop_queues(self) -> None:
        """The channels broke: what they had queued is lost. A sender blocked waiting for room (which
        the paused receivers would never make) wakes, and finds its channel gone."""
        with self.lock:
            for ch in range(self.channels):
                self._queue_change(-self.queued(ch))
                self.state[self._w(ch, SENT)] = self.state[self._w(ch, CARRIED)]
                os.eventfd_write(self.space_fds[ch], 1)

    def reset(self) -> None:
        """A recovery, every receiver paused: new connections with empty queues on an idle link."""
        self.drop_queues()
        with self.lock:
            self._queue_change(-int(self.state[QUEUED_ALL]))  # bytes the old receivers carried late
            for ch in range(self.channels):
                self.state[self._w(ch, WAITING)] = 0
            self.state[FREE_AT] = 0

    # -- what it carried ---------------------------------------------------------------------------
    def usage(self) -> dict[str, float | None]:
        """The report's ``link``: nominal and achieved rate (emulated bits/s) while backlogged.
        A child killed inside the lock holds it for ever: after a second the figures are read
        without it (they are statistics; the run has failed anyway)."""
        locked = self.lock.acquire(timeout=1.0)
        try:
            busy = int(self.state[BUSY_NS])
            if self.state[BUSY_SINCE] >= 0:
                busy += time.monotonic_ns() - int(self.state[BUSY_SINCE])
            carried = int(self.state[CARRIED_ALL])
            span = int(self.state[FREE_AT] - self.state[FIRST_AT]) if carried else 0
        finally:
            if locked:
                self.lock.release()
        nominal = None if self.nominal is None else self.nominal * 8
        achieved = None
        if busy > 0 and carried > 0:
            achieved = carried * 8 / (self.clock.emulated_ns(busy) / 1e9)
        # at most 1: a frame's send time is stamped a few microseconds before the queue counts it,
        # and the link may start carrying it from that stamp
        util = None if nominal is None or achieved is None else min(round(achieved / nominal, 4), 1.0)
        return {"nominal_bps": nominal, "achieved_bps": None if achieved is None else round(achieved),
                "utilisation": util, "carried_bytes": carried,
                "busy_ms": round(self.clock.emulated_ms(busy), 3),
                "span_ms": round(self.clock.emulated_ms(span), 3)}
