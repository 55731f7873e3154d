"""Hostile bundles (no root): what the check accepts is, as the kernel reads it, the VM's;
every malformed header or entry gets one BundleError line and never a traceback.

The kernel-side twin (a real namespace, conntrack(8) as the witness) is
netns_tests/test_hostile_import.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import ct_fuzz
from tests.ct_factory import bundle_of, tcp_entry
from xfer import bundle
from xfer.conntrack import constants as c
from xfer.conntrack import strict, wire
from xfer.conntrack.model import CtTuple
from xfer.conntrack.stream import RawEntry
from xfer.conntrack.transfer import _validated, section_entries, verdict
from xfer.errors import BundleError, ForeignEntryError
from xfer.model import Kind, parse_vm

VM = parse_vm(f"{ct_fuzz.VM_V4},{ct_fuzz.VM_V6}", {})
OWNED = VM.packed_addresses
FUZZ = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _section(entries: list[RawEntry]) -> Any:
    return bundle_of(VM, entries).sections[Kind.CONNTRACK]


# --- 1. the check and the kernel agree on every entry ---------------------------------------

@FUZZ
@given(ct_fuzz.hostile_sections())
def test_whatever_the_check_accepts_is_the_vms_as_the_kernel_reads_it(entries: list[RawEntry]) -> None:
    try:
        _validated(_section(entries), VM)
    except BundleError:
        return
    for e in entries:
        view = ct_fuzz.kernel_view(e.family, e.blob)
        assert view is not None, "accepted an entry the kernel cannot read"
        assert ct_fuzz.belongs(*view, OWNED), f"accepted another host's entry {e.blob.hex()}"


@settings(max_examples=300, deadline=None)
@given(ct_fuzz.honest_entries(), st.integers(1, 12))
def test_every_honest_entry_passes_alone_and_in_runs(base: tuple[int, list[Any]], n: int) -> None:
    entry = RawEntry(base[0], ct_fuzz.encode(base[1]))
    plan = _validated(_section([entry] * n), VM)
    assert len(plan.offsets) == n
    assert strict.check(entry.family, entry.blob, OWNED) is None


def _tcp_tuple(kind: int, src: bytes, dst: bytes, *extra: bytes, ip_attrs: tuple[int, int] = (
        c.CTA_IP_V4_SRC, c.CTA_IP_V4_DST)) -> bytes:
    proto = wire.nest(c.CTA_TUPLE_PROTO, wire.nla(c.CTA_PROTO_NUM, bytes([c.IPPROTO_TCP])),
                      wire.nla(c.CTA_PROTO_SRC_PORT, b"\x9c\x40"), wire.nla(c.CTA_PROTO_DST_PORT, b"\0P"))
    ip = wire.nest(c.CTA_TUPLE_IP, wire.nla(ip_attrs[0], src), wire.nla(ip_attrs[1], dst))
    return wire.nest(kind, ip, proto, *extra)


def _with_tuples(orig: bytes, reply: bytes, family: int = socket.AF_INET) -> RawEntry:
    honest = tcp_entry("10.0.1.2", "10.0.9.1")
    rest = b"".join(v for k, v in wire.split(honest.blob).items()
                    if k not in (c.CTA_TUPLE_ORIG, c.CTA_TUPLE_REPLY))
    return RawEntry(family, orig + reply + rest)


VM4, PEER4, EVIL4 = (socket.inet_aton(a) for a in ("10.0.1.2", "10.0.9.1", "10.0.1.99"))
VM6, EVIL6 = (socket.inet_pton(socket.AF_INET6, a) for a in ("fd00:1::2", "fd00:1::99"))


def test_a_second_tuple_ip_after_the_proto_nest_is_refused_alone_and_inside_a_run() -> None:
    """Issue 11.1, nested repeat: the kernel keeps the *last* CTA_TUPLE_IP of a tuple."""
    smuggler = wire.nest(c.CTA_TUPLE_IP, wire.nla(c.CTA_IP_V4_SRC, EVIL4), wire.nla(c.CTA_IP_V4_DST, PEER4))
    orig = _tcp_tuple(c.CTA_TUPLE_ORIG, VM4, PEER4, smuggler)
    reply = _tcp_tuple(c.CTA_TUPLE_REPLY, PEER4, EVIL4)
    bad = _with_tuples(orig, reply)
    view = ct_fuzz.kernel_view(bad.family, bad.blob)
    assert view is not None and view[0].src == EVIL4      # what the kernel would create
    honest = tcp_entry("10.0.1.2", "10.0.9.1")
    for entries in ([bad], [honest] * 10 + [bad] + [honest] * 3):
        with pytest.raises(BundleError, match=r"CTA_TUPLE_IP appears twice"):
            _validated(_section(entries), VM)


def test_a_run_cannot_hide_another_structure_behind_the_same_headers() -> None:
    """A layout pins every header at every level. This entry has the honest run's length
    and the same top-level, IP-nest and address headers, but its proto nest became a
    second IP nest (another host's) plus filler: it must not ride the run."""
    honest = tcp_entry("10.0.1.2", "10.0.9.1")
    smuggler = wire.nest(c.CTA_TUPLE_IP, wire.nla(c.CTA_IP_V4_SRC, EVIL4), wire.nla(c.CTA_IP_V4_DST, PEER4))
    orig = wire.nest(c.CTA_TUPLE_ORIG, wire.nest(c.CTA_TUPLE_IP, wire.nla(c.CTA_IP_V4_SRC, VM4),
                                                 wire.nla(c.CTA_IP_V4_DST, PEER4)),
                     smuggler, wire.nla(9, bytes(4)))
    attrs = wire.split(honest.blob)
    assert len(orig) == len(attrs[c.CTA_TUPLE_ORIG])
    bad = RawEntry(honest.family, orig + honest.blob[len(orig):])
    assert len(bad.blob) == len(honest.blob)
    with pytest.raises(BundleError, match=r"entry 12 is malformed: CTA_TUPLE_ORIG"):
        _validated(_section([honest] * 12 + [bad] + [honest] * 4), VM)


@pytest.mark.parametrize(("family", "orig"), [
    # an IPv4 entry carrying the VM's IPv6 address: the kernel reads only the IPv4 one
    (socket.AF_INET, wire.nest(c.CTA_TUPLE_ORIG, wire.nest(
        c.CTA_TUPLE_IP, wire.nla(c.CTA_IP_V4_SRC, EVIL4), wire.nla(c.CTA_IP_V4_DST, PEER4),
        wire.nla(c.CTA_IP_V6_SRC, VM6)),
        wire.nest(c.CTA_TUPLE_PROTO, wire.nla(c.CTA_PROTO_NUM, bytes([6])),
                  wire.nla(c.CTA_PROTO_SRC_PORT, b"\x9c\x40"), wire.nla(c.CTA_PROTO_DST_PORT, b"\0P")))),
    # and the other way round
    (socket.AF_INET6, wire.nest(c.CTA_TUPLE_ORIG, wire.nest(
        c.CTA_TUPLE_IP, wire.nla(c.CTA_IP_V4_SRC, VM4), wire.nla(c.CTA_IP_V6_SRC, EVIL6),
        wire.nla(c.CTA_IP_V6_DST, EVIL6)),
        wire.nest(c.CTA_TUPLE_PROTO, wire.nla(c.CTA_PROTO_NUM, bytes([6])),
                  wire.nla(c.CTA_PROTO_SRC_PORT, b"\x9c\x40"), wire.nla(c.CTA_PROTO_DST_PORT, b"\0P")))),
])
def test_addresses_of_the_other_family_are_refused(family: int, orig: bytes) -> None:
    """Issue 11.1, mixed families: a check that read them would pass what the kernel does not."""
    a = EVIL4 if family == socket.AF_INET else EVIL6
    ip_attrs = ((c.CTA_IP_V4_SRC, c.CTA_IP_V4_DST) if family == socket.AF_INET
                else (c.CTA_IP_V6_SRC, c.CTA_IP_V6_DST))
    reply = _tcp_tuple(c.CTA_TUPLE_REPLY, a, a, ip_attrs=ip_attrs)
    bad = _with_tuples(orig, reply, family)
    with pytest.raises(BundleError, match=r"unexpected attribute type"):
        _validated(_section([bad]), VM)


def test_a_reply_tuple_between_two_other_hosts_is_refused() -> None:
    """An un-NATed entry VM -> X whose reply tuple is A -> B would let A reach B."""
    bad = tcp_entry("10.0.1.2", "10.0.9.1",
                    reply=CtTuple("10.0.9.7", "10.0.1.99", c.IPPROTO_TCP, 80, 40000))
    with pytest.raises(ForeignEntryError, match=r"does not return to the original source"):
        _validated(_section([bad]), VM)
    honest = tcp_entry("10.0.1.2", "10.0.9.1")
    with pytest.raises(ForeignEntryError, match=r"entry 12 .*does not return"):
        _validated(_section([honest] * 12 + [bad]), VM)
    # NATed, the reply legitimately goes to the NAT address
    snat = tcp_entry("10.0.1.2", "10.0.9.1", status=c.IPS_CONFIRMED | c.IPS_SRC_NAT,
                     reply=CtTuple("10.0.9.1", "192.0.2.1", c.IPPROTO_TCP, 80, 61000))
    assert len(_validated(_section([honest] * 12 + [snat]), VM).offsets) == 13


def test_bundle_show_reads_entries_as_the_check_does() -> None:
    """Issue 11.1/11.4: `bundle show --entries` and the import check agree on what an entry is."""
    smuggler = wire.nest(c.CTA_TUPLE_IP, wire.nla(c.CTA_IP_V4_SRC, EVIL4), wire.nla(c.CTA_IP_V4_DST, PEER4))
    bad = _with_tuples(_tcp_tuple(c.CTA_TUPLE_ORIG, VM4, PEER4, smuggler),
                       _tcp_tuple(c.CTA_TUPLE_REPLY, PEER4, VM4))
    section = _section([tcp_entry("10.0.1.2", "10.0.9.1"), bad])
    with pytest.raises(BundleError, match=r"entry 1 is malformed"):
        section_entries(section)
    assert "entry 1 is malformed" in (verdict(section, VM) or "")


# --- 3. the header: every field checked, covered by a digest, times sane -------------------

def _reencode(data: bytes, edit: Any) -> bytes:
    """``data`` with its header JSON edited by ``edit(header) -> header or raw bytes``, and a
    correct header digest (an attacker can compute it for an unsigned bundle)."""
    _, _, hlen = struct.unpack_from(">8sHI", data)
    header = json.loads(data[14:14 + hlen])
    new = edit(header)
    raw = new if isinstance(new, bytes) else json.dumps(new).encode()
    head = struct.pack(">8sHI", bundle.MAGIC, bundle.FORMAT_VERSION, len(raw)) + raw
    return head + hashlib.sha256(head).digest() + data[14 + hlen + 32:]


def _good() -> bytes:
    return bundle.encode(bundle_of(VM, [tcp_entry("10.0.1.2", "10.0.9.1")]))


GOOD = _good()


def _set(path: str, value: Any) -> Any:
    def edit(h: dict[str, Any]) -> dict[str, Any]:
        target, *rest = path.split(".")
        if not rest:
            h[target] = value
        elif target == "sections":
            h["sections"][0][rest[0]] = value
        else:
            h[target][rest[0]] = value
        return h
    return edit


def _drop(key: str) -> Any:
    def edit(h: dict[str, Any]) -> dict[str, Any]:
        del h[key]
        return h
    return edit


HEADER_CASES = {
    "count Infinity": lambda h: json.dumps(h).replace('"count": 1', '"count": Infinity').encode(),
    "length Infinity": lambda h: json.dumps(h).replace(f'"length": {h["sections"][0]["length"]}',
                                                       '"length": Infinity').encode(),
    "created -Infinity": lambda h: json.dumps(h).replace(f'"created": {h["created"]}',
                                                         '"created": -Infinity').encode(),
    "created NaN": lambda h: json.dumps(h).replace(f'"created": {h["created"]}', '"created": NaN').encode(),
    "created string": _set("created", "x"),
    "created null": _set("created", None),
    "created missing": _drop("created"),
    "created zero": _set("created", 0),
    "id missing": _drop("id"),
    "id a number": _set("id", 7),
    "source a list": _set("source", ["a"]),
    "source a number": _set("source", 3),
    "source nested": _set("source", {"device": {"x": 1}}),
    "vm a list": _set("vm", []),
    "vm ipv4 a number": _set("vm.ipv4", 10),
    "vm ipv4 a string": _set("vm.ipv4", "10.0.1.2"),
    "vm ipv4 holds IPv6": _set("vm.ipv4", ["fd00::1"]),
    "vm macs numbers": _set("vm.macs", [1, 2]),
    "vm id missing": _set("vm", {"ipv4": ["10.0.1.2"]}),
    "signed a string": _set("signed", "no"),
    "sections a dict": _set("sections", {"kind": "conntrack"}),
    "section a string": _set("sections", ["conntrack"]),
    "section kind unknown": _set("sections.kind", "secrets"),
    "section count negative": _set("sections.count", -1),
    "section count a bool": _set("sections.count", True),
    "section length a float": _set("sections.length", 12.5),
    "section sha256 short": _set("sections.sha256", "ab"),
    "section meta a list": _set("sections.meta", [1]),
    "section encoding a number": _set("sections.encoding", 2),
    "deep nesting": lambda h: b'{"vm":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "not an object": lambda h: b"[1, 2]",
    "not UTF-8": lambda h: b'{"id": "\xff"}',
    "format a bool": _set("format", True),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_every_malformed_header_field_is_one_bundle_error(case: str) -> None:
    """Issue 11.3: wrong types, non-standard JSON and absurd values each get a BundleError."""
    data = _reencode(_good(), HEADER_CASES[case])
    try:
        b = bundle.decode(data)
    except BundleError as exc:
        assert "\n" not in str(exc)
        return
    # Some values are well formed and only absurd at import (created = 0)
    with pytest.raises(BundleError, match=r"exported .* ago"):
        bundle.check_fresh(b)


def test_an_unsigned_bundles_header_is_covered_by_its_digest() -> None:
    """Issue 11.3: a flipped header byte of an unsigned bundle is caught."""
    data = bytearray(_good())
    at = data.index(b'"device"') + 2
    data[at] ^= 0x20  # "device" -> "Device": still valid JSON, still a valid header
    with pytest.raises(BundleError, match=r"header digest mismatch"):
        bundle.decode(bytes(data))


def test_stale_and_future_bundles_are_refused_at_import() -> None:
    now = time.time()
    fresh = bundle_of(VM, [], created=now - 10)
    bundle.check_fresh(fresh, now=now)
    with pytest.raises(BundleError, match=r"exported 400 s ago, over the limit of 300 s"):
        bundle.check_fresh(bundle_of(VM, [], created=now - 400), now=now)
    with pytest.raises(BundleError, match=r"in the future"):
        bundle.check_fresh(bundle_of(VM, [], created=now + 3600), now=now)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_random_header_bytes_never_escape_as_anything_but_bundle_error(data: st.DataObject) -> None:
    good = GOOD  # one bundle for every example: hypothesis replays draws against the same bytes
    _, _, hlen = struct.unpack_from(">8sHI", good)
    raw = bytearray(good[14:14 + hlen])
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    with contextlib.suppress(BundleError):  # anything else fails the test
        bundle.decode(_reencode(good, lambda h: bytes(raw)))


# --- 4. the CLI: one line, never a traceback ------------------------------------------------

def _xfer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xfer.cli", *args], capture_output=True, text=True,
                          timeout=60, check=False)


def test_show_and_import_of_a_crafted_bundle_print_one_line(tmp_path: Path) -> None:
    """Issue 11.4: a checksum-valid payload with malformed messages is refused in one line."""
    smuggler = wire.nest(c.CTA_TUPLE_IP, wire.nla(c.CTA_IP_V4_SRC, EVIL4))
    bad = _with_tuples(_tcp_tuple(c.CTA_TUPLE_ORIG, VM4, PEER4, smuggler),
                       _tcp_tuple(c.CTA_TUPLE_REPLY, PEER4, VM4))
    path = tmp_path / "crafted.xfer"
    bundle.write(path, bundle_of(VM, [bad]))
    show = _xfer("bundle", "show", str(path), "--entries")
    assert show.returncode == 1 and "Traceback" not in show.stderr
    assert show.stderr.strip().count("\n") == 0 and "malformed" in show.stderr
    header = _xfer("bundle", "show", str(path))
    assert header.returncode == 0 and "import check: conntrack entry 0 is malformed" in header.stdout
    truncated = tmp_path / "cut.xfer"
    truncated.write_bytes(path.read_bytes()[:-7])
    for args in (["bundle", "show", str(truncated)], ["import", str(path), "--netns", "nonexistent-ns"]):
        r = _xfer(*args)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
