"""``shmig serve``: a source VM and a destination VM, each with a QMP monitor, one Migration behind both.

The two monitors answer the commands of qapi/migration.json the way QEMU's two processes do; the
engine is one ``controller.Migration`` started by ``migrate`` on the source once the destination
has had ``migrate-incoming`` (``-incoming defer``). Its mode follows the source's capabilities as
QEMU's does (``settings_to_config``). MIGRATION events follow the run's phases (the controller's
samples, ``on_sample``), in QEMU's order on each side (migration.c migrate_set_state callers):
setup, active, postcopy-active (or device for precopy), postcopy-paused, postcopy-recover,
completed or failed. ``pmemsave`` reads guest RAM from the controller's shared memory while the
run lives, and from the copy ``ServedMigration`` takes before releasing it afterwards.

Emulated: status, events, capabilities and parameters, the run's figures in query-migrate.
Not emulated: ``stop``/``cont`` change the run state and events only (the emulated guest is
started by ``migrate``), the URIs are checked and recorded but no socket is opened (the channels are
shmig's pipes). ``multifd`` runs ``multifd-channels`` channels (QEMU's default 2); with
``postcopy-ram`` only from 10.1, as QEMU's migrate_caps_check says (e274188612).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable

import numpy as np

from . import memory
from .config import Config
from .controller import Migration
from .errors import ConfigError
from .qmp import Arg, Command, Monitor, QmpError
from .report import Report
from .status import LATEST, OLDEST, V10_1, QemuVersion, Side, during, path, recovery
from .timeline import Sample

CAPABILITIES = ("events", "postcopy-ram", "postcopy-preempt", "postcopy-blocktime", "return-path", "multifd")
# parameter -> (Config field, QEMU unit -> shmig unit)
PARAMETERS: dict[str, tuple[str, Callable[[int], Any]]] = {
    "max-bandwidth": ("max_bandwidth", lambda v: float(v)),  # bytes/s both
    "max-postcopy-bandwidth": ("max_postcopy_bandwidth", lambda v: float(v)),
    "downtime-limit": ("downtime_limit", lambda v: v / 1000.0),  # ms -> s (0: switch only when done)
    "multifd-channels": ("", int),
}
DEFAULT_PARAMETERS = {"max-bandwidth": 134217728, "max-postcopy-bandwidth": 0, "downtime-limit": 300,
                      "multifd-channels": 2}


def version_dict(version: str) -> dict[str, Any]:
    parts = [int(x) for x in (version.split(".") + ["0", "0"])[:3]]
    return {"qemu": {"major": parts[0], "minor": parts[1], "micro": parts[2]}, "package": "shmig"}


def settings_to_config(caps: dict[str, bool], params: dict[str, int], version: str) -> dict[str, Any]:
    """Capabilities + parameters + the QEMU version claimed -> Config keyword arguments.

    postcopy-ram alone is vanilla; with postcopy-preempt it is preempt-full from 8.0 (7.1/7.2:
    the break-huge preempt of 7.1); 10.1's page hint is unconditional with preempt (ram.c
    ram_save_host_page_urgent always calls ram_page_hint_update), so page_hint follows the version."""
    major, minor = (version_dict(version)["qemu"][k] for k in ("major", "minor"))
    claimed = QemuVersion(major, minor)  # the run stands for it where shmig emulates it
    kw: dict[str, Any] = {"qemu_version": str(claimed) if OLDEST <= claimed <= LATEST else None}
    if not caps.get("postcopy-ram"):
        kw["mode"] = "precopy"
    elif not caps.get("postcopy-preempt"):
        kw["mode"] = "vanilla"
    elif (major, minor) >= (8, 0):
        kw["mode"] = "preempt-full"
        kw["page_hint"] = (major, minor) >= (10, 1)
    else:
        kw["mode"] = "preempt"
    if caps.get("multifd"):
        kw["multifd_channels"] = params.get("multifd-channels", DEFAULT_PARAMETERS["multifd-channels"])
    for name, value in params.items():  # only those a client set: shmig's defaults otherwise
        field, conv = PARAMETERS[name]
        if field:
            kw[field] = conv(value) if value or field == "downtime_limit" else None  # 0 = no limit
    return kw


class ServedMigration(Migration):
    """The run behind both monitors, with the two things serving needs that ``shmig run`` does not,
    kept here so the controller stays as it is: guest RAM copied before it is released (pmemsave
    after the end), and an end asked from another thread (Ctrl-C, quit) that the thread in
    ``wait()`` carries out itself: it reaps, records and releases, nothing is freed from under it."""

    def __init__(self, cfg: Config, on_sample: Callable[[Sample], None]):
        super().__init__(cfg, on_sample)
        self.stop_reason: str | None = None  # set from another thread: wait() ends the run as failed
        self.kept: dict[str, np.ndarray] = {}  # "source"/"destination" guest RAM at the end

    def _loop(self, until: Callable[[], bool] | None = None) -> None:
        super()._loop(until=lambda: self.stop_reason is not None or (until is not None and until()))
        if self.stop_reason is not None:
            self._fail(self.stop_reason)

    def pause(self) -> None:
        """QMP migrate-pause: mig/src shuts its channels down before its next frame, as a dropped
        connection would (migration.c qmp_migrate_pause); the run then pauses as on a fault."""
        with self._lock:
            if self.closed or self.mem is None or self.phase != "postcopy":
                raise QmpError("migrate-pause is currently only supported during postcopy-active state")
            self.mem.ctl[memory.PAUSE_REQUESTED] = 1

    def close(self) -> None:
        with self._lock:
            if not self.closed and self.mem is not None and self.record is not None:
                self.kept = {"source": self.mem.src.copy(), "destination": self.mem.read_dst()}
        super().close()

    def guest_ram(self, side: str, val: int, size: int) -> tuple[np.ndarray, int] | None:
        """(bytes, offset of ``val`` in them) of one side's guest RAM for pmemsave: [val, val +
        size) copied while the run holds it (the destination's by pread with the uffd backend:
        GuestMemory.read_dst), or all of what was kept at the end; None before the run exists. A
        range outside RAM comes back whole, for the caller to refuse in QEMU's words."""
        with self._lock:  # close() takes it too: the shared memory stays mapped while it is read
            kept = self.kept.get(side)
            if kept is not None:
                return kept, val
            if self.mem is None or self.closed:
                return None
            if not (0 <= val and 0 <= size and val + size <= self.cfg.ram):
                return self.mem.src, val
            return (self.mem.src[val:val + size].copy() if side == "source" else self.mem.read_dst(val, size)), 0


class Pair:
    """The two VMs and the one run behind them."""

    def __init__(self, base: dict[str, Any], qmp_src: str, qmp_dst: str, qemu_version: str = "10.2.50",
                 json_path: str | None = None):
        Config.from_strings(**base).validate()  # bad run options fail before anything listens
        try:
            v = version_dict(qemu_version)["qemu"]
        except ValueError:
            raise ConfigError(f"--qemu-version {qemu_version!r}: use MAJOR.MINOR[.MICRO], e.g. 7.2 or 10.2.50") from None
        self.base, self.version, self.json_path = dict(base), qemu_version, json_path
        self.claimed = QemuVersion(v["major"], v["minor"])  # the release the monitors say they are
        self.mig: ServedMigration | None = None
        self.report: Report | None = None
        self.last: Sample | None = None  # the run's latest sample: query-migrate while it runs
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()
        self.done = threading.Event()  # quit on both
        self.started = self.postcopy_requested = False  # the run's children are up; postcopy asked before
        self.src = VM(self, "source")
        self.dst = VM(self, "destination")
        self.src.monitor = Monitor(qmp_src, self.src.commands(), version_dict(qemu_version))
        try:
            self.dst.monitor = Monitor(qmp_dst, self.dst.commands(), version_dict(qemu_version))
        except BaseException:
            self.src.monitor.close()
            raise

    # -- the engine ---------------------------------------------------------------------------
    def start(self) -> None:
        caps = self.src.caps
        if caps["postcopy-ram"] and not self.dst.caps["postcopy-ram"]:
            raise QmpError("the destination does not have postcopy-ram: set it there too, as QEMU needs")
        explicit = {k: v for k, v in self.src.params.items() if k in self.src.params_set}
        kw = {**self.base, **settings_to_config(caps, explicit, self.version)}
        try:  # switchover is migrate-start-postcopy's; a paused migration waits for migrate-recover
            cfg = dataclasses.replace(Config.from_strings(**kw), precopy_rounds=None, recover_after=None).validate()
        except ConfigError as e:
            raise QmpError(str(e)) from None
        self.mig = ServedMigration(cfg, self._on_sample)
        for vm in (self.src, self.dst):
            vm.set_status("setup")
        self.thread = threading.Thread(target=self._run, name="shmig serve engine", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        assert self.mig is not None
        try:
            self.mig.start()
            with self.lock:
                self.started = True
                if self.postcopy_requested:  # migrate-start-postcopy came during setup, as QEMU allows
                    self.mig.start_postcopy()
            report = self.mig.wait()
        except Exception as e:  # noqa: BLE001 - reported as QEMU does: status failed
            report = Report(status="failed", error=str(e))
        self.report = report
        if self.json_path:
            from .report import write_json
            write_json(self.json_path, report.to_dict())
        for vm in (self.src, self.dst):  # every status of the path not announced yet, in order
            vm.set_status("completed" if report.ok else "failed")
        self.dst.run_state("running", "RESUME")
        self.src.run_state("postmigrate")

    def statuses(self, side: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """QEMU's statuses on ``side`` for this run's mode and release, in order: the path of a
        migration that completes, and a postcopy recovery's (status.path, status.recovery)."""
        if self.mig is not None:
            mode, version = self.mig.cfg.mode, self.mig.cfg.qemu
        else:  # before the run: only whether the destination has a setup status (8.2) matters
            mode, version = "vanilla", min(max(self.claimed, OLDEST), LATEST)
        who = Side(side)
        return tuple(map(str, path(who, mode, version))), tuple(map(str, recovery(who, version)))

    def _on_sample(self, s: Sample) -> None:
        self.src.set_status(s.status)  # status.during, as the timeline has it
        if self.mig is not None:
            cfg = self.mig.cfg
            self.dst.set_status(str(during(s.phase, cfg.mode, cfg.qemu, Side.DESTINATION)))
        if s.phase == "switchover":
            self.src.run_state("finish-migrate", "STOP")
        elif s.phase == "postcopy":
            self.src.run_state("postmigrate")
            self.dst.run_state("running", "RESUME")
        if s.rounds + 1 > self.src.passes:
            self.src.passes = s.rounds + 1
            if self.src.caps["events"]:  # migration.c: qapi_event_send_migration_pass if migrate_events()
                self.src.event("MIGRATION_PASS", {"pass": self.src.passes})
        self.last = s

    def close(self) -> None:
        """The run ends in its own thread (record, reap, release; never from under it), then the monitors."""
        if self.mig is not None:
            if self.thread is not None and self.thread.is_alive():
                self.mig.stop_reason = f"interrupted during {self.mig.phase}"
                self.thread.join(60)
            self.mig.close()
        for vm in (self.src, self.dst):
            if vm.monitor is not None:
                vm.monitor.close()


class VM:
    """One side: its run state, capabilities, parameters and migration status, and its commands."""

    def __init__(self, pair: Pair, side: str):
        self.pair, self.side = pair, side
        self.monitor: Monitor | None = None
        self.caps = {c: False for c in CAPABILITIES}
        self.params = dict(DEFAULT_PARAMETERS)
        self.params_set: set[str] = set()  # the parameters a client set (the others keep shmig's defaults)
        self.status = "none"
        self.state = "running" if side == "source" else "inmigrate"
        self.incoming = False
        self.recovering = False
        self.passes = 0
        self.quit = False

    def event(self, name: str, data: dict[str, Any] | None = None) -> None:
        if self.monitor is not None:
            self.monitor.emit(name, data)

    def set_status(self, status: str) -> None:
        """A MIGRATION event for every status passed on the way, in QEMU's order for this side, mode
        and release (Pair.statuses): a fast run may go by a status between two samples, and QEMU
        would still have announced it. A status this side does not have is passed over."""
        with self.pair.lock:
            if status == self.status or self.status in ("completed", "failed", "cancelled"):
                return
            for st in self._steps(status):
                self.status = st
                if self.caps["events"]:
                    self.event("MIGRATION", {"status": st})

    def _steps(self, status: str) -> list[str]:
        """The statuses from this side's to ``status``, that one included; [] for a late sample
        of a status already passed, or one this side does not have in this release."""
        order, rec = self.pair.statuses(self.side)
        here: str | None = None if self.status == "none" else self.status
        if status == "failed" or status == rec[0]:  # failed from anywhere; paused: a break (again)
            return [status]
        steps: list[str] = []
        if here in rec[:-1]:  # in a recovery: QEMU's recovery order, to its end (postcopy-active)
            end = rec.index(status) if status in rec else len(rec) - 1
            steps = list(rec[rec.index(here) + 1:end + 1])
            if status in rec:
                return steps
            here = rec[-1]
        if status in order and (here is None or here in order):
            return steps + list(order[(order.index(here) if here else -1) + 1:order.index(status) + 1])
        return steps

    def run_state(self, state: str, event: str | None = None) -> None:
        if self.state != state:
            self.state = state
            if event:
                self.event(event)

    # -- commands -----------------------------------------------------------------------------
    def commands(self) -> list[Command]:
        c = [
            Command("query-version", lambda: self.monitor.version if self.monitor else {}),
            Command("query-status", lambda: {"status": self.state, "running": self.state == "running"}),
            Command("stop", self.stop), Command("cont", self.cont), Command("quit", self.do_quit),
            Command("migrate-set-capabilities", self.set_caps, {"capabilities": Arg(list, True)}),
            Command("query-migrate-capabilities",
                    lambda: [{"capability": k, "state": v} for k, v in self.caps.items()]),
            Command("migrate-set-parameters", self.set_params, {k: Arg(int) for k in PARAMETERS}),
            Command("query-migrate-parameters", lambda: dict(self.params)),
            Command("query-migrate", self.query_migrate),
            Command("migrate-pause", self.pause),
            Command("pmemsave", self.pmemsave, {"val": Arg(int, True), "size": Arg(int, True),
                                                "filename": Arg(str, True), "cpu-index": Arg(int)}),
        ]
        if self.side == "source":
            c += [Command("migrate", self.migrate, {"uri": Arg(str), "channels": Arg(list), "detach": Arg(bool),
                                                     "resume": Arg(bool)}),
                  Command("migrate-start-postcopy", self.start_postcopy),
                  Command("migrate_cancel", self.cancel)]
        else:
            c += [Command("migrate-incoming", self.migrate_incoming,
                          {"uri": Arg(str), "channels": Arg(list), "exit-on-error": Arg(bool)}),
                  Command("migrate-recover", self.recover, {"uri": Arg(str, True)})]
        return c

    def _active(self) -> bool:
        return self.status not in ("none", "completed", "failed", "cancelled")

    def stop(self) -> None:
        self.run_state("paused", "STOP")

    def cont(self) -> None:
        if self.state == "inmigrate":
            raise QmpError("Migration is not finalized yet")  # qmp_cont, RUN_STATE_INMIGRATE
        self.run_state("running", "RESUME")

    def do_quit(self) -> None:
        self.quit = True
        if self.pair.src.quit and self.pair.dst.quit:
            self.pair.done.set()

    def set_caps(self, capabilities: list[Any]) -> None:
        """migrate_caps_check (migration/options.c), QEMU's messages."""
        new = dict(self.caps)
        for item in capabilities:
            if not isinstance(item, dict) or set(item) != {"capability", "state"}:
                raise QmpError("Invalid parameter type for 'capabilities[0]', expected: object")
            name, state = item["capability"], item["state"]
            if name not in new:
                raise QmpError(f"Parameter 'capability' does not accept value '{name}'")
            if not isinstance(state, bool):
                raise QmpError("Invalid parameter type for 'state', expected: boolean")
            new[name] = state
        if self._active():
            raise QmpError("There's a migration process in progress")
        if new["postcopy-preempt"] and not new["postcopy-ram"]:
            raise QmpError("Postcopy preempt requires postcopy-ram")
        if self.incoming and new["postcopy-preempt"] != self.caps["postcopy-preempt"]:
            raise QmpError("Postcopy preempt must be set before incoming starts")
        if self.incoming and new["multifd"] != self.caps["multifd"]:
            raise QmpError("Multifd must be set before incoming starts")
        if new["multifd"] and new["postcopy-ram"] and self.pair.claimed < V10_1:
            raise QmpError("Postcopy is not yet compatible with multifd")  # until e274188612 (10.1)
        self.caps = new

    def set_params(self, **kw: int) -> None:
        for k, v in kw.items():
            if v < 0:
                raise QmpError(f"Parameter '{k.replace('_', '-')}' expects a non-negative value")
        self.params.update({k.replace("_", "-"): v for k, v in kw.items()})
        self.params_set.update(k.replace("_", "-") for k in kw)

    def migrate_incoming(self, uri: str | None = None, channels: list | None = None,
                         exit_on_error: bool = True) -> None:
        _check_uri(uri, channels)
        if self.incoming:
            raise QmpError("The incoming migration has already been started")
        self.incoming = True
        self.set_status("setup")

    def migrate(self, uri: str | None = None, channels: list | None = None, detach: bool = True,
                resume: bool = False) -> None:
        _check_uri(uri, channels)
        pair = self.pair
        if resume:
            if self.status != "postcopy-paused":
                raise QmpError("Cannot resume if there is no paused migration")
            if not pair.dst.recovering:
                raise QmpError("the destination has not run migrate-recover yet")
            assert pair.mig is not None
            try:
                pair.mig.recover()
            except RuntimeError as e:
                raise QmpError(str(e)) from None
            pair.dst.recovering = False
            return
        if self._active():
            raise QmpError("There's a migration process in progress")
        if not pair.dst.incoming:
            raise QmpError(f"Failed to connect to '{uri or 'channels'}': the destination has not run migrate-incoming")
        pair.start()

    def start_postcopy(self) -> None:
        if not self.caps["postcopy-ram"]:
            raise QmpError("Enable postcopy with migrate_set_capability before the start of migration")
        pair = self.pair
        if pair.mig is None:
            raise QmpError("Postcopy must be started after migration has been started")
        with pair.lock:
            if not pair.started:
                pair.postcopy_requested = True
                return
        try:
            pair.mig.start_postcopy()
        except RuntimeError as e:
            raise QmpError(str(e)) from None

    def cancel(self) -> None:
        if self.status.startswith("postcopy"):
            raise QmpError("Postcopy migration in progress, cannot cancel.")
        if self._active() and self.pair.mig is not None:
            raise QmpError("shmig cannot cancel a precopy migration: let it complete")

    def pause(self) -> None:
        if self.status != "postcopy-active" or self.pair.mig is None:
            raise QmpError("migrate-pause is currently only supported during postcopy-active state")
        self.pair.mig.pause()

    def recover(self, uri: str) -> None:
        _check_uri(uri, None)
        if self.status != "postcopy-paused":
            raise QmpError("Migrate recover can only be run when postcopy is paused.")
        if self.recovering:
            raise QmpError("Migrate recovery is triggered already")
        self.recovering = True

    def pmemsave(self, val: int, size: int, filename: str, cpu_index: int = 0) -> None:
        mig = self.pair.mig
        got = None if mig is None else mig.guest_ram(self.side, val, size)
        if got is None:
            raise QmpError("shmig: guest RAM exists once 'migrate' has started the run")
        ram, val = got
        flat = ram.reshape(-1).view(np.uint8)
        if val < 0 or size < 0 or val + size > flat.size:
            raise QmpError(f"Invalid addr 0x{val:x}/size {size} specified")
        try:
            with open(filename, "wb") as f:
                f.write(flat[val:val + size].tobytes())
        except OSError as e:
            raise QmpError(f"Could not open '{filename}': {e.strerror}") from None

    def query_migrate(self) -> dict[str, Any]:
        """fill_source_migration_info / fill_destination_migration_info: what each side shows."""
        out: dict[str, Any] = {}
        if self.status == "none":
            return out
        out["status"] = self.status
        pair, rep = self.pair, self.pair.report
        if rep is not None and rep.total_time_ms is not None:
            if self.side == "source":
                out["total-time"] = int(rep.total_time_ms)
                out["setup-time"] = int(rep.setup_time_ms or 0)
                out["downtime"] = int(rep.downtime_ms or 0)
                out["ram"] = _ram(rep.ram, rep.dirty_sync_count, rep.postcopy_requests)
            elif self.caps["postcopy-blocktime"] and rep.config.get("mode") != "precopy":
                out["postcopy-blocktime"] = int(rep.postcopy_blocktime_ms)
                out["postcopy-vcpu-blocktime"] = [int(x) for x in rep.postcopy_vcpu_blocktime_ms]
                out["postcopy-latency"] = rep.postcopy_latency
                out["postcopy-latency-dist"] = list(rep.postcopy_latency_dist)
                out["postcopy-vcpu-latency"] = list(rep.postcopy_vcpu_latency)
                out["postcopy-non-vcpu-latency"] = rep.postcopy_non_vcpu_latency
            if rep.error and self.status == "failed":
                out["error-desc"] = rep.error
        elif self.side == "source" and pair.last is not None and pair.mig is not None:
            s = pair.last
            page = 4096  # target page
            out["total-time"] = int(s.t_ms)
            out["ram"] = {"transferred": s.precopy_bytes + s.postcopy_bytes + s.multifd_bytes, "remaining": s.remaining_pages * page,
                          "total": int(pair.mig.cfg.ram), "dirty-sync-count": s.rounds + 1,
                          "postcopy-requests": s.requests, "page-size": page}
        return out


def _ram(ram: dict[str, Any], syncs: int, requests: int) -> dict[str, Any]:
    """populate_ram_info: QEMU's names for the report's ram figures."""
    names = {"transferred": "transferred", "total": "total", "duplicate": "duplicate", "normal": "normal",
             "normal_bytes": "normal-bytes", "remaining": "remaining", "mbps": "mbps", "pages_per_second":
             "pages-per-second", "precopy_bytes": "precopy-bytes", "postcopy_bytes": "postcopy-bytes",
             "page_size": "page-size", "dirty_pages_rate": "dirty-pages-rate"}
    out = {names[k]: v for k, v in ram.items() if k in names}
    out["dirty-sync-count"] = syncs
    out["postcopy-requests"] = requests
    out.setdefault("remaining", 0)
    return out


def _check_uri(uri: str | None, channels: list | None) -> None:
    """qmp_migrate / qmp_migrate_incoming: exactly one of uri and channels."""
    if (uri is None) == (channels is None):
        raise QmpError("need either 'uri' or 'channels' argument" if uri is None else
                       "'uri' and 'channels' arguments are mutually exclusive; exactly one of the two"
                       " should be present in 'migrate' qmp command ")
    if uri is not None and uri.split(":", 1)[0] not in ("tcp", "unix", "exec", "fd", "file", "rdma", "vsock"):
        raise QmpError(f"Invalid URI '{uri}'" if ":" in uri else "unknown migration protocol: " + uri)
