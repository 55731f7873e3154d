"""Readable conntrack records: what ``xfer conntrack ls`` and ``xfer bundle show`` print.

The transfer path does not build these (it works on the kernel's attribute
bytes, see ``wire``); they exist for people, JSON output and tests.
"""

from __future__ import annotations

import ipaddress
from typing import Any, NamedTuple

from xfer.conntrack.constants import (
    IPS_DST_NAT,
    IPS_SRC_NAT,
    PROTO_NAMES,
    STATUS_NAMES,
    TCP_STATES,
)


class CtTuple(NamedTuple):
    """One direction of a connection (addresses as text)."""

    src: str
    dst: str
    proto: int
    sport: int | None = None
    dport: int | None = None
    icmp_id: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None
    zone: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"src": self.src, "dst": self.dst,
                               "proto": PROTO_NAMES.get(self.proto, str(self.proto)),
                               "sport": self.sport, "dport": self.dport}
        if self.icmp_type is not None:
            out.update(icmp_id=self.icmp_id, icmp_type=self.icmp_type, icmp_code=self.icmp_code)
        if self.zone is not None:
            out["zone"] = self.zone
        return out

    def packed_src(self) -> bytes:
        return ipaddress.ip_address(self.src).packed


class TcpInfo(NamedTuple):
    state: int
    wscale_orig: int | None = None
    wscale_reply: int | None = None
    flags_orig: int = 0
    flags_reply: int = 0

    @property
    def state_name(self) -> str:
        return TCP_STATES[self.state] if self.state < len(TCP_STATES) else str(self.state)


class SeqAdj(NamedTuple):
    correction_pos: int
    offset_before: int
    offset_after: int


class ConntrackEntry(NamedTuple):
    """Everything ctnetlink reports about one connection."""

    family: int
    orig: CtTuple
    reply: CtTuple
    status: int
    timeout: int
    mark: int = 0
    zone: int = 0
    labels: bytes | None = None
    secctx: str | None = None
    helper: str | None = None
    tcp: TcpInfo | None = None
    seqadj_orig: SeqAdj | None = None
    seqadj_reply: SeqAdj | None = None
    counters_orig: tuple[int, int] | None = None
    counters_reply: tuple[int, int] | None = None
    id: int | None = None

    @property
    def snat(self) -> bool:
        return bool(self.status & IPS_SRC_NAT)

    @property
    def dnat(self) -> bool:
        return bool(self.status & IPS_DST_NAT)

    @property
    def state(self) -> str | None:
        return self.tcp.state_name if self.tcp else None

    def status_names(self) -> list[str]:
        return [name for bit, name in STATUS_NAMES.items() if self.status & bit]

    def label_bits(self) -> list[int]:
        """Indices of the connlabel bits set (as ``conntrack -o labels`` numbers them)."""
        if not self.labels:
            return []
        value = int.from_bytes(self.labels, "little")
        return [i for i in range(len(self.labels) * 8) if value >> i & 1]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "family": "ipv4" if self.family == 2 else "ipv6",
            "orig": self.orig.to_json(),
            "reply": self.reply.to_json(),
            "state": self.state,
            "timeout": self.timeout,
            "mark": self.mark,
            "zone": self.zone,
            "status": self.status_names(),
            "labels": self.label_bits(),
        }
        if self.helper:
            out["helper"] = self.helper
        if self.secctx:
            out["secctx"] = self.secctx
        if self.snat or self.dnat:
            out["nat"] = {"snat": self.snat, "dnat": self.dnat}
        if self.tcp:
            out["tcp"] = {"wscale_orig": self.tcp.wscale_orig, "wscale_reply": self.tcp.wscale_reply,
                          "flags_orig": self.tcp.flags_orig, "flags_reply": self.tcp.flags_reply}
        if self.counters_orig:
            out["counters"] = {"orig": {"packets": self.counters_orig[0],
                                        "bytes": self.counters_orig[1]},
                               "reply": {"packets": self.counters_reply[0] if self.counters_reply else 0,
                                         "bytes": self.counters_reply[1] if self.counters_reply else 0}}
        return out

    def summary(self) -> str:
        """One line in the spirit of ``conntrack -L``."""
        o, r = self.orig, self.reply
        proto = PROTO_NAMES.get(o.proto, str(o.proto))
        ports = f" sport={o.sport} dport={o.dport}" if o.sport is not None else ""
        rports = f" sport={r.sport} dport={r.dport}" if r.sport is not None else ""
        state = f" {self.state}" if self.state else ""
        return (f"{proto}{state} src={o.src} dst={o.dst}{ports} src={r.src} dst={r.dst}{rports}"
                f" mark={self.mark} zone={self.zone} timeout={self.timeout}")
