"""Guest RAM that userfaultfd can serve: a memfd, mapped MAP_SHARED, inherited across fork.

A userfaultfd registered for MISSING faults on shared memory fires when the page is absent from
the file's page cache (mm/shmem.c: shmem_get_folio_gfp hands the fault to handle_userfault), so
every process that maps the same memfd sees a page once any of them has placed it, and each vCPU
process can register its own mapping with its own uffd. A memfd has no name in /dev/shm (nothing
to leave behind) and can be backed by real hugetlb pages (MFD_HUGETLB | MFD_HUGE_2MB / _1GB), which
UFFDIO_COPY places whole, as QEMU places a huge page.

Rules that come with it (each one a way to corrupt a run silently):
- the destination never reads or writes a page it has not placed through its own mapping: a read
  or write fault there is not registered, so shmem allocates a zero page into the shared cache
  and every vCPU then reads zeros without faulting. Integrity is checked with ``pread`` of the
  memfd, which reads holes as zeros without allocating (``read_pages``);
- nothing may populate destination RAM (MADV_POPULATE_WRITE, a first-touch loop) before the run
  ends, for the same reason;
- a discard (CMD_POSTCOPY_RAM_DISCARD) is a hole punched in the file (``punch_hole``), as QEMU's
  ram_discard_range does for a shared file-backed block: the pages are missing again for all.

A hugetlb mapping reserves its pages when it is mapped (MAP_SHARED without MAP_NORESERVE), so a
pool too small fails at once rather than with SIGBUS at some later fault; ``check_hugetlb`` says
so before anything is allocated, with the number to raise ``nr_hugepages`` to.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError
from .units import fmt_size

HUGETLB_FLAGS = {2 << 20: os.MFD_HUGE_2MB, 1 << 30: os.MFD_HUGE_1GB}
HUGEPAGES_DIR = "/sys/kernel/mm/hugepages"
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


@dataclass(frozen=True)
class HugetlbPool:
    """One huge page size's pool (/sys/kernel/mm/hugepages/hugepages-<kB>kB)."""

    page_size: int
    total: int  # nr_hugepages
    free: int  # free_hugepages, reserved ones included
    reserved: int  # resv_hugepages: promised to mappings, not yet faulted in

    @property
    def available(self) -> int:
        return self.free - self.reserved

    @property
    def path(self) -> str:
        return f"{HUGEPAGES_DIR}/hugepages-{self.page_size >> 10}kB"

    def raise_hint(self, needed: int) -> str:
        """How to make ``needed`` pages available: the command, with the number."""
        target = self.total + needed - self.available
        if self.page_size == _default_huge_page():
            return f"`sysctl vm.nr_hugepages={target}` (as root)"
        return f"`echo {target} > {self.path}/nr_hugepages` (as root)"


def _default_huge_page() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("Hugepagesize:"):
                    return int(line.split()[1]) << 10
    except OSError:
        pass
    return 2 << 20


def hugetlb_pool(page_size: int) -> HugetlbPool | None:
    """The pool of this huge page size, or None if the machine has no such pages."""
    path = f"{HUGEPAGES_DIR}/hugepages-{page_size >> 10}kB"

    def read(name: str) -> int:
        with open(f"{path}/{name}") as f:
            return int(f.read())

    try:
        return HugetlbPool(page_size, read("nr_hugepages"), read("free_hugepages"), read("resv_hugepages"))
    except (OSError, ValueError):
        return None


def check_hugetlb(page_size: int, pages_needed: int) -> HugetlbPool:
    """``--hugetlb``: one line (ConfigError) unless ``pages_needed`` huge pages of ``page_size``
    can be mapped now. Nothing is allocated: it reads the pool and creates an empty memfd."""
    what = fmt_size(page_size)
    if page_size not in HUGETLB_FLAGS:
        raise ConfigError(f"--hugetlb needs a --host-page of 2MiB or 1GiB, not {what}")
    pool = hugetlb_pool(page_size)
    if pool is None:
        raise ConfigError(f"--hugetlb: this machine has no {what} huge pages (no {HUGEPAGES_DIR}/"
                          f"hugepages-{page_size >> 10}kB); use another --host-page, or leave --hugetlb out")
    try:
        os.close(os.memfd_create("shmig-probe", os.MFD_CLOEXEC | os.MFD_HUGETLB | HUGETLB_FLAGS[page_size]))
    except OSError as e:
        raise ConfigError(f"--hugetlb: this kernel cannot create {what} hugetlb memory (memfd_create with"
                          f" MFD_HUGETLB: {os.strerror(e.errno or errno.EINVAL)}); leave --hugetlb out") from None
    if pool.available < pages_needed:
        raise ConfigError(f"--hugetlb: the {what} hugetlb pool has {pool.available} pages free, this run needs"
                          f" {pages_needed}: raise it with {pool.raise_hint(pages_needed)}, or leave --hugetlb out")
    return pool


class MemfdRam:
    """One guest RAM on a memfd, as numpy views that live exactly as long as this object.

    Create it before forking the processes that use it: they inherit the MAP_SHARED mapping at
    the same address (a vCPU registers that address with its uffd) and the fd (for pread). The
    views must be dropped before ``close`` (an exported view keeps the mmap open; writing to a
    view of a closed mapping would crash the process)."""

    def __init__(self, size: int, name: str, hugetlb_page: int | None = None):
        self.page_size = hugetlb_page or mmap.PAGESIZE
        if size <= 0 or size % self.page_size:
            raise ValueError(f"memfd RAM of {size} bytes is not a multiple of its {self.page_size}-byte pages")
        flags = os.MFD_CLOEXEC | (os.MFD_HUGETLB | HUGETLB_FLAGS[hugetlb_page] if hugetlb_page else 0)
        self.fd = os.memfd_create(name, flags)
        try:
            os.ftruncate(self.fd, size)
            self._map: mmap.mmap | None = mmap.mmap(self.fd, size, mmap.MAP_SHARED)
        except OSError as e:
            os.close(self.fd)
            if hugetlb_page and e.errno == errno.ENOMEM:
                pool = hugetlb_pool(hugetlb_page)
                raise ConfigError(f"--hugetlb: the {fmt_size(hugetlb_page)} hugetlb pool cannot hold {fmt_size(size)}"
                                  + (f": raise it with {pool.raise_hint(size // hugetlb_page)}" if pool else "")) from None
            raise
        self.size = size
        self.hugetlb = bool(hugetlb_page)
        self.array = np.frombuffer(self._map, np.uint8)  # the mapping: never touch unplaced pages through it
        self.base = int(self.array.ctypes.data)

    def read_pages(self, offset: int, length: int, out: np.ndarray | None = None) -> np.ndarray:
        """``length`` bytes of the file at ``offset`` by pread: holes read as zeros and stay holes
        (no page is allocated, no vCPU's fault is pre-empted). For the integrity check."""
        buf = np.empty(length, np.uint8) if out is None else out.reshape(-1).view(np.uint8)[:length]
        mv = buf.data
        done = 0
        while done < length:
            n = os.preadv(self.fd, [mv[done:]], offset + done)
            if n <= 0:
                raise OSError(errno.EIO, f"pread of guest RAM at {offset + done:#x} returned {n}")
            done += n
        return buf

    def punch_hole(self, offset: int, length: int) -> None:
        """Discard: the pages leave the file, and fault again in every mapping (the range must be
        aligned to the page size: a partial huge page is only zeroed, never removed)."""
        if _libc.fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"fallocate(PUNCH_HOLE) of {length} bytes at {offset:#x}: {os.strerror(e)}")

    def resident_pages(self) -> int:
        """Pages the file holds (placed so far), from its block count: nothing is touched."""
        return os.fstat(self.fd).st_blocks * 512 // self.page_size

    def close(self) -> None:
        """Drop the view, unmap, close the fd (the memory goes with the last mapping)."""
        self.__dict__.pop("array", None)
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # a view still exists somewhere; the mapping goes with the process
            self._map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> MemfdRam:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
