"""userfaultfd: real kernel page faults on destination RAM, as QEMU's postcopy takes them.

QEMU's destination registers guest RAM with a userfaultfd (migration/postcopy-ram.c:
ram_block_enable_notify); a vCPU touching a missing page blocks in the kernel; the fault thread
reads the event (postcopy_ram_fault_thread) and asks the source for the page; a receiver places
the page atomically with UFFDIO_COPY (qemu_ufd_copy_ioctl), which wakes the vCPU. This module is
that kernel interface in ctypes, with no compiled code. Every number and struct layout is from the
kernel's include/uapi/linux/userfaultfd.h; the order of opening is QEMU's (util/userfaultfd.c:
uffd_open, /dev/userfaultfd first, then the syscall).

shmig's vCPUs are processes, not threads, and a userfaultfd belongs to the one mm that registered
a range (fs/userfaultfd.c takes ``ctx->mm`` at open). So each vCPU opens and registers its own and
passes it to the destination's processes over a unix socket (SCM_RIGHTS, ``send_uffd``), the way
QEMU is handed the userfaultfds of vhost-user back-ends (postcopy_register_shared_ufd) and wakes
them after placing a page (postcopy_notify_shared_wake). What follows from that, and is enforced
or offered here:

- a uffd is always O_NONBLOCK | O_CLOEXEC: ``poll()`` on a blocking one reports POLLERR (the fault
  thread polls every vCPU's uffd), and a forked process must not inherit one by accident;
- UFFDIO_COPY through one vCPU's uffd puts the page in the shared page cache of the memfd and
  wakes only that uffd's waiters; a copy through another vCPU's uffd then fails with EEXIST,
  which never wakes, so ``copy`` wakes the range itself when it finds the page present
  (``UffdGroup.place`` copies through one uffd and wakes the others that wait);
- the vCPU keeps its own reference to its uffd: when the last reference goes, the kernel wakes
  every blocked fault and completes it with a zero page (userfaultfd_release), so a dead receiver
  would otherwise make a vCPU read zeros it never wrote. With the vCPU's reference alive a fault
  stays blocked until someone places the page, or the vCPU is killed.

QEMU asks for UFFD_FEATURE_THREAD_ID (the faulting thread, for blocktime per vCPU); shmig knows
the vCPU from whose uffd the event came and asks for it only to record it. It also needs
MISSING_SHMEM (guest RAM is a memfd) or MISSING_HUGETLBFS (a hugetlb memfd), like QEMU's
ufd_check_and_apply. Where only UFFD_USER_MODE_ONLY is permitted (an unprivileged user with
``vm.unprivileged_userfaultfd=0``, Linux 5.11+) the uffd is opened with it: shmig's vCPUs fault
in user mode only (numpy stores), and a kernel-mode access to a missing page would get SIGBUS.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

from . import memfd
from .errors import ConfigError

# -- include/uapi/linux/userfaultfd.h -----------------------------------------------------------
UFFD_API = 0xAA
UFFDIO = 0xAA  # ioctl type of the uffd itself; USERFAULTFD_IOC is the same number on /dev/userfaultfd
_UFFDIO_REGISTER, _UFFDIO_UNREGISTER, _UFFDIO_WAKE, _UFFDIO_COPY, _UFFDIO_ZEROPAGE = 0x00, 0x01, 0x02, 0x03, 0x04
_UFFDIO_API = 0x3F

UFFD_EVENT_PAGEFAULT = 0x12
UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0

UFFD_FEATURE_MISSING_HUGETLBFS = 1 << 4
UFFD_FEATURE_MISSING_SHMEM = 1 << 5
UFFD_FEATURE_THREAD_ID = 1 << 8

UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_COPY_MODE_DONTWAKE = 1 << 0
UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1 << 0
UFFD_USER_MODE_ONLY = 1  # userfaultfd(2) flag: handle user-mode faults only (Linux 5.11+)

# asm-generic/ioctl.h: dir << 30 | size << 16 | type << 8 | nr; _IOC_WRITE = 1, _IOC_READ = 2
_IOC_WRITE, _IOC_READ = 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (UFFDIO << 8) | nr


class _Range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Api(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _Register(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _Copy(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_uint64), ("src", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint64), ("copy", ctypes.c_int64)]


class _Zeropage(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("zeropage", ctypes.c_int64)]


UFFDIO_API = _ioc(_IOC_READ | _IOC_WRITE, _UFFDIO_API, ctypes.sizeof(_Api))
UFFDIO_REGISTER = _ioc(_IOC_READ | _IOC_WRITE, _UFFDIO_REGISTER, ctypes.sizeof(_Register))
UFFDIO_UNREGISTER = _ioc(_IOC_READ, _UFFDIO_UNREGISTER, ctypes.sizeof(_Range))
UFFDIO_WAKE = _ioc(_IOC_READ, _UFFDIO_WAKE, ctypes.sizeof(_Range))
UFFDIO_COPY = _ioc(_IOC_READ | _IOC_WRITE, _UFFDIO_COPY, ctypes.sizeof(_Copy))
UFFDIO_ZEROPAGE = _ioc(_IOC_READ | _IOC_WRITE, _UFFDIO_ZEROPAGE, ctypes.sizeof(_Zeropage))
USERFAULTFD_IOC_NEW = _ioc(0, 0x00, 0)  # _IO(USERFAULTFD_IOC, 0x00) on /dev/userfaultfd

# struct uffd_msg (packed, 32 bytes): event, 3 reserved, then pagefault {flags, address, feat.ptid}
MSG = struct.Struct("<BBHIQQI4x")
assert MSG.size == 32 and ctypes.sizeof(_Copy) == 40 and ctypes.sizeof(_Register) == 32

# the userfaultfd syscall's number (the /dev/userfaultfd path needs none)
SYSCALL_NR = {"x86_64": 323, "aarch64": 282, "riscv64": 282, "ppc64le": 364, "s390x": 355,
              "i686": 374, "i386": 374, "armv7l": 388}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int
_libc.syscall.restype = ctypes.c_long


class UffdError(OSError):
    """A userfaultfd operation failed: one line naming the operation and what to do."""


class UffdUnavailable(ConfigError):
    """``--fault-backend uffd`` cannot run here: one line saying what to change (exit 2)."""


@dataclass(frozen=True, slots=True)
class PageFault:
    """One UFFD_EVENT_PAGEFAULT as the fault thread reads it.

    ``address`` is in the faulting process's mm, aligned by the kernel to the page size of the
    mapping (4 KiB on shmem, the huge page on hugetlb: it does not ask UFFD_FEATURE_EXACT_ADDRESS);
    ``offset`` is the same place in guest RAM (address minus the registered base). ``read_ns`` is
    when the fault thread read it (time.monotonic_ns): QEMU's fault time for blocktime and latency
    (mark_postcopy_blocktime_begin takes the clock when it handles the event, not when the vCPU
    faulted, which the kernel does not record)."""

    address: int
    offset: int
    flags: int
    ptid: int  # the faulting thread (UFFD_FEATURE_THREAD_ID), 0 without the feature
    read_ns: int

    @property
    def write(self) -> bool:
        return bool(self.flags & UFFD_PAGEFAULT_FLAG_WRITE)


def _errno_name(e: int) -> str:
    return f"{errno.errorcode.get(e, str(e))} ({os.strerror(e)})"


def _ioctl(fd: int, request: int, arg: ctypes.Structure | None) -> int:
    """0, or the errno (the structure's output fields are filled either way). ctypes releases the
    GIL around the call, so a 1 GiB UFFDIO_COPY does not stop the process's other threads."""
    if _libc.ioctl(fd, request, ctypes.addressof(arg) if arg is not None else None) == 0:
        return 0
    return ctypes.get_errno()


def _open_raw(user_mode_only: bool) -> tuple[int, int]:
    """(fd, 0) or (-1, errno): /dev/userfaultfd's USERFAULTFD_IOC_NEW first (its file mode is the
    permission, and it allows kernel-mode faults), then the syscall (CAP_SYS_PTRACE or
    vm.unprivileged_userfaultfd=1, or any user with UFFD_USER_MODE_ONLY)."""
    flags = os.O_CLOEXEC | os.O_NONBLOCK | (UFFD_USER_MODE_ONLY if user_mode_only else 0)
    err = errno.ENOENT
    if not user_mode_only:
        try:
            dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            err = e.errno or errno.EACCES
        else:
            try:
                fd = _libc.ioctl(dev, USERFAULTFD_IOC_NEW, flags)
                if fd >= 0:
                    return fd, 0
                err = ctypes.get_errno()
            finally:
                os.close(dev)
    nr = SYSCALL_NR.get(platform.machine())
    if nr is None:
        return -1, err
    fd = _libc.syscall(ctypes.c_long(nr), ctypes.c_long(flags))
    return (int(fd), 0) if fd >= 0 else (-1, ctypes.get_errno())


@dataclass(frozen=True)
class Support:
    """What this machine's userfaultfd offers this process (``probe``)."""

    features: int  # UFFDIO_API's answer: every feature the kernel has
    user_mode_only: bool  # only UFFD_USER_MODE_ONLY was permitted
    kernel: str

    @property
    def wanted(self) -> int:
        """QEMU's ask (ufd_check_and_apply): THREAD_ID where there is one, plus the memory kinds."""
        return self.features & (UFFD_FEATURE_THREAD_ID | UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_MISSING_HUGETLBFS)


# per effective uid (a forked child may drop privileges): UFFDIO_API may be called once per fd, so
# the features are asked on a spare one, as QEMU's receive_ufd_features does
_support: dict[int, Support] = {}


def _cap_sys_ptrace() -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << 19))  # CAP_SYS_PTRACE = 19
    except OSError:
        pass
    return False


def _sysctl(name: str) -> str:
    try:
        with open("/proc/sys/" + name.replace(".", "/")) as f:
            return f.read().strip()
    except OSError:
        return "?"


def not_permitted_message(uid: int, cap_ptrace: bool, unprivileged: str, seccomp: bool) -> str:
    """The one line for EPERM/EACCES, naming what is missing of the three that would permit it."""
    if uid == 0 or cap_ptrace or unprivileged == "1":
        who = "root" if uid == 0 else "CAP_SYS_PTRACE" if cap_ptrace else "vm.unprivileged_userfaultfd=1"
        return (f"--fault-backend uffd: userfaultfd is refused even with {who}"
                + (" (a seccomp filter is active: a container's profile blocks the userfaultfd syscall;"
                   " allow it, or give this user read-write access to /dev/userfaultfd)" if seccomp else
                   "; give this user read-write access to /dev/userfaultfd"))
    return (f"--fault-backend uffd: userfaultfd is not permitted for uid {uid}: it is not root, has no "
            f"CAP_SYS_PTRACE and vm.unprivileged_userfaultfd is {unprivileged}; run as root, grant "
            "CAP_SYS_PTRACE, or `sysctl vm.unprivileged_userfaultfd=1` (or use --fault-backend bitmap)")


def probe(user_mode_only: bool | None = None) -> Support:
    """Can this process use userfaultfd, and with which features? ``UffdUnavailable`` (one line)
    if not. Cached per process (and effective uid) after the first success. ``user_mode_only``: None tries a full
    uffd first and falls back to UFFD_USER_MODE_ONLY; True/False forces one (tests)."""
    known = _support.get(os.geteuid())
    if known is not None and user_mode_only in (None, known.user_mode_only):
        return known
    tries = [False, True] if user_mode_only is None else [user_mode_only]
    fd, umo, errs = -1, False, []
    for umo in tries:
        fd, err = _open_raw(umo)
        if fd >= 0:
            break
        errs.append(err)  # a kernel before 5.11 answers EINVAL to UFFD_USER_MODE_ONLY: EPERM said it first
    kernel = platform.release()
    if fd < 0:
        refused = [e for e in errs if e in (errno.EPERM, errno.EACCES)]
        err = refused[0] if refused else errs[0]
        if refused:
            seccomp = False
            try:
                with open("/proc/self/status") as f:
                    seccomp = any(line.startswith("Seccomp:") and line.split()[1] != "0" for line in f)
            except OSError:
                pass
            raise UffdUnavailable(not_permitted_message(os.geteuid(), _cap_sys_ptrace(),
                                                        _sysctl("vm.unprivileged_userfaultfd"), seccomp))
        raise UffdUnavailable(f"--fault-backend uffd: this kernel ({kernel}) has no userfaultfd "
                              f"({_errno_name(err)}): it needs CONFIG_USERFAULTFD (Linux 4.11+ for shared memory)")
    try:
        api = _Api(api=UFFD_API, features=0)
        e = _ioctl(fd, UFFDIO_API, api)
    finally:
        os.close(fd)
    if e:
        raise UffdUnavailable(f"--fault-backend uffd: UFFDIO_API failed on kernel {kernel}: {_errno_name(e)}")
    if not api.features & UFFD_FEATURE_MISSING_SHMEM:
        raise UffdUnavailable(f"--fault-backend uffd: this kernel ({kernel}) cannot serve faults on shared memory "
                              "(no UFFD_FEATURE_MISSING_SHMEM: Linux 4.11+ needed)")
    sup = _support[os.geteuid()] = Support(int(api.features), umo, kernel)
    return sup


def refused() -> str:
    """Why ``--fault-backend uffd`` cannot run here (``probe``'s one line), or "" where it can: a
    test's or a benchmark's skip reason."""
    try:
        probe()
    except UffdUnavailable as e:
        return str(e)
    return ""


def check_backend(ram: int, host_page: int, hugetlb: bool) -> Support:
    """Everything ``--fault-backend uffd`` (and ``--hugetlb``) needs, checked before anything is
    allocated: one line (UffdUnavailable / ConfigError) saying what to change, else the support.
    The destination's RAM is what hugetlb backs: ``ram // host_page`` huge pages."""
    sup = probe()
    if hugetlb:
        if not sup.features & UFFD_FEATURE_MISSING_HUGETLBFS:
            raise UffdUnavailable(f"--hugetlb: this kernel ({sup.kernel}) cannot serve userfaults on hugetlb memory"
                                  " (no UFFD_FEATURE_MISSING_HUGETLBFS); leave --hugetlb out")
        memfd.check_hugetlb(host_page, ram // host_page)
    return sup


def buffer_address(buf: object) -> int:
    """The address of a buffer's first byte (numpy array, bytearray, memoryview, mmap, bytes).
    The caller keeps ``buf`` alive across the ioctl that uses the address."""
    if isinstance(buf, np.ndarray):
        return int(buf.ctypes.data)
    return int(np.frombuffer(buf, np.uint8).ctypes.data)  # type: ignore[call-overload]


class _FaultPathArgs(threading.local):
    """The argument structures of the fault path's ioctls, made once per thread: a copy and a wake
    per fault, and building a ctypes structure costs about what the ioctl's syscall does. Per
    thread, because the fault thread wakes through the same Uffd the listen thread places
    through: a structure filled by one and read by the other's ioctl would wake the wrong range."""

    def __init__(self) -> None:
        self.copy = _Copy()
        self.copy_addr = ctypes.addressof(self.copy)
        self.wake = _Range()
        self.wake_addr = ctypes.addressof(self.wake)


class Uffd:
    """One userfaultfd: the fault queue of the ranges one process registered, and the handle
    through which any process holding it places pages into them."""

    def __init__(self, fd: int, features: int, base: int = 0, length: int = 0, page_size: int = 4096):
        self.fd = fd
        self.features = features
        self.base = base  # the registered range, in the registering process's mm
        self.length = length
        self.page_size = page_size  # of the mapping: what EEXIST skips, what an event is aligned to
        self._zeropage = page_size == mmap.PAGESIZE  # hugetlb ranges have no UFFDIO_ZEROPAGE
        self._zeros: np.ndarray | None = None
        self._args = _FaultPathArgs()

    # -- opening ----------------------------------------------------------------------------------
    @classmethod
    def open(cls) -> Uffd:
        """A new uffd of this process (O_NONBLOCK | O_CLOEXEC), with QEMU's features asked."""
        sup = probe()
        fd, err = _open_raw(sup.user_mode_only)
        if fd < 0:
            raise UffdError(err, f"userfaultfd open failed: {_errno_name(err)}")
        api = _Api(api=UFFD_API, features=sup.wanted)
        e = _ioctl(fd, UFFDIO_API, api)
        if e:
            os.close(fd)
            raise UffdError(e, f"UFFDIO_API (features {sup.wanted:#x}) failed: {_errno_name(e)}")
        return cls(fd, int(api.features))

    def register(self, base: int, length: int, page_size: int = 4096) -> int:
        """UFFDIO_REGISTER (MISSING) of [base, base + length) of this process's mappings; the
        range's ioctls (a bit per _UFFDIO_*). Checks what QEMU's ram_block_enable_notify checks."""
        reg = _Register(range=_Range(base, length), mode=UFFDIO_REGISTER_MODE_MISSING)
        e = _ioctl(self.fd, UFFDIO_REGISTER, reg)
        if e:
            raise UffdError(e, f"UFFDIO_REGISTER of {length} bytes at {base:#x} failed: {_errno_name(e)}"
                            " (the range must be a MAP_SHARED memfd mapping, aligned to its page size)")
        need = (1 << _UFFDIO_COPY) | (1 << _UFFDIO_WAKE)
        if reg.ioctls & need != need:
            self.unregister(base, length)
            raise UffdError(errno.EOPNOTSUPP, f"the registered range offers no UFFDIO_COPY/UFFDIO_WAKE"
                            f" (ioctls {reg.ioctls:#x})")
        self.base, self.length, self.page_size = base, length, page_size
        self._zeropage = bool(reg.ioctls & (1 << _UFFDIO_ZEROPAGE))  # none on hugetlb
        return int(reg.ioctls)

    def unregister(self, base: int | None = None, length: int | None = None) -> None:
        """UFFDIO_UNREGISTER (wakes what waits in the range: its faults then complete without
        the uffd, i.e. with a fresh zero page on shmem)."""
        base = self.base if base is None else base
        length = self.length if length is None else length
        e = _ioctl(self.fd, UFFDIO_UNREGISTER, _Range(base, length))
        if e:
            raise UffdError(e, f"UFFDIO_UNREGISTER of {length} bytes at {base:#x} failed: {_errno_name(e)}")

    # -- the fault thread's side ----------------------------------------------------------------
    def fileno(self) -> int:
        return self.fd

    def read(self, max_events: int = 64) -> list[PageFault]:
        """Every pending fault, up to ``max_events``, in one read(2); [] if none (O_NONBLOCK: a
        wake-up on another thread may have resolved it between poll and read, as QEMU notes)."""
        try:
            data = os.read(self.fd, MSG.size * max_events)
        except BlockingIOError:
            return []
        except InterruptedError:
            return []
        t = time.monotonic_ns()
        if len(data) % MSG.size:
            raise UffdError(errno.EIO, f"read {len(data)} bytes from a userfaultfd: not whole {MSG.size}-byte messages")
        out = []
        for event, _, _, _, flags, address, ptid in MSG.iter_unpack(data):
            if event != UFFD_EVENT_PAGEFAULT:  # no other event was asked for (no EVENT_* feature)
                raise UffdError(errno.EPROTO, f"unexpected userfaultfd event {event:#x}")
            out.append(PageFault(address, address - self.base, flags, ptid, t))
        return out

    # -- the receivers' side --------------------------------------------------------------------
    def copy(self, dst: int, src: int, length: int, wake: bool = True) -> int:
        """UFFDIO_COPY of ``length`` bytes from address ``src`` (any memory of this process) to
        ``dst`` (in the registered range, in the registering mm): the bytes this call placed.

        Atomic per page of the mapping: no reader ever sees part of a page. A page already present
        (placed through another vCPU's uffd, or by a racing receiver) is skipped (EEXIST); EEXIST
        never wakes, so with ``wake`` the range is woken here once the rest is placed. EAGAIN
        (a partial copy, or the mm changing under it: mmap_changing) is retried from where it
        stopped. ESRCH: the registering process has exited."""
        mode = 0 if wake else UFFDIO_COPY_MODE_DONTWAKE
        args = self._args

        def one(done: int) -> tuple[int, int]:
            c = args.copy
            c.dst, c.src, c.len, c.mode, c.copy = dst + done, src + done, length - done, mode, 0
            return (0 if _libc.ioctl(self.fd, UFFDIO_COPY, args.copy_addr) == 0 else ctypes.get_errno()), int(c.copy)

        e, n = one(0)  # the common case: whole in one ioctl
        if not e and n == length:
            return length
        return self._fill("UFFDIO_COPY", one, dst, length, wake, max(n, 0))  # on from where it stopped

    def zeropage(self, dst: int, length: int, wake: bool = True) -> int:
        """UFFDIO_ZEROPAGE (QEMU's postcopy_place_page_zero): the bytes this call placed. Where the
        range has no UFFDIO_ZEROPAGE (hugetlb), a copy from a zeroed buffer, as QEMU copies from
        its postcopy_tmp_zero_page."""
        if not self._zeropage:
            if self._zeros is None or self._zeros.nbytes < length:
                self._zeros = np.zeros(length, np.uint8)
            return self.copy(dst, buffer_address(self._zeros), length, wake)
        mode = 0 if wake else UFFDIO_ZEROPAGE_MODE_DONTWAKE

        def one(done: int) -> tuple[int, int]:
            z = _Zeropage(range=_Range(dst + done, length - done), mode=mode)
            return _ioctl(self.fd, UFFDIO_ZEROPAGE, z), int(z.zeropage)

        return self._fill("UFFDIO_ZEROPAGE", one, dst, length, wake)

    def _fill(self, what: str, one: Callable[[int], tuple[int, int]], dst: int, length: int, wake: bool,
              done: int = 0) -> int:
        """Run ``one(done)`` (an ioctl for [dst + done, dst + length): (errno, bytes or -errno))
        until the range is whole: EAGAIN resumes after what was placed, EEXIST skips a page.
        ``done``: bytes a first ioctl placed already."""
        placed = done
        existed = False
        while done < length:
            e, n = one(done)
            if n > 0:  # the kernel woke [dst + done, + n) already unless DONTWAKE
                done += n
                placed += n
            if not e:
                continue
            if e == errno.EEXIST:
                existed = True
                done += self.page_size
            elif e != errno.EAGAIN:
                raise UffdError(e, f"{what} of {length - done} bytes to {dst + done:#x} failed: {_errno_name(e)}"
                                + (" (the vCPU process that registered it has exited)" if e == errno.ESRCH else ""))
        if existed and wake:
            self.wake(dst, length)
        return placed

    def wake(self, start: int, length: int) -> None:
        """UFFDIO_WAKE: let every fault of this uffd waiting in the range retry (the page is there,
        placed through another uffd)."""
        args = self._args
        r = args.wake
        r.start, r.len = start, length
        if _libc.ioctl(self.fd, UFFDIO_WAKE, args.wake_addr) == 0:
            return
        e = ctypes.get_errno()
        if e:
            raise UffdError(e, f"UFFDIO_WAKE of {length} bytes at {start:#x} failed: {_errno_name(e)}")

    # -- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Uffd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Uffd(fd={self.fd}, range={self.base:#x}+{self.length:#x}, features={self.features:#x})"


# -- passing a uffd to another process ---------------------------------------------------------
_HANDOFF = struct.Struct("<QQQQ")  # features, base, length, page size: what the receiver needs


def send_uffd(sock: socket.socket, uffd: Uffd) -> None:
    """Pass ``uffd`` and its registered range over a unix socket (SCM_RIGHTS). The sender keeps
    its own reference: a vCPU must (see the module's docstring)."""
    socket.send_fds(sock, [_HANDOFF.pack(uffd.features, uffd.base, uffd.length, uffd.page_size)], [uffd.fd])


def recv_uffd(sock: socket.socket) -> Uffd:
    """The uffd ``send_uffd`` passed, ready to place pages into the sender's range."""
    data, fds, flags, _ = socket.recv_fds(sock, _HANDOFF.size, 2)
    if len(data) != _HANDOFF.size or len(fds) != 1 or flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise UffdError(errno.EPROTO, f"uffd hand-off: got {len(data)} bytes and {len(fds)} descriptors"
                        " (the sender exited, or sent something else)")
    os.set_blocking(fds[0], False)  # the file status flags travel with the file; make sure anyway
    features, base, length, page_size = _HANDOFF.unpack(data)
    return Uffd(fds[0], features, base, length, page_size)


class UffdGroup:
    """Every vCPU's uffd for one guest RAM, as a destination process holds them: where the fault
    thread reads events (QEMU's postcopy_ram_fault_thread polls its own uffd plus every shared
    one) and through which a receiver places a host page and wakes whoever waits on it
    (qemu_ufd_copy_ioctl, then postcopy_notify_shared_wake)."""

    def __init__(self, uffds: Sequence[Uffd]):
        if not uffds:
            raise ValueError("a UffdGroup needs at least one uffd")
        self.uffds = list(uffds)
        self._poll = select.poll()
        self._index = {u.fd: v for v, u in enumerate(self.uffds)}
        for u in self.uffds:
            self._poll.register(u.fd, select.POLLIN)

    def faults(self, timeout: float | None) -> list[tuple[int, PageFault]]:
        """The fault thread's wait: (vCPU, fault) for every fault pending on any vCPU's uffd once
        one is readable, or [] after ``timeout`` seconds (None: no limit), so that the thread can
        look at its quit flag, as QEMU's also polls its userfault_event_fd."""
        ready = self._poll.poll(None if timeout is None else timeout * 1000)
        out = []
        for fd, revents in ready:
            v = self._index.get(fd)
            if v is None:  # a watched descriptor (``watch``): the caller looks at it
                continue
            if revents & (select.POLLERR | select.POLLNVAL):
                raise UffdError(errno.EBADF, f"vCPU {v}'s userfaultfd reports {revents:#x} to poll"
                                " (opened without O_NONBLOCK, or closed)")
            out += [(v, f) for f in self.uffds[v].read()]
        return out

    def watch(self, fd: int) -> None:
        """Let ``fd`` (an eventfd: the fault thread's quit notice) end a ``faults`` wait too."""
        self._poll.register(fd, select.POLLIN)

    def unregister(self) -> int:
        """postcopy_ram_incoming_cleanup's cleanup_range, once every page is placed: every vCPU's
        range leaves userfaultfd (the ioctl acts on the registering mm, from any holder of the
        uffd), so the guest runs on without it. The ranges unregistered (a vCPU that has exited
        has none left: ESRCH)."""
        done = 0
        for u in self.uffds:
            try:
                u.unregister()
                done += 1
            except UffdError as e:
                if e.errno != errno.ESRCH:
                    raise
        return done

    def place(self, offset: int, src: int, length: int, waiters: Iterable[int] = ()) -> int:
        """Place ``length`` bytes at guest RAM ``offset`` from address ``src``: UFFDIO_COPY through
        the first waiting vCPU's uffd (which wakes it) or vCPU 0's, then UFFDIO_WAKE for the other
        waiters. The bytes placed; 0 if the page was already there (its waiters are woken)."""
        ws = list(waiters)
        via = ws[0] if ws else 0
        u = self.uffds[via]
        placed = u.copy(u.base + offset, src, length)
        self._wake_others(offset, length, ws, via)
        return placed

    def place_zero(self, offset: int, length: int, waiters: Iterable[int] = ()) -> int:
        """``place`` for a zero page (UFFDIO_ZEROPAGE, or a copy of zeros where the range has none)."""
        ws = list(waiters)
        via = ws[0] if ws else 0
        u = self.uffds[via]
        placed = u.zeropage(u.base + offset, length)
        self._wake_others(offset, length, ws, via)
        return placed

    def wake(self, vcpu: int, offset: int, length: int) -> None:
        u = self.uffds[vcpu]
        u.wake(u.base + offset, length)

    def _wake_others(self, offset: int, length: int, waiters: list[int], via: int) -> None:
        for v in waiters:
            if v != via:
                self.wake(v, offset, length)

    def close(self) -> None:
        for u in self.uffds:
            u.close()
