"""xfer.net pieces the daemons share: readiness for systemd, the JSON log, addresses."""

from __future__ import annotations

import io
import json
import logging
import socket
from pathlib import Path

import pytest

from xfer.errors import UsageError
from xfer.net import address, systemd
from xfer.net.log import JsonFormatter, daemon_logging, emitter


@pytest.mark.parametrize("abstract", [False, True])
def test_notify_reaches_the_socket_systemd_names(tmp_path: Path, abstract: bool) -> None:
    path = f"@xfer-test-{id(tmp_path)}" if abstract else str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + path[1:] if abstract else path)
        assert systemd.notify("READY=1", environ={"NOTIFY_SOCKET": path})
        assert sock.recv(64) == b"READY=1"


def test_notify_without_systemd_or_with_a_dead_socket_is_quiet(tmp_path: Path) -> None:
    assert not systemd.notify("READY=1", environ={})
    assert not systemd.notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert not systemd.notify("READY=1", environ={"NOTIFY_SOCKET": "relative/path"})


def test_every_log_line_is_json_even_a_library_traceback() -> None:
    stream = io.StringIO()
    undo = daemon_logging(stream=stream)
    try:
        emitter("xfer.manager")({"event": "listening", "url": "https://x"})
        emitter("xfer.manager")({"event": "quiet"}, "debug")   # below INFO: not written
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("aiohttp.server").exception("Error handling request")
        logging.getLogger("some.library").info("chatter")          # libraries: WARNING and up
    finally:
        undo()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [x["event"] for x in lines] == ["listening", "log"]
    assert list(lines[0])[:3] == ["ts", "level", "event"] and lines[0]["url"] == "https://x"
    lib = lines[1]
    assert lib["level"] == "error" and lib["logger"] == "aiohttp.server"
    assert lib["error"] == "ValueError: boom" and lib["traceback"][-1] == "ValueError: boom"


def test_formatter_passes_emitted_lines_through_unchanged() -> None:
    record = logging.LogRecord("xfer.agent", logging.INFO, __file__, 1, '{"ts":1,"event":"x"}', None, None)
    record.xfer_json = True
    assert JsonFormatter().format(record) == '{"ts":1,"event":"x"}'


def test_addresses_name_the_key_of_the_file_they_came_from() -> None:
    assert address.hostport("[fd00::9]:8701", "x") == ("fd00::9", 8701)
    with pytest.raises(UsageError, match=r"^manager config: listen.udp must be ADDRESS:PORT$"):
        address.hostport("10.0.4.9", "manager config: listen.udp")
    with pytest.raises(UsageError, match="is not an IP address"):
        address.hostport("host:80", "--udp")
    with pytest.raises(UsageError, match="port number"):
        address.port(True, "listen.port")
    assert address.is_multicast("239.7.7.7") and address.is_multicast("ff02::1")
    assert not address.is_multicast("10.0.0.1") and not address.is_multicast("mgr.example")


def test_a_bad_udp_value_in_the_manager_config_is_the_managers() -> None:
    from xfer.manager import config

    raw = {"manager": {"topology": "t.yaml"}, "listen": {"udp": "10.0.4.9"},
           "tls": {"cert": "c", "key": "k", "ca": "a"}}
    with pytest.raises(UsageError, match=r"^manager config: listen.udp must be ADDRESS:PORT$"):
        config.parse(raw)


def test_a_daemon_says_ready_once_listening_and_stopping_on_sigterm(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    import os
    import signal

    from aiohttp import web
    from prometheus_client import CollectorRegistry

    from xfer.net.server import Listener, run_until_signal

    class Tiny(Listener):
        port = 0

        async def start(self) -> None:
            app = web.Application()
            app.add_routes([web.get("/metrics", self.metrics_response)])
            self.port = await self.listen(app, "127.0.0.1", 0, None, None)

        async def metrics_registry(self) -> CollectorRegistry:
            return CollectorRegistry()

    path = str(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    heard: list[bytes] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.setblocking(False)
            server = Tiny()
            running = asyncio.ensure_future(run_until_signal(server))
            heard.append(await asyncio.wait_for(loop.sock_recv(sock, 64), 10))
            # Ready means listening: the endpoint answers now.
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
            assert b" 200 " in await reader.readline()
            writer.close()
            os.kill(os.getpid(), signal.SIGTERM)
            heard.append(await asyncio.wait_for(loop.sock_recv(sock, 64), 10))
            await asyncio.wait_for(running, 10)

    asyncio.run(main())
    assert heard == [b"READY=1", b"STOPPING=1"]
