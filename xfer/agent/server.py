"""The agent's asyncio HTTP server: mutual TLS, one JSON log line per request, metrics.

Endpoints (under /v1; JSON unless said otherwise)::

    GET  /health                       device, type, kinds, operations
    GET  /status                       the same plus per-kind counts and unfinished imports
    POST /export  {vm, kinds}          -> bundle bytes
    POST /import?vm=..&kinds=..        bundle bytes -> import report
    POST /forget  {vm, kinds}          -> per-kind reports
    POST /push    {vm, kinds, destination}  export here, import there
    POST /pull    {vm, kinds, source}       export there, import here
    POST /precopy/changes {vm, cursor}       -> bundle of the VM's conntrack changes (source)
    POST /precopy/stage?vm=..&final=0|1      bundle -> staged (final: last delta + commit)
    POST /precopy/pull {vm, source, final}   fetch the changes there, stage them here
    POST /precopy/push {vm, destination, cursor, final}  send the changes there
    POST /precopy/abort {vm}                 remove what this migration staged here
    GET  /metrics                      Prometheus text (also on the optional plain listener)

With a ``[manager]`` section the agent also joins the multicast group migration
messages are sent to and acts on them itself (``devicedriven.py``). With a ``[vdp]``
section it answers 802.1Qbg VDP on the device's host-facing ports and sends the
migration messages the stations' hints stand for (``xfer.vdp``).

    async with AgentServer(config) as server:   # binds, recovers the journal, serves
        await server.wait_stopped()
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from xfer import bundle as bundle_mod
from xfer.agent import device, privsep
from xfer.agent import status as status_mod
from xfer.agent.client import AgentClient
from xfer.agent.config import AgentConfig
from xfer.agent.devicedriven import DeviceDriven, Heard
from xfer.agent.metrics import AgentMetrics
from xfer.agent.protocol import API, MIGRATION, MIGRATION_HEADER, parse_request_kinds, parse_request_vm
from xfer.agent.service import AgentService, Trace
from xfer.agent.upstream import Upstream
from xfer.errors import AuthError, BundleError, UsageError, XferError
from xfer.model import Kind
from xfer.net import tls
from xfer.net.api import BUNDLE_TYPE, COMPRESSION_HEADER, compress, decompress, error_body, status_of
from xfer.net.server import Listener, run_until_signal
from xfer.net.sockets import multicast_socket

# The trace of the request being handled (set by the middleware, read by the endpoints).
TRACE: contextvars.ContextVar[Trace] = contextvars.ContextVar("xfer_agent_trace")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_CONTROL_MAX = 64 * 1024
EXPIRE_EVERY_S = 5.0


def _helper_settings(cfg: AgentConfig) -> privsep.HelperSettings:
    dhcp = (privsep.DhcpPorts(cfg.dhcp_trusted, list(cfg.dhcp_untrusted), cfg.dhcp_max_bindings)
            if Kind.DHCP in cfg.kinds and cfg.dhcp_trusted else None)
    return privsep.HelperSettings(dhcp, cfg.precopy_events_trusted, cfg.precopy_expire_s)


class AgentServer(Listener):
    """One agent: explicit ``start()``/``stop()``, or ``async with``.

    ``service`` defaults to an AgentService over ``xfer.transfer`` whose peers
    are reached with this agent's own certificate.
    """

    log_name = "xfer.agent"

    def __init__(self, config: AgentConfig, service: AgentService | None = None) -> None:
        super().__init__()
        self.config = config
        self.connection_limits = config.connection_limits
        self.metrics = AgentMetrics()
        self._client: AgentClient | None = None
        self._service = service
        self._dhcp: device.DhcpKeeper | None = None
        self._device_driven: DeviceDriven | None = None
        self._group: asyncio.DatagramTransport | None = None
        self._vdp: Any = None            # xfer.vdp.service.VdpService, imported only when configured
        self._helper: privsep.Helper | None = None
        self._expiry: asyncio.Task[None] | None = None
        self.port = config.port

    @property
    def service(self) -> AgentService:
        assert self._service is not None, "start() first"
        return self._service

    async def start(self) -> None:
        """Load TLS material, attach the kinds' datapath, roll back unfinished imports, listen."""
        cfg = self.config
        try:
            server_ctx = tls.server_context(cfg.tls)
            if cfg.privsep_user and self._service is None:
                # docs/privsep.md: the kernel work goes to a helper; this process drops below.
                self._helper = privsep.Helper.start(cfg.netns, cfg.kinds, _helper_settings(cfg))
            if self._service is None or cfg.manager:
                # Other agents and the manager are reached with this agent's own certificate.
                self._client = AgentClient(tls.client_context(cfg.tls.ca, cfg.tls.cert, cfg.tls.key),
                                           namespace=cfg.netns, max_bundle_bytes=cfg.max_bundle_bytes,
                                           socket_factory=self._helper.transfer.socket_factory
                                           if self._helper else None)
                await self._client.start()
            if self._service is None:
                self._service = AgentService(cfg, peers=self._client,
                                             transfer=self._helper.transfer if self._helper else None,
                                             precopy_kernel=self._helper.precopy if self._helper else None,
                                             key=bundle_mod.load_key(cfg.bundle_key_file))
            attached = await asyncio.to_thread(device.bring_up, cfg)
            if attached:
                self.emit({"event": "attached", "device": cfg.device_id, **attached})
            if Kind.DHCP in cfg.kinds and self._helper is not None:
                await asyncio.to_thread(self._helper.transfer.keep_dhcp)
            elif Kind.DHCP in cfg.kinds:
                self._dhcp = device.DhcpKeeper(cfg.netns, trusted=cfg.dhcp_trusted,
                                               untrusted=cfg.dhcp_untrusted,
                                               max_bindings=cfg.dhcp_max_bindings)
                await self._dhcp.start()
            # Before listening: no request may meet the remains of a crashed import.
            for item in await asyncio.to_thread(self.service.recover):
                self.emit({"event": "rolled back unfinished import", "device": cfg.device_id, **item})
            api = web.Application(client_max_size=cfg.max_bundle_bytes,
                                  middlewares=[self._middleware])
            api.add_routes([
                web.get(f"{API}/health", self._health),
                web.get(f"{API}/status", self._status),
                web.post(f"{API}/export", self._export),
                web.post(f"{API}/import", self._import),
                web.post(f"{API}/forget", self._forget),
                web.post(f"{API}/push", self._push),
                web.post(f"{API}/pull", self._pull),
                web.post(f"{API}/precopy/changes", self._precopy_changes),
                web.post(f"{API}/precopy/stage", self._precopy_stage),
                web.post(f"{API}/precopy/pull", self._precopy_pull),
                web.post(f"{API}/precopy/push", self._precopy_push),
                web.post(f"{API}/precopy/abort", self._precopy_abort),
                web.get("/metrics", self.metrics_response),
            ])
            self.port = await self.listen(api, cfg.address, cfg.port, cfg.netns, server_ctx)
            if cfg.metrics:
                await self.listen_metrics(*cfg.metrics, cfg.netns)
            if cfg.manager:
                await self._join_group()
            if cfg.vdp:
                await self._answer_vdp()
            if self._helper is not None and cfg.privsep_user:
                privsep.separate(cfg.privsep_user, cfg.state_dir)
            self._expiry = asyncio.ensure_future(self._expire_stages())
        except BaseException:
            await self.stop()
            raise
        self.emit({"event": "listening", "device": cfg.device_id, "url": self.url,
               "kinds": [k.value for k in cfg.kinds], "netns": cfg.netns,
               **({"group": "{}:{}".format(*cfg.manager.group), "manager": cfg.manager.url}
                  if cfg.manager else {})})

    async def _answer_vdp(self) -> None:
        """The [vdp] section: a VDP responder on the device's host-facing ports."""
        from xfer.vdp.service import VdpService

        assert self.config.vdp is not None
        device = self.config.device_id
        self._vdp = VdpService(self.config.vdp, log_line=lambda r: self.emit({"device": device, **r}))
        await self._vdp.start()

    async def _join_group(self) -> None:
        """The device-driven variant: hear migration messages on the group, act on them."""
        up = self.config.manager
        assert up is not None and self._client is not None
        acting = DeviceDriven(self.service, Upstream(self._client, up.url, up.device), self.emit,
                              self.metrics.observe)
        self._device_driven = acting
        sock = multicast_socket(*up.group, up.interface, self.config.netns)
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: Heard(acting.heard), sock=sock)
        self._group = transport

    @property
    def url(self) -> str:
        """The agent's URL, with the port it got when the configuration asked for port 0."""
        return dataclasses.replace(self.config, port=self.port).url

    async def _expire_stages(self) -> None:
        """Abort pre-copy stages nobody completed (a manager that died, a lost abort)."""
        while True:
            await asyncio.sleep(EXPIRE_EVERY_S)
            try:
                for session in await self.service.precopy.expire():
                    self.emit({"event": "pre-copy expired", "device": self.config.device_id,
                               "session": session})
            except XferError as exc:
                self.emit({"event": "pre-copy expiry failed", "device": self.config.device_id,
                           "error": str(exc)})

    async def stop(self) -> None:
        """Stop listening, finish the requests under way, close the peer client."""
        if self._vdp is not None:
            await self._vdp.stop()
            self._vdp = None
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self._group is not None:
            self._group.close()
            self._group = None
        if self._device_driven is not None:
            await self._device_driven.stop()
            self._device_driven = None
        await self.close_sites()
        if self._dhcp is not None:
            await self._dhcp.stop()
            self._dhcp = None
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._service is not None:
            await asyncio.to_thread(self._service.precopy.close)
        if self._helper is not None:
            self._helper.stop()
            self._helper = None
        self.stopped()

    # --- request plumbing ---------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        trace = Trace()
        TRACE.set(trace)
        op = request.path.rsplit("/", 1)[-1] or "root"
        peer = tls.peer_name(request.transport.get_extra_info("peercert") if request.transport else None)
        error, status = "", 500
        # This request's task only (aiohttp runs each in its own): the service and the
        # requests it makes to peers see the migration the work belongs to.
        MIGRATION.set(request.headers.get(MIGRATION_HEADER, "")[:128])
        try:
            if self.config.allowed_peers and peer not in self.config.allowed_peers:
                raise AuthError(f"peer {peer or '(no name)'} is not among this agent's allowed peers")
            response = await handler(request)
            status = response.status
        except XferError as exc:
            status, error = status_of(exc), str(exc)
            response = web.json_response(error_body(exc), status=status)
        except web.HTTPException as exc:
            status, error = exc.status, exc.reason
            raise
        except Exception as exc:
            status, error = 500, f"internal error: {type(exc).__name__}: {exc}"
            response = self.internal_error(exc, device=self.config.device_id, op=op, path=request.path)
        finally:
            seconds = time.perf_counter() - started
            outcome = "ok" if status == 200 else ("refused" if 400 <= status < 500 else "failed")
            if op != "metrics":
                self.metrics.observe(op, outcome, seconds, trace)
                self.emit({"event": "request", "device": self.config.device_id, "op": op,
                           "peer": peer, "vm": trace.vm, "kinds": list(trace.kinds), "status": status,
                           "ms": round(seconds * 1000, 3),
                           "phases_ms": {k: round(v * 1000, 3) for k, v in trace.phases.items()},
                           "entries": trace.entries, **({"error": error} if error else {})},
                          {"ok": "info", "refused": "warning"}.get(outcome, "error"))
        return response

    @staticmethod
    async def _control(request: web.Request) -> dict[str, Any]:
        if request.content_length is not None and request.content_length > _CONTROL_MAX:
            raise UsageError("control request too large")
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise UsageError("request body is not JSON") from None
        if not isinstance(body, dict):
            raise UsageError("request body must be a JSON object")
        return body

    # --- endpoints ------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.service.capabilities())

    async def _status(self, request: web.Request) -> web.StreamResponse:
        if self._helper is not None:
            counts = await asyncio.to_thread(self._helper.transfer.counts)
        else:
            counts = await asyncio.to_thread(status_mod.counts, self.config.kinds, self.config.netns)
        unfinished = [{"bundle": u.bundle_id, "vm": u.vm.to_dict(), "kinds": [k.value for k in u.kinds]}
                      for u in self.service.journal.unfinished()]
        return web.json_response({**self.service.capabilities(), "counts": counts,
                                  "unfinished_imports": unfinished})

    async def _export(self, request: web.Request) -> web.StreamResponse:
        body = await self._control(request)
        trace = TRACE.get()
        _, data = await self.service.export(parse_request_vm(body.get("vm")),
                                            parse_request_kinds(body.get("kinds")), trace)
        with trace.phase("compress"):
            packed, headers = compress(data)
        return web.Response(body=packed, content_type=BUNDLE_TYPE, headers=headers)

    async def _bundle_body(self, request: web.Request, trace: Trace, nothing: str) -> bytes:
        """A bundle request's body, inflated, within this device's limit (over it: nothing
        ``nothing``, in one line)."""
        limit = self.config.max_bundle_bytes
        with trace.phase("receive"):
            try:
                data = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise BundleError(f"bundle is over this device's limit of {limit} bytes; "
                                  f"nothing {nothing}") from None
        with trace.phase("inflate"):
            return decompress(data, request.headers.get(COMPRESSION_HEADER), limit)

    async def _import(self, request: web.Request) -> web.StreamResponse:
        trace: Trace = TRACE.get()
        vm = parse_request_vm(request.query.get("vm"))
        kinds = parse_request_kinds(request.query["kinds"]) if request.query.get("kinds") else None
        data = await self._bundle_body(request, trace, "imported")
        report = await self.service.import_(data, vm, kinds, trace)
        return web.json_response(report.to_dict())

    async def _forget(self, request: web.Request) -> web.StreamResponse:
        body = await self._control(request)
        reports = await self.service.forget(parse_request_vm(body.get("vm")),
                                            parse_request_kinds(body.get("kinds")), TRACE.get())
        return web.json_response({k.value: r.to_dict() for k, r in reports.items()})

    async def _push(self, request: web.Request) -> web.StreamResponse:
        body = await self._control(request)
        result = await self.service.push(parse_request_vm(body.get("vm")),
                                         parse_request_kinds(body.get("kinds")),
                                         str(body.get("destination") or ""), TRACE.get())
        return web.json_response(result)

    async def _pull(self, request: web.Request) -> web.StreamResponse:
        body = await self._control(request)
        report = await self.service.pull(parse_request_vm(body.get("vm")),
                                         parse_request_kinds(body.get("kinds")),
                                         str(body.get("source") or ""), TRACE.get())
        return web.json_response(report.to_dict())

    async def _precopy_changes(self, request: web.Request) -> web.StreamResponse:
        body = await self._control(request)
        trace = TRACE.get()
        data = await self.service.precopy.changes(parse_request_vm(body.get("vm")),
                                                  str(body.get("cursor") or ""), trace)
        with trace.phase("compress"):
            packed, headers = compress(data)
        return web.Response(body=packed, content_type=BUNDLE_TYPE, headers=headers)

    async def _precopy_stage(self, request: web.Request) -> web.StreamResponse:
        trace: Trace = TRACE.get()
        vm = parse_request_vm(request.query.get("vm"))
        data = await self._bundle_body(request, trace, "staged")
        result = await self.service.precopy.stage(data, vm, request.query.get("final") == "1", trace)
        return web.json_response(result)

    async def _precopy_pull(self, request: web.Request) -> web.StreamResponse:
        body = await self._control(request)
        result = await self.service.precopy.pull(parse_request_vm(body.get("vm")),
                                                 str(body.get("source") or ""),
                                                 body.get("final") is True, TRACE.get())
        return web.json_response(result)

    async def _precopy_push(self, request: web.Request) -> web.StreamResponse:
        body = await self._control(request)
        result = await self.service.precopy.push(parse_request_vm(body.get("vm")),
                                                 str(body.get("destination") or ""),
                                                 str(body.get("cursor") or ""),
                                                 body.get("final") is True, TRACE.get())
        return web.json_response(result)

    async def _precopy_abort(self, request: web.Request) -> web.StreamResponse:
        body = await self._control(request)
        result = await self.service.precopy.abort(parse_request_vm(body.get("vm")), TRACE.get())
        return web.json_response(result)

    async def metrics_registry(self) -> CollectorRegistry:
        if Kind.DHCP in self.config.kinds:
            # The DHCP guard's per-port counters, read from its map at scrape time.
            read = (self._helper.transfer.dhcp_counters if self._helper is not None
                    else lambda: status_mod.dhcp_counters(self.config.netns))
            self.metrics.dhcp_ports = await asyncio.to_thread(read)
        return self.metrics.registry


async def serve(config: AgentConfig) -> None:
    """Run an agent until SIGTERM or SIGINT (``xfer agent serve``); systemd learns when it is ready."""
    await run_until_signal(AgentServer(config))
