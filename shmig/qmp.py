"""A QMP server: the wire protocol of QEMU's monitor, so unchanged QMP scripts can drive shmig.

What a client sees is what QEMU sends (monitor/qmp.c, qapi/qmp-dispatch.c): the greeting
``{"QMP": {"version": ..., "capabilities": []}}``, ``qmp_capabilities`` before any other command
(monitor_qmp_dispatch answers CommandNotFound "Expecting capabilities negotiation with
'qmp_capabilities'"), every reply echoing ``id``, events with ``timestamp`` {seconds,
microseconds} sent only to clients past negotiation, and errors ``{"error": {"class", "desc"}}``
in QEMU's words: "JSON parse error, ..." (qobject/json-parser.c), "QMP input must be a JSON
object", "QMP input lacks member 'execute'" (qmp_dispatch_check_obj), "The command X has not been
found", "Parameter 'x' is missing/unexpected", "Invalid parameter type for 'x', expected: integer"
(qapi/qobject-input-visitor.c).

The server runs an asyncio loop on its own thread; every command runs on a worker thread (a
command that blocks, pmemsave of a large guest, never stalls another client). ``emit()`` is
thread-safe. A value longer than ``MAX_LINE`` is an error reply, as QEMU's json-streamer
answers a runaway token; nothing a client sends reaches a traceback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import threading
import time
from typing import Any, Callable

from .errors import ConfigError

MAX_LINE = 1 << 20  # a request never needs more (QEMU's streamer: MAX_TOKEN_SIZE, 64 MiB)
MAX_NESTING = 1024  # json-streamer.c MAX_NESTING
_TYPES = {bool: "boolean", int: "integer", str: "string", dict: "object", list: "array", float: "number"}


class JsonStreamer:
    """qobject/json-streamer.c: QMP is a stream of JSON values, not of lines (qemu.qmp sends no
    newline). A value ends when its braces and brackets balance; a bare token ends at whitespace.
    Too long or too deep a value is an error and the stream starts again, as QEMU does."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.depth = 0
        self.in_string = self.escape = False

    def feed(self, data: bytes) -> list[bytes | QmpError]:
        out: list[bytes | QmpError] = []
        for c in data:
            if self.in_string:
                self.buf.append(c)
                if self.escape:
                    self.escape = False
                elif c == 0x5C:  # backslash
                    self.escape = True
                elif c == 0x22:
                    self.in_string = False
            elif c in b" \t\r\n":
                if self.depth == 0 and self.buf:
                    out.append(self._take())
                elif self.buf:
                    self.buf.append(c)
            else:
                if c in b"{[" and self.depth == 0 and self.buf:
                    out.append(self._take())
                self.buf.append(c)
                if c == 0x22:
                    self.in_string = True
                elif c in b"{[":
                    self.depth += 1
                elif c in b"}]":
                    self.depth -= 1
                    if self.depth <= 0:
                        out.append(self._take())
            if len(self.buf) > MAX_LINE:
                self._take()
                out.append(QmpError("JSON token size limit exceeded"))
            elif self.depth > MAX_NESTING:
                self._take()
                out.append(QmpError("JSON nesting depth limit exceeded"))
        return out

    def _take(self) -> bytes:
        b = bytes(self.buf)
        self.buf.clear()
        self.depth = 0
        self.in_string = self.escape = False
        return b


class QmpError(Exception):
    """A command's failure, as QEMU reports it: ``{"error": {"class": cls, "desc": desc}}``."""

    def __init__(self, desc: str, cls: str = "GenericError"):
        super().__init__(desc)
        self.cls, self.desc = cls, desc


@dataclasses.dataclass(frozen=True)
class Arg:
    """One argument of a command, as its qapi schema declares it."""
    type: type
    required: bool = False


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    run: Callable[..., Any]  # keyword arguments with qapi's names, '-' spelled '_'; returns the reply
    args: dict[str, Arg] = dataclasses.field(default_factory=dict)


def check_args(cmd: Command, args: dict[str, Any]) -> dict[str, Any]:
    """qobject-input-visitor's checks: missing, unexpected, wrong type (bool is not an integer)."""
    for k in args:
        if k not in cmd.args:
            raise QmpError(f"Parameter '{k}' is unexpected")
    out = {}
    for k, a in cmd.args.items():
        if k not in args:
            if a.required:
                raise QmpError(f"Parameter '{k}' is missing")
            continue
        v = args[k]
        ok = isinstance(v, a.type) and not (a.type is int and isinstance(v, bool))
        if a.type is float:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        if not ok:
            raise QmpError(f"Invalid parameter type for '{k}', expected: {_TYPES[a.type]}")
        out[k.replace("-", "_")] = v
    return out


def parse_address(addr: str) -> tuple[str, str, int]:
    """``unix:PATH`` or ``tcp:HOST:PORT`` (loopback only): (kind, path or host, port)."""
    kind, _, rest = addr.partition(":")
    if kind == "unix" and rest:
        return "unix", rest, 0
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        if host not in ("127.0.0.1", "localhost", "::1") or not port.isdigit():
            raise ConfigError(f"QMP address {addr!r}: use tcp:127.0.0.1:PORT (loopback only)")
        return "tcp", host, int(port)
    raise ConfigError(f"QMP address {addr!r}: use unix:PATH or tcp:127.0.0.1:PORT")


class Monitor:
    """One QMP monitor (a VM's ``-qmp``): several clients, one command table."""

    def __init__(self, address: str, commands: list[Command], version: dict[str, Any]):
        self.kind, self.host, self.port = parse_address(address)
        self.version = version
        self.commands = {c.name: c for c in commands}
        self.commands["query-commands"] = Command("query-commands", lambda: [{"name": n} for n in self.commands])
        self.clients: set[asyncio.StreamWriter] = set()
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, name=f"qmp {address}", daemon=True)
        self.thread.start()
        if not self._started.wait(10):
            raise RuntimeError(f"QMP monitor {address}: the server did not start within 10 s")
        if self._error is not None:
            raise ConfigError(f"QMP address {address}: cannot listen ({self._error})")

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            if self.kind == "unix":
                self.server = self.loop.run_until_complete(
                    asyncio.start_unix_server(self._client, self.host, limit=MAX_LINE))
            else:
                self.server = self.loop.run_until_complete(
                    asyncio.start_server(self._client, self.host, self.port, limit=MAX_LINE))
                self.port = self.server.sockets[0].getsockname()[1]
        except OSError as e:
            self._error = e
            self._started.set()
            return
        self._started.set()
        self.loop.run_forever()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        negotiated = False
        try:
            self._send(writer, {"QMP": {"version": self.version, "capabilities": []}})
            stream = JsonStreamer()
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                for item in stream.feed(data):
                    if isinstance(item, QmpError):
                        reply = _error(item)
                    else:
                        reply, negotiated = await self._dispatch(item, negotiated)
                    if negotiated:
                        self.clients.add(writer)
                    self._send(writer, reply)
                await writer.drain()
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass  # the client went, or the monitor closes
        finally:
            self.clients.discard(writer)
            writer.close()

    async def _dispatch(self, line: bytes, negotiated: bool) -> tuple[dict[str, Any], bool]:
        try:
            req = json.loads(line)
        except (ValueError, RecursionError) as e:
            return _error(QmpError(f"JSON parse error, {str(e).split(':')[0].lower()}")), negotiated
        if not isinstance(req, dict):
            return _error(QmpError("QMP input must be a JSON object")), negotiated
        rid = req.get("id")
        try:
            name, args = _check_request(req)
            if not negotiated:
                if name != "qmp_capabilities":
                    raise QmpError("Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound")
                if args.get("enable"):
                    raise QmpError(f"Capability '{args['enable'][0]}' not available")
                return _reply({}, rid), True
            if name == "qmp_capabilities":
                raise QmpError("Capabilities negotiation is already complete, command ignored", "CommandNotFound")
            cmd = self.commands.get(name)
            if cmd is None:
                raise QmpError(f"The command {name} has not been found", "CommandNotFound")
            kw = check_args(cmd, args)
            ret = await self.loop.run_in_executor(None, lambda: cmd.run(**kw))
            return _reply({} if ret is None else ret, rid), negotiated
        except QmpError as e:
            return _error(e, rid), negotiated
        except Exception as e:  # noqa: BLE001 - a bug of ours is one error reply, never a dropped monitor
            return _error(QmpError(f"internal error: {type(e).__name__}: {e}"), rid), negotiated

    def _send(self, writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
        writer.write(json.dumps(obj).encode() + b"\r\n")

    def emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        """An asynchronous event to every negotiated client (thread-safe)."""
        t = time.time()
        msg: dict[str, Any] = {"event": event, "timestamp": {"seconds": int(t), "microseconds": int(t % 1 * 1e6)}}
        if data is not None:
            msg["data"] = data
        if not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(self._broadcast, msg)
            except RuntimeError:
                pass  # closing

    def _broadcast(self, msg: dict[str, Any]) -> None:
        for w in list(self.clients):
            if not w.is_closing():
                self._send(w, msg)

    def close(self) -> None:
        """Stop serving, drop every client, remove the unix socket file. Idempotent."""
        if self.loop.is_closed():
            return
        if self.loop.is_running():
            async def stop() -> None:
                if getattr(self, "server", None) is not None:
                    self.server.close()
                tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                self.loop.stop()
            asyncio.run_coroutine_threadsafe(stop(), self.loop)
            self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()
        if self.kind == "unix":
            try:
                os.unlink(self.host)
            except FileNotFoundError:
                pass


def _check_request(req: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """qmp_dispatch_check_obj."""
    for k in req:
        if k not in ("execute", "arguments", "id", "exec-oob"):
            raise QmpError(f"QMP input member '{k}' is unexpected")
    if "exec-oob" in req:
        raise QmpError("QMP input member 'exec-oob' is unexpected")  # no 'oob' capability advertised
    if "execute" not in req:
        raise QmpError("QMP input lacks member 'execute'")
    if not isinstance(req["execute"], str):
        raise QmpError("QMP input member 'execute' must be a string")
    args = req.get("arguments", {})
    if not isinstance(args, dict):
        raise QmpError("QMP input member 'arguments' must be an object")
    return req["execute"], args


def _reply(ret: Any, rid: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"return": ret}
    if rid is not None:
        out["id"] = rid
    return out


def _error(e: QmpError, rid: Any = None) -> dict[str, Any]:
    out: dict[str, Any] = {"error": {"class": e.cls, "desc": e.desc}}
    if rid is not None:
        out["id"] = rid
    return out
