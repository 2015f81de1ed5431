"""Parsing and printing of sizes, rates and durations with units (``64MiB``, ``10Gbit/s``, ``50us``).

The conventions are QEMU's, so that a QEMU user's habits are never misread:

- sizes are binary whatever the spelling: ``64M`` = ``64MB`` = ``64MiB`` = 64 * 2^20 bytes, as
  QEMU's ``-m 64M`` and ``migrate_set_parameter max-bandwidth 100M`` read them;
- in a rate ``B`` is a byte and ``b`` a bit: ``100MB/s`` = ``100M/s`` = ``100MiB/s`` (bytes, binary,
  as QEMU's bandwidth parameters), while bits are decimal as every NIC counts them: ``10Gb/s`` =
  ``10Gbit/s`` = ``10Gbps`` = 1.25 * 10^9 bytes/s (``Gib``/``Gibit`` for binary bits);
- a duration needs a unit (``50us``, ``2ms``, ``1.5s``): a bare ``50`` is refused rather than
  guessed, except ``0``, which means the same in every unit;
- nothing is negative.
"""

from __future__ import annotations

import math
import re

_PREFIX = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}
_TIME = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ns": 1e-9, "min": 60.0}
_NUM = re.compile(r"^\s*([-+]?)([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-zµμ]*)\s*$")
SIZE_UNITS = "B, K/KB/KiB, M/MB/MiB, G/GB/GiB, T/TB/TiB (all binary, as in QEMU)"
RATE_UNITS = "MiB/s, MB/s or M/s (bytes, binary), Gbit/s, Gb/s or Gbps (bits, decimal)"


class UnitError(ValueError):
    """A value that does not parse; the message says what was expected."""


def _split(text: str, what: str, example: str, negative: str, shown: object = None) -> tuple[float, str]:
    m = _NUM.match(str(text))
    shown = text if shown is None else shown
    if not m:
        raise UnitError(f"cannot read {shown!r} as {what} (e.g. {example})")
    if m.group(1) == "-" and float(m.group(2)) != 0:
        raise UnitError(f"{shown!r} is negative: {negative}")
    if not math.isfinite(float(m.group(2))):
        raise UnitError(f"{shown!r} is too large to mean anything (e.g. {example})")
    return float(m.group(2)), m.group(3)


def _prefix(unit: str) -> tuple[int, bool, str]:
    """``Gi`` + rest -> (3, binary=True, rest); a unit without a prefix -> (0, False, unit)."""
    p = unit[:1].lower()
    if p in "kmgt" and p:
        rest = unit[1:]
        if rest[:1] in ("i", "I"):
            return _PREFIX[p], True, rest[1:]
        return _PREFIX[p], False, rest
    return 0, False, unit


def parse_size(value: str | int | float) -> int:
    """Bytes from ``4096``, ``64MiB``, ``64M`` or ``64MB`` (all three 64 * 2^20, as QEMU reads them)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    num, unit = _split(value, "a size", "64MiB", "use a positive size, e.g. 64MiB")
    exp, _, rest = _prefix(unit)
    if rest.lower() not in ("", "b"):
        raise UnitError(f"unknown size unit {unit!r} in {value!r} (use {SIZE_UNITS})")
    n = _finite(num * 1024**exp, value, "64MiB")
    if n != int(n):
        raise UnitError(f"{value!r} is not a whole number of bytes (e.g. 64MiB or 1.5KiB)")
    return int(n)


def parse_rate(value: str | int | float | None, zero_is_unlimited: bool = True) -> float | None:
    """Bytes per second from ``100MiB/s``, ``100M``, ``10Gbit/s``, ``10Gb/s``, ``1e9``.

    ``unlimited`` (or None) is None. ``0`` is None too where QEMU reads 0 as "no limit"
    (max-bandwidth, max-postcopy-bandwidth); elsewhere (``zero_is_unlimited=False``) it is refused.
    """
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        rate = float(value)
    else:
        text = str(value).strip()
        if text.lower() in ("unlimited", "inf", "none"):
            return None
        body = text[:-2] if text.lower().endswith("/s") else text
        num, unit = _split(body, "a rate", "100MiB/s or 10Gbit/s",
                           "use a positive rate such as 100MiB/s, or 'unlimited'", value)
        rate = _finite(num * _rate_factor(unit, value), value, "100MiB/s or 10Gbit/s")
    if rate == 0:
        if zero_is_unlimited:
            return None
        raise UnitError(f"{value!r} would mean nothing moves: use 'unlimited' or leave the option out"
                        f" for no limit")
    return rate


def _rate_factor(unit: str, value: object) -> float:
    exp, binary, rest = _prefix(unit)
    if rest.lower() in ("bit", "bits") or rest in ("b", "bps"):  # bits: decimal unless Ki/Mi/...
        return (1024 if binary else 1000) ** exp / 8
    if rest in ("", "B", "Bps"):  # bytes: binary, as QEMU's sizes
        return 1024.0**exp
    raise UnitError(f"unknown rate unit {unit!r} in {value!r} (use {RATE_UNITS})")


def parse_time(value: str | int | float, hint: str = "us") -> float:
    """Seconds from ``50us``, ``2ms``, ``1.5s``; a bare number other than 0 is refused, suggesting
    ``hint`` as the unit meant. Python numbers (the API) are seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    num, unit = _split(value, "a duration", "2ms or 50us", "use 0 or more, e.g. 2ms")
    if not unit:
        if num == 0:
            return 0.0
        raise UnitError(f"{str(value).strip()!r} has no unit: did you mean {str(value).strip()}{hint}?"
                        f" (use ns, us, ms or s)")
    factor = _TIME.get(unit if unit in ("µs", "μs") else unit.lower())
    if factor is None:
        raise UnitError(f"unknown time unit {unit!r} in {value!r} (use ns, us, ms, s)")
    return _finite(num * factor, value, "2ms or 50us")


def _finite(n: float, value: object, example: str) -> float:
    """A number that parsed may still overflow once its unit is applied (``1e308T``)."""
    if not math.isfinite(n):
        raise UnitError(f"{value!r} is too large to mean anything (e.g. {example})")
    return n


def fmt_size(n: float) -> str:
    """``268435456`` -> ``256MiB``; exact binary multiples print without decimals."""
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= factor:
            v = n / factor
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return f"{int(n)}B"


def fmt_rate(r: float | None) -> str:
    return "unlimited" if r is None else fmt_size(r) + "/s"


def fmt_time(s: float) -> str:
    """Seconds as the shortest unit that keeps them readable: ``0.0005`` -> ``500us``."""
    for unit, factor in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if abs(s) >= factor:
            return f"{s / factor:g}{unit}"
    return f"{s * 1e9:g}ns"
