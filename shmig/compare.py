"""Several modes and host page sizes on one configuration, laid out like QEMU's cover letter table."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence, TypeVar

from .config import Config
from .controller import run
from .report import Report
from .units import fmt_size

# the columns of the postcopy-preempt cover letter, plus 10.1's hint
MODE_VARIANTS: dict[str, dict[str, Any]] = {
    "vanilla": {"mode": "vanilla"},
    "preempt-nobreak": {"mode": "preempt", "break_huge": False},
    "preempt": {"mode": "preempt"},
    "preempt-full": {"mode": "preempt-full"},
    "preempt-full-hint": {"mode": "preempt-full", "page_hint": True},
}

PRESETS: dict[str, dict[str, Any]] = {
    # The RFC/v2 cover letter's experiment on this machine: a 10 Gbit/s NIC; per channel the queue a
    # Linux TCP connection holds at most by default (tcp_wmem max 4 MiB + tcp_rmem max 6 MiB); one
    # vCPU writing at random as fast as it can over all of RAM; postcopy after one precopy round.
    # RAM holds four 1 GiB pages. Nothing here is tuned to the results.
    "cover-letter": {
        "ram": "4GiB", "bandwidth": "10Gbit/s", "socket_buffer": "10MiB", "workload": "random",
        "vcpus": 1, "precopy_rounds": 1, "deadline": "600s",
        "modes": ["vanilla", "preempt-nobreak", "preempt", "preempt-full"],
        "host_pages": [4096, 2 << 20, 1 << 30],
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


def plan(base: dict[str, Any], modes: Sequence[str], host_pages: Sequence[int]) -> dict[tuple[str, int], Config]:
    """Every (label, host page) run, all validated before the first one starts; two requested
    modes that come out the same run once."""
    out: dict[tuple[str, int], Config] = {}
    for hp in host_pages:
        for m in modes:
            cfg = variant_config(base, m, hp).validate()
            out.setdefault((label_of(cfg), hp), cfg)
    return out


K = TypeVar("K")


class SeriesInterrupted(KeyboardInterrupt):
    """Ctrl-C during a series of runs: the whole series stops. ``results`` holds the runs that
    finished before it (the interrupted one is not among them)."""

    def __init__(self, results: dict[Any, Report], total: int):
        super().__init__(f"interrupted: {len(results)} of {total} runs finished")
        self.results = results
        self.total = total


def run_series(cfgs: Mapping[K, Config], log: Callable[[str], None] | None = None,
               describe: Callable[[K], str] = str) -> dict[K, Report]:
    """Run each configuration in turn (compare, sweeps). Ctrl-C stops the series, not just the
    run it lands in: it raises SeriesInterrupted carrying the finished runs, so that they can be
    printed and saved before exiting 130."""
    out: dict[K, Report] = {}
    for key, cfg in cfgs.items():
        if log:
            log(f"running {describe(key)} ...")
        try:
            rep = run(cfg)
        except KeyboardInterrupt:  # landed outside wait() (while starting): same thing
            raise SeriesInterrupted(out, len(cfgs)) from None
        if rep.interrupted:
            raise SeriesInterrupted(out, len(cfgs))
        out[key] = rep
        if log and not rep.ok:
            log(f"  {describe(key)}: {rep.status}: {rep.error}")
    return out


def compare(base: dict[str, Any], modes: Sequence[str], host_pages: Sequence[int],
            log: Callable[[str], None] | None = None) -> dict[tuple[str, int], Report]:
    """Run every (mode, host page) pair, keyed by (label of what ran, host page); configurations
    are all validated before the first run. Ctrl-C raises SeriesInterrupted (see run_series)."""
    return run_series(plan(base, modes, host_pages), log, describe=describe_run)


def describe_run(key: tuple[str, int]) -> str:
    return f"{key[0]} with {fmt_size(key[1])} host pages"


def _ms(us: float | None) -> str:
    if us is None:
        return "-"
    return f"{us / 1e3:.2f}"


def format_table(results: dict[tuple[str, int], Report], modes: Sequence[str],
                 host_pages: Sequence[int]) -> str:
    """The cover-letter table (mean fault latency, ms), then one detailed row per run."""
    lines = ["Average page-request latency (ms), as in QEMU's postcopy-preempt cover letter", ""]
    head = ["host page", *modes]
    rows = []
    for hp in host_pages:
        row = [fmt_size(hp)]
        for m in modes:
            r = results.get((m, hp))
            lat = r.postcopy_latency_us if r else {}
            row.append(_ms(lat.get("mean")) if r and r.ok and lat.get("count") else ("FAILED" if r and not r.ok else "-"))
        rows.append(row)
    lines += markdown_table(head, rows)
    lines += ["", "Every run:", ""]
    head = ["mode", "host page", "faults", "mean ms", "p50 ms", "p90 ms", "p99 ms", "max ms", "requests",
            "blocktime ms", "guest accesses", "preempts", "total s", "integrity"]
    rows = []
    for hp in host_pages:
        for m in modes:
            r = results.get((m, hp))
            if r is None:
                continue
            lat = r.postcopy_latency_us
            rows.append([m, fmt_size(hp), str(lat.get("count", 0)), _ms(lat.get("mean")), _ms(lat.get("p50")),
                         _ms(lat.get("p90")), _ms(lat.get("p99")), _ms(lat.get("max")),
                         str(r.postcopy_requests), f"{r.postcopy_blocktime_ms:.0f}",
                         str(r.guest_progress.get("postcopy_accesses", "-")), str(r.preemptions),
                         f"{r.total_time_ms / 1e3:.1f}" if r.total_time_ms else "-",
                         "ok" if r.ok else f"FAILED ({r.error})"])
    lines += markdown_table(head, rows)
    return "\n".join(lines)


def markdown_table(head: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table, so it pastes into the README as it is."""
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda cells: "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return [fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)]
