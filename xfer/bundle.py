"""The bundle: one VM's exported state from one device.

Layout (all integers big-endian)::

    b"XFERBNDL"  magic                       8 bytes
    u16          format version (FORMAT_VERSION)
    u32          header length H
    H bytes      header, UTF-8 JSON (see Bundle.header)
    payloads     each section's bytes, in header order, lengths in the header
    [32 bytes]   HMAC-SHA256 of everything before it, when the header says "signed"

Each section carries its kind, encoding, entry count, byte length and SHA-256,
so corruption and truncation are caught before anything touches a device. The
payload encoding belongs to the kind (``conntrack`` carries ctnetlink attributes
as the kernel dumps them, for example). The bundle id makes imports idempotent
where a kind needs that (counters).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xfer.errors import AuthError, BundleError
from xfer.model import Kind, VmIdentity

MAGIC = b"XFERBNDL"
FORMAT_VERSION = 1
_PREAMBLE = struct.Struct(">8sHI")
SIGNATURE_LEN = 32
DEFAULT_MAX_SIZE = 256 * 1024 * 1024
MAX_HEADER = 1024 * 1024


@dataclass(frozen=True)
class Section:
    """One kind's state inside a bundle."""

    kind: Kind
    encoding: str
    count: int
    payload: bytes
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.payload).hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A VM's state from one device, ready to travel."""

    vm: VmIdentity
    source: Mapping[str, Any]
    sections: Mapping[Kind, Section]
    created: float = field(default_factory=time.time)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    signed: bool = False

    def age(self, now: float | None = None) -> float:
        """Seconds since export (never negative, whatever the clocks say)."""
        return max(0.0, (time.time() if now is None else now) - self.created)

    def header(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "id": self.id,
            "created": self.created,
            "vm": self.vm.to_dict(),
            "source": dict(self.source),
            "signed": self.signed,
            "sections": [
                {"kind": s.kind.value, "encoding": s.encoding, "count": s.count,
                 "length": len(s.payload), "sha256": s.sha256, "meta": dict(s.meta)}
                for s in self.sections.values()
            ],
        }


def encode(bundle: Bundle, key: bytes | None = None) -> bytes:
    """Serialize ``bundle``; sign it with HMAC-SHA256 when ``key`` is given.

    >>> data = encode(Bundle(VmIdentity("vm", ipv4=("10.0.0.2",)), {}, {}))
    >>> decode(data).vm.ipv4
    ('10.0.0.2',)
    """
    header = bundle.header()
    header["signed"] = key is not None
    raw_header = json.dumps(header, separators=(",", ":")).encode()
    parts = [_PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(raw_header)), raw_header]
    parts.extend(s.payload for s in bundle.sections.values())
    body = b"".join(parts)
    if key is not None:
        body += hmac.new(key, body, hashlib.sha256).digest()
    return body


def decode(data: bytes, key: bytes | None = None, max_size: int = DEFAULT_MAX_SIZE) -> Bundle:
    """Parse and verify a bundle. Raises BundleError (AuthError for signatures) on any defect.

    With ``key`` set, an unsigned bundle or a wrong signature is refused.
    """
    if len(data) > max_size:
        raise BundleError(f"bundle is {len(data)} bytes, over the limit of {max_size}")
    if len(data) < _PREAMBLE.size:
        raise BundleError("bundle is truncated (shorter than its preamble)")
    magic, version, hlen = _PREAMBLE.unpack_from(data)
    if magic != MAGIC:
        raise BundleError("not an xfer bundle (bad magic)")
    if version != FORMAT_VERSION:
        raise BundleError(f"bundle format version {version} is not supported "
                          f"(this xfer reads {FORMAT_VERSION})")
    if hlen > MAX_HEADER or _PREAMBLE.size + hlen > len(data):
        raise BundleError("bundle is truncated (header cut short)")
    start = _PREAMBLE.size + hlen
    try:
        header = json.loads(data[_PREAMBLE.size:start])
        vm = VmIdentity.from_dict(header["vm"])
        specs = header["sections"]
        signed = bool(header["signed"])
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"bundle header is corrupted: {exc}") from None
    if header.get("format") != FORMAT_VERSION:
        raise BundleError("bundle header version disagrees with its preamble")

    end = len(data)
    if signed:
        end -= SIGNATURE_LEN
        if end < start:
            raise BundleError("bundle is truncated (signature cut short)")
    if key is not None:
        if not signed:
            raise AuthError("bundle is not signed but a key is set: refusing it")
        expect = hmac.new(key, data[:end], hashlib.sha256).digest()
        if not hmac.compare_digest(expect, data[end:]):
            raise AuthError("bundle signature does not verify with this key")

    sections: dict[Kind, Section] = {}
    offset = start
    try:
        for spec in specs:
            kind = Kind(spec["kind"])
            length = int(spec["length"])
            if length < 0 or offset + length > end:
                raise BundleError(f"bundle is truncated ({kind} section cut short)")
            payload = data[offset:offset + length]
            offset += length
            if hashlib.sha256(payload).hexdigest() != spec["sha256"]:
                raise BundleError(f"bundle is corrupted ({kind} section checksum mismatch)")
            if kind in sections:
                raise BundleError(f"bundle has two {kind} sections")
            sections[kind] = Section(kind, str(spec["encoding"]), int(spec["count"]), payload,
                                     dict(spec.get("meta", {})))
    except (KeyError, ValueError, TypeError) as exc:
        if isinstance(exc, BundleError):
            raise
        raise BundleError(f"bundle header is corrupted: {exc}") from None
    if offset != end:
        raise BundleError(f"bundle has {end - offset} trailing bytes (corrupted or truncated)")
    return Bundle(vm=vm, source=dict(header.get("source", {})), sections=sections,
                  created=float(header["created"]), id=str(header["id"]), signed=signed)


def write(path: Path, bundle: Bundle, key: bytes | None = None) -> int:
    """Write atomically (temp file + rename), so a reader never sees half a bundle."""
    data = encode(bundle, key)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return len(data)


def read(path: Path, key: bytes | None = None, max_size: int = DEFAULT_MAX_SIZE) -> Bundle:
    try:
        size = path.stat().st_size
        if size > max_size:
            raise BundleError(f"bundle {path} is {size} bytes, over the limit of {max_size}")
        data = path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"bundle file {path} not found") from None
    except OSError as exc:
        raise BundleError(f"cannot read bundle {path}: {exc.strerror}") from None
    return decode(data, key, max_size)


def load_key(path: Path | None) -> bytes | None:
    """The signing key from ``path`` or ``$XFER_BUNDLE_KEY_FILE``; None when neither is set."""
    env = os.environ.get("XFER_BUNDLE_KEY_FILE")
    if path is None and env:
        path = Path(env)
    if path is None:
        return None
    try:
        key = path.read_bytes().strip()
    except OSError as exc:
        raise BundleError(f"cannot read key file {path}: {exc.strerror}") from None
    if len(key) < 16:
        raise BundleError(f"key file {path} holds fewer than 16 bytes")
    return key
