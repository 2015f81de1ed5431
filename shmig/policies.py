"""Request-servicing policies: who sends a requested page, on which channel, and when.

One class per QEMU behaviour (reference sections 2.2-2.3, 7). A policy gets the ``Source`` and
implements two hooks: ``on_request`` runs in the return thread for every REQ_PAGES message;
``run_postcopy`` is the migration thread's postcopy loop. To try your own idea, subclass one of
these and ``register`` it under a new mode name.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
import time
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

import numpy as np

from .config import ConfigError

MAX_WAIT = 0.05  # ram_save_iterate returns to the migration thread's loop after this long (emulated s)

if TYPE_CHECKING:
    from .config import Config
    from .source import Source
    from .wire import FrameWriter


class Policy:
    """Vanilla postcopy: requests are queued and sent by the migration thread on the one channel."""

    name = "vanilla"
    preempt_channel = False
    # QEMU 7.1 and earlier count bytes per QEMUFile: urgent pages on the postcopy channel do not
    # spend the background stream's budget; 8.0+ counts every byte against one shared counter.
    shared_rate_counter = False

    def __init__(self, cfg: Config, src: Source):
        self.cfg = cfg
        self.src = src

    @property
    def rate_wake(self) -> threading.Event | None:
        """What ends a rate-limit sleep early: a queued request (migration_make_urgent_request)."""
        return self.src.urgent

    def counts_against_limit(self, writer: FrameWriter, urgent: bool) -> bool:
        return self.shared_rate_counter or writer is self.src.pre

    def on_request(self, hp: int) -> None:
        """ram_save_queue_pages: queue it and wake the migration thread."""
        self.src.requests.append(hp)
        self.src.urgent.set()

    def urgent_channel(self) -> FrameWriter:
        return self.src.pre

    def serve_requests(self) -> None:
        """get_queued_page: requested host pages go ahead of the background scan."""
        src = self.src
        src.urgent.clear()  # before looking, so a request queued meanwhile sets it again
        while src.requests:
            hp = src.requests.popleft()
            if not src.host_dirty(hp):
                continue  # already sent: the page is on its way or placed
            self.send_urgent(hp)
            src.scan_hp = hp + 1  # the scan goes on after the requested page (locality)

    def send_urgent(self, hp: int) -> None:
        self.src.send_host_page(hp, self.urgent_channel(), urgent=True)

    def background(self) -> bool:
        """Send the next unit of the background scan; False when nothing is dirty."""
        src = self.src
        if src.k == 1:
            hps = src.next_dirty_hosts(src.frame_pages)
            if not hps.size:
                return False
            src.send_host_batch(hps, src.pre, urgent=False)
            src.scan_hp = int(hps[-1]) + 1
            return True
        hps = src.next_dirty_hosts(1)
        if not hps.size:
            return False
        hp = int(hps[0])
        src.scan_hp = hp + 1
        self.send_background_host_page(hp)
        return True

    def send_background_host_page(self, hp: int) -> None:
        self.src.send_host_page(hp, self.src.pre, urgent=False)

    def resume_prepare(self) -> None:
        """ram_resume_prepare, after a postcopy recovery reloaded the dirty bitmap: whatever this policy
        remembered about pages in flight is void (the requests still wanted will be sent again)."""

    def run_postcopy(self) -> None:
        """The migration thread in postcopy, as QEMU runs it (reference section 2.1).

        While the window's budget is spent, qemu_savevm_state_iterate() returns at once: a request
        that wakes the sleeping thread (migration_rate_limit) is *not* served, and QEMU spins until
        the window rolls over. shmig sleeps to the window's end instead of spinning; the outcome is
        the same. With budget left, ram_save_iterate runs: requests first, then the background,
        for as long as the budget lasts or requests keep coming, at most MAX_WAIT.
        """
        src = self.src
        limiter = src.limiter
        max_wait = src.clock.real(MAX_WAIT)
        while True:
            if src.return_error is not None:
                raise src.return_error
            if limiter.exceeded():
                limiter.sleep()  # until the window ends: the gate a request cannot pass
                continue
            t0 = time.monotonic()
            while not limiter.exceeded() or src.requests:  # ram_save_iterate
                self.serve_requests()
                if src.return_error is not None:
                    raise src.return_error
                if limiter.exceeded():
                    continue  # only requests may go on past the budget
                if not self.background() and not src.requests:
                    return
                if time.monotonic() - t0 > max_wait:
                    break


class Preempt(Policy):
    """QEMU 7.1 postcopy-preempt: the migration thread sends requested pages on the postcopy
    channel, breaking a huge page it is in the middle of (unless break_huge is off), and resumes it
    afterwards on the precopy channel. A request for the interrupted page itself is finished on the
    precopy channel, marked urgent so it is not interrupted again (no split brain)."""

    name = "preempt"
    preempt_channel = True

    def __init__(self, cfg: Config, src: Source):
        super().__init__(cfg, src)
        self.preempted: tuple[int, int] | None = None  # (host page, next target offset)

    def urgent_channel(self) -> FrameWriter:
        return self.src.post

    def serve_requests(self) -> None:
        src = self.src
        src.urgent.clear()
        while src.requests:
            hp = src.requests.popleft()
            if self.preempted is not None and self.preempted[0] == hp:
                _, off = self.preempted
                self.preempted = None
                src.stats["urgent_on_precopy"] += 1
                src.send_host_page(hp, src.pre, urgent=True, first=off)
                continue
            if not src.host_dirty(hp):
                continue
            self.send_urgent(hp)
            if self.preempted is None:
                src.scan_hp = hp + 1  # 7.1 keeps locality unless a huge page was preempted
        if self.preempted is not None:  # postcopy_preempt_restore: resume where it stopped
            hp, off = self.preempted
            self.preempted = None
            self.resume(hp, off)

    def background(self) -> bool:
        if self.preempted is not None:
            return True  # the interrupted host page is resumed before any other is started
        return super().background()

    def resume_prepare(self) -> None:
        self.preempted = None  # the interrupted huge page is dirty again as a whole: sent from its start

    def may_preempt(self) -> bool:
        """postcopy_needs_preempt: break-huge on, a huge host page, a request pending."""
        return self.cfg.break_huge and self.src.k > 1

    def resume(self, hp: int, off: int) -> None:
        stop = self.src.send_host_page(hp, self.src.pre, urgent=False, first=off,
                                       may_preempt=self.may_preempt())
        if stop is not None:
            self.preempted = (hp, stop)
            self.src.stats["preemptions"] += 1

    def send_background_host_page(self, hp: int) -> None:
        self.resume(hp, 0)


class PreemptFull(Policy):
    """QEMU 8.0+ "Preempt-Full": the return thread sends each requested host page itself on the
    postcopy channel under the bitmap lock; the migration thread only runs the background scan and
    takes the lock per frame. A host page the background is in the middle of is left to it.
    With ``page_hint`` (10.1) the background scan continues after the last urgent page."""

    name = "preempt-full"
    preempt_channel = True
    shared_rate_counter = True

    def __init__(self, cfg: Config, src: Source):
        super().__init__(cfg, src)
        self.bg_hp = -1  # the host page the background thread is in the middle of
        self.hint: int | None = None
        self.rp_buf = np.empty_like(src.buf)  # the return thread's own gather buffer

    @property
    def rate_wake(self) -> threading.Event | None:
        return None  # the return thread sends by itself; nothing to wake

    def resume_prepare(self) -> None:
        self.bg_hp, self.hint = -1, None

    def serve_requests(self) -> None:
        pass  # the return thread serves them (on_request)

    def on_request(self, hp: int) -> None:
        src = self.src
        with src.bitmap_lock:
            if hp == self.bg_hp or not src.host_dirty(hp):
                return
            tps = src.host_tps(hp)
            src.clear(tps)
            fp = src.frame_pages
            for i in range(0, len(tps), fp):
                src.account(src.post, src.send_pages(src.post, tps[i:i + fp], True, buf=self.rp_buf), True)
        if self.cfg.page_hint and self.hint is None:
            self.hint = hp + 1  # only if the previous hint was consumed

    def background(self) -> bool:
        src = self.src
        if self.hint is not None:
            src.scan_hp, self.hint = self.hint, None
        if src.k == 1:
            with src.bitmap_lock:
                hps = src.next_dirty_hosts(src.frame_pages)
                if not hps.size:
                    return False
                src.clear(hps)
            src.account(src.pre, src.send_pages(src.pre, hps, False), False)
            src.scan_hp = int(hps[-1]) + 1
            return True
        with src.bitmap_lock:
            hps = src.next_dirty_hosts(1)
            if not hps.size:
                return False
            self.bg_hp = int(hps[0])
        src.scan_hp = self.bg_hp + 1
        src.send_host_page(self.bg_hp, src.pre, urgent=False, lock=True)
        self.bg_hp = -1
        return True


POLICIES: dict[str, type[Policy]] = {"vanilla": Policy, "preempt": Preempt, "preempt-full": PreemptFull}


def register(mode: str, cls: type[Policy]) -> None:
    """Make a policy of your own available as ``Config(mode=...)``."""
    POLICIES[mode] = cls


def make_policy(cfg: Config, src: Source) -> Policy:
    return POLICIES.get(cfg.mode, Policy)(cfg, src)


# -- policies from outside the package (``--policy``, entry points) -------------------------------

BUILTIN_MODES = ("precopy", "vanilla", "preempt", "preempt-full")
ENTRY_POINT_GROUP = "shmig.policies"


def _import_class(target: str) -> type:
    """``pkg.mod:Class`` (imported like ``python -m`` would, the current directory first on the
    path, so a module next to you works with the installed ``shmig`` script too) or
    ``path/to/file.py:Class``."""
    module, sep, attr = target.rpartition(":")
    if not sep or not module or not attr:
        raise ConfigError(f"--policy {target!r}: use module:Class (e.g. examples.prefetch:PrefetchNeighbours)")
    try:
        if module.endswith(".py") or os.sep in module:
            path = os.path.abspath(module)
            if not os.path.isfile(path):
                raise ConfigError(f"--policy {target!r}: no such file {module!r}")
            name = "shmig_policy_" + os.path.splitext(os.path.basename(path))[0]
            mod = sys.modules.get(name)
            if getattr(mod, "__file__", None) != path:  # loaded once per process, like an import
                spec = importlib.util.spec_from_file_location(name, path)
                assert spec is not None and spec.loader is not None
                mod = importlib.util.module_from_spec(spec)
                sys.modules[name] = mod
                spec.loader.exec_module(mod)
        else:
            if "" not in sys.path and os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            mod = importlib.import_module(module)
    except ConfigError:
        raise
    except Exception as e:  # the user's module: any error in it is bad input
        raise ConfigError(f"--policy {target!r}: cannot import {module!r}: {type(e).__name__}: {e}") from None
    cls = getattr(mod, attr, None)
    if cls is None:
        raise ConfigError(f"--policy {target!r}: module {module!r} has no {attr!r}")
    return cls


def register_class(mode: str, cls: object, origin: str) -> str:
    """``register`` with the checks a name from the command line needs: a Policy subclass, and a
    mode name that does not shadow a built-in mode or another policy."""
    if not (isinstance(cls, type) and issubclass(cls, Policy)):
        raise ConfigError(f"{origin}: {cls!r} is not a subclass of shmig.policies.Policy")
    if not mode or mode in BUILTIN_MODES or POLICIES.get(mode, cls) is not cls:
        taken = "a built-in mode" if mode in BUILTIN_MODES else "already taken"
        raise ConfigError(f"{origin}: mode name {mode!r} is {taken}: set a `name` attribute on the class"
                          f" or give one with NAME=module:Class")
    register(mode, cls)
    return mode


def load_policy(spec: str) -> str:
    """Register the policy ``[NAME=]module:Class`` names (``--policy``) and return its mode name:
    NAME if given, else the class's own ``name`` attribute."""
    mode, eq, target = spec.partition("=")
    if not eq:
        mode, target = "", spec
    cls = _import_class(target)
    return register_class(mode or str(getattr(cls, "name", "")), cls, f"--policy {spec!r}")


def load_entry_points() -> tuple[list[str], list[str]]:
    """Register every policy that an installed package declares in the ``shmig.policies`` entry-point
    group (the entry point's name is the mode name). Returns (modes registered, one line per entry
    point that could not be loaded), so one broken plugin does not stop every other command."""
    names, problems = [], []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            names.append(register_class(ep.name, ep.load(), f"entry point {ep.name} = {ep.value}"))
        except ConfigError as e:
            problems.append(str(e))
        except Exception as e:
            problems.append(f"entry point {ep.name} = {ep.value}: {type(e).__name__}: {e}")
    return names, problems
