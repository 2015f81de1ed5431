"""The control channel between the controller and each child: a few typed messages, checked on arrival.

The controller is the management side (what QMP and libvirt are to QEMU); children tell it what
happened (``EVENT``, with the monotonic time it happened) and it tells them what to do next. Every
message is small: what a child measures lives in shared memory (``ledger``), never in a message,
so no statistic can outgrow the frame cap and a child that dies leaves its figures behind.
"""

from __future__ import annotations

import enum
from typing import Any

from .wire import Frame, FrameWriter, Msg, ProtocolError

MAX_CTRL_FRAME = 1 << 16  # a control frame never needs more: a larger one is a corrupt channel


class Ctl(str, enum.Enum):
    """Control message names (the first field of a CTRL frame)."""

    # child -> controller
    ERROR = "error"  # str: what failed, one line; the child exits non-zero
    EVENT = "event"  # [name, t_ns, *info]: something happened (events.Ev names)
    READY = "ready"  # t_ns: a vCPU runs, or a receiver listens (-incoming is set up first)
    PAUSED = "paused"  # t_ns: a vCPU stopped for switchover
    RESUMED = "resumed"  # t_ns: a vCPU runs again, on the destination
    DONE = "done"  # None: every figure is in the ledger; the child exits 0 next
    # controller -> child
    START = "start"  # the guest runs: mig/src starts migrating
    VM_STOPPED = "vm_stopped"  # every vCPU has paused: switchover may go on
    START_POSTCOPY = "start_postcopy"  # QMP migrate-start-postcopy
    SHUT = "shut"  # mig/dst/listen: every page is placed, send SHUT on the return path
    RESUME = "resume"  # [channel names]: migrate resume=true, the new pipe ends come on the fd socket
    RECOVER = "recover"  # [channel names]: migrate-recover, likewise


class Ev(str, enum.Enum):
    """What a child says happened (an EVENT's name); the controller keeps each with its time."""

    SETUP_DONE = "setup_done"  # mig/src: PONG received, the channels are up
    STOP_VM = "stop_vm"  # mig/src asks for the guest to stop: downtime starts
    POSTCOPY_START = "postcopy_start"  # mig/src sent the package
    RUNNING = "running"  # mig/dst/listen loaded the package: the guest runs on the destination
    EOS = "eos"  # a receiver read the end of its channel
    COMPLETED = "completed"  # mig/src got SHUT on the return path and joined its thread: QEMU's `completed`
    POSTCOPY_PAUSED = "postcopy_paused"  # info: the reason
    RECV_BITMAP = "recv_bitmap"  # mig/src reloaded its bitmap from the destination's receivedmap
    PREEMPT_CHANNEL = "preempt_channel"  # mig/src opened the new preempt channel of a recovery
    POSTCOPY_RESUMED = "postcopy_resumed"  # mig/src got RESUME_ACK
    FAULT_INJECTED = "fault_injected"  # info: the fault, pages left, "postcopy" or "recovery"
    MULTIFD_FLUSH = "multifd_flush"  # mig/src: every multifd channel's SYNC written, FLUSH sent; info: the count
    MULTIFD_SYNCED = "multifd_synced"  # mig/dst/listen: every multifd channel read up to its SYNC; info: the count, when the wait began
    INCOMING = "incoming"  # mig/dst/listen read the first PING: the main channel is up (its ``active``)
    INCOMING_RESUMED = "incoming_resumed"  # mig/dst/listen got RESUME and sent RESUME_ACK (``postcopy-active``)


_INT, _LIST, _STR, _NONE = (int,), (list,), (str,), (type(None),)
OBJECTS: dict[Ctl, tuple[type, ...]] = {
    Ctl.ERROR: _STR, Ctl.EVENT: _LIST, Ctl.READY: _INT, Ctl.PAUSED: _INT, Ctl.RESUMED: _INT, Ctl.DONE: _NONE,
    Ctl.START: _NONE, Ctl.VM_STOPPED: _NONE, Ctl.START_POSTCOPY: _NONE, Ctl.SHUT: _NONE,
    Ctl.RESUME: _LIST, Ctl.RECOVER: _LIST,
}
_NAMES = {c.value: c for c in Ctl}
_EVENTS = {e.value for e in Ev}


def send(writer: FrameWriter, name: Ctl, obj: Any = None) -> None:
    writer.send(Msg.CTRL, (name.value, obj))


def parse(frame: Frame | None, channel: str) -> tuple[Ctl, Any]:
    """(name, object) of a control message, checked before anyone acts on it: a corrupt control
    channel is a protocol error naming it, never an exception in the controller's bookkeeping."""
    if frame is None or frame.kind != Msg.CTRL or len(frame.fields) < 2 or not isinstance(frame.fields[0], str):
        raise ProtocolError(f"{channel} channel: malformed message"
                            + ("" if frame is None else f" {Msg(frame.kind).name} {str(frame.fields)[:60]}"))
    name = _NAMES.get(frame.fields[0])
    if name is None:
        raise ProtocolError(f"{channel} channel: unknown message {frame.fields[0][:40]!r}")
    obj = frame.fields[1]
    ok = isinstance(obj, OBJECTS[name]) and not isinstance(obj, bool)
    if ok and name is Ctl.EVENT:
        ok = (len(obj) >= 2 and obj[0] in _EVENTS and isinstance(obj[1], int) and not isinstance(obj[1], bool))
    elif ok and name in (Ctl.RESUME, Ctl.RECOVER):
        ok = all(isinstance(n, str) for n in obj)
    if not ok:
        raise ProtocolError(f"{channel} channel: malformed {name.value!r} message ({str(obj)[:60]})")
    return name, obj
