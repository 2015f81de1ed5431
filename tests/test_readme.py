"""Every code block of the README works as written: each ```python block runs on its own (a fresh
namespace, from the repository's root, as a reader would paste it), the one that shows
examples/prefetch.py is that file, and every `shmig ...` line of the ```sh blocks parses."""

from __future__ import annotations

import os
import re
import shlex

import pytest

from shmig import cli, compare, policies

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(lang: tuple[str, ...]) -> list[str]:
    with open(README) as f:
        return [body for tag, body in FENCE.findall(f.read()) if tag in lang]


def shmig_commands() -> list[str]:
    """The `shmig ...` lines of the sh/bash blocks (a trailing backslash continues a line)."""
    out = []
    for body in blocks(("sh", "bash", "console", "shell")):
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("shmig ") or line == "shmig":
                out.append(line)
    return out


def test_the_readme_has_blocks_to_check():
    assert len(blocks(("python",))) >= 3
    assert any("--policy examples.prefetch:PrefetchNeighbours" in c for c in shmig_commands())


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(ROOT)
    monkeypatch.setattr(policies, "POLICIES", dict(policies.POLICIES))
    monkeypatch.setattr(compare, "MODE_VARIANTS", dict(compare.MODE_VARIANTS))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("i", range(len(blocks(("python",)))))
def test_python_block_runs(i, registry, capsys):
    code = blocks(("python",))[i]
    exec(compile(code, f"README.md python block {i + 1}", "exec"), {"__name__": "__readme__"})


def test_the_shown_example_is_the_shipped_file():
    shown = [b for b in blocks(("python",)) if b.startswith("# examples/prefetch.py\n")]
    assert len(shown) == 1
    with open(os.path.join(ROOT, "examples", "prefetch.py")) as f:
        assert shown[0].removeprefix("# examples/prefetch.py\n").strip() in f.read()


@pytest.mark.parametrize("line", shmig_commands())
def test_shell_command_parses(line):
    argv = shlex.split(line, comments=True)[1:]
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]  # as cli.main does
    ns = cli.parser().parse_args(argv)
    assert callable(ns.func)
