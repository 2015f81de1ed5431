"""``--resume PARTIAL.json``: a compare or sweep stopped by Ctrl-C goes on where it stopped, runs only
what is missing and writes one complete result; a file of another plan is refused in one line."""

from __future__ import annotations

import json
import sys

import pytest

import numpy as np

from shmig import compare, report as report_module, sweep
from shmig.compare import Dilation
from shmig.report import Companion, FaultTable, Report, load_runs, write_json
from shmig.series import LOST

from test_cli import refused, run_main
from test_input import interrupt_when, popen

MiB = 1024**2
SWEEP = ["sweep", "socket-buffer", "1MiB,4MiB", "--modes", "vanilla,preempt", "--ram", "8MiB"]


def sweep_plan(values=("1MiB", "4MiB"), ram="8MiB"):
    """The plan SWEEP's command line makes."""
    runs = sweep.plan({"ram": ram}, "socket_buffer", list(values), ["vanilla", "preempt"])
    return sweep.planned("socket_buffer", runs)


def report(cfg, error=None, factor=None):
    """A finished run's report, without running it."""
    return Report(status="failed" if error else "completed", error=error, config=cfg.to_dict(),
                  integrity={"ok": error is None, "pages_checked": 1, "first_bad_page": None},
                  time_dilation={"factor": factor, "calibration": [{"mode": "vanilla", "time_dilation": factor}]}
                  if factor else {})


def write_partial(path, plan, indices, error=None):
    done = {i: report(plan.runs[i].config, error) for i in indices}
    ordered = plan.ordered(done)
    entries = sweep.to_json([r.saved(rep) for r, rep in ordered])
    path.write_text(json.dumps(plan.stamp(entries, [r for r, _ in ordered])))
    return path


def test_the_plan_id_changes_with_any_run():
    ids = {sweep_plan().id, sweep_plan(("1MiB", "2MiB")).id, sweep_plan(ram="16MiB").id,
           sweep_plan(("1MiB", "4MiB", "8MiB")).id}
    assert len(ids) == 4
    assert sweep_plan().id == sweep_plan().id  # and nothing else: the same command, the same id
    cells = compare.plan({"ram": "8MiB"}, ["vanilla", "preempt"], [4096])
    assert compare.planned(cells).id != compare.planned(compare.plan({"ram": "8MiB"}, ["vanilla", "preempt"],
                                                                     [4096], repeat=2)).id


def test_resume_keeps_what_finished_and_runs_what_was_lost(tmp_path):
    p = sweep_plan()
    path = write_partial(tmp_path / "p.json", p, [0, 2])
    assert sorted(p.resume(str(path))) == [0, 2]
    assert [r.index for r in p.missing(p.resume(str(path)))] == [1, 3]
    write_partial(path, p, [0], error=LOST + "the workers running it died 2 times")  # the cluster lost it
    assert p.resume(str(path)) == {}


def test_a_resume_reads_and_writes_fault_tables_in_the_companion(capsys, tmp_path, monkeypatch):
    """Long fault tables go to the .npz beside the JSON: --resume reads them from there, and the
    complete result (here: nothing left to run) writes them there again, unchanged."""
    monkeypatch.setattr(report_module, "INLINE_FAULTS", 0)  # every table is long
    p, path = sweep_plan(), tmp_path / "p.json"
    done = {i: report(r.config) for i, r in enumerate(p.runs)}
    for i, rep in done.items():
        rep.faults = FaultTable(np.arange(3.0) + i, np.full(3, 100.0 + i), np.zeros(3, np.int16))
    ordered = p.ordered(done)
    comp = Companion(str(path))
    write_json(str(path), p.stamp(sweep.to_json([r.saved(rep) for r, rep in ordered], comp),
                                  [r for r, _ in ordered]), comp)
    assert all(isinstance(e["report"]["faults"], dict) and e["report"]["faults"]["npz"] == "p.faults.npz"
               for e in json.loads(path.read_text()))
    assert {i: rep.faults for i, rep in p.resume(str(path)).items()} == {i: rep.faults for i, rep in done.items()}

    code, out, err = run_main(capsys, *SWEEP, "--json", str(path), "--resume", str(path))
    assert code == 0, err
    assert f"nothing to run: every run is in {path}" in err
    assert [s.report.faults for s in load_runs(str(path))] == [done[i].faults for i in range(len(p.runs))]
    assert json.loads(path.read_text())[3]["report"]["faults"]["npz"] == "p.faults.npz"


@pytest.mark.parametrize("change,text", [
    (["--ram", "16MiB"], "its run 0 (vanilla socket-buffer=1MiB) had --ram 8MiB (here 16MiB)"),
    (["--values", "1MiB,2MiB"], "its run 2 is value 4MiB (here 2MiB)"),
    (["--values", "1MiB,4MiB,8MiB"], "it planned 4 runs, this command plans 6"),
    (["--modes", "vanilla,preempt-full"], "its run 1 is mode preempt (here preempt-full)"),
])
def test_another_plan_is_refused_in_one_line(capsys, tmp_path, change, text):
    path = write_partial(tmp_path / "p.json", sweep_plan(), [0, 1, 2])
    argv = list(SWEEP)
    if change[0] == "--values":
        argv[2] = change[1]
    else:
        i = argv.index(change[0]) if change[0] in argv else len(argv)
        argv[i:i + 2] = change
    line = refused(capsys, *argv, "--resume", str(path))
    assert f"--resume {path}: it was written by another plan: {text}; give the options" in line, line


def test_what_cannot_be_resumed_is_refused(capsys, tmp_path):
    path = write_partial(tmp_path / "p.json", sweep_plan(), [0])
    assert "it was written by another plan (a sweep, not a compare)" in refused(
        capsys, "compare", "--ram", "8MiB", "--resume", str(path))
    one = tmp_path / "run.json"  # what `shmig run --json` writes: no plan
    one.write_text(json.dumps(report(sweep_plan().runs[0].config).to_dict()))
    assert "its runs do not say which plan they belong to" in refused(capsys, *SWEEP, "--resume", str(one))
    twice = json.loads(path.read_text()) * 2
    path.write_text(json.dumps(twice))
    assert "run 0 (vanilla socket-buffer=1MiB) is in it twice" in refused(capsys, *SWEEP, "--resume", str(path))
    path.write_text("{")
    assert refused(capsys, *SWEEP, "--resume", str(path)).startswith(f"shmig: error: --resume: {path} is not JSON")
    assert "--resume: cannot read" in refused(capsys, *SWEEP, "--resume", str(tmp_path / "none.json"))


def test_a_resumed_auto_row_keeps_the_factor_it_ran_at():
    """--time-dilation auto: the runs still to come of a row share the factor its finished runs had;
    a row whose runs disagree (calibrated on different workers) is calibrated again."""
    p = compare.planned(compare.plan({"ram": "8MiB", "bandwidth": "100MiB/s", "time_dilation": "auto"},
                                     ["vanilla", "preempt", "preempt-full"], [4096, 2 * MiB]))
    assert [(r.mode, r.host_page, len(r.calibrate)) for r in p.runs[2:4]] == [("preempt-full", 4096, 3),
                                                                             ("vanilla", 2 * MiB, 3)]
    done = {0: report(p.runs[0].config, factor=3.0),  # 4KiB: one run, at 3x
            3: report(p.runs[3].config, factor=4.0), 4: report(p.runs[4].config, factor=2.0)}  # 2MiB: two clocks
    factors = compare.ran_at(p, done)
    assert factors == {4096: Dilation(3.0, [{"mode": "vanilla", "time_dilation": 3.0}])}
    todo = compare.with_factors(p.missing(done), factors)
    assert [(r.index, r.config.time_dilation, len(r.calibrate)) for r in todo] == [(1, 3.0, 0), (2, 3.0, 0),
                                                                                  (5, "auto", 3)]
    results = {r.index: report(r.config) for r in todo}
    compare.note_calibration(results, p.runs, factors)
    assert results[1].time_dilation["calibration"] == factors[4096].calibration  # what its factor rests on
    assert "calibration" not in results[5].time_dilation  # its worker says, not this client


@pytest.mark.timeout(120)
def test_an_interrupted_sweep_resumes_to_one_complete_result(capsys, tmp_path, shm_leftovers):
    """Ctrl-C during the second of three runs (as a terminal sends it, to the whole group): the first
    is saved. --resume with the same command runs the other two only and writes all three, in plan
    order, the first exactly as it was."""
    js = tmp_path / "s.json"
    argv = ["sweep", "max-postcopy-bandwidth", "1GiB/s,4MiB/s,1GiB/s", "--modes", "preempt", "--ram", "16MiB",
            "--workload", "idle", "--precopy-rounds", "0", "--json", str(js)]
    p = popen([sys.executable, "-m", "shmig", *argv])
    out, err = interrupt_when(p, "run 2/3: preempt max-postcopy-bandwidth=4MiB/s", after=0.5)
    assert p.returncode == 130, err
    assert "shmig: interrupted: 1 of 3 runs finished" in err
    partial = json.loads(js.read_text())
    assert [(r["value"], r["plan"]["index"]) for r in partial] == [("1GiB/s", 0)]
    assert shm_leftovers() == []

    code, out, err = run_main(capsys, *argv, "--resume", str(js))
    assert code == 0, err
    assert "run 1/2: preempt max-postcopy-bandwidth=4MiB/s" in err and "run 3/" not in err  # two runs, not three
    whole = json.loads(js.read_text())
    assert [(r["value"], r["plan"]["index"]) for r in whole] == [("1GiB/s", 0), ("4MiB/s", 1), ("1GiB/s", 2)]
    assert whole[0] == partial[0]  # kept, not run again
    assert all(r["report"]["integrity"]["ok"] for r in whole)
    rows = [line for line in out.splitlines() if line.startswith("|") and "preempt" in line]
    assert len(rows) == 3 and all(row.rstrip().endswith("ok |") for row in rows)
    code, again, _ = run_main(capsys, "report", str(js))  # one result, as if it had never stopped
    assert code == 0 and again == out
