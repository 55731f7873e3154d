"""Per-VM index of conntrack entries, fed by events, with a change log. No sockets here.

Each entry is kept as a ctnetlink message in the kernel's own dump form (the
bytes of the dump, or of the events, merged), so exporting a VM is a
concatenation of its messages into a ``Stream`` — O(the VM's entries), no walk
of the host's table — and the bundle section format is unchanged.

Keys are the original tuple and zone as the kernel encodes them (dumps and
events use the same encoder). Ownership is the rule of ``transfer``: an entry
is a VM's when the source address of its original or reply tuple is one of the
VM's addresses (an entry between two tracked VMs is in both).

The change log: every change (new, updated, destroyed) takes the next sequence
number; ``changes(vm, cursor)`` returns what changed after ``cursor`` — the
entries as they are now and the destroyed ones — walking only those changes.
A cursor names the index's generation: a cursor from another generation (an
agent restart) or from before the oldest kept tombstone raises CursorExpired and
the caller copies the VM whole again. There is never a silent gap:

- lost events (ENOBUFS): the feeder dumps again and ``resync`` logs every
  difference as changes;
- entries only ever seen in a dump may be silent (created before
  ``nf_conntrack_events`` was 1, see ``events``): they are "suspects" until an
  event names them, and ``suspects(vm)`` lists them for a re-read.

>>> idx = ConntrackIndex()
>>> idx.track(vm, seed)                               # doctest: +SKIP
>>> cur = idx.cursor(vm.id); idx.apply(events)        # doctest: +SKIP
>>> ch = idx.changes(vm.id, cur)                      # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import os
import struct
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from xfer.conntrack import constants as c
from xfer.conntrack import stream, wire
from xfer.conntrack.events import Event, EventKind
from xfer.conntrack.stream import HDR, Stream
from xfer.errors import XferError
from xfer.model import VmIdentity

_NLA = struct.Struct("=HH")
_HEAD = struct.Struct("=IHHIIBBH")
# Attributes that change without the entry changing: left out of "did it change".
_VOLATILE = frozenset({c.CTA_TIMEOUT, c.CTA_USE, c.CTA_COUNTERS_ORIG, c.CTA_COUNTERS_REPLY,
                       c.CTA_TIMESTAMP})
# A VM's tombstones kept for cursors; older ones are dropped and older cursors expire.
MAX_TOMBSTONES = 200_000


class CursorExpired(XferError):
    """The change log no longer reaches back to this cursor: copy the VM whole."""


class Changes(NamedTuple):
    """What changed for a VM after a cursor."""

    upserts: Stream      # entries as they are now (new or updated)
    deletes: Stream      # destroyed entries, as last known
    cursor: str          # where the next ``changes`` call starts


def entry_key(message: bytes, pos: int = 0) -> bytes:
    """Family + original tuple + zone of the message at ``pos``: the entry's identity."""
    end = pos + _HEAD.unpack_from(message, pos)[0]
    at = pos + HDR
    orig = reply = zone = b""
    while at + 4 <= end:
        length, kind = _NLA.unpack_from(message, at)
        if length < 4:
            break
        nxt = at + ((length + 3) & ~3)
        kind &= c.NLA_TYPE_MASK
        if kind == c.CTA_TUPLE_ORIG:
            orig = message[at:nxt]
        elif kind == c.CTA_TUPLE_REPLY:
            reply = message[at:nxt]
        elif kind == c.CTA_ZONE:
            zone = message[at:nxt]
            break
        elif reply and orig:
            break  # the kernel puts the zone right after the tuples
        at = nxt
    return bytes([message[pos + 16]]) + orig + zone


def normalized(message: bytes) -> bytes:
    """An event message in dump form: type CT_NEW, no flags, sequence or port id."""
    length, _t, _f, _s, _p, family, _v, _r = _HEAD.unpack_from(message)
    return _HEAD.pack(length, c.MSG_CT_NEW, 0, 0, 0, family, 0, 0) + message[HDR:length]


def merged(old: bytes, event: bytes) -> bytes:
    """``old`` with every top-level attribute the event carries replaced or added.

    NOTE: update events carry only what changed (protoinfo only on a state change,
    labels only when they change...), so an event alone is not the entry.
    """
    new = wire.split(event[HDR:_HEAD.unpack_from(event)[0]])
    parts: list[bytes] = []
    for kind, raw in wire.split(old[HDR:_HEAD.unpack_from(old)[0]]).items():
        parts.append(new.pop(kind, raw))
    parts.extend(new.values())
    body = b"".join(parts)
    return _HEAD.pack(HDR + len(body), c.MSG_CT_NEW, 0, 0, 0, old[16], 0, 0) + body


def _stable(message: bytes) -> bytes:
    """The message without what changes by itself (timeout, use count, counters)."""
    attrs = wire.split(message[HDR:_HEAD.unpack_from(message)[0]])
    return b"".join(raw for kind, raw in attrs.items() if kind not in _VOLATILE)


@dataclass
class _Vm:
    identity: VmIdentity
    entries: dict[bytes, bytes] = field(default_factory=dict)          # key -> message
    tombstones: dict[bytes, bytes] = field(default_factory=dict)       # key -> last message
    log: OrderedDict[bytes, int] = field(default_factory=OrderedDict)  # key -> last change seq
    suspects: set[bytes] = field(default_factory=set)
    floor: int = 0  # cursors below this reach past dropped tombstones


class ConntrackIndex:
    """The tracked VMs' entries, their change log and cursors (see the module docstring).

    ``trust_seed``: every entry in the table was created while
    ``nf_conntrack_events`` was 1 (set at boot), so dumped entries are not suspects.
    """

    def __init__(self, *, trust_seed: bool = False, max_tombstones: int = MAX_TOMBSTONES) -> None:
        self.generation = os.urandom(6).hex()
        self.trust_seed = trust_seed
        self.max_tombstones = max_tombstones
        self._vms: dict[str, _Vm] = {}
        self._owner: dict[bytes, list[_Vm]] = {}  # packed address -> VMs
        self._seq = itertools.count(1)
        self.last_seq = 0
        self.events_applied = 0
        self.resyncs = 0

    # --- tracking -----------------------------------------------------------------

    def addresses(self) -> list[bytes]:
        """Every tracked packed address (for the event filter)."""
        return list(self._owner)

    def tracked(self) -> list[str]:
        return list(self._vms)

    def track(self, vm: VmIdentity, seed: Stream) -> None:
        """Start tracking ``vm`` with the entries of a dump made after its events were
        subscribed (events already queued then are applied after this)."""
        state = _Vm(vm)
        self._vms[vm.id] = state
        for addr in vm.packed_addresses:
            self._owner.setdefault(addr, []).append(state)
        self._load(state, seed, initial=True)

    def untrack(self, vm_id: str) -> None:
        state = self._vms.pop(vm_id, None)
        if state is None:
            return
        for addr in state.identity.packed_addresses:
            owners = [s for s in self._owner.get(addr, []) if s is not state]
            if owners:
                self._owner[addr] = owners
            else:
                self._owner.pop(addr, None)

    def __contains__(self, vm_id: object) -> bool:
        return vm_id in self._vms

    def _state(self, vm_id: str) -> _Vm:
        try:
            return self._vms[vm_id]
        except KeyError:
            raise XferError(f"VM {vm_id} is not tracked by the conntrack index") from None

    def _owners(self, message: bytes) -> list[_Vm]:
        blob = message[HDR:_HEAD.unpack_from(message)[0]]
        try:
            orig_src, reply_src, _ = wire.endpoint_sources(blob)
        except (ValueError, KeyError, IndexError, struct.error):
            return []
        owners = self._owner.get(orig_src, [])
        if reply_src != orig_src:
            more = self._owner.get(reply_src)
            if more:
                owners = owners + [s for s in more if s not in owners]
        return owners

    def _log(self, state: _Vm, key: bytes) -> None:
        seq = next(self._seq)
        self.last_seq = seq
        state.log[key] = seq
        state.log.move_to_end(key)

    def _load(self, state: _Vm, dump: Stream, *, initial: bool) -> None:
        """Make ``state`` hold exactly the VM's entries of ``dump``, logging differences."""
        payload = dump.payload
        fresh: dict[bytes, bytes] = {}
        for off in dump.offsets:
            msg = payload[off:off + stream.length_at(payload, off)]
            if state in self._owners(msg):
                fresh[entry_key(msg)] = msg
        old = state.entries
        for key, msg in fresh.items():
            before = old.get(key)
            if before is None or _stable(before) != _stable(msg):
                self._log(state, key)
                state.tombstones.pop(key, None)
            if before is None and not self.trust_seed:
                state.suspects.add(key)
        for key in old.keys() - fresh.keys():
            state.tombstones[key] = old[key]
            state.suspects.discard(key)
            self._log(state, key)
        state.entries = fresh
        self._trim(state)

    def resync(self, dump: Stream, vm_ids: Iterable[str] | None = None) -> None:
        """Replace the entries of the VMs (default: all) with a fresh dump's, logging
        every difference (after lost events or on request)."""
        self.resyncs += 1
        for vm_id in list(vm_ids) if vm_ids is not None else list(self._vms):
            self._load(self._state(vm_id), dump, initial=False)

    # --- events -----------------------------------------------------------------------

    def apply(self, events: Iterable[Event]) -> int:
        """Apply events oldest first; returns how many concerned a tracked VM."""
        used = 0
        for ev in events:
            owners = self._owners(ev.message)
            if not owners:
                continue
            used += 1
            key = entry_key(ev.message)
            for state in owners:
                state.suspects.discard(key)
                if ev.kind == EventKind.DESTROY:
                    gone = state.entries.pop(key, None)
                    if gone is None:
                        continue
                    state.tombstones[key] = gone
                else:
                    before = state.entries.get(key)
                    state.entries[key] = (normalized(ev.message) if before is None or ev.kind == EventKind.NEW
                                          else merged(before, ev.message))
                    state.tombstones.pop(key, None)
                self._log(state, key)
                if len(state.tombstones) > self.max_tombstones:
                    self._trim(state)
        self.events_applied += used
        return used

    def _trim(self, state: _Vm) -> None:
        if len(state.tombstones) <= self.max_tombstones:
            return
        for key, seq in list(state.log.items()):
            if len(state.tombstones) <= self.max_tombstones:
                break
            if key in state.tombstones:
                del state.tombstones[key]
                del state.log[key]
                state.floor = max(state.floor, seq)

    # --- reading ------------------------------------------------------------------------

    def count(self, vm_id: str) -> int:
        return len(self._state(vm_id).entries)

    def export(self, vm_id: str) -> Stream:
        """The VM's entries now, as a stream of dump messages (O(its entries))."""
        return stream.from_parts(list(self._state(vm_id).entries.values()))

    def cursor(self, vm_id: str | None = None) -> str:
        """A cursor at the present: ``changes`` from it returns what happens next."""
        if vm_id is not None:
            self._state(vm_id)
        return f"{self.generation}:{self.last_seq}"

    def _parse_cursor(self, state: _Vm, cursor: str) -> int:
        gen, _, seq = cursor.partition(":")
        if gen != self.generation or not seq.isdigit():
            raise CursorExpired(f"cursor {cursor!r} is from another index (agent restarted?); "
                                "copy the VM whole")
        at = int(seq)
        if at < state.floor:
            raise CursorExpired(f"cursor {cursor!r} is older than the change log kept for VM "
                                f"{state.identity.id}; copy the VM whole")
        return at

    def changes(self, vm_id: str, cursor: str) -> Changes:
        """What changed for the VM after ``cursor`` (O(the changes), newest first walk)."""
        state = self._state(vm_id)
        at = self._parse_cursor(state, cursor)
        ups: list[bytes] = []
        dels: list[bytes] = []
        for key in reversed(state.log):
            if state.log[key] <= at:
                break
            msg = state.entries.get(key)
            if msg is not None:
                ups.append(msg)
            else:
                dels.append(state.tombstones[key])
        ups.reverse()
        dels.reverse()
        return Changes(stream.from_parts(ups), stream.from_parts(dels), self.cursor())

    def suspects(self, vm_id: str) -> list[bytes]:
        """Messages of the VM's entries known only from a dump (maybe silent, see above)."""
        state = self._state(vm_id)
        return [state.entries[k] for k in state.suspects if k in state.entries]

    def confirm(self, vm_id: str, found: Stream, asked: Iterable[bytes]) -> None:
        """Apply a re-read of suspects: ``found`` holds those still in the kernel (as it
        answered); every other asked one is gone. Changes are logged."""
        state = self._state(vm_id)
        payload = found.payload
        now: dict[bytes, bytes] = {}
        for off in found.offsets:
            answer = payload[off:off + stream.length_at(payload, off)]
            now[entry_key(answer)] = normalized(answer)
        for old in asked:
            key = entry_key(old)
            if key not in state.entries:
                continue
            msg = now.get(key)
            if msg is None:
                state.tombstones[key] = state.entries.pop(key)
                state.suspects.discard(key)
                self._log(state, key)
            elif _stable(msg) != _stable(state.entries[key]):
                state.entries[key] = msg
                self._log(state, key)
