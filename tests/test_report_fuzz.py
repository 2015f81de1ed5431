"""Hostile or damaged saved reports: ``shmig report`` and ``shmig plot`` answer with one line and
exit 2, or read the file; never a traceback (issue 22, item 4). The cases the issue found, then
hypothesis: arbitrary JSON, and a real report mutated (keys dropped, types swapped, numbers made
huge, negative or not finite)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shmig
from shmig import cli
from shmig.stats import BUCKETS


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One small real run's JSON (a postcopy run with faults, a timeline, phases)."""
    rep = shmig.run(shmig.Config(ram=8 << 20, precopy_rounds=0, vcpus=2, mode="preempt-full"))
    assert rep.ok
    return rep.to_dict()


def outcome(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """The exit code and what went to stderr; any exception is the test's failure."""
    capsys.readouterr()
    code = cli.main(args)
    return code, capsys.readouterr().err


def assert_refused_or_read(path: Path, tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["report", str(path)], ["report", "--dist", str(path)], ["plot", "-o", str(tmp / "p.png"), str(path)]):
        code, err = outcome(args, capsys)
        assert code in (0, 2), (args, code, err)
        if code == 2:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("shmig: error: "), err
            assert "Traceback" not in err


def write(tmp: Path, doc: Any, raw: str | None = None) -> Path:
    p = tmp / "r.json"
    p.write_text(raw if raw is not None else json.dumps(doc))
    return p


def refused(path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    code, err = outcome(["report", *args, str(path)], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("shmig: error: "), err
    return err


def test_the_issues_cases_are_one_line_each(real: dict[str, Any], tmp_path: Path, capsys) -> None:
    assert "nested too deeply" in refused(write(tmp_path, None, "[" * 100000), capsys)
    assert "config: the key 'mode' is missing" in refused(write(tmp_path, {"status": "completed", "config": {}, "total_time_ms": 1}),
                                         capsys)
    alone = dict(real, integrity={"ok": True})
    assert "integrity: the key 'pages_checked' is missing" in refused(write(tmp_path, alone), capsys)
    long = dict(real, postcopy_latency_dist=[1] * 20000)
    assert f"more than the {BUCKETS}" in refused(write(tmp_path, long), capsys, "--dist")
    entry = [{"mode": "vanilla", "knob": "vcpus", "value": "1", "report": real}]
    assert "runs[0]: the key 'host_page' is missing" in refused(write(tmp_path, entry), capsys)
    inf = dict(real, total_time_ms=math.inf)
    assert "total_time_ms: expected a finite number" in refused(write(tmp_path, inf), capsys)
    far = dict(real, faults={"npz": "../../etc/passwd.npz", "run": "r0", "count": 1})
    assert "a file name beside the report" in refused(write(tmp_path, far), capsys)
    huge = dict(real, faults={"t_ms": [1.0], "latency_us": [2.0], "vcpu": [2**70]})  # OverflowError before
    assert "faults.vcpu[0]: expected a vCPU number" in refused(write(tmp_path, huge), capsys)
    gone = dict(real, faults={"npz": "missing.faults.npz", "run": "r0", "count": 1})
    assert "keep the .faults.npz beside the JSON file" in refused(write(tmp_path, gone), capsys)


def test_a_real_report_still_reads(real: dict[str, Any], tmp_path: Path, capsys) -> None:
    code, err = outcome(["report", "--dist", str(write(tmp_path, real))], capsys)
    assert code == 0, err


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children,
                                                                                    max_size=4), max_leaves=20)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=JSON)
def test_arbitrary_json_is_refused_or_read(doc: Any, tmp_path: Path, capsys) -> None:
    assert_refused_or_read(write(tmp_path, doc), tmp_path, capsys)


SWAPS = [None, True, -1, 2**70, 1e308, math.nan, "x", [], {}, [1, "a"], {"a": None}]


@st.composite
def mutated(draw: Any, base: dict[str, Any]) -> Any:
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 4))):
        # walk down to some container, then drop or replace one of its items
        node, path = doc, []
        while True:
            items = list(node.items()) if isinstance(node, dict) else list(enumerate(node)) if isinstance(node, list) else []
            if not items:
                break
            k, v = items[draw(st.integers(0, len(items) - 1))]
            if not isinstance(v, (dict, list)) or not v or draw(st.booleans()):
                path.append(k)
                break
            node = v
        if not path:
            continue
        k = path[-1]
        if isinstance(node, dict) and draw(st.booleans()):
            del node[k]
        else:
            node[k] = copy.deepcopy(draw(st.sampled_from(SWAPS)))  # a later step may walk into it: never SWAPS itself
    return doc


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_mutated_real_report_is_refused_or_read(real: dict[str, Any], data: Any, tmp_path: Path, capsys) -> None:
    doc = data.draw(mutated(real))
    if data.draw(st.booleans()):  # as a compare entry
        doc = [{"mode": "preempt-full", "host_page": 4096, "report": doc}]
    assert_refused_or_read(write(tmp_path, doc), tmp_path, capsys)


@pytest.mark.timeout(120)
def test_a_sweep_without_faults_plots(tmp_path: Path, capsys) -> None:
    """A real precopy sweep has no fault latency: its figure has no log axis to draw (a ValueError
    from matplotlib before; found by a helper's fuzzing)."""
    js = tmp_path / "s.json"
    code, err = outcome(["sweep", "vcpus", "1,2", "--modes", "precopy", "--ram", "4MiB", "--json", str(js), "-q"], capsys)
    assert code == 0, err
    code, err = outcome(["plot", "-o", str(tmp_path / "s.png"), str(js)], capsys)
    assert code == 0 and (tmp_path / "s.png").stat().st_size > 0, err
