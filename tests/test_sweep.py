"""`shmig sweep`: bad input in one line before any run; every value x mode in one table, saved and
plotted; Ctrl-C keeps the finished runs. Also the live status line, on a real terminal (a pty)."""

from __future__ import annotations

import dataclasses
import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest

from shmig import progress, sweep
from shmig.cli import CONFIG_KEYS, _compare_log
from shmig.compare import compare
from shmig.timeline import Sample

from helpers import group_reaped, interrupt
from test_cli import ENV, refused, run_main
from test_plot import png_size


@pytest.mark.parametrize("argv,text", [
    (["sweep", "frobs", "1,2"], "cannot sweep 'frobs': use one of ram, host-page"),
    (["sweep", "mode", "vanilla,preempt"], "give the modes with --modes"),
    (["sweep", "socket-buffer", "1MiB,4MiB", "--socket-buffer", "2MiB"], "--socket-buffer is what the sweep varies"),
    (["sweep", "socket-buffer", "1MiB,lots"], "--socket-buffer: cannot read 'lots'"),
    (["sweep", "socket-buffer", "1MiB,,4MiB"], "give comma-separated values"),
    (["sweep", "vcpus", "1,two"], "--vcpus: cannot read 'two' (use a whole number)"),
    (["sweep", "page-hint", "on,maybe", "--modes", "preempt-full"], "(use on or off)"),
    (["sweep", "page-hint", "on,off", "--modes", "vanilla"], "--page-hint"),  # Config.validate, per run
    (["sweep", "vcpus", "1,2", "--modes", "vanilla,bogus"], "unknown mode 'bogus' in --modes"),
    (["sweep", "ram", "16MiB,1TiB"], "use a smaller --ram"),  # the last value fails: still no run
])
def test_bad_sweeps_fail_before_any_run(capsys, argv, text):
    assert text in refused(capsys, *argv)


def test_knob_spellings():
    assert sweep.knob_name("--socket-buffer", CONFIG_KEYS) == "socket_buffer"
    assert sweep.knob_name("socket_buffer", CONFIG_KEYS) == "socket_buffer"
    assert sweep.knob_name("no-break-huge", CONFIG_KEYS) == "break_huge"
    assert sweep.knob_value("break_huge", "off") is False
    assert sweep.knob_value("zero_fraction", "0.5") == 0.5
    assert sweep.knob_value("workload", "ab") == "ab"


@pytest.mark.timeout(120)
def test_sweep_every_value_and_mode(capsys, tmp_path):
    js, png = tmp_path / "s.json", tmp_path / "s.png"
    code, out, err = run_main(capsys, "sweep", "socket-buffer", "1MiB,4MiB", "--modes", "vanilla,preempt",
                              "--ram", "16MiB", "--precopy-rounds", "0", "--bandwidth", "200MiB/s",
                              "--json", str(js), "--plot", str(png), "-q")
    assert code == 0, err
    rows = [line.split("|")[1:3] for line in out.splitlines() if line.startswith("|") and "MiB" in line]
    assert [(v.strip(), m.strip()) for v, m in rows] == [("1MiB", "vanilla"), ("1MiB", "preempt"),
                                                        ("4MiB", "vanilla"), ("4MiB", "preempt")]
    saved = json.loads(js.read_text())
    assert [(r["value"], r["mode"]) for r in saved] == [("1MiB", "vanilla"), ("1MiB", "preempt"),
                                                        ("4MiB", "vanilla"), ("4MiB", "preempt")]
    assert all(r["knob"] == "socket_buffer" and r["report"]["integrity"]["ok"] for r in saved)
    assert [r["report"]["config"]["socket_buffer"] for r in saved] == [1 << 20, 1 << 20, 4 << 20, 4 << 20]
    assert [r["report"]["config"]["mode"] for r in saved] == ["vanilla", "preempt"] * 2
    png_size(png)
    # the same table and picture again from the saved JSON
    code, again, _ = run_main(capsys, "report", str(js))
    assert code == 0 and again == out
    code, _, err = run_main(capsys, "plot", str(js), "-o", str(tmp_path / "again.png"))
    assert code == 0, err
    assert png_size(tmp_path / "again.png") == png_size(png)


@pytest.mark.timeout(120)
def test_ctrl_c_keeps_the_finished_runs(tmp_path, shm_leftovers):
    """The first run is quick, the second would take about 16 s (an idle guest, the background held
    to 1 MiB/s): Ctrl-C, sent to the whole process group as a terminal does, once the second run has
    begun, ends the sweep with the first run printed and saved, exit 130, nothing left behind."""
    js = tmp_path / "s.json"
    p = subprocess.Popen([sys.executable, "-m", "shmig", "sweep", "max-postcopy-bandwidth", "1GiB/s,1MiB/s,1GiB/s",
                          "--modes", "preempt", "--ram", "16MiB", "--workload", "idle", "--precopy-rounds", "0",
                          "--json", str(js)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                         start_new_session=True)
    with group_reaped(p):
        line = p.stderr.readline()  # no terminal: each run is announced on a line of its own
        assert line.startswith("run 1/3: preempt max-postcopy-bandwidth=1GiB/s"), line
        line = p.stderr.readline()
        assert line.startswith("run 2/3: preempt max-postcopy-bandwidth=1MiB/s"), line
        time.sleep(0.5)
        out, err = interrupt(p, timeout=60)
    assert p.returncode == 130, err
    assert "shmig: interrupted: 1 of 3 runs finished" in err
    rows = [line for line in out.splitlines() if line.startswith("|") and "GiB/s" in line]
    assert len(rows) == 1 and "ok" in rows[0]
    saved = json.loads(js.read_text())
    assert [(r["value"], r["report"]["status"]) for r in saved] == [("1GiB/s", "completed")]
    assert shm_leftovers() == []


def test_status_line_and_time_left():
    s = Sample(t_ms=1234.0, phase="postcopy", precopy_bytes=3 << 20, postcopy_bytes=1 << 20, multifd_bytes=0, remaining_pages=256,
               received_pages=0, faults_outstanding=1, guest_accesses=0, rounds=1, requests=42, faults_done=0,
               fault_p50_us=1500.0)
    line = progress.status_text(s, 100e6 / 8)
    for part in ("1.2s", "postcopy", "sent 4MiB (1MiB on the postcopy channel)", "left 1MiB", "100 Mbit/s",
                 "42 requests", "1 faults waiting", "p50 ~1.5 ms"):
        assert part in line, (part, line)
    assert "round 2" in progress.status_text(dataclasses.replace(s, phase="precopy"), None)
    ui = progress.LiveStatus(total_runs=3, enabled=False)
    with ui:
        assert ui.on_sample is None  # nothing shown: the run gets no callback at all
        ui.begin("a")
        assert ui.eta() == "time left: ?"
        ui.t_run -= 10  # the first run took 10 s
        ui.begin("b")
        assert ui.eta() == "~20s left"


@pytest.mark.timeout(60)
def test_live_status_on_a_terminal(shm_leftovers):
    """stderr a terminal: the live line shows the phase, the requests, the faults waiting and the
    p50 while the run goes, and is gone at the end; -q or a pipe shows nothing (the other tests)."""
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "shmig", "run", "--mode", "preempt", "--ram", "32MiB",
                          "--precopy-rounds", "0", "--bandwidth", "50MiB/s", "--json", os.devnull],
                         stdout=subprocess.PIPE, stderr=slave, env=dict(ENV, COLUMNS="250", TERM="xterm"))
    os.close(slave)
    screen = b""
    try:
        while True:
            r, _, _ = select.select([master], [], [], 30)
            if not r:
                break
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            screen += chunk
        out, _ = p.communicate(timeout=30)
    finally:
        os.close(master)
        if p.poll() is None:
            p.kill()
            p.wait()
    text = screen.decode(errors="replace")
    assert p.returncode == 0, text
    assert "postcopy" in text and "requests" in text and "faults waiting" in text and "p50 ~" in text
    assert "Mbit/s" in text
    assert out.startswith(b"shmig preempt: completed")


@pytest.mark.timeout(60)
def test_compare_runs_are_counted_for_the_live_line():
    """The live line learns "run i of n" from compare()'s own log lines: pin that they match."""
    ui = progress.LiveStatus(enabled=False)
    compare({"ram": "16MiB", "workload": "idle", "precopy_rounds": 0}, ["vanilla"], [4096],
            log=_compare_log(ui, quiet=True), repeat=2)
    assert (ui.index, ui.total) == (2, 2)
    assert ui.label.startswith("vanilla with 4KiB host pages")
