"""compare and sweep on a Dask cluster (``--cluster``): a LocalCluster of two single-threaded workers
gives the same result as a local run; a worker killed mid-run costs its cell one retry, then the
cell is reported lost, and no other cell is touched; Ctrl-C stops everything and --resume goes on.
Each test leaves no process and nothing in /dev/shm (conftest checks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import psutil
import pytest

import shmig
from shmig import cell, cluster, progress, series, sweep
from shmig.progress import LiveStatus

from test_cli import ENV, one_error_line, refused, run_main
from test_input import interrupt_when, popen

SWEEP = ["sweep", "socket-buffer", "1MiB,4MiB", "--modes", "vanilla,preempt", "--ram", "8MiB", "--precopy-rounds",
         "0", "--bandwidth", "200MiB/s"]


def table(out: str) -> list[list[str]]:
    """The table's rows, header first, without the figures that differ from run to run."""
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines() if line.startswith("|")]
    return [rows[0]] + [[r[0], r[1], r[2], r[-1]] for r in rows[2:]]


def cell_processes() -> dict[psutil.Process, str]:
    """Runs of a cluster on this machine, by the name ``shmig.cell`` gives itself in ps."""
    found = {}
    for p in psutil.process_iter(["cmdline"]):
        title = " ".join(p.info["cmdline"] or []).strip()  # setproctitle: one string, maybe split and padded
        if title.startswith("shmig cell: "):
            found[p] = title.removeprefix("shmig cell: ")
    return found


def test_without_dask_the_option_says_what_to_install():
    code = ("import sys; sys.modules['distributed'] = sys.modules['dask'] = None\n"
            "from shmig.cli import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, *SWEEP, "--cluster", "local:2"], capture_output=True, text=True,
                       timeout=60, env=ENV)
    assert r.returncode == 2 and r.stdout == ""
    assert "pip install -e '.[cluster]'" in one_error_line(r.stderr)


@pytest.mark.parametrize("address,text", [
    ("local:0", "give between 1 and 64 local workers"),
    ("local:two", "give a scheduler address (tcp://host:8786) or local:N"),
    ("tcp://host:8786/x", "give a scheduler address"),
])
def test_bad_cluster_addresses_are_one_line(capsys, address, text):
    assert text in refused(capsys, *SWEEP, "--cluster", address)


def test_the_live_line_counts_cells():
    line = progress.cells_text(10, 4, 1, ["vanilla 4KiB", "preempt 4KiB"], elapsed=20.0)
    assert line == "4/10 done · 1 failed · 2 running: vanilla 4KiB, preempt 4KiB · ~30s left"
    assert progress.cells_text(3, 0, 0, [], 1.0) == "0/3 done · 0 running · time left: ?"


def slow_config():
    """An idle guest behind a postcopy rate limit: a run of about 3 s."""
    return shmig.Config.from_strings(mode="preempt", ram="16MiB", workload="idle", precopy_rounds="0",
                                     max_postcopy_bandwidth="4MiB/s")


@pytest.mark.timeout(60)
def test_a_cell_past_its_time_is_stopped_and_fails(monkeypatch):
    monkeypatch.setattr(cell.Request, "timeout", lambda self: 1.0)
    t0 = time.monotonic()
    result = cell.run(cell.Request(slow_config(), "slow"))
    assert time.monotonic() - t0 < cell.STOP_GRACE
    assert result.report.status == "failed"
    assert result.report.error.startswith("the cell's process was still running after 1 s"), result.report.error
    assert cell_processes() == {}


@pytest.mark.timeout(60)
def test_a_killed_cell_is_lost_not_failed():
    """SIGKILL of the cell's own process (the OOM killer, say): no report, so the cell may run again."""
    found: list[str] = []

    def kill_it() -> None:
        end = time.monotonic() + 30
        while time.monotonic() < end:
            for p, name in cell_processes().items():
                if any(c.name() == "mig/src" for c in p.children()):  # the migration has started
                    time.sleep(0.3)
                    found.append(name)
                    p.kill()
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_it)
    killer.start()
    try:
        with pytest.raises(cell.Lost, match="the cell's process was killed by SIGKILL"):
            cell.run(cell.Request(slow_config(), "to be killed"))
    finally:
        killer.join()
    assert found == ["to be killed"]


@pytest.mark.timeout(120)
def test_a_sweep_on_a_local_cluster_is_the_sweep_run_here(capsys, tmp_path):
    """Two workers, four cells finishing in any order: the same cells in the same order, integrity
    and table shape as a local run, and every report says where it ran."""
    here, there = tmp_path / "here.json", tmp_path / "there.json"
    code, out_here, err = run_main(capsys, *SWEEP, "--json", str(here), "-q")
    assert code == 0, err
    code, out_there, err = run_main(capsys, *SWEEP, "--json", str(there), "--cluster", "local:2")
    assert code == 0, err
    assert "cluster local:2: 2 worker(s) offering the shmig resource" in err
    assert table(out_there) == table(out_here)
    a, b = json.loads(here.read_text()), json.loads(there.read_text())
    key = lambda r: (r["value"], r["mode"], r["plan"], r["report"]["config"])  # noqa: E731
    assert [key(r) for r in b] == [key(r) for r in a]
    assert all(r["report"]["integrity"]["ok"] for r in a + b)
    workers = {r["report"]["host"]["worker"] for r in b}
    assert all(w.startswith("tcp://127.0.0.1:") for w in workers)
    assert all(r["report"]["host"]["hostname"] and r["report"]["host"]["cpus"] >= 1 for r in b)
    assert cell_processes() == {}


@pytest.mark.timeout(120)
def test_a_compare_calibrates_each_row_on_its_worker(capsys, tmp_path):
    """--time-dilation auto on a cluster: the row's modes are calibrated on the worker that runs the
    cell and every report holds its factor and the calibration (both modes) it rests on."""
    js = tmp_path / "c.json"
    code, out, err = run_main(capsys, "compare", "--modes", "vanilla,preempt", "--ram", "8MiB", "--precopy-rounds",
                              "0", "--bandwidth", "200MiB/s", "--time-dilation", "auto", "--repeat", "2",
                              "--json", str(js), "--cluster", "local:2")
    assert code == 0, err
    runs = json.loads(js.read_text())
    assert [(r["mode"], r["run"]) for r in runs] == [("vanilla", 0), ("vanilla", 1), ("preempt", 0), ("preempt", 1)]
    for r in runs:
        td = r["report"]["time_dilation"]
        assert td["factor"] >= 1 and {c["mode"] for c in td["calibration"]} == {"vanilla", "preempt"}, td
        assert td["factor"] == max(c["time_dilation"] for c in td["calibration"])
        assert r["report"]["host"]["worker"]
    by_worker = {}
    for r in runs:  # a worker calibrates a row once and keeps its factor for the row's other cells
        by_worker.setdefault(r["report"]["host"]["worker"], set()).add(json.dumps(r["report"]["time_dilation"]))
    assert all(len(v) == 1 for v in by_worker.values()), by_worker
    assert "time dilation for 4KiB pages" in err  # one factor, or a warning that the workers' differ


class Killer(threading.Thread):
    """SIGKILLs the worker running a cell, ``kills[name]`` times for each name: each time the cell
    has run ``after`` s in a new process (its retry)."""

    def __init__(self, session: cluster.Session, kills: dict[str, int], after: float = 0.5):
        super().__init__(daemon=True)
        self.session, self.kills, self.after = session, dict(kills), after
        self.killed: list[tuple[str, str]] = []  # (cell, worker address)
        self.done = threading.Event()

    def run(self) -> None:
        seen: set[int] = set()
        end = time.monotonic() + 60
        while any(self.kills.values()) and time.monotonic() < end and not self.done.is_set():
            for p, name in cell_processes().items():
                if self.kills.get(name) and p.pid not in seen and time.time() - p.create_time() >= self.after:
                    worker = p.parent()
                    address = {pid: a for a, pid in self.session.client.run(os.getpid).items()}.get(
                        worker.pid if worker else -1)
                    if address is None:  # its worker is not one the scheduler lists (yet): look again
                        continue
                    seen.add(p.pid)
                    worker.kill()
                    self.kills[name] -= 1
                    self.killed.append((name, address))
            time.sleep(0.05)


@pytest.mark.timeout(240)
def test_a_killed_worker_costs_its_cell_one_retry_and_no_other_cell():
    """The case below, once more if it fails: which worker a kill lands on is the scheduler's race
    (about one run in four here misses it; noted as an open issue), the behaviour is not."""
    try:
        killed_worker_case()
    except AssertionError:
        killed_worker_case()


def killed_worker_case():
    """Cell A's worker is killed once: A runs again elsewhere and completes. Cell B's worker is
    killed, then the worker of its retry: B is reported lost, with the reason. The other cells
    complete; the killed runs left nothing behind."""
    knob = "max_postcopy_bandwidth"
    values = ["200MiB/s", "4MiB/s", "5MiB/s", "200MiB/s"]  # A = 4MiB/s and B = 5MiB/s take a few seconds
    plan = sweep.planned(knob, sweep.plan({"ram": "16MiB", "workload": "idle", "precopy_rounds": "0"}, knob,
                                          values, ["preempt"]))
    a, b = plan.runs[1].name, plan.runs[2].name
    with cluster.Session(cluster.Target.parse("local:2")) as session:
        killer = Killer(session, {a: 1, b: 2})
        killer.start()
        try:
            out = session.run(plan.runs, LiveStatus(len(plan.runs), enabled=False))
        finally:
            killer.done.set()
            killer.join()
    assert sorted(n for n, _ in killer.killed) == sorted([a, b, b])
    assert sorted(out) == [0, 1, 2, 3]
    assert out[0].ok and out[3].ok
    assert out[1].ok, out[1].error  # retried
    assert out[1].host["worker"] not in {w for n, w in killer.killed if n == a}
    assert not out[2].ok and series.is_lost(out[2])
    assert out[2].error.startswith("lost: the workers running it died 2 times (the last: tcp://"), out[2].error
    end = time.monotonic() + 20  # a killed worker's cell sees its parent gone and ends itself
    while cell_processes() and time.monotonic() < end:
        time.sleep(0.1)
    assert cell_processes() == {}


@pytest.mark.timeout(120)
def test_ctrl_c_on_a_cluster_then_resume(capsys, tmp_path, shm_leftovers):
    """Ctrl-C to a `--cluster local:2` sweep (the whole process group, as a terminal sends it): the
    runs in flight stop, the finished one is saved, exit 130, no process left; --resume on the
    cluster runs the other three (each a few seconds) and writes all four in plan order."""
    js = tmp_path / "s.json"
    argv = ["sweep", "max-postcopy-bandwidth", "1GiB/s,4MiB/s,4MiB/s,4MiB/s", "--modes", "preempt", "--ram", "16MiB",
            "--workload", "idle", "--precopy-rounds", "0", "--json", str(js), "--cluster", "local:2"]
    p = popen([sys.executable, "-m", "shmig", *argv])
    out, err = interrupt_when(p, "[1/4] preempt max-postcopy-bandwidth=1GiB/s: ok", after=1.0)
    assert p.returncode == 130, err
    assert "shmig: interrupted: 1 of 4 runs finished" in err, err
    partial = json.loads(js.read_text())
    assert [(r["value"], r["plan"]["index"]) for r in partial] == [("1GiB/s", 0)]
    assert shm_leftovers() == []

    code, out, err = run_main(capsys, *argv, "--resume", str(js))
    assert code == 0, err
    whole = json.loads(js.read_text())
    assert [(r["value"], r["plan"]["index"]) for r in whole] == [("1GiB/s", 0), ("4MiB/s", 1), ("4MiB/s", 2),
                                                                ("4MiB/s", 3)]
    assert whole[0] == partial[0] and all(r["report"]["integrity"]["ok"] for r in whole)
    assert cell_processes() == {}
