"""The in-process child rig: one of shmig's child objects (a receiver, the source) run in the test's
own process over real pipes, real shared memory, a real ledger and a real link, so a test can feed
it frames and look at what it did. Everything it makes is closed by ``close()``."""

from __future__ import annotations

import fcntl
import os
import sys
import threading
import zlib

import numpy as np

from shmig.config import Config
from shmig.destination import channel_room
from shmig.fds import new_eventfd
from shmig.ledger import Ledger
from shmig.link import Link
from shmig.memory import GuestMemory
from shmig.plan import Channel, Kind, Plan
from shmig.process import Ends, Shared
from shmig.reader import FrameReader
from shmig.wire import FrameWriter

KIND_OF = {"Source": Kind.SOURCE, "Listen": Kind.LISTEN, "PreemptReceiver": Kind.PREEMPT, "Vcpu": Kind.VCPU}


def pipe(size: int = 1 << 20) -> tuple[int, int]:
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, size)
    return r, w


class Rig:
    """Guest memory, a ledger and pipes for child objects run in this process; closes everything."""

    def __init__(self, cfg: Config):
        self.cfg = cfg.validate()
        self.plan = Plan.for_config(cfg, channel_room(cfg.socket_queue.capacity))
        self.mem = GuestMemory(cfg, self.plan.slots)
        self.mem.unlink()
        self.mem.src[:] = np.frombuffer(np.random.default_rng(1).bytes(cfg.ram), np.uint8)
        self.ledger = Ledger(self.plan, cfg.nhost, cfg.deadline)
        self.fds: list[int] = []
        self.links: list[Link] = []
        self.efd = new_eventfd()
        self.switch = sys.getswitchinterval()  # the receivers shorten it for their own process

    def pipe(self) -> tuple[int, int]:
        r, w = pipe()
        self.fds += [r, w]
        return r, w

    def child(self, cls: type, fds: dict[str, int], ctrl: bytes = b""):
        """A child object wired to fresh pipes (``ctrl`` already waiting on its control input);
        ``fds`` maps channel names (``"precopy"``, ``"return"``, ...) to its ends."""
        ctrl_r, ctrl_w = self.pipe()
        up_r, up_w = self.pipe()
        os.write(ctrl_w, ctrl)
        link = Link(self.mem.link, self.cfg.bandwidth, self.cfg.latency, self.cfg.socket_queue.capacity, threading.Lock())
        self.links.append(link)
        cfg = self.cfg
        plan = Plan.for_config(cfg, channel_room(cfg.socket_queue.capacity))
        role = plan.role(KIND_OF[cls.__name__])
        assert role is not None, f"{cls.__name__} has no role in mode {cfg.mode}"
        rec = self.ledger.stats(role)
        for f in rec.FIELDS:  # each child object starts with its counters at zero, as a process does
            setattr(rec, f.name, 0)
        shared = Shared(cfg=cfg, plan=plan, mem=self.mem, link=link, ledger=self.ledger, efds=[self.efd])
        c = cls(shared, role, Ends(ctrl_r, up_w, {Channel(k): v for k, v in fds.items()}))
        c.ctrl_out = FrameWriter(up_w, f"{c.title} control")
        c.ctrl_in = FrameReader(ctrl_r, f"{c.title} control")
        c.setup()
        return c

    def fingerprint(self) -> tuple[int, ...]:
        """Everything a receiver must never write: the source's RAM and the guest's own maps."""
        m = self.mem
        return tuple(zlib.crc32(a) for a in (m.src, m.dirty, m.stamps, m.wait))

    def release(self) -> None:
        """Close the pipes and links of one example (select() cannot wait on descriptors past 1023)."""
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()
        for link in self.links:
            link.close()
        self.links.clear()

    def close(self) -> None:
        self.release()
        os.close(self.efd)
        self.ledger.close()
        self.mem.close()
        sys.setswitchinterval(self.switch)
