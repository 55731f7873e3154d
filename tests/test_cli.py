"""The CLI's contract for bad input: one line on stderr, exit 1 (failure) or 2 (usage)."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ct_factory import bundle_of, tcp_entry
from xfer import bundle
from xfer.model import parse_vm

VM = parse_vm("10.0.1.2", {})


def xfer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xfer.cli", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def _write(tmp_path: Path, data: bytes) -> str:
    path = tmp_path / "b.xfer"
    path.write_bytes(data)
    return str(path)


def _good() -> bytes:
    return bundle.encode(bundle_of(VM, [tcp_entry("10.0.1.2", "10.0.9.1")]))


def _wrong_version() -> bytes:
    data = bytearray(_good())
    struct.pack_into(">H", data, 8, 7)
    return bytes(data)


def _corrupted() -> bytes:
    data = bytearray(_good())
    data[-3] ^= 0x55
    return bytes(data)


@pytest.mark.parametrize(("make", "reason"), [
    (lambda: _good()[:-10], "truncated"),
    (_corrupted, "checksum mismatch"),
    (_wrong_version, "version 7 is not supported"),
    (lambda: bundle.encode(bundle_of(VM, [tcp_entry("10.0.1.77", "10.0.9.1")])), "does not belong"),
])
def test_bad_bundles_fail_with_one_line(tmp_path: Path, make, reason: str) -> None:  # type: ignore[no-untyped-def]
    out = xfer("import", _write(tmp_path, make()), "--netns", "xfer-test-never-created")
    assert out.returncode == 1
    assert reason in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_oversized_bundle(tmp_path: Path) -> None:
    out = xfer("import", _write(tmp_path, _good()), "--max-size", "64")
    assert out.returncode == 1 and "over the limit" in out.stderr


def test_missing_namespace_is_named(tmp_path: Path) -> None:
    out = xfer("import", _write(tmp_path, _good()), "--netns", "xfer-test-never-created")
    assert out.returncode == 1
    assert "network namespace 'xfer-test-never-created' not found" in out.stderr


def test_vm_that_is_not_an_address(tmp_path: Path) -> None:
    out = xfer("export", "--vm", "not-a-vm", "--out", str(tmp_path / "x"))
    assert out.returncode == 2
    assert "neither a list of IPv4/IPv6/MAC addresses nor a VM of the inventory" in out.stderr


def test_bundle_for_another_vm_than_requested(tmp_path: Path) -> None:
    out = xfer("import", _write(tmp_path, _good()), "--vm", "10.0.1.3",
               "--netns", "xfer-test-never-created")
    assert out.returncode == 2 and "not of the VM requested" in out.stderr


def test_bundle_show_json(tmp_path: Path) -> None:
    import json

    out = xfer("bundle", "show", _write(tmp_path, _good()), "--json")
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["vm"]["ipv4"] == ["10.0.1.2"]
    assert shown["sections"][0]["count"] == 1
    assert shown["conntrack"][0]["orig"]["src"] == "10.0.1.2"
