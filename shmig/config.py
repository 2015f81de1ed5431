"""The run's configuration: every knob of one migration, validated before anything is allocated."""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from . import policies
from .clock import Clock
from .errors import ConfigError
from .faults import MAX_FAULTS, Fault, FaultSpecError
from .multifd import MAX_EMULATED_CHANNELS, PACKET_PAGES, Multifd
from .status import QemuVersion, VersionError, check_version, default_version
from .tcp import LINUX_DEFAULTS, LOOPBACK_RTT_NS, SocketQueue, SysctlError, TcpSysctls, steady_state
from .units import UnitError, fmt_rate, fmt_size, fmt_time, parse_rate, parse_size, parse_time

TARGET_PAGE = 4096
HOST_PAGES = (4096, 2 * 1024**2, 1024**3)
MODES = ("precopy", "vanilla", "preempt", "preempt-full")
WORKLOADS = ("idle", "sequential", "random", "hotset", "ab")
FAULT_BACKENDS = ("bitmap", "uffd")  # how a destination vCPU meets a missing page (issue 20)
MAX_VCPUS = 64  # each vCPU stamps its own 8-byte word of a page (words 0..63; bytes 0..63 for ab)
MAX_DILATION = 64.0
SHM_HEADROOM = 0.95  # leave 5% of /dev/shm free for everyone else
MAX_LATENCY = 1.0  # seconds: no link has more; a larger value is a unit mistake
MAX_SOCKET_BUFFER = 1024**3  # each receiver allocates its read-ahead: keep it allocatable
MAX_SEED = 2**64 - 1  # the page-content hash and the access streams take 64-bit seeds
RECEIVER_FRAME = (1 << 20) + 65536  # destination.MAX_FRAME (a test keeps them equal): config cannot import it
MAX_DEADLINE = 86400.0  # seconds: the deadline is the only hang watchdog, so it may not be switched off
MAX_RATE = 1024.0**4  # bytes/s (1TiB/s): above any link or memory bus; a larger value is a unit mistake

# what each field of Config takes from the Python API (checked before anything else, so that
# Config(ram="64MiB") is one clear line, not a TypeError deep inside validate())
_INT, _REAL, _BOOL, _STR = "a whole number", "a number", "True or False", "a string"
FIELD_KINDS: dict[str, tuple[str, bool]] = {  # field -> (kind, None allowed)
    "mode": (_STR, False), "workload": (_STR, False), "fault_backend": (_STR, False), "zero_page_detection": (_STR, False),
    "ram": (_INT, False), "host_page": (_INT, False), "seed": (_INT, False), "vcpus": (_INT, False),
    "socket_buffer": (_INT, True), "send_buffer": (_INT, True), "max_rounds": (_INT, False), "wss": (_INT, True),
    "precopy_rounds": (_INT, True),
    "zero_fraction": (_REAL, False), "latency": (_REAL, False), "downtime_limit": (_REAL, False),
    "deadline": (_REAL, False),
    "dirty_rate": (_REAL, True), "bandwidth": (_REAL, True), "max_bandwidth": (_REAL, True),
    "max_postcopy_bandwidth": (_REAL, True),
    "break_huge": (_BOOL, False), "page_hint": (_BOOL, False), "prefault": (_BOOL, False), "hugetlb": (_BOOL, False),
    "recover_after": (_REAL, True), "tcp_notsent_lowat": (_INT, False), "multifd_channels": (_INT, False),
    "qemu_version": (_STR, True),
}


def _is(kind: str, v: Any) -> bool:
    if kind == _STR:
        return isinstance(v, str)
    if kind == _BOOL:
        return isinstance(v, (bool, np.bool_))
    if isinstance(v, (bool, np.bool_)):
        return False  # True is an int to Python, never a size or a rate
    return isinstance(v, numbers.Integral if kind == _INT else numbers.Real)


def mem_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none): the kernel's estimate of
    what can be allocated without swapping (mm/show_mem.c si_mem_available)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _parse_bool(v: Any) -> bool:
    low = str(v).strip().lower()
    if low not in ("on", "true", "yes", "1", "off", "false", "no", "0"):
        raise UnitError(f"cannot read {v!r} (use on or off)")
    return low in ("on", "true", "yes", "1")


def _parse_int(v: Any) -> int:
    try:
        return int(v)
    except ValueError:
        raise UnitError(f"cannot read {v!r} (use a whole number)") from None


def parse_dilation(value: str | float) -> float | str:
    """``--time-dilation``: a factor (``4``, ``2.5``) or ``auto``."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return float(value)
    except ValueError:
        raise UnitError(f"cannot read {value!r} as a dilation factor (e.g. 4, or auto)") from None


# CLI-style strings -> the API's values; times suggest the unit a bare number probably meant
FROM_STRING: dict[str, Callable[[Any], Any]] = {
    "ram": parse_size, "host_page": parse_size, "wss": parse_size, "socket_buffer": parse_size,
    "send_buffer": parse_size,
    "dirty_rate": functools.partial(parse_rate, zero_is_unlimited=False),
    "bandwidth": functools.partial(parse_rate, zero_is_unlimited=False),
    "max_bandwidth": parse_rate, "max_postcopy_bandwidth": parse_rate,  # QEMU: 0 = no limit
    "latency": functools.partial(parse_time, hint="us"),
    "downtime_limit": functools.partial(parse_time, hint="ms"),
    "deadline": functools.partial(parse_time, hint="s"),
    "recover_after": functools.partial(parse_time, hint="ms"),
    **{k: _parse_int for k, (kind, _) in FIELD_KINDS.items() if kind == _INT and k not in
       ("ram", "host_page", "wss", "socket_buffer", "send_buffer", "tcp_notsent_lowat")},
    **{k: _parse_bool for k, (kind, _) in FIELD_KINDS.items() if kind == _BOOL},
    "zero_fraction": float, "time_dilation": parse_dilation,
    "tcp_wmem": lambda v: TcpSysctls.from_strings(wmem=v).wmem,
    "tcp_rmem": lambda v: TcpSysctls.from_strings(rmem=v).rmem,
    "tcp_notsent_lowat": lambda v: TcpSysctls.from_strings(notsent_lowat=v).notsent_lowat,
}
RATE_FIELDS = ("dirty_rate", "bandwidth", "max_bandwidth", "max_postcopy_bandwidth")


@dataclass
class Config:
    """One migration. Sizes in bytes, rates in bytes/s (None = unlimited), times in seconds."""

    mode: str = "preempt"  # a mode name, or a policy class (registered under its ``name``)
    ram: int = 128 * 1024**2
    host_page: int = TARGET_PAGE
    seed: int = 1
    zero_fraction: float = 0.1
    zero_page_detection: str = "multifd"  # QEMU 9.0+ zero-page-detection: multifd, legacy or none
    multifd_channels: int = 0  # QEMU multifd-channels with the multifd capability on; 0 = off
    workload: str = "random"
    wss: int | None = None  # working-set size; None = all RAM
    dirty_rate: float | None = None  # bytes/s written by the whole guest; None = as fast as it can
    vcpus: int = 1
    bandwidth: float | None = None  # emulated link, shared by both data channels
    latency: float = 0.0  # one-way, on every channel
    # per channel: what may be queued before the sender blocks, fixed (send plus receive buffer, as
    # setsockopt(SO_SNDBUF/SO_RCVBUF) locks them); None = as Linux autotunes it on this link from
    # the tcp_* sysctls below (shmig.tcp; ``socket_queue``)
    socket_buffer: int | None = None
    # ... of which the sender's own buffer (sk_sndbuf; None = tcp_wmem max): a blocked sender resumes
    # once a third of it has drained (Linux's write-space rule is on the send buffer alone)
    send_buffer: int | None = None
    # net.ipv4 sysctls that size an autotuned queue; Linux's defaults (6.18)
    tcp_wmem: tuple[int, int, int] = LINUX_DEFAULTS.wmem
    tcp_rmem: tuple[int, int, int] = LINUX_DEFAULTS.rmem
    tcp_notsent_lowat: int = LINUX_DEFAULTS.notsent_lowat
    max_bandwidth: float | None = None  # QEMU max-bandwidth (precopy)
    max_postcopy_bandwidth: float | None = None  # QEMU max-postcopy-bandwidth
    downtime_limit: float = 0.3  # QEMU downtime-limit
    max_rounds: int = 30  # precopy gives up converging after this many rounds
    precopy_rounds: int | None = 1  # postcopy modes: full rounds before switching; None = wait for start_postcopy()
    break_huge: bool = True  # x-postcopy-preempt-break-huge
    page_hint: bool = False  # QEMU 10.1 spatial locality hint (preempt-full)
    deadline: float = 300.0  # the whole run (emulated time); a hang fails with who waited for what
    time_dilation: float | str = 1.0  # N: the emulated world runs N times slower; "auto" calibrates
    prefault: bool = True  # populate shared memory up front (MADV_POPULATE_WRITE)
    inject_faults: list[str] = field(default_factory=list)  # "WHAT@WHEN" channel breaks in postcopy (faults.py)
    recover_after: float | None = 0.1  # how long a postcopy-paused migration waits; None = for recover()
    qemu_version: str | None = None  # the QEMU release the run stands for ("10.0"); None = the mode's newest
    fault_backend: str = "bitmap"  # "bitmap": receivedmap + eventfd; "uffd": userfaultfd on memfd RAM (userfault.py)
    hugetlb: bool = False  # real hugetlb host pages (uffd only)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form labels carried into the report

    def __post_init__(self) -> None:
        if isinstance(self.mode, type):  # Config(mode=MyPolicy), as mininet takes link=TCLink
            self.mode = policies.register_class(str(getattr(self.mode, "name", "")), self.mode,
                                                f"Config(mode={self.mode.__name__})")
        self.check_types()

    @classmethod
    def from_strings(cls, **kw: Any) -> "Config":
        """Build from CLI-style values (``ram="64MiB"``, ``bandwidth="10Gbit/s"``, ``vcpus="2"``);
        None values are left default. Units follow QEMU (see ``shmig.units``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        args = {}
        for k, v in kw.items():
            if k not in names:
                raise ConfigError(f"unknown option {k!r}: use one of {', '.join(sorted(names))}")
            if v is None:
                continue
            conv = FROM_STRING.get(k)
            try:  # strings are parsed; numbers pass as they are, except that 0 means the same for rates
                args[k] = conv(v) if conv and (isinstance(v, str) or k in RATE_FIELDS) else v
            except SysctlError as e:
                raise ConfigError(str(e)) from None
            except (UnitError, ValueError) as e:
                raise ConfigError(f"--{k.replace('_', '-')}: {e}") from None
        return cls(**args)

    def check_types(self) -> None:
        """Each field holds what it should: numbers in bytes, bytes/s and seconds, not strings."""
        for name, (kind, optional) in FIELD_KINDS.items():
            v = getattr(self, name, None)
            if (v is None and optional) or _is(kind, v):
                continue
            hint = (f": for values with units use Config.from_strings({name}={v!r})"
                    if isinstance(v, str) and kind != _STR else "")
            raise ConfigError(f"Config({name}={v!r}): {name} must be {kind}"
                              + (" or None" if optional else "") + hint)
        if not (self.time_dilation == "auto" or _is(_REAL, self.time_dilation)):
            raise ConfigError(f"Config(time_dilation={self.time_dilation!r}): time_dilation must be a number"
                              f" of at least 1, or 'auto'")
        if not isinstance(self.inject_faults, (list, tuple)) or not all(isinstance(f, str) for f in self.inject_faults):
            raise ConfigError(f"Config(inject_faults={self.inject_faults!r}): inject_faults must be a list of"
                              f" specs, e.g. ['postcopy-channel@50%'] (or [] for none)")

    # -- derived ---------------------------------------------------------
    @property
    def npages(self) -> int:
        return self.ram // TARGET_PAGE

    @property
    def nhost(self) -> int:
        return self.ram // self.host_page

    @property
    def tp_per_hp(self) -> int:
        return self.host_page // TARGET_PAGE

    @property
    def wss_bytes(self) -> int:
        return self.ram if self.wss is None else self.wss

    @property
    def postcopy(self) -> bool:
        return self.mode != "precopy"

    @property
    def multifd(self) -> Multifd:
        """The multifd settings (``multifd_channels`` 0: the capability is off)."""
        return Multifd.of(self.multifd_channels, self.zero_page_detection)

    @property
    def qemu(self) -> QemuVersion:
        """The QEMU release this run stands for (``qemu_version``, else the mode's newest: status.default_version).
        It changes only what that release does differently: the statuses, postcopy's completion (10.1)."""
        try:
            return default_version(self.mode) if self.qemu_version is None else QemuVersion.parse(self.qemu_version)
        except VersionError as e:
            raise ConfigError(f"--qemu-version: {e}") from None

    @property
    def uses_preempt_channel(self) -> bool:
        cls = policies.POLICIES.get(self.mode)
        return cls is not None and bool(cls.preempt_channel)

    @property
    def clock(self) -> Clock:
        """The run's one clock; "auto" must have been resolved (``calibrate``) before it is used."""
        if isinstance(self.time_dilation, str):
            raise ConfigError("time_dilation 'auto' is resolved when the migration starts")
        return Clock(float(self.time_dilation))

    @property
    def tcp_sysctls(self) -> TcpSysctls:
        try:
            return TcpSysctls(wmem=tuple(self.tcp_wmem), rmem=tuple(self.tcp_rmem),  # type: ignore[arg-type]
                              notsent_lowat=self.tcp_notsent_lowat)
        except SysctlError as e:
            raise ConfigError(str(e)) from None

    @property
    def socket_queue(self) -> SocketQueue:
        """What one data channel's connection holds in front of a byte written now.

        ``--socket-buffer`` fixes it (the buffers locked against autotuning). Otherwise it is what
        Linux's autotuning settles at for a bulk sender on this link (``tcp.steady_state``: the
        send buffer from the congestion window, ``tcp_sndbuf_expand()``; the receive window from the
        bytes read per round trip, ``tcp_rcv_space_adjust()``), the round trip being twice
        ``--latency`` (at least loopback's). An unlimited link has no rate for the kernel to
        measure: the queue is what the sysctls let it grow to (the destination, not the link,
        drains it, and the sender keeps it full)."""
        if self.socket_buffer is not None:
            send = min(self.tcp_wmem[2] if self.send_buffer is None else self.send_buffer, self.socket_buffer)
            return SocketQueue(send=send, send_wake=(2 * send) // 3, window=self.socket_buffer - send)
        if self.bandwidth is None:
            return SocketQueue.most(self.tcp_sysctls)
        return _autotuned(self, self.bandwidth)

    @property
    def multifd_socket_queue(self) -> SocketQueue:
        """One multifd connection's queue: the N of them carry precopy together, so Linux autotunes
        each at its share of the link (N flows, one bottleneck); ``--socket-buffer`` fixes all."""
        n = self.multifd_channels
        if self.socket_buffer is not None or self.bandwidth is None or n == 0:
            return self.socket_queue
        return _autotuned(self, self.bandwidth / n)

    def shm_bytes(self) -> int:
        """Everything this run puts in /dev/shm: two RAM copies plus the per-page maps (with the uffd
        backend the destination's copy is a memfd instead, outside /dev/shm)."""
        copies = 1 if self.fault_backend == "uffd" else 2
        return copies * self.ram + self.npages * (1 + 12 * self.vcpus) + 65536  # receivedmap; dirty log + stamps per vCPU

    def heap_bytes(self) -> int:
        """Memory the run takes outside /dev/shm, at most: each receiver's read-ahead buffer
        (reader.FrameReader allocates twice the read-ahead plus a frame, and the read-ahead is
        up to the socket buffer plus a frame: destination.channel_room), and in postcopy with huge
        pages each receiver's temporary host page (destination.Receiver.setup). A multifd receiver
        reads ahead too but never places a huge page whole (it loads precopy only); each multifd
        send thread gathers a packet in a buffer of its own (multifdsend.SendChannel)."""
        receivers = 1 + (self.postcopy and self.uses_preempt_channel)
        readahead = _readahead(self.socket_queue)
        tmp_page = self.host_page if self.postcopy and self.host_page > TARGET_PAGE else 0
        return receivers * (readahead + tmp_page) + self.multifd_channels * (
            _readahead(self.multifd_socket_queue) + PACKET_PAGES * TARGET_PAGE)

    def validate(self) -> "Config":
        def bad(msg: str) -> None:
            raise ConfigError(msg)

        self.check_types()
        modes = ("precopy", *policies.POLICIES)  # the built-in ones plus any registered policy
        if self.mode not in modes:
            bad(f"unknown mode {self.mode!r}: use one of {', '.join(modes)}")
        if self.workload not in WORKLOADS:
            bad(f"unknown workload {self.workload!r}: use one of {', '.join(WORKLOADS)}")
        if self.host_page not in HOST_PAGES:
            bad(f"host page {self.host_page} is not supported: use 4KiB, 2MiB or 1GiB")
        if self.ram <= 0:
            bad("--ram must be positive (e.g. --ram 64MiB)")
        if self.ram % self.host_page:
            bad(f"--ram {fmt_size(self.ram)} is not a multiple of the host page {fmt_size(self.host_page)}:"
                f" use a multiple such as {fmt_size(max(1, self.ram // self.host_page + 1) * self.host_page)}")
        if self.npages >= 2**32:
            bad("--ram must be below 16TiB")
        if self.wss is not None and not 0 < self.wss <= self.ram:
            bad(f"--wss {fmt_size(self.wss)} must be positive and at most --ram {fmt_size(self.ram)}")
        if not 1 <= self.vcpus <= MAX_VCPUS:
            bad(f"--vcpus must be between 1 and {MAX_VCPUS}")
        if self.wss_bytes < TARGET_PAGE * self.vcpus:
            bad(f"--vcpus {self.vcpus}: the working set holds only {self.wss_bytes // TARGET_PAGE} 4KiB"
                f" page(s), and it must hold at least one 4KiB page per vCPU: use fewer --vcpus or a"
                f" larger {'--wss' if self.wss is not None else '--ram'}")
        if not 0 <= self.seed <= MAX_SEED:
            bad(f"--seed must be between 0 and 2^64-1, got {self.seed}")
        if not 0.0 <= self.zero_fraction <= 1.0:  # also catches NaN
            bad("--zero-fraction must be between 0 and 1")
        self.multifd  # an unknown --zero-page-detection or a channel count out of range is one line
        if self.multifd_channels > MAX_EMULATED_CHANNELS:
            bad(f"--multifd-channels {self.multifd_channels}: QEMU takes up to 255, but shmig runs each channel's"
                f" receiver as a process of its own: use at most {MAX_EMULATED_CHANNELS}")
        if self.multifd_channels and self.mode == "preempt":
            bad("--multifd-channels with --mode preempt: multifd and postcopy run together only from QEMU"
                " 10.1, and 7.1's preempt mode (break-huge) was gone by then: use --mode preempt-full")
        if not 0 < self.deadline <= MAX_DEADLINE:  # also catches NaN and inf
            bad(f"--deadline must be positive and at most {fmt_time(MAX_DEADLINE)} (it is the only hang"
                f" watchdog), got {self.deadline:g} seconds")
        for name in ("bandwidth", "max_bandwidth", "max_postcopy_bandwidth", "dirty_rate"):
            v = getattr(self, name)
            if v is not None and not 0 < v <= MAX_RATE:  # also catches NaN and inf
                bad(f"--{name.replace('_', '-')} must be positive and at most {fmt_rate(MAX_RATE)}"
                    f" (or 'unlimited': None in the API), got {v:g}B/s")
        # a vCPU sleeps TARGET_PAGE * vcpus / dirty_rate between writes (guest.py): a rate that
        # leaves no write inside the deadline makes no run, and overflows the vCPU's clock
        least_rate = math.ceil(TARGET_PAGE * self.vcpus / self.deadline)
        if self.dirty_rate is not None and self.dirty_rate < least_rate:
            bad(f"--dirty-rate must be at least {least_rate}B/s (one 4KiB page per vCPU within"
                f" --deadline {fmt_time(self.deadline)}), got {self.dirty_rate:g}B/s")
        if not self.latency >= 0:
            bad("--latency must not be negative")
        if self.latency > MAX_LATENCY:
            bad(f"--latency {fmt_time(self.latency)} is more than {fmt_time(MAX_LATENCY)}, which no link has:"
                f" did you mean {self.latency:g}ms or {self.latency:g}us?")
        if self.socket_buffer is not None and self.socket_buffer < 64 * 1024:
            bad("--socket-buffer must be at least 64KiB")
        if self.socket_buffer is not None and self.socket_buffer > MAX_SOCKET_BUFFER:
            bad(f"--socket-buffer must be at most {fmt_size(MAX_SOCKET_BUFFER)} (real TCP queues are a few MiB)")
        if self.send_buffer is not None and self.socket_buffer is None:
            bad("--send-buffer is the send part of a fixed --socket-buffer: give both, or size the autotuned"
                " send buffer with --tcp-wmem")
        if self.send_buffer is not None and self.send_buffer < 64 * 1024:
            bad("--send-buffer must be at least 64KiB")
        if self.socket_queue.capacity > MAX_SOCKET_BUFFER:
            bad(f"--tcp-wmem and --tcp-rmem maxima let a queue grow past {fmt_size(MAX_SOCKET_BUFFER)}:"
                f" lower them")
        if (self.send_buffer is not None and self.socket_buffer is not None
                and self.send_buffer > self.socket_buffer):  # the send buffer is a part of the channel's queue
            bad(f"--send-buffer {fmt_size(self.send_buffer)} must be at most --socket-buffer"
                f" {fmt_size(self.socket_buffer)} (it is the sender's part of it)")
        if not 0 < self.downtime_limit <= self.deadline:
            bad(f"--downtime-limit must be positive and at most the deadline ({fmt_time(self.deadline)})")
        if self.max_rounds < 1:
            bad("--max-rounds must be at least 1")
        if self.precopy_rounds is not None and self.precopy_rounds < 0:
            bad("--precopy-rounds must be 0 or more")
        if isinstance(self.time_dilation, str):
            if self.time_dilation != "auto":
                bad(f"--time-dilation {self.time_dilation!r}: use a number of at least 1, or auto")
        elif not 1 <= self.time_dilation <= MAX_DILATION:  # also catches NaN
            bad(f"--time-dilation must be between 1 and {MAX_DILATION:g} (or auto), got {self.time_dilation}")
        if self.page_hint and self.mode != "preempt-full":
            bad("--page-hint is QEMU 10.1's hint for preempt-full: use it with --mode preempt-full")
        if not self.break_huge and self.mode != "preempt":
            bad("--no-break-huge only applies to --mode preempt")
        try:  # after the mode and the page hint: the version refuses what it did not have
            check_version(self.mode, self.qemu, page_hint=self.page_hint, multifd=self.multifd.enabled)
        except VersionError as e:
            bad(str(e))
        self._validate_faults()
        _validate_backend(self)
        _validate_memory(self)
        return self

    def _validate_faults(self) -> None:
        """--inject-fault and --recover-after: every spec parses and can happen in this mode."""
        if self.recover_after is not None and not 0 <= self.recover_after <= self.deadline:
            raise ConfigError(f"--recover-after must be between 0 and the deadline ({self.deadline:g}s),"
                              f" e.g. 100ms")
        if isinstance(self.inject_faults, str):
            raise ConfigError("inject_faults is a list of specs: use inject_faults=['postcopy-channel@50%']")
        if len(self.inject_faults) > MAX_FAULTS:
            raise ConfigError(f"--inject-fault: at most {MAX_FAULTS} faults per run")
        for spec in self.inject_faults:
            try:
                f = Fault.parse(spec)
            except FaultSpecError as e:
                raise ConfigError(f"--inject-fault: {e}") from None
            if not self.postcopy:
                raise ConfigError(f"--inject-fault {spec}: faults break a channel during postcopy, and mode"
                                  f" precopy has none: use --mode vanilla, preempt or preempt-full")
            if f.what == "postcopy-channel" and not self.uses_preempt_channel:
                raise ConfigError(f"--inject-fault {spec}: mode {self.mode} has no postcopy (preempt) channel:"
                                  f" use --mode preempt or preempt-full, or break precopy-channel or return-path")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _autotuned(cfg: "Config", rate: float) -> SocketQueue:
    """What Linux's autotuning settles at for one bulk flow of ``rate`` bytes/s (tcp.steady_state),
    the round trip being twice ``--latency``, at least loopback's."""
    return steady_state(rate, max(2 * cfg.latency, LOOPBACK_RTT_NS / 1e9), cfg.tcp_sysctls)


def _readahead(queue: SocketQueue) -> int:
    """A receiver's read-ahead buffer at most, for a channel of this queue (reader.FrameReader
    allocates twice the read-ahead plus a frame; destination.channel_room)."""
    return 2 * (queue.capacity + 2 * RECEIVER_FRAME + 65536)


def _validate_memory(cfg: "Config") -> None:
    """The run fits this machine: its shared segments in /dev/shm, and all of its memory (tmpfs
    pages are memory too; the uffd backend's destination RAM is a memfd, outside /dev/shm, and on
    hugetlb from the pool uffd.check_backend looked at)."""
    try:
        st = os.statvfs("/dev/shm")
        free = st.f_bavail * st.f_frsize
    except OSError:
        free = None
    if free is not None and cfg.shm_bytes() > free * SHM_HEADROOM:
        copies = "the source's copy" if cfg.fault_backend == "uffd" else "source and destination copies"
        raise ConfigError(f"--ram {fmt_size(cfg.ram)} needs {fmt_size(cfg.shm_bytes())} of /dev/shm ({copies})"
                          f" but only {fmt_size(free)} is free: use a smaller --ram")
    avail = mem_available()
    ram_copies = cfg.shm_bytes() + (cfg.ram if cfg.fault_backend == "uffd" and not cfg.hugetlb else 0)
    need = ram_copies + cfg.heap_bytes()
    if avail is not None and need > avail * SHM_HEADROOM:
        raise ConfigError(f"this run needs {fmt_size(need)} of memory ({fmt_size(ram_copies)} of guest RAM copies,"
                          f" {fmt_size(cfg.heap_bytes())} of receive buffers and temporary host pages) but only"
                          f" {fmt_size(avail)} is available: use a smaller --ram, --socket-buffer or --host-page")


def _validate_backend(cfg: "Config") -> None:
    """--fault-backend and --hugetlb: known, consistent, and permitted on this machine (the
    userfaultfd probe opens and closes one uffd; nothing of the run is allocated yet)."""
    if cfg.fault_backend not in FAULT_BACKENDS:
        raise ConfigError(f"unknown fault backend {cfg.fault_backend!r}: use one of {', '.join(FAULT_BACKENDS)}")
    if cfg.hugetlb and cfg.fault_backend != "uffd":
        raise ConfigError("--hugetlb backs the destination's RAM for the userfaultfd backend: add --fault-backend uffd")
    if cfg.hugetlb and cfg.host_page == TARGET_PAGE:
        raise ConfigError("--hugetlb needs huge host pages: add --host-page 2MiB or 1GiB")
    if cfg.fault_backend == "uffd":
        from . import uffd  # ctypes and the kernel probe only when asked for

        uffd.check_backend(cfg.ram, cfg.host_page, cfg.hugetlb)  # one line saying what to change
