"""What a saved report must hold before any tool reads it.

``shmig report``, ``shmig plot`` and ``--resume`` read JSON that anyone may have written, kept or
damaged. Every key those tools read is checked here once, when the file is loaded, so that a
report with a wrong type, a missing key, a number that is not finite or a list longer than the
histogram it came from is one line naming the JSON path (``runs[3].postcopy_latency_dist: ...``),
never a traceback from deep inside the summary or matplotlib.

The top level follows ``Report``'s own field annotations (a field added to ``Report`` is checked
without a second list to keep); the nested shapes the tools index into are spelt out below, with
every key optional except those that every report shmig ever wrote has (a report of an older
version still loads). Keys this version does not know are left alone.
"""

from __future__ import annotations

import functools
import math
import types
import typing
from dataclasses import fields
from typing import Any, Callable

from .errors import ConfigError
from .stats import BUCKETS

MAX_ITEMS = 10_000_000  # any list: beyond this it is not a report shmig wrote
VCPU_MAX = 32767  # the fault table's vcpu column is int16


class SchemaError(ConfigError):
    """A saved report that does not hold what the tools read: one line naming where."""


Check = Callable[[Any, str], None]


def _fail(where: str, want: str, v: Any) -> None:
    shown = repr(v)
    raise SchemaError(f"{where}: expected {want}, got {shown[:40] + '...' if len(shown) > 40 else shown}")


def anything(v: Any, where: str) -> None:
    pass


def string(v: Any, where: str) -> None:
    if not isinstance(v, str):
        _fail(where, "a string", v)


def boolean(v: Any, where: str) -> None:
    if not isinstance(v, bool):
        _fail(where, "true or false", v)


def number(v: Any, where: str) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        _fail(where, "a finite number", v)


def whole(v: Any, where: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        _fail(where, "a whole number", v)


def count(v: Any, where: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        _fail(where, "a whole number, 0 or more", v)


def vcpu_index(v: Any, where: str) -> None:
    """A vCPU's number as the fault table stores it (int16)."""
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= VCPU_MAX:
        _fail(where, f"a vCPU number from 0 to {VCPU_MAX}", v)


def positive(v: Any, where: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        _fail(where, "a whole number above 0", v)


def optional(check: Check) -> Check:
    def opt(v: Any, where: str) -> None:
        if v is not None:
            check(v, where)
    return opt


def list_of(check: Check, most: int = MAX_ITEMS, what: str = "a list") -> Check:
    def lst(v: Any, where: str) -> None:
        if not isinstance(v, list):
            _fail(where, what, v)
        if len(v) > most:
            raise SchemaError(f"{where}: {len(v)} entries, more than the {most} it can hold")
        for i, x in enumerate(v):
            check(x, f"{where}[{i}]")
    return lst


def row(*checks: Check) -> Check:
    """A list of fixed length whose items are checked in turn (e.g. a phase: name, start, end)."""
    def tup(v: Any, where: str) -> None:
        if not isinstance(v, list) or len(v) != len(checks):
            _fail(where, f"a list of {len(checks)} items", v)
        for i, (x, c) in enumerate(zip(v, checks)):
            c(x, f"{where}[{i}]")
    return tup


def mapping(value: Check) -> Check:
    """An object with any keys, every value checked alike."""
    def m(v: Any, where: str) -> None:
        if not isinstance(v, dict):
            _fail(where, "an object", v)
        for k, x in v.items():
            value(x, f"{where}.{k}")
    return m


def empty_or(check: Check) -> Check:
    """``check``, or an empty object: a section a run did not have (no multifd), or a run that
    failed before its report was built (a sweep's lost cell)."""
    def e(v: Any, where: str) -> None:
        if v != {}:
            check(v, where)
    return e


def keys(required: dict[str, Check] | None = None, **optional_keys: Check) -> Check:
    """An object with these keys (``required`` must be there; the others may be); others pass."""
    req = required or {}

    def obj(v: Any, where: str) -> None:
        if not isinstance(v, dict):
            _fail(where, "an object", v)
        for k, c in req.items():
            if k not in v:
                raise SchemaError(f"{where}: the key {k!r} is missing")
            c(v[k], f"{where}.{k}")
        for k, c in optional_keys.items():
            if k in v:
                c(v[k], f"{where}.{k}")
    return obj


_BY_TYPE: dict[Any, Check] = {str: string, bool: boolean, int: whole, float: number}


def from_annotation(t: Any) -> Check:
    """The check for a ``Report`` field's annotation (what this module does not know: anything)."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if t in _BY_TYPE:
        return _BY_TYPE[t]
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return optional(from_annotation(rest[0]) if len(rest) == 1 else anything)
    if origin is list:
        return list_of(from_annotation(args[0]) if args else anything)
    if origin is dict:
        return mapping(from_annotation(args[1]) if len(args) == 2 else anything)
    return anything


def _faults(v: Any, where: str) -> None:
    """The fault table: columns, rows, or a reference to the companion ``.npz`` beside the JSON
    (a file name, never a path elsewhere)."""
    if isinstance(v, dict) and "npz" in v:
        keys({"npz": string, "run": string, "count": count})(v, where)
        name = v["npz"]
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise SchemaError(f"{where}.npz: expected a file name beside the report, got {name!r}")
    elif isinstance(v, dict):
        keys({"t_ms": list_of(number), "latency_us": list_of(number), "vcpu": list_of(vcpu_index)})(v, where)
        lengths = {len(c) for c in v.values() if isinstance(c, list)}
        if len(lengths) > 1:
            raise SchemaError(f"{where}: its columns differ in length ({sorted(lengths)})")
    else:
        list_of(row(number, number, vcpu_index))(v, where)


NESTED: dict[str, Check] = {
    "config": keys({"mode": string, "ram": positive, "host_page": positive, "workload": string,
                    "downtime_limit": number, "max_rounds": count}, vcpus=positive, seed=count, bandwidth=optional(number),
                   socket_buffer=optional(positive), precopy_rounds=optional(count), multifd_channels=count),
    "integrity": keys({"ok": boolean, "pages_checked": count}, detail=optional(string)),
    # stats.latency_summary's six figures, zeros without a fault
    "postcopy_latency_us": empty_or(keys({k: number for k in ("count", "mean", "p50", "p90", "p99", "max")})),
    "postcopy_latency_dist": list_of(count, most=BUCKETS, what=f"a list of {BUCKETS} bucket counts"),
    "ram": keys(total=count, transferred=count, normal_pages=count, zero_pages=count, normal_bytes=count,
                precopy_bytes=count, downtime_bytes=count, postcopy_bytes=count, multifd_bytes=count,
                channel_bytes=mapping(count), discarded_host_pages=count, expected_downtime_ms=optional(number)),
    "link": keys(nominal_bps=optional(number), achieved_bps=optional(number), utilisation=optional(number),
                 sender_blocked_ms=mapping(number)),
    "time_dilation": keys(factor=number),
    "guest_progress": keys(postcopy_accesses=count, accesses_after_last_placed=optional(count),
                           speed_ratio_unavailable=optional(string)),
    "status_history": keys(qemu=string, source=list_of(keys({"status": string, "t_ms": number})),
                           destination=list_of(keys({"status": string, "t_ms": number})), error=string),
    "timeline": list_of(keys({"t_ms": number, "precopy_bytes": number, "postcopy_bytes": number,
                              "remaining_pages": number}, multifd_bytes=number, faults_outstanding=number,
                             guest_accesses=number)),
    "phases": list_of(row(string, number, number)),
    "faults_injected": list_of(keys({"fault": string, "postcopy_ms": number, "during": string})),
    "faults_not_injected": list_of(string),
    "multifd": empty_or(keys({"channels": count, "syncs": count, "recv_sync_wait_ms": number,  # all since the first
                     "recv_sync_wait_in_downtime_ms": number}, channel_bytes=list_of(count))),
    "faults": _faults,
}


@functools.cache
def _report_checks(model: type) -> dict[str, Check]:
    """Every field of the report dataclass ``model``: its nested shape if spelt out above, else
    what its annotation says."""
    hints = typing.get_type_hints(model)
    return {f.name: NESTED.get(f.name) or from_annotation(hints[f.name]) for f in fields(model)}


def check_report(d: Any, where: str, model: type) -> None:
    """Raise SchemaError (one line) unless ``d`` holds a ``model`` (``report.Report``) every tool
    can read."""
    if not isinstance(d, dict):
        _fail(where, "a report object", d)
    keys({"status": string, "config": NESTED["config"]})(d, where)
    for name, check in _report_checks(model).items():
        if name in d:
            check(d[name], f"{where}.{name}")


def check_entry(e: Any, where: str, model: type) -> None:
    """A compare or sweep entry: {mode, host_page, report, knob?, value?}."""
    keys({"mode": string, "host_page": positive, "report": anything}, knob=optional(string),
         value=optional(string))(e, where)
    check_report(e["report"], f"{where}.report", model)
