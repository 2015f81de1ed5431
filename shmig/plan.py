"""The plan of a run: which processes it has and which channels join them, as data.

QEMU's migration is a handful of threads on two hosts joined by sockets; shmig's is a handful of
processes on one host joined by pipes. The plan names each process by its role (a ``Role``: what
it is, which one, its index in the run's shared tables) and each channel by what it carries, who
writes it and who reads it. The controller builds every pipe of the run from it, and a postcopy
recovery rebuilds exactly the channels the plan marks as recoverable, from the same data: nothing
about the run's shape is written twice.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .multifd import FIRST_LINK_INDEX

if TYPE_CHECKING:
    from .config import Config


class Kind(enum.Enum):
    """What a process is: QEMU's thread names, one process each (see process.py)."""

    SOURCE = "mig/src"  # migration thread + return thread
    LISTEN = "mig/dst/listen"  # destination main: listen thread + fault thread
    PREEMPT = "mig/dst/preempt"  # destination preempt receiver (postcopy channel)
    MULTIFD = "mig/dst/recv_"  # destination multifd receive thread N (QEMU's mig/dst/recv_%d)
    VCPU = "guest/vcpu"  # one per vCPU


@dataclass(frozen=True)
class Role:
    """One process of a run: its kind, which one of that kind (the vCPU number), and its index in
    the run's tables (status slots, ledger records, trace slots)."""

    kind: Kind
    n: int
    index: int

    @property
    def title(self) -> str:
        """Its name in ``ps`` and in every message: QEMU's thread name (``guest/vcpuN`` for vCPUs)."""
        return f"{self.kind.value}{self.n}" if self.kind in (Kind.VCPU, Kind.MULTIFD) else self.kind.value

    @property
    def receiver(self) -> bool:
        """A destination process that loads a data channel (the main and the preempt one also
        pause on a broken one in postcopy; a multifd channel carries nothing then)."""
        return self.kind in (Kind.LISTEN, Kind.PREEMPT, Kind.MULTIFD)

    def __str__(self) -> str:
        return self.title


class Channel(enum.Enum):
    """What a pipe carries. The two data channels are numbered as the link numbers them."""

    PRECOPY = "precopy"  # the main channel: src -> dst/listen
    POSTCOPY = "postcopy"  # the preempt channel: src -> dst/preempt
    RETURN = "return"  # the return path: dst/listen -> src
    FAULT = "fault"  # vCPUs -> the fault thread (userfaultfd's stand-in)
    MULTIFD = "multifd"  # one of the multifd channels: src -> dst/recv_N (Pipe.index says which)

    def link_index(self, index: int = 0) -> int:
        """The channel's number on the emulated link (data channels only): main 0, preempt 1,
        multifd channel ``index`` after them (shmig.multifd.FIRST_LINK_INDEX)."""
        if self is Channel.MULTIFD:
            return FIRST_LINK_INDEX + index
        return 0 if self is Channel.PRECOPY else 1


@dataclass(frozen=True)
class Pipe:
    """One channel of the plan: who writes it, who reads it, how much the pipe should hold, and
    whether a postcopy recovery replaces it (a broken connection is made anew)."""

    channel: Channel
    writers: tuple[Role, ...]
    reader: Role
    size: int | None
    recoverable: bool
    index: int = 0  # which multifd channel (Channel.MULTIFD only)


@dataclass(frozen=True)
class Plan:
    roles: tuple[Role, ...]
    pipes: tuple[Pipe, ...]

    @classmethod
    def of(cls, vcpus: int, preempt_channel: bool, data_channel_bytes: int, small: int = 1 << 16,
           multifd_channels: int = 0) -> "Plan":
        """The processes and channels of a run with ``vcpus`` vCPUs, with or without the postcopy
        (preempt) channel, and ``multifd_channels`` multifd channels each read by a receiver of its
        own; ``data_channel_bytes`` is what a data channel's pipe should hold (the emulated socket
        queue and a frame more). A multifd channel is not recoverable: it carries nothing in
        postcopy, so a postcopy pause leaves it alone (QEMU's recovery reconnects only the main and
        the preempt channel, postcopy_do_resume)."""
        src = Role(Kind.SOURCE, 0, 0)
        listen = Role(Kind.LISTEN, 0, 1)
        preempt = Role(Kind.PREEMPT, 0, 2) if preempt_channel else None
        first_vcpu = 3  # a vCPU's index does not depend on whether the preempt receiver exists
        cpus = tuple(Role(Kind.VCPU, v, first_vcpu + v) for v in range(vcpus))
        pipes = [Pipe(Channel.PRECOPY, (src,), listen, data_channel_bytes, True),
                 Pipe(Channel.RETURN, (listen,), src, small, True),
                 Pipe(Channel.FAULT, cpus, listen, small, False)]
        if preempt is not None:
            pipes.append(Pipe(Channel.POSTCOPY, (src,), preempt, data_channel_bytes, True))
        recv = tuple(Role(Kind.MULTIFD, i, first_vcpu + vcpus + i) for i in range(multifd_channels))
        pipes += [Pipe(Channel.MULTIFD, (src,), r, data_channel_bytes, False, r.n) for r in recv]
        roles = (src, listen, *((preempt,) if preempt else ()), *cpus, *recv)
        return cls(roles, tuple(pipes))

    @classmethod
    def for_config(cls, cfg: "Config", data_channel_bytes: int) -> "Plan":
        """The plan of the run ``cfg`` describes."""
        return cls.of(cfg.vcpus, cfg.uses_preempt_channel, data_channel_bytes, multifd_channels=cfg.multifd_channels)

    @property
    def slots(self) -> int:
        """Rows of the run's per-process tables (index of the last vCPU + 1)."""
        return max(r.index for r in self.roles) + 1

    def role(self, kind: Kind, n: int = 0) -> Role | None:
        for r in self.roles:
            if r.kind is kind and r.n == n:
                return r
        return None

    @property
    def source(self) -> Role:
        return self.roles[0]

    @property
    def listen(self) -> Role:
        return self.roles[1]

    @property
    def receivers(self) -> tuple[Role, ...]:
        return tuple(r for r in self.roles if r.receiver)

    @property
    def multifd(self) -> tuple[Role, ...]:
        """The multifd receivers, by channel number."""
        return tuple(r for r in self.roles if r.kind is Kind.MULTIFD)

    @property
    def vcpus(self) -> tuple[Role, ...]:
        return tuple(r for r in self.roles if r.kind is Kind.VCPU)

    @property
    def pausable(self) -> tuple[Role, ...]:
        """The processes a broken channel pauses and a recovery resumes: every end of a
        recoverable channel, in the order a recovery hands them their new ends (the destination
        listens before the source connects, as migrate-recover comes before migrate resume=true)."""
        ends = {r for p in self.pipes if p.recoverable for r in (*p.writers, p.reader)}
        return tuple(sorted(ends, key=lambda r: (r.kind is Kind.SOURCE, r.index)))

    def ends(self, role: Role, recoverable_only: bool = False) -> dict[Channel, str]:
        """The channels ``role`` holds an end of: 'r' or 'w'."""
        out = {}
        for p in self.pipes:
            if (recoverable_only and not p.recoverable) or p.channel is Channel.MULTIFD:
                continue  # multifd ends are by number: Ends.multifd
            if role in p.writers:
                out[p.channel] = "w"
            elif role == p.reader:
                out[p.channel] = "r"
        return out
