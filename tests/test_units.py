"""shmig.units: sizes, rates and durations with units, and their printing."""

import multiprocessing
import os

import pytest

from shmig.memory import leftovers
from shmig.units import UnitError, fmt_rate, fmt_size, fmt_time, parse_rate, parse_size, parse_time

KiB, MiB, GiB = 1024, 1024**2, 1024**3


@pytest.fixture(autouse=True)
def nothing_left_behind():
    """conftest's check, limited to this process's segments: other runs may share /dev/shm."""
    yield
    assert not multiprocessing.active_children()
    assert not [n for n in leftovers() if n.startswith(f"shmig-{os.getpid()}-")]


# --- parse_size -------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("64MiB", 64 * MiB),
    ("1GiB", GiB),
    ("2MiB", 2 * MiB),
    ("4KiB", 4 * KiB),
    ("1TiB", 1024 * GiB),
    ("2M", 2 * MiB),            # QEMU's convention: sizes are binary however they are spelled
    ("2MB", 2 * MiB),
    ("64MB", 64 * MiB),
    ("64M", 64 * MiB),
    ("64m", 64 * MiB),
    ("3k", 3 * KiB),
    ("3KB", 3 * KiB),
    ("1G", GiB),
    ("1GB", GiB),
    ("1T", 1024 * GiB),
    ("4096", 4096),
    ("4096B", 4096),
    ("1.5KiB", 1536),
    ("64 MiB", 64 * MiB),       # a space between number and unit
    (" 7 ", 7),
    ("1e3", 1000),
    ("64mib", 64 * MiB),        # units are case-insensitive
    ("64MIB", 64 * MiB),
])
def test_parse_size(text, expected):
    got = parse_size(text)
    assert got == expected
    assert isinstance(got, int)


@pytest.mark.parametrize("value", [0, 4096, 128 * MiB])
def test_parse_size_passes_numbers_through(value):
    assert parse_size(value) == value
    assert parse_size(float(value)) == value


@pytest.mark.parametrize("text", ["abc", "12XB", "-", "", "-5MiB", "MiB", "1.2.3", "5 Mi B", "0x10"])
def test_parse_size_garbage(text):
    with pytest.raises(UnitError) as ei:
        parse_size(text)
    msg = str(ei.value)
    assert repr(text) in msg            # says what it could not read
    assert "MiB" in msg                 # and gives an example of what it wants
    assert "\n" not in msg


def test_parse_size_unknown_unit_lists_units():
    with pytest.raises(UnitError, match="unknown size unit 'XB'"):
        parse_size("12XB")


def test_parse_size_rejects_bool():
    with pytest.raises(UnitError):
        parse_size(True)


# --- parse_rate -------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("100MiB/s", 100 * MiB),
    ("100MiB", 100 * MiB),
    ("1GB/s", GiB),             # B is a byte, and bytes are binary (QEMU's max-bandwidth 1G)
    ("10GB/s", 10 * GiB),
    ("100MB/s", 100 * MiB),
    ("100M/s", 100 * MiB),
    ("100M", 100 * MiB),
    ("10Gb/s", 1.25e9),         # b is a bit, and bits are decimal: Gb = Gbit
    ("10Gb", 1.25e9),
    ("100Mb/s", 1.25e7),
    ("1Gib/s", GiB / 8),
    ("10Gbit/s", 1.25e9),
    ("10gbit/s", 1.25e9),
    ("10Gbit", 1.25e9),
    ("1Gbps", 1.25e8),
    ("100Mbps", 1.25e7),
    ("8bps", 1.0),
    ("8bit/s", 1.0),
    ("1Mibit/s", MiB / 8),
    ("1e9", 1e9),
    ("1e9/s", 1e9),
    ("4096", 4096.0),
    ("100MiB/S", 100 * MiB),
])
def test_parse_rate(text, expected):
    assert parse_rate(text) == pytest.approx(expected)


@pytest.mark.parametrize("value", ["unlimited", "Unlimited", "UNLIMITED", "inf", "none", "0", " 0 ", "0MiB/s",
                                   0, 0.0, None])
def test_parse_rate_unlimited(value):
    assert parse_rate(value) is None


def test_parse_rate_numbers():
    assert parse_rate(1e9) == 1e9
    assert parse_rate(5) == 5.0
    assert isinstance(parse_rate(5), float)


@pytest.mark.parametrize("text", ["abc", "12XB/s", "-", "", "-5MiB/s", "fast", "10Gbit/h", "/s"])
def test_parse_rate_garbage(text):
    with pytest.raises(UnitError) as ei:
        parse_rate(text)
    msg = str(ei.value)
    assert "MiB/s" in msg or "Gbit/s" in msg   # an example of a valid rate
    assert "\n" not in msg


def test_parse_rate_bytes_per_second_abbreviation():
    assert parse_rate("1GBps") == pytest.approx(GiB)
    assert parse_rate("1Gbps") == pytest.approx(1.25e8)


def test_parse_rate_bit_and_byte_spellings_agree():
    assert parse_rate("10Gb/s") == parse_rate("10Gbit/s") == parse_rate("10Gbps") == parse_rate("10gbit/s")
    assert parse_rate("10GB/s") == parse_rate("10GiB/s") == parse_rate("10G/s") == parse_rate("10GBps")
    assert parse_rate("10GB/s") / parse_rate("10Gb/s") == pytest.approx(8 * GiB / 1e9)


@pytest.mark.parametrize("value", ["0", "0MiB/s", 0, 0.0])
def test_parse_rate_zero_refused_where_it_is_not_unlimited(value):
    with pytest.raises(UnitError, match="use 'unlimited' or leave the option out"):
        parse_rate(value, zero_is_unlimited=False)
    assert parse_rate("unlimited", zero_is_unlimited=False) is None


# --- parse_time -------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("50us", 50e-6),
    ("50US", 50e-6),
    ("50\u00b5s", 50e-6),       # MICRO SIGN, what most keyboards give for µ
    ("2ms", 2e-3),
    ("1.5s", 1.5),
    (".5s", 0.5),
    ("300s", 300.0),
    ("100ns", 100e-9),
    ("2min", 120.0),
    ("0", 0.0),
    ("1e-3s", 1e-3),
])
def test_parse_time(text, expected):
    assert parse_time(text) == pytest.approx(expected)


def test_parse_time_numbers_are_seconds():
    assert parse_time(2) == 2.0
    assert parse_time(0.25) == 0.25


@pytest.mark.parametrize("text", ["abc", "12XB", "-", "", "-1ms", "µs", "5 hours", "1.5sec", "5m"])
def test_parse_time_garbage(text):
    with pytest.raises(UnitError) as ei:
        parse_time(text)
    msg = str(ei.value)
    assert "ms" in msg and "\n" not in msg


@pytest.mark.parametrize("text,hint", [("50", "us"), ("300", "ms"), ("2.5", "s"), (" 7 ", "us")])
def test_parse_time_without_unit_says_what_was_meant(text, hint):
    with pytest.raises(UnitError) as ei:
        parse_time(text, hint=hint)
    assert f"did you mean {text.strip()}{hint}?" in str(ei.value)


@pytest.mark.parametrize("text", ["-1us", "-0.5ms", "-3s"])
def test_negative_values_say_so(text):
    with pytest.raises(UnitError, match="is negative"):
        parse_time(text)
    with pytest.raises(UnitError, match="is negative"):
        parse_size(text.rstrip("smu") + "MiB")
    with pytest.raises(UnitError, match="is negative.*unlimited"):
        parse_rate(text.rstrip("smu") + "MiB/s")


def test_parse_time_greek_mu():
    assert parse_time("50\u03bcs") == pytest.approx(50e-6)


# --- printing ---------------------------------------------------------------

@pytest.mark.parametrize("n,text", [
    (0, "0B"),
    (100, "100B"),
    (4096, "4KiB"),
    (1536, "1.5KiB"),
    (2 * MiB, "2MiB"),
    (256 * MiB, "256MiB"),
    (268435456, "256MiB"),
    (GiB, "1GiB"),
    (4 * GiB, "4GiB"),
    (1.5 * GiB, "1.5GiB"),
])
def test_fmt_size(n, text):
    assert fmt_size(n) == text


@pytest.mark.parametrize("n", [1, 4096, 2 * MiB, 3 * MiB, GiB, 64 * GiB, 1536])
def test_fmt_size_round_trips(n):
    assert parse_size(fmt_size(n)) == n


def test_fmt_rate():
    assert fmt_rate(None) == "unlimited"
    assert fmt_rate(100 * MiB) == "100MiB/s"
    assert parse_rate(fmt_rate(100 * MiB)) == 100 * MiB


@pytest.mark.parametrize("s,text", [(1.0, "1s"), (0.05, "50ms"), (50e-6, "50us"), (2e-9, "2ns"), (300.0, "300s")])
def test_fmt_time(s, text):
    assert fmt_time(s) == text


@pytest.mark.parametrize("text,words", [
    ("1e400", "too large"), ("4097.5", "not a whole number of bytes"), ("0.5", "not a whole number of bytes"),
    ("0.1MiB", "not a whole number of bytes")])
def test_parse_size_refuses_what_no_size_is(text, words):
    with pytest.raises(UnitError, match=words):
        parse_size(text)


def test_non_finite_durations_and_rates_are_refused():
    with pytest.raises(UnitError, match="too large"):
        parse_time("1e400s")
    with pytest.raises(UnitError, match="too large"):
        parse_rate("1e400MiB/s")
