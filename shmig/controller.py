"""The controller: creates shared memory and pipes, starts and stops every process, pauses and
resumes the guest at switchover, samples progress, and turns what the children report into a Report.

It is the management side of a migration (what libvirt and QMP are to QEMU): the migration logic
lives in the children; the controller only reacts to their events, watches them die, and enforces
the run's deadline with a message naming who was waiting for what.
"""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import select
import time
import warnings
from typing import Any, Callable

import numpy as np

from . import memory
from .config import Config
from .destination import Listen, PreemptReceiver
from .guest import Vcpu
from .link import Link
from .memory import GuestMemory
from .pattern import fill_initial
from .process import Child
from .report import Report, build_report
from .source import Source
from .trace import write_trace
from .wire import FrameReader, FrameWriter, ProtocolError, ctrl_fields

F_SETPIPE_SZ = 1031
SAMPLE_EVERY = 0.1
START_METHOD = "fork"  # children inherit the mappings; pinned because 3.14 changes the default


def pipe_max() -> int:
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            return int(f.read())
    except OSError:
        return 1 << 20


def make_pipe(size: int | None = None) -> tuple[int, int]:
    r, w = os.pipe()
    if size:
        try:
            fcntl.fcntl(w, F_SETPIPE_SZ, min(size, pipe_max()))
        except OSError:
            pass
    return r, w


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
        self.mem: GuestMemory | None = None
        self.procs: list[_Proc] = []
        self.fds: list[int] = []
        self.efds: list[int] = []
        self.events: dict[str, int] = {}
        self.phase = "setup"
        self.error: str | None = None
        self.samples: list[dict[str, Any]] = []
        self.ready: set[int] = set()
        self.paused: dict[int, int] = {}
        self.resumed: dict[int, int] = {}
        self.eos: set[str] = set()
        self.closed = False

    # -- start ----------------------------------------------------------------
    def start(self) -> "Migration":
        cfg = self.cfg
        ctx = multiprocessing.get_context(START_METHOD)
        memory.sweep_stale()
        try:
            self.mem = mem = GuestMemory(cfg)
            fill_initial(mem.src, cfg.seed, cfg.zero_fraction)  # the guest as it booted
            self.t0 = time.monotonic_ns()  # until the guest runs; then the migration starts
            pre_r, pre_w = self._pipe(cfg.socket_buffer)
            ret_r, ret_w = self._pipe(1 << 16)
            fault_r, fault_w = self._pipe(1 << 16)
            roles: list[tuple[type[Child], dict[str, int], int]] = [
                (Source, {"precopy": pre_w, "return": ret_r}, 0),
                (Listen, {"precopy": pre_r, "return": ret_w, "fault": fault_r}, 0),
            ]
            if cfg.uses_preempt_channel:
                post_r, post_w = self._pipe(cfg.socket_buffer)
                roles[0][1]["postcopy"] = post_w
                roles.append((PreemptReceiver, {"postcopy": post_r}, 0))
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
            all_fds = set(self.fds) | set(self.efds)
            link = Link(mem.link, cfg.bandwidth, cfg.latency, ctx.Lock())
            for (cls, fds, v), (down_r, down_w, up_r, up_w) in zip(roles, ctrl):
                fds = dict(fds, ctrl_in=down_r, ctrl_out=up_w)
                child = cls(cfg, mem, link, fds, all_fds, self.efds, v)
                p = ctx.Process(target=child.main, args=(os.getpid(),), daemon=True)
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
        self.deadline = time.monotonic() + cfg.deadline
        return self

    def _pipe(self, size: int | None = None) -> tuple[int, int]:
        r, w = make_pipe(size)
        self.fds += [r, w]
        return r, w

    # -- API while running ----------------------------------------------------
    def start_postcopy(self) -> None:
        """QMP migrate-start-postcopy."""
        if not self.cfg.postcopy:
            raise RuntimeError("postcopy is not enabled in mode 'precopy' (QEMU: postcopy-ram is off)")
        if self.closed or not self.procs:
            raise RuntimeError("the migration is not running")
        self.procs[0].ctrl_out.ctrl("start_postcopy")

    # -- the event loop -------------------------------------------------------
    def wait(self) -> Report:
        try:
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
            self._write_trace(self.trace)
        return report

    def _write_trace(self, path: str) -> None:
        """The trace, whatever became of the run; a path that cannot be written costs the trace,
        never the report (``trace_error`` says why, and a RuntimeWarning is raised for API users)."""
        try:
            write_trace(path, self)
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

    def _loop(self) -> None:
        next_sample = time.monotonic()
        while not all(p.exited for p in self.procs):
            now = time.monotonic()
            if now >= self.deadline:
                waits = "; ".join(f"{p.title}: {self.mem.get_status(p.child.proc_index)}"
                                  for p in self.procs if not p.exited)
                self._fail(f"deadline of {self.cfg.deadline:g}s passed during {self.phase}: {waits}")
            if now >= next_sample:
                self._sample()
                next_sample = now + SAMPLE_EVERY
            live = [p for p in self.procs if not p.exited]
            fds = [p.ctrl_in.fd for p in live] + [p.process.sentinel for p in live]
            r, _, _ = select.select(fds, [], [], max(0.0, min(next_sample, self.deadline) - now))
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
        cfg = self.cfg
        if name == "error":
            self._fail(str(obj))
        elif name == "stats":
            p.stats = obj
        elif name == "event":
            ev, t = obj
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
        elif name == "ready":
            self.ready.add(p.child.vcpu)
            if len(self.ready) == cfg.vcpus:
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

    def _sample(self) -> None:
        mem = self.mem
        if mem is None or "counters" not in mem.__dict__:
            return
        c = mem.counters
        s = {
            "t_ms": round((time.monotonic_ns() - self.t0) / 1e6, 1),
            "phase": self.phase,
            "precopy_bytes": int(c[memory.C_PRECOPY_BYTES]),
            "postcopy_bytes": int(c[memory.C_POSTCOPY_BYTES]),
            "remaining_pages": int(c[memory.C_REMAINING]),
            "received_pages": int(np.count_nonzero(mem.received)),
            "faults_outstanding": int(np.count_nonzero(mem.wait[:, 0] >= 0)),
            "guest_accesses": int(c[memory.C_GUEST0:memory.C_GUEST0 + self.cfg.vcpus].sum()),
        }
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
        for fd in self.fds + self.efds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds, self.efds = [], []
        if self.mem is not None:
            self.mem.close()


def run(config: Config, on_sample: Callable[[dict[str, Any]], None] | None = None,
        trace: str | None = None) -> Report:
    """Perform one migration and return its report (the CLI's ``shmig run``)."""
    return Migration(config, on_sample, trace).start().wait()
