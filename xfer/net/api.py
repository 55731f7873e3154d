"""What every xfer HTTPS endpoint (agent, manager) agrees on: errors as statuses and JSON
bodies, bundles as compressed octet streams.

    >>> status_of(StoreExpired("gone")), error_body(StoreExpired("gone"))
    (410, {'error': 'gone', 'type': 'StoreExpired'})
"""

from __future__ import annotations

from typing import Any

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

BUNDLE_TYPE = "application/octet-stream"
# Bundle bodies travel compressed (our own header, so that aiohttp does not
# inflate them on its own, without our size limit).
COMPRESSION_HEADER = "Xfer-Compression"
ZSTD = "zstd"

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


def status_of(exc: XferError) -> int:
    """The HTTP status an endpoint answers an error with."""
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def error_body(exc: XferError) -> dict[str, Any]:
    remote = getattr(exc, "remote_type", "")
    return {"error": str(exc), "type": remote or type(exc).__name__}


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
