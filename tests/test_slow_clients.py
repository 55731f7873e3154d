"""Slow clients against both daemons on loopback, real sockets (issue 12.2; no root).

400 connections that never finish their TLS handshake (half send nothing, half a
partial ClientHello) must not be held: past the connection limit they are closed at
once, and the rest within the handshake timeout. A client that finishes mutual
TLS but never finishes its request headers is closed at the header timeout. A
legitimate client is served all the while.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from tests.agent_fakes import FakeTransfer
from tests.manager_fakes import FakeDevices
from tests.test_agent_server import _client, _config, ca  # noqa: F401 - the fixture
from tests.test_manager_server import _setup
from xfer.agent.client import AgentClient
from xfer.agent.server import AgentServer
from xfer.agent.service import AgentService
from xfer.manager.server import ManagerServer
from xfer.net import tls
from xfer.net.guard import ConnectionLimits

LIMITS = ConnectionLimits(max_connections=64, handshake_timeout_s=1.0, header_timeout_s=1.0)
STALLED = 400
# the first bytes of a TLS ClientHello record, never completed
PARTIAL_HELLO = bytes.fromhex("160301020001") + b"\x00" * 40


async def _stall(port: int, n: int) -> list[socket.socket]:
    """Open ``n`` connections that never finish a handshake (every other one sends a bit)."""
    socks = []
    loop = asyncio.get_running_loop()
    for i in range(n):
        s = socket.socket()
        s.setblocking(False)
        await loop.sock_connect(s, ("127.0.0.1", port))
        if i % 2:
            s.send(PARTIAL_HELLO)
        socks.append(s)
    return socks


def _closed_by_server(s: socket.socket) -> bool:
    try:
        return s.recv(4096, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


async def _wait_all_closed(socks: list[socket.socket], within: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < within:
        if all(_closed_by_server(s) for s in socks):
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    open_ = sum(1 for s in socks if not _closed_by_server(s))
    raise AssertionError(f"{open_} of {len(socks)} stalled connections still open after {within} s")


async def _slow_headers(port: int, ctx: ssl.SSLContext) -> tuple[asyncio.StreamReader, float]:
    """Finish mutual TLS, then send half a request and stop."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                   server_hostname="127.0.0.1")
    writer.write(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    await writer.drain()
    return reader, time.monotonic()


async def _check_daemon(port: int, stats: object, ctx: ssl.SSLContext,
                        served: Callable[[], Awaitable[None]]) -> None:
    socks = await _stall(port, STALLED)
    try:
        await asyncio.sleep(0.2)
        assert stats.open <= LIMITS.max_connections               # type: ignore[attr-defined]
        assert stats.refused >= STALLED - LIMITS.max_connections   # type: ignore[attr-defined]
        took = await _wait_all_closed(socks, 5.0)   # handshake timeout 1 s, not 60
        assert took < 3.0
        await served()                               # a real client gets in afterwards
    finally:
        for s in socks:
            s.close()
    reader, sent = await _slow_headers(port, ctx)
    assert await asyncio.wait_for(reader.read(), 5) == b""         # closed by the server
    assert 0.8 < time.monotonic() - sent < 3.0
    assert stats.header_timeouts >= 1                             # type: ignore[attr-defined]
    await served()
    for _ in range(50):                              # every place was given back
        if stats.open <= 1:                          # type: ignore[attr-defined]
            break
        await asyncio.sleep(0.05)
    assert stats.open <= 1                           # type: ignore[attr-defined]


def _guard(server: AgentServer | ManagerServer) -> object:
    site = next(iter(server._runners[0].sites))     # the API's site (one per runner)
    return site.stats  # type: ignore[attr-defined]


def test_agent_drops_stalled_and_slow_clients(tmp_path: Path, ca: Path) -> None:  # noqa: F811
    async def main() -> None:
        c = dataclasses.replace(_config(tmp_path, "dst"), connection_limits=LIMITS)
        client_ctx = tls.client_context(c.tls.ca, c.tls.cert, c.tls.key)
        async with AgentClient(client_ctx) as peers, \
                AgentServer(c, AgentService(c, transfer=FakeTransfer(), peers=peers)) as server:
            async def served() -> None:
                async with _client(ca) as op:
                    assert (await op.health(server.url))["device"] == "dst"

            await _check_daemon(server.port, _guard(server), client_ctx, served)

    asyncio.run(main())


def test_manager_drops_stalled_and_slow_clients(tmp_path: Path) -> None:
    cfg, ctx = _setup(tmp_path)
    cfg = dataclasses.replace(cfg, connection_limits=LIMITS)

    async def main() -> None:
        async with ManagerServer(cfg, FakeDevices()) as server:
            async def served() -> None:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", server.port, ssl=ctx, server_hostname="127.0.0.1")
                writer.write(b"GET /v1/migrations HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             b"Connection: close\r\n\r\n")
                assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 200")
                writer.close()

            await _check_daemon(server.port, _guard(server), ctx, served)

    asyncio.run(main())


def test_limits_are_configured_in_both_daemons_and_checked() -> None:
    import pytest

    from xfer.agent.config import parse as agent_parse
    from xfer.errors import UsageError
    from xfer.manager.config import parse as manager_parse

    assert ConnectionLimits() == ConnectionLimits(256, 5.0, 10.0)    # on by default
    agent = {"device": {"id": "fw", "type": "firewall", "kinds": ["conntrack"]},
             "tls": {"cert": "c", "key": "k", "ca": "a"},
             "limits": {"max_connections": 32, "header_timeout_s": 2.5}}
    assert agent_parse(agent).connection_limits == ConnectionLimits(32, 5.0, 2.5)
    manager = {"manager": {"topology": "t.yaml"}, "tls": {"cert": "c", "key": "k", "ca": "a"},
               "limits": {"handshake_timeout_s": 1}}
    assert manager_parse(manager).connection_limits == ConnectionLimits(256, 1, 10.0)
    for bad, says in (({"max_connections": 0}, "max_connections must be at least 1"),
                      ({"header_timeout_s": "10"}, "limits.header_timeout_s must be a number"),
                      ({"handshake_timeout_s": 0}, "handshake_timeout_s must be between")):
        with pytest.raises(UsageError, match=says):
            agent_parse({**agent, "limits": bad})
