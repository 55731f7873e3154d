"""The hypervisor side of the migration-message contract (issue 6): one HTTP POST.

Message: ``{"vm", "indication": "not-running"|"starting", "direction": "out"|"in",
"source", "destination"}`` plus optional ``"kinds"`` and ``"mode"``. The manager
answers once the state has moved: 2xx with a JSON report, anything else is an
error. The client is a few lines of asyncio so it can be cancelled exactly at the
deadline (a blocking urllib call in a thread cannot) and adds no dependency.

The real manager (``xfer manager serve``, issue 6) listens at ``DEFAULT_MANAGER_URL``
unless configured otherwise; it also accepts ``"indication": "abort"`` (sent by the
hook after it cancels a migration) and requires a client certificate (mutual TLS).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit

from xfer.errors import AuthError, MigrationMessageError, UsageError
from xfer.hypervisor import http1

# Where ``xfer manager serve`` listens by default (its [listen] section, API path).
DEFAULT_MANAGER_URL = "https://127.0.0.1:8700/v1/migrations"


@dataclass(frozen=True)
class MigrationMessage:
    """One migration message; ``to_json()`` is the body the manager receives.

    >>> MigrationMessage("vm1", "not-running", "out", "hv1", "hv2").to_json()["direction"]
    'out'
    """

    vm: str
    indication: str
    direction: str
    source: str
    destination: str
    kinds: tuple[str, ...] | None = None
    mode: str | None = None
    # Optional: copies of one message carry the same id, so the manager acts on it once
    # (a datagram may arrive twice, and a sender may resend when no answer came).
    id: str | None = None

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        if self.kinds is None:
            del body["kinds"]
        else:
            body["kinds"] = list(self.kinds)
        for key in ("mode", "id"):
            if body[key] is None:
                del body[key]
        return body


def messages_for(vm: str, source: str, destination: str, kinds: tuple[str, ...] | None = None,
                 mode: str | None = None) -> list[MigrationMessage]:
    """The messages to send inside the window, in order.

    "out" always; "in" as well in ``store`` mode, where the destination devices
    collect only on "in" and must have done so before the guest resumes (with a
    hook that owns the window nobody else can send "in" in time). A source that
    does not know the destination sends "out" only: the manager keeps the state
    in its store until the destination server sends "in" naming itself.

    >>> [m.direction for m in messages_for("vm1", "hv1", "hv2", mode="store")]
    ['out', 'in']
    """
    if mode not in (None, "relay", "pull", "push", "store"):
        raise UsageError(f"unknown mode {mode!r} (relay, pull, push, store)")
    out = [MigrationMessage(vm, "not-running", "out", source, destination, kinds, mode)]
    if mode == "store" and destination:
        out.append(MigrationMessage(vm, "starting", "in", source, destination, kinds, mode))
    return out


def client_tls(ca: Path | None, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext | None:
    """The client context for an https manager: trust ``ca`` (default: the system's),
    present ``cert``/``key`` for mutual TLS. None when nothing is given.

    >>> client_tls(None) is None
    True
    """
    if ca is None and cert is None:
        return None
    try:
        ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
        if cert is not None:
            ctx.load_cert_chain(str(cert), str(key or cert))
    except FileNotFoundError as exc:
        raise AuthError(f"TLS file not found: {exc.filename}") from None
    except (ssl.SSLError, OSError) as exc:
        raise AuthError(f"cannot load TLS material ({ca}, {cert}, {key}): {exc}") from None
    return ctx


def check_url(url: str) -> SplitResult:
    """The manager URL's parts; ``UsageError`` unless it is http(s)://host[:port][/path].

    >>> check_url("http://127.0.0.1:8700/migrations").port
    8700
    """
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        raise UsageError(f"bad manager URL {url!r}: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"manager URL must be http:// or https://host[:port]/path, not {url!r}")
    return parts


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class _Stale(Exception):
    """A connection opened before the window was closed by the manager while idle."""


class ManagerLink:
    """Connections to the manager opened before the window and used inside it.

    A TCP (and TLS) handshake inside the window is downtime; ``open()`` pays it
    while the hook waits. One request per connection (``Connection: close``). A
    connection the manager closed while idle (EOF seen before we write) is replaced
    by a fresh one; once the request is written nothing is retried, since the
    manager may have acted on it.

        async with ManagerLink(url) as link:
            await link.open(1)                    # before the window
            report = await link.send(msg, deadline)
    """

    def __init__(self, url: str, ssl_context: ssl.SSLContext | None = None) -> None:
        self.url = url
        self.parts = check_url(url)
        self.tls = ssl_context if self.parts.scheme == "https" else None
        if self.parts.scheme == "https" and self.tls is None:
            self.tls = ssl.create_default_context()
        self.port = self.parts.port or (443 if self.parts.scheme == "https" else 80)
        self._idle: list[Stream] = []
        self.open_error: str | None = None

    async def __aenter__(self) -> ManagerLink:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self, count: int, timeout: float = 5.0) -> None:
        """Open ``count`` connections now. A failure is kept in ``open_error``, not
        raised: the manager may be up by the time the window opens."""
        try:
            async with asyncio.timeout(timeout):
                for _ in range(count - len(self._idle)):
                    self._idle.append(await self._connect())
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            self.open_error = f"manager {self.url} not reachable before the window: {exc or 'timeout'}"

    async def close(self) -> None:
        while self._idle:
            await _close(self._idle.pop()[1])

    async def send(self, message: MigrationMessage | dict[str, Any], deadline: float) -> dict[str, Any]:
        """POST ``message``; return the manager's JSON report (see ``send_migration_message``)."""
        body = json.dumps(message.to_json() if isinstance(message, MigrationMessage) else message).encode()
        loop_deadline = asyncio.get_running_loop().time() + (deadline - time.monotonic())
        try:
            async with asyncio.timeout_at(loop_deadline):
                stream = self._idle.pop(0) if self._idle else None
                if stream is not None:
                    try:
                        status, payload = await self._exchange(stream, body, deadline)
                    except _Stale:
                        stream = None
                if stream is None:
                    status, payload = await self._exchange(await self._connect(), body, deadline)
        except TimeoutError as exc:
            raise MigrationMessageError(f"manager {self.url} did not answer within the deadline") from exc
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError) as exc:
            raise MigrationMessageError(f"manager {self.url}: {exc or 'connection closed'}") from exc
        return _parse_answer(self.url, status, payload)

    async def _connect(self) -> Stream:
        assert self.parts.hostname is not None
        reader, writer = await asyncio.open_connection(self.parts.hostname, self.port, ssl=self.tls)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # The request goes out in one write; do not let Nagle hold the answer's ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return reader, writer

    async def _exchange(self, stream: Stream, body: bytes, deadline: float) -> tuple[int, bytes]:
        reader, writer = stream
        try:
            if reader.at_eof():
                raise _Stale("closed by the manager while idle")
            remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
            p = self.parts
            head = (f"POST {p.path or '/'}{'?' + p.query if p.query else ''} HTTP/1.1\r\n"
                    f"Host: {p.netloc}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n"
                    # Lets the manager budget its phases; the contract does not need it.
                    f"X-Xfer-Deadline-Ms: {remaining_ms}\r\n\r\n").encode()
            writer.write(head + body)
            await writer.drain()
            return await _read_response(reader)
        finally:
            await _close(writer)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()


async def send_migration_message(url: str, message: MigrationMessage | dict[str, Any],
                                 deadline: float, ssl_context: ssl.SSLContext | None = None,
                                 ) -> dict[str, Any]:
    """POST ``message`` to the manager; return its JSON report once the state has moved.

    ``deadline`` is a ``time.monotonic()`` instant: past it the request is abandoned
    and ``MigrationMessageError`` raised, as for a refusal or a non-2xx answer.

        report = await send_migration_message("http://127.0.0.1:8700/migrations",
                                              msg, time.monotonic() + 0.5)
    """
    async with ManagerLink(url, ssl_context) as link:
        return await link.send(message, deadline)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    start, headers = await http1.read_head(reader)
    if not start:
        # Not retried: the manager may have read the request (and acted on it) before closing.
        raise MigrationMessageError("the manager closed the connection without an answer")
    if len(start) < 2 or not start[1].isdigit():
        raise MigrationMessageError(f"malformed HTTP status line {' '.join(start)!r}")
    try:
        return int(start[1]), await http1.read_body(reader, headers)
    except ValueError as exc:
        raise MigrationMessageError(f"bad answer: {exc}") from exc


def _parse_answer(url: str, status: int, payload: bytes) -> dict[str, Any]:
    try:
        answer = json.loads(payload) if payload.strip() else {}
    except ValueError:
        answer = {"body": payload[:200].decode("utf-8", "replace")}
    if not isinstance(answer, dict):
        answer = {"report": answer}
    if not 200 <= status < 300:
        reason = answer.get("error") or answer.get("body") or "no reason given"
        raise MigrationMessageError(f"manager {url} answered {status}: {reason}")
    return answer
