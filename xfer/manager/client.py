"""Sending migration messages to the manager: HTTPS (the hook's client) or one UDP datagram.

HTTP goes through ``xfer.hypervisor.notify`` (the client the QEMU hook uses), so
the CLI and the hook speak to the manager the same way.

    report = send_http("https://10.0.4.9:8700/v1/migrations", msg, ctx, timeout=5)
    answer = send_udp(("239.7.7.7", 8702), msg, timeout=5, interface="10.0.4.20")
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from typing import Any

from xfer.errors import MigrationMessageError
from xfer.hypervisor.notify import DEFAULT_MANAGER_URL, send_migration_message
from xfer.manager import messages
from xfer.manager.messages import Message

DEFAULT_URL = DEFAULT_MANAGER_URL


def send_http(url: str, msg: Message | dict[str, Any], ssl_context: ssl.SSLContext | None,
              timeout: float = 30.0) -> dict[str, Any]:
    """POST one message and return the manager's report (MigrationMessageError otherwise).

    >>> send_http(DEFAULT_URL, msg, ctx)["state"]     # doctest: +SKIP
    'committed'
    """
    return asyncio.run(send_migration_message(url, msg, time.monotonic() + timeout, ssl_context))


def send_udp(address: tuple[str, int], msg: Message | dict[str, Any], timeout: float = 5.0,
             interface: str | None = None, wait: bool = True, copies: int = 1) -> dict[str, Any] | None:
    """Send one datagram (unicast or to a multicast group) and wait for the first answer.

    ``interface``: the local address multicast leaves from (and the source of the datagram).
    ``copies``: send it that many times back to back (a lossy network's remedy; the manager
    and the agents act on one of them when the message has an id).
    """
    data = messages.encode(msg)
    sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if interface:
            sock.bind((interface, 0))
            if _is_multicast(address[0]):
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(interface))
        for _ in range(max(1, copies)):
            sock.sendto(data, address)
        if not wait:
            return None
        sock.settimeout(timeout)
        try:
            reply, _ = sock.recvfrom(65535)
        except TimeoutError:
            raise MigrationMessageError(f"no answer from the manager at {address[0]}:{address[1]} "
                                        f"within {timeout} s") from None
    finally:
        sock.close()
    answer: dict[str, Any] = json.loads(reply)
    if not answer.get("ok"):
        raise MigrationMessageError(f"manager answered: {answer.get('error', 'failed')}")
    return answer


def _is_multicast(host: str) -> bool:
    try:
        return 224 <= int(host.split(".")[0]) <= 239
    except ValueError:
        return False
