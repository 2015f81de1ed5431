"""Sweep one parameter over several values and print a table of the figures that matter.

    python tools/sweep.py socket_buffer 1MiB,4MiB,16MiB --mode vanilla --ram 128MiB --bandwidth 100MiB/s
    python tools/sweep.py bandwidth 100MiB/s,1Gbit/s,10Gbit/s --mode preempt --host-page 2MiB

Any ``shmig.Config`` field can be swept; the other options are passed as ``--name value``.
"""

from __future__ import annotations

import sys

from shmig.compare import SeriesInterrupted, markdown_table, run_series
from shmig.config import Config, ConfigError


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 2
    name, values = argv[0].replace("-", "_"), [v.strip() for v in argv[1].split(",")]
    fixed: dict[str, object] = {}
    rest = argv[2:]
    for i in range(0, len(rest), 2):
        key = rest[i].lstrip("-").replace("-", "_")
        val = rest[i + 1] if i + 1 < len(rest) else "true"
        fixed[key] = {"true": True, "false": False}.get(val, val)
    try:  # every point validated before the first run
        cfgs = {v: Config.from_strings(**{**fixed, name: v}).validate() for v in values}
    except ConfigError as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return 2
    try:
        results, interrupted = run_series(cfgs, log=lambda msg: print(msg, file=sys.stderr, flush=True),
                                          describe=lambda v: f"{name}={v}"), False
    except SeriesInterrupted as e:  # Ctrl-C stops the sweep; the points already run are printed
        results, interrupted = e.results, True
    rows = []
    for v, rep in results.items():
        lat = rep.postcopy_latency_us
        rows.append([v, rep.status if rep.ok else f"FAILED {rep.error}", f"{rep.total_time_ms or 0:.0f}",
                     f"{rep.downtime_ms or 0:.1f}", str(lat.get("count", 0)), f"{lat.get('mean', 0):.0f}",
                     f"{lat.get('p50', 0):.0f}", f"{lat.get('p99', 0):.0f}", f"{rep.postcopy_blocktime_ms:.0f}",
                     str(rep.guest_progress.get("postcopy_accesses", "-"))])
    print("\n".join(markdown_table([name, "status", "total ms", "downtime ms", "faults", "mean us", "p50 us",
                           "p99 us", "blocktime ms", "guest accesses"], rows)))
    if interrupted:
        print(f"sweep: interrupted: {len(results)} of {len(cfgs)} runs finished", file=sys.stderr)
        return 130
    return 0 if all(r.ok for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
