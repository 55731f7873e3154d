"""The bridge side of ECP and VDP as a state machine: frames in, frames and events out.

No sockets and no clock here (the caller passes ``now``), so every rule is tested
without root. What a station needs from the bridge (docs/vdp.md has the timers):

- every ECP request is ACKed at once; a retransmission (same sequence number and
  bytes, seconds apart at most) is ACKed again but handled once;
- every VSI TLV gets a VDP response, sent as the bridge's own ECP request (its
  own sequence counter, ``SequenceCounter``), one in flight per station,
  retransmitted until ACKed or the retries are spent;
- a request carrying a migration hint becomes an ``Event`` (ASSOCIATE with the
  M-bit: the VM is starting here; ASSOCIATE or DEASSOCIATE with the S-bit: it is
  not running here any more). The response waits for the event's outcome
  (``resolved``): status 0 when the manager took the message, an error otherwise;
- the station repeats its request as a keep-alive, still carrying the hint:
  repeats of the same VSI and direction are the same event, answered with its
  outcome, until the VSI is de-associated, changes direction or goes silent for
  ``forget_after_s``. A failed event is not remembered: the station's next try
  is a new attempt.

Bounded state: at most ``max_stations`` stations and ``max_vsis`` VSIs; beyond,
requests are answered "no resources" (VSIs) or ignored (stations) and counted.

    r = Responder({"sw-p1": port_mac}, SequenceCounter(None))
    step = r.receive("sw-p1", raw_frame, now)     # step.frames to send, step.events to convert
    step = r.resolved(step.events[0], VdpError.OK, now)
"""

from __future__ import annotations

import secrets
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from xfer.errors import FrameError
from xfer.vdp import frame as f
from xfer.vdp.sequence import SequenceCounter

# 802.1Qbg ECP defaults, as lldpad's ecprte=14 / ecpretries=3: 10 * 2^14 µs between tries.
ACK_TIMEOUT_S = 10 * 2**14 / 1e6
RETRIES = 3
# A station's keep-alive comes every 10 * 2^vdprka µs (~10.5 s with lldpad's 20); forget
# a VSI only after several missed ones.
FORGET_AFTER_S = 60.0
# A retransmission of an ECP request comes within (1 + retries) ack timeouts; one with the
# same sequence number and bytes later than this is a new request (the station restarted).
DUPLICATE_WINDOW_S = 5.0
MAX_STATIONS = 1024
MAX_VSIS = 4096
# Messages one station may have waiting for the manager at once; beyond, "no resources"
# (a host migrates a few VMs at a time; a flood of hints is not a migration).
MAX_PENDING_PER_STATION = 64

StationKey = tuple[str, bytes]              # (port, station MAC)
VsiKey = tuple[str, bytes, bytes]           # (port, station MAC, VSI ID)


@dataclass(frozen=True, eq=False)
class Event:
    """A migration hint heard from a station: what the converter turns into a message.

    ``id`` stays the same for every send of this event (copies are one message).
    """

    indication: str                 # "starting" | "not-running"
    direction: str                  # "in" | "out"
    port: str
    station: bytes
    vsi: f.VsiTlv
    id: str

    @property
    def key(self) -> VsiKey:
        return (self.port, self.station, self.vsi.vsi_id)


@dataclass
class Step:
    """What one input produced: frames to transmit, events to convert, lines to log."""

    frames: list[tuple[str, bytes]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    notes: list[dict[str, Any]] = field(default_factory=list)

    def extend(self, other: Step) -> None:
        self.frames += other.frames
        self.events += other.events
        self.notes += other.notes


@dataclass
class _InFlight:
    seq: int
    data: bytes
    sent_at: float
    tries: int
    vsi_id: bytes


@dataclass
class _Station:
    port: str
    mac: bytes
    last_seen: float
    rx_seq: int | None = None
    rx_bytes: bytes = b""
    rx_at: float = 0.0
    queue: deque[f.VsiTlv] = field(default_factory=deque)
    inflight: _InFlight | None = None


@dataclass
class _Vsi:
    indication: str | None
    event: Event | None
    last_seen: float
    status: int | None = None                # error code once known; None while pending
    parked: f.VsiTlv | None = None           # the latest request waiting for the outcome


def classify(vsi: f.VsiTlv) -> tuple[str, str] | None:
    """(indication, direction) of a request's migration hint, or None.

    >>> v = f.VsiTlv(f.Mode.DEASSOC, f.STATUS_S, 1, 1, 5, bytes(16), 1, (f.FilterEntry(0),))
    >>> classify(v)
    ('not-running', 'out')
    """
    if vsi.mode == f.Mode.ASSOC and vsi.migrating_in:
        return ("starting", "in")
    if vsi.mode in (f.Mode.ASSOC, f.Mode.DEASSOC) and vsi.suspended:
        return ("not-running", "out")
    return None


class Responder:
    """ECP/VDP bridge role for the given ports (name -> the port's own MAC)."""

    def __init__(self, ports: Mapping[str, bytes], sequence: SequenceCounter, *,
                 ack_timeout_s: float = ACK_TIMEOUT_S, retries: int = RETRIES,
                 forget_after_s: float = FORGET_AFTER_S, max_stations: int = MAX_STATIONS,
                 max_vsis: int = MAX_VSIS, make_id: Callable[[], str] | None = None) -> None:
        self.ports = dict(ports)
        self.sequence = sequence
        self.ack_timeout_s = ack_timeout_s
        self.retries = retries
        self.forget_after_s = forget_after_s
        self.max_stations = max_stations
        self.max_vsis = max_vsis
        self.make_id = make_id or (lambda: "vdp-" + secrets.token_hex(8))
        self.counters: Counter[str] = Counter()
        self._stations: dict[StationKey, _Station] = {}
        self._vsis: dict[VsiKey, _Vsi] = {}

    # --- input -------------------------------------------------------------------------

    def receive(self, port: str, raw: bytes, now: float) -> Step:
        """One frame received on ``port``. Malformed frames are counted and ignored."""
        step = Step()
        self.counters["frames"] += 1
        if port not in self.ports:
            self.counters["ignored:unknown-port"] += 1
            return step
        try:
            got = f.decode(raw)
        except FrameError as exc:
            self.counters["malformed"] += 1
            self.counters[f"malformed:{exc.reason}"] += 1
            step.notes.append({"vdp": "malformed", "port": port, "reason": exc.reason, "error": str(exc),
                               "count": self.counters["malformed"]})
            return step
        if not got.dst[0] & 1 and got.dst != self.ports[port]:
            self.counters["ignored:not-ours"] += 1
            return step
        station = self._station(port, got.src, now)
        if station is None:
            self.counters["ignored:too-many-stations"] += 1
            return step
        if got.frame.op == f.Op.ACK:
            self._acked(station, got.frame.seq, now, step)
            return step
        self.counters["requests"] += 1
        # To the group address, as lldpad's bridge role does: a station may filter unicast to others.
        ack = f.encode(f.NEAREST_BRIDGE, self.ports[port], f.EcpFrame(f.Op.ACK, got.frame.seq))
        step.frames.append((port, ack))
        self.counters["acks-sent"] += 1
        body = bytes(raw[f.ETH_HEADER:])
        if (station.rx_seq == got.frame.seq and station.rx_bytes == body
                and now - station.rx_at <= DUPLICATE_WINDOW_S):
            self.counters["ecp-retransmissions"] += 1
            return step
        station.rx_seq, station.rx_bytes, station.rx_at = got.frame.seq, body, now
        for vsi in got.frame.vsis:
            self._request(station, vsi, now, step)
        return step

    def _station(self, port: str, mac: bytes, now: float) -> _Station | None:
        key = (port, mac)
        station = self._stations.get(key)
        if station is None:
            if len(self._stations) >= self.max_stations:
                return None
            station = self._stations[key] = _Station(port, mac, now)
        station.last_seen = now
        return station

    def _request(self, station: _Station, vsi: f.VsiTlv, now: float, step: Step) -> None:
        key: VsiKey = (station.port, station.mac, vsi.vsi_id)
        if vsi.migrating_in and vsi.suspended:
            self.counters["bad-hints"] += 1
            step.notes.append({"vdp": "refused", "vsi": vsi.vsi_text, "reason": "both M and S bits set"})
            self._vsis.pop(key, None)
            self._answer(station, vsi.response(f.VdpError.BAD_FORMAT, hard=True), now, step)
            return
        hint = classify(vsi)
        rec = self._vsis.get(key)
        if hint is None:
            # No migration hint: nothing to convert; the association is simply granted.
            if vsi.mode == f.Mode.DEASSOC:
                self._vsis.pop(key, None)
            elif rec is not None or self._room():
                self._vsis[key] = _Vsi(None, None, now, status=f.VdpError.OK)
            self._answer(station, vsi.response(f.VdpError.OK), now, step)
            return
        if rec is not None and rec.indication == hint[0]:
            self.counters["repeats"] += 1
            rec.last_seen = now
            if rec.status is None:
                rec.parked = vsi
            else:
                self._answer(station, vsi.response(rec.status), now, step)
            return
        if rec is None and not self._room():
            self.counters["refused:too-many-vsis"] += 1
            self._answer(station, vsi.response(f.VdpError.NO_RESOURCES), now, step)
            return
        if self._pending(station) >= MAX_PENDING_PER_STATION:
            self.counters["refused:too-many-pending"] += 1
            self._answer(station, vsi.response(f.VdpError.NO_RESOURCES), now, step)
            return
        event = Event(hint[0], hint[1], station.port, station.mac, vsi, self.make_id())
        self._vsis[key] = _Vsi(hint[0], event, now, parked=vsi)
        self.counters["events"] += 1
        step.events.append(event)

    def _room(self) -> bool:
        return len(self._vsis) < self.max_vsis

    def _pending(self, station: _Station) -> int:
        """Events of this station waiting for the manager (hinted requests only: rare)."""
        return sum(1 for (port, mac, _), r in self._vsis.items()
                   if r.status is None and port == station.port and mac == station.mac)

    def resolved(self, event: Event, error: int, now: float, hard: bool = False) -> Step:
        """The outcome of ``event``: answer the request(s) waiting for it."""
        step = Step()
        rec = self._vsis.get(event.key)
        if rec is None or rec.event is not event:
            # The VSI changed meanwhile (de-associated, other direction): that request was answered.
            self.counters["outcomes-stale"] += 1
            return step
        rec.status = error
        self.counters["outcomes-ok" if error == f.VdpError.OK else "outcomes-failed"] += 1
        station = self._stations.get((event.port, event.station))
        if rec.parked is not None and station is not None:
            self._answer(station, rec.parked.response(error, hard=hard), now, step)
        rec.parked = None
        if error != f.VdpError.OK:
            del self._vsis[event.key]
        return step

    # --- output ------------------------------------------------------------------------

    def _answer(self, station: _Station, response: f.VsiTlv, now: float, step: Step) -> None:
        # A response still queued for the same VSI is superseded: the station needs the latest.
        for i, queued in enumerate(station.queue):
            if queued.vsi_id == response.vsi_id:
                del station.queue[i]
                self.counters["responses-superseded"] += 1
                break
        station.queue.append(response)
        self._pump(station, now, step)

    def _pump(self, station: _Station, now: float, step: Step) -> None:
        if station.inflight is not None or not station.queue:
            return
        response = station.queue.popleft()
        seq = self.sequence.next()
        request = f.EcpFrame(f.Op.REQUEST, seq, (response,))
        data = f.encode(f.NEAREST_BRIDGE, self.ports[station.port], request)
        station.inflight = _InFlight(seq, data, now, 1, response.vsi_id)
        self.counters["responses-sent"] += 1
        step.frames.append((station.port, data))

    def _acked(self, station: _Station, seq: int, now: float, step: Step) -> None:
        inflight = station.inflight
        if inflight is None or inflight.seq != seq:
            self.counters["acks-stray"] += 1
            return
        self.counters["acks-received"] += 1
        station.inflight = None
        self._pump(station, now, step)

    # --- time --------------------------------------------------------------------------

    def poll(self, now: float) -> Step:
        """Retransmit unacknowledged responses, forget silent VSIs and idle stations."""
        step = Step()
        for station in list(self._stations.values()):
            inflight = station.inflight
            if inflight is not None and now - inflight.sent_at >= self.ack_timeout_s:
                if inflight.tries <= self.retries:
                    inflight.tries += 1
                    inflight.sent_at = now
                    self.counters["retransmissions"] += 1
                    step.frames.append((station.port, inflight.data))
                else:
                    self.counters["responses-unacked"] += 1
                    step.notes.append({"vdp": "unacked", "port": station.port,
                                       "station": station.mac.hex(":"), "seq": inflight.seq})
                    station.inflight = None
                    self._pump(station, now, step)
        for key, rec in list(self._vsis.items()):
            if rec.status is not None and now - rec.last_seen > self.forget_after_s:
                del self._vsis[key]
                self.counters["vsis-forgotten"] += 1
        busy = {(k[0], k[1]) for k in self._vsis}
        for skey, station in list(self._stations.items()):
            if (skey not in busy and station.inflight is None and not station.queue
                    and now - station.last_seen > self.forget_after_s):
                del self._stations[skey]
        return step

    def next_deadline(self) -> float | None:
        """When ``poll`` has work next (None: nothing pending)."""
        times = [s.inflight.sent_at + self.ack_timeout_s for s in self._stations.values()
                 if s.inflight is not None]
        times += [r.last_seen + self.forget_after_s for r in self._vsis.values() if r.status is not None]
        times += [s.last_seen + self.forget_after_s for s in self._stations.values()]
        return min(times) if times else None

    def snapshot(self) -> dict[str, Any]:
        """Counters and sizes, for logs and tests."""
        return {"counters": dict(sorted(self.counters.items())), "stations": len(self._stations),
                "vsis": len(self._vsis),
                "pending": sum(1 for r in self._vsis.values() if r.status is None)}


__all__ = ["Event", "Responder", "Step", "classify"]
