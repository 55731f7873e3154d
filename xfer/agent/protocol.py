"""What agent and client agree on: paths, how a VM travels, errors ↔ HTTP statuses.

Control requests and answers are JSON; bundles travel as raw bytes
(``application/octet-stream``). A VM is named by its addresses
(``"10.0.1.2,fd00:1::2,02:00:00:00:00:02"``): an agent has no inventory, and the
addresses are what its import checks against.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from typing import Any
from urllib.parse import urlsplit

from xfer.errors import (
    AgentError,
    AuthError,
    BundleError,
    ForeignEntryError,
    MigrationCancelled,
    StoreExpired,
    UsageError,
    XferError,
)
from xfer.model import Kind, VmIdentity, parse_kinds, parse_vm

API = "/v1"
# The migration that device work belongs to (the manager's token for it). The client sends
# it with every request made while it is set; an agent sets it while handling a request
# that carried it, so a push's or pull's own requests carry it on. An agent that has
# forgotten a migration's state refuses later imports of that migration: a rollback then
# reaches work still on its way (an import the manager gave up waiting for).
MIGRATION_HEADER = "Xfer-Migration"
MIGRATION: ContextVar[str] = ContextVar("xfer_migration", default="")

# Errors a client re-raises as themselves, so a refusal reads the same end to end.
_REBUILD: dict[str, type[XferError]] = {
    "AuthError": AuthError, "ForeignEntryError": ForeignEntryError, "BundleError": BundleError,
    "StoreExpired": StoreExpired, "MigrationCancelled": MigrationCancelled,
}


def error_from(status: int, body: Mapping[str, Any] | None, url: str) -> XferError:
    """The error a client raises for an agent's non-200 answer.

    >>> error_from(422, {"error": "entry 3 is not VM x's", "type": "ForeignEntryError"}, "https://a")
    ForeignEntryError("agent https://a: entry 3 is not VM x's")
    """
    body = body or {}
    message = f"agent {url}: {body.get('error') or f'HTTP {status}'}"
    remote = str(body.get("type", ""))
    cls = _REBUILD.get(remote)
    if cls is not None:
        return cls(message)
    return AgentError(message, status, remote)


def vm_spec(vm: VmIdentity) -> str:
    """A VM as it travels: its addresses, comma-separated."""
    return ",".join((*vm.addresses, *vm.macs))


def parse_request_vm(text: Any) -> VmIdentity:
    if not isinstance(text, str) or not text:
        raise UsageError("the request names no VM")
    # No inventory: the request carries the addresses the import is checked against.
    return parse_vm(text, {})


def kinds_text(kinds: Iterable[Kind]) -> str:
    return ",".join(k.value for k in kinds)


def parse_request_kinds(value: Any) -> tuple[Kind, ...]:
    if isinstance(value, str | list) and value:
        return parse_kinds(value)
    raise UsageError("the request names no kinds")


def check_agent_url(url: Any) -> str:
    """An agent URL is https://HOST:PORT (agents speak nothing but mutual TLS)."""
    if not isinstance(url, str):
        raise UsageError("agent URL missing")
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname or parts.path not in ("", "/"):
        raise UsageError(f"agent URL {url!r} must look like https://HOST:PORT")
    return url.rstrip("/")
