"""Issue 9, "tried as a new user would": input that is never misread, output that is never lost, a
report that never lies. Each test here failed before the change it pins. (Ctrl-C during a sweep is
tests/test_sweep.py's; it goes through the same series.run_one.)"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time

import pytest

import shmig
from shmig import cli
from shmig.compare import label_of, plan
from test_cli import ENV, one_error_line, refused, run_main
from helpers import group_reaped, interrupt
from test_teardown import session_processes, wait_until

MiB = 1024**2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--ram", "8MiB", "--workload", "idle", "--precopy-rounds", "0"]


def popen(argv: list[str]) -> subprocess.Popen:
    """A program in its own session (so that SIGINT reaches it as a terminal's Ctrl-C would)."""
    return subprocess.Popen(argv, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(ENV, PYTHONPATH=ROOT), cwd=ROOT)


def interrupt_when(p: subprocess.Popen, line_start: str, after: float = 0.3) -> tuple[str, str]:
    """SIGINT the program ``after`` s after it logs a line holding ``line_start`` on stderr;
    (stdout, stderr) once it has exited."""
    err = []
    with group_reaped(p):
        for line in p.stderr:
            err.append(line)
            if line_start in line:
                time.sleep(after)
                out, rest = interrupt(p)
                break
        else:
            out, rest = p.communicate(timeout=30)
    assert wait_until(lambda: not session_processes(p.pid), 5), session_processes(p.pid)
    return out, "".join(err) + rest


# --- output paths: checked before anything is allocated, never lost at the end ---------------

@pytest.mark.parametrize("argv,text", [
    (["run", "--json", "/nonexistent/r.json"], "--json /nonexistent/r.json: directory /nonexistent does not exist"),
    (["run", "--trace", "/nonexistent/t.json"], "--trace /nonexistent/t.json: directory /nonexistent does not exist"),
    (["run", "--json", "/tmp"], "--json /tmp is a directory"),
    (["compare", "--json", "/nonexistent/c.json"], "--json /nonexistent/c.json: directory"),
])
def test_unwritable_output_is_refused_before_the_run(capsys, monkeypatch, argv, text):
    def no_run(*args, **kwargs):
        raise AssertionError("a migration started before its output path was checked")
    monkeypatch.setattr(shmig.Migration, "start", no_run)
    assert text in refused(capsys, *argv, *TINY[:2])


@pytest.mark.timeout(60)
def test_report_kept_when_outputs_cannot_be_written(capsys):
    """/dev/full passes every check and fails on write: the report is printed, both paths named, exit 1."""
    code, out, err = run_main(capsys, "run", *TINY, "--mode", "precopy", "--json", "/dev/full",
                              "--trace", "/dev/full", "-q")
    assert code == 1
    rep = json.loads(out)
    assert rep["status"] == "completed" and rep["integrity"]["ok"]
    lines = err.strip().splitlines()
    assert len(lines) == 2 and all(x.startswith("shmig: error: ") for x in lines), err
    assert any("--json /dev/full: cannot write it" in x for x in lines)
    assert any("--trace /dev/full: cannot write it" in x for x in lines)
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode), "an output path that is a device stays one"


@pytest.mark.timeout(60)
def test_failed_run_with_quiet_prints_its_error_and_writes_its_trace(capsys, tmp_path):
    trace, rep = tmp_path / "t.json", tmp_path / "r.json"
    code, out, err = run_main(capsys, "run", "--ram", "16MiB", "--bandwidth", "4MiB/s", "--deadline", "0.5s",
                              "--trace", str(trace), "--json", str(rep), "-q")
    assert code == 1 and out == ""
    assert "deadline of 0.5s passed" in one_error_line(err)
    assert json.loads(rep.read_text())["status"] == "failed"
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name") == "setup" for e in events) and any(e["ph"] == "C" for e in events)


@pytest.mark.timeout(60)
def test_interrupted_run_writes_its_trace_and_report(tmp_path):
    trace, rep = tmp_path / "t.json", tmp_path / "r.json"
    p = popen([sys.executable, "-m", "shmig", "run", "--ram", "32MiB", "--bandwidth", "10MiB/s",
               "--trace", str(trace), "--json", str(rep), "-q"])
    with group_reaped(p):  # once the guest runs (the run then lasts seconds), as a user's Ctrl-C would come
        assert wait_until(lambda: any(": guest/vcpu0" in x for x in session_processes(p.pid)), 20)
        time.sleep(0.5)
        assert p.poll() is None
        out, err = interrupt(p)
    assert p.returncode == 130, err
    assert "interrupted" in one_error_line(err)
    assert json.loads(rep.read_text())["error"].startswith("interrupted")
    assert json.loads(trace.read_text())["traceEvents"]


# --- values: never misread -----------------------------------------------------------------

@pytest.mark.parametrize("argv,text", [
    (["--seed", "-5"], "--seed must be between 0 and 2^64-1, got -5"),
    (["--bandwidth", "0"], "--bandwidth: '0' would mean nothing moves: use 'unlimited'"),
    (["--dirty-rate", "0"], "--dirty-rate: '0' would mean nothing moves: use 'unlimited'"),
    (["--latency", "-1us"], "--latency: '-1us' is negative"),
    (["--latency=-1us"], "--latency: '-1us' is negative"),
    (["--latency", "50"], "--latency: '50' has no unit: did you mean 50us?"),
    (["--latency", "2s"], "--latency 2s is more than 1s"),
    (["--downtime-limit", "300"], "did you mean 300ms?"),
    (["--deadline", "-1s"], "--deadline: '-1s' is negative"),
    (["--ram", "-64MiB"], "--ram: '-64MiB' is negative"),
    (["--vcpus", "4", "--wss", "8KiB"], "--vcpus 4: the working set holds only 2 4KiB page(s)"),
    (["--socket-buffer", "64GiB"], "--socket-buffer must be at most 1GiB"),
])
def test_hostile_values_are_one_line_and_exit_2(capsys, argv, text):
    assert text in refused(capsys, "run", *argv)


def test_options_are_never_abbreviated(capsys):
    """``--lat`` used to be read as ``--latency``: an option added later would change its meaning."""
    code, _, err = run_main(capsys, "run", "--lat", "5us")
    assert code == 2 and "unrecognized arguments: --lat" in err


def test_help_says_how_units_read(capsys):
    code, out, _ = run_main(capsys, "run", "--help")
    text = " ".join(out.split())
    assert code == 0
    assert "64M = 64MB = 64MiB" in text and "10Gb/s = 10Gbit/s" in text and "durations need a unit" in text
    assert "0 or 'unlimited' = no limit, as in QEMU" in text and "0 is refused" in text


@pytest.mark.timeout(60)
def test_units_as_qemu_users_write_them(capsys, tmp_path):
    """``--ram 64MB`` ran 61.0MiB, ``--host-page 2M`` was refused as 2000000, ``10Gb/s`` was 10 GB/s."""
    path = tmp_path / "r.json"
    code, _, err = run_main(capsys, "run", "--mode", "precopy", "--workload", "idle", "--ram", "16MB",
                            "--host-page", "2M", "--bandwidth", "10Gb/s", "--max-bandwidth", "0",
                            "--json", str(path), "-q")
    assert code == 0, err
    c = json.loads(path.read_text())["config"]
    assert (c["ram"], c["host_page"], c["bandwidth"], c["max_bandwidth"]) == (16 * MiB, 2 * MiB, 1.25e9, None)


# --- compare: labels what ran, lists parsed one way, Ctrl-C stops it all ----------------------

def test_compare_rows_are_labelled_with_what_ran():
    cfgs = plan({"break_huge": False}, ["preempt"], [4096])
    assert list(cfgs) == [("preempt-nobreak", 4096)]
    assert not cfgs[("preempt-nobreak", 4096)][0].break_huge
    cfgs = plan({"break_huge": False}, ["preempt", "preempt-nobreak"], [4096, 2 * MiB])  # the same run: once
    assert list(cfgs) == [("preempt-nobreak", 4096), ("preempt-nobreak", 2 * MiB)]
    assert label_of(shmig.Config(mode="preempt-full", page_hint=True)) == "preempt-full-hint"
    assert label_of(shmig.Config(mode="precopy")) == "precopy"


@pytest.mark.timeout(60)
def test_compare_no_break_huge_and_spaced_lists(capsys, tmp_path):
    path = tmp_path / "c.json"
    code, out, err = run_main(capsys, "compare", *TINY, "--modes", " preempt", "--no-break-huge",
                              "--host-pages", "4KiB, 2MiB", "--json", str(path), "-q")
    assert code == 0, err
    runs = json.loads(path.read_text())
    assert [(r["mode"], r["host_page"]) for r in runs] == [("preempt-nobreak", 4096), ("preempt-nobreak", 2 * MiB)]
    assert all(r["report"]["config"]["break_huge"] is False for r in runs)
    assert "| preempt-nobreak |" in out and "| preempt |" not in out
    code, _, err = run_main(capsys, "compare", "--modes", "vanilla, bogus")
    assert code == 2 and "unknown mode 'bogus' in --modes" in one_error_line(err)
    code, _, err = run_main(capsys, "compare", "--modes", "vanilla,,preempt")
    assert code == 2 and "has an empty item" in one_error_line(err)


@pytest.mark.timeout(90)
def test_ctrl_c_stops_the_whole_compare(tmp_path):
    """One Ctrl-C: the finished run is printed and written, the others never start, exit 130."""
    path = tmp_path / "c.json"
    p = popen([sys.executable, "-m", "shmig", "compare", "--ram", "16MiB", "--bandwidth", "20MiB/s",
               "--modes", "vanilla,preempt,preempt-full", "--json", str(path)])
    out, err = interrupt_when(p, "running preempt with")
    assert p.returncode == 130, (out, err)
    assert "running preempt-full" not in err
    assert "interrupted: 1 of 3 runs finished" in err
    assert re.search(r"\|\s+vanilla \|", out), out
    runs = json.loads(path.read_text())
    assert [r["mode"] for r in runs] == ["vanilla"] and runs[0]["report"]["integrity"]["ok"]


# --- the report: never lies -------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_precopy_that_did_not_converge_says_so(capsys, tmp_path):
    path = tmp_path / "r.json"
    code, out, err = run_main(capsys, "run", "--mode", "precopy", "--ram", "16MiB", "--bandwidth", "50MiB/s",
                              "--max-rounds", "2", "--downtime-limit", "1ms", "--json", str(path))
    assert code == 0, err
    rep = json.loads(path.read_text())
    assert rep["converged"] is False and rep["precopy_rounds"] == 2
    assert out.startswith("shmig precopy: completed (did not converge)")
    line = next(x for x in out.splitlines() if x.strip().startswith("converged"))
    assert "NO: forced to stop-and-copy after 2 rounds (--max-rounds 2)" in line
    assert f"downtime {rep['downtime_ms']:.1f} ms against the 1 ms downtime-limit" in line


@pytest.mark.timeout(60)
def test_converged_is_true_or_null():
    r = shmig.run(shmig.Config(mode="precopy", ram=8 * MiB, workload="idle"))
    assert r.ok and r.converged is True
    assert re.search(r"\n  converged +yes: downtime", r.summary())  # the label column is as wide as its longest
    r = shmig.run(shmig.Config(mode="vanilla", ram=8 * MiB, workload="idle", precopy_rounds=0))
    assert r.ok and r.converged is None and "converged" not in r.summary()


@pytest.mark.timeout(60)
def test_guest_progress_counts_accesses_made_before_a_fault():
    """2MiB pages behind a slow link: a chunk of 64 accesses spans many faults. Each resolved fault
    is followed by the access that faulted, so the count can never be below the faults resolved
    (it used to read 0 after 16 faults, and the summary said "0.000x its precopy rate")."""
    r = shmig.run(shmig.Config(mode="preempt", ram=32 * MiB, host_page=2 * MiB, bandwidth=100 * MiB,
                               precopy_rounds=0, deadline=60))
    assert r.ok, r.error
    faults = r.postcopy_latency_us["count"]
    assert faults >= 4, r.postcopy_latency_us
    assert r.guest_progress["postcopy_accesses"] >= faults - 1, (r.guest_progress, faults)
    # no precopy round, so no baseline: the summary says why instead of printing a ratio
    assert r.guest_speed_ratio is None and r.guest_slowdown is None
    why = r.guest_progress["speed_ratio_unavailable"]
    assert why.startswith("no precopy baseline: the guest ran")
    assert f"speed ratio unavailable: {why}" in r.summary() and "0.000x" not in r.summary()


# --- the Python API -------------------------------------------------------------------------

def test_api_strings_point_to_from_strings():
    with pytest.raises(shmig.ConfigError, match=r"use Config.from_strings\(ram='64MiB'\)"):
        shmig.Config(ram="64MiB")
    assert cli.EXIT_INTERRUPTED == 130
