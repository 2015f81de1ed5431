"""The postcopy phase ends where QEMU's does: at the source's ``completed``, after the destination's
SHUT came back on the return path and the return thread was joined (migration.c:
migration_completion() -> close_return_path_on_source() -> migration_completion_end())."""

import pytest

import shmig
from helpers import BACKENDS
from shmig.analysis import last_placed, postcopy_end
from shmig.control import Ev
from shmig.plan import Kind
from shmig.record import Mark

MiB = 1024**2


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["vanilla", "preempt-full"])
def test_the_phase_ends_at_the_sources_completed(mode, backend):
    c = shmig.Config(mode=mode, ram=16 * MiB, bandwidth=200 * MiB, workload="random", precopy_rounds=0,
                     fault_backend=backend)
    m = shmig.Migration(c).start()
    try:
        r = m.wait()
    finally:
        m.close()
    rec = m.record
    assert r.ok, r.error
    completed = rec.emulated(rec.first(Ev.COMPLETED, Kind.SOURCE))
    assert completed is not None, "the source never said completed"
    # every receiver read its EOS (the controller's COMPLETE) before the destination sent SHUT,
    # and the source completes only once that SHUT is read: after both, and after the last placement
    assert completed >= rec.emulated(rec.first(Mark.COMPLETE)) >= last_placed(rec)
    assert postcopy_end(rec) == completed
    t_run = rec.emulated(rec.first(Ev.RUNNING))
    assert r.postcopy_phase_ms == pytest.approx((completed - t_run) / 1e6, abs=1e-3)
    assert r.phases[-1][0] == "postcopy" and r.phases[-1][2] == pytest.approx((completed - rec.t0) / 1e6, abs=1e-3)
    gp = r.guest_progress
    # the tail is part of the phase, and counted apart
    assert 0 <= gp["accesses_after_last_placed"] <= gp["postcopy_accesses"], gp
