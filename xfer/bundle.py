"""The bundle: one VM's exported state from one device.

Layout (all integers big-endian)::

    b"XFERBNDL"  magic                       8 bytes
    u16          format version (FORMAT_VERSION)
    u32          header length H
    H bytes      header, UTF-8 JSON (see Bundle.header)
    32 bytes     SHA-256 of the magic, version, length and header
    payloads     each section's bytes, in header order, lengths in the header
    [32 bytes]   HMAC-SHA256 of everything before it, when the header says "signed"

Each section carries its kind, encoding, entry count, byte length and SHA-256,
and the header's own digest covers those, so corruption and truncation anywhere
are caught before anything touches a device, signed or not. The payload encoding
belongs to the kind (``conntrack`` carries ctnetlink attributes as the kernel
dumps them, for example). The bundle id makes imports idempotent where a kind
needs that (counters).

A bundle comes from another device or a file: every header field is checked for
its type and range (``_header``), the JSON must be standard (no NaN or Infinity),
and an import refuses a bundle whose export time is absurd (``check_fresh``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import struct
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xfer.errors import AuthError, BundleError, UsageError
from xfer.model import Kind, VmIdentity

MAGIC = b"XFERBNDL"
# 2: the header digest (format 1 left an unsigned bundle's header unchecked).
FORMAT_VERSION = 2
_PREAMBLE = struct.Struct(">8sHI")
DIGEST_LEN = 32
SIGNATURE_LEN = 32
DEFAULT_MAX_SIZE = 256 * 1024 * 1024
MAX_HEADER = 1024 * 1024
# An import refuses a bundle exported longer ago than this (a replayed or stale bundle
# would recreate connections long closed), or further in the future than clocks drift.
DEFAULT_MAX_AGE_S = 300.0
MAX_CLOCK_SKEW_S = 60.0
_EPOCH_FLOOR = 1_577_836_800.0  # 2020-01-01: no bundle was made before xfer existed
_ID_RE = re.compile(r"^[0-9A-Za-z_.:-]{1,128}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_MAX_META_BYTES = 64 * 1024


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
    raw_header = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    head = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(raw_header)) + raw_header
    parts = [head, hashlib.sha256(head).digest()]
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
    start = _PREAMBLE.size + hlen
    if hlen > MAX_HEADER or start + DIGEST_LEN > len(data):
        raise BundleError("bundle is truncated (header cut short)")
    if not hmac.compare_digest(hashlib.sha256(data[:start]).digest(), data[start:start + DIGEST_LEN]):
        raise BundleError("bundle header is corrupted (header digest mismatch)")
    header = _header(data[_PREAMBLE.size:start])
    vm, specs, signed = header["vm"], header["sections"], header["signed"]
    start += DIGEST_LEN

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
    for spec in specs:
        kind, length = spec["kind"], spec["length"]
        if offset + length > end:
            raise BundleError(f"bundle is truncated ({kind} section cut short)")
        payload = data[offset:offset + length]
        offset += length
        if hashlib.sha256(payload).hexdigest() != spec["sha256"]:
            raise BundleError(f"bundle is corrupted ({kind} section checksum mismatch)")
        sections[kind] = Section(kind, spec["encoding"], spec["count"], payload, spec["meta"])
    if offset != end:
        raise BundleError(f"bundle has {end - offset} trailing bytes (corrupted or truncated)")
    return Bundle(vm=vm, source=header["source"], sections=sections, created=header["created"],
                  id=header["id"], signed=signed)


def _no_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON value {name}")


def _header(raw: bytes) -> dict[str, Any]:
    """The header's fields, each checked for type and range (BundleError names the first
    that is wrong); ``vm`` becomes a VmIdentity and each section's ``kind`` a Kind."""
    try:
        header = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BundleError(f"bundle header is not valid JSON: {str(exc)[:120]}") from None

    def bad(what: str) -> BundleError:
        return BundleError(f"bundle header is corrupted: {what}")

    if not isinstance(header, dict):
        raise bad("not a JSON object")
    if header.get("format") != FORMAT_VERSION or isinstance(header.get("format"), bool):
        raise BundleError("bundle header version disagrees with its preamble")
    bid = header.get("id")
    if not isinstance(bid, str) or not _ID_RE.match(bid):
        raise bad("id must be 1 to 128 letters, digits or _.:-")
    created = header.get("created")
    if (not isinstance(created, int | float) or isinstance(created, bool)
            or not math.isfinite(created) or created < _EPOCH_FLOOR):
        raise bad(f"created must be a time after 2020 in seconds, not {str(created)[:40]}")
    if not isinstance(header.get("signed"), bool):
        raise bad("signed must be true or false")
    source = header.get("source", {})
    if not isinstance(source, dict) or len(source) > 16 or not all(
            isinstance(k, str) and (v is None or (isinstance(v, str | int) and len(str(v)) <= 256))
            for k, v in source.items()):
        raise bad("source must be an object of at most 16 short strings")
    vm = header.get("vm")
    if not isinstance(vm, dict):
        raise bad("vm must be an object")
    try:
        identity = VmIdentity.from_dict(vm)
    except UsageError as exc:
        raise bad(str(exc)) from None
    specs = header.get("sections")
    if not isinstance(specs, list) or len(specs) > len(Kind):
        raise bad(f"sections must be a list of at most {len(Kind)}")
    checked: list[dict[str, Any]] = []
    seen: set[Kind] = set()
    for spec in specs:
        if not isinstance(spec, dict):
            raise bad("a section must be an object")
        try:
            kind = Kind(str(spec.get("kind")))
        except ValueError:
            raise bad(f"unknown section kind {str(spec.get('kind'))[:40]!r}") from None
        if kind in seen:
            raise BundleError(f"bundle has two {kind} sections")
        seen.add(kind)
        count, length = spec.get("count"), spec.get("length")
        for name, value in (("count", count), ("length", length)):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
                raise bad(f"{kind} section {name} must be a whole number >= 0")
        encoding, digest, meta = spec.get("encoding"), spec.get("sha256"), spec.get("meta", {})
        if not isinstance(encoding, str) or not 0 < len(encoding) <= 64:
            raise bad(f"{kind} section encoding must be a short string")
        if not isinstance(digest, str) or not _SHA256_RE.match(digest):
            raise bad(f"{kind} section sha256 must be 64 lowercase hex digits")
        if not isinstance(meta, dict) or len(json.dumps(meta)) > _MAX_META_BYTES:
            raise bad(f"{kind} section meta must be an object of at most {_MAX_META_BYTES} bytes")
        checked.append({"kind": kind, "count": count, "length": length, "encoding": encoding,
                        "sha256": digest, "meta": meta})
    return {"id": bid, "created": float(created), "signed": header["signed"], "source": source,
            "vm": identity, "sections": checked}


def check_fresh(bundle: Bundle, max_age_s: float = DEFAULT_MAX_AGE_S, now: float | None = None) -> None:
    """Refuse (BundleError) a bundle exported more than ``max_age_s`` ago or in the future.

    An old bundle's entries would come back with timeouts of a second or none at
    all, and a replayed one would reopen connections closed since.
    """
    now = time.time() if now is None else now
    if bundle.created > now + MAX_CLOCK_SKEW_S:
        raise BundleError(f"bundle was exported {bundle.created - now:.0f} s in the future "
                          f"(clocks more than {MAX_CLOCK_SKEW_S:.0f} s apart?); nothing imported")
    if now - bundle.created > max_age_s:
        raise BundleError(f"bundle was exported {now - bundle.created:.0f} s ago, over the limit of "
                          f"{max_age_s:.0f} s (--max-age); nothing imported")


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
