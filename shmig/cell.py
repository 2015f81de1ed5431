"""One run of a compare or sweep in a fresh Python process: what a cluster worker does with a cell.

Why a fresh process and not ``shmig.run`` inside the worker (measured on a ``LocalCluster`` worker
with one thread, distributed 2026.8):
- A nanny'd worker (dask's default) is a daemonic multiprocessing process, and a daemonic process
  may not start children: ``shmig.run`` in the task fails at once ("daemonic processes are not
  allowed to have children").
- Without that (``distributed.worker.daemon: false``) it runs, but forks a process of four threads
  (the event loop, the nanny's two watchers, the task's thread). ``fork`` copies only the calling
  thread: a lock another thread held at that instant (a stream's, the logging module's) stays held
  in the child for ever, which is why CPython 3.12 warns on such a fork. A process started with
  ``subprocess`` (fork and exec, no Python between them) has only the main thread and numpy's
  OpenBLAS thread (which resets itself at fork) when it forks the migration: ``shmig run`` exactly.
- A thread cannot be stopped; a process can: Ctrl-C on the client, the cell's deadline or the
  worker's death stop the run cleanly (SIGTERM), with its own /dev/shm released.
It costs start-up: a small cell took 0.35 s this way and 0.12 s inside the worker, 0.23 s more
per cell, against runs of seconds to minutes.

The cell's process ignores SIGINT (a terminal's Ctrl-C reaches every process of a local cluster's
group: the client alone decides what stops) and takes SIGTERM as Ctrl-C: the migration then
stops its children and releases its shared memory. SIGTERM comes from the worker (``stop()``,
the deadline) or, through ``PR_SET_PDEATHSIG``, from the kernel when the worker dies.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from .compare import Dilation, calibrate_row
from .config import MAX_DILATION, Config, ConfigError
from .controller import run as run_migration
from .policies import load_entry_points, load_policy
from .process import set_title
from .report import Report

STOP_GRACE = 10.0  # s a stopped cell has to release its children and memory before SIGKILL
POLL = 0.5  # s between looks at ``stop()`` while the cell runs
SLACK = 120.0  # s beyond the run's own deadline: start-up, populating RAM, the report
CALIBRATION_BOUND = 12 * 60.0  # s one calibration may take at most (12 factors, a minute each)
STOPPED = 128 + signal.SIGTERM  # exit code of a cell stopped before it had a report
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Request:
    """What a worker runs: one Config, and for ``--time-dilation auto`` in a compare row the
    configs whose largest factor it runs at (every mode of the row, so the row shares one clock
    on this machine), unless the factor is already known here."""

    config: Config
    name: str  # shown in ps and in messages: "preempt 4KiB seed 2"
    calibrate: tuple[Config, ...] = ()
    dilation: Dilation | None = None  # the row's factor, calibrated before on this machine
    policies: tuple[str, ...] = ()  # --policy specs to load first (the mode may be one of them)

    @property
    def row_key(self) -> str:
        """Which row's calibration a worker may reuse: the same configs, calibrated the same way."""
        text = json.dumps([c.to_dict() for c in self.calibrate], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def timeout(self) -> float:
        """Real seconds after which the worker gives the cell up: its deadline at the slowest
        clock it may run on, plus calibration and start-up."""
        cfg = self.config
        if self.dilation is not None:
            slowest, calibration = self.dilation.factor, 0.0
        elif cfg.time_dilation == "auto":
            slowest, calibration = MAX_DILATION, CALIBRATION_BOUND * max(1, len(self.calibrate))
        else:
            slowest, calibration = float(cfg.time_dilation), 0.0
        return cfg.deadline * slowest + calibration + SLACK


@dataclass
class Result:
    """What the cell's process hands back: the report, and the factor its row calibrated to."""

    report: Report
    dilation: Dilation | None = None


class Lost(Exception):
    """The cell's process died without a report (killed, or stopped by someone other than the
    client): nothing says how the migration went, so the cell may run again."""


# -- the worker's side ----------------------------------------------------------------------------

def run(req: Request, stop: Callable[[], bool] = lambda: False) -> Result | None:
    """Run ``req`` in a fresh process and wait for it, with a deadline. None when ``stop()``
    became true (the client no longer wants it); Lost when the process died without a report,
    or was stopped by someone else."""
    p = subprocess.Popen([sys.executable, "-m", "shmig.cell", str(os.getpid())], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    data: bytes | None = pickle.dumps(req)
    give_up = time.monotonic() + req.timeout()
    why_stopped = None  # "stop" or "timeout", once SIGTERM has been sent
    try:
        while True:
            try:
                out, err = p.communicate(data, timeout=POLL)
                break
            except subprocess.TimeoutExpired:
                data = None  # written: communicate() carries on where it was
            now = time.monotonic()
            if why_stopped is None and (now >= give_up or stop()):
                why_stopped = "timeout" if now >= give_up else "stop"
                give_up = now + STOP_GRACE
            if why_stopped is not None:  # again every POLL: a calibration goes on to its next factor
                p.send_signal(signal.SIGTERM if now < give_up else signal.SIGKILL)
    finally:  # whatever went wrong here, the cell does not outlive it
        if p.poll() is None:
            p.kill()
            p.wait()
    if why_stopped == "stop":
        return None
    if why_stopped == "timeout":
        return Result(_failed(req.config, f"the cell's process was still running after {req.timeout():.0f} s"
                                          f" (its deadline is {req.config.deadline:g} s of emulated time):"
                                          " stopped"))
    result = pickle.loads(out) if p.returncode == 0 and out else None
    if result is not None and not result.report.interrupted:
        return result
    why = _last_line(err)
    if result is not None or p.returncode in (-signal.SIGTERM, STOPPED):
        raise Lost("the cell's process was stopped (SIGTERM) on the worker")
    if p.returncode < 0:
        sig = signal.Signals(-p.returncode).name
        raise Lost(f"the cell's process was killed by {sig}" + (f" ({why})" if why else ""))
    return Result(_failed(req.config, f"the cell's process exited with code {p.returncode}: {why or 'no message'}"))


def _failed(cfg: Config, error: str) -> Report:
    return Report(status="failed", error=error, config=cfg.to_dict())


def _last_line(err: bytes) -> str:
    lines = err.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else ""


# -- the cell's own process -----------------------------------------------------------------------

class _Stop:
    """SIGTERM is Ctrl-C, at most once a second: a stop that lands in a migration's teardown must
    let it finish (the worker sends SIGTERM again until the process has gone)."""

    last = 0.0

    def __call__(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if now - self.last >= 1.0:
            self.last = now
            raise KeyboardInterrupt


def die_with_parent(sig: int) -> None:
    """``sig`` when the worker that started this process dies (``PR_SET_PDEATHSIG``)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def main() -> None:
    """``python -m shmig.cell PARENT_PID``: a pickled Request on stdin, a pickled Result on stdout."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _Stop())
    die_with_parent(signal.SIGTERM)
    if os.getppid() != int(sys.argv[1]):  # the worker died before the line above
        os._exit(STOPPED)
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything else printed goes to stderr, never into the result
    try:
        req: Request = pickle.load(sys.stdin.buffer)
        set_title(f"shmig cell: {req.name}")
        result = execute(req)
    except KeyboardInterrupt:
        os._exit(STOPPED)
    out.write(pickle.dumps(result))
    out.close()


def execute(req: Request) -> Result:
    """Calibrate the row if it asks for it and this machine has not yet, then run."""
    cfg = req.config
    dilation = req.dilation
    try:
        load_entry_points()
        for spec in req.policies:
            load_policy(spec)
        if dilation is None and cfg.time_dilation == "auto" and req.calibrate:
            dilation = calibrate_row(req.calibrate)
        if dilation is not None:
            cfg = dataclasses.replace(cfg, time_dilation=dilation.factor)
        rep = run_migration(cfg)
    except ConfigError as e:
        return Result(_failed(cfg, str(e)))
    if dilation is not None:
        rep.time_dilation["calibration"] = dilation.calibration
    return Result(rep, dilation)


if __name__ == "__main__":  # run as shmig.cell, so that what it pickles is shmig.cell.Result
    from shmig.cell import main as _main

    _main()
