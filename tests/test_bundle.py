"""Bad bundles get one clear error and never reach a device."""

import struct
from pathlib import Path

import pytest

from tests.ct_factory import bundle_of, tcp_entry
from xfer import bundle
from xfer.errors import AuthError, BundleError
from xfer.model import parse_vm

VM = parse_vm("10.0.1.2", {})


def _data() -> bytes:
    return bundle.encode(bundle_of(VM, [tcp_entry("10.0.1.2", "10.0.9.1")]))


def test_roundtrip_keeps_everything() -> None:
    original = bundle_of(VM, [tcp_entry("10.0.1.2", "10.0.9.1"), tcp_entry("10.0.1.2", "10.0.9.3")])
    decoded = bundle.decode(bundle.encode(original))
    assert decoded.id == original.id and decoded.vm == original.vm
    assert decoded.created == original.created
    (section,) = decoded.sections.values()
    assert section.count == 2 and section.payload == next(iter(original.sections.values())).payload


def test_truncated() -> None:
    data = _data()
    for cut in (3, 20, len(data) - 1):
        with pytest.raises(BundleError, match=r"truncated|trailing"):
            bundle.decode(data[:cut])


def test_corrupted_section_fails_checksum() -> None:
    data = bytearray(_data())
    data[-5] ^= 0xFF
    with pytest.raises(BundleError, match="checksum"):
        bundle.decode(bytes(data))


def test_wrong_version() -> None:
    data = bytearray(_data())
    struct.pack_into(">H", data, 8, 99)
    with pytest.raises(BundleError, match="version 99"):
        bundle.decode(bytes(data))


def test_not_a_bundle() -> None:
    with pytest.raises(BundleError, match="magic"):
        bundle.decode(b"GIF89a" + bytes(40))


def test_oversized(tmp_path: Path) -> None:
    path = tmp_path / "big.xfer"
    path.write_bytes(_data())
    with pytest.raises(BundleError, match="over the limit"):
        bundle.read(path, max_size=100)


def test_signature() -> None:
    key = b"k" * 32
    signed = bundle.encode(bundle_of(VM, [tcp_entry("10.0.1.2", "10.0.9.1")]), key)
    assert bundle.decode(signed, key).signed
    with pytest.raises(AuthError, match="does not verify"):
        bundle.decode(signed, b"x" * 32)
    with pytest.raises(AuthError, match="not signed"):
        bundle.decode(_data(), key)
    tampered = bytearray(signed)
    tampered[-40] ^= 1
    with pytest.raises(AuthError, match="does not verify"):
        bundle.decode(bytes(tampered), key)


def test_age_is_never_negative() -> None:
    b = bundle_of(VM, [], created=2e9)
    assert b.age(now=1e9) == 0.0
    assert bundle_of(VM, [], created=100.0).age(now=103.5) == 3.5
