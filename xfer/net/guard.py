"""Slow and idle clients: a TLS handshake timeout, a header timeout and a connection limit.

Shared by the agent and the manager. aiohttp's server has neither a header timeout
nor a connection limit, and asyncio gives a TLS handshake 60 s: 400 connections
that never finish their handshake or their first request's headers were each held
for a minute (~110 KB each). ``GuardedSite`` replaces aiohttp's ``SockSite``:

- every accepted TCP connection is counted from ``accept`` to ``close`` (the
  handshake included); above ``max_connections`` a new one is closed at once;
- the TLS handshake must finish within ``handshake_timeout_s`` (asyncio's own
  timeout, which aiohttp's sites leave at its default);
- the first request's headers must arrive within ``header_timeout_s`` of the
  handshake; later requests on a kept-alive connection are bounded by aiohttp's
  keep-alive timeout, and only a peer that passed mutual TLS gets that far;
- asyncio's per-connection TLS read buffer shrinks from 256 to 64 KiB (below).

Measured with an agent and 400 stalled connections on loopback (load ~9 on 2
cores): aiohttp's site held all 400 for 60 s at 312 KB each (+122 MB RSS); guarded
(defaults) it holds at most 256, for at most 5 s, at 116 KB each (+29 MB), and
refuses the rest at accept.

    runner = web.AppRunner(app)
    await runner.setup()
    site = GuardedSite(runner, sock, ssl_context=ctx, limits=ConnectionLimits())
    await site.start()
    site.stats.open, site.stats.refused
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from xfer.errors import UsageError

_HEADER_END = b"\r\n\r\n"
# NOTE: asyncio's SSLProtocol allocates (and zeroes) a read buffer of max_size per
# connection as it accepts, before the handshake: 256 KiB of a stalled client's 312 KB.
# 64 KiB brought it to 116 KB; an 8 MiB POST over TLS on loopback took the same time
# (median 110-146 ms against 136-137 ms at 256 KiB, within the noise of a loaded host).
# It is a class attribute, so it is set for the daemon's process (clients included).
TLS_READ_BUFFER = 64 * 1024
_MAX_HEADER_SCAN = 64 * 1024    # more than aiohttp's header limits: it refuses first


@dataclass(frozen=True)
class ConnectionLimits:
    """What a daemon allows a client before it has sent a request.

    >>> ConnectionLimits(max_connections=64).handshake_timeout_s
    5.0
    """

    max_connections: int = 256
    handshake_timeout_s: float = 5.0
    header_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise UsageError(f"max_connections must be at least 1, not {self.max_connections}")
        for name in ("handshake_timeout_s", "header_timeout_s"):
            if not 0 < getattr(self, name) <= 3600:
                raise UsageError(f"{name} must be between 0 and 3600 seconds")


def limits_from(table: Any, where: str) -> ConnectionLimits:
    """Read ``max_connections``, ``handshake_timeout_s``, ``header_timeout_s`` from a config table.

    >>> limits_from({"max_connections": 32}, "agent config: limits").max_connections
    32
    """
    default = ConnectionLimits()
    values: dict[str, Any] = {}
    for name, kind in (("max_connections", int), ("handshake_timeout_s", (int, float)),
                       ("header_timeout_s", (int, float))):
        value = table.get(name, getattr(default, name))
        if isinstance(value, bool) or not isinstance(value, kind):
            raise UsageError(f"{where}.{name} must be a number")
        values[name] = value
    try:
        return ConnectionLimits(**values)
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None


@dataclass
class ConnectionStats:
    open: int = 0               # TCP connections accepted and not yet closed
    refused: int = 0            # closed at accept: the limit was reached
    header_timeouts: int = 0    # closed: no complete request headers in time


class _Connection(socket.socket):
    """An accepted socket that gives its place back when closed (once)."""

    stats: ConnectionStats | None = None

    def _real_close(self, *args: Any, **kwargs: Any) -> None:
        stats, self.stats = self.stats, None
        if stats is not None:
            stats.open -= 1
        super()._real_close(*args, **kwargs)  # type: ignore[misc]


class _Listener(socket.socket):
    """The listening socket: counts what it accepts, closes what is over the limit.

    asyncio's selector loop calls ``accept()`` on the socket it was given; that is
    the only place every connection passes before its TLS handshake starts.
    """

    stats: ConnectionStats
    limit: int

    def accept(self) -> tuple[socket.socket, Any]:
        fd, addr = self._accept()  # type: ignore[attr-defined]
        conn = _Connection(self.family, self.type, self.proto, fileno=fd)
        if self.stats.open >= self.limit:
            self.stats.refused += 1
            conn.close()
            # asyncio's accept loop takes this as "nothing more to accept now"
            raise ConnectionAbortedError("connection limit reached")
        self.stats.open += 1
        conn.stats = self.stats
        return conn, addr


def _listener(sock: socket.socket, limit: int, stats: ConnectionStats) -> _Listener:
    out = _Listener(sock.family, sock.type, sock.proto, fileno=sock.detach())
    out.setblocking(False)
    out.stats, out.limit = stats, limit
    return out


class _HeaderDeadline(asyncio.Protocol):
    """Wraps aiohttp's request handler: closes the connection when the first request's
    headers are not complete ``timeout`` seconds after the connection (or its TLS) is up."""

    def __init__(self, inner: Any, timeout: float, stats: ConnectionStats) -> None:
        self.inner, self.timeout, self.stats = inner, timeout, stats
        self.timer: asyncio.TimerHandle | None = None
        self.seen = b""
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.timer = asyncio.get_running_loop().call_later(self.timeout, self._expired)
        self.inner.connection_made(transport)

    def _expired(self) -> None:
        self.timer = None
        self.stats.header_timeouts += 1
        if self.transport is not None:
            self.transport.abort()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.timer is not None:
            # keep the last 3 bytes: the blank line may be split across reads
            self.seen = (self.seen[-3:] + data)[-_MAX_HEADER_SCAN:]
            if _HEADER_END in self.seen:
                self.timer.cancel()
                self.timer, self.seen = None, b""
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class GuardedSite(web.SockSite):
    """aiohttp's ``SockSite`` with ``ConnectionLimits`` (see the module docstring)."""

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, *,
                 ssl_context: Any = None, limits: ConnectionLimits | None = None) -> None:
        self.limits = limits or ConnectionLimits()
        self.stats = ConnectionStats()
        super().__init__(runner, _listener(sock, self.limits.max_connections, self.stats),
                         ssl_context=ssl_context, backlog=max(128, self.limits.max_connections))

    async def start(self) -> None:
        asyncio.sslproto.SSLProtocol.max_size = TLS_READ_BUFFER
        await web.BaseSite.start(self)  # registers the site; SockSite.start would listen too
        server = self._runner.server
        assert server is not None
        factory: Callable[[], asyncio.Protocol] = lambda: _HeaderDeadline(  # noqa: E731
            server(), self.limits.header_timeout_s, self.stats)
        kwargs: dict[str, Any] = {}
        if self._ssl_context is not None:
            kwargs["ssl_handshake_timeout"] = self.limits.handshake_timeout_s
        self._server = await asyncio.get_running_loop().create_server(
            factory, sock=self._sock, ssl=self._ssl_context, backlog=self._backlog, **kwargs)
