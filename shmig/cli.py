"""The ``shmig`` command: ``run`` one migration, ``compare`` modes side by side, ``sweep`` one option,
``plot`` and ``report`` saved JSON, ``clean`` leftovers."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from typing import TYPE_CHECKING, Any, Callable, Sequence

from . import compare, memory, series, sweep
from .compare import PRESETS, MODE_VARIANTS, Cell, format_table, plan
from .config import FAULT_BACKENDS, MODES, WORKLOADS, Config, ConfigError
from .controller import Migration
from .policies import load_entry_points, load_policy
from .progress import LiveStatus
from .report import Companion, Report, SavedRun, load_runs, write_json
from .series import SeriesInterrupted
from .stats import format_dist
from .units import UnitError, fmt_size, parse_size

if TYPE_CHECKING:  # imported when --cluster is given: it needs dask
    from . import cluster

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130

UNITS_HELP = ("Units follow QEMU: sizes are binary whatever the spelling (64M = 64MB = 64MiB); in rates"
              " B is a byte and b a bit (100MB/s = 100MiB/s; 10Gb/s = 10Gbit/s = 10Gbps, bits decimal);"
              " durations need a unit (50us, 2ms, 1.5s). Values may start with '-' (they are refused"
              " with a line saying why, not taken for options).")


def _config_args(p: argparse.ArgumentParser, with_mode: bool = True, qemu_version: bool = True) -> None:
    g = p.add_argument_group("migration")
    if with_mode:
        g.add_argument("--mode", help=f"request-servicing policy: {', '.join(MODES)} or one loaded with"
                       " --policy (default: preempt)")
    g.add_argument("--policy", action="append", metavar="[NAME=]MODULE:CLASS",
                   help="load your own shmig.policies.Policy subclass as mode NAME (default: its `name`"
                        " attribute); repeatable. Installed packages' `shmig.policies` entry points load by"
                        " themselves")
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
    if qemu_version:
        g.add_argument("--qemu-version", metavar="V", help="the QEMU release the run stands for, e.g. 10.0 or"
                       " 9.2: its statuses, its switchover rate (10.0) and its completion (10.1); a mode"
                       " stands only for its own releases (default: the newest the mode stands for)")
    g.add_argument("--max-bandwidth", help="QEMU max-bandwidth (precopy), e.g. 100MiB/s; 0 or 'unlimited' ="
                   " no limit, as in QEMU (default)")
    g.add_argument("--max-postcopy-bandwidth", help="QEMU max-postcopy-bandwidth, e.g. 100MiB/s; 0 or"
                   " 'unlimited' = no limit, as in QEMU (default)")
    g.add_argument("--zero-page-detection", choices=("multifd", "legacy", "none"),
                   help="QEMU zero-page-detection: who finds all-zero pages so that they go as a flag;"
                   " without multifd channels multifd and legacy both mean the migration thread,"
                   " none sends them whole (default multifd)")
    g.add_argument("--multifd-channels", type=int, help="QEMU's multifd capability with this many channels"
                   " (1-255; 0 = off, the default): precopy pages go over them, each its own connection"
                   " on the link, postcopy pages over the main and preempt channels (QEMU 10.1)")
    n = p.add_argument_group("emulated link")
    n.add_argument("--bandwidth", help="link bandwidth shared by both channels, e.g. 10Gbit/s (default unlimited;"
                   " 0 is refused: leave the option out or say 'unlimited')")
    n.add_argument("--latency", help="one-way latency with a unit, e.g. 50us or 2ms, at most 1s (default 0)")
    n.add_argument("--socket-buffer", help="per channel queue before the sender blocks, fixed: send plus receive"
                   " buffer, as SO_SNDBUF/SO_RCVBUF lock them (default: as Linux autotunes them on this link"
                   " from the --tcp-* sysctls)")
    n.add_argument("--send-buffer", help="with --socket-buffer, the sender's part of it: a blocked sender resumes"
                   " once a third of it has drained (default: tcp_wmem max)")
    n.add_argument("--tcp-wmem", help="net.ipv4.tcp_wmem, min default max (default '4KiB 16KiB 4MiB', Linux's)")
    n.add_argument("--tcp-rmem", help="net.ipv4.tcp_rmem, min default max (default '4KiB 128KiB 32MiB',"
                   " Linux 6.16+; 5.x-6.15 had a 6MiB max)")
    n.add_argument("--tcp-notsent-lowat", help="net.ipv4.tcp_notsent_lowat: unsent bytes a writer may queue"
                   " (default unlimited)")
    w = p.add_argument_group("guest")
    w.add_argument("--workload", choices=WORKLOADS, help="access pattern (default random)")
    w.add_argument("--wss", help="working-set size (default: all RAM)")
    w.add_argument("--dirty-rate", help="bytes/s the guest writes, e.g. 64MiB/s (default: as fast as it can;"
                   " 0 is refused: leave the option out or say 'unlimited')")
    w.add_argument("--vcpus", type=int, help="vCPU processes (default 1)")
    w.add_argument("--seed", type=int, help="initial content and access streams, 0 to 2^64-1 (default 1)")
    w.add_argument("--zero-fraction", type=float, help="share of all-zero pages (default 0.1)")
    w.add_argument("--fault-backend", choices=FAULT_BACKENDS,
                   help="destination faults: bitmap (receivedmap + eventfd, default) or uffd (userfaultfd; needs root,"
                        " CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1)")
    w.add_argument("--hugetlb", action="store_true", default=None,
                   help="uffd backend: back 2MiB/1GiB host pages with real hugetlb pages")
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
               "socket_buffer", "send_buffer", "tcp_wmem", "tcp_rmem", "tcp_notsent_lowat", "workload", "wss",
               "dirty_rate", "vcpus", "seed", "zero_fraction", "deadline", "zero_page_detection", "time_dilation",
               "inject_faults", "recover_after", "multifd_channels", "qemu_version", "fault_backend", "hugetlb")


def _config_kwargs(ns: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(ns, k) for k in CONFIG_KEYS if getattr(ns, k, None) is not None}


def cmd_run(ns: argparse.Namespace) -> int:
    cfg = Config.from_strings(**_config_kwargs(ns)).validate()
    check_output("--json", ns.json)
    check_output("--trace", ns.trace)
    with LiveStatus(enabled=_live(ns)) as ui, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a trace that cannot be written is said below, once
        m = Migration(cfg, on_sample=ui.on_sample, trace=ns.trace)
        report = m.start().wait()
    lost = [m.trace_error] if m.trace_error else []
    if ns.json:
        lost += _write_or_print("--json", ns.json, report.to_dict)
    if not ns.quiet:
        print(report.summary())
        if ns.dist and report.postcopy_latency_us.get("count"):
            print("Postcopy Latency Distribution:")
            print(format_dist(report.postcopy_latency_dist))
    if not report.ok:  # -q hides the summary, never a failure
        error(report.error or report.status)
    for line in lost:
        error(line)
    if m.interrupted_late:  # Ctrl-C came while the results were handed back: they are all above
        print("shmig: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return _exit_code(report) or (EXIT_FAILED if lost else 0)


def cmd_serve(ns: argparse.Namespace) -> int:
    """A source and a destination VM with QMP monitors (shmig/vm.py), until quit on both or Ctrl-C."""
    from .vm import Pair
    check_output("--json", ns.json)
    base = {k: v for k, v in _config_kwargs(ns).items() if k != "qemu_version"}  # the monitors' claim, not a run's
    pair = Pair(base, ns.qmp_src, ns.qmp_dst, ns.qemu_version, ns.json)
    try:
        print(f"shmig: QMP source {ns.qmp_src}, destination {ns.qmp_dst}: 'quit' on both ends it",
              file=sys.stderr, flush=True)
        while not pair.done.wait(0.2):
            pass
    finally:
        pair.close()
    if pair.report is not None and not pair.report.ok:
        error(pair.report.error or pair.report.status)
        return EXIT_FAILED
    return 0


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


def _write_or_print(option: str, path: str, document: Callable[[Companion | None], Any]) -> list[str]:
    """Write a JSON output file (``document(companion)`` builds it; long fault tables go to the
    companion .npz beside it); if that fails at the end of a run, print the whole document instead,
    so the results are never lost. Returns the error line, if any."""
    companion = Companion(path)
    try:
        write_json(path, document(companion), companion)
    except OSError as e:
        print(json.dumps(document(None), indent=2))
        return [f"{option} {path}: cannot write it ({e.strerror or e}); printed on stdout instead"]
    return []


def _list_arg(text: str, option: str) -> list[str]:
    """``a,b`` and ``a, b`` alike; an empty item is a mistake, not something to skip."""
    items = [x.strip() for x in text.split(",")]
    if not all(items):
        raise ConfigError(f"{option} {text!r} has an empty item: separate the values with commas, e.g."
                          f" {option} vanilla,preempt")
    return items


def _live(ns: argparse.Namespace) -> bool:
    """The live status line: on a terminal, unless -q."""
    return sys.stderr.isatty() and not ns.quiet


def _register_policies(ns: argparse.Namespace) -> None:
    """Installed packages' entry points, then every --policy; each becomes a mode `compare` and
    `sweep` accept too (and run when no --modes is given)."""
    names, problems = load_entry_points()
    for line in problems:
        print(f"shmig: warning: {line}", file=sys.stderr)
    names += [load_policy(spec) for spec in ns.policy or ()]
    for name in names:
        MODE_VARIANTS.setdefault(name, {"mode": name})


def _plot_check(path: str | None) -> None:
    """Before any run: matplotlib is there and the picture can be written."""
    if path:
        from .plot import check_output

        check_output(path)


def _plot(runs: list[SavedRun], path: str | None, quiet: bool) -> None:
    if path and runs:
        from .plot import plot_runs

        plot_runs(runs, path)
        if not quiet:
            print(f"shmig: wrote {path}", file=sys.stderr)


def _exit_code(report: Report) -> int:
    if report.ok:
        return 0
    if report.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILED


COMPARE_RUN = re.compile(r"\[(\d+)/(\d+)\] running (.*?)(?: \.\.\.)?$")


def _compare_log(ui: LiveStatus, quiet: bool) -> Callable[[str], None]:
    """compare()'s log: "[i/n] running ..." starts a run of the live line (which then names it);
    every other line stays, unless -q."""
    def log(msg: str) -> None:
        m = COMPARE_RUN.match(msg)
        if m:
            ui.total = int(m.group(2))
            ui.begin(m.group(3))
            if ui.on_sample is not None:
                return
        if not quiet:
            ui.log(msg)
    return log


def cmd_compare(ns: argparse.Namespace) -> int:
    target = _cluster_target(ns)
    base = dict(PRESETS[ns.preset]) if ns.preset else {}
    base.update(_config_kwargs(ns))
    modes = _list_arg(ns.modes, "--modes") if ns.modes else base.pop("modes", list(MODE_VARIANTS))
    base.pop("modes", None)
    pages = ([parse_size(x) for x in _list_arg(ns.host_pages, "--host-pages")] if ns.host_pages
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
    # a preset's per-host-page overrides give way to what the command line says
    given = set(_config_kwargs(ns)) | ({"repeat"} if ns.repeat else set())
    by_host_page = {hp: {k: v for k, v in over.items() if k not in given}
                    for hp, over in (by_host_page or {}).items()}
    plans = plan(base, modes, pages, ns.repeat or 1, by_host_page)  # what runs; a row may leave a mode out
    widest = max(([lb for lb, h in plans if h == hp] for hp in pages), key=len, default=[])
    labels = list(dict.fromkeys(widest + [lb for lb, _ in plans]))
    p = compare.planned(plans)
    done = p.resume(ns.resume) if ns.resume else {}
    _plot_check(ns.plot)
    check_output("--json", ns.json)
    factors = compare.ran_at(p, done)  # rows resumed run on the clock they began with
    todo = compare.with_factors(p.missing(done), factors)
    ui = LiveStatus(len(todo), enabled=_live(ns))
    log = _compare_log(ui, ns.quiet)
    for hp, d in factors.items():
        if any(r.host_page == hp for r in todo):
            log(f"time dilation for {fmt_size(hp)} pages: {d.factor:g}x, as its runs in {ns.resume} had")

    def here() -> dict[int, Report]:
        factors.update(compare.calibrate(todo, log, known=factors))
        runs = compare.with_factors(todo, factors)
        return series.run_local(runs, compare.announce(log, len(runs)), ui.on_sample, log)

    with ui:
        new, interrupted = _run_series(ns, target, todo, ui, log, here)
    results = {**done, **new}
    compare.note_calibration(results, p.runs, factors)
    if target is not None:
        for line in compare.dilation_notes(p, results, factors):
            log(line)
    ordered = p.ordered(results)
    unwritten = []
    if ns.json:
        unwritten = _write_or_print("--json", ns.json, lambda comp: p.stamp(
            [{"mode": r.mode, "host_page": r.host_page, "run": r.run, "report": rep.to_dict(comp)}
             for r, rep in ordered], [r for r, _ in ordered]))
    cells = compare.cells(p, results)
    print(format_table(cells, labels, pages, qemu))
    _plot([r.saved(rep) for r, rep in ordered], ns.plot, ns.quiet)
    for r, rep in ordered:
        if not rep.ok:
            error(f"{r.mode} with {fmt_size(r.host_page)} host pages: {rep.error or rep.status}{_where(rep)}")
    for line in unwritten:
        error(line)
    if interrupted:
        print(f"shmig: interrupted: {len(results)} of {len(p.runs)} runs finished", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0 if all(c.ok for c in cells.values()) and not unwritten else EXIT_FAILED


def cmd_sweep(ns: argparse.Namespace) -> int:
    target = _cluster_target(ns)
    knob = sweep.knob_name(ns.knob, CONFIG_KEYS)
    modes = _list_arg(ns.modes, "--modes") if ns.modes else [Config.mode]
    p = sweep.planned(knob, sweep.plan(_config_kwargs(ns), knob, ns.values.split(","), modes))
    done = p.resume(ns.resume) if ns.resume else {}
    _plot_check(ns.plot)
    check_output("--json", ns.json)
    todo = p.missing(done)
    with LiveStatus(len(todo), enabled=_live(ns), announce=not ns.quiet) as ui:
        log = ui.log if ui.announce else None
        new, interrupted = _run_series(ns, target, todo, ui, log, lambda: series.run_local(
            todo, lambda _, r: ui.begin(r.name), ui.on_sample, log))
    results = {**done, **new}
    ordered = p.ordered(results)
    saved = [r.saved(rep) for r, rep in ordered]
    unwritten = (_write_or_print("--json", ns.json, lambda comp: p.stamp(sweep.to_json(saved, comp),
                                                                        [r for r, _ in ordered])) if ns.json else [])
    if saved:
        print(sweep.format_sweep(saved))
    _plot(saved, ns.plot, ns.quiet)
    for line in unwritten:
        error(line)
    if interrupted:
        print(f"shmig: interrupted: {len(results)} of {len(p.runs)} runs finished", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0 if all(r.report.ok for r in saved) and not unwritten else EXIT_FAILED


def _cluster_target(ns: argparse.Namespace) -> cluster.Target | None:
    """``--cluster``, checked before anything else: dask is there and the address reads."""
    if not ns.cluster:
        return None
    try:
        from . import cluster
    except ImportError as e:
        raise ConfigError(f"--cluster needs dask.distributed ({e}): pip install -e '.[cluster]'") from None
    return cluster.Target.parse(ns.cluster)


def _run_series(ns: argparse.Namespace, target: cluster.Target | None, todo: list[series.PlannedRun], ui: LiveStatus,
                log: Callable[[str], None] | None,
                here: Callable[[], dict[int, Report]]) -> tuple[dict[int, Report], bool]:
    """The runs still to do, here (``here()``) or on the cluster: (reports by plan index, whether
    Ctrl-C stopped them)."""
    if not todo:
        if log:
            log(f"nothing to run: every run is in {ns.resume}")
        return {}, False
    try:
        if target is None:
            return here(), False
        from . import cluster

        with cluster.Session(target, log) as session:
            return session.run(todo, ui, log, ns.policy or ()), False
    except SeriesInterrupted as e:  # one Ctrl-C stops the whole series; what finished is kept
        return e.results or {}, True


def _where(rep: Report) -> str:
    """Where a run on a cluster ran, for its error line."""
    return f" (on {rep.host.get('hostname') or rep.host['worker']})" if rep.host.get("worker") else ""


def cmd_plot(ns: argparse.Namespace) -> int:
    from .plot import plot_files

    plot_files(ns.reports, ns.output)
    print(f"wrote {ns.output}")
    return 0


def cmd_report(ns: argparse.Namespace) -> int:
    """The summary of a saved run, the table of a saved compare or sweep, as they were printed."""
    for i, path in enumerate(ns.reports):
        runs = load_runs(path)
        if i:
            print()
        if len(ns.reports) > 1:
            print(f"== {path}")
        if runs[0].knob:
            print(sweep.format_sweep(runs))
        elif len(runs) == 1:
            rep = runs[0].report
            print(rep.summary())
            if ns.dist and rep.postcopy_latency_us.get("count"):
                print("Postcopy Latency Distribution:")
                print(format_dist(rep.postcopy_latency_dist))
        else:
            cells: dict[tuple[str, int], Cell] = {}
            for r in runs:  # a --repeat compare holds several runs per cell
                cells.setdefault((r.mode, r.host_page), Cell()).reports.append(r.report)
            modes = list(dict.fromkeys(m for m, _ in cells))
            pages = list(dict.fromkeys(hp for _, hp in cells))
            print(format_table(cells, modes, pages))
    return 0


def cmd_clean(ns: argparse.Namespace) -> int:
    swept = memory.sweep()
    removed = swept.removed
    print(f"removed {len(removed)} stale segment(s)" + (": " + " ".join(removed) if removed else ""))
    if swept.failed:
        print("could not remove (permission): " + " ".join(swept.failed))
    if swept.foreign:
        print("left alone (made in another PID namespace): " + " ".join(swept.foreign))
    left = [n for n in memory.leftovers() if n not in swept.failed and n not in swept.foreign]
    if left:
        print("still in /dev/shm (owner alive): " + " ".join(left))
    return 0


def _series_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", metavar="ADDRESS",
                   help="run every run on a dask.distributed cluster, one at a time per worker: a scheduler's"
                        " address (tcp://host:8786; start workers with `dask worker ADDRESS --nthreads 1"
                        " --resources shmig=1`, one per machine), or local:N to start N single-threaded workers"
                        " on this machine, whose runs then share its cores and interfere with each other's"
                        " timings (for trying it out). Needs pip install -e '.[cluster]'")
    p.add_argument("--resume", metavar="PARTIAL.json",
                   help="continue an interrupted run of this same command: PARTIAL.json is what its --json"
                        " wrote; only the runs missing from it run, and the result holds them all")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shmig", description="QEMU postcopy live migration with postcopy"
                                " preemption, emulated on one machine.", epilog=UNITS_HELP, allow_abbrev=False)
    sub = p.add_subparsers(dest="cmd")
    r = sub.add_parser("run", help="perform one migration (the default)", epilog=UNITS_HELP, allow_abbrev=False)
    _config_args(r)
    r.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    r.add_argument("--dist", action="store_true", help="print the fault-latency distribution")
    r.add_argument("--trace", metavar="PATH", help="write a Chrome/Perfetto trace of every process (open in ui.perfetto.dev)")
    r.add_argument("-q", "--quiet", action="store_true")
    r.set_defaults(func=cmd_run)
    sv = sub.add_parser("serve", help="a source and a destination VM, each with a QMP monitor (driven as QEMU is)",
                        epilog=UNITS_HELP, allow_abbrev=False)
    _config_args(sv, qemu_version=False)  # its own --qemu-version: the release the monitors claim
    sv.add_argument("--qmp-src", required=True, metavar="unix:PATH|tcp:127.0.0.1:PORT", help="the source's monitor")
    sv.add_argument("--qmp-dst", required=True, metavar="unix:PATH|tcp:127.0.0.1:PORT",
                    help="the destination's monitor (it waits as with -incoming defer)")
    sv.add_argument("--qemu-version", default="10.2.50", help="the QEMU the monitors claim: 7.2 makes"
                    " postcopy-preempt the 7.1 mode, 10.1+ adds the page hint (default 10.2.50)")
    sv.add_argument("--json", metavar="PATH", help="write the run's report as JSON when it ends")
    sv.set_defaults(func=cmd_serve)
    c = sub.add_parser("compare", help="run several modes (and host page sizes) and print one table",
                       epilog=UNITS_HELP, allow_abbrev=False)
    _config_args(c, with_mode=False)
    c.add_argument("--modes", help=f"comma-separated, from {','.join(MODE_VARIANTS)} (default: all)")
    c.add_argument("--host-pages", help="comma-separated host page sizes, e.g. 4KiB,2MiB,1GiB")
    c.add_argument("--preset", choices=sorted(PRESETS), help="a ready experiment (see README)")
    c.add_argument("--repeat", type=int, metavar="N",
                   help="run every cell N times with seeds seed..seed+N-1 and pool their faults"
                        " (for cells with few faults, e.g. 1GiB pages)")
    c.add_argument("--json", metavar="PATH", help="write every report as JSON")
    c.add_argument("--plot", metavar="PNG", help="draw the fault-latency distributions (needs matplotlib)")
    _series_args(c)
    c.add_argument("-q", "--quiet", action="store_true")
    c.set_defaults(func=cmd_compare)
    s = sub.add_parser("sweep", help="run one option over several values (and modes) and print one table",
                       description="Run every value of one `shmig run` option with every mode, e.g."
                                   " `shmig sweep socket-buffer 1MiB,4MiB,16MiB --modes vanilla,preempt-full"
                                   " --bandwidth 1Gbit/s`. Ctrl-C stops the sweep; the finished runs are"
                                   " printed (and saved with --json).", epilog=UNITS_HELP, allow_abbrev=False)
    s.add_argument("knob", metavar="KNOB", help="the option to vary, as spelled on the command line"
                   " (socket-buffer, bandwidth, host-page, vcpus, ...)")
    s.add_argument("values", metavar="VALUES", help="comma-separated values, e.g. 1MiB,4MiB,16MiB"
                   " (on,off for flags)")
    _config_args(s, with_mode=False)
    s.add_argument("--modes", help="comma-separated, from precopy,"
                   f"{','.join(MODE_VARIANTS)} (default: preempt)")
    s.add_argument("--json", metavar="PATH", help="write every report as JSON")
    s.add_argument("--plot", metavar="PNG", help="draw p50/p99 latency, guest progress and total time"
                   " against KNOB (needs matplotlib)")
    _series_args(s)
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=cmd_sweep)
    pl = sub.add_parser("plot", help="draw saved reports (run, compare or sweep --json) into a picture",
                        allow_abbrev=False)
    pl.add_argument("reports", nargs="+", metavar="REPORT.json")
    pl.add_argument("-o", "--output", required=True, metavar="PNG", help="the picture (.png, .svg or .pdf)")
    pl.set_defaults(func=cmd_plot)
    rp = sub.add_parser("report", help="print the summary (or table) of saved reports", allow_abbrev=False)
    rp.add_argument("reports", nargs="+", metavar="REPORT.json")
    rp.add_argument("--dist", action="store_true", help="a single run: print the fault-latency distribution")
    rp.set_defaults(func=cmd_report)
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
        if hasattr(ns, "policy"):
            _register_policies(ns)
        return ns.func(ns)
    except (ConfigError, UnitError) as e:
        error(str(e))
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("shmig: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `shmig report x.json | head`: the reader has gone, as with any Unix tool
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
