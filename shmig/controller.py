"""The controller: starts a run, follows it, stops it, and hands back its record and report.

It is the management side of a migration (what libvirt and QMP are to QEMU): the migration logic
lives in the children; the controller reacts to their events, pauses and resumes the guest at
switchover, samples progress, watches the children die, and enforces the run's deadline with a
message naming who was waiting for what.

Postcopy recovery is managed here too, as libvirt does it: once the source and every destination
receiver report postcopy-paused, the controller waits ``recover_after`` (or for ``recover()``), then
has the supervisor make new channels (migrate-recover on the destination, migrate resume=true on
the source).

Whatever becomes of the run, ``wait()`` returns its report: the children are reaped first, then
everything they counted is read out of the ledger into the ``RunRecord`` (a Ctrl-C meanwhile waits
until that is done), and only then is shared memory released.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import select
import signal
import threading
import time
from typing import Any, Callable, Iterator

import numpy as np

from . import memory
from .analysis import build_report
from .calibrate import calibrate_dilation
from . import control
from .config import Config
from .control import Ctl, Ev
from .destination import channel_room
from .events import Arena
from .ledger import Ledger
from .link import Link
from .memory import GuestMemory
from .pattern import fill_initial
from .plan import Plan, Role
from .record import Event, Mark, RunRecord
from .report import Report
from .supervisor import START_METHOD, Proc, Supervisor
from .trace import write_trace_or_say
from .timeline import SAMPLE_EVERY, Sample, Timeline
from .wire import ProtocolError


class RunFailed(Exception):
    pass


@contextlib.contextmanager
def sigint_deferred() -> Iterator[list[bool]]:
    """A Ctrl-C while the results are being handed back is held until they are (``[True]`` says
    one came): an interrupt must never cost the report of a run that has finished."""
    if threading.current_thread() is not threading.main_thread():
        yield [False]
        return
    seen = [False]
    old = signal.signal(signal.SIGINT, lambda *_: seen.__setitem__(0, True))
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, old)


class Migration:
    """One migration. ``run()`` is ``start()`` then ``wait()``; ``start_postcopy()`` may come between."""

    def __init__(self, config: Config, on_sample: Callable[[Sample], None] | None = None,
                 trace: str | None = None):
        self.cfg = config.validate()
        self.on_sample = on_sample
        self.trace = trace  # path of a Chrome/Perfetto trace to write at the end
        self.trace_error: str | None = None  # why the trace could not be written
        self.interrupted_late = False  # a Ctrl-C came while the results were handed back
        self.record: RunRecord | None = None  # once wait() has returned
        self.calibration: list[dict[str, Any]] = []  # --time-dilation auto: what each factor carried
        self.mem: GuestMemory | None = None
        self.ledger: Ledger | None = None
        self.link: Link | None = None
        self.arena: Arena | None = None
        self.sup: Supervisor | None = None
        self.plan: Plan | None = None
        self.events: list[Event] = []
        self.timeline = Timeline()
        self.last_sample: Sample | None = None  # the latest of the timeline (query-migrate's figures)
        self.phase = "setup"
        self.error: str | None = None
        self.ready: set[Role] = set()
        self.paused: dict[Role, int] = {}
        self.resumed: dict[Role, int] = {}
        self.eos: set[Role] = set()
        self.closed = False
        self.t0 = time.monotonic_ns()
        self.paused_roles: set[Role] = set()  # postcopy recovery: who has paused in this episode
        self.recover_at: float | None = None  # when recover_after has passed
        self._lock = threading.RLock()  # recover() may come from another thread than wait()

    # -- start ----------------------------------------------------------------
    def start(self) -> "Migration":
        if self.cfg.time_dilation == "auto":
            factor, self.calibration = calibrate_dilation(self.cfg, run)
            self.cfg = dataclasses.replace(self.cfg, time_dilation=factor)  # the caller's Config stays "auto"
        cfg = self.cfg
        memory.sweep_stale()
        try:
            self.plan = plan = Plan.of(cfg.vcpus, cfg.uses_preempt_channel, channel_room(cfg.socket_queue.capacity))
            self.sup = sup = Supervisor(plan)
            self.mem = mem = GuestMemory(cfg, plan.slots)
            self.ledger = Ledger(plan, cfg.nhost, cfg.clock.real(cfg.deadline))
            if self.trace:
                self.arena = Arena.for_run(cfg, plan.slots)
            fill_initial(mem.src, cfg.seed, cfg.zero_fraction)  # the guest as it booted
            self.t0 = time.monotonic_ns()  # until the guest runs; then the migration starts
            q = cfg.socket_queue
            self.link = Link(mem.link, cfg.bandwidth, cfg.latency, q.capacity, multiprocessing.get_context(START_METHOD).Lock(),
                             cfg.clock, send_buffer=q.send, send_wake=q.send_wake)
            sup.start(cfg=cfg, plan=plan, mem=mem, link=self.link, ledger=self.ledger, arena=self.arena)
            mem.unlink()  # from here on, nothing of this run is visible in /dev/shm
        except BaseException:
            self.close()
            raise
        self.deadline = time.monotonic() + cfg.clock.real(cfg.deadline)
        return self

    # -- API while running ----------------------------------------------------
    @property
    def procs(self) -> list[Proc]:
        """The run's processes (role, pid, exit code): for tools that watch or profile them."""
        return list(self.sup.procs) if self.sup is not None else []

    def _running(self) -> Supervisor:
        if self.closed or self.sup is None or not self.sup.procs:
            raise RuntimeError("the migration is not running")
        return self.sup

    def start_postcopy(self) -> None:
        """QMP migrate-start-postcopy."""
        if not self.cfg.postcopy:
            raise RuntimeError("postcopy is not enabled in mode 'precopy' (QEMU: postcopy-ram is off)")
        with self._lock:
            sup = self._running()
            src = sup.proc(sup.plan.source)
            if not src.process.is_alive():
                raise RuntimeError("the migration has ended: nothing to switch over (wait() returns its report)")
            src.send(Ctl.START_POSTCOPY)

    def wait_for(self, until: Callable[[Sample], bool], timeout: float | None = None) -> bool:
        """Run the migration until a live sample satisfies ``until`` (as QEMU's tests poll
        query-migrate, e.g. for dirty-sync-count >= 2 before migrate-start-postcopy). The migration
        advances only while ``wait_for``, ``wait_for_pause`` or ``wait`` runs. False on timeout,
        or if the migration ended first (``wait()`` then returns its report)."""
        return self._run_until(lambda: self.last_sample is not None and until(self.last_sample), timeout)

    def wait_for_pause(self, timeout: float | None = None) -> bool:
        """Run the migration until the source and every destination receiver are postcopy-paused
        (QEMU's tests wait for postcopy-paused on both sides). False on timeout, or if the migration
        ended first (``wait()`` then returns its report)."""
        return self._run_until(self._all_paused, timeout)

    def _run_until(self, done: Callable[[], bool], timeout: float | None) -> bool:
        end = None if timeout is None else time.monotonic() + timeout
        try:
            self._loop(until=lambda: done() or (end is not None and time.monotonic() >= end))
        except RunFailed:
            return False
        return done()

    def recover(self) -> None:
        """QMP migrate-recover on the destination and migrate resume=true on the source: new channels
        for a postcopy-paused migration. With ``recover_after=None`` nothing else resumes it."""
        with self._lock:
            sup = self._running()
            if self.phase != "postcopy-paused":
                raise RuntimeError(f"nothing to recover: the migration is in {self.phase}, not postcopy-paused")
            waiting = sorted(r.title for r in sup.plan.pausable if r not in self.paused_roles)
            if waiting:
                raise RuntimeError(f"{', '.join(waiting)} has not paused yet: call wait_for_pause() first")
            self._recover()

    def _all_paused(self) -> bool:
        return (self.phase == "postcopy-paused" and self.sup is not None
                and self.paused_roles >= set(self.sup.plan.pausable))

    def _recover(self) -> None:
        """New channels, the link's queues of the old ones forgotten; the source decides the order
        in which they are used: main channel and return path, receivedmap, preempt channel, RESUME."""
        assert self.sup is not None and self.link is not None
        self.recover_at = None
        self.paused_roles.clear()
        self._mark(Mark.RECOVER)
        self.phase = "postcopy-recover"
        self._sample()
        self.link.reset()  # every receiver is paused: nothing is on the link
        self.sup.recover_channels()

    # -- the event loop -------------------------------------------------------
    def wait(self) -> Report:
        """Run to the end and return the report, whatever the end was."""
        try:
            if self.error is not None:  # wait_for_pause() saw it fail
                raise RunFailed(self.error)
            self._loop()
        except KeyboardInterrupt:
            self.error = f"interrupted (SIGINT) during {self.phase}"
        except RunFailed:
            pass
        with sigint_deferred() as late:
            try:
                if self.sup is not None:
                    self.sup.close()  # every child gone: what they counted is all there is
                self.record = self._record()
            finally:
                self.close()
            report = build_report(self.record)
            if self.trace:  # a failed or interrupted run is the one whose trace matters most
                self.trace_error = write_trace_or_say(self.trace, self.record, report)
        self.interrupted_late = late[0]
        return report

    def _fail(self, msg: str) -> None:
        """The first failure wins, except that a child killed by a signal is the cause of whatever
        its peers then report (a closed channel, a broken pipe)."""
        if self.error is None:
            assert self.sup is not None
            killed = self.sup.killed(wait=0.5 if ("closed" in msg or "gone" in msg) else 0.0)
            if killed and not msg.startswith(killed[0].title + " was killed"):
                p = killed[0]
                msg = f"{p.title} was killed by signal {-p.process.exitcode} during {self.phase} ({msg})"
            self.error = msg
        raise RunFailed(msg)

    def _loop(self, until: Callable[[], bool] | None = None) -> None:
        sup = self._running()
        assert self.mem is not None
        next_sample = time.monotonic()
        sample_every = self.cfg.clock.real(SAMPLE_EVERY)
        while sup.live():
            if until is not None and until():
                return
            now = time.monotonic()
            if now >= self.deadline:
                waits = "; ".join(f"{p.title}: {self.mem.get_status(p.role.index)}" for p in sup.live())
                why = (" (recover_after=None and recover() was not called)"
                       if self._all_paused() and self.cfg.recover_after is None else "")
                self._fail(f"deadline of {self.cfg.deadline:g}s passed during {self.phase}{why}: {waits}")
            if now >= next_sample:
                self._sample()
                next_sample = now + sample_every
            if self.recover_at is not None and now >= self.recover_at:
                with self._lock:
                    if self._all_paused():
                        self._recover()
            live = sup.live()
            fds = [p.ctrl_in.fd for p in live] + [p.process.sentinel for p in live]
            wake = min(next_sample, self.deadline, self.recover_at or self.deadline)
            r, _, _ = select.select(fds, [], [], max(0.0, wake - now))
            ready = set(r)
            for p in live:
                if p.ctrl_in.fd in ready:
                    self._drain(p)
            for p in live:
                if p.process.sentinel in ready:
                    self._drain(p)
                    p.process.join()
                    p.exited = True
                    code = p.process.exitcode
                    if code != 0 or not p.done:
                        how = f"was killed by signal {-code}" if code and code < 0 else f"exited with code {code}"
                        self._fail(f"{p.title} {how} during {self.phase}")
        self._sample()

    def _drain(self, p: Proc) -> None:
        try:
            while p.ctrl_in.has_frame():
                name, obj = control.parse(p.ctrl_in.next_frame(0), f"{p.title} control")
                with self._lock:
                    self._handle(p, name, obj)
        except ProtocolError as e:
            self._fail(str(e))

    def _set_guest_phase(self, phase: int) -> None:
        assert self.mem is not None and self.sup is not None
        self.mem.ctl[memory.PHASE] = phase
        for fd in self.sup.efds:
            os.eventfd_write(fd, 1)

    def _mark(self, name: Mark, t: int | None = None) -> None:
        self.events.append(Event(name, time.monotonic_ns() if t is None else t))

    def _handle(self, p: Proc, name: Ctl, obj: Any) -> None:
        assert self.sup is not None and self.mem is not None
        plan = self.sup.plan
        if name is Ctl.ERROR:
            self._fail(str(obj))
        elif name is Ctl.DONE:
            p.done = True
        elif name is Ctl.EVENT:
            ev, t, info = Ev(obj[0]), obj[1], tuple(obj[2:])
            self.events.append(Event(ev, t, p.role, info))
            self._on_event(p.role, ev, t)
        elif name is Ctl.READY:  # a vCPU runs, or a receiver listens (-incoming is set up first)
            self.ready.add(p.role)
            if len(self.ready) == len(plan.roles) - 1:
                self.t0 = time.monotonic_ns()  # the guest runs: the migration starts
                self.sup.proc(plan.source).send(Ctl.START)
        elif name is Ctl.PAUSED:
            self.paused[p.role] = obj
            if len(self.paused) == len(plan.vcpus):
                self._mark(Mark.GUEST_STOPPED, max(self.paused.values()))
                self.sup.proc(plan.source).send(Ctl.VM_STOPPED)
        elif name is Ctl.RESUMED:
            self.resumed[p.role] = obj
            if len(self.resumed) == len(plan.vcpus):
                self._mark(Mark.GUEST_RESUMED, max(self.resumed.values()))
        else:
            self._fail(f"{p.title} sent {name.value!r}, which only the controller sends")

    def _on_event(self, role: Role, ev: Ev, t: int) -> None:
        assert self.sup is not None and self.mem is not None
        plan = self.sup.plan
        if ev is Ev.SETUP_DONE:
            self.phase = "precopy"
        elif ev is Ev.STOP_VM:
            self.phase = "switchover"
            self._set_guest_phase(memory.PAUSE)
        elif ev is Ev.RUNNING:
            self.phase = "postcopy"
            self._set_guest_phase(memory.RUN_DST)
            self._mark(Mark.GUEST_RESUME_REQUESTED)
        elif ev is Ev.EOS:
            self.eos.add(role)
            if self.eos == set(plan.receivers):
                missing = int(self.mem.received.size - np.count_nonzero(self.mem.received))
                if missing:
                    self._fail(f"the source ended the migration with {missing} target pages never"
                               f" received by the destination")
                self._mark(Mark.COMPLETE)
                self.phase = "completion"
                self.sup.proc(plan.listen).send(Ctl.SHUT)
        elif ev is Ev.COMPLETED:  # the source's completed: the guest runs until then, and is stopped
            self._set_guest_phase(memory.QUIT)  # there only because the run ends (QEMU's runs on)
        elif ev is Ev.POSTCOPY_PAUSED:  # once every one of them has paused, recovery is due
            if self.phase != "postcopy-paused":
                self.phase = "postcopy-paused"
                self._sample()  # every pause and resume is in the timeline, however short
            self.paused_roles.add(role)
            if self._all_paused() and self.cfg.recover_after is not None:
                self.recover_at = time.monotonic() + self.cfg.clock.real(self.cfg.recover_after)
        elif ev is Ev.POSTCOPY_RESUMED:  # the source has its RESUME_ACK: postcopy-active again
            self.phase = "postcopy"
            self._sample()

    def _sample(self) -> None:
        mem, led = self.mem, self.ledger
        if mem is None or led is None or self.closed:
            return
        s = Sample.take(self.cfg.clock, led, mem, self.phase, self.t0)
        self.timeline.append(s)
        self.last_sample = s
        if self.on_sample is not None:
            self.on_sample(s)

    # -- the end --------------------------------------------------------------
    def _record(self) -> RunRecord:
        """Everything the run produced, copied out of shared memory (every child has gone)."""
        cfg = self.cfg
        return RunRecord.collect(cfg, self.plan or Plan.of(cfg.vcpus, cfg.uses_preempt_channel, 0), self.t0,
                                 self.error, self.events, self.timeline, self.calibration, link=self.link,
                                 procs=self.sup.procs if self.sup else [], ledger=self.ledger,
                                 mem=self.mem, arena=self.arena)

    def close(self) -> None:
        """Stop every child, reap it, close every pipe, release shared memory. Idempotent; after it
        the link, the ledger and guest memory refuse to be used (a clear error, never a crash)."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if self.sup is not None:
                self.sup.close()
            for part in (self.link, self.ledger, self.mem, self.arena):
                if part is not None:
                    part.close()
            self.arena = None


def run(config: Config, on_sample: Callable[[Sample], None] | None = None, trace: str | None = None) -> Report:
    """Perform one migration and return its report (the CLI's ``shmig run``)."""
    return Migration(config, on_sample, trace).start().wait()

