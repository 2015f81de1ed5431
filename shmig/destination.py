"""mig/dst/listen and mig/dst/preempt: load the data channels, place pages, turn faults into requests.

Placement follows QEMU's rule that a vCPU never sees a partly placed host page. In postcopy the
target pages of a huge host page are assembled in the channel's temporary host page
(PostcopyTmpPage) and copied into destination RAM once whole, as UFFDIO_COPY does: the receiving
thread reads nothing while it copies, and with preemption the other channel's thread goes on
meanwhile. 4 KiB pages go straight into destination RAM, as QEMU places them straight from its
buffer. Then the host page enters receivedmap, then every vCPU waiting on it is woken.
"""

from __future__ import annotations

import os
import select
import sys
import threading
import time

import numpy as np

from . import memory
from .config import TARGET_PAGE
from .control import Ctl, Ev
from .events import K
from .fds import close_fds, new_eventfd, pipe_size
from .ledger import MultifdStats, ReceiverStats
from .memory import populate
from .plan import Channel
from .process import Child
from .reader import FrameReader
from .sockreader import SocketReader
from .tcp import SocketQueue
from .userfault import UffdFaultLog, UffdPlacer, page_runs
from .wire import ChannelClosed, Frame, FrameWriter, Msg, ProtocolError, TruncatedFrame, expect

MAX_FRAME = (1 << 20) + 65536


def channel_room(socket_buffer: int) -> int:
    """Bytes a data channel can physically hold (pipe plus read-ahead): the emulated queue and a
    frame more, so that the sender is stopped by the emulated write-space rule (which lets it go on
    in a burst once a third of its send buffer has drained) and never by a full pipe (which would
    release it frame by frame, at the link's pace, and keep 7.1's migration thread away from its
    requests while it writes)."""
    return socket_buffer + MAX_FRAME


BROKEN = (ChannelClosed, TruncatedFrame)  # a channel closed under us: in postcopy, a reason to pause


class Receiver(Child):
    """One data channel: paced by the emulated link, frames placed into destination RAM."""

    channel = Channel.PRECOPY
    stats: ReceiverStats
    places_postcopy = True  # it may place pages while the guest runs here (a multifd channel never does)

    def channel_end(self) -> int:
        return self.ends.channels[self.channel]

    def socket_queue(self) -> SocketQueue:
        return self.cfg.socket_queue

    def channel_name(self) -> str:
        return self.channel.value

    def setup(self) -> None:
        cfg = self.cfg
        self.k = cfg.tp_per_hp
        self.npages = cfg.npages
        self.dst_pages = self.mem.pages(self.mem.dst)
        if cfg.prefault and self.shared.uffd is None:  # a uffd backend's page is present only once placed
            populate(self.mem.dst)
        self.received = self.mem.received
        self.stats = self.ledger.receiver(self.role)
        # --fault-backend uffd: postcopy places through the vCPUs' uffds (shmig.userfault); a
        # multifd receiver loads precopy only, before any vCPU runs here: plain writes
        self.placer = (None if self.shared.uffd is None or not self.places_postcopy
                       else UffdPlacer(self.shared.uffd.group(self.role), self.received, TARGET_PAGE,
                                       self.shared.uffd.placed, self.shared.uffd.waiting, self.k, self.stats))
        fd = self.channel_end()
        pipe_cap = pipe_size(fd)
        # The queue is the socket buffers, on every link (on loopback too, where it drains as fast
        # as the destination places pages). The kernel holds it when the pipe could be made that
        # large: payloads then go straight from the pipe into destination RAM. Otherwise the
        # receiver reads ahead into a buffer of its own for the part the pipe cannot hold, in a
        # thread of its own, as the kernel would.
        queue = self.socket_queue().capacity
        readahead = 0 if queue <= pipe_cap else channel_room(queue) - pipe_cap
        self.name = name = self.channel_name()
        self.reader = (SocketReader(fd, name, readahead=readahead, max_frame=MAX_FRAME) if readahead
                       else FrameReader(fd, name, max_frame=MAX_FRAME, direct=True))
        self.ch = self.channel.link_index(self.role.n)
        self.dst_mv = memoryview(self.mem.dst)
        self.tmp: tuple[np.ndarray, memoryview] | None = None  # the temporary host page (k > 1)
        if self.k > 1 and cfg.postcopy and self.places_postcopy:
            tmp = np.empty((self.k, TARGET_PAGE), np.uint8)
            if cfg.prefault:  # touched before the guest runs, as destination RAM is
                populate(tmp)
            self.tmp = (tmp, memoryview(tmp).cast("B"))
        self.in_postcopy = False  # whole-host-page placement once the guest runs here
        self.asm_hp = -1  # the host page being assembled on this channel
        self.asm_count = 0
        self.fence = threading.Lock()
        self.ctrl(Ctl.READY, time.monotonic_ns())  # listening: the migration may start

    def next(self) -> Frame:
        """The next frame, once the link has carried it and its latency has passed."""
        if not self.reader.direct:
            self.reader.fill()  # take what the pipe holds into the read-ahead buffer (the socket)
        size, send_ns = self.reader.peek_head()
        t0 = time.monotonic_ns()
        carried = self.link.carry(self.ch, size, send_ns, self.reader.wait)
        self.link.deliver(carried, self.reader.wait)
        st = self.stats
        st.link_wait_ns += time.monotonic_ns() - t0
        f = self.reader.next_frame()
        assert f is not None
        if f.kind != Msg.PAGES and (f.payload is None or f.payload.nbytes):  # only pages carry a payload
            raise ProtocolError(f"{self.name} channel: {Msg(f.kind).name} frame with a payload")
        st.frames += 1
        st.bytes += f.size
        if self.tr:
            self.trace_recv(f, t0, carried)
        return f

    def trace_recv(self, f: Frame, t0: int, carried: int) -> None:
        """The frame the link carried since ``t0``. A PAGES frame's row is written once it is
        placed (trace_place): one row, and none before a waiting vCPU is woken."""
        self.t_taken = time.monotonic_ns()
        self.rx = (t0, carried, f.send_ns)
        if f.kind != Msg.PAGES:
            self.tr.put(K.RECV, t0, self.t_taken, self.ch, f.send_ns, f.size, f.kind, self.link.queued(self.ch),
                        carried)

    def trace_place(self, f: Frame) -> None:
        """The PAGES frame just placed, from when it was whole at the head of the queue."""
        t0, carried, send_ns = self.rx
        tps = f.fields[0]  # uint32 target pages, little-endian
        self.tr.put(K.PLACE_URGENT if f.fields[2] else K.PLACE, t0, time.monotonic_ns(), self.ch, send_ns, f.size,
                    len(tps) // 4, int.from_bytes(tps[:4], "little"), int.from_bytes(tps[-4:], "little"),
                    self.t_taken, carried, self.link.queued(self.ch))

    def place(self, f: Frame) -> None:
        """A PAGES frame: its pages go into destination RAM without a Python loop per page."""
        fields = expect(f, Msg.PAGES, 3, self.name)
        try:
            tps = np.frombuffer(fields[0], np.uint32)
            zero = None if fields[1] is None else np.frombuffer(fields[1], np.bool_)
        except (TypeError, ValueError) as e:
            raise ProtocolError(f"{self.name} channel: bad PAGES fields ({e})") from None
        n = len(tps)
        nzero = 0 if zero is None else int(np.count_nonzero(zero))
        plen = self.reader.pending if f.payload is None else f.payload.nbytes
        if (n == 0 or (zero is not None and len(zero) != n)
                or int(tps[0] if n == 1 else tps[-1]) >= self.npages or plen != (n - nzero) * TARGET_PAGE
                or (n > 1 and not bool((tps[1:] > tps[:-1]).all()))):  # ascending, no page twice
            raise ProtocolError(f"{self.name} channel: inconsistent PAGES frame ({n} pages,"
                                f" {nzero} zero, {plen} payload bytes)")
        self.stats.pages += n
        self.stats.zero_pages += nzero
        if not self.in_postcopy:
            self.write(f, tps, zero)
            self.received[tps] = 1  # ram_load_precopy: receivedmap per target page
            return
        self.stats.last_place_ns = time.monotonic_ns()  # the last one ends the postcopy phase
        k = self.k
        if k == 1:
            # an urgent page not placed yet (the fault path) is told by a scalar, not an array call
            fresh = None if n == 1 and not self.received[int(tps[0])] else self.received[tps] == 0
            if self.placer is not None:  # the payload read whole, then UFFDIO_COPY from it
                tps, zero, data = self.drop_placed(f, tps, zero, fresh)
                if tps.size:
                    self.placer.place_pages(tps, zero, data)
                return
            if fresh is not None and not fresh.all():  # UFFDIO_COPY would fail with EEXIST: never overwrite a placed page
                tps, zero, data = self.drop_placed(f, tps, zero, fresh)
                if not tps.size:
                    return
                self.write(f, tps, zero, data)
            else:
                self.write(f, tps, zero)
            if n == 1:  # the urgent page: a scalar store, not an array one
                self.received[int(tps[0])] = 1
            else:
                self.received[tps] = 1
            self.wake(tps)
            return
        hp = int(tps[0]) // k
        if int(tps[-1]) // k != hp or (n > 1 and int((tps // k != hp).sum())):
            raise ProtocolError(f"{self.name} channel: a frame spans host pages")
        if self.asm_hp not in (-1, hp):
            raise ProtocolError(f"{self.name} channel: target page of host page {hp} arrived before"
                                f" host page {self.asm_hp} was complete")
        if self.received[hp * k]:
            self.stats.duplicate_pages += n
            self.payload_pages(f)
            return
        assert self.tmp is not None
        self.write(f, tps - hp * k, zero, into=self.tmp)  # every target page is sent: all overwritten
        self.asm_hp = hp
        self.asm_count += n
        if self.asm_count >= k:
            if self.asm_count > k:
                raise ProtocolError(f"{self.name} channel: host page {hp} received"
                                    f" {self.asm_count} target pages of {k}")
            t0 = time.monotonic_ns()
            if self.placer is not None:  # the whole host page in one UFFDIO_COPY
                self.placer.copy(hp * k, int(self.tmp[0].ctypes.data), k)
                self.link.stalled(self.ch, t0, time.monotonic_ns())
                self.placer.mark_and_wake(slice(hp * k, (hp + 1) * k), hp * k, (hp + 1) * k)
                self.asm_hp, self.asm_count = -1, 0
                return
            self.dst_pages[hp * k:(hp + 1) * k] = self.tmp[0]  # UFFDIO_COPY of the whole host page
            self.link.stalled(self.ch, t0, time.monotonic_ns())
            self.received[hp * k:(hp + 1) * k] = 1
            self.asm_hp, self.asm_count = -1, 0
            self.wake(np.array([hp]))

    def drop_placed(self, f: Frame, tps: np.ndarray, zero: np.ndarray | None, fresh: np.ndarray | None
                    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """The frame's pages not placed yet (``fresh``; None: all), with their zero flags and data
        rows: a placed page is never overwritten (UFFDIO_COPY would fail with EEXIST)."""
        data = self.payload_pages(f)
        if fresh is None or fresh.all():
            return tps, zero, data
        self.stats.duplicate_pages += int(len(tps) - np.count_nonzero(fresh))
        if zero is not None:
            data, zero = data[fresh[~zero]], zero[fresh]
        else:
            data = data[fresh]
        return tps[fresh], zero, data

    def load_pages(self, f: Frame) -> None:
        """A PAGES frame placed, and traced once placed."""
        self.place(f)
        if self.tr:
            self.trace_place(f)

    def payload_pages(self, f: Frame) -> np.ndarray:
        """The frame's non-zero pages as a [n, TARGET_PAGE] view (read off the pipe if still there)."""
        payload = self.reader.read_payload() if f.payload is None else f.payload
        return np.frombuffer(payload, np.uint8).reshape(-1, TARGET_PAGE)

    def write(self, f: Frame, tps: np.ndarray, zero: np.ndarray | None, data: np.ndarray | None = None,
              into: tuple[np.ndarray, memoryview] | None = None) -> None:
        """Zero pages are cleared; the others come from ``data`` if given, else from the payload:
        straight off the pipe if it is still there (one readv into runs of pages), else from the
        receive buffer. Into destination RAM, or ``into`` (pages, bytes) indexed by ``tps``."""
        pages, mv = into or (self.dst_pages, self.dst_mv)
        if zero is not None:
            pages[self.zeroed(tps[zero])] = 0
            tps = tps[~zero]
            if not tps.size:
                return
        if data is None and f.payload is None:
            self.reader.read_payload_into(self.runs(tps, mv))
            return
        first = int(tps[0])
        contiguous = int(tps[-1]) - first == len(tps) - 1
        if data is None and contiguous:  # one copy of the received bytes, no array made
            mv[first * TARGET_PAGE:(first + len(tps)) * TARGET_PAGE] = f.payload
            return
        data = self.payload_pages(f) if data is None else data
        if contiguous:
            pages[first:first + len(tps)] = data
        else:
            pages[tps] = data

    def zeroed(self, tps: np.ndarray) -> np.ndarray:
        """Of these zero pages, the ones to write zeroes into (every one, unless multifd says)."""
        return tps

    @staticmethod
    def runs(tps: np.ndarray, mv: memoryview) -> list[memoryview]:
        """The bytes of these target pages in ``mv`` as one buffer per run of consecutive pages."""
        first, n = int(tps[0]), len(tps)
        if int(tps[-1]) - first == n - 1:  # one run (always so for a requested host page)
            return [mv[first * TARGET_PAGE:(first + n) * TARGET_PAGE]]
        breaks = np.flatnonzero(np.diff(tps) != 1) + 1
        starts = tps[np.concatenate(([0], breaks))].tolist()
        lens = np.diff(np.concatenate(([0], breaks, [len(tps)]))).tolist()
        return [mv[a * TARGET_PAGE:(a + n) * TARGET_PAGE] for a, n in zip(starts, lens)]

    def wake(self, hps: np.ndarray) -> None:
        """Wake every vCPU waiting on one of these host pages."""
        with self.fence:  # a locked instruction: receivedmap stores before wait-slot loads
            pass
        one = int(hps[0]) if len(hps) == 1 else -1
        for v, hp in enumerate(self.mem.wait[:, 0].tolist()):  # a handful of vCPUs at most
            if hp >= 0 and (hp == one if one >= 0 else (hps == hp).any()):
                os.eventfd_write(self.efds[v], 1)
                if self.tr:
                    t = time.monotonic_ns()
                    self.tr.put(K.WAKE, t, t, hp, v, self.ch, self.rx[2])

    # -- postcopy recovery (postcopy_pause_incoming, loadvm_postcopy_handle_resume) ------------------
    recovering = False  # paused, or recovering: until the new channel is confirmed
    _hup: tuple[int, select.poll] | None = None  # (fd, a poll object watching it for POLLHUP)

    def check_open(self) -> None:
        """Between frames: a channel the source has closed is broken now (POLLHUP: no writer is left,
        however much is still queued), and what it still holds or was read ahead of it is lost with
        it, as a dropped connection's receive queue is, rather than loaded late."""
        if self._hup is None or self._hup[0] != self.reader.fd:
            self._hup = (self.reader.fd, select.poll())
            self._hup[1].register(self.reader.fd, 0)  # POLLHUP is reported whatever the mask
        if self.reader.eof or self._hup[1].poll(0):
            raise ChannelClosed(f"{self.name} channel closed")

    def postcopy_pause_incoming(self, reason: str) -> None:
        """The channel is gone; a host page only partly assembled from it is dropped (it never
        entered receivedmap, so the source sends it again after the recovery)."""
        self.reader.close()
        if self.asm_hp >= 0:
            self.stats.partial_host_pages_dropped += 1
            self.asm_hp, self.asm_count = -1, 0
        self.recovering = True
        self.stats.postcopy_pauses += 1
        self.status(f"postcopy-paused ({reason}): waiting for the controller's 'recover'")
        self.event(Ev.POSTCOPY_PAUSED, reason)

    def wait_recover(self) -> dict[Channel, int]:
        """migrate-recover: the controller's new pipe ends; this receiver reads its new channel."""
        fds = self.take_channels(self.expect_ctrl(Ctl.RECOVER))
        self.reader.reopen(fds[self.channel])
        return fds


class Listen(Receiver):
    """mig/dst/listen: the "listen" thread loads the main channel; the "fault" thread turns vCPU
    faults into page requests on the return path."""

    channel = Channel.PRECOPY
    stats: ReceiverStats

    def setup(self) -> None:
        super().setup()
        self.rp = FrameWriter(self.ends.channels[Channel.RETURN], "return path")
        self.requested = np.zeros(self.cfg.nhost, dtype=bool)  # mis->page_requested
        self.stopping = threading.Event()
        # postcopy_ram_incoming_cleanup() wakes the fault thread to quit (postcopy_fault_thread_notify
        # on its eventfd) rather than waiting for its poll to time out: the source's completed waits on it
        self.fault_quit = new_eventfd()
        self.fault_error: BaseException | None = None
        self.rp_lock = threading.Lock()  # rp_mutex: the fault thread and the listen thread share the return path
        self.rp_paused = False  # the return path is down: requests wait for the RESUME
        sys.setswitchinterval(0.0005)  # the fault thread must not wait 5 ms for the listen thread's GIL

    def run(self) -> None:
        self.status("waiting for PING on the main channel")
        f = self.next()
        expect(f, Msg.PING, 0, self.channel.value)
        self.event(Ev.INCOMING)
        self.rp.send(Msg.PONG, ())
        fault = threading.Thread(target=self.fault_loop, name="fault", daemon=True)
        fault.start()
        self.status("loading the precopy channel")
        while not self.load():
            self.wait_recover_main()
        self.event(Ev.EOS)
        self.status("EOS: waiting for the controller's 'shut' (every page placed)")
        self.expect_ctrl(Ctl.SHUT)
        self.stopping.set()
        os.eventfd_write(self.fault_quit, 1)
        fault.join(timeout=5)
        if not fault.is_alive():
            close_fds([self.fault_quit])
        if self.placer is not None:  # postcopy_ram_incoming_cleanup: every page is placed by now
            self.stats.uffd_unregistered = self.placer.group.unregister()
        self.rp.send(Msg.SHUT, ())

    def load(self) -> bool:
        """qemu_loadvm_state_main on the main channel: True at EOS; False when the channel broke
        during postcopy (the migration is paused)."""
        try:
            while True:
                if self.in_postcopy:
                    self.check_open()
                f = self.next()
                if f.kind == Msg.PAGES:
                    self.load_pages(f)
                elif f.kind == Msg.ROUND:
                    pass
                elif f.kind == Msg.MULTIFD_FLUSH:
                    self.multifd_recv_sync_main()
                elif f.kind == Msg.DISCARD:
                    self.discard(f)
                elif f.kind == Msg.PACKAGED:
                    self.in_postcopy = True  # LISTEN + RUN: the guest now runs here
                    self.mem.ctl[memory.DST_POSTCOPY] = 1
                    self.event(Ev.RUNNING)
                    if self.tr:
                        self.tr.instant(K.RUNNING)
                    self.status("postcopy: loading the precopy channel")
                elif f.kind == Msg.RECV_BITMAP and self.recovering:
                    self.rp.send(Msg.RECV_BITMAP, (), [np.packbits(self.received, bitorder="little")])
                elif f.kind == Msg.RESUME and self.recovering:
                    self.resume_incoming()
                elif f.kind == Msg.EOS:
                    return True
                else:
                    raise ProtocolError(f"precopy channel: unexpected {Msg(f.kind).name}")
                if self.fault_error is not None:
                    raise self.fault_error
        except BROKEN as e:
            if not self.in_postcopy:
                raise
            self.postcopy_pause_incoming(str(e))
            return False

    def multifd_recv_sync_main(self) -> None:
        """RAM_SAVE_FLAG_MULTIFD_FLUSH: nothing behind it on the main channel (the next round's
        frames, the discard list, the package) is loaded until every multifd channel has been read
        up to its SYNC; then every channel is released. Before the switchover this is what the
        multifd sockets' backlog costs the downtime (multifd.sync_wait)."""
        sync = self.shared.multifd_sync
        if sync is None:
            raise ProtocolError("precopy channel: MULTIFD_FLUSH without multifd channels")
        self.status("MULTIFD_FLUSH: waiting for every multifd channel's SYNC")
        t0 = time.monotonic_ns()
        sync.wait_all()
        st = self.stats
        st.multifd_flushes += 1
        st.multifd_sync_wait_ns += time.monotonic_ns() - t0
        self.event(Ev.MULTIFD_SYNCED, st.multifd_flushes, t0)
        self.status("loading the precopy channel")

    def postcopy_pause_incoming(self, reason: str) -> None:
        """The main channel and the return path go together; the fault thread stops sending."""
        with self.rp_lock:
            self.rp_paused = True
            os.close(self.rp.fd)
        super().postcopy_pause_incoming(reason)

    def wait_recover_main(self) -> None:
        self.rp.fd = self.wait_recover()[Channel.RETURN]  # the fault thread does not use it until RESUME
        self.status("postcopy-recover: waiting for the source's RECV_BITMAP and RESUME")

    def resume_incoming(self) -> None:
        """loadvm_postcopy_handle_resume: RESUME_ACK, then every request still waited for goes again
        (migrate_send_rp_req_pages_pending): those in flight when the channels broke are lost."""
        self.event(Ev.INCOMING_RESUMED)  # postcopy-active, before the RESUME_ACK (as QEMU)
        with self.rp_lock:
            self.rp.send(Msg.RESUME_ACK, ())
            pending = np.flatnonzero(self.requested & (self.received[::self.k] == 0)).tolist()
            for hp in pending:
                self.rp.send(Msg.REQ, (hp, self.cfg.host_page))
            self.stats.requests_sent += len(pending)
            self.stats.requests_resent += len(pending)
            self.rp_paused = False
        self.recovering = False
        self.status("postcopy: loading the precopy channel (recovered)")

    def discard(self, f: Frame) -> None:
        """CMD_POSTCOPY_RAM_DISCARD: those host pages leave receivedmap and will fault."""
        t0 = time.monotonic_ns()
        try:
            runs = np.frombuffer(expect(f, Msg.DISCARD, 1, self.channel.value)[0], np.uint32).reshape(-1, 2)
        except (TypeError, ValueError) as e:
            raise ProtocolError(f"precopy channel: bad DISCARD ranges ({e})") from None
        nhost = self.cfg.nhost
        if runs.size and int((runs[:, 0].astype(np.int64) + runs[:, 1]).max()) > nhost:
            raise ProtocolError("precopy channel: discard range beyond RAM")
        edge = np.zeros(nhost + 1, np.int32)
        np.add.at(edge, runs[:, 0].astype(np.int64), 1)
        np.add.at(edge, runs[:, 0].astype(np.int64) + runs[:, 1], -1)
        hmask = np.cumsum(edge[:-1]) > 0
        self.received.reshape(-1, self.k)[hmask] = 0
        if self.mem.dst_memfd is not None:  # ram_discard_range on a shared file: the pages fault again
            hp = self.cfg.host_page
            for a, n in page_runs(np.flatnonzero(hmask)):
                self.mem.dst_memfd.punch_hole(a * hp, n * hp)
        self.stats.discarded_host_pages += int(hmask.sum())
        if self.tr:
            self.tr.put(K.DISCARD_APPLIED, t0, time.monotonic_ns(), int(hmask.sum()))

    def fault_loop(self) -> None:
        """postcopy_ram_fault_thread: one request per missing host page, never twice."""
        if self.placer is not None:
            return self.fault_loop_uffd()
        try:
            reader = FrameReader(self.ends.channels[Channel.FAULT], "fault", max_frame=1 << 16)
            k = self.k
            wake = [self.ends.channels[Channel.FAULT], self.fault_quit]
            while not self.stopping.is_set():
                f = reader.next_frame(timeout=0)
                if f is None:  # poll() on the userfaultfd and the quit eventfd, as QEMU's thread does
                    select.select(wake, [], [], 1.0)
                    continue
                vcpu, hp = expect(f, Msg.FAULT, 2, "fault")[:2]
                if not isinstance(hp, int) or isinstance(hp, bool) or not 0 <= hp < self.cfg.nhost:
                    raise ProtocolError(f"fault channel: host page {hp!r} outside RAM")
                self.stats.faults_seen += 1
                t_rx = time.monotonic_ns() if self.tr else 0
                if self.received[hp * k]:
                    if self.tr:
                        self.tr.put(K.FAULT_SEEN, t_rx, t_rx, vcpu, hp, 1)
                    continue
                self.request(vcpu, hp, t_rx)
        except BaseException as e:
            self.fault_error = e

    def request(self, vcpu: int, hp: int, t_rx: int) -> None:
        """A fault on host page ``hp``, not received: a page request unless one is out already."""
        if self.requested[hp]:
            self.stats.faults_deduplicated += 1
            if self.tr:
                self.tr.put(K.FAULT_SEEN, t_rx, t_rx, vcpu, hp, 2)
            return
        with self.rp_lock:
            self.requested[hp] = True
            if self.rp_paused:
                if self.tr:
                    self.tr.put(K.FAULT_SEEN, t_rx, t_rx, vcpu, hp, 3)
                return  # sent with every pending request at the RESUME
            try:
                self.rp.send(Msg.REQ, (hp, self.cfg.host_page))
            except ChannelClosed:
                self.rp_paused = True  # the source is pausing; the listen thread will see it
                return
            self.stats.requests_sent += 1
        if self.tr:
            self.tr.put(K.FAULT_SEEN, t_rx, time.monotonic_ns(), vcpu, hp, 0)

    def fault_loop_uffd(self) -> None:
        """postcopy_ram_fault_thread on the vCPUs' userfaultfds: the event's read is the fault's
        time; a page received since the vCPU faulted is woken here (the receiver's wake may have
        come before the fault reached the uffd), any other becomes a page request."""
        try:
            assert self.placer is not None
            group, k, hpsize = self.placer.group, self.k, self.cfg.host_page
            group.watch(self.fault_quit)
            log = UffdFaultLog([self.ledger.vcpu(r) for r in self.shared.plan.vcpus], self.shared.uffd.placed)
            while True:
                log.settle()
                if self.stopping.is_set():
                    break
                for vcpu, pf in group.faults(0.01 if log.pending else 1.0):
                    hp = pf.offset // hpsize
                    if not 0 <= hp < self.cfg.nhost:
                        raise ProtocolError(f"vCPU {vcpu}'s userfaultfd: a fault at {pf.address:#x}, outside guest RAM")
                    self.stats.faults_seen += 1
                    t_rx = pf.read_ns
                    if self.placer.waiting_on(vcpu, hp):
                        group.wake(vcpu, hp * hpsize, hpsize)
                        log.fault(vcpu, hp, t_rx, time.monotonic_ns())
                        if self.tr:
                            self.tr.put(K.FAULT_SEEN, t_rx, t_rx, vcpu, hp, 1)
                        continue
                    log.fault(vcpu, hp, t_rx)
                    self.request(vcpu, hp, t_rx)
        except BaseException as e:
            self.fault_error = e


class PreemptReceiver(Receiver):
    """mig/dst/preempt: loads the postcopy channel (the preempt thread's fast-load path)."""

    channel = Channel.POSTCOPY

    def run(self) -> None:
        self.status("waiting for the postcopy channel's first frame")
        expect(self.next(), Msg.HELLO, 0, self.channel.value)
        self.in_postcopy = True
        self.status("loading the postcopy channel")
        while not self.load():
            self.wait_recover()
            self.status("postcopy-recover: waiting for the new postcopy channel's HELLO")
        self.event(Ev.EOS)

    def load(self) -> bool:
        """The preempt thread's loop: True at EOS; False when the channel broke during postcopy."""
        try:
            while True:
                if self.mem.ctl[memory.DST_POSTCOPY]:
                    self.check_open()
                f = self.next()
                if self.recovering:  # a recovered channel starts with its HELLO, like the first one
                    expect(f, Msg.HELLO, 0, self.channel.value)
                    self.recovering = False
                    self.status("loading the postcopy channel (recovered)")
                elif f.kind == Msg.PAGES:
                    self.load_pages(f)
                elif f.kind == Msg.EOS:
                    return True
                else:
                    raise ProtocolError(f"postcopy channel: unexpected {Msg(f.kind).name}")
        except BROKEN as e:
            if not self.mem.ctl[memory.DST_POSTCOPY]:
                raise
            self.postcopy_pause_incoming(str(e))
            return False


class MultifdReceiver(Receiver):
    """mig/dst/recv_N: a multifd receive thread (multifd_recv_thread). It loads precopy pages
    only (the source sends nothing on multifd in postcopy), and at each SYNC packet waits for the
    listen thread's release (multifd.MultifdSync) before it reads on."""

    channel = Channel.MULTIFD
    stats: MultifdStats
    places_postcopy = False

    def channel_end(self) -> int:
        return self.ends.multifd[self.role.n]

    def socket_queue(self) -> SocketQueue:
        return self.cfg.multifd_socket_queue

    def channel_name(self) -> str:
        return f"multifd{self.role.n}"

    def zeroed(self, tps: np.ndarray) -> np.ndarray:
        """multifd_recv_zero_page_process: with postcopy on, every zero page is written (it is
        marked received either way, and a vCPU must never fault on a page marked received but
        never written); without, only a page received before (destination RAM starts zeroed)."""
        if self.cfg.postcopy:
            return tps
        keep = tps[self.received[tps] != 0]
        self.stats.zero_pages_skipped += len(tps) - len(keep)
        return keep

    def run(self) -> None:
        sync = self.shared.multifd_sync
        assert sync is not None
        loading = f"loading {self.channel_name()}"
        self.status(loading)
        while True:
            f = self.next()
            if f.kind == Msg.PAGES:
                self.load_pages(f)
            elif f.kind == Msg.MULTIFD_SYNC:
                self.stats.syncs += 1
                self.status("SYNC read: waiting for the listen thread's release (multifd_recv_sync_main)")
                sync.arrived(self.role.n)
                self.status(loading)
            elif f.kind == Msg.EOS:
                break
            else:
                raise ProtocolError(f"{self.channel_name()} channel: unexpected {Msg(f.kind).name}")
        self.event(Ev.EOS)
