"""``--time-dilation auto``: the smallest slow-down at which this machine keeps up with the emulated link.

A probe is the same migration, smaller and straight into postcopy (its frames cost the receivers
the most): same mode, link and guest, no rate limits, no injected faults. It must carry at least
97% of the link's rate while its queues hold data, and from first byte to last: the source too must
keep the link busy, as QEMU's does at that rate (a source that cannot fill the socket would leave a
request behind a shorter queue than QEMU's).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from .config import Config, ConfigError
from .report import Report

CALIBRATION_FACTORS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
CALIBRATION_S = 0.25  # emulated seconds of link time a probe takes
SUSTAINED = 0.97  # utilisation at which the machine keeps up with the emulated link
FILLED = 0.97  # ... and from first byte to last
PROBE_REAL_S = 60.0  # a probe's deadline in real time


def probe_config(cfg: Config, factor: float) -> Config:
    """The probe of ``cfg`` at ``factor``: the link's own test, not the user's run (no faults to
    inject, no rate limits, a deadline of its own)."""
    mib = 1024**2
    assert cfg.bandwidth is not None
    ram = int(min(max(cfg.bandwidth * CALIBRATION_S, 32 * mib), 512 * mib, cfg.ram)) // cfg.host_page * cfg.host_page
    ram = max(ram, cfg.host_page)
    return dataclasses.replace(
        cfg, ram=ram, wss=None if cfg.wss is None else min(cfg.wss, ram), max_rounds=1,
        precopy_rounds=0 if cfg.postcopy else None, time_dilation=float(factor), max_bandwidth=None,
        max_postcopy_bandwidth=None, deadline=PROBE_REAL_S / factor, inject_faults=[], recover_after=None,
        extra={})


def calibrate_dilation(cfg: Config, run: Callable[[Config], Report],
                       start: float = 1.0) -> tuple[float, list[dict[str, Any]]]:
    """The smallest factor (from ``start`` on) whose probe, run by ``run`` (``shmig.run``),
    sustains the link, and what each factor tried carried. One Ctrl-C stops it
    (KeyboardInterrupt), as it stops a run."""
    if cfg.bandwidth is None:
        return 1.0, []  # an unlimited link is whatever the machine does: nothing to sustain
    tried: list[dict[str, Any]] = []
    n = start
    for n in [f for f in CALIBRATION_FACTORS if f >= start] or [start]:
        rep = run(probe_config(cfg, n))
        if rep.interrupted:
            raise KeyboardInterrupt
        util = rep.link.get("utilisation") if rep.ok else None
        end_to_end = None
        if rep.ok and rep.link.get("span_ms"):  # from the first byte carried to the last
            end_to_end = round(rep.link["carried_bytes"] / (rep.link["span_ms"] / 1e3) / cfg.bandwidth, 4)
        tried.append({"time_dilation": n, "utilisation": util, "end_to_end": end_to_end})
        if util is not None and util >= SUSTAINED and end_to_end is not None and end_to_end >= FILLED:
            return float(n), tried
    raise ConfigError(f"--time-dilation auto: the machine does not sustain the link even {n}x slowed"
                      f" down ({tried}); lower --bandwidth")
