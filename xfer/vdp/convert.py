"""VDP events into migration messages, and the messages to the manager (HTTPS or one datagram).

The message is the project's one migration message (the hook's, ``xfer notify``'s):

- ASSOCIATE with the M-bit: ``{"vm", "indication": "starting", "direction": "in",
  "destination": SERVER, "source": ""}`` — the VM arrives on this switch's port;
- ASSOCIATE or DEASSOCIATE with the S-bit: ``{"vm", "indication": "not-running",
  "direction": "out", "source": SERVER, "destination": ""}`` — it leaves. The
  switch does not know where to: the manager keeps the state in its store until
  the destination's "in" (docs/manager.md).

The VM is the inventory entry whose ``vsi`` is the VSI's UUID or whose MAC is in
the VSI's filter info, else its first MAC (else the VSI ID). The event's id
travels as the message id, so a resend is acted on once.

The message, its check and encoding and the HTTP and UDP senders are the daemons'
shared ones (``xfer.net``), imported here and only here in this package.

    namer = Namer(Path("/etc/xfer/inventory.toml"))
    msg = message_for(event, "hv7", namer)
    outcome = await HttpSender(url, tls).send(msg)
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Protocol

from xfer.errors import MigrationMessageError, XferError
from xfer.model import inventory_path, inventory_vsis, load_inventory
from xfer.net import message as messages
from xfer.net.message import MigrationMessage
from xfer.net.notify import ManagerLink, check_url, send_udp
from xfer.vdp.frame import VdpError
from xfer.vdp.responder import Event

# The station deletes a VSI left unanswered for ~17 s (lldpad's defaults): answer well before.
DEFAULT_TIMEOUT_S = 10.0


class Namer:
    """VM names from the inventory, re-read when its file changes (cheap ``stat`` per event)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = inventory_path(path)
        self._explicit = path
        self._stamp: tuple[int, int] | None = None
        self._by_mac: dict[str, str] = {}
        self._by_vsi: dict[str, str] = {}

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = (0, 0)
        if stamp == self._stamp:
            return
        inventory = load_inventory(self._explicit)
        self._by_mac = {mac: name for name, vm in inventory.items() for mac in vm.macs}
        self._by_vsi = inventory_vsis(self._explicit)
        self._stamp = stamp

    def name(self, event: Event) -> str:
        """The VM's name: inventory by VSI UUID, then by MAC; else its MAC, else its VSI ID."""
        self._refresh()
        vsi = event.vsi
        if vsi.uuid and vsi.uuid in self._by_vsi:
            return self._by_vsi[vsi.uuid]
        for mac in vsi.macs:
            if mac in self._by_mac:
                return self._by_mac[mac]
        return vsi.macs[0] if vsi.macs else vsi.vsi_text


def message_for(event: Event, server: str, namer: Namer) -> MigrationMessage:
    """The migration message of one VDP event at switch-facing server ``server``.

    >>> message_for(event, "hv7", namer).to_json()["direction"]     # doctest: +SKIP
    'in'
    """
    vm = namer.name(event)
    if event.direction == "in":
        msg = MigrationMessage(vm, event.indication, "in", "", server, id=event.id)
    else:
        msg = MigrationMessage(vm, event.indication, "out", server, "", id=event.id)
    # The manager's own check: what it would refuse is refused here, with its reason.
    messages.parse(msg.to_json())
    messages.encode(msg)
    return msg


class Sender(Protocol):
    """Delivers a message; returns None when the manager took it, else the VDP error and why."""

    async def send(self, msg: MigrationMessage) -> tuple[VdpError, str] | None: ...


def _verdict(exc: XferError) -> tuple[VdpError, str]:
    """Refused (the manager answered no) or unreachable (no answer): two different codes.

    The senders raise one error type for both; the text is how they differ (``answered``
    is in every refusal they report).
    """
    text = str(exc)
    return (VdpError.OTHER if " answered" in text else VdpError.NO_MANAGER), text


class HttpSender:
    """POST to the manager (mutual TLS for https), one connection per message."""

    def __init__(self, url: str, ssl_context: object | None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        check_url(url)
        self.url = url
        self.ssl_context = ssl_context
        self.timeout_s = timeout_s

    async def send(self, msg: MigrationMessage) -> tuple[VdpError, str] | None:
        try:
            async with ManagerLink(self.url, self.ssl_context) as link:  # type: ignore[arg-type]
                await link.send(msg, time.monotonic() + self.timeout_s)
        except XferError as exc:
            return _verdict(exc)
        return None


class UdpSender:
    """One datagram to the manager (or its multicast group); waits for its answer."""

    def __init__(self, address: tuple[str, int], interface: str | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.address = address
        self.interface = interface
        self.timeout_s = timeout_s

    async def send(self, msg: MigrationMessage) -> tuple[VdpError, str] | None:
        try:
            await asyncio.to_thread(send_udp, self.address, msg, self.timeout_s, self.interface)
        except XferError as exc:
            return _verdict(exc)
        except (OSError, ValueError) as exc:
            return _verdict(MigrationMessageError(f"udp {self.address[0]}:{self.address[1]}: {exc}"))
        return None
