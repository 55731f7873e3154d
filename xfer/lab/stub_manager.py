"""A real HTTP server on 127.0.0.1 that stands in for the manager (issue 6) in tests and bench.

It speaks the migration-message contract: records every message with its arrival
time, runs an optional ``work`` inside the handler (tests query QEMU from there to
prove the guest is stopped while the message is handled; the lab test moves the
conntrack state there, as the real manager will), takes ``delay_s`` (the "transfer"),
then answers 2xx with a JSON report, or ``fail_status`` with an error.

    async with StubManager(delay_s=0.3) as mgr:
        await send_migration_message(mgr.url, msg, time.monotonic() + 1)
        assert mgr.received[0].message["vm"] == "vm1"
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from xfer.errors import XferError
from xfer.net import http1

Work = Callable[[dict[str, Any]], Awaitable[Any]]


def self_signed_tls(workdir: Path, mutual: bool = False) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts for an https stand-in on 127.0.0.1, made with openssl(1).

    Lab only: one throw-away self-signed certificate, ``workdir/manager.pem`` and
    ``manager.key``, not the agents' PKI. ``mutual``: the server requires a client
    certificate, the same one (the client context presents it).
    """
    cert, key = workdir / "manager.pem", workdir / "manager.key"
    try:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-nodes", "-days", "1", "-subj", "/CN=manager",
                        "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                       check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise XferError(f"cannot make a test certificate with openssl(1): {exc}") from exc
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    if mutual:
        server.verify_mode = ssl.CERT_REQUIRED
        server.load_verify_locations(cafile=str(cert))
        client.load_cert_chain(cert, key)
    return server, client


@dataclass
class Received:
    """One message as the stand-in saw it; times are ``time.time()`` (comparable with QMP's)."""

    message: dict[str, Any]
    headers: dict[str, str]
    arrived: float
    answered: float | None = None
    work: Any = None                   # what ``work`` returned
    handler_s: float | None = None


@dataclass
class StubManager:
    """Explicit ``start()``/``stop()`` (or ``async with``); ``url`` once started."""

    delay_s: float = 0.0
    fail_status: int | None = None
    work: Work | None = None
    ssl_context: ssl.SSLContext | None = None    # serve https (a server context)
    received: list[Received] = field(default_factory=list)
    url: str = ""

    def __post_init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._idle: set[asyncio.StreamWriter] = set()
        self.accepted = 0
        self.arrived = asyncio.Event()

    async def __aenter__(self) -> StubManager:
        await self.start()
        return self

    async def __aexit__(self, t: type[BaseException] | None, v: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_context)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{port}/migrations"
        return self.url

    async def stop(self) -> None:
        """Stop listening and cancel handlers still sleeping (a killed client's, say)."""
        if self._server is not None:
            self._server.close()
            for task in list(self._handlers):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    def close_idle(self) -> int:
        """Close connections that sent no request yet, as a server's idle timeout does."""
        for writer in self._idle:
            writer.close()
        closed, self._idle = len(self._idle), set()
        return closed

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.accepted += 1
        self._idle.add(writer)
        try:
            await self._handle(reader, writer)
        except (OSError, ValueError, asyncio.IncompleteReadError):
            pass  # a client that went away mid-request (the killed-hook test does that)
        finally:
            self._handlers.discard(task)
            self._idle.discard(writer)
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, headers = await http1.read_head(reader)
        self._idle.discard(writer)
        body = await http1.read_body(reader, headers, request=True)
        started = time.perf_counter()
        rec = Received(json.loads(body), headers, time.time())
        self.received.append(rec)
        if self.work is not None:
            try:
                rec.work = await self.work(rec.message)
            except Exception as exc:  # answer anyway; the test sees the work's failure
                rec.work = {"error": repr(exc)}
        # After the work: a test that acts on arrival must not race the work.
        self.arrived.set()
        await asyncio.sleep(self.delay_s)
        rec.handler_s = time.perf_counter() - started
        rec.answered = time.time()
        if self.fail_status is not None:
            answer = http1.response(self.fail_status, "Error", json.dumps(
                {"error": "stand-in manager told to fail"}).encode())
        else:
            answer = http1.response(200, "OK", json.dumps(
                {"ok": True, "vm": rec.message.get("vm"), "handler_ms": rec.handler_s * 1000}).encode())
        writer.write(answer)
        await writer.drain()
