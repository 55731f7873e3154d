"""The hypervisor side of the migration-message contract (issue 6): one HTTP POST.

Message: ``{"vm", "indication": "not-running"|"starting", "direction": "out"|"in",
"source", "destination"}`` plus optional ``"kinds"`` and ``"mode"``. The manager
answers once the state has moved: 2xx with a JSON report, anything else is an
error. The client is a few lines of asyncio so it can be cancelled exactly at the
deadline (a blocking urllib call in a thread cannot) and adds no dependency.

When the manager lands, ``send_migration_message`` is the one place to wire it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import SplitResult, urlsplit

from xfer.errors import MigrationMessageError, UsageError
from xfer.hypervisor import http1


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

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        if self.kinds is None:
            del body["kinds"]
        else:
            body["kinds"] = list(self.kinds)
        if self.mode is None:
            del body["mode"]
        return body


def messages_for(vm: str, source: str, destination: str, kinds: tuple[str, ...] | None = None,
                 mode: str | None = None) -> list[MigrationMessage]:
    """The messages to send inside the window, in order.

    "out" always; "in" as well in ``store`` mode, where the destination devices
    collect only on "in" and must have done so before the guest resumes (with a
    hook that owns the window nobody else can send "in" in time).

    >>> [m.direction for m in messages_for("vm1", "hv1", "hv2", mode="store")]
    ['out', 'in']
    """
    if mode not in (None, "relay", "pull", "push", "store"):
        raise UsageError(f"unknown mode {mode!r} (relay, pull, push, store)")
    out = [MigrationMessage(vm, "not-running", "out", source, destination, kinds, mode)]
    if mode == "store":
        out.append(MigrationMessage(vm, "starting", "in", source, destination, kinds, mode))
    return out


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


async def send_migration_message(url: str, message: MigrationMessage | dict[str, Any],
                                 deadline: float, ssl_context: ssl.SSLContext | None = None,
                                 ) -> dict[str, Any]:
    """POST ``message`` to the manager; return its JSON report once the state has moved.

    ``deadline`` is a ``time.monotonic()`` instant: past it the request is abandoned
    and ``MigrationMessageError`` raised, as for a refusal or a non-2xx answer.

        report = await send_migration_message("http://127.0.0.1:8700/migrations",
                                              msg, time.monotonic() + 0.5)
    """
    body = json.dumps(message.to_json() if isinstance(message, MigrationMessage) else message).encode()
    parts = check_url(url)
    if parts.scheme == "https" and ssl_context is None:
        ssl_context = ssl.create_default_context()
    port = parts.port or (443 if parts.scheme == "https" else 80)
    remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
    head = (f"POST {parts.path or '/'}{'?' + parts.query if parts.query else ''} HTTP/1.1\r\n"
            f"Host: {parts.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n"
            # Lets the manager budget its phases; the contract does not need it.
            f"X-Xfer-Deadline-Ms: {remaining_ms}\r\n\r\n").encode()
    loop_deadline = asyncio.get_running_loop().time() + (deadline - time.monotonic())
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout_at(loop_deadline):
            reader, writer = await asyncio.open_connection(
                parts.hostname, port, ssl=ssl_context if parts.scheme == "https" else None)
            writer.write(head + body)
            await writer.drain()
            status, payload = await _read_response(reader)
    except TimeoutError as exc:
        raise MigrationMessageError(f"manager {url} did not answer within the deadline") from exc
    except (OSError, ssl.SSLError, asyncio.IncompleteReadError) as exc:
        raise MigrationMessageError(f"manager {url}: {exc or 'connection closed'}") from exc
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
    return _parse_answer(url, status, payload)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    start, headers = await http1.read_head(reader)
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
