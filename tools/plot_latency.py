"""Plot fault-latency distributions from ``shmig compare --json`` (or ``shmig run --json``) output.

    shmig compare --ram 128MiB --bandwidth 100MiB/s --json runs.json
    python tools/plot_latency.py runs.json -o latency.png

One panel per host page size; per mode, QEMU's log2 latency histogram as a step curve, so the
shape QEMU's cover letters show (vanilla's hump at the queue's drain time, preempt's at the
round trip) can be compared at a glance. Needs matplotlib (``pip install -e '.[plot]'``).
"""

from __future__ import annotations

import argparse
import json

from shmig.units import fmt_size


def load(path: str) -> list[dict]:
    with open(path) as f:
        data = json.load(f)
    if isinstance(data, dict):  # one report from `shmig run --json`
        return [{"mode": data["config"]["mode"], "host_page": data["config"]["host_page"], "report": data}]
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+")
    ap.add_argument("-o", "--output", default="latency.png")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for p in args.json for r in load(p)]
    pages = sorted({r["host_page"] for r in runs})
    fig, axes = plt.subplots(1, len(pages), figsize=(6 * len(pages), 4), squeeze=False)
    for ax, hp in zip(axes[0], pages):
        for r in (r for r in runs if r["host_page"] == hp):
            dist = r["report"]["postcopy_latency_dist"]
            total = sum(dist) or 1
            lat = r["report"]["postcopy_latency_us"]
            label = f"{r['mode']} (mean {lat.get('mean', 0) / 1e3:.2f} ms, n={lat.get('count', 0)})"
            ax.step([2 ** i for i in range(len(dist))], [c / total for c in dist], where="post", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("fault latency (us, QEMU's log2 buckets)")
        ax.set_ylabel("share of faults")
        ax.set_title(f"{fmt_size(hp)} host pages")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
