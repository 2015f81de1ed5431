"""mig/src's postcopy recovery (migration.c postcopy_pause / postcopy_do_resume) and fault injection.

A channel that breaks during postcopy (EOF, a truncated frame, EPIPE) pauses the migration instead
of failing it: the side that notices shuts every channel down (QEMU's migration_release_dst_files
plus the shutdown of the main channel), so the other side notices too. The source then waits for
the controller's ``resume`` (migrate resume=true) with new pipe ends, and resumes in QEMU's order:
main channel and return path, the destination's receivedmap reloading the bitmap, the new preempt
channel, the RESUME handshake.

``--inject-fault`` breaks a channel the way a dropped connection breaks: the source owns one end of
every channel, writes half of the frame it was about to send and shuts its end down (faults.py
says when). A fault whose time comes while paused breaks a new channel during the recovery.
"""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING, Callable

import numpy as np

from . import memory
from .control import Ctl, Ev
from .faults import CHANNELS, Fault, FaultInjector
from .fds import drain_eventfd, shutdown_pipe, writev_all
from .plan import Channel
from .wire import ChannelClosed, Frame, FrameWriter, Msg, ProtocolError, TruncatedFrame, expect, frame_head

if TYPE_CHECKING:
    from .reader import FrameReader
    from .returnpath import ReturnPath
    from .source import MigrationThread, Source


class PostcopyPaused(Exception):
    """A channel broke during postcopy: the migration thread leaves what it was doing and pauses."""


BROKEN = (ChannelClosed, TruncatedFrame, PostcopyPaused)  # what pauses a postcopy migration
_WRITER_OF = {"precopy-channel": Channel.PRECOPY, "postcopy-channel": Channel.POSTCOPY}


class Recovery:
    """Pausing and resuming the source's side of a postcopy migration, and the faults that do it."""

    def __init__(self, src: Source, reader: FrameReader):
        self.src = src  # events, status and control messages go through the process (Child's API)
        self.cfg = src.cfg
        self.mem = src.mem
        self.link = src.link
        self.reader = reader
        self.faults = FaultInjector(self.cfg.inject_faults, self.cfg.clock)
        self.migration_ident = threading.get_ident()  # only the migration thread injects faults
        self.pausable = False  # from postcopy start until the last EOS: a broken channel pauses
        self.pausing: str | None = None  # why the channels were shut down; None while they work
        self.pause_lock = threading.Lock()
        self.fault_cond = threading.Condition()  # the faults still to inject; ``active`` changes
        self.active = False  # postcopy with its channels up: a fault may fire
        self.finished = False

    def attach(self, rp: ReturnPath, thread: MigrationThread) -> None:
        self.rp = rp
        self.thread = thread
        self.writers: dict[Channel, FrameWriter] = self.src.writers
        self.ram = self.src.ram
        self.stats = self.src.stats

    # -- the postcopy phase, paused and resumed --------------------------------------------------
    def postcopy(self, run: Callable[[], None], complete: Callable[[], None]) -> None:
        """Run the postcopy phase (``run`` then ``complete``) to its end; a broken channel pauses it
        until a recovery succeeds."""
        self.faults.arm(self.ram.remaining)
        self.pausable = True
        self.set_active(True)
        timer = threading.Thread(target=self.fault_timer, name="faults", daemon=True)
        if self.faults.next_time_ns() is not None:
            timer.start()
        self.src.status("postcopy: background scan and page requests")
        while True:
            try:
                run()
                complete()
                break
            except BROKEN as e:
                self.pause(str(e))
                while not self.resume():
                    pass  # it broke again during the recovery: paused again (QEMU's double failure)
        self.pausable = False
        with self.fault_cond:
            self.finished = True
            self.fault_cond.notify()
        if timer.is_alive():
            timer.join()

    def set_active(self, active: bool) -> None:
        with self.fault_cond:
            self.active = active
            self.fault_cond.notify()

    def check(self) -> None:
        """A paused migration sends and waits for nothing more."""
        if self.pausing is not None:
            raise PostcopyPaused(self.pausing)

    def broken(self, reason: str) -> bool:
        """The return thread found its channel broken: pause, if postcopy can (True)."""
        if self.pausable:  # postcopy_pause_return_path_thread
            self.request_pause(reason)
        return self.pausable

    def between_frames(self, writer: FrameWriter, tps: np.ndarray) -> None:
        """Before each frame: a fault that is due breaks its channel (in the migration thread, once the
        destination runs the guest), and a paused migration sends nothing more."""
        if (self.faults.pending and self.active and threading.get_ident() == self.migration_ident
                and self.mem.ctl[memory.DST_POSTCOPY]):
            with self.fault_cond:
                faults = self.faults.due(self.ram.remaining)
            self.inject(faults, writer, tps)
        if self.mem.ctl[memory.PAUSE_REQUESTED] and self.active and self.mem.ctl[memory.DST_POSTCOPY]:
            self.mem.ctl[memory.PAUSE_REQUESTED] = 0  # QMP migrate-pause (qmp_migrate_pause: shutdown)
            self.request_pause("migrate-pause")
        self.check()

    # -- fault injection --------------------------------------------------------------------------
    def fault_timer(self) -> None:
        """Faults given as a time fire on time, whatever the migration thread is doing (blocked on a
        full queue, asleep on the rate limit): a connection drops whatever its sender does. One that
        comes due while the migration is paused is left to the recovery (resume)."""
        with self.fault_cond:
            while not self.finished:
                t = self.faults.next_time_ns()
                if t is None:
                    return
                left = (t - time.monotonic_ns()) / 1e9
                if left > 0 or not self.active:
                    self.fault_cond.wait(left if left > 0 else None)
                elif not self.mem.ctl[memory.DST_POSTCOPY]:
                    self.fault_cond.wait(0.005)  # the destination is still loading the package
                else:
                    faults = self.faults.due(self.ram.remaining)
                    if faults:
                        self.fired(faults)
                        self.break_channels(faults)
                        self.request_pause(f"injected fault {faults[0]}")

    def fired(self, faults: list[Fault]) -> None:
        for rec in self.faults.fired[-len(faults):]:
            self.src.event(Ev.FAULT_INJECTED, rec["fault"], rec["pages_left"], rec["during"], rec["postcopy_ms"])

    def inject(self, faults: list[Fault], writer: FrameWriter | None = None, tps: np.ndarray | None = None) -> None:
        """Break the channels of these faults, then pause (raises PostcopyPaused)."""
        if faults:
            self.fired(faults)
            self.break_channels(faults, writer, tps)
            self.request_pause(f"injected fault {faults[0]}")
            raise PostcopyPaused(self.pausing)

    def break_channels(self, faults: list[Fault], writer: FrameWriter | None = None,
                       tps: np.ndarray | None = None) -> None:
        """Break the channels of these faults as a dropped connection breaks. The channel ``writer``
        was about to send ``tps`` on breaks in the middle of that frame."""
        for f in faults:
            if f.what == "return-path":
                shutdown_pipe(self.reader.fd, write_end=False)
                continue
            w = self.writers[_WRITER_OF[f.what]]  # validated: no postcopy-channel fault without it
            if w is writer and tps is not None:  # this thread is the one writing it: no other frame interleaves
                self.write_partial_frame(w, tps)
            shutdown_pipe(w.fd, write_end=True)  # atomic: a frame another thread is writing ends short

    def write_partial_frame(self, writer: FrameWriter, tps: np.ndarray) -> None:
        """The first half of the frame of ``tps``: the receiver sees the channel close mid-frame."""
        data = np.take(self.mem.pages(self.mem.src), tps, axis=0).reshape(-1)
        head = frame_head(Msg.PAGES, (tps.astype(np.uint32).tobytes(), None, False), data.nbytes)
        try:
            writev_all(writer.fd, [head, data[:data.nbytes // 2]])
        except OSError:
            pass  # the receiver has gone already

    def inject_in_recovery(self, channels: tuple[str, ...] = CHANNELS) -> None:
        """A fault that came due while paused breaks a new channel as soon as it exists."""
        with self.fault_cond:
            faults = self.faults.due(self.ram.remaining, channels, "recovery")
        self.inject(faults)

    # -- pause and resume -------------------------------------------------------------------------
    def request_pause(self, reason: str) -> None:
        """From any thread: shut every channel down (QEMU's migration_release_dst_files plus the
        shutdown of the main channel), so the destination pauses too, and wake both threads."""
        with self.pause_lock:
            if self.pausing is not None:
                return
            self.pausing = reason
        self.set_active(False)
        for w in self.writers.values():
            shutdown_pipe(w.fd, write_end=True)
        shutdown_pipe(self.reader.fd, write_end=False)
        self.link.drop_queues()  # a sender waiting for room in a queue nobody will drain gives up
        self.rp.fail(PostcopyPaused(reason))
        os.eventfd_write(self.rp.wake_fd, 1)

    def pause(self, reason: str, during: str = "postcopy") -> None:
        """postcopy_pause: the channels are shut, the return thread ends, the controller is told."""
        self.request_pause(reason)
        self.rp.join()
        for fd in (*(w.fd for w in self.writers.values()), self.reader.fd):
            os.close(fd)
        self.stats.postcopy_pauses += 1
        self.src.status(f"postcopy-paused ({self.pausing}): waiting for the controller's 'resume'")
        self.src.event(Ev.POSTCOPY_PAUSED, self.pausing, during)

    def resume(self) -> bool:
        """migrate resume=true (postcopy_do_resume): the new main channel and return path first; the
        destination's receivedmap reloads the dirty bitmap; only then the new preempt channel; then
        the RESUME handshake. False if a channel broke on the way (paused again)."""
        names = self.src.wait_ctrl(Ctl.RESUME, doing=f"postcopy-paused ({self.pausing}): ")
        fds = self.src.take_channels(names)
        for ch, w in self.writers.items():
            w.fd = fds[ch]
        self.reader.reopen(fds[Channel.RETURN])
        drain_eventfd(self.rp.wake_fd)
        self.pausing = None
        self.rp.error = None
        pre = self.writers[Channel.PRECOPY]
        try:
            self.src.status("postcopy-recover: asking for the destination's receivedmap")
            self.inject_in_recovery(("precopy-channel", "return-path"))
            pre.send(Msg.RECV_BITMAP, ())
            f = self.rp.next_frame()
            expect(f, Msg.RECV_BITMAP, 0, "return path")
            self.src.event(Ev.RECV_BITMAP, self.reload_dirty_bitmap(f))
            if Channel.POSTCOPY in self.writers:  # postcopy_preempt_establish_channel, after the main one
                self.writers[Channel.POSTCOPY].send(Msg.HELLO, ())
                self.src.event(Ev.PREEMPT_CHANNEL)
            self.inject_in_recovery()
            self.src.status("postcopy-recover: RESUME sent, waiting for RESUME_ACK")
            pre.send(Msg.RESUME, ())
            expect(self.rp.next_frame(), Msg.RESUME_ACK, 0, "return path")
        except BROKEN as e:
            self.pause(str(e), during="recovery")
            return False
        self.stats.recoveries += 1
        self.src.event(Ev.POSTCOPY_RESUMED)
        self.rp.start()
        self.set_active(True)
        self.src.status("postcopy: background scan and page requests (recovered)")
        return True

    def reload_dirty_bitmap(self, f: Frame) -> int:
        """ram_dirty_bitmap_reload: every page the destination has not received is dirty again
        (sent but lost on the way, or never sent); what was in flight is forgotten. Returns the
        pages that had been sent and must go again."""
        n = self.cfg.npages
        bits = np.frombuffer(f.payload if f.payload is not None else b"", np.uint8)
        if bits.size != (n + 7) // 8:
            raise ProtocolError(f"return path: receivedmap of {bits.size} bytes for {n} pages")
        resent = self.ram.reload(np.unpackbits(bits, count=n, bitorder="little") == 0)
        self.stats.postcopy_pages_resent += resent
        self.thread.resume_prepare()
        return resent


