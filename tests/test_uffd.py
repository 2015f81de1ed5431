"""The userfaultfd layer with real processes: vCPU children that register their own uffd on a memfd
guest RAM and block in the kernel on missing pages, and another process that places the pages
through the uffd they passed it (SCM_RIGHTS). Every wait has a deadline and names what it waited
for; every child is reaped (killed first if it is still blocked in a fault) whatever happens.
Skipped, with the reason, where this user may not use userfaultfd."""

from __future__ import annotations

import multiprocessing
import os
import select
import signal
import socket
import time
from multiprocessing.connection import Connection
from typing import Any, Iterator

import numpy as np
import pytest

from shmig import memfd, uffd
from shmig import pattern as pattern_mod
from shmig.config import ConfigError
from shmig.memfd import MemfdRam
from shmig.uffd import PageFault, Uffd, UffdGroup, UffdUnavailable

PAGE = 4096
HUGE = 2 << 20
DEADLINE = 10.0
ctx = multiprocessing.get_context("fork")


@pytest.fixture(autouse=True)
def support() -> uffd.Support:
    try:
        return uffd.probe()
    except UffdUnavailable as e:
        pytest.skip(str(e))


# -- the vCPU child -------------------------------------------------------------------------------
def _vcpu(ram: MemfdRam, sock: socket.socket, conn: Connection, keep: bool, uid: int | None) -> None:
    """Register this process's mapping with its own uffd, pass it on, then do what it is told:
    ("read", offset, length) reads through the mapping (a user-mode fault if missing) and answers
    the bytes; ("write", offset, value) stores a word; ("sweep", pages, words) reads every page of
    ``pages`` and counts those not wholly the expected word (a torn or wrong page)."""
    if uid is not None:  # an unprivileged vCPU: full uffds refused, user-mode-only ones allowed
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        try:
            uffd.probe(user_mode_only=False)
            conn.send(("full permitted", None))
        except UffdUnavailable as e:
            conn.send(("refused", str(e)))
    u = Uffd.open()
    u.register(ram.base, ram.size, ram.page_size)
    uffd.send_uffd(sock, u)
    if not keep:
        u.close()
    words = ram.array.view(np.uint64)
    while (cmd := conn.recv()) is not None:
        op, a, b = cmd
        if op == "read":
            conn.send(("read", bytes(ram.array[a:a + b])))
        elif op == "write":
            words[a // 8] = b
            conn.send(("wrote", a))
        elif op == "sweep":
            bad = 0
            for p in a:
                w = words[p * (PAGE // 8):(p + 1) * (PAGE // 8)]
                lo, hi = int(w.min()), int(w.max())
                bad += lo != hi or lo != int(b[p])
            conn.send(("swept", bad))


class Vcpu:
    """The test's handle on one vCPU child: its uffd (as the destination holds it) and its pipe."""

    uffd: Uffd  # unless hold=False: then ``sock`` is where the uffd comes, for someone else to take

    def __init__(self, ram: MemfdRam, keep: bool = True, uid: int | None = None, hold: bool = True):
        a, b = socket.socketpair()
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=_vcpu, args=(ram, b, child_conn, keep, uid), daemon=True)
        self.proc.start()
        b.close()
        child_conn.close()
        self.uid = uid
        self.refusal = self.expect("permission answer") if uid is not None else None
        self.sock = a
        if hold:
            a.settimeout(DEADLINE)
            self.uffd = uffd.recv_uffd(a)
            a.close()

    def send(self, *cmd: Any) -> None:
        self.conn.send(cmd)

    def expect(self, what: str, timeout: float = DEADLINE) -> Any:
        assert self.conn.poll(timeout), f"the test waited {timeout} s for vCPU pid {self.proc.pid}: {what}"
        return self.conn.recv()

    def silent(self, wait: float = 0.2) -> bool:
        """Nothing from the vCPU in ``wait`` s (it is blocked in a fault: it cannot answer)."""
        return not self.conn.poll(wait)

    def wchan(self) -> str:
        try:
            with open(f"/proc/{self.proc.pid}/wchan") as f:
                return f.read()
        except OSError:
            return ""

    def end(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()  # it may be blocked in a fault: nothing else ends it
        self.proc.join(DEADLINE)
        if getattr(self, "uffd", None):
            self.uffd.close()


@pytest.fixture
def vcpus() -> Iterator[list[Vcpu]]:
    started: list[Vcpu] = []
    yield started
    for v in started:
        v.end()


@pytest.fixture
def ram() -> Iterator[MemfdRam]:
    r = MemfdRam(64 * PAGE, "shmig-test")
    yield r
    r.close()


def next_fault(*us: Uffd, timeout: float = DEADLINE) -> list[tuple[int, PageFault]]:
    """The first faults to arrive on any of ``us`` (the fault thread's poll), as (index, fault)."""
    got = UffdGroup(us).faults(timeout)
    assert got, f"the test waited {timeout} s for a userfault on uffds {[u.fd for u in us]}"
    return got


def pattern(words: int, value: int) -> np.ndarray:
    return np.full(words, value, np.uint64)


# -- one vCPU -----------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_a_vcpu_blocks_on_a_missing_page_until_another_process_copies_it(ram: MemfdRam, vcpus: list[Vcpu]) -> None:
    v = Vcpu(ram)
    vcpus.append(v)
    assert v.uffd is not None and v.uffd.base == ram.base and v.uffd.length == ram.size
    v.send("read", 3 * PAGE, PAGE)
    ((_, f),) = next_fault(v.uffd)
    assert (f.offset, f.write, f.ptid) == (3 * PAGE, False, v.proc.pid)  # THREAD_ID: the vCPU's only thread
    assert v.silent() and v.wchan() == "handle_userfault"
    # the integrity check reads by pread: zeros, and the page stays missing (still no answer)
    assert not ram.read_pages(3 * PAGE, PAGE).any() and ram.resident_pages() == 0 and v.silent(0.05)
    src = pattern(PAGE // 8, 0x0123456789ABCDEF)
    assert v.uffd.copy(v.uffd.base + 3 * PAGE, uffd.buffer_address(src), PAGE) == PAGE
    assert v.expect("the page it faulted on") == ("read", src.tobytes())
    assert ram.read_pages(3 * PAGE, PAGE).tobytes() == src.tobytes()
    # a write fault: the vCPU's store lands on the placed page, not on a zero page
    v.send("write", 5 * PAGE + 16, 77)
    ((_, f),) = next_fault(v.uffd)
    assert (f.offset, f.write) == (5 * PAGE, True)
    src = pattern(PAGE // 8, 42)
    assert v.uffd.copy(v.uffd.base + 5 * PAGE, uffd.buffer_address(src), PAGE) == PAGE
    assert v.expect("its write") == ("wrote", 5 * PAGE + 16)
    after = ram.read_pages(5 * PAGE, PAGE).view(np.uint64)
    assert after[2] == 77 and (np.delete(after, 2) == 42).all()


@pytest.mark.timeout(30)
def test_a_zero_page_is_placed_with_zeropage(ram: MemfdRam, vcpus: list[Vcpu]) -> None:
    v = Vcpu(ram)
    vcpus.append(v)
    v.send("read", 7 * PAGE, PAGE)
    ((_, f),) = next_fault(v.uffd)
    assert f.offset == 7 * PAGE
    assert v.uffd.zeropage(v.uffd.base + 7 * PAGE, PAGE) == PAGE
    assert v.expect("the zero page") == ("read", bytes(PAGE))
    assert ram.resident_pages() == 1  # placed, not a hole any more: no second fault
    v.send("read", 7 * PAGE, 8)
    assert v.expect("the zero page again") == ("read", bytes(8))
    assert v.uffd.zeropage(v.uffd.base + 7 * PAGE, PAGE) == 0  # EEXIST: present already


@pytest.mark.timeout(30)
def test_a_discard_punches_a_hole_and_the_page_faults_again(ram: MemfdRam, vcpus: list[Vcpu]) -> None:
    v = Vcpu(ram)
    vcpus.append(v)
    src = pattern(PAGE // 8, 9)
    v.uffd.copy(v.uffd.base, uffd.buffer_address(src), PAGE)
    v.send("read", 0, 8)
    assert v.expect("a placed page") == ("read", src[:1].tobytes())
    ram.punch_hole(0, PAGE)  # CMD_POSTCOPY_RAM_DISCARD
    v.send("read", 0, 8)
    ((_, f),) = next_fault(v.uffd)
    assert f.offset == 0 and v.silent()
    v.uffd.copy(v.uffd.base, uffd.buffer_address(src), PAGE)
    assert v.expect("the page placed again") == ("read", src[:1].tobytes())


@pytest.mark.timeout(30)
def test_the_destination_must_read_by_pread_not_through_its_own_mapping(ram: MemfdRam, vcpus: list[Vcpu]) -> None:
    """Why MemfdRam.read_pages exists: pread leaves a hole a hole; a read through the destination's
    own (unregistered) mapping fills it with zeros for everyone, and the vCPU never faults."""
    v = Vcpu(ram)
    vcpus.append(v)
    ram.read_pages(0, ram.size)
    assert ram.resident_pages() == 0
    assert int(ram.array[9 * PAGE]) == 0  # the pitfall: a read fault in an unregistered mapping
    assert ram.resident_pages() == 1
    v.send("read", 9 * PAGE, 8)
    assert v.expect("a page the destination touched") == ("read", bytes(8))
    assert not v.uffd.read()  # no fault was ever raised for it


@pytest.mark.timeout(30)
def test_a_placer_wakes_the_vcpus_whose_fault_was_read_and_the_fault_thread_the_others(
        ram: MemfdRam, vcpus: list[Vcpu]) -> None:
    """userfault.UffdPlacer's waiting slots, in both orders: (1) the fault thread reads vCPU 0's
    event before the page is placed: the placer finds its slot and wakes it; (2) vCPU 1 faults,
    the page is placed before its event is read: the placer wakes nobody, and the fault thread,
    finding the page placed, wakes vCPU 1 itself. A placement nobody waits for wakes no one."""
    from shmig.ledger import ReceiverStats
    from shmig.userfault import UffdPlacer

    v0, v1 = Vcpu(ram), Vcpu(ram)
    vcpus += [v0, v1]
    group = UffdGroup([v0.uffd, v1.uffd])
    received = np.zeros(64, np.uint8)
    placer = UffdPlacer(group, received, PAGE, np.zeros(64, np.int64), np.full(2, -1, np.int64), 1,
                        ReceiverStats())
    src = pattern(PAGE // 8, 7)
    # (1) the event is read first
    v0.send("read", 3 * PAGE, 8)
    (v, pf), = next_fault(v0.uffd, v1.uffd)
    assert v == 0 and not placer.waiting_on(0, pf.offset // PAGE)
    placer.place_pages(np.array([3], np.uint32), None, src.view(np.uint8).reshape(1, PAGE))
    assert v0.expect("woken by the placer") == ("read", src.view(np.uint8)[:8].tobytes())
    # (2) the page is placed before the event is read
    v1.send("read", 5 * PAGE, 8)
    deadline = time.monotonic() + DEADLINE
    while "userfault" not in v1.wchan():  # blocked in the kernel, its event not read yet
        assert time.monotonic() < deadline, "vCPU 1 never blocked in a userfault"
        time.sleep(0.005)
    placer.place_pages(np.array([5], np.uint32), None, src.view(np.uint8).reshape(1, PAGE))
    assert v1.silent(), "woken by a placer that could not know it waited"
    (v, pf), = next_fault(v0.uffd, v1.uffd)
    assert v == 1 and placer.waiting_on(1, pf.offset // PAGE)  # placed already: the caller wakes it
    group.wake(1, 5 * PAGE, PAGE)
    assert v1.expect("woken by the fault thread") == ("read", src.view(np.uint8)[:8].tobytes())


def test_guest_memory_copies_destination_ram_by_pread() -> None:
    """What ``shmig serve``'s pmemsave and the kept RAM of a closed VM read while a uffd guest may
    still run (GuestMemory.read_dst): holes stay holes."""
    from shmig.config import Config
    from shmig.memory import GuestMemory

    mem = GuestMemory(Config(ram=4 << 20, fault_backend="uffd", prefault=False).validate(), slots=4)
    try:
        assert mem.dst_memfd is not None
        assert not mem.read_dst(8 * PAGE, 4 * PAGE).any() and not mem.read_dst().any()
        assert mem.dst_memfd.resident_pages() == 0
    finally:
        mem.unlink()
        mem.close()


@pytest.mark.timeout(30)
def test_a_copy_over_a_page_already_there_places_the_rest(ram: MemfdRam) -> None:
    """The kernel stops a multi-page UFFDIO_COPY at a present page (a partial copy, EAGAIN, then
    EEXIST): copy() goes on past it and leaves the present page alone."""
    with Uffd.open() as u:
        u.register(ram.base, ram.size)
        first = pattern(PAGE // 8, 1)
        assert u.copy(u.base + 2 * PAGE, uffd.buffer_address(first), PAGE) == PAGE
        rest = pattern(16 * PAGE // 8, 2)
        assert u.copy(u.base, uffd.buffer_address(rest), 16 * PAGE) == 15 * PAGE
        got = ram.read_pages(0, 16 * PAGE).view(np.uint64).reshape(16, -1)
        assert (got[2] == 1).all() and (np.delete(got, 2, axis=0) == 2).all()
        assert u.zeropage(u.base, 17 * PAGE) == PAGE  # only page 16 was missing
        assert ram.resident_pages() == 17


@pytest.mark.timeout(30)
def test_the_integrity_check_reads_a_memfd_by_pread(ram: MemfdRam) -> None:
    """pattern.check on a MemfdRam: a page never placed is reported (all zero), and stays a hole."""
    zero_fraction = 0.25
    n = ram.size // PAGE
    stamps = np.zeros((1, n), np.uint64)
    expected = pattern_mod.initial_pages(3, zero_fraction, np.arange(n))
    with Uffd.open() as u:
        u.register(ram.base, ram.size)
        for p in range(n):
            if p != 5:
                u.copy(u.base + p * PAGE, uffd.buffer_address(expected[p]), PAGE)
        res = pattern_mod.check(ram, 3, zero_fraction, stamps, False, chunk_pages=16)
        assert (res.ok, res.bad_pages, res.first_bad_page) == (False, 1, 5) and "never placed" in str(res.detail)
        assert ram.resident_pages() == n - 1
        u.copy(u.base + 5 * PAGE, uffd.buffer_address(expected[5]), PAGE)
    assert pattern_mod.check(ram, 3, zero_fraction, stamps, False, chunk_pages=16).ok


# -- two vCPUs ----------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_two_vcpus_on_one_page_copy_through_one_wake_the_other(ram: MemfdRam, vcpus: list[Vcpu]) -> None:
    a, b = Vcpu(ram), Vcpu(ram)
    vcpus += [a, b]
    a.send("read", 4 * PAGE, PAGE)
    b.send("read", 4 * PAGE, PAGE)
    seen: list[tuple[int, PageFault]] = []
    while len(seen) < 2:
        seen += next_fault(a.uffd, b.uffd)
    assert sorted((i, f.offset, f.ptid) for i, f in seen) == [(0, 4 * PAGE, a.proc.pid), (1, 4 * PAGE, b.proc.pid)]
    src = pattern(PAGE // 8, 0xA5A5)
    assert a.uffd.copy(a.uffd.base + 4 * PAGE, uffd.buffer_address(src), PAGE) == PAGE
    assert a.expect("the page, copied through its uffd") == ("read", src.tobytes())
    assert b.silent()  # the copy woke only a's uffd
    assert b.uffd.copy(b.uffd.base + 4 * PAGE, uffd.buffer_address(src), PAGE, wake=False) == 0  # EEXIST
    assert b.silent()  # EEXIST never wakes
    b.uffd.wake(b.uffd.base + 4 * PAGE, PAGE)
    assert b.expect("the page, after UFFDIO_WAKE") == ("read", src.tobytes())
    # the same through UffdGroup.place: copy through the first waiter, wake the others
    group = UffdGroup([a.uffd, b.uffd])
    a.send("read", 6 * PAGE, 8)
    b.send("read", 6 * PAGE, 8)
    seen = []
    while len(seen) < 2:
        seen += next_fault(a.uffd, b.uffd)
    src = pattern(PAGE // 8, 6)
    assert group.place(6 * PAGE, uffd.buffer_address(src), PAGE, waiters=[1, 0]) == PAGE
    assert a.expect("page 6") == b.expect("page 6") == ("read", src[:1].tobytes())
    assert group.place(6 * PAGE, uffd.buffer_address(src), PAGE) == 0  # a racing receiver: EEXIST, no harm


# -- huge pages -----------------------------------------------------------------------------------------
@pytest.fixture
def hugetlb_pool() -> Iterator[int]:
    """Two free 2 MiB hugetlb pages for the test: the pool raised if it must be, and restored."""
    need = 2
    pool = memfd.hugetlb_pool(HUGE)
    if pool is None:
        pytest.skip("no 2 MiB hugetlb pages on this machine")
    path = f"{pool.path}/nr_hugepages"
    raised = pool.available < need
    if raised:
        try:
            with open(path, "w") as f:
                f.write(str(pool.total + need - pool.available))
        except OSError as e:
            pytest.skip(f"cannot raise {path} ({e.strerror}): run as root")
        got = memfd.hugetlb_pool(HUGE)
        if got is None or got.available < need:
            with open(path, "w") as f:
                f.write(str(pool.total))
            pytest.skip("the kernel could not find 2 free 2 MiB pages for the hugetlb pool")
    try:
        yield need
    finally:
        if raised:
            with open(path, "w") as f:
                f.write(str(pool.total))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backing", ["shmem", "hugetlb"])
def test_a_huge_page_is_placed_whole(backing: str, vcpus: list[Vcpu], request: pytest.FixtureRequest) -> None:
    """A vCPU faults in the middle of a 2 MiB host page; the receiver copies the whole host page from
    its temporary page in one UFFDIO_COPY; the vCPU then reads every byte of it correct."""
    hugetlb = backing == "hugetlb"
    if hugetlb:
        request.getfixturevalue("hugetlb_pool")
    with MemfdRam(2 * HUGE, "shmig-test-huge", HUGE if hugetlb else None) as r:
        v = Vcpu(r)
        vcpus.append(v)
        inside = HUGE + 5 * PAGE + 8
        v.send("read", inside, 2 * HUGE - inside)
        ((_, f),) = next_fault(v.uffd)
        # the event's address is aligned to the mapping's page: the huge page on hugetlb
        assert f.offset == (HUGE if hugetlb else HUGE + 5 * PAGE)
        tmp = (np.arange(HUGE // 8, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1)
        assert v.uffd.copy(v.uffd.base + HUGE, uffd.buffer_address(tmp), HUGE) == HUGE
        assert v.expect("the rest of the host page") == ("read", tmp.tobytes()[inside - HUGE:])
        v.send("read", HUGE, HUGE)
        assert v.expect("the whole 2 MiB host page") == ("read", tmp.tobytes())
        assert not v.uffd.read()  # placed whole: no second fault in it
        assert r.read_pages(HUGE, HUGE).tobytes() == tmp.tobytes()
        assert r.resident_pages() == (1 if hugetlb else HUGE // PAGE)
        assert v.uffd.copy(v.uffd.base + HUGE, uffd.buffer_address(tmp), HUGE) == 0  # present: EEXIST
        v.send("read", 0, 8)  # and a zero huge page: no UFFDIO_ZEROPAGE on hugetlb, a copy of zeros
        next_fault(v.uffd)
        assert v.uffd.zeropage(v.uffd.base, HUGE) == HUGE
        assert v.expect("a zero host page") == ("read", bytes(8))
        v.end()


# -- concurrency and failure ----------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_concurrent_readers_never_see_a_torn_page(vcpus: list[Vcpu]) -> None:
    """Two vCPUs read every page in their own random order while this process, as the fault thread
    and the receiver at once, places pages in a third order: a fault read for a page already placed
    is only woken (QEMU's postcopy_request_shared_page), the others are woken by the placement."""
    n = 2048
    value = np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x100000001)
    with MemfdRam(n * PAGE, "shmig-test-torn") as r:
        vs = [Vcpu(r), Vcpu(r)]
        vcpus += vs
        group = UffdGroup([v.uffd for v in vs])
        rng = np.random.default_rng(7)
        for v in vs:
            v.send("sweep", rng.permutation(n).tolist(), value.tolist())
        src = np.empty(PAGE // 8, np.uint64)
        placed = np.zeros(n, bool)
        waiting: dict[int, list[int]] = {}
        faults = 0

        def drain() -> None:
            nonlocal faults
            for i, v in enumerate(vs):
                for f in v.uffd.read():
                    faults += 1
                    p = f.offset // PAGE
                    if placed[p]:
                        group.wake(i, p * PAGE, PAGE)
                    else:
                        waiting.setdefault(p, []).append(i)

        for p in rng.permutation(n).tolist():
            drain()
            src[:] = value[p]
            group.place(p * PAGE, uffd.buffer_address(src), PAGE, waiters=waiting.pop(p, []))
            placed[p] = True
        deadline = time.monotonic() + DEADLINE
        results = []
        for v in vs:
            while not v.conn.poll(0.01):
                drain()
                assert time.monotonic() < deadline, "the test waited for the readers' sweeps"
            results.append(v.expect("its sweep"))
        assert results == [("swept", 0), ("swept", 0)]
        assert faults > 0  # they did block on missing pages
        assert (r.read_pages(0, r.size).view(np.uint64).reshape(n, -1) == value[:, None]).all()
        for v in vs:
            v.end()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("keep", [True, False], ids=["vcpu-keeps-its-uffd", "vcpu-dropped-its-uffd"])
def test_a_placer_killed_with_sigkill(keep: bool, ram: MemfdRam, vcpus: list[Vcpu]) -> None:
    """Only the vCPU and a placer child hold the uffd. SIGKILL of the placer mid-run: a vCPU that
    keeps its own reference stays blocked (never reads a zero page it did not write) until it is
    killed too; one that dropped it is let through onto a fresh zero page, the failure the rule
    prevents."""
    v = Vcpu(ram, keep=keep, hold=False)
    vcpus.append(v)
    done_r, done_w = os.pipe()
    go_r, go_w = os.pipe()

    def placer(sock: socket.socket) -> None:
        u = uffd.recv_uffd(sock)
        src = pattern(PAGE // 8, 1234)
        u.copy(u.base, uffd.buffer_address(src), PAGE)
        os.write(done_w, b"p")
        os.read(go_r, 1)  # mid-run: more to place, never told to

    p = ctx.Process(target=placer, args=(v.sock,), daemon=True)
    p.start()
    try:
        v.sock.close()
        assert select.select([done_r], [], [], DEADLINE)[0], "the test waited for the placer's first page"
        os.read(done_r, 1)
        v.send("read", 0, 8)
        assert v.expect("a placed page") == ("read", pattern(1, 1234).tobytes())
        v.send("read", PAGE, 8)
        t_end = time.monotonic() + DEADLINE
        while v.wchan() != "handle_userfault":
            assert time.monotonic() < t_end, f"vCPU pid {v.proc.pid} never blocked in a userfault"
            time.sleep(0.01)
        p.kill()
        p.join(DEADLINE)
        assert p.exitcode == -signal.SIGKILL
        if keep:
            assert v.silent(0.3) and v.wchan() == "handle_userfault"
            assert ram.read_pages(PAGE, PAGE).any() == False and ram.resident_pages() == 1  # still missing
        else:
            assert v.expect("the page after its last uffd went") == ("read", bytes(8))
    finally:
        for fd in (done_r, done_w, go_r, go_w):
            os.close(fd)
        if p.is_alive():
            p.kill()
        p.join(DEADLINE)
    v.end()
    assert v.proc.exitcode is not None


@pytest.mark.timeout(30)
def test_a_vcpu_killed_mid_fault(ram: MemfdRam, vcpus: list[Vcpu]) -> None:
    """SIGKILL of a vCPU blocked in a fault: placing through its uffd is one clear error (ESRCH),
    and the other vCPUs' uffds still place the page for them."""
    a, b = Vcpu(ram), Vcpu(ram)
    vcpus += [a, b]
    a.send("read", 8 * PAGE, 8)
    b.send("read", 8 * PAGE, 8)
    seen: list[tuple[int, PageFault]] = []
    while len(seen) < 2:
        seen += next_fault(a.uffd, b.uffd)
    a.proc.kill()
    a.proc.join(DEADLINE)
    src = pattern(PAGE // 8, 88)
    with pytest.raises(uffd.UffdError, match="has exited") as e:
        a.uffd.copy(a.uffd.base + 8 * PAGE, uffd.buffer_address(src), PAGE)
    assert "\n" not in str(e.value)
    assert UffdGroup([a.uffd, b.uffd]).place(8 * PAGE, uffd.buffer_address(src), PAGE, waiters=[1]) == PAGE
    assert b.expect("the page, with vCPU 0 dead") == ("read", src[:1].tobytes())


# -- who may -------------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_an_unprivileged_vcpu_gets_a_user_mode_only_uffd(ram: MemfdRam, vcpus: list[Vcpu]) -> None:
    """With vm.unprivileged_userfaultfd=0 a plain user is refused a full uffd (one line naming
    what is missing) but given a UFFD_USER_MODE_ONLY one, which is all a vCPU's numpy stores need."""
    if os.geteuid() != 0:
        pytest.skip("needs root to start a vCPU as another user")
    if uffd._sysctl("vm.unprivileged_userfaultfd") != "0":
        pytest.skip("vm.unprivileged_userfaultfd=1: every user may have a full uffd")
    v = Vcpu(ram, uid=65534)
    vcpus.append(v)
    assert v.refusal == ("refused", uffd.not_permitted_message(65534, False, "0", False))
    assert "CAP_SYS_PTRACE" in v.refusal[1] and "vm.unprivileged_userfaultfd=1" in v.refusal[1]
    v.send("read", 2 * PAGE, 8)
    ((_, f),) = next_fault(v.uffd)
    src = pattern(PAGE // 8, 5)
    assert f.offset == 2 * PAGE and v.uffd.copy(v.uffd.base + f.offset, uffd.buffer_address(src), PAGE) == PAGE
    assert v.expect("the page, as uid 65534") == ("read", src[:1].tobytes())


def test_not_permitted_says_what_is_missing() -> None:
    m = uffd.not_permitted_message(1000, False, "0", False)
    assert m.count("\n") == 0
    for needed in ("not root", "no CAP_SYS_PTRACE", "vm.unprivileged_userfaultfd is 0", "sysctl vm.unprivileged_userfaultfd=1"):
        assert needed in m
    assert "seccomp" in uffd.not_permitted_message(0, True, "0", True)
    assert "even with CAP_SYS_PTRACE" in uffd.not_permitted_message(1000, True, "0", False)
    assert "even with vm.unprivileged_userfaultfd=1" in uffd.not_permitted_message(1000, False, "1", False)


def test_hugetlb_checks_say_what_to_change(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="--host-page of 2MiB or 1GiB"):
        memfd.check_hugetlb(PAGE, 1)
    sysfs = tmp_path / "hugepages-2048kB"
    sysfs.mkdir()
    for name, n in (("nr_hugepages", 4), ("free_hugepages", 3), ("resv_hugepages", 1)):
        (sysfs / name).write_text(f"{n}\n")
    monkeypatch.setattr(memfd, "HUGEPAGES_DIR", str(tmp_path))
    with pytest.raises(ConfigError) as e:
        memfd.check_hugetlb(HUGE, 32)
    msg = str(e.value)  # 2 available, 32 needed: the total must become 4 + 30
    assert "has 2 pages free, this run needs 32" in msg and "nr_hugepages=34" in msg and "\n" not in msg
    assert memfd.check_hugetlb(HUGE, 2).available == 2
    with pytest.raises(ConfigError, match="no 1GiB huge pages"):
        memfd.check_hugetlb(1 << 30, 1)


def test_check_backend_before_anything_is_allocated(support: uffd.Support) -> None:
    assert uffd.check_backend(64 << 20, PAGE, hugetlb=False) is support
    pool = memfd.hugetlb_pool(HUGE)
    if pool is not None and pool.available < 1 << 20:
        with pytest.raises(ConfigError, match="raise it with"):
            uffd.check_backend(2 << 40, HUGE, hugetlb=True)


def test_a_blocking_uffd_is_one_clear_error_in_the_fault_threads_poll() -> None:
    with Uffd.open() as u:
        assert not UffdGroup([u]).faults(0)  # O_NONBLOCK, as opened: nothing pending
        os.set_blocking(u.fd, True)  # the kernel answers poll() with POLLERR (userfaultfd_poll)
        with pytest.raises(uffd.UffdError, match="without O_NONBLOCK"):
            UffdGroup([u]).faults(DEADLINE)
