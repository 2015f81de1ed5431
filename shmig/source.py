"""mig/src: the migration thread (setup, precopy rounds, switchover, postcopy) of the source.

Vocabulary follows QEMU's migration/migration.c and ram.c. The bitmap, scan position and request
queue are ``RamState`` (ramstate.py); frames and host pages are sent by ``PageSender``
(sender.py); requests come in on the return thread (returnpath.py); a broken channel in postcopy
pauses and recovers (recovery.py). The request-servicing policy (policies.py) answers the few
questions in which QEMU's versions differ; the loops below are the same for every version.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from . import memory
from .config import TARGET_PAGE
from .control import Ctl, Ev
from .events import K
from .multifd import PACKET_PAGES
from .multifdsend import MultifdSend
from .plan import Channel
from .policies import Sender, make_policy
from .process import Child
from .ramstate import DirtyLog, PageSearchStatus, RamState
from .ratelimit import RateLimiter
from .reader import FrameReader
from .recovery import Recovery
from .returnpath import ReturnPath
from .sender import PageSender, Stage, frame_pages
from .status import V10_1
from .wire import FrameWriter, Msg, ProtocolError, expect

MAX_WAIT = 0.05  # ram_save_iterate returns to the migration thread's loop after this long (emulated s)
MAX_DISCARDS = 4096  # host page runs per DISCARD frame


class ThresholdSize:
    """``s->threshold_size`` (migration/migration.c migration_update_counters): every BUFFER_DELAY
    the bytes sent since the last update over the time it took, times ``downtime-limit``: what the
    link is thought to carry within the allowed downtime. Before 10.1 postcopy also completed once
    less than this was pending (migration_iteration_run)."""

    def __init__(self, stats: Any, window_s: float, downtime_s: float):
        self.stats, self.window_s, self.downtime_s = stats, window_s, downtime_s  # real seconds
        self.size = 0.0  # bytes
        self.start()

    def start(self, size: float | None = None) -> None:
        """A new measurement from now (``size``: what the last one found, e.g. in precopy)."""
        if size is not None:
            self.size = size
        self.t0, self.bytes0 = time.monotonic(), self.stats.transferred

    def update(self) -> float:
        now = time.monotonic()
        if now - self.t0 >= self.window_s:
            self.size = (self.stats.transferred - self.bytes0) / (now - self.t0) * self.downtime_s
            self.t0, self.bytes0 = now, self.stats.transferred
        return self.size


class MigrationThread:
    """What the migration thread does with RAM in every phase: precopy rounds (ram_save_iterate
    over the bitmap), the stop-and-copy (ram_save_complete), and postcopy's loop of requests and
    background under the rate limit (migration_thread -> qemu_savevm_state_iterate ->
    ram_save_iterate -> ram_find_and_save_block)."""

    def __init__(self, ram: RamState, sender: PageSender, limiter: RateLimiter, policy: Any, max_wait_s: float,
                 poll: Any, tr: Any = None, multifd: MultifdSend | None = None,
                 threshold: ThresholdSize | None = None):
        self.ram = ram
        self.multifd = multifd  # precopy pages go to the multifd send threads (ram_save_multifd_page)
        self.sender = sender
        self.limiter = limiter
        self.policy = policy
        self.max_wait_s = max_wait_s
        self.poll = poll  # raises what the return thread ran into (an error, a pause)
        self.tr = tr
        self.threshold = threshold  # before 10.1: postcopy completes below it (None: only when nothing is left)
        self.k = ram.k
        self.background = PageSearchStatus()  # rs->pss[RAM_CHANNEL_PRECOPY]
        self.preempted = False  # 7.1: the background host page was broken for a request
        # a request wakes a rate-limit sleep only where the migration thread is the one to serve it
        self.wake = ram.urgent if policy.urgent_sender is Sender.MIGRATION_THREAD else None

    # -- precopy ------------------------------------------------------------------------------------------
    def round(self, final: bool = False, interrupted: Any = None) -> None:
        """One pass over the dirty pages. The ``final`` one (stop-and-copy, ram_save_complete) is
        neither rate limited nor interrupted; otherwise ``interrupted()`` is asked every 16 frames."""
        idx = self.ram.dirty_pages()
        multifd = self.multifd
        fp = self.sender.frame_pages if multifd is None else multifd.packet_pages
        for i in range(0, len(idx), fp):
            if not final and interrupted is not None and i % (fp * 16) == 0 and interrupted():
                return
            tps = self.ram.take_pages(idx[i:i + fp])
            if tps.size:
                if multifd is None:
                    self.sender.send(Channel.PRECOPY, tps, False)
                else:
                    multifd.send(tps)
            if not final:
                self.limiter.sleep()

    # -- postcopy -------------------------------------------------------------------------------------
    def postcopy(self) -> None:
        """The migration thread in postcopy, until nothing is dirty (migration_thread ->
        migration_iteration_run -> qemu_savevm_state_iterate, migration/migration.c).

        While the window's budget is spent, qemu_savevm_state_iterate() returns at once: a request
        that wakes the sleeping thread (migration_rate_limit) is *not* served, and QEMU spins until
        the window rolls over. shmig sleeps to the window's end instead of spinning; the outcome is
        the same. With budget left, ram_save_iterate runs: requests first, then the background,
        for as long as the budget lasts or requests keep coming, at most MAX_WAIT.
        """
        ram, limiter = self.ram, self.limiter
        while True:
            self.poll()
            if self.threshold is not None and ram.remaining * TARGET_PAGE < self.threshold.update():
                return  # 7.1-10.0: what is left goes in the completion (save_complete)
            if limiter.exceeded():
                limiter.sleep()  # until the window ends: the gate a request cannot pass
                continue
            t0 = time.monotonic()
            while not limiter.exceeded() or ram.has_requests():  # ram_save_iterate
                self.serve_requests()
                self.poll()
                if limiter.exceeded():
                    continue  # only requests may go on past the budget
                if not self.save_background() and not ram.has_requests():
                    return
                if time.monotonic() - t0 > self.max_wait_s:
                    break

    def save_complete(self) -> None:
        """ram_save_complete in postcopy, before 10.1 (7aaa1fc072 made it find nothing left): every
        dirty page now, requests first, with no window to wait for (only the sleep in the middle of
        a huge page, migration_rate_limit in ram_save_host_page, as QEMU)."""
        while True:
            self.serve_requests()
            self.poll()
            if not self.save_background() and not self.ram.has_requests():
                return

    def serve_requests(self) -> None:
        """get_queued_page: requested host pages go ahead of the background (when the migration
        thread is the one that serves them). 7.1: a request for the host page it broke is finished
        on the main channel; the broken page is resumed once the queue is empty."""
        ram, policy = self.ram, self.policy
        ram.urgent.clear()  # before looking, so a request queued meanwhile sets it again
        while (hp := ram.unqueue()) is not None:
            bg = self.background
            if self.preempted and hp == bg.host_page:
                self.preempted = False
                self.sender.stats.urgent_on_precopy += 1
                if self.tr:
                    self.tr.instant(K.RESUME, hp, bg.offset, 1)
                self.sender.save_host_page(PageSearchStatus(hp, bg.offset, Channel.PRECOPY, True), wake=self.wake)
                bg.host_page = -1
                continue
            if not ram.dirty(hp):
                continue  # already sent: the page is on its way or placed
            self.sender.save_host_page(PageSearchStatus(hp, 0, policy.urgent_channel(), True), wake=self.wake)
            nxt = policy.scan_after(hp, self.preempted)
            if nxt is not None:
                ram.scan_hp = nxt  # the locality rule: the scan goes on from there
        if self.preempted:  # postcopy_preempt_restore: resume where it stopped
            self.preempted = False
            if self.tr:
                self.tr.instant(K.RESUME, self.background.host_page, self.background.offset, 0)
            self.save_background_host_page()

    def save_background(self) -> bool:
        """ram_find_and_save_block for the background; False when nothing is dirty."""
        if self.preempted:
            return True  # the broken host page is resumed before any other is started
        if self.k == 1:
            return bool(self.sender.save_batch(self.sender.frame_pages).size)
        if not self.ram.next_background(self.background):
            return False
        self.save_background_host_page()
        return True

    def save_background_host_page(self) -> None:
        bg = self.background
        if self.sender.save_host_page(bg, may_preempt=self.policy.preempt(bg), wake=self.wake):
            bg.host_page = -1
            return
        self.preempted = True  # postcopy_do_preempt: the requests go first
        self.sender.stats.preemptions += 1
        if self.tr:
            self.tr.instant(K.PREEMPT, bg.host_page, bg.offset)

    def resume_prepare(self) -> None:
        """ram_resume_prepare: what was in flight is void (the bitmap was reloaded)."""
        self.preempted = False
        self.background.host_page = -1
        self.policy.resume_prepare()


class Source(Child):
    """mig/src. The process's main thread is QEMU's migration thread."""

    def setup(self) -> None:
        cfg = self.cfg
        self.stats = stats = self.ledger.source()
        self.clock = cfg.clock
        if cfg.prefault:
            memory.populate(self.mem.src, write=False)
        self.ram = RamState(cfg.npages, cfg.tp_per_hp, stats)
        self.dirty_log = DirtyLog(self.mem.dirty)
        self.limiter = RateLimiter(cfg.max_bandwidth, self.clock)
        self.limiter.tr = self.tr
        self.policy = make_policy(cfg)
        ch = self.ends.channels
        writers = {Channel.PRECOPY: FrameWriter(ch[Channel.PRECOPY], "precopy", self.link, 0)}
        if Channel.POSTCOPY in ch:
            writers[Channel.POSTCOPY] = FrameWriter(ch[Channel.POSTCOPY], "postcopy", self.link, 1)
        self.writers = writers
        mf = cfg.multifd
        mf_writers = [FrameWriter(self.ends.multifd[i], f"multifd{i}", self.link, Channel.MULTIFD.link_index(i))
                      for i in range(mf.channels)]
        reader = FrameReader(ch[Channel.RETURN], "return path", max_frame=max(1 << 16, cfg.npages // 8 + 4096))
        self.recovery = Recovery(self, reader)
        self.sender = PageSender(cfg, self.mem.pages(self.mem.src), self.mem.src_fd, writers, self.ram, stats,
                                 self.limiter, self.policy, self.link, self.recovery.between_frames, self.tr,
                                 mf_writers)
        packet = frame_pages(PACKET_PAGES, cfg.multifd_socket_queue.capacity)
        self.multifd = (MultifdSend(mf_writers, self.sender.send_multifd, self.sender.count_sync, packet)
                        if mf.enabled else None)
        self.threshold = ThresholdSize(stats, self.limiter.window_s, self.clock.real(cfg.downtime_limit))
        self.thread = MigrationThread(self.ram, self.sender, self.limiter, self.policy,
                                      self.clock.real(MAX_WAIT), self.poll_return_path, self.tr, self.multifd,
                                      self.threshold if cfg.qemu < V10_1 else None)
        self.return_path = ReturnPath(reader, self.ram, self.sender, self.policy, stats, self.link, self.thread,
                                      self.recovery, self.tr)
        self.recovery.attach(self.return_path, self.thread)
        self.start_postcopy_requested = False

    # -- control ------------------------------------------------------------
    def on_ctrl(self, name: Ctl) -> None:
        """A QMP-like command from the controller."""
        if name is not Ctl.START_POSTCOPY:
            raise ProtocolError(f"control channel: unexpected {name.value!r} for mig/src")
        self.start_postcopy_requested = self.cfg.postcopy  # refused without postcopy

    def poll_control(self) -> None:
        """Between frames: a command, or an error the return thread ran into."""
        self.poll_return_path()
        while self.ctrl_in.has_frame():
            self.on_ctrl(self.recv_ctrl()[0])

    def poll_return_path(self) -> None:
        if self.return_path.error is not None:
            raise self.return_path.error

    def wait_ctrl(self, want: Ctl, doing: str = "") -> Any:
        self.status(f"{doing}waiting for the controller's {want.value!r}")
        while True:
            name, obj = self.recv_ctrl()
            if name is want:
                return obj
            self.on_ctrl(name)

    # -- migration flow -----------------------------------------------------
    def sync(self) -> None:
        """migration_bitmap_sync: every page whose dirty-log counter moved is dirty again."""
        t0 = time.monotonic_ns()
        newly = self.ram.sync(self.dirty_log.collect())
        if self.tr:
            self.tr.put(K.SYNC, t0, time.monotonic_ns(), newly, self.ram.remaining, self.stats.dirty_sync_count)

    def run(self) -> None:
        self.wait_ctrl(Ctl.START)  # the guest is up and running: the migration starts
        # setup: the main channel first; the postcopy channel only once the main one is confirmed
        self.status("setup: PING on the main channel, waiting for PONG on the return path")
        self.writers[Channel.PRECOPY].send(Msg.PING, (1,))
        expect(self.return_path.reader.next_frame(), Msg.PONG, 0, "return path")
        if Channel.POSTCOPY in self.writers:
            self.writers[Channel.POSTCOPY].send(Msg.HELLO, ())
        self.event(Ev.SETUP_DONE)
        self.return_path.start()
        if self.precopy() == "postcopy":
            self.switchover_postcopy()
            self.recovery.postcopy(self.thread.postcopy, self.complete)
        else:
            self.stop_and_copy()
            self.complete()
        # QEMU's ``completed`` (migration_completion_end) comes only after the return thread has
        # read the destination's SHUT and been joined (close_return_path_on_source)
        self.status("completion: waiting for the destination's SHUT on the return path")
        self.return_path.join()
        self.poll_return_path()
        self.event(Ev.COMPLETED)

    def precopy(self) -> str:
        """Rounds until the switch condition. Returns 'postcopy' or 'complete'."""
        cfg, st = self.cfg, self.stats
        postcopy_rounds = cfg.precopy_rounds if cfg.postcopy else None
        self.limiter.set_rate(cfg.max_bandwidth)  # the first window starts with the migration
        while True:
            self.poll_control()
            if cfg.postcopy and (self.start_postcopy_requested or
                                 (postcopy_rounds is not None and st.precopy_rounds >= postcopy_rounds)):
                return "postcopy"
            self.status(f"precopy round {st.precopy_rounds + 1}")
            t_round = time.monotonic_ns()
            t0 = time.monotonic()
            before = st.transferred
            self.thread.round(interrupted=self.interrupted)
            if self.start_postcopy_requested:
                return "postcopy"
            elapsed = max(time.monotonic() - t0, 1e-6)
            st.precopy_rounds += 1
            self.multifd_flush()  # find_dirty_block: the pass is complete
            self.sync()
            bw = (st.transferred - before) / elapsed  # real bytes per real second
            threshold = bw * self.clock.real(cfg.downtime_limit)
            self.threshold.start(threshold)
            self.writers[Channel.PRECOPY].send(Msg.ROUND, (st.precopy_rounds,))
            if self.tr:
                self.tr.put(K.ROUND, t_round, time.monotonic_ns(), st.precopy_rounds)
            if not cfg.postcopy or postcopy_rounds is None:
                left = self.ram.remaining * TARGET_PAGE
                if left <= threshold or st.precopy_rounds >= cfg.max_rounds:
                    st.converged = int(left <= threshold)
                    st.expected_downtime_ns = int(self.clock.emulated_ns(left / max(bw, 1.0) * 1e9))
                    return "complete"

    def interrupted(self) -> bool:
        """Between frames of a precopy round: a command may end it (migrate-start-postcopy)."""
        self.poll_control()
        return self.start_postcopy_requested

    def stop_vm(self) -> None:
        """Ask the controller to pause the guest; downtime runs from here."""
        t = self.event(Ev.STOP_VM)
        self.wait_ctrl(Ctl.VM_STOPPED)
        if self.tr:
            self.tr.put(K.STOP_VM, t, time.monotonic_ns())
        self.sender.stage = Stage.DOWNTIME

    def multifd_flush(self) -> None:
        """multifd_ram_flush_and_sync: every channel's SYNC written (multifd_send_sync_main), then
        RAM_SAVE_FLAG_MULTIFD_FLUSH on the main channel: the destination loads nothing behind it
        until every channel has been read up to its SYNC. Nothing without multifd."""
        if self.multifd is None:
            return
        self.status("multifd: waiting for every send thread to write its SYNC")
        self.stats.multifd_sync_wait_ns += self.multifd.sync()
        self.stats.multifd_syncs += 1
        self.writers[Channel.PRECOPY].send(Msg.MULTIFD_FLUSH, (self.stats.multifd_syncs,))
        self.event(Ev.MULTIFD_FLUSH, self.stats.multifd_syncs)

    def stop_and_copy(self) -> None:
        """migration_completion_precopy: stop, last sync, ram_save_complete (the rest, over
        multifd if it is on, then its flush)."""
        self.status("stop-and-copy")
        self.stop_vm()
        self.sync()
        self.thread.round(final=True)
        self.multifd_flush()

    def switchover_postcopy(self) -> None:
        """postcopy_start: multifd flushed (ram_save_postcopy_prepare, while the guest still runs),
        stop, last sync, whole host pages, discard, package; the guest resumes."""
        self.multifd_flush()
        self.status("switchover: stopping the guest")
        self.stop_vm()
        self.sync()
        hdirty = self.ram.chunk_host_pages()  # postcopy_chunk_hostpages_pass
        # runs of dirty host pages -> discard ranges
        d = np.diff(np.concatenate(([0], hdirty.view(np.int8), [0])))
        starts = np.flatnonzero(d == 1)
        ends = np.flatnonzero(d == -1)
        runs = np.stack([starts, ends - starts], axis=1).astype(np.uint32)
        t0 = time.monotonic_ns()
        pre = self.writers[Channel.PRECOPY]
        for i in range(0, len(runs), MAX_DISCARDS):
            pre.send(Msg.DISCARD, (runs[i:i + MAX_DISCARDS].tobytes(),))
        self.stats.discarded_host_pages = int(hdirty.sum())
        if self.tr:
            self.tr.put(K.DISCARD, t0, time.monotonic_ns(), len(runs), self.stats.discarded_host_pages)
        pre.send(Msg.PACKAGED, ())
        self.event(Ev.POSTCOPY_START)
        self.sender.enter_postcopy()
        self.ram.scan_hp = 0  # last_seen_block reset
        self.limiter.set_rate(self.cfg.max_postcopy_bandwidth)

    def complete(self) -> None:
        """migration_completion: in postcopy before 10.1, first the pages still dirty (none since:
        postcopy completes only when nothing is pending); then EOS on every channel: the destination
        has everything once it has loaded them (the postcopy channel's after an urgent page the
        return thread is sending)."""
        if self.cfg.postcopy and self.cfg.qemu < V10_1:
            st = self.stats
            before = st.normal_pages + st.zero_pages
            try:
                self.thread.save_complete()
            finally:
                st.completion_pages += st.normal_pages + st.zero_pages - before
        if Channel.POSTCOPY in self.writers:
            with self.ram.exclusive():
                self.writers[Channel.POSTCOPY].send(Msg.EOS, ())
        if self.multifd is not None:  # multifd_send_shutdown: nothing is pending since the last flush
            self.multifd.shutdown()
        self.writers[Channel.PRECOPY].send(Msg.EOS, ())
