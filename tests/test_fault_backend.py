"""--fault-backend and --hugetlb (issue 20): known, consistent and permitted, each refusal one line
before anything is allocated."""

from __future__ import annotations

import pytest

from shmig import uffd
from shmig.config import Config, ConfigError
from tests.test_cli import refused


def uffd_permitted() -> bool:
    return not uffd.refused()


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


@pytest.mark.skipif(uffd_permitted(), reason="userfaultfd is permitted here: nothing to refuse")
def test_uffd_not_permitted_is_refused_with_what_to_change(capsys) -> None:
    line = refused(capsys, "run", "--ram", "8MiB", "--fault-backend", "uffd")
    assert "--fault-backend uffd" in line


@pytest.mark.skipif(not uffd_permitted(), reason="userfaultfd is not permitted here")
def test_uffd_is_accepted_where_permitted() -> None:
    assert Config(ram=8 << 20, fault_backend="uffd").validate().to_dict()["fault_backend"] == "uffd"


@pytest.mark.skipif(not uffd_permitted(), reason="userfaultfd is not permitted here")
def test_hugetlb_pool_too_small_says_how_to_raise_it(capsys) -> None:
    """More 2 MiB pages than any pool here holds: the line names the sysctl and the number."""
    line = refused(capsys, "run", "--ram", "512GiB", "--host-page", "2MiB", "--fault-backend", "uffd", "--hugetlb")
    assert "nr_hugepages=" in line and "this run needs 262144" in line, line


def test_cli_hugetlb_without_uffd(capsys) -> None:
    line = refused(capsys, "run", "--ram", "8MiB", "--host-page", "2MiB", "--hugetlb")
    assert line.endswith("add --fault-backend uffd")


def test_the_uffd_backends_destination_ram_is_not_counted_in_dev_shm() -> None:
    """Its destination RAM is a memfd: one RAM copy in /dev/shm, not two (the memory check still
    counts the memfd's pages, which are memory)."""
    bitmap, uffd_ = Config(ram=64 << 20), Config(ram=64 << 20, fault_backend="uffd")
    assert bitmap.shm_bytes() - uffd_.shm_bytes() == 64 << 20
