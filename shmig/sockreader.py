"""The socket's receive side: a thread that drains a data channel's pipe into the read-ahead buffer.

Used where the pipe cannot hold the whole emulated socket buffer (pipe-max-size): the kernel fills a
real socket's receive buffer while the application is busy, and so does this thread.
"""

from __future__ import annotations

import os
import select
import threading
import time

from .fds import drain_eventfd, new_eventfd, shutdown_pipe
from .reader import FrameReader
from .wire import ProtocolError


class SocketReader(FrameReader):
    """A data channel's receive side when the pipe cannot hold the whole socket buffer: a thread
    drains the pipe into the read-ahead buffer while the consumer is busy, as the kernel fills a
    socket's receive buffer while the application is busy. So the sender's writes complete as fast
    as memory copies them, not at the pace the receiver happens to look at its pipe.

    A consumer that waits for bytes reads the pipe itself, as a thread blocked in recv() is woken
    by the kernel directly, and the thread is parked meanwhile: a frame that finds the consumer
    idle costs one wake-up on its way (an urgent page's path), not two. The thread is set going
    again as soon as the pipe holds bytes the consumer has not read (a stream, not one message),
    and whenever the consumer sleeps (the link's pacing).

    Bytes are only ever written past ``end``, by one reader at a time; the consumer moves the
    buffered bytes to the front (or grows the buffer) only at a frame boundary and never while the
    thread is reading.
    """

    def __init__(self, fd: int, name: str, readahead: int, max_frame: int):
        super().__init__(fd, name, readahead=readahead, max_frame=max_frame)
        lock = threading.Lock()
        self._cond = threading.Condition(lock)  # the consumer waits on it (and close)
        self._pump_cv = threading.Condition(lock)  # the thread is parked on it
        self._start_pump()

    def _start_pump(self) -> None:
        self._pump_on = True  # the thread may watch and read the pipe (the consumer does not)
        self._parked = False  # the thread waits on _pump_cv
        self._selecting = False  # the thread is waiting for the pipe to become readable
        self._reading = False  # the thread is inside readv
        self._pump_alive = True
        self._error: BaseException | None = None
        self._park = new_eventfd()  # moves the thread off the pipe
        threading.Thread(target=self._pump, name=f"{self.name} socket", daemon=True).start()

    def _room(self) -> int:
        """Under the lock: bytes that may be read now at ``end``."""
        return min(self.cap - self.end, max(self.readahead, self._need()) - self.buffered)

    def _pump(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self.eof and not (self._pump_on and self._room() > 0):
                        self._parked = True
                        self._pump_cv.wait()
                    self._parked = False
                    if self.eof:
                        return
                    self._selecting = True
                select.select([self.fd, self._park], [], [])  # readable: data, or the writer has gone
                with self._cond:
                    self._selecting = False
                    drain_eventfd(self._park)
                    if self.eof or not self._pump_on or (n := self._room()) <= 0:
                        continue
                    self._reading = True
                    at = self.end
                got = -1
                try:
                    got = os.readv(self.fd, [self.mv[at:at + n]])
                except BlockingIOError:
                    pass
                finally:
                    with self._cond:  # the bytes count where they were read, before anything moves
                        self._reading = False
                        self._got(got)
                        self._cond.notify_all()
                if got == 0:
                    return
        except BaseException as e:  # surfaced to the consumer as a closed channel
            with self._cond:
                self._error = e
                self.eof = True
        finally:
            with self._cond:
                self._pump_alive = False
                self._cond.notify_all()

    def _got(self, got: int) -> None:
        """Under the lock: the outcome of a readv at ``end`` (-1: nothing was there)."""
        if got > 0:
            self.end += got
            self.bytes_in += got
        elif got == 0:
            self.eof = True

    def _unpark(self) -> None:
        """Under the lock: the thread's reason to wait may have gone."""
        if self._parked:
            self._pump_cv.notify()

    def _resume_pump(self, only_if_unread: bool) -> None:
        """Set the thread going again (with ``only_if_unread``: if the pipe holds bytes)."""
        if self._pump_on or (only_if_unread and not self._readable.poll(0)):
            return
        with self._cond:
            self._pump_on = True
            self._unpark()

    def fill(self) -> int:
        """At a frame boundary: set the thread going if bytes came while the consumer was busy, and
        make room for it if the buffer's tail is short."""
        self._resume_pump(only_if_unread=True)
        need = self._need()
        if self.cap - self.end >= max(self.readahead, need) - self.buffered and need <= self.cap:
            return 0
        with self._cond:
            while self._reading:
                self._cond.wait()
            if self._make_room(need):
                self._unpark()
        return 0

    def _await(self, timeout: float | None) -> bool:
        if self._error is not None:
            raise ProtocolError(f"{self.name} channel: receiving failed ({self._error})")
        with self._cond:
            # the caller found the frame incomplete before taking the lock: the bytes it lacked may
            # have come in since, and if they were the stream's last, nothing else would wake us
            end = self.end

            def ready() -> bool:
                return self.end != end or self.eof or self._complete()
            if ready():
                return True
            n = self._room()
            if self._reading or n <= 0 or not self._pump_alive:  # the thread's read will say
                self._cond.wait_for(ready, timeout)
                return ready()  # EOF while waiting: the caller says ChannelClosed, not a timeout
            self._pump_on = False
            if self._selecting:
                os.eventfd_write(self._park, 1)
            at = self.end
        got, r = -1, []
        try:
            r, _, _ = select.select([self.fd], [], [], timeout)
            if r:
                got = os.readv(self.fd, [self.mv[at:at + n]])
        except BlockingIOError:
            pass  # readable, then empty: someone else read it; look again, it is not a timeout
        finally:
            with self._cond:
                self._got(got)
        if got > 0:
            self._resume_pump(only_if_unread=True)
        return bool(r)

    def wait(self, timeout: float | None) -> None:
        if timeout:
            self._resume_pump(only_if_unread=False)
            time.sleep(timeout)  # the thread reads meanwhile

    def _rewind(self) -> None:
        # never back to the front here: the frame just taken is still being placed from there,
        # and the thread would read new bytes over it; fill() moves bytes at the next boundary
        if self._pump_on:  # only the consumer changes it: no lock needed to look
            with self._cond:
                self._unpark()  # a frame was taken: room for the thread

    def close(self) -> None:
        """The thread reads EOF from now on and ends (room is made for it, in case it waits for
        some), and only then is the descriptor closed: it never reads one that was reused."""
        shutdown_pipe(self.fd, write_end=False)
        with self._cond:
            self.start = self.end = 0  # what it held is lost with the channel
            self._peeked = None
            self._pump_on = True
            self._unpark()
            if self._selecting:  # select() still watches the old pipe, whose writer may be alive
                os.eventfd_write(self._park, 1)
            if not self._cond.wait_for(lambda: not self._pump_alive, timeout=10):
                raise ProtocolError(f"{self.name} channel: its receiving thread did not stop")
        os.close(self.fd)
        os.close(self._park)

    def reopen(self, fd: int) -> None:
        super().reopen(fd)
        self._start_pump()
