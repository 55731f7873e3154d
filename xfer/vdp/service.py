"""The VDP responder as a daemon: ports -> responder -> converter -> manager, on one event loop.

``xfer vdp serve`` runs it alone; an agent with a ``[vdp]`` section runs it beside
its API. Frames are read when the sockets are readable, the responder's timers
run from one task that sleeps until its next deadline, and each migration event
is sent to the manager on its own task (the station's keep-alives are answered
meanwhile; the response waits for the manager's answer).

Logs are JSON lines (``log``); malformed frames are logged at most once a second
per reason, with the running count. ``on_message`` gets each message as sent.

    async with VdpService(cfg, sender, on_message=print_line) as svc:
        await stopped.wait()
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from xfer.errors import XferError
from xfer.net.log import emitter
from xfer.vdp import link
from xfer.vdp.config import VdpConfig
from xfer.vdp.convert import HttpSender, Namer, Sender, UdpSender, message_for
from xfer.vdp.frame import VdpError
from xfer.vdp.responder import Event, Responder, Step
from xfer.vdp.sequence import SequenceCounter

log = logging.getLogger("xfer.vdp")
default_log = emitter("xfer.vdp")
LOG_EVERY_S = 1.0
# The timer task wakes at least this often (flushes held-back log lines).
MAX_SLEEP_S = 1.0
# Frames handled per wake-up of one port before the loop serves the others (a flood cannot
# starve the timers or the other ports).
BURST = 64


def sender_for(cfg: VdpConfig) -> Sender:
    """The configured way to the manager."""
    if cfg.udp is not None:
        return UdpSender(cfg.udp, cfg.interface, cfg.timeout_s)
    assert cfg.manager is not None
    ctx = None
    if cfg.manager.startswith("https:"):
        from xfer.net.tls import client_tls  # only where TLS is wanted: ssl setup is slow

        ctx = client_tls(cfg.ca, cfg.cert, cfg.key)
    return HttpSender(cfg.manager, ctx, cfg.timeout_s)


class VdpService:
    """Explicit ``start()``/``stop()`` (or ``async with``); nothing runs after ``stop()``."""

    def __init__(self, config: VdpConfig, sender: Sender | None = None,
                 on_message: Callable[[dict[str, Any]], None] | None = None,
                 log_line: Callable[[dict[str, Any]], None] = default_log) -> None:
        self.config = config
        self.sender = sender or sender_for(config)
        self.on_message = on_message
        # Every record also names its event as the daemons' log lines do ("vdp event", ...).
        self.log_line = lambda record: log_line({"event": f"vdp {record.get('vdp')}", **record})
        self.namer = Namer(config.inventory)
        self.responder: Responder | None = None
        self._ports: dict[str, link.Port] = {}
        self._timer: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._sends: set[asyncio.Task[None]] = set()
        self._held: dict[str, dict[str, Any]] = {}      # malformed reason -> latest unlogged note
        self._logged_at: dict[str, float] = {}

    async def __aenter__(self) -> VdpService:
        await self.start()
        return self

    async def __aexit__(self, t: type[BaseException] | None, v: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def start(self) -> None:
        """Open every port (all or none), then answer stations."""
        loop = asyncio.get_running_loop()
        try:
            for name in self.config.ports:
                self._ports[name] = link.open_port(self.config.netns, name)
        except XferError:
            self._close_ports()
            raise
        self.responder = Responder({p.name: p.mac for p in self._ports.values()},
                                   SequenceCounter(self.config.sequence_file))
        for port in self._ports.values():
            loop.add_reader(port.fileno(), self._readable, port)
        self._timer = asyncio.create_task(self._tick())
        self.log_line({"vdp": "serving", "netns": self.config.netns, "ports": list(self.config.ports),
                       "server": self.config.server,
                       "to": self.config.manager or "udp:{}:{}".format(*self.config.udp or ("", 0))})

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        for port in self._ports.values():
            loop.remove_reader(port.fileno())
        tasks = [t for t in (self._timer, *self._sends) if t is not None]
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
        self._timer = None
        self._sends.clear()
        self._flush_held(force=True)
        if self.responder is not None:
            self.log_line({"vdp": "stopped", **self.responder.snapshot()})
        self._close_ports()

    def _close_ports(self) -> None:
        for port in self._ports.values():
            port.close()
        self._ports.clear()

    # --- frames ------------------------------------------------------------------------

    def _readable(self, port: link.Port) -> None:
        assert self.responder is not None
        for _ in range(BURST):
            raw = port.recv()
            if raw is None:
                break
            self._apply(self.responder.receive(port.name, raw, time.monotonic()))
        self._wake.set()

    def _apply(self, step: Step) -> None:
        for name, data in step.frames:
            port = self._ports.get(name)
            if port is not None:
                port.send(data)
        for note in step.notes:
            self._note(note)
        for event in step.events:
            task = asyncio.create_task(self._convert(event))
            self._sends.add(task)
            task.add_done_callback(self._sends.discard)

    def _note(self, note: dict[str, Any]) -> None:
        if note.get("vdp") != "malformed":
            self.log_line(note)
            return
        reason = str(note.get("reason"))
        if time.monotonic() - self._logged_at.get(reason, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._logged_at[reason] = time.monotonic()
            self._held.pop(reason, None)
            self.log_line(note)
        else:
            self._held[reason] = note

    def _flush_held(self, force: bool = False) -> None:
        now = time.monotonic()
        for reason, note in list(self._held.items()):
            if force or now - self._logged_at.get(reason, 0.0) >= LOG_EVERY_S:
                self._logged_at[reason] = now
                del self._held[reason]
                self.log_line(note)

    # --- events ------------------------------------------------------------------------

    async def _convert(self, event: Event) -> None:
        assert self.responder is not None
        started = time.monotonic()
        record: dict[str, Any] = {"vdp": "event", "port": event.port, "station": event.station.hex(":"),
                                  "vsi": event.vsi.vsi_text, "mode": event.vsi.mode.name.lower()}
        try:
            msg = message_for(event, self.config.server, self.namer)
        except XferError as exc:
            failure: tuple[VdpError, str] | None = (VdpError.BAD_FORMAT, str(exc))
        else:
            record["message"] = msg.to_json()
            if self.on_message is not None:
                self.on_message(msg.to_json())
            try:
                # The senders keep their own deadline; this one only guards against a sender that
                # never returns, which would leave the station unanswered for good.
                failure = await asyncio.wait_for(self.sender.send(msg), self.config.timeout_s + 5)
            except TimeoutError:
                failure = (VdpError.NO_MANAGER, "no answer from the manager")
            except Exception as exc:  # a sender's bug must still answer the station
                log.exception("sending a VDP migration message failed")
                failure = (VdpError.OTHER, f"internal error: {type(exc).__name__}: {exc}")
        error, reason = failure if failure else (VdpError.OK, "")
        record.update({"status": int(error), "ms": round((time.monotonic() - started) * 1000, 1)})
        if reason:
            record["error"] = reason
        self.log_line(record)
        # A refusal is final for this request (hard); no answer at all may pass (the station retries).
        self._apply(self.responder.resolved(event, error, time.monotonic(),
                                            hard=error in (VdpError.OTHER, VdpError.BAD_FORMAT)))
        self._wake.set()

    # --- timers --------------------------------------------------------------------------

    async def _tick(self) -> None:
        assert self.responder is not None
        while True:
            deadline = self.responder.next_deadline()
            sleep = MAX_SLEEP_S
            if deadline is not None:
                sleep = min(MAX_SLEEP_S, max(0.0, deadline - time.monotonic()))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), sleep)
            self._apply(self.responder.poll(time.monotonic()))
            self._flush_held()


def json_line(message: dict[str, Any]) -> None:
    """``--json``: one message per line on stdout, flushed (a script reads it as it comes)."""
    import sys

    # Exactly the message as sent (no timestamp added, unlike the log lines).
    sys.stdout.write(json.dumps(message, separators=(",", ":")) + "\n")
    sys.stdout.flush()
