"""The migration message: what the hypervisor hook, the CLI and the agents send, and the
manager receives, as an HTTP JSON body or one UDP datagram::

    {"vm", "indication": "not-running"|"starting"|"abort"|"migrating", "direction": "out"|"in",
     "source", "destination", "kinds"?, "mode"?, "id"?}

``"indication": "migrating"`` ("out", the VM still runs, its migration started) starts
pre-copy (``xfer.manager.precopy``); "not-running" then moves only the last delta.
``"indication": "abort"`` is the HTTP (and UDP) form of ``xfer migrate --abort VM``:
the hook sends it after cancelling a migration. Over UDP the same JSON travels as
one datagram, to the manager or to a multicast group it joins; the manager answers
the sender with one datagram holding the report (best effort: UDP may lose it).

"out" names its source; its destination may be "" (a libvirt source does not know
it): then the state can only go to the store, and "in" — which names its
destination — completes it. Copies of a message (same ``id``; without an id, the
same datagram within ``DUPLICATE_WINDOW_S``) are one message: ``dedupe_key``.

    msg = parse({"vm": "vm1", "indication": "not-running", "direction": "out",
                 "source": "hv1", "destination": "hv2"})
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from xfer.errors import UsageError
from xfer.model import Kind, parse_kinds

INDICATIONS = ("not-running", "starting", "abort", "migrating")
MAX_DATAGRAM = 8192
# Copies of a datagram without an id arrive within milliseconds; a genuinely new message
# with the same content (the VM came back and leaves again) cannot come this soon.
DUPLICATE_WINDOW_S = 10.0
# How long a message id is remembered: a sender's resend comes within its own timeout.
ID_MEMORY_S = 600.0
_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class Mode(StrEnum):
    """How a migration moves its bundles (``xfer.manager.modes``)."""

    RELAY = "relay"   # the manager exports, holds the bytes, imports
    PULL = "pull"     # each destination device fetches from its source device
    PUSH = "push"     # each source device sends to its destination devices
    STORE = "store"   # "out" deposits into the manager's store, "in" collects

    @classmethod
    def of(cls, text: str) -> Mode:
        """The mode named ``text``; UsageError naming the choices otherwise.

        >>> Mode.of("pull")
        <Mode.PULL: 'pull'>
        """
        try:
            return cls(text)
        except ValueError:
            raise UsageError(f"mode must be one of {', '.join(cls)}, not {text!r}") from None


@dataclass(frozen=True)
class MigrationMessage:
    """One migration message; ``to_json()`` is the body the manager receives.

    >>> MigrationMessage("vm1", "not-running", "out", "hv1", "hv2").to_json()["direction"]
    'out'
    """

    vm: str
    indication: str
    direction: str
    source: str
    destination: str
    kinds: tuple[str, ...] | None = None
    mode: Mode | None = None
    # Optional: copies of one message carry the same id, so the manager acts on it once
    # (a datagram may arrive twice, and a sender may resend when no answer came).
    id: str | None = None

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        if self.kinds is None:
            del body["kinds"]
        else:
            body["kinds"] = list(self.kinds)
        for key in ("mode", "id"):
            if body[key] is None:
                del body[key]
        return body


def messages_for(vm: str, source: str, destination: str, kinds: tuple[str, ...] | None = None,
                 mode: Mode | str | None = None) -> list[MigrationMessage]:
    """The messages to send inside the window, in order.

    "out" always; "in" as well in ``store`` mode, where the destination devices
    collect only on "in" and must have done so before the guest resumes (with a
    hook that owns the window nobody else can send "in" in time). A source that
    does not know the destination sends "out" only: the manager keeps the state
    in its store until the destination server sends "in" naming itself.

    >>> [m.direction for m in messages_for("vm1", "hv1", "hv2", mode="store")]
    ['out', 'in']
    """
    mode = None if mode is None else Mode.of(mode)
    out = [MigrationMessage(vm, "not-running", "out", source, destination, kinds, mode)]
    if mode == "store" and destination:
        out.append(MigrationMessage(vm, "starting", "in", source, destination, kinds, mode))
    return out


Message = MigrationMessage


def parse(body: Any) -> Message:
    """Check a decoded JSON message; UsageError names the defect.

    >>> parse({"vm": "vm1", "indication": "abort", "direction": "out", "source": "", "destination": ""}).vm
    'vm1'
    """
    if not isinstance(body, dict):
        raise UsageError("migration message must be a JSON object")
    vm = body.get("vm")
    if not isinstance(vm, str) or not vm:
        raise UsageError("migration message names no vm")
    indication = body.get("indication")
    if indication not in INDICATIONS:
        raise UsageError(f"indication must be one of {', '.join(INDICATIONS)}, not {indication!r}")
    direction = body.get("direction", "out")
    if direction not in ("out", "in"):
        raise UsageError(f"direction must be out or in, not {direction!r}")
    source, destination = str(body.get("source") or ""), str(body.get("destination") or "")
    mode = body.get("mode")
    if mode is not None:
        mode = Mode.of(str(mode))
    if indication == "migrating" and (direction != "out" or not destination):
        # the VM still runs at its source: its state is staged at a known destination
        raise UsageError("a \"migrating\" message goes \"out\" and names its destination server")
    if indication != "abort":
        if direction == "out" and not source:
            raise UsageError("an \"out\" message must name its source server")
        if direction == "in" and not destination:
            raise UsageError("an \"in\" message must name its destination server")
        if direction == "out" and not destination and mode not in (None, "store"):
            # A libvirt source does not know the destination: only the store can take the state.
            raise UsageError(f"an \"out\" without destination can only deposit into the store "
                             f"(mode store), not run mode {mode}")
    ident = body.get("id")
    if ident is not None and (not isinstance(ident, str) or not _ID.fullmatch(ident)):
        raise UsageError("id must be 1-64 characters of letters, digits and ._:-")
    kinds = body.get("kinds")
    if kinds is not None:
        if not isinstance(kinds, list):
            raise UsageError("kinds must be a list")
        kinds = tuple(k.value for k in parse_kinds([str(k) for k in kinds]))
    return Message(vm, indication, direction, source, destination, kinds, mode, ident)


def dedupe_key(msg: Message, transport: str) -> tuple[str, float] | None:
    """What makes copies of a message one message, and how long to remember it; None: every
    copy counts (HTTP without an id: TCP does not duplicate, and a resend is deliberate).

    >>> dedupe_key(parse({"vm": "v", "indication": "abort", "id": "a1"}), "http")
    ('id:a1', 600.0)
    """
    if msg.id:
        return f"id:{msg.id}", ID_MEMORY_S
    if transport == "http":
        return None
    return "datagram:" + json.dumps(msg.to_json(), sort_keys=True), DUPLICATE_WINDOW_S


def kinds_of(msg: Message) -> tuple[Kind, ...] | None:
    """The kinds a message asks for, or None (every kind the plan finds)."""
    return tuple(Kind(k) for k in msg.kinds) if msg.kinds else None


def encode(msg: Message | dict[str, Any]) -> bytes:
    """The JSON bytes of a message (HTTP body or datagram)."""
    body = msg.to_json() if isinstance(msg, MigrationMessage) else msg
    data = json.dumps(body, separators=(",", ":")).encode()
    if len(data) > MAX_DATAGRAM:
        raise UsageError("migration message too large")
    return data
