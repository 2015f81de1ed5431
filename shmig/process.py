"""What every child process of a run has in common: its name in ``ps``, its pipes, its way to die.

Children are forked from the controller (start method pinned to ``fork``: they inherit the shared
memory mappings, so nothing has to be attached by name and the names can be unlinked at once).
They ignore SIGINT (the controller handles Ctrl-C and stops them), die with the controller
(``PR_SET_PDEATHSIG``), report what they are doing in a shared status slot, count what they
measure in the ledger as they go, and report any error on their control pipe before exiting
non-zero.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from . import control
from .config import Config
from .control import Ctl, Ev
from .events import Arena, K, Recorder
from .fds import close_fds
from .ledger import Ledger
from .link import Link
from .memory import GuestMemory
from .multifd import MultifdSync
from .plan import Channel, Plan, Role
from .reader import FrameReader
from .userfault import UffdHandoff
from .wire import ChannelClosed, FrameWriter, ProtocolError

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def set_title(title: str) -> None:
    try:
        import setproctitle

        setproctitle.setproctitle(title)
        setproctitle.setthreadtitle(title)
    except ImportError:
        pass


@dataclass
class Shared:
    """What every child of a run inherits across the fork."""

    cfg: Config
    plan: Plan
    mem: GuestMemory
    link: Link
    ledger: Ledger
    efds: list[int]  # one wake-up eventfd per vCPU
    multifd_sync: "MultifdSync | None" = None  # the multifd receivers' SYNC handshake with the listen thread
    arena: Arena | None = None  # record events (``--trace``)
    uffd: UffdHandoff | None = None  # --fault-backend uffd: the vCPUs' uffds' way to the placers
    all_fds: set[int] = field(default_factory=set)  # every descriptor of the run: a child closes the others'


@dataclass
class Ends:
    """A child's descriptors: its control pipes, its end of each channel, its fd socket (where the
    new pipe ends of a postcopy recovery arrive)."""

    ctrl_in: int
    ctrl_out: int
    channels: dict[Channel, int]
    fdsock: int | None = None
    multifd: dict[int, int] = field(default_factory=dict)  # multifd channel number -> its end

    def all(self) -> set[int]:
        return {self.ctrl_in, self.ctrl_out, *self.channels.values(), *self.multifd.values(),
                *([self.fdsock] if self.fdsock else [])}


class Child:
    """Base of mig/src, mig/dst/listen, mig/dst/preempt and guest/vcpuN."""

    tr: Recorder | None = None  # the recorder every event hook checks for

    def __init__(self, shared: Shared, role: Role, ends: Ends):
        self.shared = shared
        self.cfg = shared.cfg
        self.mem = shared.mem
        self.link = shared.link
        self.ledger = shared.ledger
        self.efds = shared.efds
        self.role = role
        self.title = role.title
        self.ends = ends

    # -- lifecycle ------------------------------------------------------------
    def main(self, parent_pid: int) -> None:
        """The child's entry point after fork."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # held by the controller across fork
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _die_with_parent()
        if os.getppid() != parent_pid:
            os._exit(1)
        set_title(self.title)
        keep = self.ends.all() | set(self.efds) | (self.shared.multifd_sync.fds() if self.shared.multifd_sync else set())
        close_fds(self.shared.all_fds - keep)
        if self.shared.uffd is not None:
            self.shared.uffd.keep(self.role)
        self.ctrl_out = FrameWriter(self.ends.ctrl_out, f"{self.title} control")
        self.ctrl_in = FrameReader(self.ends.ctrl_in, f"{self.title} control", max_frame=control.MAX_CTRL_FRAME, strict=True)
        code = 0
        profile_dir = os.environ.get("SHMIG_PROFILE")
        try:
            if self.shared.arena is not None:
                self.tr = Recorder(self.title, self.shared.arena, self.role.index)
            self.status("starting")
            self.setup()
            if profile_dir:  # cProfile of this process, one file per process title
                import cProfile

                prof = cProfile.Profile()
                try:
                    prof.runcall(self.run)
                finally:
                    os.makedirs(profile_dir, exist_ok=True)
                    prof.dump_stats(os.path.join(profile_dir, self.title.replace("/", "_") + ".prof"))
            else:
                self.run()
            self.status("exited")
            self.ctrl(Ctl.DONE)
        except BaseException as e:  # every failure is reported, then the process exits non-zero
            code = 1
            self.report_error(e)
        sys.stdout.flush()
        os._exit(code)

    def report_error(self, e: BaseException) -> None:
        if isinstance(e, (ProtocolError, ChannelClosed)):
            msg = f"{self.title}: {e}"
        else:
            tb = traceback.extract_tb(e.__traceback__)
            where = f" at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno}" if tb else ""
            msg = f"{self.title}: {type(e).__name__}: {e}{where}"
        self.status(f"failed: {msg}")
        try:
            self.ctrl(Ctl.ERROR, msg[:4096])  # one line, far below the control frame's limit
        except (OSError, ChannelClosed):  # the controller has gone (Ctrl-C): nobody to tell
            pass

    def status(self, text: str) -> None:
        self.mem.set_status(self.role.index, text)

    def setup(self) -> None:
        pass

    def run(self) -> None:
        raise NotImplementedError

    # -- control helpers ----------------------------------------------------
    def ctrl(self, name: Ctl, obj: Any = None) -> None:
        control.send(self.ctrl_out, name, obj)

    def recv_ctrl(self) -> tuple[Ctl, Any]:
        """The next message from the controller (blocking)."""
        return control.parse(self.ctrl_in.next_frame(), f"{self.title} control")

    def expect_ctrl(self, want: Ctl) -> Any:
        name, obj = self.recv_ctrl()
        if name is not want:
            raise ProtocolError(f"control channel: expected {want.value!r}, got {name.value!r}")
        return obj

    def take_channels(self, names: Any) -> dict[Channel, int]:
        """The new pipe ends of a recovery, which the controller passed (SCM_RIGHTS) on this child's
        fd socket just before the command naming them: pipes cannot be inherited after fork."""
        try:
            channels = [Channel(n) for n in names]
        except ValueError:
            raise ProtocolError(f"{self.title} control channel: bad channel list {names!r}") from None
        assert self.ends.fdsock is not None
        sock = socket.socket(fileno=os.dup(self.ends.fdsock))
        try:
            _, fds, flags, _ = socket.recv_fds(sock, 16, len(channels) + 1)
        finally:
            sock.close()
        if len(fds) != len(channels) or flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            raise ProtocolError(f"{self.title} fd socket: got {len(fds)} descriptors for {names}")
        return dict(zip(channels, fds))

    def event(self, name: Ev, *info: Any) -> int:
        """Tell the controller something happened now (its timeline, the report)."""
        t = time.monotonic_ns()
        self.ctrl(Ctl.EVENT, [name.value, t, *info])
        if self.tr:
            self.tr.put(K.MILESTONE, t, t, self.tr.intern(name.value), self.tr.intern(str(info[0])) if info else -1)
        return t
