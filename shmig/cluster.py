"""compare and sweep on a Dask cluster (``--cluster``): every run of the plan is a task on a
``dask.distributed`` scheduler, one at a time per worker.

Why Dask: people with hundreds of runs to make already have machines running it (a lab's boxes, a
Slurm or Kubernetes allocation); shmig hands its cells to that engine instead of growing its own.

- One run per worker at a time: every task asks for one unit of the worker resource ``shmig``,
  which a worker declares (``dask worker ADDRESS --nthreads 1 --resources shmig=1``: one worker
  process per machine, so that runs never share a machine's cores, or their timings lie). A
  worker started with ``shmig=K`` runs K at once: the user's say-so.
- Each run is a fresh process on the worker (``shmig.cell`` says why), with its own deadline; the
  worker stops it (SIGTERM, a clean teardown) when the client is interrupted.
- ``--time-dilation auto``: a compare row is calibrated on the worker that runs the cell, over
  every mode of the row, and the factor kept for the row's later cells on that worker (see
  ``worker_dilations``); every report records its factor, its calibration and its host.
- A worker that dies mid-run: the scheduler runs the cell once more on another worker
  (``distributed.scheduler.allowed-failures`` = 1 on a cluster shmig starts; on yours, see
  README), then it is reported failed ("lost: ..."); a cell whose own process is killed is
  retried once too (``retries=1``). No other cell is touched. ``Clean``, a worker plugin, removes
  what a killed run left in /dev/shm each time a worker starts.
- Results come back in any order; they are keyed by the run's index in the plan, and the caller
  puts them in plan order.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import dask
import psutil
from distributed import Client, Event, LocalCluster, WorkerPlugin, get_worker
from distributed.scheduler import KilledWorker

from . import cell, memory
from .compare import Dilation
from .config import ConfigError
from .progress import LiveStatus
from .report import Report
from .series import PlannedRun, SeriesInterrupted, lost

RESOURCE = "shmig"  # one unit per run: a worker's ``--resources shmig=1`` is one run at a time
POLL = 0.5  # s between looks at the cluster while cells run
CONNECT_TIMEOUT = 20.0  # s to reach a scheduler
NO_WORKER_TIMEOUT = 120.0  # s without any worker offering the resource before the cells left fail
WORKER_LOOK = 5.0  # s between looks at the workers while cells run
CLOSE_TIMEOUT = 20.0  # s the runs of a local cluster have to stop when it closes
LOCAL = re.compile(r"local:(\d+)$")
ADDRESS = re.compile(r"([a-z][a-z0-9+.-]*://)?[^\s/:]+(:\d+)?$")

# --time-dilation auto, per row, on this worker process: the calibration its first cell made
worker_dilations: dict[str, Dilation] = {}


class Clean(WorkerPlugin):
    """``shmig clean`` each time a worker starts (a nanny restarts a killed one): segments a
    killed run left in /dev/shm go before the next run there."""

    idempotent = True
    name = "shmig-clean"

    def setup(self, worker: Any) -> None:
        memory.sweep_stale()


class IgnoreSigint(WorkerPlugin):
    """A local cluster's workers share the terminal's process group: its Ctrl-C is the client's
    to act on (it stops the runs, then the cluster), not every worker's."""

    idempotent = True
    name = "shmig-ignore-sigint"

    def setup(self, worker: Any) -> None:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)


def dask_setup(worker: Any) -> None:
    """``dask worker ADDRESS --preload shmig.cluster``: clean /dev/shm before the worker joins."""
    memory.sweep_stale()


def run_cell(req: cell.Request, stop: str, topic: str) -> Report | None:
    """The task: ``req`` in a fresh process on this worker. None if the client stopped the series
    (the Event named ``stop``); a failed run is a report, a lost one raises (dask retries it).
    Its start is an event on ``topic``: what the client shows as running."""
    worker = get_worker()
    host = {"hostname": socket.gethostname(), "cpus": os.cpu_count(), "worker": worker.address}
    event = Event(stop)

    def stopped() -> bool:  # a scheduler that cannot be asked cannot take the result either
        try:
            return event.is_set()
        except Exception:
            return True

    if stopped():
        return None
    worker.log_event(topic, {"key": worker.get_current_task()})
    if req.calibrate and req.row_key in worker_dilations:
        req = dataclasses.replace(req, dilation=worker_dilations[req.row_key])
    try:
        result = cell.run(req, stop=stopped)
    except cell.Lost as e:
        raise cell.Lost(f"{e}, on {host['hostname']} ({worker.address})") from None
    if result is None:
        return None
    if req.calibrate and result.dilation is not None:
        worker_dilations.setdefault(req.row_key, result.dilation)
    result.report.host = host
    return result.report


@dataclass(frozen=True)
class Target:
    """Where ``--cluster`` says the cells go: a scheduler's address, or ``local:N``."""

    address: str | None  # None: a LocalCluster started here
    workers: int = 0  # local:N

    @classmethod
    def parse(cls, text: str) -> "Target":
        m = LOCAL.match(text.strip())
        if m:
            n = int(m.group(1))
            if not 1 <= n <= 64:
                raise ConfigError(f"--cluster {text}: give between 1 and 64 local workers, e.g. local:2")
            return cls(None, n)
        if not ADDRESS.match(text.strip()):
            raise ConfigError(f"--cluster {text!r}: give a scheduler address (tcp://host:8786) or local:N")
        return cls(text.strip())

    def __str__(self) -> str:
        return self.address or f"local:{self.workers}"


class Session:
    """A client connected to the target (and the LocalCluster it started, if any). ``run`` the
    cells; leaving the ``with`` block closes everything it started."""

    def __init__(self, target: Target, log: Callable[[str], None] | None = None):
        self.target = target
        self.log = log or (lambda _: None)
        self.cluster: LocalCluster | None = None
        self.client: Client | None = None

    def __enter__(self) -> "Session":
        try:
            self._connect()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connect(self) -> None:
        t = self.target
        if t.address is None:
            # the scheduler runs in this process: it retries a cell whose worker died once
            with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
                self.cluster = LocalCluster(n_workers=t.workers, threads_per_worker=1, processes=True,
                                            resources={RESOURCE: 1}, dashboard_address=None, memory_limit=0,
                                            silence_logs=logging.CRITICAL)
            self.client = Client(self.cluster)
            self.client.register_plugin(IgnoreSigint())
        else:
            try:
                self.client = Client(t.address, timeout=CONNECT_TIMEOUT)
            except OSError as e:
                raise ConfigError(f"--cluster {t.address}: no scheduler answered within {CONNECT_TIMEOUT:g} s"
                                  f" ({e}): start one with `dask scheduler` or check the address") from None
        self.client.register_plugin(Clean())
        workers = self.wait_for_workers()
        retries = self.client.run_on_scheduler(_allowed_failures)
        self.log(f"cluster {t}: {len(workers)} worker(s) offering the {RESOURCE} resource"
                 + ("" if retries == 1 else f"; a cell whose worker dies is run again {retries} time(s)"
                    " (the scheduler's distributed.scheduler.allowed-failures)"))

    def workers(self) -> dict[str, dict[str, Any]]:
        """The workers that run cells: those offering the resource."""
        info = self.client.scheduler_info(n_workers=-1)["workers"]
        return {a: w for a, w in info.items() if w.get("resources", {}).get(RESOURCE, 0) >= 1}

    def wait_for_workers(self) -> dict[str, dict[str, Any]]:
        """At least one worker offering the resource: a cluster with workers but none offering it is
        refused at once (they would never run a cell); one with no worker yet gets NO_WORKER_TIMEOUT."""
        end = time.monotonic() + NO_WORKER_TIMEOUT
        while True:
            found = self.workers()
            if found:
                return found
            others = self.client.scheduler_info(n_workers=-1)["workers"]
            if others or time.monotonic() >= end:
                raise ConfigError(
                    f"--cluster {self.target}: " + (f"none of its {len(others)} worker(s) offers" if others else
                                                    f"no worker offered after {NO_WORKER_TIMEOUT:g} s")
                    + f" the {RESOURCE!r} resource: start workers with `dask worker {self.target} --nthreads 1"
                    f" --resources {RESOURCE}=1`")
            time.sleep(POLL)

    def close(self) -> None:
        """Close the client and the local cluster; a local cluster's runs are given CLOSE_TIMEOUT to
        stop (a worker's death sends its run SIGTERM) and are killed after that; then whatever a
        killed run left in /dev/shm goes."""
        if self.client is None and self.cluster is None:
            return
        runs = self._local_runs()
        for part in (self.client, self.cluster):
            if part is not None:
                try:
                    part.close()
                except Exception:  # closing what already broke: the rest must still be closed
                    pass
        self.client = self.cluster = None
        _, alive = psutil.wait_procs(runs, timeout=CLOSE_TIMEOUT)
        for p in alive:
            p.kill()
        psutil.wait_procs(alive, timeout=5)
        if runs:
            memory.sweep_stale()

    def _local_runs(self) -> list[psutil.Process]:
        """What a local cluster's workers run: their child processes (the cells and theirs)."""
        if self.cluster is None:
            return []
        runs = []
        for nanny in list(self.cluster.workers.values()):
            pid = getattr(nanny, "pid", None)  # the worker process the nanny started, if it is up
            if not pid:
                continue
            try:
                runs += psutil.Process(pid).children(recursive=True)
            except psutil.Error:  # gone already: so are its runs (PR_SET_PDEATHSIG)
                pass
        return runs

    # -- running a series -----------------------------------------------------------------------
    def run(self, runs: Sequence[PlannedRun], ui: LiveStatus, log: Callable[[str], None] | None = None,
            policies: Sequence[str] = ()) -> dict[int, Report]:
        """Every run as a task; their reports by plan index, as they finish. Ctrl-C stops the
        runs in flight and raises SeriesInterrupted with the reports so far."""
        client = self.client
        token = uuid.uuid4().hex[:8]
        stop = Event(f"shmig-stop-{token}", client=client)
        topic = f"shmig-started-{token}"
        started: set[str] = set()  # keys whose task has begun (and maybe finished since)
        client.subscribe_topic(topic, lambda event: started.add(event[1]["key"]))
        by_key: dict[str, PlannedRun] = {}
        futures = []
        for r in runs:
            req = cell.Request(r.config, r.name, r.calibrate, None, tuple(policies))
            key = f"shmig-{token}-{r.index}"
            by_key[key] = r
            futures.append(client.submit(run_cell, req, stop.name, topic, key=key, resources={RESOURCE: 1},
                                         retries=1, pure=False))
        wake = threading.Event()
        for f in futures:
            f.add_done_callback(lambda _: wake.set())
        pending = set(futures)
        out: dict[int, Report] = {}
        failed = 0
        last_worker = next_look = time.monotonic()
        try:
            while pending:
                wake.wait(POLL)
                wake.clear()
                for f in [f for f in pending if f.done()]:
                    pending.discard(f)
                    r = by_key[f.key]
                    rep = out[r.index] = self._outcome(f, r)
                    failed += not rep.ok
                    if log:
                        where = rep.host.get("hostname")
                        log(f"[{len(out)}/{len(runs)}] {r.name}: " + ("ok" if rep.ok else f"{rep.status}: {rep.error}")
                            + (f" (on {where})" if where else ""))
                if not pending:
                    break
                ui.cells(len(out), failed, [by_key[f.key].name for f in pending if f.key in started])
                now = time.monotonic()
                if now < next_look:
                    continue
                next_look = now + WORKER_LOOK
                if self.workers():
                    last_worker = now
                elif now - last_worker > NO_WORKER_TIMEOUT:
                    for f in pending:
                        r = by_key[f.key]
                        out[r.index] = lost(r.config, f"no worker offered the {RESOURCE!r} resource for"
                                                      f" {NO_WORKER_TIMEOUT:g} s")
                    client.cancel(list(pending))
                    pending.clear()
        except KeyboardInterrupt:
            stop.set()  # the runs in flight stop (SIGTERM); the others never start
            client.cancel(list(pending))
            raise SeriesInterrupted(out, len(runs)) from None
        finally:
            client.unsubscribe_topic(topic)
        return out

    def _outcome(self, f: Any, r: PlannedRun) -> Report:
        """A finished task as a report: its own, or a failed one that says how it was lost."""
        try:
            rep = f.result()
        except KilledWorker as e:
            last = getattr(e.last_worker, "address", e.last_worker)
            return lost(r.config, f"the workers running it died {e.allowed_failures + 1} times (the last: {last})",
                        {"worker": last})
        except cell.Lost as e:
            return lost(r.config, f"{e}, when it ran a second time")
        except Exception as e:  # the task could not run at all (e.g. shmig cannot be imported there)
            return lost(r.config, f"{type(e).__name__}: {e}")
        if rep is None:  # stopped, though this client did not ask: someone set the event
            return lost(r.config, "stopped on the worker")
        return rep


def _allowed_failures(dask_scheduler: Any) -> int:
    return dask_scheduler.allowed_failures
