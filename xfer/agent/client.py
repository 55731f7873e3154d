"""The agent client: the CLI's verbs, an agent's push and pull, the manager's requests.

One ``aiohttp`` session per client, so repeated requests to an agent reuse their
TLS connection (a fresh handshake costs a few milliseconds of the pause window).

    async with AgentClient(tls.client_context(ca, cert, key)) as c:
        data = await c.export("https://10.0.4.1:7443", vm, [Kind.CONNTRACK])
        report = await c.import_("https://10.0.4.2:7443", data, vm, [Kind.CONNTRACK])
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import aiohttp

from xfer import netns as xnetns
from xfer.agent.protocol import (
    API,
    MIGRATION,
    MIGRATION_HEADER,
    check_agent_url,
    error_from,
    kinds_text,
    vm_spec,
)
from xfer.bundle import DEFAULT_MAX_SIZE
from xfer.errors import AgentError, AuthError, XferError
from xfer.model import Kind, VmIdentity
from xfer.net.api import BUNDLE_TYPE, COMPRESSION_HEADER, compress, decompress

DEFAULT_TIMEOUT = 120.0
T = TypeVar("T")


def _netns_socket_factory(namespace: str | None) -> Any:
    """Open outgoing sockets inside ``namespace`` (setns is per thread and brief)."""
    if not namespace:
        return None

    def factory(addr_info: Any) -> socket.socket:
        family, type_, proto, _, _ = addr_info
        with xnetns.entered(namespace):
            sock = socket.socket(family=family, type=type_, proto=proto)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    return factory


def _has_cert(ctx: ssl.SSLContext) -> bool:
    """Whether a client context presents a certificate (set by tls.client_context)."""
    return bool(getattr(ctx, "xfer_has_cert", True))


class AgentClient:
    """Requests to agents over mutual TLS; use as an async context manager.

    ``namespace`` opens the connections from that network namespace (an agent
    serving a namespace reaches its peers from there).
    """

    def __init__(self, ssl_context: ssl.SSLContext, timeout: float = DEFAULT_TIMEOUT,
                 namespace: str | None = None, max_bundle_bytes: int = DEFAULT_MAX_SIZE,
                 socket_factory: Any = None) -> None:
        self._ssl = ssl_context
        self._max_bundle = max_bundle_bytes
        self._has_cert = _has_cert(ssl_context)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._namespace = namespace
        # given (privilege separation: sockets from the helper), it replaces ``namespace``'s
        self._socket_factory = socket_factory or _netns_socket_factory(namespace)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AgentClient:
        await self.start()
        return self

    async def __aexit__(self, t: type[BaseException] | None, v: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def start(self) -> None:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self._ssl,
                                             socket_factory=self._socket_factory)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, method: str, url: str, path: str, *, json_body: Any = None,
                       data: bytes | None = None, params: dict[str, str] | None = None,
                       want_bytes: bool = False) -> Any:
        """One request to ``url`` + /v1 + ``path`` over mutual TLS: JSON in, JSON (or, with
        ``want_bytes``, an inflated bundle) out; bundle bodies (``data``) travel compressed.
        Agents and the manager speak this way; non-200 answers raise their error."""
        base = check_agent_url(url)
        await self.start()
        assert self._session is not None
        headers: dict[str, str] = {}
        if data is not None:
            data, headers = compress(data)
            headers["Content-Type"] = BUNDLE_TYPE
        if MIGRATION.get():
            headers[MIGRATION_HEADER] = MIGRATION.get()
        try:
            async with self._session.request(method, f"{base}{API}{path}", json=json_body, data=data,
                                             params=params, headers=headers) as resp:
                body = await resp.read()
                if resp.status != 200:
                    try:
                        detail = json.loads(body)
                    except ValueError:
                        detail = {"error": body.decode(errors="replace").strip()[:200]}
                    raise error_from(resp.status, detail, base)
                if want_bytes:
                    return decompress(body, resp.headers.get(COMPRESSION_HEADER), self._max_bundle)
                return json.loads(body)
        except XferError:
            raise
        except (aiohttp.ClientSSLError, ssl.SSLError) as exc:
            raise AuthError(f"agent {base}: TLS refused: {exc}") from None
        except aiohttp.ClientError as exc:
            # NOTE: with TLS 1.3 the server checks the client certificate after the
            # client considers the handshake done: a refused certificate shows up as
            # a hang-up or reset on the first read, indistinguishable from a crash.
            if not self._has_cert:
                raise AuthError(f"agent {base} hung up: this client presented no certificate, "
                                "and agents refuse clients without one") from None
            raise AgentError(f"agent {base} unreachable or hung up ({exc or type(exc).__name__}); "
                             "if it is up, it refused this client's certificate "
                             "(agents accept only certificates their CA signed)") from None
        except TimeoutError:
            raise AgentError(f"agent {base} did not answer within {self._timeout.total} s") from None

    async def health(self, url: str) -> dict[str, Any]:
        """The agent's device, type, kinds and operations."""
        result: dict[str, Any] = await self.request("GET", url, "/health")
        return result

    async def status(self, url: str) -> dict[str, Any]:
        """Capabilities plus per-kind counts and unfinished imports."""
        result: dict[str, Any] = await self.request("GET", url, "/status")
        return result

    async def export(self, url: str, vm: VmIdentity, kinds: Sequence[Kind]) -> bytes:
        """Bundle bytes of the VM's state of ``kinds`` on that agent's device."""
        result: bytes = await self.request("POST", url, "/export", want_bytes=True,
                                            json_body={"vm": vm_spec(vm), "kinds": kinds_text(kinds)})
        return result

    async def import_(self, url: str, data: bytes, vm: VmIdentity,
                      kinds: Sequence[Kind] | None = None) -> dict[str, Any]:
        """Import bundle bytes into that agent's device; returns the import report (JSON)."""
        params = {"vm": vm_spec(vm)}
        if kinds:
            params["kinds"] = kinds_text(kinds)
        result: dict[str, Any] = await self.request("POST", url, "/import", data=data, params=params)
        return result

    async def forget(self, url: str, vm: VmIdentity, kinds: Sequence[Kind]) -> dict[str, Any]:
        result: dict[str, Any] = await self.request(
            "POST", url, "/forget", json_body={"vm": vm_spec(vm), "kinds": kinds_text(kinds)})
        return result

    async def push(self, url: str, vm: VmIdentity, kinds: Sequence[Kind], destination: str) -> dict[str, Any]:
        """Ask the agent at ``url`` to send the VM's state straight to ``destination``."""
        result: dict[str, Any] = await self.request(
            "POST", url, "/push", json_body={"vm": vm_spec(vm), "kinds": kinds_text(kinds),
                                             "destination": destination})
        return result

    async def pull(self, url: str, vm: VmIdentity, kinds: Sequence[Kind], source: str) -> dict[str, Any]:
        """Ask the agent at ``url`` to fetch the VM's state straight from ``source``."""
        result: dict[str, Any] = await self.request(
            "POST", url, "/pull", json_body={"vm": vm_spec(vm), "kinds": kinds_text(kinds),
                                             "source": source})
        return result

    # --- pre-copy (see xfer.agent.precopy): the session is the migration's token ----------

    async def precopy_changes(self, url: str, vm: VmIdentity, cursor: str) -> bytes:
        """A bundle of what changed in the VM's conntrack entries since ``cursor`` ("" :
        all of them), from the source agent at ``url``."""
        result: bytes = await self.request("POST", url, "/precopy/changes", want_bytes=True,
                                            json_body={"vm": vm_spec(vm), "cursor": cursor})
        return result

    async def precopy_stage(self, url: str, data: bytes, vm: VmIdentity, *,
                            final: bool = False) -> dict[str, Any]:
        """Stage a pre-copy bundle at the destination agent; ``final`` commits it too."""
        result: dict[str, Any] = await self.request(
            "POST", url, "/precopy/stage", data=data,
            params={"vm": vm_spec(vm), "final": "1" if final else "0"})
        return result

    async def precopy_pull(self, url: str, vm: VmIdentity, source: str, *,
                           final: bool = False) -> dict[str, Any]:
        """Ask the destination agent at ``url`` to fetch the changes from ``source`` and stage them."""
        result: dict[str, Any] = await self.request(
            "POST", url, "/precopy/pull", json_body={"vm": vm_spec(vm), "source": source,
                                                     "final": final})
        return result

    async def precopy_push(self, url: str, vm: VmIdentity, destination: str, cursor: str, *,
                           final: bool = False) -> dict[str, Any]:
        """Ask the source agent at ``url`` to send the changes since ``cursor`` to ``destination``."""
        result: dict[str, Any] = await self.request(
            "POST", url, "/precopy/push", json_body={"vm": vm_spec(vm), "destination": destination,
                                                     "cursor": cursor, "final": final})
        return result

    async def precopy_abort(self, url: str, vm: VmIdentity) -> dict[str, Any]:
        """Remove what this migration staged at the destination agent."""
        result: dict[str, Any] = await self.request("POST", url, "/precopy/abort",
                                                    json_body={"vm": vm_spec(vm)})
        return result


def run_sync(ssl_context: ssl.SSLContext, op: Callable[[AgentClient], Awaitable[T]],
             timeout: float = DEFAULT_TIMEOUT) -> T:
    """Run one client operation to completion from synchronous code (the CLI).

    >>> run_sync(ctx, lambda c: c.health("https://10.0.4.1:7443"))   # doctest: +SKIP
    {'device': 'fw-src', ...}
    """

    async def main() -> T:
        async with AgentClient(ssl_context, timeout) as client:
            return await op(client)

    return asyncio.run(main())
