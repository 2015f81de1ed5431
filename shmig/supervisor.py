"""The run's children: made from the plan, forked, watched, given new channels, reaped.

``Supervisor`` builds every pipe of the plan, forks one child per role with its ends (and closes
the rest in the controller), keeps each child's control channel, hands the processes of a postcopy
recovery their new pipe ends (over a unix socket each, SCM_RIGHTS: a forked child cannot inherit a
pipe made after the fork), tells which child a signal killed, and on ``close`` stops and reaps
every child whatever state the run is in. What the children do is theirs; what the migration's
state is, is the controller's.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import time
from typing import Iterator

from . import control
from .destination import Listen, MultifdReceiver, PreemptReceiver
from .fds import close_fds, make_pipe, new_eventfd
from .guest import Vcpu
from .multifd import MultifdSync
from .plan import Channel, Kind, Plan, Role
from .process import Child, Ends, Shared
from .reader import FrameReader
from .source import Source
from .userfault import UffdHandoff
from .wire import ChannelClosed, FrameWriter

START_METHOD = "fork"  # children inherit the mappings; pinned because 3.14 changes the default
CHILD_OF: dict[Kind, type[Child]] = {Kind.SOURCE: Source, Kind.LISTEN: Listen, Kind.PREEMPT: PreemptReceiver,
                                     Kind.VCPU: Vcpu, Kind.MULTIFD: MultifdReceiver}


@contextlib.contextmanager
def sigint_held() -> Iterator[None]:
    """SIGINT blocked for a fork: a Ctrl-C is delivered afterwards, to the controller, instead of
    to a child that has not yet set it to be ignored (a traceback from inside fork)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class Proc:
    """The controller's view of one child."""

    def __init__(self, role: Role, process: multiprocessing.Process, ctrl_in: FrameReader, ctrl_out: FrameWriter,
                 child_ctrl_out: int, channels: dict[Channel, int]):
        self.role = role
        self.child_ctrl_out = child_ctrl_out  # the child's end of its control output (its fd number)
        self.channels = channels  # the child's end of each channel at fork (fd numbers in the child)
        self.title = role.title
        self.process = process
        self.ctrl_in = ctrl_in
        self.ctrl_out = ctrl_out
        self.done = False  # it said DONE: everything it counted is in the ledger
        self.exited = False  # reaped

    def send(self, name: control.Ctl, obj: object = None) -> None:
        try:
            control.send(self.ctrl_out, name, obj)
        except (OSError, ChannelClosed):
            pass  # it has gone; its sentinel says so


class Supervisor:
    def __init__(self, plan: Plan):
        self.plan = plan
        self.procs: list[Proc] = []
        self.fds: list[int] = []  # the controller's own descriptors
        self.efds: list[int] = []  # one wake-up eventfd per vCPU
        self.multifd_sync: MultifdSync | None = None
        self.fdsocks: dict[Role, socket.socket] = {}  # the recovery's way to a pausable child
        self.uffd: UffdHandoff | None = None  # --fault-backend uffd's hand-off sockets (shmig.userfault)
        self.closed = False

    def _pipe(self, size: int | None) -> tuple[int, int]:
        r, w = make_pipe(size)
        self.fds += [r, w]
        return r, w

    def start(self, **shared: object) -> Shared:
        """Every pipe of the plan, then every child forked with its ends. ``shared`` are the
        fields of ``process.Shared`` other than the descriptors (made here)."""
        plan = self.plan
        ends: dict[Role, dict[Channel, int]] = {r: {} for r in plan.roles}
        multifd: dict[Role, dict[int, int]] = {r: {} for r in plan.roles}
        for p in plan.pipes:
            r, w = self._pipe(p.size)
            for role, fd in ((p.reader, r), *((role, w) for role in p.writers)):
                if p.channel is Channel.MULTIFD:
                    multifd[role][p.index] = fd
                else:
                    ends[role][p.channel] = fd
        fdsock: dict[Role, int] = {}
        for role in plan.pausable:
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self.fdsocks[role] = mine
            fdsock[role] = theirs.detach()
            self.fds.append(fdsock[role])  # closed here once the children have it, like their pipe ends
        self.efds = [new_eventfd() for _ in plan.vcpus]
        if plan.multifd:
            self.multifd_sync = MultifdSync(len(plan.multifd))
        ctrl = {role: (*self._pipe(None), *self._pipe(None)) for role in plan.roles}
        sh = Shared(efds=self.efds, multifd_sync=self.multifd_sync, **shared)  # type: ignore[arg-type]
        if sh.cfg.fault_backend == "uffd":  # the vCPUs' uffds' way to the placers, closed here once forked
            sh.uffd = self.uffd = UffdHandoff(plan, sh.cfg.nhost)
        sh.all_fds = (set(self.fds) | set(self.efds) | {s.fileno() for s in self.fdsocks.values()}
                      | (self.multifd_sync.fds() if self.multifd_sync else set()))
        ctx = multiprocessing.get_context(START_METHOD)
        for role in plan.roles:
            down_r, down_w, up_r, up_w = ctrl[role]
            child = CHILD_OF[role.kind](sh, role, Ends(down_r, up_w, ends[role], fdsock.get(role), multifd[role]))
            p = ctx.Process(target=child.main, args=(os.getpid(),), daemon=True)
            with sigint_held():  # a Ctrl-C now lands once the child ignores it and close() knows it
                p.start()
                self.procs.append(Proc(role, p, FrameReader(up_r, f"{role.title} control",
                                                            max_frame=control.MAX_CTRL_FRAME, strict=True),
                                       FrameWriter(down_w, f"{role.title} control"), up_w, ends[role]))
        if self.uffd is not None:
            self.uffd.close()
        keep = {fd for c in ctrl.values() for fd in (c[1], c[2])}
        close_fds(fd for fd in self.fds if fd not in keep)
        self.fds = sorted(keep)
        return sh

    def proc(self, role: Role) -> Proc:
        for p in self.procs:
            if p.role == role:
                return p
        raise KeyError(role.title)

    def live(self) -> list[Proc]:
        return [p for p in self.procs if not p.exited]

    def recover_channels(self) -> None:
        """New pipes for every recoverable channel; each pausable child gets its ends (the
        destination's first: it listens), then the command that names them (migrate-recover on
        the destination, migrate resume=true on the source)."""
        plan = self.plan
        new: dict[Role, dict[Channel, int]] = {r: {} for r in plan.pausable}
        made: list[int] = []
        for p in plan.pipes:
            if not p.recoverable:
                continue
            r, w = make_pipe(p.size)
            made += [r, w]
            new[p.reader][p.channel] = r
            for role in p.writers:
                new[role][p.channel] = w
        try:
            for role in plan.pausable:
                chans = new[role]
                try:
                    socket.send_fds(self.fdsocks[role], [b"F"], list(chans.values()))
                except OSError:
                    continue  # it has gone; its sentinel says so
                cmd = control.Ctl.RESUME if role.kind is Kind.SOURCE else control.Ctl.RECOVER
                self.proc(role).send(cmd, [c.value for c in chans])
        finally:  # the children hold them now: a peer that closes its end must be seen to close it
            close_fds(made)

    def killed(self, wait: float) -> list[Proc]:
        """Children killed by a signal. A peer sees the pipe close while the kernel is still
        tearing the killed process down, so give it ``wait`` seconds to become reapable."""
        end = time.monotonic() + wait
        while True:
            killed = [p for p in self.procs if (p.process.exitcode or 0) < 0]
            if killed or time.monotonic() >= end:
                return killed
            time.sleep(0.01)

    def close(self) -> None:
        """Stop every child, reap it, close every descriptor. Idempotent."""
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
            p.exited = True
        close_fds(self.fds + self.efds)
        self.fds, self.efds = [], []
        if self.multifd_sync is not None:
            self.multifd_sync.close()
            self.multifd_sync = None
        if self.uffd is not None:
            self.uffd.close()
        for sock in self.fdsocks.values():
            sock.close()
