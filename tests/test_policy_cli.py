"""Policies of your own from the command line: ``--policy [NAME=]module:Class``, a file path, and
packages' ``shmig.policies`` entry points; ``--mode``/``--modes`` accept what is registered."""

from __future__ import annotations

import json
import os

import pytest

from shmig import compare, policies
from shmig.policies import load_entry_points, load_policy

from test_cli import one_error_line, run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--ram", "16MiB", "--precopy-rounds", "0", "--workload", "sequential", "--max-postcopy-bandwidth",
         "16MiB/s", "-q"]


@pytest.fixture(autouse=True)
def registry(monkeypatch):
    """Every test starts from the built-in modes and leaves them so (the registry is per process)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(policies, "POLICIES", dict(policies.POLICIES))
    monkeypatch.setattr(compare, "MODE_VARIANTS", dict(compare.MODE_VARIANTS))
    import shmig.cli
    monkeypatch.setattr(shmig.cli, "MODE_VARIANTS", compare.MODE_VARIANTS)


@pytest.mark.timeout(120)
def test_compare_runs_the_readme_policy_beside_qemus_modes(capsys, tmp_path):
    js = tmp_path / "c.json"
    code, out, err = run_main(capsys, "compare", "--modes", "vanilla,preempt-full,prefetch",
                              "--policy", "examples.prefetch:PrefetchNeighbours", *SMALL, "--json", str(js))
    assert code == 0, err
    header = next(line for line in out.splitlines() if line.startswith("| host page"))
    assert [c.strip() for c in header.split("|")[2:5]] == ["vanilla", "preempt-full", "prefetch"]
    saved = json.loads(js.read_text())
    assert [r["mode"] for r in saved] == ["vanilla", "preempt-full", "prefetch"]
    assert all(r["report"]["integrity"]["ok"] for r in saved)
    assert saved[2]["report"]["config"]["mode"] == "prefetch"


@pytest.mark.timeout(60)
def test_run_a_policy_from_a_file_under_a_name_of_your_own(capsys, tmp_path):
    js = tmp_path / "r.json"
    code, _, err = run_main(capsys, "run", "--mode", "pf8", "--policy", "pf8=examples/prefetch.py:PrefetchNeighbours",
                            *SMALL, "--json", str(js))
    assert code == 0, err
    rep = json.loads(js.read_text())
    assert rep["config"]["mode"] == "pf8" and rep["integrity"]["ok"]


@pytest.mark.timeout(60)
def test_entry_points_register_themselves(capsys, tmp_path, monkeypatch):
    """An installed package declaring `[project.entry-points."shmig.policies"]` (its dist-info on the
    path, as pip leaves it): the mode is there for --mode without any --policy."""
    info = tmp_path / "shmig_prefetch_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: shmig-prefetch-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[shmig.policies]\nprefetch-ep = examples.prefetch:PrefetchNeighbours\n"
                                           "broken = examples.prefetch:NoSuchClass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, _, err = run_main(capsys, "run", "--mode", "prefetch-ep", *SMALL)
    assert code == 0, err
    # a broken plugin warns in one line and does not stop the command
    assert err.strip().startswith("shmig: warning: entry point broken = examples.prefetch:NoSuchClass")
    names, problems = load_entry_points()
    assert "prefetch-ep" in names and len(problems) == 1


@pytest.mark.parametrize("spec,text", [
    ("nosuchmodule:X", "cannot import 'nosuchmodule': ModuleNotFoundError"),
    ("examples.prefetch:Nope", "module 'examples.prefetch' has no 'Nope'"),
    ("examples/nofile.py:X", "no such file 'examples/nofile.py'"),
    ("examples.prefetch", "use module:Class"),
    ("os:getcwd", "is not a shmig policy: it lacks (it is not a class)"),
    ("shmig.policies:PreemptFull", "mode name 'preempt-full' is a built-in mode"),
    ("vanilla=examples.prefetch:PrefetchNeighbours", "mode name 'vanilla' is a built-in mode"),
])
def test_bad_policies_are_one_line(capsys, spec, text):
    code, out, err = run_main(capsys, "run", "--policy", spec, "--ram", "16MiB")
    assert code == 2
    assert text in one_error_line(err)


def test_one_name_two_classes_is_refused(capsys):
    assert load_policy("examples.prefetch:PrefetchNeighbours") == "prefetch"
    assert load_policy("examples.prefetch:PrefetchNeighbours") == "prefetch"  # the same class again: fine
    code, _, err = run_main(capsys, "run", "--policy", "prefetch=tests/test_policy_cli.py:Other", "--ram", "16MiB")
    assert code == 2 and "mode name 'prefetch' is already taken" in one_error_line(err)


def test_unknown_modes_name_the_registered_ones(capsys):
    code, _, err = run_main(capsys, "compare", "--modes", "vanilla,prefetch", "--ram", "16MiB")
    assert code == 2 and "unknown mode 'prefetch' in --modes" in one_error_line(err)
    code, _, err = run_main(capsys, "run", "--mode", "prefetchh", "--policy", "examples.prefetch:PrefetchNeighbours")
    assert code == 2
    assert "unknown mode 'prefetchh': use one of precopy, vanilla, preempt, preempt-full, prefetch" in one_error_line(err)


class Other(policies.PreemptFull):
    """A second class, to collide with the example's name."""
