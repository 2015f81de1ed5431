"""mig/dst/listen and mig/dst/preempt: load the data channels, place pages, turn faults into requests.

Placement follows QEMU's rule that a vCPU never sees a partly placed host page: the target pages
of a host page are written into destination RAM first (the guest cannot touch them: they are not
in receivedmap yet, which is what userfaultfd's atomic UFFDIO_COPY of a temporary page achieves in
QEMU), then the whole host page enters receivedmap, then every vCPU waiting on it is woken.
"""

from __future__ import annotations

import fcntl
import os
import sys
import threading
import time
from typing import Any

import numpy as np

from .config import TARGET_PAGE
from .memory import populate
from .process import Child
from .wire import Frame, FrameReader, FrameWriter, Msg, ProtocolError, expect

F_GETPIPE_SZ = 1032
MAX_FRAME = (1 << 20) + 65536


class Receiver(Child):
    """One data channel: paced by the emulated link, frames placed into destination RAM."""

    channel = "precopy"

    def setup(self) -> None:
        cfg = self.cfg
        self.k = cfg.tp_per_hp
        self.dst_pages = self.mem.pages(self.mem.dst)
        if cfg.prefault:
            populate(self.mem.dst)
        self.received = self.mem.received
        fd = self.fds[self.channel]
        pipe_cap = fcntl.fcntl(fd, F_GETPIPE_SZ)
        # with a limited link the queue is pipe + read-ahead; with an unlimited one nothing waits
        # for the link, so payloads go straight from the pipe into destination RAM
        self.reader = FrameReader(fd, self.channel, readahead=max(0, cfg.socket_buffer - pipe_cap),
                                  max_frame=MAX_FRAME, direct=cfg.bandwidth is None)
        self.dst_mv = memoryview(self.mem.dst)
        self.in_postcopy = False  # whole-host-page placement once the guest runs here
        self.asm_hp = -1  # the host page being assembled on this channel
        self.asm_count = 0
        self.fence = threading.Lock()
        self.stats: dict[str, Any] = {"frames": 0, "pages": 0, "zero_pages": 0, "bytes": 0,
                                      "duplicate_pages": 0, "link_wait_ms": 0.0}
        self.wait_ns = 0

    def next(self) -> Frame:
        """The next frame, once the link has carried it and its latency has passed."""
        size, send_ns = self.reader.peek_head()
        self.wait_ns += self.link.carry(size, self.reader.wait)
        self.link.arrive(send_ns, self.reader.wait)
        f = self.reader.next_frame()
        assert f is not None
        if f.kind != Msg.PAGES and (f.payload is None or f.payload.nbytes):  # only pages carry a payload
            raise ProtocolError(f"{self.channel} channel: {Msg(f.kind).name} frame with a payload")
        self.stats["frames"] += 1
        self.stats["bytes"] += f.size
        return f

    def place(self, f: Frame) -> None:
        """A PAGES frame: its pages go into destination RAM without a Python loop per page."""
        fields = expect(f, Msg.PAGES, 3, self.channel)
        try:
            tps = np.frombuffer(fields[0], np.uint32)
            zero = None if fields[1] is None else np.frombuffer(fields[1], np.bool_)
        except (TypeError, ValueError) as e:
            raise ProtocolError(f"{self.channel} channel: bad PAGES fields ({e})") from None
        n = len(tps)
        nzero = 0 if zero is None else int(np.count_nonzero(zero))
        plen = self.reader.pending if f.payload is None else f.payload.nbytes
        if (n == 0 or (zero is not None and len(zero) != n) or int(tps.max()) >= self.cfg.npages
                or plen != (n - nzero) * TARGET_PAGE):
            raise ProtocolError(f"{self.channel} channel: inconsistent PAGES frame ({n} pages,"
                                f" {nzero} zero, {plen} payload bytes)")
        self.stats["pages"] += n
        self.stats["zero_pages"] += nzero
        if not self.in_postcopy:
            self.write(f, tps, zero)
            self.received[tps] = 1  # ram_load_precopy: receivedmap per target page
            return
        self.stats["last_place_ns"] = time.monotonic_ns()  # the last one ends the postcopy phase
        k = self.k
        if k == 1:
            fresh = self.received[tps] == 0
            if not (fresh[0] if n == 1 else fresh.all()):  # UFFDIO_COPY would fail with EEXIST: never overwrite a placed page
                self.stats["duplicate_pages"] += int(n - np.count_nonzero(fresh))
                data = self.payload_pages(f)
                if zero is not None:
                    data, zero = data[fresh[~zero]], zero[fresh]
                else:
                    data = data[fresh]
                tps = tps[fresh]
                if not tps.size:
                    return
                self.write(f, tps, zero, data)
            else:
                self.write(f, tps, zero)
            self.received[tps] = 1
            self.wake(tps)
            return
        hp = int(tps[0]) // k
        if int(tps[-1]) // k != hp or (n > 1 and int((tps // k != hp).sum())):
            raise ProtocolError(f"{self.channel} channel: a frame spans host pages")
        if self.asm_hp not in (-1, hp):
            raise ProtocolError(f"{self.channel} channel: target page of host page {hp} arrived before"
                                f" host page {self.asm_hp} was complete")
        if self.received[hp * k]:
            self.stats["duplicate_pages"] += n
            self.payload_pages(f)
            return
        self.write(f, tps, zero)
        self.asm_hp = hp
        self.asm_count += n
        if self.asm_count >= k:
            if self.asm_count > k:
                raise ProtocolError(f"{self.channel} channel: host page {hp} received"
                                    f" {self.asm_count} target pages of {k}")
            self.received[hp * k:(hp + 1) * k] = 1
            self.asm_hp, self.asm_count = -1, 0
            self.wake(np.array([hp]))

    def payload_pages(self, f: Frame) -> np.ndarray:
        """The frame's non-zero pages as a [n, 4096] view (read off the pipe if still there)."""
        payload = self.reader.read_payload() if f.payload is None else f.payload
        return np.frombuffer(payload, np.uint8).reshape(-1, TARGET_PAGE)

    def write(self, f: Frame, tps: np.ndarray, zero: np.ndarray | None,
              data: np.ndarray | None = None) -> None:
        """Zero pages are cleared; the others come from ``data`` if given, else from the payload:
        straight off the pipe if it is still there (one readv into runs of destination pages),
        else from the receive buffer."""
        if zero is not None:
            self.dst_pages[tps[zero]] = 0
            tps = tps[~zero]
            if not tps.size:
                return
        if data is None and f.payload is None:
            self.reader.read_payload_into(self.runs(tps))
        else:
            self.scatter(tps, self.payload_pages(f) if data is None else data)

    def scatter(self, tps: np.ndarray, data: np.ndarray) -> None:
        first = int(tps[0])
        if int(tps[-1]) - first == len(tps) - 1:  # a contiguous run: one slice copy
            self.dst_pages[first:first + len(tps)] = data
        else:
            self.dst_pages[tps] = data

    def runs(self, tps: np.ndarray) -> list[memoryview]:
        """Destination RAM of these target pages as one buffer per run of consecutive pages."""
        first, n = int(tps[0]), len(tps)
        if int(tps[-1]) - first == n - 1:  # one run (always so for a requested host page)
            return [self.dst_mv[first * TARGET_PAGE:(first + n) * TARGET_PAGE]]
        breaks = np.flatnonzero(np.diff(tps) != 1) + 1
        starts = tps[np.concatenate(([0], breaks))].tolist()
        lens = np.diff(np.concatenate(([0], breaks, [len(tps)]))).tolist()
        mv = self.dst_mv
        return [mv[a * TARGET_PAGE:(a + n) * TARGET_PAGE] for a, n in zip(starts, lens)]

    def wake(self, hps: np.ndarray) -> None:
        """Wake every vCPU waiting on one of these host pages."""
        with self.fence:  # a locked instruction: receivedmap stores before wait-slot loads
            pass
        for v, hp in enumerate(self.mem.wait[:, 0].tolist()):  # a handful of vCPUs at most
            if hp >= 0 and (hps == hp).any():
                os.eventfd_write(self.efds[v], 1)

    def final_stats(self) -> dict[str, Any]:
        self.stats["link_wait_ms"] = round(self.wait_ns / 1e6, 3)
        return self.stats


class Listen(Receiver):
    """mig/dst/listen: the "listen" thread loads the main channel; the "fault" thread turns vCPU
    faults into page requests on the return path."""

    proc_index = 1
    title = "mig/dst/listen"
    channel = "precopy"

    def setup(self) -> None:
        super().setup()
        self.rp = FrameWriter(self.fds["return"], "return path")
        self.requested = np.zeros(self.cfg.nhost, dtype=bool)  # mis->page_requested
        self.stopping = threading.Event()
        self.stats.update({"requests_sent": 0, "faults_seen": 0, "faults_deduplicated": 0})
        self.fault_error: BaseException | None = None
        sys.setswitchinterval(0.0005)  # the fault thread must not wait 5 ms for the listen thread's GIL

    def run(self) -> None:
        self.status("waiting for PING on the main channel")
        f = self.next()
        expect(f, Msg.PING, 0, self.channel)
        self.rp.send(Msg.PONG, ())
        fault = threading.Thread(target=self.fault_loop, name="fault", daemon=True)
        fault.start()
        self.status("loading the precopy channel")
        while True:
            f = self.next()
            if f.kind == Msg.PAGES:
                self.place(f)
            elif f.kind == Msg.ROUND:
                pass
            elif f.kind == Msg.DISCARD:
                self.discard(f)
            elif f.kind == Msg.PACKAGED:
                self.in_postcopy = True  # LISTEN + RUN: the guest now runs here
                self.ctrl_out.ctrl("event", ["running", time.monotonic_ns()])
                self.status("postcopy: loading the precopy channel")
            elif f.kind == Msg.EOS:
                break
            else:
                raise ProtocolError(f"precopy channel: unexpected {Msg(f.kind).name}")
            if self.fault_error is not None:
                raise self.fault_error
        self.ctrl_out.ctrl("event", ["eos", time.monotonic_ns()])
        self.status("EOS: waiting for the controller's 'shut' (every page placed)")
        name, _ = self.recv_ctrl()
        if name != "shut":
            raise ProtocolError(f"control channel: expected 'shut', got {name!r}")
        self.stopping.set()
        fault.join(timeout=5)
        self.rp.send(Msg.SHUT, ())
        self.ctrl_out.ctrl("stats", self.final_stats())

    def discard(self, f: Frame) -> None:
        """CMD_POSTCOPY_RAM_DISCARD: those host pages leave receivedmap and will fault."""
        try:
            runs = np.frombuffer(expect(f, Msg.DISCARD, 1, self.channel)[0], np.uint32).reshape(-1, 2)
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
        self.stats["discarded_host_pages"] = self.stats.get("discarded_host_pages", 0) + int(hmask.sum())

    def fault_loop(self) -> None:
        """postcopy_ram_fault_thread: one request per missing host page, never twice."""
        try:
            reader = FrameReader(self.fds["fault"], "fault", max_frame=1 << 16)
            k = self.k
            while not self.stopping.is_set():
                f = reader.next_frame(timeout=0.05)
                if f is None:
                    continue
                vcpu, hp = expect(f, Msg.FAULT, 2, "fault")[:2]
                if not isinstance(hp, int) or isinstance(hp, bool) or not 0 <= hp < self.cfg.nhost:
                    raise ProtocolError(f"fault channel: host page {hp!r} outside RAM")
                self.stats["faults_seen"] += 1
                if self.received[hp * k]:
                    continue
                if self.requested[hp]:
                    self.stats["faults_deduplicated"] += 1
                    continue
                self.requested[hp] = True
                self.rp.send(Msg.REQ, (hp, self.cfg.host_page))
                self.stats["requests_sent"] += 1
        except BaseException as e:
            self.fault_error = e


class PreemptReceiver(Receiver):
    """mig/dst/preempt: loads the postcopy channel (the preempt thread's fast-load path)."""

    proc_index = 2
    title = "mig/dst/preempt"
    channel = "postcopy"

    def run(self) -> None:
        self.status("waiting for the postcopy channel's first frame")
        expect(self.next(), Msg.HELLO, 0, self.channel)
        self.in_postcopy = True
        self.status("loading the postcopy channel")
        while True:
            f = self.next()
            if f.kind == Msg.PAGES:
                self.place(f)
            elif f.kind == Msg.EOS:
                break
            else:
                raise ProtocolError(f"postcopy channel: unexpected {Msg(f.kind).name}")
        self.ctrl_out.ctrl("event", ["eos", time.monotonic_ns()])
        self.ctrl_out.ctrl("stats", self.final_stats())
