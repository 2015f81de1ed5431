"""Shared memory: guest RAM on both sides and the small maps every process reads.

The controller creates every segment, the children inherit the mappings across ``fork``, and the
controller unlinks the names as soon as the children exist: from then on nothing of the run is
visible in /dev/shm, whatever kills it. For the short window before that, names carry the owner's
pid and the next run removes segments whose owner is dead.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import threading
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from .config import TARGET_PAGE, Config
from .link import CHANNELS, state_words
from .memfd import MemfdRam

PREFIX = "shmig-"
SHM_DIR = "/dev/shm"
STATUS_LEN = 96

# guest phase word (ctl[PHASE]): what the vCPUs should be doing
RUN_SRC, PAUSE, RUN_DST, QUIT = 0, 1, 2, 3
PHASE = 0
# ctl[DST_POSTCOPY]: set by mig/dst/listen once it has loaded the package (QEMU's postcopy-active on
# the destination); from then on a broken channel pauses the migration instead of failing it
DST_POSTCOPY = 1
# ctl[PAUSE_REQUESTED]: the controller's migrate-pause; mig/src breaks its channels before its next frame
PAUSE_REQUESTED = 2



def segment_owner(name: str) -> int | None:
    """The pid a segment name carries (``shmig-<pid>-...``), or None for a foreign name."""
    try:
        return int(name.split("-")[1]) if name.startswith(PREFIX) else None
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pid_namespace() -> int:
    """This process's PID namespace (the inode of /proc/self/ns/pid; 0 if unknown). A pid means
    something only inside its namespace: a container sharing /dev/shm has pids of its own."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def segment_namespace(name: str) -> int | None:
    """The PID namespace a segment name carries (``shmig-<pid>-ns<inode>-...``); None for a name
    made before names carried it."""
    parts = name.split("-")
    try:
        return int(parts[2][2:]) if len(parts) > 2 and parts[2].startswith("ns") else None
    except ValueError:
        return None


@dataclass
class Swept:
    """What a sweep of /dev/shm did: removed, could not remove, left to another PID namespace."""

    removed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)


def sweep() -> Swept:
    """Remove segments left by runs whose owner died before it could unlink them. A segment of
    another PID namespace is left alone: its pid cannot be checked from here."""
    out = Swept()
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return out
    ns = pid_namespace()
    for name in names:
        pid = segment_owner(name)
        if pid is None:
            continue
        if segment_namespace(name) not in (None, ns):
            out.foreign.append(name)
        elif pid != os.getpid() and not pid_alive(pid):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                out.removed.append(name)
            except FileNotFoundError:
                pass  # its owner's teardown, or another sweep, took it first
            except OSError:
                out.failed.append(name)
    return out


def sweep_stale() -> list[str]:
    """The segments ``sweep`` removed."""
    return sweep().removed


def leftovers() -> list[str]:
    """Segments of this project still in /dev/shm (tests assert this is empty)."""
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(PREFIX))
    except OSError:
        return []


_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MADV_POPULATE_READ, MADV_POPULATE_WRITE = 22, 23  # Linux 5.14+


def populate(a: np.ndarray, write: bool = True, threads: int | None = None) -> None:
    """Map every page of ``a`` into this process up front (allocating it on first touch).

    A forked child does not inherit the page tables of shared mappings: without this, its first
    access to each 4 KiB page is a minor fault, which costs more than copying the page. The
    kernel work runs in a few threads (ctypes releases the GIL), which halves tmpfs allocation.
    """
    if a.nbytes == 0:
        return
    start = a.ctypes.data & ~4095
    end = a.ctypes.data + a.nbytes
    n = threads or min(4, os.cpu_count() or 1)
    step = max(((end - start) // n + 4095) & ~4095, 1 << 21)
    advice = MADV_POPULATE_WRITE if write else MADV_POPULATE_READ
    failed: list[int] = []

    def one(lo: int) -> None:
        if _libc.madvise(lo, min(step, end - lo), advice) != 0:
            failed.append(ctypes.get_errno())

    workers = [threading.Thread(target=one, args=(lo,)) for lo in range(start, end, step)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    if failed:
        if failed[0] not in (errno.EINVAL, errno.ENOSYS):  # an old kernel: touch instead
            raise OSError(failed[0], f"madvise(MADV_POPULATE_*) failed: {os.strerror(failed[0])}")
        flat = a.reshape(-1).view(np.uint8)
        step = os.sysconf("SC_PAGE_SIZE")  # one touch per page of the host's MMU
        if write:
            flat[::step] = flat[::step]
        else:
            int(flat[::step].sum())


class GuestMemory:
    """Every shared array of one run, as numpy views that live exactly as long as this object."""

    def __init__(self, cfg: Config, slots: int):
        """``slots``: the run's processes (``plan.Plan.slots``), one status line each."""
        self.cfg = cfg
        self.token = f"{PREFIX}{os.getpid()}-ns{pid_namespace()}-{secrets.token_hex(4)}"
        self._segs: list[shared_memory.SharedMemory] = []
        self._names: list[str] = []
        n = cfg.npages
        try:
            ram_src = self._create("src", cfg.ram)
            # the uffd backend's destination RAM is a memfd, never populated (shmig.memfd's rules)
            self.dst_memfd: MemfdRam | None = None
            if cfg.fault_backend == "uffd":
                self.dst_memfd = MemfdRam(cfg.ram, f"{self.token}-dst", cfg.host_page if cfg.hugetlb else None)
            else:
                ram_dst = self._create("dst", cfg.ram)
            layout = [
                ("ctl", np.int64, (16,)),
                ("wait", np.int64, (cfg.vcpus, 2)),
                ("link", np.int64, (state_words(len(CHANNELS) + cfg.multifd_channels),)),
                ("status", np.uint8, (slots, STATUS_LEN)),
                ("stamps", np.uint64, (cfg.vcpus, n)),
                ("dirty", np.uint32, (cfg.vcpus, n)),  # per vCPU: one writer per counter
                ("received", np.uint8, (n,)),
            ]
            size = sum(int(np.prod(s)) * np.dtype(t).itemsize for _, t, s in layout)
            state = self._create("state", size)
        except BaseException:
            self.close()
            raise
        self.src = np.ndarray((cfg.ram,), np.uint8, ram_src.buf)
        self.src_fd = ram_src._fd  # the stdlib keeps the segment's fd open; splice reads from it
        self.dst = self.dst_memfd.array if self.dst_memfd else np.ndarray((cfg.ram,), np.uint8, ram_dst.buf)
        off = 0
        for name, t, s in layout:
            a = np.ndarray(s, t, state.buf, off)
            off += a.nbytes
            setattr(self, name, a)
        self.wait[:, 0] = -1

    def _create(self, what: str, size: int) -> shared_memory.SharedMemory:
        shm = shared_memory.SharedMemory(f"{self.token}-{what}", create=True, size=size)
        self._segs.append(shm)
        self._names.append(shm.name)
        if self.cfg.prefault:
            populate(np.ndarray((size,), np.uint8, shm.buf))
        return shm

    def read_dst(self, offset: int = 0, length: int | None = None) -> np.ndarray:
        """A copy of destination RAM [offset, offset + length), safe while the guest runs: with the
        uffd backend by pread of the memfd, never through the mapping (a read of a page not placed
        yet would put a zero page in the file, and the vCPU would find it there instead of its
        fault, and the page's UFFDIO_COPY would fail with EEXIST)."""
        length = self.cfg.ram - offset if length is None else length
        if self.dst_memfd is not None:
            return self.dst_memfd.read_pages(offset, length)
        return self.dst[offset:offset + length].copy()

    # views used on the data path
    def pages(self, ram: np.ndarray) -> np.ndarray:
        """[pages, TARGET_PAGE] view of one RAM copy."""
        return ram.reshape(-1, TARGET_PAGE)

    def unlink(self) -> None:
        """Remove the names; the mappings stay valid in every process that has them."""
        for shm in self._segs:
            if shm.name in self._names:
                try:
                    shm.unlink()
                except FileNotFoundError:
                    pass
                self._names.remove(shm.name)

    def set_status(self, proc: int, text: str) -> None:
        """What process ``proc`` is doing now, for the message a hang or crash prints."""
        b = text.encode()[:STATUS_LEN]
        row = self.status[proc]
        row[:] = 0
        row[:len(b)] = np.frombuffer(b, np.uint8)

    def get_status(self, proc: int) -> str:
        return bytes(self.status[proc]).rstrip(b"\0").decode(errors="replace")

    _VIEWS = ("src", "dst", "ctl", "wait", "link", "status", "stamps", "dirty", "received")

    def __getattr__(self, name: str) -> Any:
        """Only reached for a view that close() dropped (or before it was made)."""
        if name in GuestMemory._VIEWS:
            raise RuntimeError(f"guest memory is closed: its migration has ended (Migration.close), no {name} map")
        raise AttributeError(name)

    def close(self) -> None:
        """Drop every view, then close (and unlink if not yet done). Views must not outlive this."""
        for name in GuestMemory._VIEWS:
            self.__dict__.pop(name, None)
        self.unlink()
        if getattr(self, "dst_memfd", None) is not None:
            self.dst_memfd.close()
        for shm in self._segs:
            try:
                shm.close()
            except BufferError:
                pass  # a view still exists somewhere; the mapping goes with the process
        self._segs.clear()
