"""What every child process of a run has in common: its name in ``ps``, its pipes, its way to die.

Children are forked from the controller (start method pinned to ``fork``: they inherit the shared
memory mappings, so nothing has to be attached by name and the names can be unlinked at once).
They ignore SIGINT (the controller handles Ctrl-C and stops them), die with the controller
(``PR_SET_PDEATHSIG``), report what they are doing in a shared status slot, and report any error
on their control pipe before exiting non-zero.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import time
import traceback
from typing import Any

from .config import Config
from .events import Arena, K, Recorder
from .link import Link
from .memory import GuestMemory
from .wire import ChannelClosed, FrameReader, FrameWriter, ProtocolError, close_fds, ctrl_fields

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


class Child:
    """Base of mig/src, mig/dst/listen, mig/dst/preempt and guest/vcpuN."""

    proc_index = 0
    title = "child"
    arena: Arena | None = None  # set by the controller before the fork: record events (``--trace``)
    tr: Recorder | None = None  # the recorder every event hook checks for

    def __init__(self, cfg: Config, mem: GuestMemory, link: Link, fds: dict[str, int],
                 all_fds: set[int], efds: list[int], vcpu: int = 0):
        self.cfg = cfg
        self.mem = mem
        self.link = link
        self.fds = fds
        self.all_fds = all_fds
        self.efds = efds
        self.vcpu = vcpu

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
        keep = set(self.fds.values()) | set(self.efds)
        close_fds(self.all_fds - keep)
        self.ctrl_out = FrameWriter(self.fds["ctrl_out"], f"{self.title} control")
        self.ctrl_in = FrameReader(self.fds["ctrl_in"], f"{self.title} control", max_frame=1 << 16)
        code = 0
        profile_dir = os.environ.get("SHMIG_PROFILE")
        try:
            if self.arena is not None:
                self.tr = Recorder(self.title, self.arena, self.proc_index)
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
            self.ctrl_out.ctrl("error", msg)
        except (OSError, ChannelClosed):  # the controller has gone (Ctrl-C): nobody to tell
            pass

    def status(self, text: str) -> None:
        self.mem.set_status(self.proc_index, text)

    def setup(self) -> None:
        pass

    def run(self) -> None:
        raise NotImplementedError

    # -- control helpers ----------------------------------------------------
    def recv_ctrl(self) -> tuple[str, Any]:
        """The next message from the controller (blocking)."""
        return ctrl_fields(self.ctrl_in.next_frame(), f"{self.title} control")

    def take_channels(self, names: Any) -> dict[str, int]:
        """The new pipe ends of a recovery, which the controller passed (SCM_RIGHTS) on this child's
        fd socket just before the command naming them: pipes cannot be inherited after fork."""
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ProtocolError(f"{self.title} control channel: bad channel list {names!r}")
        sock = socket.socket(fileno=os.dup(self.fds["fdsock"]))
        try:
            _, fds, flags, _ = socket.recv_fds(sock, 16, len(names) + 1)
        finally:
            sock.close()
        if len(fds) != len(names) or flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            raise ProtocolError(f"{self.title} fd socket: got {len(fds)} descriptors for {names}")
        return dict(zip(names, fds))

    def event(self, name: str, *info: Any) -> int:
        """Tell the controller something happened now (its timeline, the report)."""
        t = time.monotonic_ns()
        self.ctrl_out.ctrl("event", [name, t, *info])
        if self.tr:
            self.tr.put(K.MILESTONE, t, t, self.tr.intern(name), self.tr.intern(str(info[0])) if info else -1)
        return t
