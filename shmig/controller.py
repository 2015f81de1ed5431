"""The controller: creates shared memory and pipes, starts and stops every process, pauses and
resumes the guest at switchover, samples progress, and turns what the children report into a Report.

It is the management side of a migration (what libvirt and QMP are to QEMU): the migration logic
lives in the children; the controller only reacts to their events, watches them die, and enforces
the run's deadline with a message naming who was waiting for what.

Postcopy recovery is managed here too, as libvirt does it: once the source and every destination
receiver report postcopy-paused, the controller waits ``recover_after`` (or for ``recover()``), then
creates new pipes and hands their ends to the children over a unix socket each (SCM_RIGHTS: a
forked child cannot inherit a pipe made after the fork): migrate-recover on the destination,
migrate resume=true on the source.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import multiprocessing
import os
import select
import signal
import socket
import threading
import time
import warnings
from typing import Any, Callable, Iterator

import numpy as np

from . import memory
from .config import Config, ConfigError
from .destination import Listen, PreemptReceiver, channel_room
from .events import Arena
from .guest import Vcpu
from .link import Link
from .memory import GuestMemory
from .pattern import fill_initial
from .process import Child
from .report import Report, build_report
from .source import Source
from .stats import dist_quantile
from .trace import write_trace
from .wire import FrameReader, FrameWriter, ProtocolError, close_fds, ctrl_fields

F_SETPIPE_SZ = 1031
SAMPLE_EVERY = 0.1  # emulated seconds between timeline samples
CALIBRATION_FACTORS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
CALIBRATION_S = 0.25  # emulated seconds of link time a calibration run takes
SUSTAINED = 0.97  # utilisation at which the machine keeps up with the emulated link
FILLED = 0.97  # ... and from first byte to last: the source must keep it busy too
START_METHOD = "fork"  # children inherit the mappings; pinned because 3.14 changes the default


def pipe_max() -> int:
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            return int(f.read())
    except OSError:
        return 1 << 20


def make_pipe(size: int | None = None) -> tuple[int, int]:
    """A pipe holding ``size`` bytes if the kernel lets us (beyond pipe-max-size needs
    CAP_SYS_RESOURCE), else as much as it allows; a receiver reads ahead for the rest."""
    r, w = os.pipe()
    if size:
        for want in (size, min(size, pipe_max())):
            try:
                fcntl.fcntl(w, F_SETPIPE_SZ, want)
                break
            except OSError:
                continue
    return r, w


@contextlib.contextmanager
def sigint_held() -> Iterator[None]:
    """SIGINT blocked for a fork: a Ctrl-C is delivered afterwards, to the controller, instead of
    to a child that has not yet set it to be ignored (a traceback from inside fork)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class RunFailed(Exception):
    pass


class _Proc:
    """The controller's view of one child."""

    def __init__(self, child: Child, process: multiprocessing.Process, ctrl_in: FrameReader,
                 ctrl_out: FrameWriter):
        self.child = child
        self.title = child.title
        self.process = process
        self.ctrl_in = ctrl_in
        self.ctrl_out = ctrl_out
        self.stats: dict[str, Any] | None = None
        self.exited = False


class Migration:
    """One migration. ``run()`` is ``start()`` then ``wait()``; ``start_postcopy()`` may come between."""

    def __init__(self, config: Config, on_sample: Callable[[dict[str, Any]], None] | None = None,
                 trace: str | None = None):
        self.cfg = config.validate()
        self.on_sample = on_sample
        self.trace = trace  # path of a Chrome/Perfetto trace to write at the end
        self.trace_error: str | None = None  # why the trace could not be written
        self.arena: Arena | None = None  # where the children record their events, when tracing
        self.trace_events: dict[int, dict[str, Any]] = {}  # what they recorded (Arena.collect)
        self.mem: GuestMemory | None = None
        self.procs: list[_Proc] = []
        self.fds: list[int] = []
        self.efds: list[int] = []
        self.events: dict[str, int] = {}
        self.phase = "setup"
        self.error: str | None = None
        self.samples: list[dict[str, Any]] = []
        self.ready: set[str] = set()
        self.paused: dict[int, int] = {}
        self.resumed: dict[int, int] = {}
        self.eos: set[str] = set()
        self.closed = False
        self.link: Link | None = None
        self.calibration: list[dict[str, Any]] = []  # --time-dilation auto: what each factor carried
        # postcopy recovery
        self.fdsocks: dict[str, socket.socket] = {}  # per channel process: where new pipe ends go
        self.channel_titles: set[str] = set()  # the processes that pause and recover
        self.paused_titles: set[str] = set()
        self.pause_started: int | None = None  # ns: this pause episode's first postcopy-paused
        self.pause_intervals: list[tuple[int, int]] = []  # (paused, resumed) ns, every episode
        self.postcopy_pauses = 0  # the source's postcopy-paused events
        self.recoveries = 0
        self.recover_at: float | None = None  # when recover_after has passed
        self._lock = threading.RLock()  # recover() may come from another thread than wait()

    # -- start ----------------------------------------------------------------
    def start(self) -> "Migration":
        if self.cfg.time_dilation == "auto":
            factor, self.calibration = calibrate_dilation(self.cfg)
            self.cfg = dataclasses.replace(self.cfg, time_dilation=factor)  # the caller's Config stays "auto"
        cfg = self.cfg
        ctx = multiprocessing.get_context(START_METHOD)
        memory.sweep_stale()
        try:
            self.mem = mem = GuestMemory(cfg)
            if self.trace:
                self.arena = Arena(mem.nprocs)
            fill_initial(mem.src, cfg.seed, cfg.zero_fraction)  # the guest as it booted
            self.t0 = time.monotonic_ns()  # until the guest runs; then the migration starts
            pre_r, pre_w = self._pipe(channel_room(cfg.socket_buffer))
            ret_r, ret_w = self._pipe(1 << 16)
            fault_r, fault_w = self._pipe(1 << 16)
            roles: list[tuple[type[Child], dict[str, int], int]] = [
                (Source, {"precopy": pre_w, "return": ret_r, "fdsock": self._fd_socket(Source.title)}, 0),
                (Listen, {"precopy": pre_r, "return": ret_w, "fault": fault_r,
                          "fdsock": self._fd_socket(Listen.title)}, 0),
            ]
            if cfg.uses_preempt_channel:
                post_r, post_w = self._pipe(channel_room(cfg.socket_buffer))
                roles[0][1]["postcopy"] = post_w
                roles.append((PreemptReceiver, {"postcopy": post_r,
                                                "fdsock": self._fd_socket(PreemptReceiver.title)}, 0))
            self.channel_titles = set(self.fdsocks)
            for v in range(cfg.vcpus):
                roles.append((Vcpu, {"fault": fault_w}, v))
            for _ in range(cfg.vcpus):
                fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self.efds.append(fd)
            ctrl = []
            for _ in roles:
                down_r, down_w = self._pipe()
                up_r, up_w = self._pipe()
                ctrl.append((down_r, down_w, up_r, up_w))
            all_fds = set(self.fds) | set(self.efds) | {s.fileno() for s in self.fdsocks.values()}
            self.link = link = Link(mem.link, cfg.bandwidth, cfg.latency, cfg.socket_buffer, ctx.Lock(),
                                    cfg.clock, send_buffer=cfg.send_buffer)
            for (cls, fds, v), (down_r, down_w, up_r, up_w) in zip(roles, ctrl):
                fds = dict(fds, ctrl_in=down_r, ctrl_out=up_w)
                child = cls(cfg, mem, link, fds, all_fds, self.efds, v)
                child.arena = self.arena
                p = ctx.Process(target=child.main, args=(os.getpid(),), daemon=True)
                with sigint_held():  # a Ctrl-C now lands once the child ignores it and close() knows it
                    p.start()
                    self.procs.append(_Proc(child, p, FrameReader(up_r, f"{child.title} control", max_frame=1 << 16),
                                            FrameWriter(down_w, f"{child.title} control")))
            keep = {fd for c in ctrl for fd in (c[1], c[2])}
            for fd in self.fds:
                if fd not in keep:
                    os.close(fd)
            self.fds = sorted(keep)
            mem.unlink()  # from here on, nothing of this run is visible in /dev/shm
        except BaseException:
            self.close()
            raise
        self.deadline = time.monotonic() + cfg.clock.real(cfg.deadline)
        return self

    def _pipe(self, size: int | None = None) -> tuple[int, int]:
        r, w = make_pipe(size)
        self.fds += [r, w]
        return r, w

    def _fd_socket(self, title: str) -> int:
        """A socket pair to pass a child the pipe ends of a recovery; returns the child's end."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.fdsocks[title] = mine
        fd = theirs.detach()
        self.fds.append(fd)  # closed here once the children have it, like the pipe ends they took
        return fd

    # -- API while running ----------------------------------------------------
    def start_postcopy(self) -> None:
        """QMP migrate-start-postcopy."""
        if not self.cfg.postcopy:
            raise RuntimeError("postcopy is not enabled in mode 'precopy' (QEMU: postcopy-ram is off)")
        if self.closed or not self.procs:
            raise RuntimeError("the migration is not running")
        self.procs[0].ctrl_out.ctrl("start_postcopy")

    def wait_for_pause(self, timeout: float | None = None) -> bool:
        """Run the migration until the source and every destination receiver are postcopy-paused
        (QEMU's tests wait for postcopy-paused on both sides). False on timeout, or if the migration
        ended first (``wait()`` then returns its report)."""
        end = None if timeout is None else time.monotonic() + timeout
        try:
            self._loop(until=lambda: self._all_paused() or (end is not None and time.monotonic() >= end))
        except RunFailed:
            return False
        return self._all_paused()

    def recover(self) -> None:
        """QMP migrate-recover on the destination and migrate resume=true on the source: new channels
        for a postcopy-paused migration. With ``recover_after=None`` nothing else resumes it."""
        with self._lock:
            if self.closed or not self.procs:
                raise RuntimeError("the migration is not running")
            if self.phase != "postcopy-paused":
                raise RuntimeError(f"nothing to recover: the migration is in {self.phase}, not postcopy-paused")
            waiting = sorted(self.channel_titles - self.paused_titles)
            if waiting:
                raise RuntimeError(f"{', '.join(waiting)} has not paused yet: call wait_for_pause() first")
            self._recover()

    def _all_paused(self) -> bool:
        return self.phase == "postcopy-paused" and self.paused_titles >= self.channel_titles

    def _recover(self) -> None:
        """New pipes, the link and read-ahead state of the old ones forgotten; the destination gets its
        ends first (it listens), then the source (it connects). The source decides the order in which
        the channels are used: main channel and return path, receivedmap, preempt channel, RESUME."""
        cfg = self.cfg
        self.recover_at = None
        self.paused_titles.clear()
        self.phase = "postcopy-recover"
        self._sample()
        self.link.reset()  # every receiver is paused: nothing is on the link
        pre_r, pre_w = make_pipe(channel_room(cfg.socket_buffer))
        ret_r, ret_w = make_pipe(1 << 16)
        plan = {"mig/dst/listen": ("recover", {"precopy": pre_r, "return": ret_w}),
                "mig/src": ("resume", {"precopy": pre_w, "return": ret_r})}
        if cfg.uses_preempt_channel:
            post_r, post_w = make_pipe(channel_room(cfg.socket_buffer))
            plan["mig/dst/preempt"] = ("recover", {"postcopy": post_r})
            plan["mig/src"][1]["postcopy"] = post_w
        try:
            for title in ("mig/dst/listen", "mig/dst/preempt", "mig/src"):
                if title not in plan:
                    continue
                cmd, fds = plan[title]
                (p,) = [p for p in self.procs if p.title == title]
                try:
                    socket.send_fds(self.fdsocks[title], [b"F"], list(fds.values()))
                except OSError:
                    continue  # it has gone; its sentinel says so
                self._send(p, cmd, list(fds))
        finally:  # the children hold them now: a peer that closes its end must be seen to close it
            for _, fds in plan.values():
                for fd in fds.values():
                    os.close(fd)

    # -- the event loop -------------------------------------------------------
    def wait(self) -> Report:
        try:
            if self.error is not None:  # wait_for_pause() saw it fail
                raise RunFailed(self.error)
            self._loop()
            report = self._report()
        except KeyboardInterrupt:
            self.error = f"interrupted (SIGINT) during {self.phase}"
            report = self._report()
        except RunFailed:
            report = self._report()
        finally:
            self.close()
        if self.trace:  # a failed or interrupted run is the one whose trace matters most
            self._write_trace(self.trace, report)
        return report

    def _write_trace(self, path: str, report: Report) -> None:
        """The trace, whatever became of the run; a path that cannot be written costs the trace,
        never the report (``trace_error`` says why, and a RuntimeWarning is raised for API users)."""
        try:
            write_trace(path, self, report)
        except OSError as e:
            self.trace_error = f"--trace {path}: cannot write it ({e.strerror or e})"
            warnings.warn(self.trace_error, RuntimeWarning, stacklevel=3)

    def _fail(self, msg: str) -> None:
        """The first failure wins, except that a child killed by a signal is the cause of whatever
        its peers then report (a closed channel, a broken pipe)."""
        if self.error is None:
            killed = self._killed(wait=0.5 if ("closed" in msg or "gone" in msg) else 0.0)
            if killed and not msg.startswith(killed[0].title + " was killed"):
                p = killed[0]
                msg = f"{p.title} was killed by signal {-p.process.exitcode} during {self.phase} ({msg})"
            self.error = msg
        raise RunFailed(msg)

    def _loop(self, until: Callable[[], bool] | None = None) -> None:
        next_sample = time.monotonic()
        sample_every = self.cfg.clock.real(SAMPLE_EVERY)
        while not all(p.exited for p in self.procs):
            if until is not None and until():
                return
            now = time.monotonic()
            if now >= self.deadline:
                waits = "; ".join(f"{p.title}: {self.mem.get_status(p.child.proc_index)}"
                                  for p in self.procs if not p.exited)
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
            live = [p for p in self.procs if not p.exited]
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
                    if code != 0 or p.stats is None:
                        how = f"was killed by signal {-code}" if code and code < 0 else f"exited with code {code}"
                        self._fail(f"{p.title} {how} during {self.phase}")
        self._sample()

    def _killed(self, wait: float) -> list[_Proc]:
        """Children killed by a signal. A peer sees the pipe close while the kernel is still
        tearing the killed process down, so give it ``wait`` seconds to become reapable."""
        end = time.monotonic() + wait
        while True:
            killed = [p for p in self.procs if (p.process.exitcode or 0) < 0]
            if killed or time.monotonic() >= end:
                return killed
            time.sleep(0.01)

    def _drain(self, p: _Proc) -> None:
        try:
            while p.ctrl_in.has_frame():
                self._handle(p, *ctrl_fields(p.ctrl_in.next_frame(0), f"{p.title} control"))
        except ProtocolError as e:
            self._fail(str(e))

    def _send(self, p: _Proc, name: str, obj: Any = None) -> None:
        try:
            p.ctrl_out.ctrl(name, obj)
        except OSError:
            pass  # it has gone; its sentinel says so

    def _set_guest_phase(self, phase: int) -> None:
        self.mem.ctl[memory.PHASE] = phase
        for fd in self.efds:
            os.eventfd_write(fd, 1)

    def _handle(self, p: _Proc, name: str, obj: Any) -> None:
        with self._lock:
            self._handle_locked(p, name, obj)

    def _handle_locked(self, p: _Proc, name: str, obj: Any) -> None:
        cfg = self.cfg
        if name == "error":
            self._fail(str(obj))
        elif name == "stats":
            p.stats = obj
        elif name == "event":
            ev, t = obj[:2]
            if ev in ("postcopy_paused", "postcopy_resumed"):
                self._recovery_event(p, ev, t)
                return
            self.events[ev if ev != "eos" else f"eos_{p.title}"] = t
            if ev == "setup_done":
                self.phase = "precopy"
            elif ev == "stop_vm":
                self.phase = "switchover"
                self._set_guest_phase(memory.PAUSE)
            elif ev == "running":
                self.phase = "postcopy"
                self._set_guest_phase(memory.RUN_DST)
                self.events["guest_resume_requested"] = time.monotonic_ns()
            elif ev == "eos":
                self.eos.add(p.title)
                want = {"mig/dst/listen"} | ({"mig/dst/preempt"} if cfg.uses_preempt_channel else set())
                if self.eos == want:
                    missing = int(self.mem.received.size - np.count_nonzero(self.mem.received))
                    if missing:
                        self._fail(f"the source ended the migration with {missing} target pages never"
                                   f" received by the destination")
                    self.events["complete"] = time.monotonic_ns()
                    self.phase = "completion"
                    self._send(self.procs[1], "shut")
                    self._set_guest_phase(memory.QUIT)
        elif name == "ready":  # a vCPU runs, or a receiver listens (-incoming is set up first)
            self.ready.add(p.title)
            if len(self.ready) == len(self.procs) - 1:
                self.t0 = time.monotonic_ns()  # the guest runs: the migration starts
                self._send(self.procs[0], "start")
        elif name == "paused":
            self.paused[p.child.vcpu] = obj
            if len(self.paused) == cfg.vcpus:
                self.events["guest_stopped"] = max(self.paused.values())
                self._send(self.procs[0], "vm_stopped")
        elif name == "resumed":
            self.resumed[p.child.vcpu] = obj
            if len(self.resumed) == cfg.vcpus:
                self.events["guest_resumed"] = max(self.resumed.values())
        else:
            self._fail(f"{p.title} sent an unknown control message {name!r}")

    def _recovery_event(self, p: _Proc, ev: str, t: int) -> None:
        """postcopy-paused from any channel process; postcopy-active again once the source has its
        RESUME_ACK. Once every one of them has paused, the recovery is due after recover_after."""
        if ev == "postcopy_paused":
            if self.phase != "postcopy-paused":
                self.phase = "postcopy-paused"
                self._sample()  # every pause and resume is in the timeline, however short
            self.paused_titles.add(p.title)
            if self.pause_started is None:
                self.pause_started = t
            if p.title == "mig/src":
                self.postcopy_pauses += 1
            if self._all_paused() and self.cfg.recover_after is not None:
                self.recover_at = time.monotonic() + self.cfg.clock.real(self.cfg.recover_after)
        elif p.title == "mig/src":
            self.phase = "postcopy"
            self._sample()
            self.recoveries += 1
            self.pause_intervals.append((self.pause_started or t, t))
            self.pause_started = None

    def _sample(self) -> None:
        mem = self.mem
        if mem is None or "counters" not in mem.__dict__:
            return
        c = mem.counters
        s = {
            "t_ms": round(self.cfg.clock.emulated_ms(time.monotonic_ns() - self.t0), 1),
            "phase": self.phase,
            "precopy_bytes": int(c[memory.C_PRECOPY_BYTES]),
            "postcopy_bytes": int(c[memory.C_POSTCOPY_BYTES]),
            "remaining_pages": int(c[memory.C_REMAINING]),
            "received_pages": int(np.count_nonzero(mem.received)),
            "faults_outstanding": int(np.count_nonzero(mem.wait[:, 0] >= 0)),
            "guest_accesses": int(c[memory.C_GUEST0:memory.C_GUEST0 + self.cfg.vcpus].sum()),
            "rounds": int(c[memory.C_ROUNDS]),
            "requests": int(c[memory.C_REQUESTS]),
        }
        dist = mem.lat_dist.sum(axis=0)  # the faults resolved so far, in QEMU's buckets
        s["faults_done"] = int(dist.sum())
        p50 = dist_quantile(dist, 0.5)
        s["fault_p50_us"] = None if p50 is None else round(self.cfg.clock.emulated_ns(p50), 1)  # us, emulated
        self.samples.append(s)
        if self.on_sample is not None:
            self.on_sample(s)

    def _report(self) -> Report:
        return build_report(self)

    # -- teardown -------------------------------------------------------------
    def close(self) -> None:
        """Stop every child, reap it, close every pipe, release shared memory. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for p in self.procs:
            if p.process.is_alive():
                p.process.terminate()
        for p in self.procs:
            p.process.join(2)
            if p.process.is_alive():
                p.process.kill()
                p.process.join()
        close_fds(self.fds + self.efds)
        self.fds, self.efds = [], []
        for sock in self.fdsocks.values():
            sock.close()
        if self.link is not None:
            self.link.close()
        if self.mem is not None:
            self.mem.close()
        if self.arena is not None:  # every child is gone: what they recorded is all there is
            self.trace_events = self.arena.collect()
            self.arena.close()
            self.arena = None


def calibrate_dilation(cfg: Config, start: float = 1.0) -> tuple[float, list[dict[str, Any]]]:
    """``--time-dilation auto``: the smallest factor at which a short run of this migration (same
    mode, link and guest; less RAM; postcopy at once) carries at least 97% of the link's rate
    while its queues hold data, and from first byte to last: the source too must keep
    the link busy, as QEMU's does at that rate (a source that cannot fill the socket would leave a
    request behind a shorter queue than QEMU's). Factors below ``start`` are not tried."""
    if cfg.bandwidth is None:
        return 1.0, []  # an unlimited link is whatever the machine does: nothing to sustain
    mib = 1024**2
    ram = int(min(max(cfg.bandwidth * CALIBRATION_S, 32 * mib), 512 * mib, cfg.ram)) // cfg.host_page * cfg.host_page
    ram = max(ram, cfg.host_page)
    tried: list[dict[str, Any]] = []
    for n in [f for f in CALIBRATION_FACTORS if f >= start] or [start]:
        # the same migration, smaller, postcopy at once (its frames cost the receivers the most)
        probe = dataclasses.replace(
            cfg, ram=ram, wss=None if cfg.wss is None else min(cfg.wss, ram), max_rounds=1,
            precopy_rounds=0 if cfg.postcopy else None, time_dilation=float(n), max_bandwidth=None,
            max_postcopy_bandwidth=None, deadline=60.0 / n, extra={})  # a minute of real time at most
        rep = Migration(probe).start().wait()
        util = rep.link.get("utilisation") if rep.ok else None
        end_to_end = None
        if rep.ok and rep.link.get("span_ms"):  # from the first byte carried to the last
            end_to_end = round(rep.link["carried_bytes"] / (rep.link["span_ms"] / 1e3) / cfg.bandwidth, 4)
        tried.append({"time_dilation": n, "utilisation": util, "end_to_end": end_to_end})
        if util is not None and util >= SUSTAINED and end_to_end is not None and end_to_end >= FILLED:
            return float(n), tried
    raise ConfigError(f"--time-dilation auto: the machine does not sustain the link even {n}x slowed"
                    f" down ({tried}); lower --bandwidth")


def run(config: Config, on_sample: Callable[[dict[str, Any]], None] | None = None,
        trace: str | None = None) -> Report:
    """Perform one migration and return its report (the CLI's ``shmig run``)."""
    return Migration(config, on_sample, trace).start().wait()
