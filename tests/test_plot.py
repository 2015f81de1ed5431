"""`shmig plot`, `compare --plot` and `shmig report`: pictures and summaries drawn from saved JSON.

Real runs write the JSON once per module; every picture is then drawn from those files, as a user
would from CI's reports.
"""

from __future__ import annotations

import json
import subprocess
import sys

import matplotlib.image
import pytest

from shmig import Report
from shmig.stats import BUCKETS

from test_cli import ENV, one_error_line, run_main

SMALL = ["--ram", "16MiB", "--precopy-rounds", "0", "--workload", "random", "--bandwidth", "200MiB/s"]


def png_size(path) -> tuple[int, int]:
    """(height, width) of a real PNG: matplotlib must be able to read it back."""
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(str(path))
    return img.shape[0], img.shape[1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One `run --json` and one `compare --json --plot` of two modes (real migrations)."""
    d = tmp_path_factory.mktemp("saved")
    out = {}
    for name, argv in (("run", ["run", "--mode", "preempt", *SMALL, "--json", str(d / "run.json")]),
                       ("compare", ["compare", "--modes", "vanilla,preempt", *SMALL, "--json",
                                    str(d / "compare.json"), "--plot", str(d / "compare.png")])):
        p = subprocess.run([sys.executable, "-m", "shmig", *argv], capture_output=True, text=True, timeout=90,
                           env=ENV)
        assert p.returncode == 0, p.stderr
        out[name] = p.stdout
    return d, out


@pytest.mark.timeout(120)
def test_compare_plot_writes_a_png(saved):
    d, _ = saved
    h, w = png_size(d / "compare.png")
    assert w > 1000 and h > 300


@pytest.mark.timeout(120)
def test_run_report_has_faults_and_phases(saved):
    d, _ = saved
    rep = json.loads((d / "run.json").read_text())
    faults = rep["faults"]
    assert set(faults) == {"t_ms", "latency_us", "vcpu"}  # columns, one entry per fault
    t = faults["t_ms"]
    assert len(t) == len(faults["latency_us"]) == len(faults["vcpu"]) == rep["postcopy_latency_us"]["count"] > 0
    assert t == sorted(t) and min(faults["latency_us"]) >= 0 and set(faults["vcpu"]) == {0}
    assert max(faults["latency_us"]) == pytest.approx(rep["postcopy_latency_us"]["max"], abs=0.2)
    names = [p[0] for p in rep["phases"]]
    assert names == ["setup", "precopy", "switchover", "postcopy"]
    assert all(a <= b for _, a, b in rep["phases"])
    # the live figures the status line shows, in every sample
    last = rep["timeline"][-1]
    assert last["requests"] == rep["postcopy_requests"]
    assert last["faults_done"] == len(t)
    assert last["fault_p50_us"] > 0


@pytest.mark.timeout(120)
def test_plot_one_run_adds_its_timeline(saved, capsys, tmp_path):
    d, _ = saved
    code, out, err = run_main(capsys, "plot", str(d / "run.json"), "-o", str(tmp_path / "run.png"))
    assert code == 0, err
    assert out.strip() == f"wrote {tmp_path / 'run.png'}"
    h_run, _ = png_size(tmp_path / "run.png")
    h_cmp, _ = png_size(d / "compare.png")
    assert h_run > 2 * h_cmp  # the latency row, plus the two rows of its timeline


@pytest.mark.timeout(120)
def test_plot_several_files_and_old_reports(saved, capsys, tmp_path):
    """Several files in one picture; a report without the per-fault list and phases (an older
    version's) still plots, its CDF drawn from the buckets."""
    d, _ = saved
    old = json.loads((d / "run.json").read_text())
    del old["faults"], old["phases"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    code, _, err = run_main(capsys, "plot", str(d / "compare.json"), str(tmp_path / "old.json"),
                            "-o", str(tmp_path / "all.png"))
    assert code == 0, err
    png_size(tmp_path / "all.png")
    code, _, err = run_main(capsys, "plot", str(tmp_path / "old.json"), "-o", str(tmp_path / "old.png"))
    assert code == 0, err
    png_size(tmp_path / "old.png")


@pytest.mark.timeout(120)
def test_a_plot_that_fails_midway_leaves_the_last_picture(saved, capsys, tmp_path, monkeypatch):
    """Issue 22 item 12: a full disk while the picture is written leaves the previous one whole
    (savefig used to write the target in place) and no temporary file beside it."""
    import errno

    import matplotlib.figure
    d, _ = saved
    out = tmp_path / "run.png"
    code, _, err = run_main(capsys, "plot", str(d / "run.json"), "-o", str(out))
    assert code == 0, err
    good = out.read_bytes()

    def disk_full(self, fname, **kw):
        (open(fname, "wb") if isinstance(fname, str) else fname).write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", disk_full)
    with pytest.raises(OSError):
        run_main(capsys, "plot", str(d / "run.json"), "-o", str(out))
    assert out.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.png"]


@pytest.mark.timeout(120)
def test_report_prints_what_the_run_printed(saved, capsys):
    d, printed = saved
    code, out, err = run_main(capsys, "report", str(d / "run.json"))
    assert code == 0, err
    assert out == printed["run"]
    code, out, err = run_main(capsys, "report", str(d / "compare.json"))
    assert code == 0, err
    assert out == printed["compare"]
    code, out, _ = run_main(capsys, "report", str(d / "run.json"), "--dist")
    assert "Postcopy Latency Distribution:" in out


def test_report_round_trip():
    r = Report(status="completed", config={"mode": "vanilla"}, faults=[[1.0, 2.0, 0]])
    d = r.to_dict()
    assert Report.from_dict(d) == r
    assert Report.from_dict({**d, "a_key_from_a_newer_version": 1}) == r
    assert len(Report.from_dict({"status": "failed", "config": {}}).postcopy_latency_dist) == BUCKETS


@pytest.mark.parametrize("content,text", [
    (None, "cannot read"),
    ("not json", "is not JSON"),
    ('{"a": 1}', "is not a shmig report"),
    ("[]", "holds no runs"),
])
def test_bad_report_files_are_one_line(capsys, tmp_path, content, text):
    path = tmp_path / "r.json"
    if content is not None:
        path.write_text(content)
    for argv in (["report", str(path)], ["plot", str(path), "-o", str(tmp_path / "x.png")]):
        code, out, err = run_main(capsys, *argv)
        assert code == 2 and text in one_error_line(err)
    assert not (tmp_path / "x.png").exists()


def test_bad_plot_output_fails_before_any_run(capsys, tmp_path):
    code, _, err = run_main(capsys, "compare", "--ram", "16MiB", "--plot", str(tmp_path / "no" / "p.png"))
    assert code == 2 and "does not exist" in one_error_line(err)
    code, _, err = run_main(capsys, "compare", "--ram", "16MiB", "--plot", str(tmp_path / "p.txt"))
    assert code == 2 and "use a .png" in one_error_line(err)


@pytest.mark.timeout(60)
def test_without_matplotlib_one_line(tmp_path):
    """The `plot` extra not installed: one line saying how to get it, exit 2, no run started."""
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from shmig import cli\n"
            f"sys.exit(cli.main(['compare', '--ram', '16MiB', '--plot', {str(tmp_path / 'p.png')!r}]))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=ENV)
    assert p.returncode == 2
    assert "pip install 'shmig[plot]'" in one_error_line(p.stderr)
    assert p.stdout == ""
