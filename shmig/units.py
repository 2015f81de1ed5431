"""Parsing and printing of sizes, rates and durations with units (``64MiB``, ``10Gbit/s``, ``50us``)."""

from __future__ import annotations

import re

_SIZE = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3, "gib": 1024**3,
    "ti": 1024**4, "tib": 1024**4,
}
_BITS = {"bit": 1, "kbit": 1000, "mbit": 1000**2, "gbit": 1000**3, "tbit": 1000**4,
         "kibit": 1024, "mibit": 1024**2, "gibit": 1024**3}
_TIME = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ns": 1e-9, "m": 60.0, "min": 60.0}
_NUM = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-zµμ]*)\s*$")


class UnitError(ValueError):
    """A value that does not parse; the message says what was expected."""


def _split(text: str, what: str, example: str) -> tuple[float, str]:
    m = _NUM.match(str(text))
    if not m:
        raise UnitError(f"cannot read {text!r} as {what} (e.g. {example})")
    return float(m.group(1)), m.group(2)


def parse_size(value: str | int | float) -> int:
    """Bytes from ``4096``, ``64MiB``, ``1GiB``, ``2M`` (M = 10^6, Mi = 2^20)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    num, unit = _split(value, "a size", "64MiB")
    factor = _SIZE.get(unit.lower())
    if factor is None:
        raise UnitError(f"unknown size unit {unit!r} in {value!r} (use B, KiB, MiB, GiB, KB, MB, GB)")
    return int(round(num * factor))


def parse_rate(value: str | int | float | None) -> float | None:
    """Bytes per second from ``100MiB/s``, ``10Gbit/s``, ``1e9``; ``unlimited``/``0``/None is None."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value) if value != 0 else None
    text = str(value).strip()
    if text.lower() in ("unlimited", "inf", "none", "0"):
        return None
    body = text[:-2] if text.lower().endswith("/s") else text
    num, unit = _split(body, "a rate", "100MiB/s or 10Gbit/s")
    u = unit.lower()
    if u in _BITS:
        rate = num * _BITS[u] / 8
    elif unit.endswith("bps") and u[:-3] in ("", "k", "m", "g", "t"):  # Gbps: bits
        rate = num * _BITS[(u[:-3] + "bit") if u[:-3] else "bit"] / 8
    elif unit.endswith("Bps") and u[:-3] in _SIZE:  # GBps, MiBps: bytes
        rate = num * _SIZE[u[:-3]]
    elif u in _SIZE:
        rate = num * _SIZE[u]
    else:
        raise UnitError(f"unknown rate unit {unit!r} in {value!r} (use MiB/s, GB/s, Gbit/s)")
    return rate if rate != 0 else None


def parse_time(value: str | int | float) -> float:
    """Seconds from ``50us``, ``2ms``, ``1.5s``, ``300`` (plain numbers are seconds)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    num, unit = _split(value, "a duration", "2ms or 50us")
    factor = _TIME.get(unit if unit in ("µs", "μs") else unit.lower())
    if factor is None:
        raise UnitError(f"unknown time unit {unit!r} in {value!r} (use ns, us, ms, s)")
    return num * factor


def fmt_size(n: float) -> str:
    """``268435456`` -> ``256MiB``; exact binary multiples print without decimals."""
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= factor:
            v = n / factor
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return f"{int(n)}B"


def fmt_rate(r: float | None) -> str:
    return "unlimited" if r is None else fmt_size(r) + "/s"
