"""Request-servicing policies: the questions QEMU's versions answer differently, and nothing else.

The migration thread and the return thread (source.py, returnpath.py) do all the sending, the
rate limiting and the bookkeeping, as QEMU's ``ram_save_iterate`` / ``ram_find_and_save_block`` /
``ram_save_host_page`` and ``source_return_path_thread`` do for every version. A policy only
answers their questions (the ``Policy`` protocol below):

* ``urgent_sender``: which thread sends a requested page: the migration thread, after
  ``ram_save_queue_pages`` queued it (vanilla, 7.1), or the return thread at once (8.0+,
  ``ram_save_host_page_urgent``);
* ``pages_for(hp)``: what a request for host page ``hp`` asks to send (QEMU: that page);
* ``urgent_channel()``: on which channel requested pages go (the main one, or the preempt one);
* ``preempt(pss)``: whether the background host page ``pss`` may be broken for a pending request
  (7.1's break-huge, ``postcopy_needs_preempt``);
* ``counts_against_limit(channel, urgent)``: whether those bytes spend the rate limit's budget (7.1
  counts per QEMUFile, 8.0+ against one counter for every channel);
* ``scan_after(hp, preempted)``: where the background scan goes on after urgent page ``hp`` (the
  locality rule: vanilla goes on after it, 7.1 too unless it had broken a huge page, 8.0+ stays
  where it was, 10.1's page hint moves it after the page), or None to leave it;
* ``resume_prepare()``: what to forget when a postcopy recovery reloads the bitmap.

A policy sees only its ``Config`` and the ``PageSearchStatus`` it is asked about: never the source's
internals. To try your own idea, subclass one of the built-ins (or write a class with these
members) and give it a ``name``; ``register`` it, pass the class as ``Config(mode=YourPolicy)``,
or load it with ``--policy module:Class``. ``examples/prefetch.py`` is one.
"""

from __future__ import annotations

import enum
import importlib
import importlib.util
import os
import sys
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Sequence, runtime_checkable

from .errors import ConfigError
from .plan import Channel

if TYPE_CHECKING:
    from .config import Config
    from .ramstate import PageSearchStatus


class Sender(enum.Enum):
    """The thread that sends a requested page."""

    MIGRATION_THREAD = "migration"  # queued (ram_save_queue_pages), sent by the migration thread
    RETURN_THREAD = "return"  # sent by the return-path thread itself (QEMU 8.0+ Preempt-Full)


@runtime_checkable
class Policy(Protocol):
    """What a request-servicing policy answers (see the module docstring). Construct with the
    run's ``Config``; every method is called often and must be cheap."""

    name: ClassVar[str]  # the mode name it runs under
    preempt_channel: ClassVar[bool]  # the run has the postcopy (preempt) channel
    urgent_sender: ClassVar[Sender]

    def pages_for(self, hp: int) -> Sequence[int]: ...

    def urgent_channel(self) -> Channel: ...

    def preempt(self, pss: PageSearchStatus) -> bool: ...

    def counts_against_limit(self, channel: Channel, urgent: bool) -> bool: ...

    def scan_after(self, hp: int, preempted: bool) -> int | None: ...

    def resume_prepare(self) -> None: ...


class Vanilla:
    """Postcopy without preemption: a request is queued for the migration thread, which sends it
    on the one channel ahead of the background, whose scan then goes on after it."""

    name: ClassVar[str] = "vanilla"
    preempt_channel: ClassVar[bool] = False
    urgent_sender: ClassVar[Sender] = Sender.MIGRATION_THREAD
    # 7.1 and earlier count bytes per QEMUFile: urgent pages on the postcopy channel do not spend
    # the background's budget; 8.0+ counts every byte against one counter (migration_rate_account)
    shared_rate_counter: ClassVar[bool] = False

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def pages_for(self, hp: int) -> Sequence[int]:
        return (hp,)

    def urgent_channel(self) -> Channel:
        return Channel.PRECOPY

    def preempt(self, pss: PageSearchStatus) -> bool:
        return False

    def counts_against_limit(self, channel: Channel, urgent: bool) -> bool:
        return self.shared_rate_counter or channel is Channel.PRECOPY

    def scan_after(self, hp: int, preempted: bool) -> int | None:
        return hp + 1  # "the dirty page scanning restarts from the requested location"

    def resume_prepare(self) -> None:
        pass


class Preempt(Vanilla):
    """QEMU 7.1 postcopy-preempt: the migration thread sends requested pages on the postcopy
    channel, breaking the background huge page it is in the middle of (unless break-huge is off)
    and resuming it afterwards; the scan keeps its locality unless a huge page was broken."""

    name: ClassVar[str] = "preempt"
    preempt_channel: ClassVar[bool] = True

    def urgent_channel(self) -> Channel:
        return Channel.POSTCOPY

    def preempt(self, pss: PageSearchStatus) -> bool:
        """postcopy_needs_preempt: break-huge on, a huge host page, sent in the background."""
        return self.cfg.break_huge and self.cfg.tp_per_hp > 1 and not pss.urgent

    def scan_after(self, hp: int, preempted: bool) -> int | None:
        return None if preempted else hp + 1  # the enablement commit's "side effect"


class PreemptFull(Vanilla):
    """QEMU 8.0+ Preempt-Full: the return thread sends each requested host page itself on the
    postcopy channel; the background scan keeps its own position, unless 10.1's page hint moves
    it after the last urgent page."""

    name: ClassVar[str] = "preempt-full"
    preempt_channel: ClassVar[bool] = True
    urgent_sender: ClassVar[Sender] = Sender.RETURN_THREAD
    shared_rate_counter: ClassVar[bool] = True

    def urgent_channel(self) -> Channel:
        return Channel.POSTCOPY

    def scan_after(self, hp: int, preempted: bool) -> int | None:
        return hp + 1 if self.cfg.page_hint else None


POLICIES: dict[str, type] = {"vanilla": Vanilla, "preempt": Preempt, "preempt-full": PreemptFull}
BUILTIN_MODES = ("precopy", "vanilla", "preempt", "preempt-full")
ENTRY_POINT_GROUP = "shmig.policies"
_MEMBERS = ("name", "preempt_channel", "urgent_sender", "pages_for", "urgent_channel", "preempt",
            "counts_against_limit", "scan_after", "resume_prepare")


def missing_members(cls: Any) -> list[str]:
    """The members of the Policy protocol ``cls`` lacks (none for a policy)."""
    return [m for m in _MEMBERS if not hasattr(cls, m)]


def register(mode: str, cls: type) -> None:
    """Make a policy of your own available as ``Config(mode=...)``."""
    POLICIES[mode] = cls


def make_policy(cfg: Config) -> Policy:
    """The policy of ``cfg``'s mode (validated: the mode exists). Precopy never reaches postcopy;
    its rounds are the migration thread's alone, as vanilla's are."""
    cls = Vanilla if cfg.mode == "precopy" else POLICIES[cfg.mode]
    return cls(cfg)  # type: ignore[no-any-return]


# -- policies from outside the package (``--policy``, entry points) -------------------------------

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
            # the user's module may sit in the current directory; the entry is taken out right
            # after the import, so that later lazy imports (matplotlib, rich) never load files
            # planted in a shared working directory such as /tmp
            added = "" not in sys.path and os.getcwd() not in sys.path
            if added:
                sys.path.insert(0, os.getcwd())
            try:
                mod = importlib.import_module(module)
            finally:
                if added:
                    sys.path.remove(os.getcwd())
    except ConfigError:
        raise
    except Exception as e:  # the user's module: any error in it is bad input
        raise ConfigError(f"--policy {target!r}: cannot import {module!r}: {type(e).__name__}: {e}") from None
    cls = getattr(mod, attr, None)
    if cls is None:
        raise ConfigError(f"--policy {target!r}: module {module!r} has no {attr!r}")
    return cls


def register_class(mode: str, cls: object, origin: str) -> str:
    """``register`` with the checks a name from the command line needs: a class with every member of
    the Policy protocol, and a mode name that does not shadow a built-in mode or another policy."""
    missing = missing_members(cls) if isinstance(cls, type) else ["(it is not a class)"]
    if missing:
        raise ConfigError(f"{origin}: {cls!r} is not a shmig policy: it lacks {', '.join(missing)}"
                          f" (subclass one of shmig.policies' Vanilla, Preempt, PreemptFull)")
    assert isinstance(cls, type)
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
