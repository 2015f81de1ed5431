"""Issue 22 item 1: after Migration.close every object raises a clear error, never a crash.

Before the fix ``m.link.queued(0)`` after ``wait()`` read the unmapped link state and the
interpreter died of SIGSEGV (exit 139), so the checks run in a child interpreter: a crash is an
exit code, not a lost test session.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import shmig
m = shmig.Migration(shmig.Config(ram=4 << 20, precopy_rounds=0, workload="idle")).start()
m.wait()
for name, use in (("link", lambda: m.link.queued(0)), ("memory", lambda: m.mem.link[0]),
                  ("memory src", lambda: m.mem.src[0]), ("ledger", lambda: m.ledger.source()),
                  ("recover", m.recover), ("wait", m.wait)):
    try:
        use()
    except RuntimeError as e:
        print(name, "|", e)
    else:
        print(name, "| no error")
m.close()  # idempotent
m.link.close(); m.ledger.close(); m.mem.close()
print("end")
"""


@pytest.mark.timeout(90)
def test_every_object_refuses_use_after_close():
    p = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=80)
    assert p.returncode == 0, f"exit {p.returncode}: {p.stderr[-2000:]}"
    lines = p.stdout.strip().splitlines()
    assert lines[-1] == "end"
    said = dict(line.split(" | ", 1) for line in lines[:-1])
    assert set(said) == {"link", "memory", "memory src", "ledger", "recover", "wait"}
    for name, msg in said.items():
        assert msg != "no error", f"{name} used after close raised nothing"
        assert "closed" in msg or "not running" in msg, f"{name}: unclear error {msg!r}"
