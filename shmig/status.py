"""QEMU's migration statuses, and the order each side goes through them per mode and QEMU version.

The names are ``MigrationStatus`` of qapi/migration.json, spelt as ``query-migrate`` reports them,
so a shmig status history reads like QEMU's. Which statuses a migration passes depends on the QEMU
version, and each mode stands for a range of versions:

==============  ===============  ==================================================================
mode            QEMU             why
==============  ===============  ==================================================================
precopy         any              -
vanilla         any (7.1 on)     -
preempt         7.1 - 7.2        the migration thread sends urgent pages and breaks huge pages;
                                 8.0's Preempt-Full rework removed ``x-postcopy-preempt-break-huge``
                                 and moved urgent pages to the return thread (b062106d3a)
preempt-full    8.0 on           the return thread sends urgent pages itself (9358982744)
==============  ===============  ==================================================================

The ``page_hint`` needs 10.1 (20d82622812d), multifd together with postcopy 10.1 (e274188612).

Where QEMU enters each status (HEAD = 10.2.50; earlier versions noted), so that shmig stamps its
history at the same points:

Source (migration/migration.c)

* ``setup``: ``migrate_init()``, the ``migrate`` command.
* ``active``: ``migration_thread()`` once ``qemu_savevm_state_setup()`` is done (RAM's bitmaps,
  multifd's first sync); the main channel is open and PING 1 sent, its PONG not yet awaited.
* ``device`` (10.0+, 4881411136): ``migration_switchover_start()``, right after the VM stops.
  Postcopy reaches it in ``postcopy_start()`` after the preempt channel is connected and RAM's
  ``save_postcopy_prepare`` (multifd's flush and sync, EOS) is sent; precopy in
  ``migration_completion_precopy()``. From here the rate limit is off (40004007e6).
* ``postcopy-device`` (10.2+, 7b842fe354; only with a return path, which postcopy always opens):
  the end of ``postcopy_start()``: the package is sent, downtime ends (PING 4), the rate becomes
  ``max-postcopy-bandwidth``.
* ``postcopy-active``: 10.2+, ``migration_iteration_run()`` on the migration thread once the
  return thread has seen the PONG of ``QEMU_VM_PING_PACKAGED_LOADED`` (the ping sent inside the
  package just before ``POSTCOPY_RUN``): the destination loaded the devices and is about to run.
  10.0-10.1: the end of ``postcopy_start()``. 7.x-9.2: the *start* of ``postcopy_start()``, before
  the VM stops: the whole switchover counted as ``postcopy-active``.
* ``completed``: ``migration_completion_end()``. In postcopy, ``migration_completion()`` first sends
  the rest (nothing since 10.1, 7aaa1fc072: postcopy completes only when nothing is pending) and
  ``QEMU_VM_EOF``, then ``close_return_path_on_source()`` joins the return thread, which exits on
  the destination's ``SHUT``; 7.x calls it ``await_return_path_close_on_source()``.
* ``postcopy-paused``: ``postcopy_pause()``, a channel error while ``postcopy-active`` (an error in
  ``postcopy-device`` fails the migration instead: the source still runs the VM).
* ``postcopy-recover-setup`` (9.1+, 4146b77ec7): ``migrate`` with ``resume=true``.
* ``postcopy-recover``: ``migration_connect()`` once the new main channel is up (from
  ``postcopy-recover-setup``; before 9.1 from ``postcopy-paused``), then ``postcopy-active`` on
  the destination's ``RESUME_ACK``.

Destination (migration/migration.c, savevm.c, postcopy-ram.c)

* ``setup`` (8.2+, 4111a732e8): ``migrate-incoming``; before, the destination went from ``none``
  straight to ``active``.
* ``active``: ``process_incoming_migration_co()``, once the main channel (and every multifd
  channel) is connected.
* ``postcopy-device`` (10.2+, with a return path): ``postcopy_listen_thread()`` starting, on
  ``POSTCOPY_LISTEN`` at the head of the package; the destination still loads device state.
* ``postcopy-active``: 10.2+, ``loadvm_postcopy_handle_run()`` on ``POSTCOPY_RUN``, just after it
  answered the package's PING; so it precedes the source's by at least the one-way latency.
  Before 10.2, ``postcopy_listen_thread()`` starting.
* ``completed``: postcopy, ``postcopy_listen_thread()`` once it has read ``QEMU_VM_EOF`` and the
  main thread's load is done; the ``SHUT`` the source waits for is sent after it, by
  ``migration_incoming_state_destroy()``, once ``postcopy_ram_incoming_cleanup()`` has waited for
  every requested page to be placed and joined the preempt and fault threads. Precopy,
  ``process_incoming_migration_bh()``.
* ``postcopy-paused``: ``postcopy_pause_incoming()``; ``postcopy-recover``: the new main channel
  (``postcopy_try_recover()``); ``postcopy-active``: ``loadvm_postcopy_handle_resume()``.

``StatusHistory`` checks each status entered against these rules as it is stamped, so a history
out of QEMU's order fails where it goes wrong, not at the end.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable, Mapping



class MigrationStatus(enum.StrEnum):
    """qapi/migration.json ``MigrationStatus``, in QAPI's order."""

    NONE = "none"
    SETUP = "setup"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    ACTIVE = "active"
    POSTCOPY_DEVICE = "postcopy-device"  # 10.2
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER_SETUP = "postcopy-recover-setup"  # 9.1
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILED = "failed"
    COLO = "colo"
    PRE_SWITCHOVER = "pre-switchover"
    DEVICE = "device"  # every migration since 10.0
    WAIT_UNPLUG = "wait-unplug"


S = MigrationStatus
TERMINAL = frozenset({S.COMPLETED, S.FAILED, S.CANCELLED})


class Side(enum.StrEnum):
    SOURCE = "source"
    DESTINATION = "destination"


class VersionError(ValueError):
    """A QEMU version a mode or option does not exist in: one line saying what to change."""


class StatusOrderError(ValueError):
    """A status entered out of QEMU's order."""


@dataclass(frozen=True, order=True)
class QemuVersion:
    major: int
    minor: int

    @classmethod
    def parse(cls, text: "str | QemuVersion") -> "QemuVersion":
        """``"10.2"``, ``"7.1"`` (a third number, ``"10.1.2"``, is a stable release of the same)."""
        if isinstance(text, QemuVersion):
            return text
        parts = str(text).strip().split(".")
        try:
            if not 2 <= len(parts) <= 3 or any(int(p) < 0 for p in parts):
                raise ValueError
            major, minor = int(parts[0]), int(parts[1])
        except ValueError:
            raise VersionError(f"cannot read {text!r} as a QEMU version (e.g. 10.2 or 7.1)") from None
        return cls(major, minor)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"


V7_1, V7_2, V8_0, V8_2 = QemuVersion(7, 1), QemuVersion(7, 2), QemuVersion(8, 0), QemuVersion(8, 2)
V9_1, V10_0, V10_1, V10_2 = QemuVersion(9, 1), QemuVersion(10, 0), QemuVersion(10, 1), QemuVersion(10, 2)
OLDEST, LATEST = V7_1, V10_2  # what shmig emulates: postcopy preemption's first release to today's

# mode -> (first, last) QEMU version it stands for; None = to today
MODE_VERSIONS: dict[str, tuple[QemuVersion, QemuVersion | None]] = {
    "precopy": (OLDEST, None),
    "vanilla": (OLDEST, None),
    "preempt": (V7_1, V7_2),
    "preempt-full": (V8_0, None),
}


def mode_versions(mode: str) -> tuple[QemuVersion, QemuVersion | None]:
    """The versions a mode stands for; a policy of the user's own is a postcopy mode of any."""
    return MODE_VERSIONS.get(mode, (OLDEST, None))


def default_version(mode: str) -> QemuVersion:
    """The newest QEMU a mode stands for (``preempt``: 7.2)."""
    return mode_versions(mode)[1] or LATEST


def check_version(mode: str, version: QemuVersion, *, page_hint: bool = False, multifd: bool = False) -> None:
    """``version`` is one ``mode`` (and the options) existed in; else ``VersionError``."""
    first, last = mode_versions(mode)
    if not OLDEST <= version <= LATEST:
        raise VersionError(f"--qemu-version {version}: shmig emulates QEMU {OLDEST} to {LATEST}")
    if version < first or (last is not None and version > last):
        span = f"{first} to {last}" if last else f"{first} and later"
        why = {"preempt": " (8.0 removed break-huge: use --mode preempt-full)",
               "preempt-full": " (before 8.0 the migration thread sent urgent pages: use --mode preempt)"}
        raise VersionError(f"--mode {mode} stands for QEMU {span}, not {version}{why.get(mode, '')}")
    if page_hint and version < V10_1:
        raise VersionError(f"--page-hint is QEMU 10.1's; --qemu-version {version} does not have it")
    if multifd and mode != "precopy" and version < V10_1:
        raise VersionError(f"multifd with postcopy needs QEMU 10.1 or later, not {version}")


def path(side: Side, mode: str, version: QemuVersion) -> tuple[MigrationStatus, ...]:
    """The statuses of a migration that completes without a recovery, in order."""
    postcopy = mode != "precopy"
    if side is Side.SOURCE:
        switchover = (S.DEVICE,) if version >= V10_0 else ()
        if not postcopy:
            return (S.SETUP, S.ACTIVE, *switchover, S.COMPLETED)
        package = (S.POSTCOPY_DEVICE,) if version >= V10_2 else ()
        return (S.SETUP, S.ACTIVE, *switchover, *package, S.POSTCOPY_ACTIVE, S.COMPLETED)
    setup = (S.SETUP,) if version >= V8_2 else ()
    if not postcopy:
        return (*setup, S.ACTIVE, S.COMPLETED)
    package = (S.POSTCOPY_DEVICE,) if version >= V10_2 else ()
    return (*setup, S.ACTIVE, *package, S.POSTCOPY_ACTIVE, S.COMPLETED)


def during(phase: str, mode: str, version: QemuVersion, side: Side = Side.SOURCE) -> MigrationStatus:
    """``side``'s status while the controller is in ``phase`` (shmig.timeline.PHASES), for the
    timeline, the live line and ``shmig serve``'s events. The source's switchover is ``device`` from
    10.0, and ``postcopy-active`` before in postcopy (postcopy_start entered it before stopping the
    VM); the short ``postcopy-device`` of 10.2 (package sent, its PONG not yet back) has no phase of
    its own. A recovery is the source's ``postcopy-recover-setup`` from 9.1 until the new channels
    are up. The destination is ``active`` until it runs the guest (``setup`` from 8.2 before:
    ``path`` says which statuses a release has)."""
    postcopy = mode != "precopy"
    if phase == "setup":
        return S.SETUP
    if side is Side.DESTINATION:
        if phase in ("postcopy-paused", "postcopy-recover"):
            return S.POSTCOPY_PAUSED if phase == "postcopy-paused" else S.POSTCOPY_RECOVER
        return S.POSTCOPY_ACTIVE if postcopy and phase in ("postcopy", "completion") else S.ACTIVE
    if phase == "switchover" or (phase == "completion" and not postcopy):
        return S.DEVICE if version >= V10_0 else S.POSTCOPY_ACTIVE if postcopy else S.ACTIVE
    if phase == "postcopy-recover":
        return S.POSTCOPY_RECOVER_SETUP if version >= V9_1 else S.POSTCOPY_RECOVER
    if phase == "postcopy-paused":
        return S.POSTCOPY_PAUSED
    if phase in ("postcopy", "completion"):  # postcopy's completion: postcopy-active until completed
        return S.POSTCOPY_ACTIVE
    return S.ACTIVE


def recovery(side: Side, version: QemuVersion) -> tuple[MigrationStatus, ...]:
    """What a postcopy recovery adds after ``postcopy-active``, back to ``postcopy-active``."""
    if side is Side.SOURCE and version >= V9_1:
        return (S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER_SETUP, S.POSTCOPY_RECOVER, S.POSTCOPY_ACTIVE)
    return (S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER, S.POSTCOPY_ACTIVE)


def transitions(side: Side, mode: str,
                version: QemuVersion) -> Mapping[MigrationStatus, frozenset[MigrationStatus]]:
    """Every status change QEMU makes on ``side``: the path, a recovery (which may fail back to
    ``postcopy-paused``, and start again), and ``failed`` from any status not yet terminal."""
    steps = path(side, mode, version)
    edges: dict[MigrationStatus, set[MigrationStatus]] = {S.NONE: {steps[0]}}
    for a, b in zip(steps, steps[1:]):
        edges.setdefault(a, set()).add(b)
    if mode != "precopy":
        loop = recovery(side, version)
        for a, b in zip((S.POSTCOPY_ACTIVE, *loop), loop):
            edges.setdefault(a, set()).add(b)
        for retry in loop[1:-1]:  # a recovery attempt that fails pauses again
            edges[retry].add(S.POSTCOPY_PAUSED)
    for a in list(edges):
        if a not in TERMINAL:
            edges[a].add(S.FAILED)
    return {a: frozenset(b) for a, b in edges.items()}


@dataclass
class StatusHistory:
    """One side's statuses with the time each was entered, checked against QEMU's order."""

    side: Side
    mode: str
    version: QemuVersion
    entries: list[tuple[MigrationStatus, int]] = field(default_factory=list)  # (status, ns)
    _edges: Mapping[MigrationStatus, frozenset[MigrationStatus]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._edges = transitions(self.side, self.mode, self.version)

    @property
    def current(self) -> MigrationStatus:
        return self.entries[-1][0] if self.entries else S.NONE

    def enter(self, status: MigrationStatus | str, t_ns: int) -> None:
        """``status`` begins at ``t_ns``; ``StatusOrderError`` if QEMU never goes there from here."""
        status = MigrationStatus(status)
        if status not in self._edges.get(self.current, frozenset()):
            allowed = ", ".join(sorted(self._edges.get(self.current, ()))) or "nothing: it has ended"
            raise StatusOrderError(f"{self.side} of a {self.mode} migration (QEMU {self.version}) went"
                                   f" {self.current} -> {status}; from {self.current} QEMU goes to {allowed}")
        if self.entries and t_ns < self.entries[-1][1]:
            raise StatusOrderError(f"{self.side}: {status} stamped at {t_ns} ns, before {self.current}"
                                   f" ({self.entries[-1][1]} ns)")
        self.entries.append((status, t_ns))

    @property
    def completed(self) -> bool:
        """It went the whole way: every status of the path, in order, ending ``completed``."""
        seen = [s for s, _ in self.entries]
        it = iter(seen)
        return self.current is S.COMPLETED and all(s in it for s in path(self.side, self.mode, self.version))

    def first(self, status: MigrationStatus) -> int | None:
        """When ``status`` was first entered (ns), or None: the postcopy phase runs from the
        source's first ``postcopy-active`` to its ``completed``, recoveries included."""
        return next((t for s, t in self.entries if s is status), None)

    def to_json(self, t0_ns: int,
                ns_to_ms: Callable[[float], float] = lambda ns: ns / 1e6) -> list[dict[str, object]]:
        """``[{"status": "setup", "t_ms": 0.0}, ...]``, times from ``t0_ns`` (``ns_to_ms`` turns a
        real duration into emulated ms: ``Clock.emulated_ms``)."""
        return [{"status": str(s), "t_ms": round(ns_to_ms(t - t0_ns), 3)} for s, t in self.entries]
