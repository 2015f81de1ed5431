"""Placement of a huge page in postcopy, as QEMU does it: assembled in the channel's temporary
host page, invisible in destination RAM until it is whole, then copied in at once (UFFDIO_COPY),
and the link told that the receiving thread read nothing meanwhile."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from shmig.config import Config
from shmig.destination import PreemptReceiver
from shmig.wire import Msg, pack_frame
from rig import Rig
from test_fuzz import example

MiB = 1024**2


@pytest.fixture
def rig():
    r = Rig(Config(mode="preempt", ram=4 * MiB, host_page=2 * MiB, bandwidth=1e12, latency=1e-6, prefault=False))
    yield r
    r.close()


@pytest.mark.timeout(30)
def test_a_huge_page_is_assembled_aside_and_copied_in_whole(rig):
    src = rig.mem.src.reshape(-1, 4096)
    dst = rig.mem.dst.reshape(-1, 4096)
    half = np.arange(256, dtype=np.uint32)  # host page 0 is target pages 0-511
    frames = [pack_frame(Msg.HELLO)] + [
        pack_frame(Msg.PAGES, ((half + off).tobytes(), None, True), src[off:off + 256].tobytes())
        for off in (0, 256)]
    with example(rig):
        r, w = rig.pipe()
        data = b"".join(frames)
        threading.Thread(target=lambda: os.write(w, data), daemon=True).start()  # 2 MiB: more than the pipe
        rx = rig.child(PreemptReceiver, {"postcopy": r})
        try:
            assert rx.next().kind == Msg.HELLO
            rx.in_postcopy = True
            rx.place(rx.next())  # the first half
            assert not dst[:512].any() and not rig.mem.received[:512].any(), "a partly received huge page is visible"
            assert rx.link.stalls[1] is None
            rx.place(rx.next())  # the second half: the host page is whole
            assert np.array_equal(dst[:512], src[:512]) and rig.mem.received[:512].all()
            assert not dst[512:].any()
            stall = rx.link.stalls[1]
            assert stall is not None and stall[0] <= stall[1], "the copy is a stall of the receiving thread"
        finally:  # its receive thread ends with it (a later test checks that no such thread is left)
            rx.reader.close()
            rig.fds.remove(r)
