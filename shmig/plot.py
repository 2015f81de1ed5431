"""Pictures of saved reports: ``shmig plot``, ``shmig compare --plot``, ``shmig sweep --plot``.

Everything is drawn from the JSON the commands write (``Report.to_dict``), never from a live run,
so a picture can be redrawn from CI's or another machine's reports. matplotlib is the optional
``plot`` extra; without it the commands say so in one line before anything runs.

- several runs: per host page size, QEMU's 24 log2 latency buckets as bars (share of faults, so
  modes with few and many faults compare by shape) and the latency CDF;
- one run: the same, plus its timeline (bytes per second per channel and pages remaining, every
  fault as a point at its latency, the phases shaded);
- a sweep: p50/p99 fault latency, guest progress and total time against the swept option.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np

from .config import ConfigError
from .files import atomic_write
from .report import SavedRun, load_runs
from .stats import _time_str
from .units import fmt_rate, fmt_size

PHASE_COLOURS = {"setup": "#dddddd", "precopy": "#cfe3f5", "switchover": "#f7c6c6", "postcopy": "#d8efd0"}


def _save(fig: Any, out: str) -> None:
    """The picture whole or not at all (atomic_write); its format from the name, as savefig would
    infer it from a path (a file object has none)."""
    fmt = os.path.splitext(out)[1][1:].lower() or None
    atomic_write(out, lambda f: fig.savefig(f, dpi=110, format=fmt), binary=True)


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or a one-line ConfigError."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("plotting needs matplotlib: pip install 'shmig[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_output(path: str) -> None:
    """Fail before any run when the picture could not be written."""
    pyplot()
    if not path.lower().endswith((".png", ".svg", ".pdf")):
        raise ConfigError(f"plot output {path!r}: use a .png, .svg or .pdf file name")
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise ConfigError(f"plot output {path!r}: directory {d} does not exist")


def plot_files(paths: Sequence[str], out: str) -> None:
    """``shmig plot``: every run of every file in one picture."""
    check_output(out)
    runs: list[SavedRun] = []
    tags: list[str] = []
    for path in paths:
        mine = load_runs(path)
        stem = os.path.splitext(os.path.basename(path))[0]
        runs += mine
        tags += [f" [{stem}]" if len(paths) > 1 else ""] * len(mine)
    plot_runs(runs, out, tags)


def plot_runs(runs: Sequence[SavedRun], out: str, tags: Sequence[str] | None = None) -> None:
    """A sweep's figure if the runs come from a sweep, else the latency (and, for one run, the
    timeline) figure; ``tags`` tell runs of the same mode apart (e.g. the file they came from)."""
    if any(r.knob for r in runs):
        plot_sweep(runs, out)
        return
    labels = [_label(r) + (tags[i] if tags else "") for i, r in enumerate(runs)]
    twice = {lab for lab in labels if labels.count(lab) > 1}  # compare --repeat: one run per seed
    labels = [lab + (f" seed {r.report.config.get('seed')}" if lab in twice else "") for lab, r in zip(labels, runs)]
    plot_latency(list(zip(labels, runs)), out)


def _label(r: SavedRun) -> str:
    return f"{r.mode} {fmt_size(r.host_page)}"


DESCRIBED = ("ram", "workload", "vcpus", "bandwidth", "socket_buffer", "precopy_rounds")


def _describe(cfg: dict[str, Any], skip: str | None = None) -> str:
    """The configuration in one line, for the title (``skip``: the option a sweep varies)."""
    words = {
        "ram": f"{fmt_size(cfg['ram'])} RAM", "workload": f"{cfg['workload']} guest",
        "vcpus": f"{cfg.get('vcpus', '?')} vCPU", "bandwidth": f"link {fmt_rate(cfg.get('bandwidth'))}",
        "socket_buffer": ("socket buffer autotuned" if cfg.get("socket_buffer") is None
                          else f"socket buffer {fmt_size(cfg['socket_buffer'])}"),
        "precopy_rounds": f"precopy rounds {cfg.get('precopy_rounds')}",
    }
    return ", ".join(v for k, v in words.items() if k != skip)


MAX_POINTS = 100_000  # faults drawn one by one at most; beyond, every Nth plus the slowest


def _faults(rep: Any) -> np.ndarray:
    """The fault table as an (n, 3) array: t_ms, latency_us, vcpu."""
    f = rep.faults
    return np.column_stack([f.t_ms, f.latency_us, f.vcpu.astype(np.float64)])


def _shown(f: np.ndarray) -> np.ndarray:
    """The faults a scatter draws: all of them up to MAX_POINTS; beyond that an even sample and
    the slowest 1% (the tail is what a picture of latency must not lose), so a million-fault
    report draws in seconds."""
    if len(f) <= MAX_POINTS:
        return f
    step = -(-len(f) // MAX_POINTS)
    slow = np.argsort(f[:, 1])[-len(f) // 100:]
    keep = np.union1d(np.arange(0, len(f), step), slow)
    return f[keep]


def plot_latency(runs: Sequence[tuple[str, SavedRun]], out: str) -> None:
    plt = pyplot()
    pages = sorted({r.host_page for _, r in runs})
    single = len(runs) == 1
    nrows = len(pages) + (2 if single else 0)
    fig = plt.figure(figsize=(13, 3.6 * len(pages) + (6 if single else 0)), layout="constrained")
    grid = fig.add_gridspec(nrows, 2, height_ratios=[1] * len(pages) + ([0.9, 0.9] if single else []))
    for row, hp in enumerate(pages):
        group = [(lab, r) for lab, r in runs if r.host_page == hp]
        _buckets(fig.add_subplot(grid[row, 0]), group)
        _cdf(fig.add_subplot(grid[row, 1]), group)
    if single:
        rep = runs[0][1].report
        ax_bytes = fig.add_subplot(grid[len(pages), :])
        ax_faults = fig.add_subplot(grid[len(pages) + 1, :], sharex=ax_bytes)
        _timeline(ax_bytes, ax_faults, rep)
    first = runs[0][1].report.config
    same = all(_same_guest(first, r.report.config) for _, r in runs)
    fig.suptitle(_describe(first) if same else "fault latency (runs of different configurations)", fontsize=11)
    _save(fig, out)
    plt.close(fig)


def _same_guest(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in DESCRIBED)


def _buckets(ax: Any, group: Sequence[tuple[str, SavedRun]]) -> None:
    """QEMU's log2 buckets as grouped bars: the share of each run's faults per bucket."""
    dists = [np.asarray(r.report.postcopy_latency_dist, dtype=np.float64) for _, r in group]
    used = np.flatnonzero(np.sum(dists, axis=0)) if dists else np.empty(0, int)
    hp = fmt_size(group[0][1].host_page)
    ax.set_title(f"{hp} host pages: fault latency, QEMU's log2 buckets")
    if not used.size:
        ax.text(0.5, 0.5, "no faults", ha="center", va="center", transform=ax.transAxes)
        return
    lo, hi = int(used[0]), int(used[-1])
    x = np.arange(lo, hi + 1)
    width = 0.8 / len(group)
    for i, ((lab, r), d) in enumerate(zip(group, dists)):
        share = 100 * d[lo:hi + 1] / max(d.sum(), 1)
        n = r.report.postcopy_latency_us.get("count", int(d.sum()))
        ax.bar(x - 0.4 + width * (i + 0.5), share, width, label=f"{lab} (n={n})")
    ax.set_xticks(x, [_time_str(1 << int(b)) for b in x], rotation=45, fontsize=8)
    ax.set_xlabel("bucket [2^N us, 2^(N+1) us), labelled by its lower bound")
    ax.set_ylabel("% of faults")
    ax.legend(fontsize=8)


def _cdf(ax: Any, group: Sequence[tuple[str, SavedRun]]) -> None:
    """The exact CDF from the per-fault list (or, for reports without it, from the buckets)."""
    ax.set_title("fault latency CDF")
    drawn = False
    for lab, r in group:
        rep = r.report
        lat = np.sort(_faults(rep)[:, 1]) / 1e3
        if lat.size:
            ax.step(lat, np.arange(1, lat.size + 1) / lat.size, where="post",
                    label=f"{lab}: p50 {np.percentile(lat, 50):.2f} ms, p99 {np.percentile(lat, 99):.2f} ms")
            drawn = True
        elif sum(rep.postcopy_latency_dist):
            d = np.asarray(rep.postcopy_latency_dist, dtype=np.float64)
            edges = 2.0 ** np.arange(1, len(d) + 1) / 1e3  # each bucket's upper edge, ms
            ax.step(edges, np.cumsum(d) / d.sum(), where="post", label=f"{lab} (from the buckets)")
            drawn = True
    if not drawn:
        ax.text(0.5, 0.5, "no faults", ha="center", va="center", transform=ax.transAxes)
        return
    ax.set_xscale("log")
    _plain_log_labels(ax.xaxis)
    ax.set_xlabel("fault latency (ms)")
    ax.set_ylabel("share of faults at or below")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def _plain_log_labels(axis: Any) -> None:
    """0.5, 20, 300 rather than 5x10^-1: latencies are read, not computed with."""
    from matplotlib import ticker

    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.5)))


def _shade_phases(ax: Any, rep: Any, labels: bool) -> None:
    for name, start, end in rep.phases:
        ax.axvspan(start / 1e3, end / 1e3, color=PHASE_COLOURS.get(name, "#eeeeee"), alpha=0.6, lw=0)
        if labels:
            ax.text((start + end) / 2e3, 0.97, name, transform=ax.get_xaxis_transform(), ha="center",
                    va="top", fontsize=8, color="#555555")


def _since_start(timeline: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The samples from the migration's start on: the controller restarts its clock when the guest
    is up, so a sample taken before that counts from another origin (its time goes backwards)."""
    t = [s.get("t_ms", 0.0) for s in timeline]
    first = max((i for i in range(1, len(t)) if t[i] < t[i - 1]), default=0)
    return [s for s in timeline[first:] if s.get("t_ms", -1) >= 0]


def _timeline(ax_bytes: Any, ax_faults: Any, rep: Any) -> None:
    tl = _since_start(rep.timeline)
    _shade_phases(ax_bytes, rep, labels=True)
    _shade_phases(ax_faults, rep, labels=False)
    if len(tl) >= 2:
        t = np.array([s["t_ms"] for s in tl]) / 1e3
        dt = np.diff(t)
        for key, colour in (("precopy_bytes", "tab:blue"), ("postcopy_bytes", "tab:orange"), ("multifd_bytes", "tab:green")):
            b = np.array([s.get(key, 0) for s in tl], dtype=np.float64)  # multifd_bytes: not in older reports
            if key == "multifd_bytes" and not b.any():
                continue
            rate = np.divide(np.diff(b), dt, out=np.zeros_like(dt), where=dt > 0) / 2**20
            ax_bytes.step(t[1:], rate, where="pre", color=colour, label=f"{key.split('_')[0]} channel")
        ax_bytes.set_ylabel("MiB/s sent")
        ax_rem = ax_bytes.twinx()
        ax_rem.plot(t, [s["remaining_pages"] for s in tl], color="black", ls="--", lw=1, label="pages remaining")
        ax_rem.set_ylabel("pages remaining")
        ax_rem.set_ylim(bottom=0)
        h1, l1 = ax_bytes.get_legend_handles_labels()
        h2, l2 = ax_rem.get_legend_handles_labels()
        ax_bytes.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper right")
    ax_bytes.set_title(f"{rep.config.get('mode')}: bytes per channel (100 ms samples), pages remaining,"
                       f" phases shaded", fontsize=10)
    f = _faults(rep)
    shown = _shown(f)
    if f.size:
        vcpus = np.unique(shown[:, 2]).astype(int)
        for v in vcpus:
            sel = shown[:, 2] == v
            ax_faults.scatter(shown[sel, 0] / 1e3, shown[sel, 1] / 1e3, s=6, alpha=0.6, rasterized=True,
                              label=f"vCPU {v}" if len(vcpus) > 1 else None)
        ax_faults.set_yscale("log")
        _plain_log_labels(ax_faults.yaxis)
        if len(vcpus) > 1:
            ax_faults.legend(fontsize=8, markerscale=2)
    else:
        ax_faults.text(0.5, 0.5, "no faults", ha="center", va="center", transform=ax_faults.transAxes)
    drawn = "" if len(shown) == len(f) else f", {len(shown)} drawn: an even sample and the slowest 1%"
    ax_faults.set_title(f"every fault at the time it began, at its latency ({len(f)} faults{drawn})"
                        + (", coloured by vCPU" if f.size and len(np.unique(f[:, 2])) > 1 else ""), fontsize=10)
    ax_faults.set_ylabel("fault latency (ms)")
    ax_faults.set_xlabel("time since the migration started (s)")
    ax_faults.grid(True, alpha=0.3)


def _sweep_x(runs: Sequence[SavedRun]) -> tuple[list[float], str | None, list[str]]:
    """x positions for a sweep's values: the parsed numbers (log scale when they span a decade),
    or evenly spaced categories for words, flags and 'unlimited'."""
    values = list(dict.fromkeys(r.value for r in runs))
    knob = runs[0].knob
    parsed = {r.value: r.report.config.get(knob) for r in runs}
    nums = [parsed[v] for v in values]
    if all(isinstance(n, (int, float)) and not isinstance(n, bool) and n > 0 for n in nums):
        scale = "log" if max(nums) / min(nums) >= 8 else None
        return [float(n) for n in nums], scale, values
    return [float(i) for i in range(len(values))], None, values


def plot_sweep(runs: Sequence[SavedRun], out: str) -> None:
    plt = pyplot()
    knob = runs[0].knob
    xs, scale, values = _sweep_x(runs)
    pos = dict(zip(values, xs))
    modes = list(dict.fromkeys(r.mode for r in runs))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), layout="constrained")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, mode in enumerate(modes):
        mine = [r for r in runs if r.mode == mode]
        x = [pos[r.value] for r in mine]
        col = colours[i % len(colours)]

        def series(get: Any) -> list[float]:
            """One figure per run; a failed run, or one without the figure, leaves a gap."""
            vals = [get(r.report) if r.report.ok else None for r in mine]
            return [math.nan if v is None else v for v in vals]

        def latency_ms(q: str) -> Any:
            return lambda rep: rep.postcopy_latency_us[q] / 1e3 if rep.postcopy_latency_us.get("count") else None

        axes[0].plot(x, series(latency_ms("p50")), "o-", color=col, label=f"{mode} p50")
        axes[0].plot(x, series(latency_ms("p99")), "s--", color=col, label=f"{mode} p99")
        axes[1].plot(x, series(lambda rep: rep.guest_progress.get("postcopy_accesses")), "o-", color=col,
                     label=mode)
        axes[2].plot(x, series(lambda rep: None if rep.total_time_ms is None else rep.total_time_ms / 1e3), "o-",
                     color=col, label=mode)
        for xi, r in zip(x, mine):
            if not r.report.ok:
                for ax in axes:
                    ax.axvline(xi, color=col, ls=":", lw=1)
    titles = ("fault latency p50 (solid) and p99 (dashed), ms", "guest progress: pages touched in postcopy",
              "total time, s")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(knob.replace("_", "-"))
        if scale:
            ax.set_xscale(scale)
        ax.set_xticks(xs, values)
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if any(y > 0 for line in axes[0].get_lines() for y in line.get_ydata()):  # no faults: no log axis
        axes[0].set_yscale("log")
        _plain_log_labels(axes[0].yaxis)
    axes[1].set_ylim(bottom=0)
    axes[2].set_ylim(bottom=0)
    cfg = runs[0].report.config
    fig.suptitle(f"sweep of --{knob.replace('_', '-')} ({_describe(cfg, skip=knob)}; dotted: a failed run)",
                 fontsize=11)
    _save(fig, out)
    plt.close(fig)
