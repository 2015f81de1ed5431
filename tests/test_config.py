"""shmig.config: validation before anything is allocated, with one actionable line per mistake."""

from __future__ import annotations

import multiprocessing
import os

import pytest

import shmig
from shmig.config import HOST_PAGES, MODES, WORKLOADS, Config, ConfigError
from shmig.memory import leftovers
from shmig.units import fmt_size

KiB, MiB, GiB, TiB = 1024, 1024**2, 1024**3, 1024**4



def mine() -> list[str]:
    return [n for n in leftovers() if n.startswith(f"shmig-{os.getpid()}-")]


def small(**kw) -> Config:
    base = dict(ram=16 * MiB)
    base.update(kw)
    return Config(**base)


def error_of(cfg: Config) -> str:
    with pytest.raises(ConfigError) as ei:
        cfg.validate()
    msg = str(ei.value)
    assert msg and "\n" not in msg, f"not one line: {msg!r}"
    return msg


# --- valid configurations ------------------------------------------------------------

def test_defaults_validate():
    cfg = Config()
    assert cfg.validate() is cfg
    assert cfg.mode == "preempt" and cfg.host_page == 4096 and cfg.bandwidth is None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("workload", WORKLOADS)
def test_every_mode_and_workload_validates(mode, workload):
    small(mode=mode, workload=workload).validate()


@pytest.mark.parametrize("host_page", HOST_PAGES)
def test_supported_host_pages(host_page):
    cfg = small(ram=max(16 * MiB, host_page), host_page=host_page).validate()
    assert cfg.tp_per_hp == host_page // 4096
    assert cfg.nhost * host_page == cfg.ram
    assert cfg.npages * 4096 == cfg.ram


def test_edge_values_validate():
    small(vcpus=1).validate()
    small(vcpus=64).validate()
    small(zero_fraction=0.0).validate()
    small(zero_fraction=1.0).validate()
    small(socket_buffer=64 * KiB).validate()
    small(wss=16 * MiB).validate()
    small(wss=4096).validate()
    small(precopy_rounds=0).validate()
    small(precopy_rounds=None).validate()
    small(mode="preempt", break_huge=False).validate()
    small(mode="preempt-full", page_hint=True).validate()
    small(bandwidth=1.25e9, max_bandwidth=1e8, max_postcopy_bandwidth=1e8, dirty_rate=1e6).validate()


def test_derived_properties():
    cfg = Config(ram=64 * MiB, host_page=2 * MiB, mode="vanilla")
    assert (cfg.npages, cfg.nhost, cfg.tp_per_hp) == (16384, 32, 512)
    assert cfg.wss_bytes == 64 * MiB
    assert cfg.postcopy and not cfg.uses_preempt_channel
    assert not Config(mode="precopy").postcopy
    assert Config(mode="preempt-full").uses_preempt_channel
    assert Config(wss=8 * MiB).wss_bytes == 8 * MiB
    # two RAM copies plus the per-page maps
    assert cfg.shm_bytes() >= 2 * cfg.ram + cfg.npages * (4 + 1 + 8)


def test_to_dict():
    d = small(extra={"label": "x"}).to_dict()
    assert d["ram"] == 16 * MiB and d["extra"] == {"label": "x"} and d["mode"] == "preempt"


# --- one line per mistake ------------------------------------------------------------

@pytest.mark.parametrize("ram,host_page,suggest", [
    (3 * MiB, 2 * MiB, "4MiB"),
    (1000, 4096, "4KiB"),
    (16 * MiB + 4096, 2 * MiB, "18MiB"),
    (GiB + 2 * MiB, GiB, "2GiB"),
])
def test_ram_not_a_multiple_of_the_host_page(ram, host_page, suggest):
    msg = error_of(Config(ram=ram, host_page=host_page))
    assert "--ram" in msg
    assert f"host page {fmt_size(host_page)}" in msg
    assert f"use a multiple such as {suggest}" in msg


def test_unknown_mode():
    msg = error_of(small(mode="bogus"))
    assert "'bogus'" in msg
    for m in MODES:
        assert m in msg


def test_unknown_workload():
    msg = error_of(small(workload="stream"))
    assert "'stream'" in msg
    for w in WORKLOADS:
        assert w in msg


@pytest.mark.parametrize("host_page", [8 * KiB, 1 * MiB, 4 * MiB, 0, 2048])
def test_unsupported_host_page(host_page):
    msg = error_of(small(host_page=host_page))
    assert str(host_page) in msg
    assert "4KiB" in msg and "2MiB" in msg and "1GiB" in msg


@pytest.mark.parametrize("ram", [0, -4096, -1])
def test_non_positive_ram(ram):
    msg = error_of(Config(ram=ram))
    assert "--ram must be positive" in msg


@pytest.mark.parametrize("name", ["bandwidth", "max_bandwidth", "max_postcopy_bandwidth", "dirty_rate"])
@pytest.mark.parametrize("value", [-5 * MiB, 0, 0.0])
def test_non_positive_rates(name, value):
    msg = error_of(small(**{name: value}))
    assert f"--{name.replace('_', '-')} must be positive" in msg
    assert "unlimited" in msg


def test_wss_larger_than_ram():
    msg = error_of(small(wss=32 * MiB))
    assert "--wss 32MiB" in msg and "--ram 16MiB" in msg


@pytest.mark.parametrize("wss", [0, -4096])
def test_wss_not_positive(wss):
    assert "--wss" in error_of(small(wss=wss))


def test_wss_smaller_than_a_page_per_vcpu():
    assert "one 4KiB page per vCPU" in error_of(small(wss=4096, vcpus=2))


@pytest.mark.parametrize("vcpus", [0, -1, 65, 1000])
def test_vcpus_out_of_range(vcpus):
    msg = error_of(small(vcpus=vcpus))
    assert "--vcpus must be between 1 and 64" in msg


@pytest.mark.parametrize("zf", [-0.1, 1.01, 2, float("nan")])
def test_zero_fraction_out_of_range(zf):
    assert "--zero-fraction must be between 0 and 1" in error_of(small(zero_fraction=zf))


def test_negative_latency():
    assert "--latency must not be negative" in error_of(small(latency=-1e-6))


@pytest.mark.parametrize("sb", [0, 4096, 64 * KiB - 1])
def test_socket_buffer_too_small(sb):
    assert "--socket-buffer must be at least 64KiB" in error_of(small(socket_buffer=sb))


@pytest.mark.parametrize("kw,text", [
    ({"downtime_limit": 0}, "--downtime-limit must be positive"),
    ({"max_rounds": 0}, "--max-rounds must be at least 1"),
    ({"precopy_rounds": -1}, "--precopy-rounds must be 0 or more"),
    ({"deadline": 0}, "--deadline must be positive"),
    ({"deadline": -3}, "--deadline must be positive"),
])
def test_other_limits(kw, text):
    assert text in error_of(small(**kw))


@pytest.mark.parametrize("mode", ["precopy", "vanilla", "preempt"])
def test_page_hint_needs_preempt_full(mode):
    msg = error_of(small(mode=mode, page_hint=True))
    assert "--page-hint" in msg and "--mode preempt-full" in msg


@pytest.mark.parametrize("mode", ["precopy", "vanilla", "preempt-full"])
def test_no_break_huge_needs_preempt(mode):
    msg = error_of(small(mode=mode, break_huge=False))
    assert "--no-break-huge" in msg and "--mode preempt" in msg


def test_ram_larger_than_free_dev_shm():
    msg = error_of(Config(ram=TiB))
    assert "--ram 1TiB" in msg
    assert "/dev/shm" in msg
    assert "use a smaller --ram" in msg


def test_ram_beyond_32_bit_page_numbers():
    assert "--ram must be below 16TiB" in error_of(Config(ram=16 * TiB))


# --- from_strings --------------------------------------------------------------------

def test_from_strings_converts_units():
    cfg = Config.from_strings(ram="64MiB", host_page="2MiB", wss="8MiB", socket_buffer="10MiB",
                              bandwidth="10Gbit/s", max_bandwidth="100MiB/s", max_postcopy_bandwidth="1GB/s",
                              dirty_rate="50MB/s", latency="50us", downtime_limit="300ms", deadline="2min",
                              mode="preempt-full", workload="hotset", vcpus=2, seed=9, zero_fraction=0.5)
    assert cfg.ram == 64 * MiB and cfg.host_page == 2 * MiB and cfg.wss == 8 * MiB
    assert cfg.socket_buffer == 10 * MiB
    assert cfg.bandwidth == pytest.approx(1.25e9)
    assert cfg.max_bandwidth == 100 * MiB
    assert cfg.max_postcopy_bandwidth == GiB  # GB is binary, as QEMU reads its sizes
    assert cfg.dirty_rate == 50 * MiB
    assert cfg.latency == pytest.approx(50e-6)
    assert cfg.downtime_limit == pytest.approx(0.3)
    assert cfg.deadline == 120.0
    assert (cfg.mode, cfg.workload, cfg.vcpus, cfg.seed, cfg.zero_fraction) == ("preempt-full", "hotset", 2, 9, 0.5)
    cfg.validate()


def test_from_strings_none_means_default():
    cfg = Config.from_strings(ram=None, bandwidth=None, mode=None)
    assert cfg == Config()


def test_from_strings_unlimited_bandwidth():
    assert Config.from_strings(bandwidth="unlimited").bandwidth is None
    assert Config.from_strings(dirty_rate="unlimited").dirty_rate is None


@pytest.mark.parametrize("name", ["max_bandwidth", "max_postcopy_bandwidth"])
@pytest.mark.parametrize("value", ["0", 0, "0MiB/s"])
def test_from_strings_zero_qemu_limits_are_unlimited(name, value):
    """QEMU's max-bandwidth and max-postcopy-bandwidth read 0 as "no limit": so do we."""
    assert getattr(Config.from_strings(**{name: value}), name) is None


@pytest.mark.parametrize("name", ["bandwidth", "dirty_rate"])
@pytest.mark.parametrize("value", ["0", 0, "0Gbit/s"])
def test_from_strings_zero_link_or_dirty_rate_is_refused(name, value):
    """Our emulated link and the guest's dirty rate have no QEMU convention: 0 would silently mean
    the opposite of what it says, so it is refused with a line pointing at 'unlimited'."""
    with pytest.raises(ConfigError) as ei:
        Config.from_strings(**{name: value})
    msg = str(ei.value)
    assert msg.startswith(f"--{name.replace('_', '-')}: ") and "'unlimited'" in msg and "\n" not in msg


@pytest.mark.parametrize("key,value,meant", [
    ("latency", "50", "50us"), ("downtime_limit", "300", "300ms"), ("deadline", "60", "60s")])
def test_from_strings_duration_without_unit(key, value, meant):
    with pytest.raises(ConfigError) as ei:
        Config.from_strings(**{key: value})
    assert f"did you mean {meant}?" in str(ei.value)


def test_from_strings_reads_whole_numbers_and_refuses_unknown_options():
    assert Config.from_strings(vcpus="2", seed="7", precopy_rounds="0").vcpus == 2
    with pytest.raises(ConfigError, match="--vcpus: cannot read 'two'"):
        Config.from_strings(vcpus="two")
    with pytest.raises(ConfigError, match="unknown option 'rams'"):
        Config.from_strings(rams="64MiB")


# --- the Python API: field types ---------------------------------------------------

@pytest.mark.parametrize("kw,text", [
    ({"ram": "64MiB"}, "Config.from_strings(ram='64MiB')"),
    ({"bandwidth": "10Gbit/s"}, "Config.from_strings(bandwidth='10Gbit/s')"),
    ({"latency": "50us"}, "Config.from_strings(latency='50us')"),
    ({"vcpus": 1.5}, "vcpus must be a whole number"),
    ({"vcpus": True}, "vcpus must be a whole number"),
    ({"seed": None}, "seed must be a whole number"),
    ({"mode": 3}, "mode must be a string"),
    ({"break_huge": "no"}, "break_huge must be True or False"),
    ({"wss": "8MiB"}, "wss must be a whole number or None"),
])
def test_field_types_are_checked_with_one_line(kw, text):
    """Config(ram="64MiB") used to raise a TypeError from deep inside validate()."""
    with pytest.raises(ConfigError) as ei:
        Config(**kw)
    assert text in str(ei.value) and "\n" not in str(ei.value)
    cfg = Config()
    for k, v in kw.items():
        setattr(cfg, k, v)  # set after construction: validate() checks again
    with pytest.raises(ConfigError):
        cfg.validate()


def test_numpy_numbers_are_numbers():
    import numpy as np

    small(ram=np.int64(16 * MiB), zero_fraction=np.float64(0.2), break_huge=np.bool_(True)).validate()


# --- hostile values: refused before anything is allocated --------------------------

@pytest.mark.parametrize("kw,text", [
    ({"seed": -5}, "--seed must be between 0 and 2^64-1"),
    ({"seed": 2**64}, "--seed must be between 0 and 2^64-1"),
    ({"latency": 50.0}, "did you mean 50ms or 50us?"),
    ({"latency": 1.5}, "more than 1s"),
    ({"latency": float("nan")}, "--latency must not be negative"),
    ({"socket_buffer": 2 * GiB}, "--socket-buffer must be at most 1GiB"),
    ({"ram": 8 * KiB, "vcpus": 3}, "the working set holds only 2 4KiB page(s)"),
    ({"wss": 8 * KiB, "vcpus": 3}, "larger --wss"),
])
def test_hostile_values(kw, text):
    assert text in error_of(small(**kw))


def test_from_strings_accepts_numbers():
    cfg = Config.from_strings(ram=32 * MiB, bandwidth=1e9, latency=0.001)
    assert (cfg.ram, cfg.bandwidth, cfg.latency) == (32 * MiB, 1e9, 0.001)


@pytest.mark.parametrize("key,value,option", [
    ("ram", "lots", "--ram"),
    ("ram", "12XB", "--ram"),
    ("host_page", "2MB/s", "--host-page"),
    ("wss", "-", "--wss"),
    ("socket_buffer", "", "--socket-buffer"),
    ("bandwidth", "fast", "--bandwidth"),
    ("bandwidth", "-5MiB/s", "--bandwidth"),
    ("max_bandwidth", "10 furlongs", "--max-bandwidth"),
    ("max_postcopy_bandwidth", "x", "--max-postcopy-bandwidth"),
    ("dirty_rate", "1Gbit/h", "--dirty-rate"),
    ("latency", "soon", "--latency"),
    ("latency", "-1ms", "--latency"),
    ("downtime_limit", "300 parsecs", "--downtime-limit"),
    ("deadline", "5 hours", "--deadline"),
])
def test_from_strings_maps_unit_errors_to_config_errors(key, value, option):
    with pytest.raises(ConfigError) as ei:
        Config.from_strings(**{key: value})
    msg = str(ei.value)
    assert msg.startswith(f"{option}: ")
    assert value.split("/")[0] in msg  # quotes what it could not read
    assert "\n" not in msg


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
    assert shmig.ConfigError is ConfigError


# --- a bad configuration allocates nothing -------------------------------------------

@pytest.mark.parametrize("kw", [
    {"ram": 3 * MiB, "host_page": 2 * MiB},
    {"mode": "bogus"},
    {"ram": TiB},
    {"vcpus": 0},
    {"bandwidth": -1.0},
])
def test_bad_config_allocates_nothing(kw):
    before = mine()
    with pytest.raises(ConfigError):
        shmig.Migration(Config(**kw))
    assert mine() == before == []
    assert multiprocessing.active_children() == []


def test_run_with_bad_config_allocates_nothing():
    with pytest.raises(ConfigError):
        shmig.run(Config(ram=1000))
    assert mine() == []
    assert multiprocessing.active_children() == []
