"""What agent and client agree on: compression limits, URLs, errors <-> statuses."""

from __future__ import annotations

import pytest
import zstandard

from xfer.agent.protocol import check_agent_url, error_from, parse_request_kinds, parse_request_vm, vm_spec
from xfer.errors import (
    AgentError,
    AuthError,
    BundleError,
    ForeignEntryError,
    ImportFailed,
    UsageError,
    XferError,
)
from xfer.model import Kind, parse_vm
from xfer.net.api import compress, decompress, status_of


def test_compress_round_trip_and_plain_bodies() -> None:
    data = b"conntrack entry " * 10000
    body, headers = compress(data)
    assert len(body) < len(data) // 10
    assert decompress(body, headers["Xfer-Compression"], len(data)) == data
    assert decompress(b"plain", None, 10) == b"plain"


def _streamed(data: bytes) -> bytes:
    """A zstd frame that does not declare its size."""
    obj = zstandard.ZstdCompressor().compressobj()
    return obj.compress(data) + obj.flush()


@pytest.mark.parametrize(("body", "encoding", "message"), [
    (compress(b"\0" * 100_000)[0], "zstd", "over this device's limit"),  # a bomb, refused unread
    (_streamed(b"x" * 100), "zstd", "does not declare its size"),
    (compress(b"x" * 100)[0][:-3], "zstd", "truncated"),
    (compress(b"x" * 100)[0] + b"junk", "zstd", "trailing"),
    (b"not zstd at all", "zstd", "corrupted"),
    (b"x", "gzip", "unknown bundle compression"),
])
def test_bad_compressed_bodies_are_refused(body: bytes, encoding: str, message: str) -> None:
    with pytest.raises(BundleError, match=message):
        decompress(body, encoding, 10_000)


@pytest.mark.parametrize(("exc", "status"), [
    (AuthError("x"), 403), (ForeignEntryError("x"), 422), (BundleError("x"), 422),
    (ImportFailed("x"), 409), (UsageError("x"), 400), (AgentError("x"), 502), (XferError("x"), 500),
])
def test_statuses(exc: XferError, status: int) -> None:
    assert status_of(exc) == status


def test_errors_come_back_as_the_same_kind() -> None:
    err = error_from(422, {"error": "entry 3 is not the VM's", "type": "ForeignEntryError"}, "https://a:1")
    assert isinstance(err, ForeignEntryError) and str(err) == "agent https://a:1: entry 3 is not the VM's"
    other = error_from(400, {"error": "does not hold dhcp", "type": "UsageError"}, "https://a:1")
    assert isinstance(other, AgentError) and not isinstance(other, UsageError)
    assert (other.status, other.remote_type) == (400, "UsageError")
    assert "HTTP 502" in str(error_from(502, None, "https://a:1"))


def test_urls_vms_and_kinds() -> None:
    assert check_agent_url("https://10.0.4.1:7443/") == "https://10.0.4.1:7443"
    assert check_agent_url("https://[fd00:4::1]:7443") == "https://[fd00:4::1]:7443"
    for bad in ("http://10.0.4.1:7443", "https://10.0.4.1:7443/v1/push", None, 5):
        with pytest.raises(UsageError):
            check_agent_url(bad)
    vm = parse_vm("10.0.1.2,fd00:1::2,02:00:00:00:00:02", {})
    assert parse_request_vm(vm_spec(vm)).same_vm(vm)
    assert parse_request_kinds("dhcp,conntrack") == (Kind.CONNTRACK, Kind.DHCP)
    for bad in (None, "", []):
        with pytest.raises(UsageError):
            parse_request_vm(bad)
        with pytest.raises(UsageError):
            parse_request_kinds(bad)
