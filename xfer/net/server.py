"""What the agent's and the manager's servers share: aiohttp sites on sockets bound inside a
namespace, a plain-HTTP metrics endpoint, one JSON log, explicit start/stop, and running
until SIGTERM with systemd told when the daemon is ready.

    class AgentServer(Listener):
        log_name = "xfer.agent"
        async def start(self): ...; await self.listen(app, "10.0.4.1", 7443, "fw", tls_ctx)

    await run_until_signal(AgentServer(config))      # ``xfer agent serve``
"""

from __future__ import annotations

import asyncio
import signal
import socket
from types import TracebackType
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from xfer.net import systemd
from xfer.net.log import emitter, error_record
from xfer.net.sockets import bind_socket


class Listener:
    """Base of a daemon's server: owns its sites and its stopped event; subclasses add the rest.

    ``start()`` must undo what it did when it fails (call ``stop()``); ``stop()``
    closes the sites (``close_sites``) and then ``stopped()``.
    """

    log_name = "xfer"

    def __init__(self) -> None:
        self.emit = emitter(self.log_name)
        self._runners: list[web.AppRunner] = []
        self._stopped = asyncio.Event()

    async def __aenter__(self) -> Listener:
        await self.start()
        return self

    async def __aexit__(self, t: type[BaseException] | None, v: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        await self.close_sites()
        self.stopped()

    async def listen(self, app: web.Application, address: str, port: int, namespace: str | None,
                     ssl_context: Any) -> int:
        """Serve ``app`` on ADDRESS:PORT inside ``namespace``; returns the port (0: the one it got)."""
        sock = bind_socket(address, port, namespace)
        await self._site(app, sock, ssl_context)
        return int(sock.getsockname()[1])

    async def listen_metrics(self, address: str, port: int, namespace: str | None) -> None:
        """The plain-HTTP Prometheus endpoint (``[listen] metrics``)."""
        plain = web.Application()
        plain.add_routes([web.get("/metrics", self.metrics_response)])
        await self.listen(plain, address, port, namespace, None)

    async def metrics_response(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=generate_latest(await self.metrics_registry()),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def metrics_registry(self) -> CollectorRegistry:
        """The registry to render (a subclass may refresh values read from elsewhere first)."""
        raise NotImplementedError

    def internal_error(self, exc: BaseException, **context: Any) -> web.Response:
        """A bug's answer: 500 with a one-line reason; its traceback goes into the JSON log."""
        self.emit(error_record(exc, **context), "error")
        return web.json_response({"error": f"internal error: {type(exc).__name__}: {exc}",
                                  "type": "InternalError"}, status=500)

    async def _site(self, app: web.Application, sock: socket.socket, ctx: Any) -> None:
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5)
        await runner.setup()
        self._runners.append(runner)
        await web.SockSite(runner, sock, ssl_context=ctx).start()

    async def close_sites(self) -> None:
        """Stop listening and finish the requests under way."""
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()

    def stopped(self) -> None:
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


async def run_until_signal(server: Listener) -> None:
    """Start ``server``, tell systemd it is ready, run until SIGTERM or SIGINT, stop it."""
    loop = asyncio.get_running_loop()
    stopping: set[asyncio.Task[None]] = set()
    async with server:
        systemd.notify("READY=1")

        def stop() -> None:
            systemd.notify("STOPPING=1")
            task = asyncio.ensure_future(server.stop())
            stopping.add(task)
            task.add_done_callback(stopping.discard)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        await server.wait_stopped()
