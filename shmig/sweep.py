"""One run option over several values, for each of several modes: ``shmig sweep KNOB VALUES``.

Every configuration is built and validated before the first run, so a bad value fails in one line
with nothing allocated. Ctrl-C stops the sweep as a whole: the runs that finished are kept (the
CLI prints and saves them, and ``--resume`` continues from them) and the one that was interrupted
is dropped. The runs go through ``shmig.series`` (here) or ``shmig.cluster`` (``--cluster``).
"""

from __future__ import annotations

from typing import Any, Sequence

from .compare import MODE_VARIANTS, markdown_table
from .config import Config, ConfigError
from .report import Companion, SavedRun
from .series import Plan, PlannedRun
from .units import fmt_size


def variants() -> dict[str, dict[str, Any]]:
    """What --modes may name: compare's variants (registered policies included) and precopy."""
    return {"precopy": {"mode": "precopy"}, **MODE_VARIANTS}


def knob_name(knob: str, options: Sequence[str]) -> str:
    """``socket-buffer``, ``--socket-buffer`` or ``socket_buffer`` -> ``socket_buffer``."""
    name = knob.lstrip("-").replace("-", "_")
    if name == "no_break_huge":
        name = "break_huge"
    if name == "mode":
        raise ConfigError("sweep mode: give the modes with --modes (e.g. --modes vanilla,preempt)")
    if name not in options:
        raise ConfigError(f"cannot sweep {knob!r}: use one of "
                          + ", ".join(o.replace("_", "-") for o in options if o != "mode"))
    return name


def knob_value(name: str, text: str) -> Any:
    """One value as the option takes it: Config.from_strings reads every kind the command line
    does (sizes, rates, times, counts, on/off flags, words) and says what is wrong with it."""
    return getattr(Config.from_strings(**{name: text}), name)


def plan(base: dict[str, Any], knob: str, values: Sequence[str], modes: Sequence[str]) -> list[tuple[str, str, Config]]:
    """(value, mode, validated Config) for every value x mode, values outermost."""
    if not values or any(not v.strip() for v in values):
        raise ConfigError("sweep: give comma-separated values, e.g. 1MiB,4MiB,16MiB")
    if knob in base:
        raise ConfigError(f"--{knob.replace('_', '-')} is what the sweep varies: drop the option")
    known = variants()
    for m in modes:
        if m not in known:
            raise ConfigError(f"unknown mode {m!r} in --modes: use {', '.join(known)}")
    out = []
    for v in values:
        for m in modes:
            kw = {**base, **known[m], knob: knob_value(knob, v.strip())}
            out.append((v.strip(), m, Config.from_strings(**kw).validate()))
    return out


def planned(knob: str, runs: Sequence[tuple[str, str, Config]]) -> Plan:
    """``plan``'s runs with their places, named as the live line and the logs name them."""
    return Plan("sweep", tuple(PlannedRun(i, f"{mode} {knob.replace('_', '-')}={value}", cfg, mode, cfg.host_page,
                                          knob=knob, value=value) for i, (value, mode, cfg) in enumerate(runs)))


def _ms(us: float | None) -> str:
    return "-" if us is None else f"{us / 1e3:.2f}"


def format_sweep(runs: Sequence[SavedRun]) -> str:
    """One row per run: the value, the mode and the figures that move with them."""
    knob = runs[0].knob or "value"
    head = [knob.replace("_", "-"), "mode", "host page", "faults", "mean ms", "p50 ms", "p99 ms", "blocktime ms",
            "guest accesses", "downtime ms", "total s", "integrity"]
    rows = []
    for r in runs:
        rep = r.report
        lat = rep.postcopy_latency_us
        has = bool(lat.get("count"))
        rows.append([str(r.value), r.mode, fmt_size(r.host_page), str(lat.get("count", 0)),
                     _ms(lat.get("mean")) if has else "-", _ms(lat.get("p50")) if has else "-",
                     _ms(lat.get("p99")) if has else "-", f"{rep.postcopy_blocktime_ms:.0f}",
                     str(rep.guest_progress.get("postcopy_accesses", "-")),
                     "-" if rep.downtime_ms is None else f"{rep.downtime_ms:.1f}",
                     "-" if rep.total_time_ms is None else f"{rep.total_time_ms / 1e3:.2f}",
                     "ok" if rep.ok else f"FAILED ({rep.error})"])
    return "\n".join(markdown_table(head, rows))


def to_json(runs: Sequence[SavedRun], companion: Companion | None = None) -> list[dict[str, Any]]:
    """What ``--json`` writes: compare's list of {mode, host_page, report}, plus knob and value."""
    return [{"knob": r.knob, "value": r.value, "mode": r.mode, "host_page": r.host_page,
             "report": r.report.to_dict(companion)} for r in runs]
