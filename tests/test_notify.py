"""The migration-message client against a real HTTP server on 127.0.0.1 (the lab's stand-in)."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xfer.errors import AuthError, MigrationMessageError, UsageError
from xfer.lab.qemu import free_port
from xfer.lab.stub_manager import StubManager, self_signed_tls
from xfer.net import http1
from xfer.net.message import MigrationMessage, messages_for
from xfer.net.notify import ManagerLink, check_url, send_migration_message
from xfer.net.tls import client_tls

MSG = MigrationMessage("vm1", "not-running", "out", "hv1", "hv2", ("conntrack",), "relay")


def send(mgr: StubManager, within: float = 2.0) -> dict:
    return asyncio.run(_send(mgr, within))


async def _send(mgr: StubManager, within: float) -> dict:
    async with mgr:
        return await send_migration_message(mgr.url, MSG, time.monotonic() + within)


def test_the_manager_receives_the_contract_body_and_its_report_comes_back() -> None:
    mgr = StubManager()
    report = send(mgr)
    assert report["ok"] is True and report["vm"] == "vm1"
    [rec] = mgr.received
    assert rec.message == {"vm": "vm1", "indication": "not-running", "direction": "out",
                           "source": "hv1", "destination": "hv2", "kinds": ["conntrack"],
                           "mode": "relay"}
    assert 0 < int(rec.headers["x-xfer-deadline-ms"]) <= 2000


def test_optional_keys_are_left_out() -> None:
    assert MigrationMessage("vm1", "starting", "in", "a", "b").to_json() == {
        "vm": "vm1", "indication": "starting", "direction": "in", "source": "a", "destination": "b"}


def test_a_source_that_does_not_know_the_destination_sends_only_out() -> None:
    assert [m.direction for m in messages_for("vm1", "hv1", "", mode="store")] == ["out"]
    assert MigrationMessage("vm1", "starting", "in", "a", "b", id="x1").to_json()["id"] == "x1"


def test_a_refusal_is_an_error_with_the_managers_reason() -> None:
    with pytest.raises(MigrationMessageError, match="answered 500: stand-in manager told to fail"):
        send(StubManager(fail_status=500))


def test_the_deadline_abandons_the_request() -> None:
    started = time.monotonic()
    with pytest.raises(MigrationMessageError, match="deadline"):
        send(StubManager(delay_s=10), within=0.2)
    assert time.monotonic() - started < 5  # abandoned, not waited out (generous bound)


def test_nobody_listening_is_an_error() -> None:
    async def scenario() -> None:
        await send_migration_message(f"http://127.0.0.1:{free_port()}/m", MSG, time.monotonic() + 1)

    with pytest.raises(MigrationMessageError, match=r"127\.0\.0\.1"):
        asyncio.run(scenario())


@pytest.mark.parametrize("url", ["ftp://x/", "http:///nohost", "http://h:99999/", "mgr:8700"])
def test_bad_urls_are_usage_errors(url: str) -> None:
    with pytest.raises(UsageError):
        check_url(url)


def test_store_mode_sends_in_after_out_and_unknown_modes_are_refused() -> None:
    assert [m.indication for m in messages_for("vm1", "a", "b", mode="store")] == ["not-running", "starting"]
    assert [m.direction for m in messages_for("vm1", "a", "b", mode="relay")] == ["out"]
    with pytest.raises(UsageError):
        messages_for("vm1", "a", "b", mode="teleport")


def test_chunked_and_unframed_bodies() -> None:
    async def read(raw: bytes) -> bytes:
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        _, headers = await http1.read_head(reader)
        return await http1.read_body(reader, headers)

    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4;x=y\r\n\":1}\r\n0\r\n\r\n"
    assert asyncio.run(read(chunked)) == b'{"a":1}'
    assert asyncio.run(read(b"HTTP/1.1 200 OK\r\n\r\n{}")) == b"{}"


def _xfer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xfer.cli", *args], capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.mark.parametrize(("args", "code", "words"), [
    (["--on-fail", "later"], 2, "--on-fail"),
    (["--manager", "mgr:8700"], 2, "manager URL"),
    (["--deadline-ms", "0"], 2, "deadline"),
    ([], 1, "cannot open QMP socket"),
])
def test_cli_errors_are_one_line(args: list[str], code: int, words: str) -> None:
    base = {"--qmp": "/nonexistent/qmp.sock", "--vm": "vm1", "--manager": "http://127.0.0.1:1/m"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    r = _xfer("qemu-hook", *[x for kv in base.items() for x in kv])
    assert r.returncode == code, r.stderr
    assert words in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_connections_opened_before_the_window_are_used_in_it() -> None:
    async def scenario() -> None:
        async with StubManager() as mgr, ManagerLink(mgr.url) as link:
            await link.open(2)
            assert mgr.accepted == 2 and link.open_error is None
            for _ in range(2):
                assert (await link.send(MSG, time.monotonic() + 2))["ok"]
            assert mgr.accepted == 2 and len(mgr.received) == 2
            await link.send(MSG, time.monotonic() + 2)  # none left: a fresh one
            assert mgr.accepted == 3

    asyncio.run(scenario())


def test_a_connection_the_manager_closed_while_idle_is_replaced() -> None:
    async def scenario() -> None:
        async with StubManager() as mgr, ManagerLink(mgr.url) as link:
            await link.open(1)
            assert mgr.close_idle() == 1
            await asyncio.sleep(0.05)  # the FIN reaches the client
            assert (await link.send(MSG, time.monotonic() + 2))["ok"]
            assert mgr.accepted == 2 and len(mgr.received) == 1

    asyncio.run(scenario())


def test_an_unreachable_manager_before_the_window_is_noted_not_fatal() -> None:
    async def scenario() -> None:
        async with ManagerLink(f"http://127.0.0.1:{free_port()}/m") as link:
            await link.open(1)
            assert link.open_error and "not reachable before the window" in link.open_error

    asyncio.run(scenario())


Contexts = tuple[ssl.SSLContext, ssl.SSLContext]


@pytest.fixture
def tls(tmp_path: Path) -> Contexts:
    if shutil.which("openssl") is None:
        pytest.skip("openssl(1) not installed")
    return self_signed_tls(tmp_path)


def test_https_manager_with_the_handshake_before_the_window(tls: Contexts) -> None:
    server, client = tls

    async def scenario() -> None:
        async with StubManager(ssl_context=server) as mgr, ManagerLink(mgr.url, client) as link:
            assert mgr.url.startswith("https://")
            await link.open(1)
            assert link.open_error is None
            async with asyncio.timeout(5):  # the server side finishes its handshake a tick later
                while mgr.accepted < 1:
                    await asyncio.sleep(0.005)
            assert (await link.send(MSG, time.monotonic() + 2))["ok"]
            assert mgr.accepted == 1  # the handshake happened in open(), not in send()

    asyncio.run(scenario())


def test_https_manager_with_an_unknown_certificate_is_refused(tls: Contexts) -> None:
    server, _ = tls

    async def scenario() -> None:
        async with StubManager(ssl_context=server) as mgr:
            await send_migration_message(mgr.url, MSG, time.monotonic() + 2)  # system CAs only

    with pytest.raises(MigrationMessageError, match="CERTIFICATE_VERIFY_FAILED"):
        asyncio.run(scenario())


def test_mutual_tls_manager_wants_the_client_certificate(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl(1) not installed")
    server, _ = self_signed_tls(tmp_path, mutual=True)
    pem, key = tmp_path / "manager.pem", tmp_path / "manager.key"

    async def send(ctx: ssl.SSLContext | None) -> dict:
        async with StubManager(ssl_context=server) as mgr:
            return await send_migration_message(mgr.url, MSG, time.monotonic() + 2, ctx)

    assert asyncio.run(send(client_tls(pem, pem, key)))["ok"]
    with pytest.raises(MigrationMessageError):
        asyncio.run(send(client_tls(pem)))  # no client certificate: the handshake is refused


def test_missing_tls_files_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(AuthError, match="TLS file not found"):
        client_tls(tmp_path / "nope.pem")
    r = _xfer("qemu-hook", "--qmp", "/nonexistent", "--vm", "vm1", "--manager", "https://127.0.0.1:1/m",
              "--cacert", str(tmp_path / "nope.pem"))
    assert r.returncode == 1 and "TLS file not found" in r.stderr and len(r.stderr.splitlines()) == 1
