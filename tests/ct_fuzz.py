"""Structure-aware fuzzing of a bundle's conntrack entries.

An entry is built as a tree of netlink attributes (``Node``), honest first (a
connection of the VM, NATed or not), then mutated the way an attacker would:
an attribute repeated at any level (with another address), an address of the
other family slipped into a tuple, children reordered, a payload resized, an
unknown type inserted, an attribute dropped, an address swapped for another
host's, NAT status bits that the tuples do not match.

``kernel_view`` models how the kernel's create reads an entry (ctnetlink's
``nla_parse_nested_deprecated``: the last of repeated attributes wins, only the
message family's addresses are read, unknown types are ignored, a fixed-size
attribute is read from its first bytes), so that a test can ask whether what our
check accepted is, as the kernel reads it, the VM's.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from hypothesis import strategies as st

from xfer.conntrack import constants as c
from xfer.conntrack.stream import RawEntry

Node = tuple[int, "bytes | list[Node]"]
_NLA = struct.Struct("=HH")

VM_V4, VM_V6 = "10.0.1.2", "fd00:1::2"
POOL = {
    socket.AF_INET: ["10.0.1.2", "10.0.9.1", "10.0.1.99", "192.0.2.1", "10.0.9.7"],
    socket.AF_INET6: ["fd00:1::2", "fd00:9::1", "fd00:1::99", "2001:db8::1", "fd00:9::7"],
}


def packed(addr: str) -> bytes:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    return socket.inet_pton(family, addr)


def encode(nodes: list[Node]) -> bytes:
    """The attributes of ``nodes``, each padded to 4 bytes (nests flagged NLA_F_NESTED)."""
    out = bytearray()
    for kind, value in nodes:
        if isinstance(value, list):
            payload, kind = encode(value), kind | c.NLA_F_NESTED
        else:
            payload = value
        out += _NLA.pack(4 + len(payload), kind) + payload + bytes(-len(payload) % 4)
    return bytes(out)


@dataclass(frozen=True)
class Tuple:
    src: str
    dst: str
    proto: int
    sport: int = 0
    dport: int = 0


def _icmp(family: int) -> tuple[int, int, int]:
    """(protocol, echo request, echo reply) of the family."""
    return (c.IPPROTO_ICMP, 8, 0) if family == socket.AF_INET else (c.IPPROTO_ICMPV6, 128, 129)


def tuple_nodes(family: int, t: Tuple, reply: bool) -> list[Node]:
    src_t, dst_t = ((c.CTA_IP_V4_SRC, c.CTA_IP_V4_DST) if family == socket.AF_INET
                    else (c.CTA_IP_V6_SRC, c.CTA_IP_V6_DST))
    ip: list[Node] = [(src_t, packed(t.src)), (dst_t, packed(t.dst))]
    proto: list[Node] = [(c.CTA_PROTO_NUM, bytes([t.proto]))]
    if t.proto in (c.IPPROTO_ICMP, c.IPPROTO_ICMPV6):
        v6 = t.proto == c.IPPROTO_ICMPV6
        _, request, answer = _icmp(family)
        proto += [(c.CTA_PROTO_ICMPV6_ID if v6 else c.CTA_PROTO_ICMP_ID, struct.pack(">H", t.sport)),
                  (c.CTA_PROTO_ICMPV6_TYPE if v6 else c.CTA_PROTO_ICMP_TYPE,
                   bytes([answer if reply else request])),
                  (c.CTA_PROTO_ICMPV6_CODE if v6 else c.CTA_PROTO_ICMP_CODE, b"\0")]
    else:
        proto += [(c.CTA_PROTO_SRC_PORT, struct.pack(">H", t.sport)),
                  (c.CTA_PROTO_DST_PORT, struct.pack(">H", t.dport))]
    return [(c.CTA_TUPLE_IP, ip), (c.CTA_TUPLE_PROTO, proto)]


def entry_nodes(family: int, orig: Tuple, reply: Tuple, status: int) -> list[Node]:
    nodes: list[Node] = [
        (c.CTA_TUPLE_ORIG, tuple_nodes(family, orig, False)),
        (c.CTA_TUPLE_REPLY, tuple_nodes(family, reply, True)),
        (c.CTA_STATUS, struct.pack(">I", status)),
        (c.CTA_TIMEOUT, struct.pack(">I", 300)),
        (c.CTA_MARK, struct.pack(">I", 0)),
        (c.CTA_ID, struct.pack(">I", 7)),
        (c.CTA_USE, struct.pack(">I", 1)),
    ]
    if orig.proto == c.IPPROTO_TCP:
        nodes.append((c.CTA_PROTOINFO, [(c.CTA_PROTOINFO_TCP, [
            (c.CTA_PROTOINFO_TCP_STATE, bytes([3])),
            (c.CTA_PROTOINFO_TCP_WSCALE_ORIGINAL, bytes([7])),
            (c.CTA_PROTOINFO_TCP_WSCALE_REPLY, bytes([7])),
            (c.CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, bytes([0x0A, 0])),
            (c.CTA_PROTOINFO_TCP_FLAGS_REPLY, bytes([0x0A, 0]))])]))
    return nodes


BASE_STATUS = c.IPS_CONFIRMED | c.IPS_ASSURED | c.IPS_SEEN_REPLY


@st.composite
def honest_entries(draw: st.DrawFn) -> tuple[int, list[Node]]:
    """A connection of the VM as the kernel would dump it: opened by the VM or answered
    by it, NATed or not, TCP, UDP or ICMP, IPv4 or IPv6."""
    family = draw(st.sampled_from([socket.AF_INET, socket.AF_INET6]))
    vm, peer, _, nat_addr, other = POOL[family]
    proto = draw(st.sampled_from([c.IPPROTO_TCP, c.IPPROTO_UDP, _icmp(family)[0]]))
    sport, dport = draw(st.integers(1024, 65535)), draw(st.sampled_from([22, 80, 443]))
    icmp = proto in (c.IPPROTO_ICMP, c.IPPROTO_ICMPV6)
    vm_opened = draw(st.booleans())
    # for ICMP, ``sport`` holds the id and ``dport`` is unused
    a, b = (vm, peer) if vm_opened else (peer, vm)
    orig = Tuple(a, b, proto, sport, 0 if icmp else dport)
    reply = Tuple(b, a, proto, sport, 0) if icmp else Tuple(b, a, proto, dport, sport)
    status = BASE_STATUS
    nat = draw(st.sampled_from(["none", "none", "snat", "dnat"]))
    if nat == "snat" and vm_opened:  # the VM behind masquerade: the reply goes to the NAT address
        status |= c.IPS_SRC_NAT
        reply = (Tuple(reply.src, nat_addr, proto, 4242, 0) if icmp
                 else Tuple(reply.src, nat_addr, proto, reply.sport, 61000))
    elif nat == "dnat" and not vm_opened:  # the VM behind a port forward on the NAT address
        status |= c.IPS_DST_NAT
        orig = Tuple(peer, nat_addr, proto, orig.sport, orig.dport)
    elif nat == "dnat":  # the VM reaches a service forwarded to another host
        status |= c.IPS_DST_NAT
        reply = Tuple(other, vm, proto, reply.sport, reply.dport)
    return family, entry_nodes(family, orig, reply, status)


def _paths(nodes: list[Node], prefix: tuple[int, ...] = ()) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = []
    for i, (_, value) in enumerate(nodes):
        out.append((*prefix, i))
        if isinstance(value, list):
            out += _paths(value, (*prefix, i))
    return out


def _parent(nodes: list[Node], path: tuple[int, ...]) -> list[Node]:
    for i in path[:-1]:
        value = nodes[i][1]
        assert isinstance(value, list)
        nodes = value
    return nodes


def _copy(nodes: list[Node]) -> list[Node]:
    return [(k, _copy(v) if isinstance(v, list) else v) for k, v in nodes]


_ADDRESS_TYPES = (c.CTA_IP_V4_SRC, c.CTA_IP_V4_DST, c.CTA_IP_V6_SRC, c.CTA_IP_V6_DST)


@st.composite
def mutated(draw: st.DrawFn, base: tuple[int, list[Node]], max_mutations: int = 3
            ) -> tuple[int, list[Node]]:
    """``base`` with up to ``max_mutations`` attacker's changes (see the module docstring)."""
    family, nodes = base[0], _copy(base[1])
    for _ in range(draw(st.integers(0, max_mutations))):
        paths = _paths(nodes)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = _parent(nodes, path)
        kind, value = parent[path[-1]]
        op = draw(st.sampled_from(["repeat", "family", "reorder", "resize", "unknown", "drop",
                                   "address", "status"]))
        if op == "repeat":  # the same type again, before or after, maybe with another address
            if not isinstance(value, list) and kind in _ADDRESS_TYPES and len(value) in (4, 16):
                fam = socket.AF_INET if len(value) == 4 else socket.AF_INET6
                value = packed(draw(st.sampled_from(POOL[fam])))
            where = draw(st.integers(0, len(parent)))
            parent.insert(where, (kind, _copy(value) if isinstance(value, list) else value))
        elif op == "family":  # the other family's address inside a tuple's IP nest
            ips = [p for p in paths if len(p) == 2 and _parent(nodes, p)[p[-1]][0] == c.CTA_TUPLE_IP
                   and isinstance(_parent(nodes, p)[p[-1]][1], list)]
            if ips:
                ip = draw(st.sampled_from(ips))
                nest = _parent(nodes, ip)[ip[-1]][1]
                assert isinstance(nest, list)  # filtered above
                other = socket.AF_INET6 if family == socket.AF_INET else socket.AF_INET
                attr = draw(st.sampled_from((c.CTA_IP_V6_SRC, c.CTA_IP_V6_DST) if other == socket.AF_INET6
                                            else (c.CTA_IP_V4_SRC, c.CTA_IP_V4_DST)))
                addr = packed(draw(st.sampled_from(POOL[other])))
                nest.insert(draw(st.integers(0, len(nest))), (attr, addr))
        elif op == "reorder" and isinstance(value, list):
            value[:] = draw(st.permutations(value))
        elif op == "resize" and not isinstance(value, list):
            grow = draw(st.integers(-len(value), 5))
            parent[path[-1]] = (kind, value[:len(value) + grow] if grow < 0 else value + bytes(grow))
        elif op == "unknown":
            parent.insert(draw(st.integers(0, len(parent))),
                          (draw(st.integers(0, 40)), draw(st.binary(max_size=20))))
        elif op == "drop":
            del parent[path[-1]]
        elif op == "address" and not isinstance(value, list) and kind in _ADDRESS_TYPES:
            fam = socket.AF_INET if len(value) == 4 else socket.AF_INET6
            if len(value) in (4, 16):
                parent[path[-1]] = (kind, packed(draw(st.sampled_from(POOL[fam]))))
        elif op == "status" and kind == c.CTA_STATUS and len(path) == 1:
            bits = draw(st.sampled_from([0, c.IPS_SRC_NAT, c.IPS_DST_NAT, c.IPS_SRC_NAT | c.IPS_DST_NAT]))
            parent[path[-1]] = (kind, struct.pack(">I", BASE_STATUS | bits))
    return family, nodes


@st.composite
def hostile_sections(draw: st.DrawFn) -> list[RawEntry]:
    """Entries for a bundle: a mutated entry, alone or inside a run of honest ones of its
    layout (so that the column-by-column check of runs is attacked too)."""
    base = draw(honest_entries())
    bad = draw(mutated(base))
    before, after = draw(st.sampled_from([(0, 0), (1, 0), (9, 0), (10, 3)]))
    honest = RawEntry(base[0], encode(base[1]))
    return [honest] * before + [RawEntry(bad[0], encode(bad[1]))] + [honest] * after


# --- the kernel's reading --------------------------------------------------------------

def _parse(buf: bytes, start: int, end: int) -> dict[int, bytes]:
    """nla_parse, deprecated flavour: the last of repeated types wins; stops where an
    attribute's length is bad (the kernel warns about the rest and goes on)."""
    out: dict[int, bytes] = {}
    pos = start
    while pos + 4 <= end:
        length, kind = _NLA.unpack_from(buf, pos)
        if length < 4 or pos + length > end:
            break
        out[kind & c.NLA_TYPE_MASK] = buf[pos + 4:pos + length]
        pos += (length + 3) & ~3
    return out


@dataclass(frozen=True)
class KernelTuple:
    src: bytes
    dst: bytes
    sport: bytes
    dport: bytes
    icmp_id: bytes


def _kernel_tuple(family: int, raw: bytes) -> KernelTuple | None:
    t = _parse(raw, 0, len(raw))
    if c.CTA_TUPLE_IP not in t or c.CTA_TUPLE_PROTO not in t:
        return None
    ip = _parse(t[c.CTA_TUPLE_IP], 0, len(t[c.CTA_TUPLE_IP]))
    n, (s, d) = ((4, (c.CTA_IP_V4_SRC, c.CTA_IP_V4_DST)) if family == socket.AF_INET
                 else (16, (c.CTA_IP_V6_SRC, c.CTA_IP_V6_DST)))
    if len(ip.get(s, b"")) < n or len(ip.get(d, b"")) < n:
        return None
    pr = _parse(t[c.CTA_TUPLE_PROTO], 0, len(t[c.CTA_TUPLE_PROTO]))
    num = pr.get(c.CTA_PROTO_NUM, b"")
    if not num:
        return None
    ports = icmp = b""
    if num[0] in (c.IPPROTO_ICMP, c.IPPROTO_ICMPV6):
        icmp = pr.get(c.CTA_PROTO_ICMP_ID if num[0] == c.IPPROTO_ICMP else c.CTA_PROTO_ICMPV6_ID, b"")[:2]
        if len(icmp) < 2:
            return None
    elif num[0] in (c.IPPROTO_TCP, c.IPPROTO_UDP):
        sp, dp = pr.get(c.CTA_PROTO_SRC_PORT, b""), pr.get(c.CTA_PROTO_DST_PORT, b"")
        if len(sp) < 2 or len(dp) < 2:
            return None
        ports = sp[:2] + dp[:2]
    return KernelTuple(ip[s][:n], ip[d][:n], ports[:2], ports[2:], icmp)


def kernel_view(family: int, blob: bytes) -> tuple[KernelTuple, KernelTuple, int] | None:
    """(original tuple, reply tuple, status) as the kernel's create would read them, or
    None where it would refuse the entry outright (EINVAL)."""
    top = _parse(blob, 0, len(blob))
    if c.CTA_TUPLE_ORIG not in top or c.CTA_TUPLE_REPLY not in top:
        return None
    orig, reply = _kernel_tuple(family, top[c.CTA_TUPLE_ORIG]), _kernel_tuple(family, top[c.CTA_TUPLE_REPLY])
    if orig is None or reply is None:
        return None
    raw_status = top.get(c.CTA_STATUS, bytes(4))
    if len(raw_status) < 4:
        return None
    return orig, reply, struct.unpack(">I", raw_status[:4])[0]


def belongs(orig: KernelTuple, reply: KernelTuple, status: int, owned: frozenset[bytes]) -> bool:
    """The VM is an endpoint of every packet the entry lets through (docs: ownership)."""
    if orig.src not in owned and reply.src not in owned:
        return False
    if not status & c.IPS_SRC_NAT and (reply.dst, reply.dport, reply.icmp_id) != (
            orig.src, orig.sport, orig.icmp_id):
        return False
    return bool(status & c.IPS_DST_NAT or (reply.src, reply.sport) == (orig.dst, orig.dport))
