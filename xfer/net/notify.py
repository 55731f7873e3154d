"""Sending migration messages (``xfer.net.message``) to the manager: one HTTP POST, or one
UDP datagram. The hypervisor hook and the CLI both speak to the manager through here.

The manager answers once the state has moved: 2xx with a JSON report, anything
else is an error. The HTTP client is a few lines of asyncio so it can be
cancelled exactly at the deadline (a blocking urllib call in a thread cannot) and
adds no dependency.

NOTE: not aiohttp's client, although the daemons serve with aiohttp. The hook
process must not load it: importing aiohttp took 724 ms against 316 ms for this
module with everything it needs (2.3x); one message on a fresh loopback
connection took 1.37 ms with aiohttp's ClientSession against 0.82 ms here
(1.7x), 0.42 ms on a connection opened before the window (load average 12 on
2 cores, medians of 200, same run).

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
from typing import Any
from urllib.parse import SplitResult, urlsplit

from xfer.errors import MigrationMessageError, UsageError
from xfer.net import http1
from xfer.net.address import is_multicast
from xfer.net.message import MigrationMessage, encode


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


def send_http(url: str, msg: MigrationMessage | dict[str, Any], ssl_context: ssl.SSLContext | None,
              timeout: float = 30.0) -> dict[str, Any]:
    """POST one message and return the manager's report (MigrationMessageError otherwise).

    >>> send_http(DEFAULT_MANAGER_URL, msg, ctx)["state"]     # doctest: +SKIP
    'committed'
    """
    return asyncio.run(send_migration_message(url, msg, time.monotonic() + timeout, ssl_context))


def send_udp(address: tuple[str, int], msg: MigrationMessage | dict[str, Any], timeout: float = 5.0,
             interface: str | None = None, wait: bool = True, copies: int = 1) -> dict[str, Any] | None:
    """Send one datagram (unicast or to a multicast group) and wait for the first answer.

    ``interface``: the local address multicast leaves from (and the source of the datagram).
    ``copies``: send it that many times back to back (a lossy network's remedy; the manager
    and the agents act on one of them when the message has an id).
    """
    data = encode(msg)
    sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if interface:
            sock.bind((interface, 0))
            if is_multicast(address[0]):
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(interface))
        for _ in range(max(1, copies)):
            sock.sendto(data, address)
        if not wait:
            return None
        sock.settimeout(timeout)
        try:
            reply, _ = sock.recvfrom(65535)
        except TimeoutError:
            raise MigrationMessageError(f"no answer from the manager at {address[0]}:{address[1]} "
                                        f"within {timeout} s") from None
    finally:
        sock.close()
    answer: dict[str, Any] = json.loads(reply)
    if not answer.get("ok"):
        raise MigrationMessageError(f"manager answered: {answer.get('error', 'failed')}")
    return answer
