"""The ``shmig`` command: ``run`` one migration, ``compare`` modes side by side, ``clean`` leftovers."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Any, Sequence

from . import memory
from .compare import PRESETS, MODE_VARIANTS, SeriesInterrupted, describe_run, format_table, plan, run_series
from .config import MODES, WORKLOADS, Config, ConfigError
from .controller import Migration
from .report import Report
from .stats import format_dist
from .units import UnitError, fmt_size, parse_size

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130

UNITS_HELP = ("Units follow QEMU: sizes are binary whatever the spelling (64M = 64MB = 64MiB); in rates"
              " B is a byte and b a bit (100MB/s = 100MiB/s; 10Gb/s = 10Gbit/s = 10Gbps, bits decimal);"
              " durations need a unit (50us, 2ms, 1.5s). Values may start with '-' (they are refused"
              " with a line saying why, not taken for options).")


def _config_args(p: argparse.ArgumentParser, with_mode: bool = True) -> None:
    g = p.add_argument_group("migration")
    if with_mode:
        g.add_argument("--mode", choices=MODES, help="request-servicing policy (default: preempt)")
    g.add_argument("--ram", help="guest RAM, e.g. 128MiB (default 128MiB)")
    g.add_argument("--host-page", help="4KiB, 2MiB or 1GiB (default 4KiB)")
    g.add_argument("--precopy-rounds", type=int,
                   help="full precopy rounds before postcopy starts (default 1; 0 = right after setup)")
    g.add_argument("--max-rounds", type=int, help="precopy: give up converging after N rounds (default 30)")
    g.add_argument("--downtime-limit", help="precopy switch threshold, e.g. 300ms (default); the report says"
                   " whether the run converged within it")
    g.add_argument("--no-break-huge", dest="break_huge", action="store_false", default=None,
                   help="preempt: x-postcopy-preempt-break-huge=off")
    g.add_argument("--page-hint", action="store_true", default=None,
                   help="preempt-full: QEMU 10.1's spatial locality hint")
    g.add_argument("--max-bandwidth", help="QEMU max-bandwidth (precopy), e.g. 100MiB/s; 0 or 'unlimited' ="
                   " no limit, as in QEMU (default)")
    g.add_argument("--max-postcopy-bandwidth", help="QEMU max-postcopy-bandwidth, e.g. 100MiB/s; 0 or"
                   " 'unlimited' = no limit, as in QEMU (default)")
    n = p.add_argument_group("emulated link")
    n.add_argument("--bandwidth", help="link bandwidth shared by both channels, e.g. 10Gbit/s (default unlimited;"
                   " 0 is refused: leave the option out or say 'unlimited')")
    n.add_argument("--latency", help="one-way latency with a unit, e.g. 50us or 2ms, at most 1s (default 0)")
    n.add_argument("--socket-buffer", help="per channel queue before the sender blocks (default 4MiB)")
    w = p.add_argument_group("guest")
    w.add_argument("--workload", choices=WORKLOADS, help="access pattern (default random)")
    w.add_argument("--wss", help="working-set size (default: all RAM)")
    w.add_argument("--dirty-rate", help="bytes/s the guest writes, e.g. 64MiB/s (default: as fast as it can;"
                   " 0 is refused: leave the option out or say 'unlimited')")
    w.add_argument("--vcpus", type=int, help="vCPU processes (default 1)")
    w.add_argument("--seed", type=int, help="initial content and access streams, 0 to 2^64-1 (default 1)")
    w.add_argument("--zero-fraction", type=float, help="share of all-zero pages (default 0.1)")
    p.add_argument("--deadline", help="the run fails after this long, naming who waited for what (default 300s)")


CONFIG_KEYS = ("mode", "ram", "host_page", "precopy_rounds", "max_rounds", "downtime_limit", "break_huge",
               "page_hint", "max_bandwidth", "max_postcopy_bandwidth", "bandwidth", "latency",
               "socket_buffer", "workload", "wss", "dirty_rate", "vcpus", "seed", "zero_fraction", "deadline")


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
    check_output("--json", ns.json)
    check_output("--trace", ns.trace)
    progress = Progress(sys.stderr.isatty() and not ns.quiet)
    m = Migration(cfg, on_sample=progress, trace=ns.trace)
    try:
        with warnings.catch_warnings():  # a trace that cannot be written is reported below, once
            warnings.simplefilter("ignore", RuntimeWarning)
            report = m.start().wait()
    finally:
        progress.done()
    lost = [m.trace_error] if m.trace_error else []
    if ns.json:
        lost += _write_or_print("--json", ns.json, report.to_json())
    if not ns.quiet:
        print(report.summary())
        if ns.dist and report.postcopy_latency_us.get("count"):
            print("Postcopy Latency Distribution:")
            print(format_dist(report.postcopy_latency_dist))
    if not report.ok:  # -q hides the summary, never a failure
        error(report.error or report.status)
    for line in lost:
        error(line)
    code = _exit_code(report)
    return code or (EXIT_FAILED if lost else 0)


def _exit_code(report: Report) -> int:
    if report.ok:
        return 0
    if report.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILED


def error(line: str) -> None:
    print(f"shmig: error: {line}", file=sys.stderr, flush=True)


def check_output(option: str, path: str | None) -> None:
    """An output file that cannot be written is a usage error found before anything is allocated,
    not a traceback after a long run."""
    if not path:
        return
    full = os.path.abspath(path)
    where = os.path.dirname(full)
    if os.path.isdir(full):
        raise ConfigError(f"{option} {path} is a directory: give a file name")
    if not os.path.isdir(where):
        raise ConfigError(f"{option} {path}: directory {where} does not exist: create it or choose another path")
    if not os.access(full if os.path.exists(full) else where, os.W_OK):
        raise ConfigError(f"{option} {path} is not writable: choose another path")


def _write_or_print(option: str, path: str, text: str) -> list[str]:
    """Write an output file; if that fails at the end of a run, print what it should have held
    instead, so the results are never lost. Returns the error line, if any."""
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        print(text)
        return [f"{option} {path}: cannot write it ({e.strerror or e}); printed on stdout instead"]
    return []


def _list_arg(text: str, option: str) -> list[str]:
    """``a,b`` and ``a, b`` alike; an empty item is a mistake, not something to skip."""
    items = [x.strip() for x in text.split(",")]
    if not all(items):
        raise ConfigError(f"{option} {text!r} has an empty item: separate the values with commas, e.g."
                          f" {option} vanilla,preempt")
    return items


def cmd_compare(ns: argparse.Namespace) -> int:
    base = dict(PRESETS[ns.preset]) if ns.preset else {}
    base.update(_config_kwargs(ns))
    modes = _list_arg(ns.modes, "--modes") if ns.modes else base.pop("modes", list(MODE_VARIANTS))
    base.pop("modes", None)
    pages = ([parse_size(x) for x in _list_arg(ns.host_pages, "--host-pages")] if ns.host_pages
             else base.pop("host_pages", [parse_size(base.pop("host_page", 4096))]))
    base.pop("host_pages", None)
    base.pop("host_page", None)
    for m in modes:
        if m not in MODE_VARIANTS:
            raise ConfigError(f"unknown mode {m!r} in --modes: use {', '.join(MODE_VARIANTS)}")
    cfgs = plan(base, modes, pages)  # every run validated, labelled with what it actually runs
    check_output("--json", ns.json)
    labels = list(dict.fromkeys(label for label, _ in cfgs))
    progress = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not ns.quiet else None
    try:
        results = run_series(cfgs, log=progress, describe=describe_run)
        interrupted = False
    except SeriesInterrupted as e:  # Ctrl-C stops the whole compare; what finished is kept
        results, interrupted = e.results, True
    lost = []
    if ns.json:
        lost = _write_or_print("--json", ns.json, json.dumps(
            [{"mode": m, "host_page": hp, "report": r.to_dict()} for (m, hp), r in results.items()], indent=2))
    print(format_table(results, labels, pages))
    for (m, hp), r in results.items():
        if not r.ok:
            error(f"{m} with {fmt_size(hp)} host pages: {r.error or r.status}")
    for line in lost:
        error(line)
    if interrupted:
        print(f"shmig: interrupted: {len(results)} of {len(cfgs)} runs finished", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0 if all(r.ok for r in results.values()) and not lost else EXIT_FAILED


def cmd_clean(ns: argparse.Namespace) -> int:
    removed = memory.sweep_stale()
    print(f"removed {len(removed)} stale segment(s)" + (": " + " ".join(removed) if removed else ""))
    left = memory.leftovers()
    if left:
        print("still in /dev/shm (owner alive): " + " ".join(left))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shmig", description="QEMU postcopy live migration with postcopy"
                                " preemption, emulated on one machine.", epilog=UNITS_HELP, allow_abbrev=False)
    sub = p.add_subparsers(dest="cmd")
    r = sub.add_parser("run", help="perform one migration (the default)", epilog=UNITS_HELP, allow_abbrev=False)
    _config_args(r)
    r.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    r.add_argument("--dist", action="store_true", help="print the fault-latency distribution")
    r.add_argument("--trace", metavar="PATH", help="write a Chrome/Perfetto trace (phases, faults, counters)")
    r.add_argument("-q", "--quiet", action="store_true")
    r.set_defaults(func=cmd_run)
    c = sub.add_parser("compare", help="run several modes (and host page sizes) and print one table",
                       epilog=UNITS_HELP, allow_abbrev=False)
    _config_args(c, with_mode=False)
    c.add_argument("--modes", help=f"comma-separated, from {','.join(MODE_VARIANTS)} (default: all)")
    c.add_argument("--host-pages", help="comma-separated host page sizes, e.g. 4KiB,2MiB,1GiB")
    c.add_argument("--preset", choices=sorted(PRESETS), help="a ready experiment (see README)")
    c.add_argument("--json", metavar="PATH", help="write every report as JSON")
    c.add_argument("-q", "--quiet", action="store_true")
    c.set_defaults(func=cmd_compare)
    k = sub.add_parser("clean", help="remove /dev/shm segments left by runs whose owner died", allow_abbrev=False)
    k.set_defaults(func=cmd_clean)
    return p


def join_dashed_values(argv: list[str], p: argparse.ArgumentParser) -> list[str]:
    """``--latency -1us`` -> ``--latency=-1us``: argparse takes a value that starts with '-' (and
    is not a plain number) for an option; joined, it reaches the validator, which says what is wrong."""
    takes_value, options = set(), set()
    parsers = [p]
    while parsers:
        q = parsers.pop()
        for a in q._actions:
            options.update(a.option_strings)
            if a.option_strings and a.nargs is None:
                takes_value.update(a.option_strings)
            if isinstance(a, argparse._SubParsersAction):
                parsers += a.choices.values()
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if (a in takes_value and i + 1 < len(argv) and argv[i + 1].startswith("-")
                and argv[i + 1] not in options and argv[i + 1] != "--"):
            out.append(f"{a}={argv[i + 1]}")
            i += 2
        else:
            out.append(a)
            i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]
    p = parser()
    ns = p.parse_args(join_dashed_values(argv, p))
    try:
        return ns.func(ns)
    except (ConfigError, UnitError) as e:
        error(str(e))
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("shmig: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
