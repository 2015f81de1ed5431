"""The ``shmig`` command: usage errors, ``run``, ``compare`` and ``clean``, in-process and as a program."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys

import pytest

from shmig import cli

ENV = dict(os.environ, PYTHONUNBUFFERED="1")



def run_main(capsys, *argv):
    """cli.main in-process: (exit code, stdout, stderr); argparse's SystemExit becomes its code."""
    try:
        code = cli.main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert lines[0].startswith("shmig: error: "), lines[0]
    return lines[0]


def refused(capsys, *argv) -> str:
    """cli.main refuses ``argv`` with exit 2 and one error line (returned), prints nothing on
    stdout and has started no child process."""
    code, out, err = run_main(capsys, *argv)
    assert code == 2 and out == ""
    assert multiprocessing.active_children() == []
    return one_error_line(err)


def run_program(*argv, timeout=60):
    return subprocess.run([sys.executable, "-m", "shmig", *argv], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


# --- usage errors: exit 2, one line ----------------------------------------------------

@pytest.mark.parametrize("argv,text", [
    (["run", "--ram", "1000"], "is not a multiple of the host page 4KiB: use a multiple such as 4KiB"),
    (["--ram", "1000"], "is not a multiple of the host page"),  # `run` is the default command
    (["run", "--ram", "3MiB", "--host-page", "2MiB"], "use a multiple such as 4MiB"),
    (["run", "--bandwidth=-5MiB/s"], "--bandwidth: '-5MiB/s' is negative"),
    (["run", "--bandwidth", "-5MiB/s"], "--bandwidth: '-5MiB/s' is negative"),  # not taken for an option
    (["run", "--bandwidth", "fast"], "--bandwidth: cannot read 'fast'"),
    (["run", "--ram", "64XB"], "--ram: unknown size unit 'XB'"),
    (["run", "--latency=-1ms"], "--latency"),
    (["run", "--host-page", "8KiB"], "host page 8192 is not supported"),
    (["run", "--vcpus", "65"], "--vcpus must be between 1 and 64"),
    (["run", "--ram", "1TiB"], "use a smaller --ram"),
    (["run", "--mode", "vanilla", "--page-hint"], "--page-hint"),
    (["run", "--mode", "vanilla", "--no-break-huge"], "--no-break-huge"),
    (["run", "--socket-buffer", "4KiB"], "--socket-buffer must be at least 64KiB"),
    (["compare", "--ram", "3MiB", "--host-pages", "4KiB,2MiB"], "use a multiple such as 4MiB"),
    (["compare", "--modes", "vanilla,bogus"], "unknown mode 'bogus' in --modes"),
    (["compare", "--modes", "precopy"], "unknown mode 'precopy' in --modes"),
    (["compare", "--host-pages", "4KiB,huge"], "'huge'"),
    (["run", "--mode", "bogus"], "unknown mode 'bogus': use one of precopy, vanilla, preempt, preempt-full"),
    (["--mode", "bogus"], "unknown mode 'bogus'"),  # validated against the policy registry, not argparse
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, text):
    assert text in refused(capsys, *argv)


@pytest.mark.parametrize("argv", [
    ["run", "--vcpus", "two"],
    ["run", "--workload", "stream"],
    ["frobnicate"],
])
def test_argparse_usage_errors_exit_2(capsys, argv):
    code, out, err = run_main(capsys, *argv)
    assert code == 2
    assert "error:" in err and "usage: shmig" in err


def test_help_exits_0(capsys):
    code, out, _ = run_main(capsys, "--help")
    assert code == 0 and all(c in out for c in ("run", "compare", "sweep", "plot", "report", "clean"))
    code, out, _ = run_main(capsys, "run", "--help")
    assert code == 0 and "--bandwidth" in out and "--host-page" in out


@pytest.mark.timeout(60)
def test_bad_input_as_a_program():
    p = run_program("run", "--ram", "1000")
    assert p.returncode == 2
    assert "is not a multiple of the host page" in one_error_line(p.stderr)
    assert "Traceback" not in p.stderr
    p = run_program("--mode", "bogus")
    assert p.returncode == 2 and "unknown mode 'bogus'" in one_error_line(p.stderr)


# --- end to end -----------------------------------------------------------------------------

def check_run_json(path):
    with open(path) as f:
        rep = json.load(f)
    assert rep["status"] == "completed"
    assert rep["error"] is None
    assert rep["integrity"]["ok"] is True
    assert rep["integrity"]["pages_checked"] == 16 * 1024**2 // 4096
    assert rep["ram"]["total"] == 16 * 1024**2
    assert rep["total_time_ms"] > 0
    assert rep["downtime_ms"] is not None and rep["downtime_ms"] >= 0
    assert rep["dirty_sync_count"] >= 1
    ch = rep["ram"]["channel_bytes"]
    assert ch["precopy"] >= 0 and ch["postcopy"] == 0  # precopy: no postcopy channel
    assert rep["ram"]["transferred"] > 0
    assert rep["config"]["mode"] == "precopy" and rep["config"]["workload"] == "idle"
    return rep


@pytest.mark.timeout(60)
def test_run_precopy_in_process(capsys, tmp_path):
    path = tmp_path / "r.json"
    code, out, err = run_main(capsys, "run", "--mode", "precopy", "--ram", "16MiB", "--workload", "idle",
                              "--json", str(path), "-q")
    assert code == 0, err
    assert out == ""  # quiet
    check_run_json(path)


@pytest.mark.timeout(60)
def test_run_prints_a_summary(capsys):
    code, out, err = run_main(capsys, "--mode", "precopy", "--ram", "16MiB", "--workload", "idle")
    assert code == 0, err
    assert out.startswith("shmig precopy: completed")
    assert "integrity" in out and "ok" in out


@pytest.mark.timeout(60)
def test_run_precopy_as_a_program(tmp_path):
    path = tmp_path / "r.json"
    p = run_program("run", "--mode", "precopy", "--ram", "16MiB", "--workload", "idle", "--json", str(path), "-q")
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    check_run_json(path)


@pytest.mark.timeout(60)
def test_compare_prints_a_markdown_table(capsys, tmp_path):
    path = tmp_path / "c.json"
    code, out, err = run_main(capsys, "compare", "--ram", "16MiB", "--modes", "vanilla,preempt",
                              "--precopy-rounds", "0", "--workload", "random", "--json", str(path), "-q")
    assert code == 0, err
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("|") and "vanilla" in line)
    assert "preempt" in header and "host page" in header
    assert any(set(line) <= set("|-") and line.startswith("|-") for line in lines)  # Markdown separator
    first_cells = {line.split("|")[1].strip() for line in lines if line.startswith("|")}
    assert {"vanilla", "preempt", "4KiB"} <= first_cells  # one detailed row per mode, one 4KiB row
    with open(path) as f:
        reports = json.load(f)
    assert sorted(r["mode"] for r in reports) == ["preempt", "vanilla"]
    assert all(r["host_page"] == 4096 and r["report"]["integrity"]["ok"] for r in reports)


@pytest.mark.timeout(60)
def test_compare_with_singular_host_page(capsys):
    code, out, err = run_main(capsys, "compare", "--ram", "16MiB", "--host-page", "2MiB", "--modes", "vanilla",
                              "--precopy-rounds", "0", "--workload", "idle", "-q")
    assert code == 0, err
    assert "2MiB" in out


def test_clean_in_process(capsys):
    code, out, err = run_main(capsys, "clean")
    assert code == 0
    assert out.startswith("removed ") and "stale segment(s)" in out


@pytest.mark.timeout(60)
def test_clean_as_a_program():
    p = run_program("clean")
    assert p.returncode == 0, p.stderr
    assert "stale segment(s)" in p.stdout
