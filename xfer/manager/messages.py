"""Migration messages as the manager receives them: HTTP JSON bodies and UDP datagrams.

The message is the hypervisor hook's (``xfer.hypervisor.notify.MigrationMessage``)::

    {"vm", "indication": "not-running"|"starting"|"abort", "direction": "out"|"in",
     "source", "destination", "kinds"?, "mode"?}

``"indication": "abort"`` is the HTTP (and UDP) form of ``xfer migrate --abort VM``:
the hook sends it after cancelling a migration. Over UDP the same JSON travels as
one datagram, to the manager or to a multicast group it joins; the manager answers
the sender with one datagram holding the report (best effort: UDP may lose it).

    msg = parse({"vm": "vm1", "indication": "not-running", "direction": "out",
                 "source": "hv1", "destination": "hv2"})
"""

from __future__ import annotations

import json
from typing import Any

from xfer.errors import UsageError
from xfer.hypervisor.notify import MigrationMessage
from xfer.manager.modes import MODES
from xfer.model import Kind, parse_kinds

Message = MigrationMessage
INDICATIONS = ("not-running", "starting", "abort")
MAX_DATAGRAM = 8192


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
    if indication != "abort" and (not source or not destination):
        # NOTE: libvirt sources do not know the destination (docs/hypervisor.md); not resolved here.
        raise UsageError("migration message needs both source and destination servers")
    mode = body.get("mode")
    if mode is not None and mode not in MODES:
        raise UsageError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    kinds = body.get("kinds")
    if kinds is not None:
        if not isinstance(kinds, list):
            raise UsageError("kinds must be a list")
        kinds = tuple(k.value for k in parse_kinds([str(k) for k in kinds]))
    return Message(vm, indication, direction, source, destination, kinds, mode)


def kinds_of(msg: Message) -> tuple[Kind, ...] | None:
    """The kinds a message asks for, or None (every kind the plan finds)."""
    return tuple(Kind(k) for k in msg.kinds) if msg.kinds else None


def decode_datagram(data: bytes) -> Message:
    try:
        body = json.loads(data)
    except ValueError:
        raise UsageError("datagram is not JSON") from None
    return parse(body)


def encode(msg: Message | dict[str, Any]) -> bytes:
    """The JSON bytes of a message (HTTP body or datagram)."""
    body = msg.to_json() if isinstance(msg, MigrationMessage) else msg
    data = json.dumps(body, separators=(",", ":")).encode()
    if len(data) > MAX_DATAGRAM:
        raise UsageError("migration message too large")
    return data
