"""The manager daemon: migration messages over HTTPS (mutual TLS) and UDP, journal, metrics.

Endpoints (JSON)::

    POST /v1/migrations   (also /migrations)  a migration message -> the migration's report
    POST /v1/migrations/abort  {"vm"}          roll back a migration of that VM
    GET  /v1/migrations?limit=N                the journal, newest first
    GET  /metrics                              Prometheus text (also on the optional plain listener)

    The devices' own requests (device-driven variant, ``desk.py``); only the
    certificate named DEVICE may make them:
    POST /v1/devices/DEVICE/role                      the message it heard -> its part
    PUT  /v1/devices/DEVICE/deposits/MIGRATION        its bundle (zstd) into the store
    GET  /v1/devices/DEVICE/collect/MIGRATION/SOURCE  SOURCE's stored bundle (zstd)
    POST /v1/devices/DEVICE/reports/MIGRATION         {"source", "report"} | {"source"?, "error"}

Datagrams (``[listen] udp`` and ``multicast``) carry the same message; the
answer goes back to the sender as one datagram. A store-mode message heard on
the multicast group is the device-driven variant: the agents there heard it too.

    async with ManagerServer(config) as server:   # recovers the journal, then listens
        await server.wait_stopped()
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
import time
from typing import Any, cast

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from xfer.agent.client import AgentClient
from xfer.bundle import DEFAULT_MAX_SIZE
from xfer.errors import AuthError, BundleError, NotLeader, Overloaded, UsageError, XferError
from xfer.manager import topology
from xfer.manager.backends import maintain, open_backend
from xfer.manager.config import API_PATH, ManagerConfig
from xfer.manager.desk import DeviceDesk
from xfer.manager.etcd import EtcdJournal
from xfer.manager.journal import Journal
from xfer.manager.leader import Election
from xfer.manager.migration import Conflict, MigrationFailed, Migrator
from xfer.manager.modes import Devices
from xfer.manager.store import Store
from xfer.net import message, tls
from xfer.net.api import BUNDLE_TYPE, COMPRESSION_HEADER, ZSTD, error_body, packed_size, status_of
from xfer.net.metrics import daemon_registry
from xfer.net.server import Listener, run_until_signal
from xfer.net.sockets import multicast_socket, udp_socket

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DEADLINE_HEADER = "X-Xfer-Deadline-Ms"


class ManagerMetrics:
    """Messages by outcome, migration and phase durations, budget overruns (own registry)."""

    def __init__(self) -> None:
        self.registry = daemon_registry("manager")
        self.messages = Counter("xfer_manager_messages", "Migration messages by transport and outcome",
                                ["transport", "outcome"], registry=self.registry)
        self.duration = Histogram("xfer_manager_migration_seconds", "Message to all destinations committed",
                                  ["mode"], buckets=_BUCKETS, registry=self.registry)
        self.phase = Histogram("xfer_manager_phase_seconds", "Each device operation", ["phase"],
                               buckets=_BUCKETS, registry=self.registry)
        self.over_budget = Counter("xfer_manager_over_budget", "Migrations over their time budget",
                                   registry=self.registry)
        self.rollbacks_pending = Gauge("xfer_manager_rollbacks_pending",
                                       "Rollbacks not done yet (a destination unreachable), retried",
                                       registry=self.registry)
        self.queue_depth = Gauge("xfer_manager_queue_depth", "Moves admitted and not finished, per device",
                                 ["device"], registry=self.registry)
        self.refused = Counter("xfer_manager_refused_overloaded", "Messages refused with 503: their "
                               "devices' queues would have made them miss their deadline",
                               registry=self.registry)

    def record(self, report: dict[str, Any]) -> None:
        if report.get("ms") is not None:
            self.duration.labels(report.get("mode", "")).observe(report["ms"] / 1000)
        for p in report.get("phases", []):
            if p.get("ms") is not None:
                self.phase.labels(p["name"]).observe(p["ms"] / 1000)
        if report.get("over_budget"):
            self.over_budget.inc()


class ManagerServer(Listener):
    """The manager: explicit ``start()``/``stop()``, or ``async with``."""

    log_name = "xfer.manager"

    def __init__(self, config: ManagerConfig, devices: Devices | None = None) -> None:
        """``devices`` defaults to an agent client with the manager's certificate (tests give fakes)."""
        super().__init__()
        self.config = config
        self.connection_limits = config.connection_limits
        self._devices = devices
        self.port = config.port
        self.udp_port: int | None = None
        self.metrics = ManagerMetrics()
        self._udp: list[asyncio.DatagramTransport] = []
        self._client: AgentClient | None = None
        self._journal: Journal | None = None
        self._store: Store | None = None
        self._migrator: Migrator | None = None
        self._desk: DeviceDesk | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._daemons: list[asyncio.Task[Any]] = []   # run as long as the manager (cancelled at stop)
        self.election: Election | None = None
        self._topo: topology.Topology | None = None
        self._devices_in_use: Devices | None = None

    @property
    def url(self) -> str:
        """The message URL, with the port it got when the configuration asked for port 0."""
        return dataclasses.replace(self.config, port=self.port).url

    @property
    def migrator(self) -> Migrator:
        """The leader's migrator; NotLeader on a follower."""
        if self._migrator is None or not self.leading:
            raise self._not_leader()
        return self._migrator

    async def start(self) -> None:
        """Load topology and TLS, recover the journal, then listen (HTTPS, UDP, metrics)."""
        cfg = self.config
        try:
            topo = topology.load(cfg.topology)
            server_ctx = tls.server_context(cfg.tls)
            devices = self._devices
            if devices is None:
                self._client = AgentClient(tls.client_context(cfg.tls.ca, cfg.tls.cert, cfg.tls.key),
                                           namespace=cfg.netns, timeout=30)
                await self._client.start()
                devices = self._client
            self._topo, self._devices_in_use = topo, devices
            self._journal, self._store = await open_backend(cfg)
            self.metrics.rollbacks_pending.set_function(
                lambda: len(self._migrator.outcomes.pending) if self._migrator else 0)
            if cfg.backend.backend == "sqlite":
                # Before listening: no message may meet the remains of a crashed run (its
                # rollbacks go on in the background; their VMs refuse messages meanwhile).
                await self._lead()
            self._spawn(maintain(self._journal, self._store, cfg.backend))
            api = web.Application(client_max_size=64 * 1024, middlewares=[self._middleware])
            api.add_routes([
                web.post(API_PATH, self._message), web.post("/migrations", self._message),
                web.post(f"{API_PATH}/abort", self._abort), web.get(API_PATH, self._list),
                web.get("/metrics", self.metrics_response),
                web.post("/v1/devices/{device}/role", self._role),
                web.put("/v1/devices/{device}/deposits/{migration:\\d+}", self._deposit),
                web.get("/v1/devices/{device}/collect/{migration:\\d+}/{source}", self._collect),
                web.post("/v1/devices/{device}/reports/{migration:\\d+}", self._report),
            ])
            self.port = await self.listen(api, cfg.address, cfg.port, cfg.netns, server_ctx)
            if cfg.metrics:
                await self.listen_metrics(*cfg.metrics, cfg.netns)
            if cfg.udp:
                udp = udp_socket(*cfg.udp, cfg.netns)
                self.udp_port = udp.getsockname()[1]
                await self._listen_udp(udp, "udp")
            if cfg.multicast:
                await self._listen_udp(multicast_socket(*cfg.multicast, cfg.multicast_interface, cfg.netns),
                                       "multicast")
            if cfg.backend.backend == "etcd":
                assert isinstance(self._journal, EtcdJournal)
                self.election = Election(self._journal.client, cfg.backend.prefix,
                                         f"{socket.gethostname()}-{os.getpid()}-{self.port}",
                                         cfg.backend.url or self.url, cfg.backend.lease_s)
                self._spawn(self.election.run(self._lead, self._follow))
        except BaseException:
            await self.stop()
            raise
        self.emit({"event": "listening", "url": self.url, "udp": cfg.udp, "multicast": cfg.multicast,
                   "mode": cfg.settings.mode, "cleanup": cfg.settings.cleanup,
                   "backend": cfg.backend.backend})

    async def _lead(self) -> None:
        """Become the one that acts: a fresh migrator over the journal, and recovery of what the
        previous leader (or run) left under way."""
        assert self._journal is not None and self._store is not None
        assert self._topo is not None and self._devices_in_use is not None
        if self.election is not None:
            assert isinstance(self._journal, EtcdJournal)
            self._journal.fence = self.election.fence
        migrator = Migrator(self._topo, self._devices_in_use, self._journal, self._store,
                            self.config.settings, on_record=self.metrics.record)
        if self.election is not None:
            self.emit({"event": "leading", "url": self.url})
        for item in await migrator.recover():
            self.emit({"event": "recovered", **item})
        self._migrator, self._desk = migrator, DeviceDesk(migrator)

    async def _follow(self) -> None:
        """Lost the leadership: stop acting (the journal already refuses this manager's writes)."""
        self.emit({"event": "following", "url": self.url, "reason": "the leader lease ended"})
        migrator, self._migrator, self._desk = self._migrator, None, None
        if isinstance(self._journal, EtcdJournal):
            self._journal.fence = None
        if migrator is not None:
            await migrator.outcomes.stop_retries()

    @property
    def leading(self) -> bool:
        """Whether this manager acts on messages now (always, with the SQLite journal)."""
        if self.election is None:
            return self._migrator is not None
        return self._migrator is not None and self.election.sure

    def _not_leader(self) -> NotLeader:
        leader = self.election.leader_url if self.election is not None else None
        if leader == self.url:
            leader = None
        return NotLeader("this manager is not the leader" + (f"; the leader is {leader}" if leader else
                                                             " (none elected yet)"), leader)

    def _spawn(self, work: Any) -> None:
        self._daemons.append(asyncio.ensure_future(work))

    async def _listen_udp(self, sock: socket.socket, name: str) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _Datagrams(self, name), sock=sock)
        self._udp.append(transport)

    async def stop(self) -> None:
        """Stop listening, let cleanups under way finish, close the journal."""
        for transport in self._udp:
            transport.close()
        self._udp.clear()
        await self.close_sites()
        for task in self._daemons:
            task.cancel()
        await asyncio.gather(*self._daemons, return_exceptions=True)
        self._daemons.clear()
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._migrator is not None:
            await self._migrator.outcomes.stop_retries()
            await self._migrator.wait_background()
        if self.election is not None and self.election.leading:
            await self.election.resign()
        if self._client is not None:
            await self._client.close()
            self._client = None
        for closable in (self._store, self._journal):
            if closable is not None:
                await closable.close()
        self._store = self._journal = None
        self.stopped()

    # --- handling ---------------------------------------------------------------------------

    async def handle(self, body: Any, transport: str, deadline_ms: float | None = None) -> dict[str, Any]:
        """One message from any transport: act, log one line, count it."""
        started = time.perf_counter()
        outcome, record = "ok", dict[str, Any]()
        try:
            msg = message.parse(body)
            record = {"vm": msg.vm, "indication": msg.indication, "direction": msg.direction,
                      "mode": msg.mode or self.config.settings.mode}
            budget = min(self.config.settings.budget_ms, deadline_ms) if deadline_ms else None
            report = await self.migrator.handle(msg, budget, transport)
            record.update({k: report.get(k) for k in ("migration", "state", "over_budget", "device_ms")})
            return report
        except XferError as exc:
            outcome, record["error"] = ("refused" if isinstance(exc, UsageError) else "failed"), str(exc)
            raise
        finally:
            self.metrics.messages.labels(transport, outcome).inc()
            self.emit({"event": "message", "transport": transport, "outcome": outcome,
                       "ms": round((time.perf_counter() - started) * 1000, 3), **record},
                      {"ok": "info", "refused": "warning"}.get(outcome, "error"))

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        peer = tls.peer_name(request.transport.get_extra_info("peercert") if request.transport else None)
        try:
            device = request.match_info.get("device")
            if device is not None:
                # A device acts for itself only: its certificate names it.
                if peer != device:
                    raise AuthError(f"peer {peer or '(no name)'} may not act for device {device}")
            elif self.config.allowed_peers and peer not in self.config.allowed_peers:
                raise AuthError(f"peer {peer or '(no name)'} may not send migration messages")
            response: web.StreamResponse = await handler(request)
            return response
        except MigrationFailed as exc:
            return web.json_response({**error_body(exc), "report": exc.report}, status=502)
        except Conflict as exc:
            return web.json_response(error_body(exc), status=409)
        except Overloaded as exc:
            self.metrics.refused.inc()
            return web.json_response({**error_body(exc), "retry_after_s": exc.retry_after_s}, status=503,
                                     headers={"Retry-After": str(max(1, round(exc.retry_after_s)))})
        except XferError as exc:
            return web.json_response(error_body(exc), status=status_of(exc))
        except web.HTTPException:
            raise
        except Exception as exc:
            return self.internal_error(exc, path=request.path, peer=peer)

    @staticmethod
    async def _json(request: web.Request) -> Any:
        try:
            return await request.json()
        except (ValueError, UnicodeDecodeError):
            raise UsageError("request body is not JSON") from None

    async def _message(self, request: web.Request) -> web.StreamResponse:
        deadline = request.headers.get(DEADLINE_HEADER)
        deadline_ms = float(deadline) if deadline and deadline.isdigit() else None
        return web.json_response(await self.handle(await self._json(request), "http", deadline_ms))

    async def _abort(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        vm = body.get("vm") if isinstance(body, dict) else None
        return web.json_response(await self.handle({"vm": vm, "indication": "abort"}, "http"))

    async def _list(self, request: web.Request) -> web.StreamResponse:
        text = request.query.get("limit", "100")
        if not text.isdigit():
            raise UsageError("limit must be a number")
        limit = int(text)
        assert self._journal is not None
        return web.json_response([m.to_dict() for m in await self._journal.recent(limit)])

    # --- the devices' own requests (device-driven variant) ------------------------------------

    @property
    def desk(self) -> DeviceDesk:
        if self._desk is None or not self.leading:
            raise self._not_leader()
        return self._desk

    async def _role(self, request: web.Request) -> web.StreamResponse:
        device = request.match_info["device"]
        answer = await self.desk.role(device, await self._json(request))
        self.emit({"event": "role", "device": device,
                   **{k: answer.get(k) for k in ("vm", "migration", "role")}})
        return web.json_response(answer)

    async def _deposit(self, request: web.Request) -> web.StreamResponse:
        packed = await _read_limited(request, DEFAULT_MAX_SIZE)
        size = packed_size(packed, request.headers.get(COMPRESSION_HEADER), DEFAULT_MAX_SIZE)
        return web.json_response(await self.desk.deposit(int(request.match_info["migration"]),
                                                   request.match_info["device"], packed, size))

    async def _collect(self, request: web.Request) -> web.StreamResponse:
        match = request.match_info
        packed = await self.desk.stored_bundle(int(match["migration"]), match["source"], match["device"])
        return web.Response(body=packed, content_type=BUNDLE_TYPE, headers={COMPRESSION_HEADER: ZSTD})

    async def _report(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(await self.desk.report(int(request.match_info["migration"]),
                                                  request.match_info["device"], await self._json(request)))

    async def metrics_registry(self) -> CollectorRegistry:
        if self._migrator is not None:
            for device, depth in self._migrator.admission.depths().items():
                self.metrics.queue_depth.labels(device).set(depth)
        return self.metrics.registry

    def datagram(self, data: bytes, addr: tuple[str, int], transport: asyncio.DatagramTransport,
                 name: str = "udp") -> None:
        """One datagram, heard on the unicast socket (``name`` udp) or the group (multicast).
        Only the leader answers: a follower's answer would be a refusal the sender cannot tell
        from the leader's, so it stays silent."""
        if not self.leading:
            return
        async def run() -> None:
            try:
                answer: dict[str, Any] = await self.handle(json.loads(data), name)
            except ValueError:
                answer = {"ok": False, "error": "datagram is not JSON"}
            except XferError as exc:
                answer = {"ok": False, **error_body(exc)}
            reply = json.dumps(answer, separators=(",", ":")).encode()
            if len(reply) > message.MAX_DATAGRAM:
                reply = json.dumps({k: answer.get(k) for k in ("ok", "vm", "migration", "state", "error")}
                                   ).encode()
            transport.sendto(reply, addr)

        task = asyncio.ensure_future(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, server: ManagerServer, name: str) -> None:
        self.server, self.name = server, name
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.server.datagram(data, addr, self.transport, self.name)


async def _read_limited(request: web.Request, limit: int) -> bytes:
    """A request body of at most ``limit`` bytes (the API's small client_max_size is for JSON)."""
    if request.content_length is not None and request.content_length > limit:
        raise BundleError(f"bundle is over the manager's limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > limit:
            raise BundleError(f"bundle is over the manager's limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def serve(config: ManagerConfig) -> None:
    """Run the manager until SIGTERM or SIGINT (``xfer manager serve``); systemd learns when it is ready."""
    await run_until_signal(ManagerServer(config))
