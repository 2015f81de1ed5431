"""mig/src's return thread (QEMU's source_return_path_thread): page requests in, until SHUT.

Every REQ_PAGES message counts in ``postcopy_requests`` (duplicates included, as QEMU counts them)
and is handed on as the policy says: queued for the migration thread (ram_save_queue_pages,
vanilla and 7.1), or sent right here on the preempt channel (8.0+, ram_save_host_page_urgent),
after which 10.1's page hint may move the background scan.

QEMU's return path is the main channel's socket read the other way: a message that comes in wakes
a sender asleep on that socket waiting for write space (link.data_arrived).
"""

from __future__ import annotations

import select
import threading
import time
from typing import TYPE_CHECKING, Any

from .events import K
from .fds import new_eventfd
from .ledger import SourceStats
from .link import Link
from .policies import Policy, Sender
from .ramstate import RamState
from .reader import FrameReader
from .sender import PageSender
from .wire import ChannelClosed, Frame, Msg, ProtocolError, TruncatedFrame

if TYPE_CHECKING:
    from .recovery import Recovery
    from .source import MigrationThread


class ReturnPath:
    """The return thread and the reader it owns (the recovery reopens it on a new pipe)."""

    def __init__(self, reader: FrameReader, ram: RamState, sender: PageSender, policy: Policy,
                 stats: SourceStats, link: Link, thread: MigrationThread, recovery: Recovery, tr: Any = None):
        self.reader = reader
        self.ram = ram
        self.sender = sender
        self.policy = policy
        self.stats = stats
        self.link = link
        self.background = thread.background  # the page the background is in: 8.0+ leaves it alone
        self.recovery = recovery
        self.tr = tr
        self.nhost = ram.nhost
        self.sends_urgently = policy.urgent_sender is Sender.RETURN_THREAD
        self.wake_fd = new_eventfd()  # ends a wait on the return path (a pause)
        self.error: BaseException | None = None  # surfaced by the migration thread
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.error = None
        self._thread = threading.Thread(target=self.loop, name="return", daemon=True)
        self._thread.start()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def next_frame(self) -> Frame:
        """The next return-path frame; a pause ends the wait (QEMU shuts the file down under it)."""
        rp = self.reader
        while not rp.has_frame():
            if rp.eof:
                return rp.next_frame()  # type: ignore[return-value]  # raises: closed, or closed mid-frame
            self.recovery.check()
            select.select([rp.fd, self.wake_fd], [], [])
        return rp.next_frame(0)  # type: ignore[return-value]

    def fail(self, e: BaseException) -> None:
        """From the return thread: the migration thread raises it at its next look."""
        self.error = e
        self.ram.urgent.set()

    def loop(self) -> None:
        """source_return_path_thread: requests in, until the destination's SHUT."""
        try:
            rp = self.reader
            while True:
                f = self.next_frame()
                t_rx = time.monotonic_ns() if self.tr else 0
                if f.kind == Msg.SHUT:
                    return
                if f.kind != Msg.REQ or len(f.fields) < 1:
                    raise ProtocolError(f"return path: unexpected {Msg(f.kind).name}")
                hp = f.fields[0]
                if not isinstance(hp, int) or isinstance(hp, bool) or not 0 <= hp < self.nhost:
                    raise ProtocolError(f"return path: request for host page {hp!r} outside RAM")
                self.link.deliver(f.send_ns, rp.wait)
                self.stats.postcopy_requests += 1  # per message, duplicates included, as QEMU
                self.on_request(hp)
                self.link.data_arrived(0)  # it came in on the main channel's socket
                if self.tr:
                    self.tr.put(K.REQUEST, t_rx, time.monotonic_ns(), hp, f.send_ns)
        except (ChannelClosed, TruncatedFrame) as e:
            if not self.recovery.broken(str(e)):  # postcopy_pause_return_path_thread, if pausable
                self.fail(ProtocolError(f"return path closed before SHUT ({e})") if isinstance(e, ChannelClosed)
                          else e)
        except BaseException as e:  # a pause (recovery.check), or a failure: the migration thread sees it
            self.fail(e)

    def on_request(self, hp: int) -> None:
        """ram_save_queue_pages: the policy's pages for this request, queued or sent here."""
        channel = self.policy.urgent_channel()
        for p in self.policy.pages_for(hp):
            if not 0 <= p < self.nhost:
                continue
            if not self.sends_urgently:
                self.ram.queue(p)
            elif self.sender.save_host_page_urgent(p, channel, self.background):
                nxt = self.policy.scan_after(p, False)
                if nxt is not None and self.ram.hint is None:  # only once the last hint was used
                    self.ram.hint = nxt


