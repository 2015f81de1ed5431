"""--fault-backend and --hugetlb (issue 20): known, consistent and permitted, each refusal one line
before anything is allocated. The userfaultfd backend is not wired into runs yet, so ``uffd``
is refused after its checks (with what to change) rather than run silently as ``bitmap``."""

from __future__ import annotations

import pytest

from shmig import uffd
from shmig.config import Config, ConfigError
from shmig.uffd import UffdUnavailable
from tests.test_cli import refused


def test_bitmap_is_the_default_and_the_report_records_it() -> None:
    cfg = Config(ram=8 << 20).validate()
    assert cfg.fault_backend == "bitmap" and cfg.hugetlb is False
    assert cfg.to_dict()["fault_backend"] == "bitmap"  # Report.config is this dict


@pytest.mark.parametrize("kw, text", [
    (dict(fault_backend="kvm"), "unknown fault backend 'kvm': use one of bitmap, uffd"),
    (dict(hugetlb=True), "--hugetlb backs the destination's RAM for the userfaultfd backend: add --fault-backend uffd"),
    (dict(fault_backend="uffd", hugetlb=True), "--hugetlb needs huge host pages: add --host-page 2MiB or 1GiB"),
    (dict(fault_backend=1), "Config(fault_backend=1): fault_backend must be a string"),
])
def test_inconsistent_backend_options_are_one_line(kw: dict, text: str) -> None:
    with pytest.raises(ConfigError) as e:
        Config(ram=8 << 20, **kw).validate()
    assert str(e.value) == text


def test_uffd_is_refused_with_what_to_change(capsys) -> None:
    """Where userfaultfd is not permitted the line names what would permit it; where it is, the
    line says the backend is not wired yet. Either way no child was started (refused checks)."""
    try:
        uffd.probe()
        permitted = True
    except UffdUnavailable:
        permitted = False
    line = refused(capsys, "run", "--ram", "8MiB", "--fault-backend", "uffd")
    assert ("not wired into runs yet" in line) == permitted, line
    assert "--fault-backend" in line


def test_cli_hugetlb_without_uffd(capsys) -> None:
    line = refused(capsys, "run", "--ram", "8MiB", "--host-page", "2MiB", "--hugetlb")
    assert line.endswith("add --fault-backend uffd")
