"""Several modes and host page sizes on one configuration, laid out like QEMU's cover letter table."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .calibrate import calibrate_dilation
from .config import MAX_SEED, Config
from .errors import ConfigError
from .controller import run
from .timeline import Sample
from .report import Report
from .series import Plan, PlannedRun, SeriesInterrupted, run_local
from .units import fmt_size

# the columns of the postcopy-preempt cover letter, plus 10.1's hint
MODE_VARIANTS: dict[str, dict[str, Any]] = {
    "vanilla": {"mode": "vanilla"},
    "preempt-nobreak": {"mode": "preempt", "break_huge": False},
    "preempt": {"mode": "preempt"},
    "preempt-full": {"mode": "preempt-full"},
    "preempt-full-hint": {"mode": "preempt-full", "page_hint": True},
}

# QEMU's own numbers: mean page-request latency (ms) in the postcopy-preempt cover letters v2-v9
# (reference 1.3). The letter's "Preempt full" column is 7.1 with break-huge, shmig's "preempt".
QEMU_COVER_LETTER: dict[tuple[int, str], float] = {
    (4096, "vanilla"): 10.68, (4096, "preempt"): 0.57,
    (2 << 20, "vanilla"): 10.58, (2 << 20, "preempt-nobreak"): 5.49, (2 << 20, "preempt"): 5.02,
    (1 << 30, "vanilla"): 2046.65, (1 << 30, "preempt-nobreak"): 933.185, (1 << 30, "preempt"): 649.445,
}

PRESETS: dict[str, dict[str, Any]] = {
    # The RFC/v2 cover letter's experiment on this machine: a 10 Gbit/s NIC; per channel the queue
    # Linux's autotuning gives a bulk TCP connection there with its default sysctls (shmig.tcp: a
    # 4 MiB send buffer and a 10.6 MiB receive window at 10 Gbit/s and 100 us); one
    # vCPU writing at random as fast as it can over all of RAM. The letter's guest dirties its whole
    # working set continuously, so postcopy starts right after setup: every page is still to send at
    # switchover, as it is there, without spending a precopy round on it. The one-way latency stands
    # for the NIC: the RFC's preempt histogram for 4 KiB pages has thousands of whole page requests
    # (fault, request, page, placement) done in 64-128 us, so the network's round trip is below
    # ~100 us: 50 us each way. The machine cannot carry 10 Gbit/s while the vCPU holds a core: time
    # is dilated as much as it needs.
    # A request for a page already queued on the precopy channel waits for that queue whatever the
    # mode; with random faults over RAM M and a queue Q that is 2Q/M of them (the letter's 18 GiB:
    # 0.1%). RAM is 1 GiB for 4 KiB pages (2%, over a thousand faults per preempt cell), 512 MiB
    # for 2 MiB pages (a hundred faults a cell) and 2 GiB for 1 GiB pages: two pages, one or two
    # faults a run. Every mode faults on the same pages with the same seed, and seed 1's first
    # fault is on the page not yet started, the case where the modes differ (a fault on the page
    # in flight waits for its rest alike in every mode: pooling such runs only dilutes the row).
    # Sizes that keep the preset within 3 minutes. With 4 KiB pages preempt-nobreak
    # is preempt (there is no huge page to break; the letter says N/A) and is not run twice.
    # Nothing here is tuned to the results.
    "cover-letter": {
        "ram": "512MiB", "bandwidth": "10Gbit/s", "latency": "50us",
        "workload": "random", "vcpus": 1, "precopy_rounds": 0, "time_dilation": "auto", "deadline": "120s",
        "modes": ["vanilla", "preempt-nobreak", "preempt", "preempt-full"],
        "host_pages": [4096, 2 << 20, 1 << 30],
        "by_host_page": {4096: {"ram": "1GiB", "modes": ["vanilla", "preempt", "preempt-full"]},
                         1 << 30: {"ram": "2GiB"}},
        "qemu": QEMU_COVER_LETTER,
    },
    # Locality (QEMU 10.1's page hint): a guest streaming through its working set more slowly than
    # the source's postcopy rate limit, everything still to come when it resumes. Vanilla's scan
    # restarts after each request and runs ahead of it; preempt-full's does not, unless hinted.
    "stream": {
        "ram": "256MiB", "wss": "128MiB", "workload": "sequential", "dirty_rate": "64MiB/s",
        "max_bandwidth": "100MiB/s", "max_postcopy_bandwidth": "100MiB/s", "precopy_rounds": 0,
        "modes": ["vanilla", "preempt", "preempt-full", "preempt-full-hint"],
    },
}


def variant_config(base: dict[str, Any], mode: str, host_page: int) -> Config:
    """The variant's own settings over the common ones (``--no-break-huge`` with preempt-nobreak
    says the same thing twice, which is no error)."""
    return Config.from_strings(**{**base, "host_page": host_page, **MODE_VARIANTS[mode]})


def label_of(cfg: Config) -> str:
    """The name of what ``cfg`` runs, from what it is rather than what was asked for: ``--modes
    preempt --no-break-huge`` runs (and is labelled) preempt-nobreak."""
    for name, kw in MODE_VARIANTS.items():
        if (cfg.mode == kw["mode"] and cfg.break_huge == kw.get("break_huge", True)
                and cfg.page_hint == kw.get("page_hint", False)):
            return name
    return cfg.mode + ("-nobreak" if not cfg.break_huge else "") + ("-hint" if cfg.page_hint else "")


@dataclass
class Cell:
    """One (mode, host page) of a compare: one run, or several with different seeds, pooled."""

    reports: list[Report] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.reports) and all(r.ok for r in self.reports)

    @property
    def faults(self) -> int:
        return sum(r.postcopy_latency_us.get("count", 0) for r in self.reports)

    @property
    def mean_us(self) -> float | None:
        """The pooled mean: every fault of every run counts once."""
        n = self.faults
        if not n:
            return None
        return sum(r.postcopy_latency_us["mean"] * r.postcopy_latency_us["count"]
                   for r in self.reports if r.postcopy_latency_us.get("count")) / n

    @property
    def run_means_us(self) -> list[float]:
        return [r.postcopy_latency_us["mean"] for r in self.reports if r.postcopy_latency_us.get("count")]


def plan(base: dict[str, Any], modes: Sequence[str], host_pages: Sequence[int], repeat: int = 1,
         by_host_page: dict[int, dict[str, Any]] | None = None) -> dict[tuple[str, int], tuple[Config, int]]:
    """(label, host page) -> (validated Config, runs), for every cell before the first run (a host
    page size may override options, its own ``repeat`` and its ``modes``). Cells are labelled with what they run;
    two requested modes that come out the same run once."""
    plans: dict[tuple[str, int], tuple[Config, int]] = {}
    for hp in host_pages:
        over = dict((by_host_page or {}).get(hp, {}))
        n = int(over.pop("repeat", repeat))
        only = over.pop("modes", None)  # a row may leave modes out (one that is another there)
        for m in [m for m in modes if only is None or m in only]:
            cfg = variant_config({**base, **over}, m, hp).validate()
            if n < 1 or cfg.seed + n - 1 > MAX_SEED:  # every seed of the series, before the first runs
                raise ConfigError(f"--repeat {n} with --seed {cfg.seed}: the seeds run from --seed to --seed"
                                  f" + repeat - 1, and must stay at most 2^64-1 with repeat at least 1")
            plans.setdefault((label_of(cfg), hp), (cfg, n))
    if not plans:
        raise ConfigError(f"nothing to run: no mode of {', '.join(modes)} runs with host pages"
                          f" {', '.join(fmt_size(h) for h in host_pages)}: choose other --modes or --host-pages")
    return plans


@dataclass(frozen=True)
class Dilation:
    """A row's ``--time-dilation auto``, resolved: the factor its modes share, and what each factor
    tried on each mode carried (the report's ``time_dilation.calibration``)."""

    factor: float
    calibration: list[dict[str, Any]] = field(default_factory=list)


def planned(plans: dict[tuple[str, int], tuple[Config, int]]) -> Plan:
    """``plan``'s cells as runs, in plan order: each cell's runs with seeds seed, seed + 1, ...
    With ``time_dilation="auto"`` a run carries its row's configs (one per mode): the row is
    calibrated together, on the machine that runs it, and the largest factor is kept."""
    rows = {hp: tuple(cfg for (_, h), (cfg, _) in plans.items() if h == hp and cfg.time_dilation == "auto")
            for _, hp in plans}
    runs: list[PlannedRun] = []
    for (m, hp), (cfg, n) in plans.items():
        for i in range(n):
            runs.append(PlannedRun(len(runs), f"{m} with {fmt_size(hp)} host pages"
                                   + (f" (seed {cfg.seed + i})" if n > 1 else ""),
                                   dataclasses.replace(cfg, seed=cfg.seed + i), m, hp, run=i,
                                   calibrate=rows[hp] if cfg.time_dilation == "auto" else ()))
    return Plan("compare", tuple(runs))


def calibrate_row(row: Sequence[Config], start: float = 1.0) -> Dilation:
    """The largest factor any mode of the row needs on this machine (none below ``start``), and
    every factor tried, each with the mode it was tried on."""
    factor, tried = start, []
    for cfg in row:
        factor, t = calibrate_dilation(cfg, run, start=factor)
        tried += [{"mode": label_of(cfg), **x} for x in t]
    return Dilation(factor, tried)


def calibrate(runs: Sequence[PlannedRun], log: Callable[[str], None] | None = None,
              known: dict[int, Dilation] | None = None) -> dict[int, Dilation]:
    """``time_dilation="auto"`` here, per host page size (a row), on every mode of the row: the
    largest factor is kept, so the modes of a row run on the same clock and none of them outruns
    the machine. Rows in ``known`` keep their factor."""
    out = dict(known or {})
    factor = 1.0
    rows = {r.host_page: r.calibrate for r in runs if r.calibrate}
    for hp in sorted(rows, reverse=True):  # a smaller host page costs the machine at least as much per
        # byte (more frames, more faults), so its search starts where the larger page's ended
        if hp in out:
            continue
        out[hp] = row = calibrate_row(rows[hp], start=factor)
        factor = row.factor
        if log:
            log(f"time dilation for {fmt_size(hp)} pages: {factor:g}x (calibrated on"
                f" {', '.join(label_of(c) for c in rows[hp])})")
    return out


def ran_at(plan: Plan, done: dict[int, Report]) -> dict[int, Dilation]:
    """``--resume``: the factor each ``auto`` row already ran at, where its runs agree on one, so
    the runs still to come share it."""
    out: dict[int, Dilation] = {}
    for hp in dict.fromkeys(r.host_page for r in plan.runs if r.calibrate):
        reps = [rep for r, rep in plan.ordered(done) if r.host_page == hp and r.calibrate
                and rep.time_dilation.get("factor") is not None]  # a run that failed early has none
        factors = {rep.time_dilation["factor"] for rep in reps}
        if len(factors) == 1:
            out[hp] = Dilation(float(factors.pop()), list(reps[0].time_dilation.get("calibration", [])))
    return out


def with_factors(runs: Sequence[PlannedRun], factors: dict[int, Dilation]) -> list[PlannedRun]:
    """The runs of rows with a known factor set to it; the other ``auto`` rows are left as they are."""
    return [r.with_factor(factors[r.host_page].factor) if r.calibrate and r.host_page in factors else r
            for r in runs]


def note_calibration(results: dict[int, Report], runs: Sequence[PlannedRun], factors: dict[int, Dilation]) -> None:
    """Every report of a row calibrated before it ran says what the calibration measured."""
    for r in runs:
        if r.calibrate and r.host_page in factors and r.index in results:
            results[r.index].time_dilation["calibration"] = factors[r.host_page].calibration


def dilation_notes(plan: Plan, results: dict[int, Report], known: dict[int, Dilation]) -> list[str]:
    """On a cluster each worker calibrates an ``auto`` row itself (unless its factor is ``known``):
    the factor the row ran at, or a warning where workers disagreed (its modes then did not all run
    on one clock)."""
    lines = []
    for hp in dict.fromkeys(r.host_page for r in plan.runs if r.calibrate and r.host_page not in known):
        where: dict[float, set[str]] = {}
        for r, rep in plan.ordered(results):
            if r.host_page == hp and r.calibrate and "factor" in rep.time_dilation:
                where.setdefault(rep.time_dilation["factor"], set()).add(str(rep.host.get("worker")))
        if len(where) == 1:
            lines.append(f"time dilation for {fmt_size(hp)} pages: {next(iter(where)):g}x (calibrated on each worker"
                         f" over every mode of the row)")
        elif where:
            lines.append(f"warning: time dilation for {fmt_size(hp)} pages differs between workers ("
                         + "; ".join(f"{f:g}x on {', '.join(sorted(h))}" for f, h in sorted(where.items()))
                         + "): the modes of that row did not all run on one clock")
    return lines


def cells(plan: Plan, results: dict[int, Report]) -> dict[tuple[str, int], Cell]:
    """The results by (label, host page), every cell's runs in seed order, cells in plan order."""
    out: dict[tuple[str, int], Cell] = {}
    for r, rep in plan.ordered(results):
        out.setdefault((r.mode, r.host_page), Cell()).reports.append(rep)
    return out


def announce(log: Callable[[str], None], total: int) -> Callable[[int, PlannedRun], None]:
    """What compare logs before each run (the CLI's live line reads it: cli.COMPARE_RUN)."""
    def begin(k: int, r: PlannedRun) -> None:
        log(f"[{k}/{total}] running {r.name} ...")
    return begin


def compare(base: dict[str, Any], modes: Sequence[str], host_pages: Sequence[int],
            log: Callable[[str], None] | None = None, repeat: int = 1,
            by_host_page: dict[int, dict[str, Any]] | None = None,
            on_sample: Callable[[Sample], None] | None = None) -> dict[tuple[str, int], Cell]:
    """Run every cell of ``plan`` ``repeat`` times (seeds ``seed``, ``seed + 1``, ...), here, keyed
    by (label, host page); ``auto`` rows are calibrated first (``calibrate``). Ctrl-C raises
    SeriesInterrupted with the cells finished so far."""
    p = planned(plan(base, modes, host_pages, repeat, by_host_page))
    factors = calibrate(p.runs, log)
    runs = with_factors(p.runs, factors)
    try:
        results = run_local(runs, announce(log or (lambda _: None), len(runs)), on_sample, log)
    except SeriesInterrupted as e:
        note_calibration(e.results, p.runs, factors)
        raise SeriesInterrupted(cells(p, e.results), len(runs)) from None
    note_calibration(results, p.runs, factors)
    return cells(p, results)


def _ms(us: float | None) -> str:
    if us is None:
        return "-"
    return f"{us / 1e3:.2f}"


def format_table(results: dict[tuple[str, int], Cell], modes: Sequence[str], host_pages: Sequence[int],
                 qemu: dict[tuple[int, str], float] | None = None) -> str:
    """The cover-letter table (mean fault latency, ms), QEMU's beside it if given, then every run."""
    lines = ["Average page-request latency (ms), as in QEMU's postcopy-preempt cover letter", ""]
    head = ["host page", *modes]
    rows = []
    for hp in host_pages:
        row = [fmt_size(hp)]
        for m in modes:
            c = results.get((m, hp))
            if c is None:
                row.append("-")
            elif not c.ok:
                row.append("FAILED")
            else:
                means = c.run_means_us
                spread = f" ({_ms(min(means))}-{_ms(max(means))}, n={c.faults})" if len(means) > 1 else ""
                row.append(_ms(c.mean_us) + spread)
        rows.append(row)
    lines += markdown_table(head, rows)
    if qemu:
        lines += ["", "Beside QEMU's own numbers (ms; the ratio of ratios is shmig's vanilla/X over QEMU's):", ""]
        lines += markdown_table(*qemu_table(results, modes, host_pages, qemu))
    lines += ["", "Every run:", ""]
    head = ["mode", "host page", "seed", "faults", "mean ms", "p50 ms", "p90 ms", "p99 ms", "max ms", "requests",
            "blocktime ms", "downtime ms", "guest accesses", "preempts", "channels", "link util", "dilation", "total s",
            "integrity"]
    rows = []
    for hp in host_pages:
        for m in modes:
            c = results.get((m, hp))
            for r in c.reports if c else []:
                lat = r.postcopy_latency_us
                util = r.link.get("utilisation")
                rows.append([m, fmt_size(hp), str(r.config.get("seed")), str(lat.get("count", 0)),
                             _ms(lat.get("mean")), _ms(lat.get("p50")), _ms(lat.get("p90")), _ms(lat.get("p99")),
                             _ms(lat.get("max")), str(r.postcopy_requests), f"{r.postcopy_blocktime_ms:.0f}",
                             "-" if r.downtime_ms is None else f"{r.downtime_ms:.1f}",
                             str(r.guest_progress.get("postcopy_accesses", "-")), str(r.preemptions), channels_of(r),
                             "-" if util is None else f"{util:.2f}",
                             f"{r.time_dilation.get('factor', 1):g}x",
                             f"{r.total_time_ms / 1e3:.1f}" if r.total_time_ms else "-",
                             "ok" if r.ok else f"FAILED ({r.error})"])
    lines += markdown_table(head, rows)
    warnings = sorted({w for c in results.values() for r in c.reports if (w := r.link_warning())})
    lines += [f"warning: {w}" for w in warnings]
    return "\n".join(lines)


def channels_of(r: Report) -> str:
    """The channels a run used: main, preempt (if it carried anything), multifd's."""
    used = ["main"] + (["preempt"] if r.ram.get("channel_bytes", {}).get("postcopy") else [])
    n = r.config.get("multifd_channels") or 0
    return " + ".join(used + ([f"{n} multifd"] if n else []))


def qemu_table(results: dict[tuple[str, int], Cell], modes: Sequence[str], host_pages: Sequence[int],
               qemu: dict[tuple[int, str], float]) -> tuple[list[str], list[list[str]]]:
    head = ["host page", "mode", "shmig ms", "QEMU ms", "vanilla/mode shmig", "vanilla/mode QEMU", "ratio of ratios"]
    rows = []
    for hp in host_pages:
        van = results.get(("vanilla", hp))
        for m in modes:
            c = results.get((m, hp))
            ours = c.mean_us / 1e3 if c and c.ok and c.mean_us else None
            theirs = qemu.get((hp, m))
            r_ours = r_theirs = None
            if m != "vanilla" and van and van.ok and van.mean_us and ours:
                r_ours = van.mean_us / 1e3 / ours
            if m != "vanilla" and theirs and qemu.get((hp, "vanilla")):
                r_theirs = qemu[(hp, "vanilla")] / theirs
            rr = None if r_ours is None or r_theirs is None else r_ours / r_theirs
            rows.append([fmt_size(hp), m, "-" if ours is None else f"{ours:.2f}",
                         "-" if theirs is None else f"{theirs:g}", "-" if r_ours is None else f"{r_ours:.1f}x",
                         "-" if r_theirs is None else f"{r_theirs:.1f}x", "-" if rr is None else f"{rr:.2f}"])
    return head, rows


def markdown_table(head: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table, so it pastes into the README as it is."""
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda cells: "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return [fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)]
