"""Profile one of the benchmark migrations in every process (controller, mig/*, guest/*) with py-spy.

    pip install py-spy
    python tools/profile_run.py datapath                      # flame graph in /tmp/shmig-datapath.svg
    python tools/profile_run.py faultpath --mode preempt -o /tmp/fp.json --format speedscope
    python tools/profile_run.py datapath --format raw         # plus a per-process summary here

The profile is taken with ``py-spy record --subprocesses --nonblocking``, so the forked children
are sampled without being stopped. With ``--format raw`` (collapsed stacks) the script also prints
the busiest functions of each process (self time, then inclusive time). Without py-spy it says how
to install it; ``--no-profile`` runs the migration unprofiled (what py-spy itself runs).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys

PRESETS = {
    # bench/test_datapath.py: unthrottled precopy of an idle guest, no zero pages
    "datapath": dict(mode="precopy", ram="256MiB", workload="idle", zero_fraction=0.0),
    # bench/test_faultpath.py: postcopy right after setup, background throttled, random faults
    "faultpath": dict(mode="preempt-full", ram="32MiB", workload="random", zero_fraction=0.0,
                      precopy_rounds=0, max_postcopy_bandwidth="1B/s"),
    # bench/test_scenarios.py: one cell of the cover-letter grid
    "scenario": dict(mode="preempt", ram="256MiB", workload="random", bandwidth="100MiB/s"),
}


def migrate(ns: argparse.Namespace) -> None:
    import shmig

    kw = dict(PRESETS[ns.preset])
    for k in ("mode", "ram", "host_page"):
        if getattr(ns, k) is not None:
            kw[k] = getattr(ns, k)
    cfg = shmig.Config.from_strings(**kw)
    for i in range(ns.runs):
        r = shmig.run(cfg)
        lat = r.postcopy_latency_us
        print(f"run {i + 1}: {r.status}, integrity {'ok' if r.ok else 'FAILED'}, total {r.total_time_ms} ms"
              f" (setup {r.setup_time_ms} ms), {r.throughput_mbps} Mbit/s, faults {lat.get('count', 0)}"
              f" p50 {lat.get('p50', 0)} us", flush=True)


BORING = ("Thread.", "<module>", "main (", "migrate (", "Child.main", "_bootstrap", "_find_and_load",
          "_load_unlocked", "_call_with_frames_removed", "BaseProcess.", "Popen.", "ForkProcess.")


def summarize(raw: str, top: int) -> None:
    """Per process: share of samples, then the top functions by self and inclusive samples."""
    per_proc: collections.Counter = collections.Counter()
    self_t: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    strip = re.compile(r":\d+\)")
    with open(raw) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            if not n.isdigit():
                continue
            frames = stack.split(";")
            procs = [x for x in frames if x.startswith("process ")]
            title = procs[-1].split(":", 1)[1].strip('"') if procs else "?"
            title = ("controller" if "profile_run" in title else
                     "resource_tracker" if "resource_tracker" in title else title[:40])
            code = [strip.sub(")", x) for x in frames if not x.startswith(("process ", "thread "))]
            for i, x in enumerate(code):  # drop the fork bootstrap of the children
                if x.startswith("Child.main"):
                    code = code[i:]
                    break
            per_proc[title] += int(n)
            if code:
                self_t[title, code[-1]] += int(n)
            for x in set(code):
                if not x.startswith(BORING):
                    incl[title, x] += int(n)
    total = sum(per_proc.values()) or 1
    for title, n in per_proc.most_common():
        print(f"\n{title}: {n} samples ({100 * n / total:.1f}% of all)")
        for label, counter in (("self", self_t), ("inclusive", incl)):
            rows = [(c, fn) for (t, fn), c in counter.items() if t == title]
            rows.sort(reverse=True)
            print(f"  top {label}:")
            for c, fn in rows[:top]:
                print(f"    {100 * c / n:5.1f}%  {fn}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("preset", choices=sorted(PRESETS))
    ap.add_argument("--mode")
    ap.add_argument("--ram")
    ap.add_argument("--host-page")
    ap.add_argument("--runs", type=int, default=3, help="migrations in a row (default 3)")
    ap.add_argument("-o", "--output", help="default /tmp/shmig-<preset>.<svg|json|txt>")
    ap.add_argument("--format", default="flamegraph", choices=["flamegraph", "speedscope", "raw"])
    ap.add_argument("--rate", type=int, default=500, help="samples per second per process")
    ap.add_argument("--top", type=int, default=12, help="functions per process in the raw summary")
    ap.add_argument("--no-profile", action="store_true", help="just run the migrations")
    ns = ap.parse_args()
    if ns.no_profile:
        migrate(ns)
        return 0
    spy = shutil.which("py-spy")
    if spy is None:
        print("py-spy is not installed: pip install py-spy (then run this again)", file=sys.stderr)
        return 2
    ext = {"flamegraph": "svg", "speedscope": "json", "raw": "txt"}[ns.format]
    out = ns.output or f"/tmp/shmig-{ns.preset}.{ext}"
    child = [sys.executable, os.path.abspath(__file__), ns.preset, "--no-profile", "--runs", str(ns.runs)]
    for k in ("mode", "ram", "host_page"):
        if getattr(ns, k) is not None:
            child += [f"--{k.replace('_', '-')}", getattr(ns, k)]
    cmd = [spy, "record", "--subprocesses", "--nonblocking", "--rate", str(ns.rate), "--format", ns.format,
           "-o", out, "--", *child]
    code = subprocess.call(cmd)
    if code == 0 and ns.format == "raw":
        summarize(out, ns.top)
    print(f"\nprofile written to {out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
