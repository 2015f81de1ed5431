"""What every benchmark suite shares.

* ``quick``: True when pytest-benchmark is disabled (``--benchmark-disable``, which is how the
  project's normal test command ``python -m pytest tests bench --benchmark-disable`` runs this
  directory). Suites then use small sizes and one round, so the whole of bench/ stays well under a
  minute on two cores and CI proves every suite works. ``pytest bench/`` runs the full sizes.
* ``--shmig-big`` (or ``SHMIG_BIG=1``): also run the 4 GiB-guest scale benchmark (~9 GiB of /dev/shm).
* ``record``: puts figures into ``benchmark.extra_info`` (what ``--benchmark-json`` and
  ``--benchmark-save`` keep) and lists chosen ones in a table at the end of the run; with
  ``--benchmark-compare`` the compared run's figures are shown on the line under each benchmark's,
  so two runs can be read side by side (pytest-benchmark's own table compares only wall times).
* After every benchmark: no shmig segment of this process left in /dev/shm, no child left alive.
"""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest

import shmig.memory

_FIGURES = pytest.StashKey[list]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("shmig", "shmig benchmarks")
    group.addoption("--shmig-big", action="store_true", default=False,
                    help="also run the 4GiB-guest scale benchmark (needs ~9GiB of /dev/shm and a few"
                         " minutes); SHMIG_BIG=1 does the same")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_FIGURES] = []


def is_quick(config: pytest.Config) -> bool:
    if config.getoption("benchmark_disable", default=False):
        return True
    bs = getattr(config, "_benchmarksession", None)  # also disabled under xdist
    return bool(getattr(bs, "disabled", False))


@pytest.fixture
def quick(request: pytest.FixtureRequest) -> bool:
    """Small sizes and one round (benchmarks disabled: the CI run); full sizes otherwise."""
    return is_quick(request.config)


@pytest.fixture
def big(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("shmig_big", default=False)) or os.environ.get("SHMIG_BIG") == "1"


@pytest.fixture(autouse=True)
def _nothing_left_behind():
    yield
    for p in multiprocessing.active_children():
        p.join(5)
    alive = [f"{p.name} (pid {p.pid})" for p in multiprocessing.active_children()]
    mine = f"{shmig.memory.PREFIX}{os.getpid()}-"  # other programs may run shmig meanwhile
    left = [n for n in shmig.memory.leftovers() if n.startswith(mine)]
    assert not alive, f"child processes left alive after the benchmark: {alive}"
    assert not left, f"/dev/shm segments left behind after the benchmark: {left}"


class Recorder:
    def __init__(self, benchmark: Any):
        self.benchmark = benchmark
        self.shown: list[str] = []

    def __call__(self, show: tuple[str, ...] | list[str] = (), **figures: Any) -> None:
        """Add ``figures`` to extra_info; the keys in ``show`` go into the end-of-run table."""
        self.benchmark.extra_info.update(figures)
        self.shown += [k for k in show if k not in self.shown]


@pytest.fixture
def record(benchmark: Any, request: pytest.FixtureRequest):
    rec = Recorder(benchmark)
    yield rec
    if rec.shown:
        request.config.stash[_FIGURES].append({
            "group": benchmark.group or "-", "name": benchmark.name, "fullname": benchmark.fullname,
            "shown": rec.shown, "extra_info": dict(benchmark.extra_info)})


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.0f}"
    return str(v)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    rows = config.stash.get(_FIGURES, [])
    if not rows:
        return
    bs = getattr(config, "_benchmarksession", None)
    compared = getattr(bs, "compared_mapping", None) or {}
    tr = terminalreporter
    tr.section("shmig benchmark figures" + (" (quick sizes)" if is_quick(config) else ""), sep="-")
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    for group, items in sorted(groups.items()):
        cols: list[str] = []
        for r in items:
            cols += [k for k in r["shown"] if k not in cols]
        table = [["benchmark", "run", *cols]]
        for r in items:
            table.append([r["name"], "now", *(_fmt(r["extra_info"].get(c)) for c in cols)])
            for path, mapping in compared.items():
                old = mapping.get(r["fullname"])
                if old is not None:
                    info = old.get("extra_info", {})
                    table.append(["", Path(str(path)).stem[:4], *(_fmt(info.get(c)) for c in cols)])
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        tr.write_line(f"group {group}:")
        for row in table:
            tr.write_line("  " + "  ".join(c.rjust(w) if i > 1 else c.ljust(w)
                                           for i, (c, w) in enumerate(zip(row, widths))))
