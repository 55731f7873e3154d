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
    ImportFailed,
    MigrationCancelled,
    NamespaceNotFound,
    StoreExpired,
    UsageError,
    XferError,
)
from xfer.model import Kind, VmIdentity, parse_kinds, parse_vm

API = "/v1"
BUNDLE_TYPE = "application/octet-stream"
# Bundle bodies travel compressed (our own header, so that aiohttp does not
# inflate them on its own, without our size limit).
COMPRESSION_HEADER = "Xfer-Compression"
ZSTD = "zstd"
# The migration that device work belongs to (the manager's token for it). The client sends
# it with every request made while it is set; an agent sets it while handling a request
# that carried it, so a push's or pull's own requests carry it on. An agent that has
# forgotten a migration's state refuses later imports of that migration: a rollback then
# reaches work still on its way (an import the manager gave up waiting for).
MIGRATION_HEADER = "Xfer-Migration"
MIGRATION: ContextVar[str] = ContextVar("xfer_migration", default="")

# Most precise first: ForeignEntryError is a BundleError.
_STATUS: tuple[tuple[type[XferError], int], ...] = (
    (AuthError, 403),
    (ForeignEntryError, 422),
    (BundleError, 422),
    (ImportFailed, 409),
    (MigrationCancelled, 409),
    (StoreExpired, 410),
    (UsageError, 400),
    (NamespaceNotFound, 503),
    (AgentError, 502),
)
# Errors a client re-raises as themselves, so a refusal reads the same end to end.
_REBUILD: dict[str, type[XferError]] = {
    "AuthError": AuthError, "ForeignEntryError": ForeignEntryError, "BundleError": BundleError,
    "StoreExpired": StoreExpired, "MigrationCancelled": MigrationCancelled,
}


def status_of(exc: XferError) -> int:
    """The HTTP status an agent answers an error with."""
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def error_body(exc: XferError) -> dict[str, Any]:
    remote = getattr(exc, "remote_type", "")
    return {"error": str(exc), "type": remote or type(exc).__name__}


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


def compress(data: bytes) -> tuple[bytes, dict[str, str]]:
    """Bundle bytes as they travel, and the header that says so.

    zstd level 1: a conntrack bundle shrinks about twentyfold in a few ms, which
    saves more than it costs even on loopback, and far more on a real link.

    >>> body, headers = compress(b"x" * 1000); len(body) < 100, headers
    (True, {'Xfer-Compression': 'zstd'})
    """
    import zstandard

    return zstandard.ZstdCompressor(level=1).compress(data), {COMPRESSION_HEADER: ZSTD}


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The bundle bytes of a body; BundleError (nothing touched) when over ``limit`` or malformed.

    The frame must declare its size, within ``limit``, before anything is inflated:
    a small body must not make the agent allocate gigabytes.
    """
    if not encoding:
        return body
    size = packed_size(body, encoding, limit)
    import zstandard

    try:
        inflater = zstandard.ZstdDecompressor().decompressobj()
        data = inflater.decompress(body)
    except zstandard.ZstdError as exc:
        raise BundleError(f"compressed bundle is corrupted: {exc}") from None
    if len(data) != size or not inflater.eof or inflater.unused_data:
        raise BundleError("compressed bundle is truncated or has trailing bytes")
    return data


def packed_size(body: bytes, encoding: str | None, limit: int) -> int:
    """The size a compressed bundle declares; BundleError unless it is zstd and within ``limit``.

    >>> packed_size(compress(b"x" * 1000)[0], ZSTD, 4096)
    1000
    """
    if encoding != ZSTD:
        raise BundleError(f"unknown bundle compression {encoding!r}")
    import zstandard

    try:
        size = zstandard.frame_content_size(body)
    except zstandard.ZstdError as exc:
        raise BundleError(f"compressed bundle is corrupted: {exc}") from None
    if size < 0:
        raise BundleError("compressed bundle does not declare its size; refused")
    if size > limit:
        raise BundleError(f"bundle is {size} bytes, over this device's limit of {limit}")
    return int(size)
