"""What one postcopy recovery costs the guest: the same migration with and without a broken channel.

    python tools/recovery_cost.py                       # 4 runs each, the README's table
    python tools/recovery_cost.py --runs 2 --mode preempt-full --fault return-path@30%

Each cell is the median over the runs (they move by 10-30% on a shared machine); every run must
complete with its integrity check passing, or the script stops with the run's error.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import shmig

COLUMNS = ("faults", "mean ms", "p50 ms", "p99 ms", "max ms", "blocktime ms", "paused ms", "pages sent again")


def one(cfg: shmig.Config) -> tuple[float, ...]:
    r = shmig.run(cfg)
    if not r.ok:
        sys.exit(f"recovery_cost: {cfg.inject_faults or 'no fault'}: {r.error}")
    lat = r.postcopy_latency_us
    return (lat["count"], lat["mean"] / 1e3, lat["p50"] / 1e3, lat["p99"] / 1e3, lat["max"] / 1e3,
            r.postcopy_blocktime_ms, r.postcopy_paused_ms, r.postcopy_pages_resent)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--mode", default="preempt")
    p.add_argument("--ram", default="128MiB")
    p.add_argument("--bandwidth", default="100MiB/s")
    p.add_argument("--fault", action="append", help="default: postcopy-channel@50%% and return-path@50%%")
    ns = p.parse_args()
    faults = ns.fault or ["postcopy-channel@50%", "return-path@50%"]
    rows = {spec: [] for spec in ["none", *faults]}
    for _ in range(ns.runs):  # interleaved, so that a busy spell of the machine hits every case
        for spec in rows:
            cfg = shmig.Config.from_strings(mode=ns.mode, ram=ns.ram, bandwidth=ns.bandwidth,
                                            inject_faults=[] if spec == "none" else [spec])
            rows[spec].append(one(cfg.validate()))
    print("| fault | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for spec, runs in rows.items():
        med = [statistics.median(col) for col in zip(*runs)]
        cells = [f"{med[0]:.0f}", *(f"{v:.2f}" for v in med[1:3]), *(f"{v:.1f}" for v in med[3:5]),
                 *(f"{v:.0f}" for v in med[5:])]
        print(f"| {spec if spec == 'none' else f'`{spec}`'} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
