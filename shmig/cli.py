"""The ``shmig`` command: ``run`` one migration, ``compare`` modes side by side, ``clean`` leftovers."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from . import memory
from .compare import PRESETS, MODE_VARIANTS, compare, format_table
from .config import MODES, WORKLOADS, Config, ConfigError
from .controller import Migration
from .report import Report
from .stats import format_dist
from .units import UnitError, parse_size

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def _config_args(p: argparse.ArgumentParser, with_mode: bool = True) -> None:
    g = p.add_argument_group("migration")
    if with_mode:
        g.add_argument("--mode", choices=MODES, help="request-servicing policy (default: preempt)")
    g.add_argument("--ram", help="guest RAM, e.g. 128MiB (default 128MiB)")
    g.add_argument("--host-page", help="4KiB, 2MiB or 1GiB (default 4KiB)")
    g.add_argument("--precopy-rounds", type=int,
                   help="full precopy rounds before postcopy starts (default 1; 0 = right after setup)")
    g.add_argument("--max-rounds", type=int, help="precopy: give up converging after N rounds (default 30)")
    g.add_argument("--downtime-limit", help="precopy switch threshold, e.g. 300ms (default)")
    g.add_argument("--no-break-huge", dest="break_huge", action="store_false", default=None,
                   help="preempt: x-postcopy-preempt-break-huge=off")
    g.add_argument("--page-hint", action="store_true", default=None,
                   help="preempt-full: QEMU 10.1's spatial locality hint")
    g.add_argument("--max-bandwidth", help="QEMU max-bandwidth (precopy), e.g. 100MiB/s")
    g.add_argument("--max-postcopy-bandwidth", help="QEMU max-postcopy-bandwidth, e.g. 100MiB/s")
    n = p.add_argument_group("emulated link")
    n.add_argument("--bandwidth", help="link bandwidth shared by both channels, e.g. 10Gbit/s (default unlimited)")
    n.add_argument("--latency", help="one-way latency, e.g. 50us (default 0)")
    n.add_argument("--socket-buffer", help="per channel queue before the sender blocks (default 10MiB: Linux's tcp_wmem + tcp_rmem maxima)")
    w = p.add_argument_group("guest")
    w.add_argument("--workload", choices=WORKLOADS, help="access pattern (default random)")
    w.add_argument("--wss", help="working-set size (default: all RAM)")
    w.add_argument("--dirty-rate", help="bytes/s the guest writes (default: as fast as it can)")
    w.add_argument("--vcpus", type=int, help="vCPU processes (default 1)")
    w.add_argument("--seed", type=int, help="initial content and access streams (default 1)")
    w.add_argument("--zero-fraction", type=float, help="share of all-zero pages (default 0.1)")
    f = p.add_argument_group("postcopy recovery")
    f.add_argument("--inject-fault", dest="inject_faults", action="append", metavar="WHAT@WHEN",
                   help="break a channel during postcopy: WHAT is precopy-channel, postcopy-channel or"
                   " return-path; WHEN is a share of the pages left at postcopy start (50%%) or a time"
                   " since postcopy started (300ms); repeatable")
    f.add_argument("--recover-after", help="how long a postcopy-paused migration waits before it recovers"
                   " (default 100ms)")
    p.add_argument("--deadline", help="the run fails after this long, naming who waited for what (default 300s)")
    p.add_argument("--time-dilation", metavar="N|auto",
                   help="run the emulated world N times slower (links faster than this machine);"
                        " auto picks the smallest N that sustains the link; every time reported is"
                        " emulated time (default 1)")


CONFIG_KEYS = ("mode", "ram", "host_page", "precopy_rounds", "max_rounds", "downtime_limit", "break_huge",
               "page_hint", "max_bandwidth", "max_postcopy_bandwidth", "bandwidth", "latency",
               "socket_buffer", "workload", "wss", "dirty_rate", "vcpus", "seed", "zero_fraction", "deadline",
               "time_dilation", "inject_faults", "recover_after")


def _config_kwargs(ns: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(ns, k) for k in CONFIG_KEYS if getattr(ns, k, None) is not None}


class Progress:
    """One status line on stderr while a run goes, when stderr is a terminal."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, s: dict[str, Any]) -> None:
        if not self.enabled:
            return
        sys.stderr.write(f"\r  {s['t_ms'] / 1e3:6.1f}s {s['phase']:<10} remaining {s['remaining_pages']:>9}"
                         f" pages  received {s['received_pages']:>9}  faults waiting"
                         f" {s['faults_outstanding']:>2}  guest {s['guest_accesses']:>10} accesses ")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 110 + "\r")


def cmd_run(ns: argparse.Namespace) -> int:
    cfg = Config.from_strings(**_config_kwargs(ns)).validate()
    progress = Progress(sys.stderr.isatty() and not ns.quiet)
    try:
        report = Migration(cfg, on_sample=progress, trace=ns.trace).start().wait()
    finally:
        progress.done()
    if ns.json:
        with open(ns.json, "w") as f:
            f.write(report.to_json())
    if not ns.quiet:
        print(report.summary())
        if ns.dist and report.postcopy_latency_us.get("count"):
            print("Postcopy Latency Distribution:")
            print(format_dist(report.postcopy_latency_dist))
    return _exit_code(report)


def _exit_code(report: Report) -> int:
    if report.ok:
        return 0
    if report.error and report.error.startswith("interrupted"):
        return EXIT_INTERRUPTED
    return EXIT_FAILED


def cmd_compare(ns: argparse.Namespace) -> int:
    base = dict(PRESETS[ns.preset]) if ns.preset else {}
    base.update(_config_kwargs(ns))
    modes = ns.modes.split(",") if ns.modes else base.pop("modes", list(MODE_VARIANTS))
    base.pop("modes", None)
    pages = ([parse_size(x) for x in ns.host_pages.split(",")] if ns.host_pages
             else base.pop("host_pages", [parse_size(base.pop("host_page", 4096))]))
    base.pop("host_pages", None)
    base.pop("host_page", None)
    by_host_page = base.pop("by_host_page", None)
    qemu = base.pop("qemu", None)
    for m in modes:
        if m not in MODE_VARIANTS:
            raise ConfigError(f"unknown mode {m!r} in --modes: use {', '.join(MODE_VARIANTS)}")
    if ns.repeat is not None and ns.repeat < 1:
        raise ConfigError("--repeat must be at least 1")
    progress = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not ns.quiet else None
    # a preset's per-host-page overrides give way to what the command line says
    given = set(_config_kwargs(ns)) | ({"repeat"} if ns.repeat else set())
    by_host_page = {hp: {k: v for k, v in over.items() if k not in given}
                    for hp, over in (by_host_page or {}).items()}
    results = compare(base, modes, pages, log=progress, repeat=ns.repeat or 1, by_host_page=by_host_page)
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump([{"mode": m, "host_page": hp, "run": i, "report": r.to_dict()}
                       for (m, hp), c in results.items() for i, r in enumerate(c.reports)], f, indent=2)
    print(format_table(results, modes, pages, qemu))
    return 0 if all(c.ok for c in results.values()) else EXIT_FAILED


def cmd_clean(ns: argparse.Namespace) -> int:
    removed = memory.sweep_stale()
    print(f"removed {len(removed)} stale segment(s)" + (": " + " ".join(removed) if removed else ""))
    left = memory.leftovers()
    if left:
        print("still in /dev/shm (owner alive): " + " ".join(left))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shmig", description="QEMU postcopy live migration with postcopy"
                                " preemption, emulated on one machine.")
    sub = p.add_subparsers(dest="cmd")
    r = sub.add_parser("run", help="perform one migration (the default)")
    _config_args(r)
    r.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    r.add_argument("--dist", action="store_true", help="print the fault-latency distribution")
    r.add_argument("--trace", metavar="PATH", help="write a Chrome/Perfetto trace (phases, faults, counters)")
    r.add_argument("-q", "--quiet", action="store_true")
    r.set_defaults(func=cmd_run)
    c = sub.add_parser("compare", help="run several modes (and host page sizes) and print one table")
    _config_args(c, with_mode=False)
    c.add_argument("--modes", help=f"comma-separated, from {','.join(MODE_VARIANTS)} (default: all)")
    c.add_argument("--host-pages", help="comma-separated host page sizes, e.g. 4KiB,2MiB,1GiB")
    c.add_argument("--preset", choices=sorted(PRESETS), help="a ready experiment (see README)")
    c.add_argument("--repeat", type=int, metavar="N",
                   help="run every cell N times with seeds seed..seed+N-1 and pool their faults"
                        " (for cells with few faults, e.g. 1GiB pages)")
    c.add_argument("--json", metavar="PATH", help="write every report as JSON")
    c.add_argument("-q", "--quiet", action="store_true")
    c.set_defaults(func=cmd_compare)
    k = sub.add_parser("clean", help="remove /dev/shm segments left by runs whose owner died")
    k.set_defaults(func=cmd_clean)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]
    ns = parser().parse_args(argv)
    try:
        return ns.func(ns)
    except (ConfigError, UnitError) as e:
        print(f"shmig: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("shmig: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
