"""Assertions the end-to-end test files share."""

from __future__ import annotations

import shmig


def assert_ok(r: shmig.Report) -> None:
    """Completed, integrity checked, and the report serialises."""
    assert r.ok, f"status={r.status} error={r.error!r} integrity={r.integrity}"
    assert r.to_json()
