"""Pre-copy on the destination: stage a VM's entries, apply deltas, commit or abort.

Staged entries are real conntrack entries of the destination namespace (the
kernel has no invisible staging area); they match no packet until the VM's
traffic arrives there, and the stage remembers each so ``abort`` deletes exactly
what it put in, and nothing that was there before.

Timeouts. Events do not report timeout refreshes, so the source's remaining
timeout is unknown while the VM runs; the stage gives each entry the kernel's
own timeout for the entry's state, read from the destination namespace's
sysctls (``nf_conntrack_tcp_timeout_<state>``, ``nf_conntrack_udp_timeout`` or
``_stream`` once a reply was seen, ``icmp``/``icmpv6``/``generic``): never shorter
than the source's remaining one (which the same limit bounds, when both sides
share the defaults) and never longer than the destination kernel would give the
state itself. Where the destination's limit is below the source's remaining
timeout the destination's limit wins (never longer). Nothing is refreshed in the
pause except staged entries that would expire before it ends (``refresh_margin``).

Every entry passes the import's ownership and well-formedness check
(``transfer._validated``) before anything reaches the kernel.

>>> with Stage(vm, "fw-dst") as stage:                 # doctest: +SKIP
...     stage.apply(bulk)                               # outside the pause
...     stage.apply(delta.upserts, delta.deletes, final=True)
...     stage.commit()
"""

from __future__ import annotations

import errno
import heapq
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import NamedTuple

from xfer import netns
from xfer.bundle import Section
from xfer.conntrack import constants as c
from xfer.conntrack import stream, transfer, wire
from xfer.conntrack.hooks import nat_hooks_registered
from xfer.conntrack.index import entry_key
from xfer.conntrack.netlink import CtNetlink
from xfer.conntrack.stream import EMPTY, HDR, Stream
from xfer.errors import ImportFailed
from xfer.model import Kind, VmIdentity

_U32BE = struct.Struct(">I")
SYSCTL_DIR = "/proc/sys/net/netfilter"
# TCP state number (TCP_STATES) -> sysctl suffix; SYN_SENT2 shares SYN_SENT's timeout.
_TCP_SYSCTL = {1: "syn_sent", 2: "syn_recv", 3: "established", 4: "fin_wait", 5: "close_wait",
               6: "last_ack", 7: "time_wait", 8: "close", 9: "syn_sent"}
REFRESH_MARGIN = 10.0


class Timeouts(NamedTuple):
    """The kernel's per-state timeouts of one namespace, in seconds."""

    tcp: dict[int, int]
    udp: int
    udp_stream: int
    icmp: int
    icmpv6: int
    generic: int

    def limit(self, proto: int, tcp_state: int | None, status: int) -> int:
        """The kernel's timeout for an entry in this state.

        >>> DEFAULT_TIMEOUTS.limit(6, 3, 0)
        432000
        """
        if proto == c.IPPROTO_TCP and tcp_state is not None:
            return self.tcp.get(tcp_state, self.generic)
        if proto == c.IPPROTO_UDP:
            return self.udp_stream if status & c.IPS_SEEN_REPLY else self.udp
        if proto == c.IPPROTO_ICMP:
            return self.icmp
        if proto == c.IPPROTO_ICMPV6:
            return self.icmpv6
        return self.generic


DEFAULT_TIMEOUTS = Timeouts(
    tcp={1: 120, 2: 60, 3: 432000, 4: 120, 5: 60, 6: 30, 7: 120, 8: 10, 9: 120},
    udp=30, udp_stream=120, icmp=30, icmpv6=30, generic=600)


def kernel_timeouts(namespace: str | None) -> Timeouts:
    """Read the namespace's conntrack timeout sysctls (they are per namespace)."""
    def read(name: str, default: int) -> int:
        try:
            with open(os.path.join(SYSCTL_DIR, name)) as f:
                return int(f.read())
        except (OSError, ValueError):
            return default

    d = DEFAULT_TIMEOUTS
    with netns.entered(namespace):
        tcp = {state: read(f"nf_conntrack_tcp_timeout_{name}", d.tcp[state])
               for state, name in _TCP_SYSCTL.items()}
        return Timeouts(tcp, read("nf_conntrack_udp_timeout", d.udp),
                        read("nf_conntrack_udp_timeout_stream", d.udp_stream),
                        read("nf_conntrack_icmp_timeout", d.icmp),
                        read("nf_conntrack_icmpv6_timeout", d.icmpv6),
                        read("nf_conntrack_generic_timeout", d.generic))


def _proto_and_state(attrs: dict[int, bytes]) -> tuple[int, int | None]:
    """The protocol number of the original tuple and the TCP state, read without a full
    decode (this runs per entry of a delta, inside the pause)."""
    proto = 0
    orig = attrs[c.CTA_TUPLE_ORIG]
    for kind, s, e in wire.iter_attrs(orig, 4):
        if kind == c.CTA_TUPLE_PROTO:
            for k2, s2, _e2 in wire.iter_attrs(orig, s, e):
                if k2 == c.CTA_PROTO_NUM:
                    proto = orig[s2]
    state = None
    info = attrs.get(c.CTA_PROTOINFO)
    if info is not None and proto == c.IPPROTO_TCP:
        for kind, s, e in wire.iter_attrs(info, 4):
            if kind == c.CTA_PROTOINFO_TCP:
                for k2, s2, _e2 in wire.iter_attrs(info, s, e):
                    if k2 == c.CTA_PROTOINFO_TCP_STATE:
                        state = info[s2]
    return proto, state


def bounded(message: bytes, timeouts: Timeouts) -> tuple[bytes, int]:
    """``message`` with its CTA_TIMEOUT set to the kernel's limit for the entry's state,
    and that limit."""
    sent, limit, _ = _bounded(message, timeouts)
    return sent, limit


def _bounded(message: bytes, timeouts: Timeouts) -> tuple[bytes, int, bytes]:
    """``bounded`` and the entry's CTA_ID attribute (b"" if none), from one walk."""
    attrs = wire.split(message[HDR:stream.length_at(message, 0)])
    proto, state = _proto_and_state(attrs)
    limit = timeouts.limit(proto, state, wire.entry_status(attrs))
    attrs[c.CTA_TIMEOUT] = wire.nla(c.CTA_TIMEOUT, _U32BE.pack(limit))
    body = b"".join(attrs.values())
    return (struct.pack("=I", HDR + len(body)) + message[4:HDR] + body, limit,
            attrs.get(c.CTA_ID, b""))


@dataclass
class StageReport:
    """What one ``apply`` did."""

    created: int = 0
    updated: int = 0
    deleted: int = 0
    refreshed: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return {"created": self.created, "updated": self.updated, "deleted": self.deleted,
                "refreshed": self.refreshed, "errors": self.errors[:20],
                "seconds": round(self.seconds, 6)}


class _Staged(NamedTuple):
    message: bytes   # as sent (bounded timeout)
    entry_id: bytes  # the source's CTA_ID: another id under the same key is a new entry
    expires: float   # monotonic time the destination's copy runs out, unrefreshed


class Stage:
    """One VM's staged entries in one destination namespace (see the module docstring)."""

    def __init__(self, vm: VmIdentity, namespace: str | None = None, *,
                 timeouts: Timeouts | None = None, refresh_margin: float = REFRESH_MARGIN) -> None:
        self.vm = vm
        self.namespace = namespace
        self.timeouts = timeouts or kernel_timeouts(namespace)
        self.refresh_margin = refresh_margin
        self.staged: dict[bytes, _Staged] = {}
        # (expires, key) of staged entries, soonest first; stale pairs are skipped
        self._expiry: list[tuple[float, int, bytes]] = []
        self._pushed = 0  # tiebreaker: equal expiry times never compare the keys
        self.applied = 0
        self._nat_checked = False
        self._ct: CtNetlink | None = None

    def _socket(self) -> CtNetlink:
        if self._ct is None:
            self._ct = CtNetlink(self.namespace)
        return self._ct

    def close(self) -> None:
        if self._ct is not None:
            self._ct.close()
            self._ct = None

    def __enter__(self) -> Stage:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _checked(self, entries: Stream) -> list[bytes]:
        """The stream's messages, each checked to be well formed and the VM's."""
        if not entries.offsets:
            return []
        section = Section(Kind.CONNTRACK, transfer.ENCODING, len(entries), entries.payload, {})
        plan = transfer._validated(section, self.vm)
        if plan.nated and not self._nat_checked:
            if nat_hooks_registered(self.namespace) is False:
                raise ImportFailed(
                    f"{plan.nated} NATed connections need NAT hooks at the destination, and "
                    f"namespace {self.namespace or '(current)'} has none (add any nat-type chain, "
                    "even empty); nothing staged")
            self._nat_checked = True
        payload = plan.payload
        return [payload[off:off + stream.length_at(payload, off)] for off in plan.offsets]

    def apply(self, upserts: Stream, deletes: Stream = EMPTY, *, final: bool = False,
              whole: bool = False) -> StageReport:
        """Make the staged set reflect the changes, in one batch: destroyed entries go,
        new ones are created, changed ones updated. With ``whole`` the upserts are the
        VM's every entry (a resync): staged entries they lack go too. With ``final``
        (the pause), staged entries about to run out are refreshed too. Raises
        ImportFailed when an entry fails (what was staged stays staged: ``abort``
        removes it)."""
        started = time.perf_counter()
        report = StageReport()
        ups = self._checked(upserts)
        dels = self._checked(deletes)
        now = time.monotonic()
        ct = self._socket()
        plan: list[tuple[str, bytes, bytes]] = []  # (what, key, request) in order
        for msg in dels:
            key = entry_key(msg)
            old = self.staged.get(key)
            if old is not None:
                plan.append(("delete", key, old.message))
        touched: set[bytes] = set()
        pending: dict[bytes, _Staged] = {}
        for msg in ups:
            key = entry_key(msg)
            touched.add(key)
            sent, limit, entry_id = _bounded(msg, self.timeouts)
            old = self.staged.get(key)
            if old is not None and old.entry_id != entry_id:
                plan.append(("delete", key, old.message))  # the tuple was reused: a new entry
                old = None
            plan.append(("update" if old is not None else "create", key, sent))
            pending[key] = _Staged(sent, entry_id, now + limit)
        if whole:
            plan += [("delete", key, st.message) for key, st in self.staged.items()
                     if key not in touched]
        if final:
            # only the staged entries that run out before the pause ends: O(those), not
            # O(everything staged)
            while self._expiry and self._expiry[0][0] - now < self.refresh_margin:
                expires, _n, key = heapq.heappop(self._expiry)
                st = self.staged.get(key)
                if st is None or st.expires != expires or key in touched or key in pending:
                    continue
                sent, limit = bounded(st.message, self.timeouts)
                plan.append(("refresh", key, sent))
                pending[key] = st._replace(expires=now + limit)
        failures = self._send(ct, plan)
        # an update of an entry the destination already let expire, or a create of one
        # it already holds from before us: try the other way once
        retry: list[tuple[str, bytes, bytes]] = []
        for i, (what, key, msg) in enumerate(plan):
            err = failures.get(i)
            if err == errno.ENOENT and what in ("update", "refresh"):
                retry.append(("create", key, msg))
            elif err == errno.EEXIST and what == "create":
                retry.append(("adopt", key, msg))
            elif err == errno.ENOENT and what == "delete":
                self.staged.pop(key, None)  # expired here already
                report.deleted += 1
            elif err:
                report.errors.append(f"{what} {_summary(msg)}: {os.strerror(err)}")
            else:
                self._done(what, key, pending, report)
        rfail = self._send(ct, retry) if retry else {}
        for i, (what, key, msg) in enumerate(retry):
            err = rfail.get(i)
            if err:
                report.errors.append(f"{what} {_summary(msg)}: {os.strerror(err)}")
            else:
                self._done(what, key, pending, report)
        self.applied += 1
        report.seconds = time.perf_counter() - started
        if report.errors:
            raise ImportFailed(f"{len(report.errors)} conntrack entries failed to stage "
                               f"({report.errors[0]}); staged entries stay until abort", report)
        return report

    def _done(self, what: str, key: bytes, pending: dict[bytes, _Staged], report: StageReport) -> None:
        if what == "delete":
            self.staged.pop(key, None)
            report.deleted += 1
        elif what == "adopt":
            # NOTE: the entry existed here before the stage: it is updated but not
            # ours, so abort leaves it (it was there before us).
            report.updated += 1
        else:
            st = self.staged[key] = pending[key]
            self._pushed += 1
            heapq.heappush(self._expiry, (st.expires, self._pushed, key))
            if what == "create":
                report.created += 1
            elif what == "refresh":
                report.refreshed += 1
            else:
                report.updated += 1

    def _send(self, ct: CtNetlink, plan: list[tuple[str, bytes, bytes]]) -> dict[int, int]:
        """One batch for the whole plan; ``{index in plan: errno}`` of the failures."""
        if not plan:
            return {}
        base = ct.reserve(len(plan))

        def requests() -> Iterator[tuple[int, bytes]]:
            for i, (what, _key, msg) in enumerate(plan):
                family, blob = msg[16], msg[HDR:stream.length_at(msg, 0)]
                if what == "delete":
                    yield base + i, wire.delete_message(family, wire.split(blob), base + i,
                                                        same_table=False)
                else:
                    yield base + i, wire.create_message(family, blob, base + i,
                                                        update=what in ("update", "refresh", "adopt"))

        if len(plan) < 2048:  # a delta: no sender thread (see CtNetlink.send_now)
            failures = ct.send_now([msg for _seq, msg in requests()])
        else:
            failures = ct.batch(requests())
        return {seq - base: err for seq, err in failures.items()}

    def commit(self) -> int:
        """The migration completed: the entries are the destination's now. Returns how many."""
        n = len(self.staged)
        self.staged.clear()
        self._expiry.clear()
        self.close()
        return n

    def abort(self) -> int:
        """Delete every staged entry (the destination is left as before); returns how many
        went (entries the destination already let expire count as gone)."""
        if not self.staged:
            self.close()
            return 0
        plan = [("delete", key, st.message) for key, st in self.staged.items()]
        failures = self._send(self._socket(), plan)
        gone = sum(1 for i in range(len(plan)) if failures.get(i) in (None, errno.ENOENT))
        self.staged.clear()
        self._expiry.clear()
        self.close()
        return gone


def _summary(message: bytes) -> str:
    try:
        return wire.parse_entry(message[16], message[HDR:stream.length_at(message, 0)]).summary()
    except (ValueError, KeyError, IndexError, struct.error):
        return "(malformed entry)"
