"""Addresses as configuration files and command lines write them: IP, port, HOST:PORT.

``name`` is what the caller calls the value, prefix included (``"agent config:
listen.udp"``, ``"--udp"``): the message names the file and key, or the flag, the
operator has to fix.

    >>> hostport("10.0.4.9:8701", "manager config: listen.udp")
    ('10.0.4.9', 8701)
    >>> hostport("[fd00::9]:8701", "--udp")
    ('fd00::9', 8701)
"""

from __future__ import annotations

import ipaddress
from typing import Any

from xfer.errors import UsageError


def check_ip(text: str, name: str) -> str:
    """``text`` when it is an IPv4 or IPv6 address; UsageError naming ``name`` otherwise."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise UsageError(f"{name} {text!r} is not an IP address") from None
    return text


def port(value: Any, name: str) -> int:
    """``value`` when it is a TCP/UDP port number (1-65535)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise UsageError(f"{name} must be a port number (1-65535)")
    return value


def hostport(text: Any, name: str) -> tuple[str, int]:
    """``ADDRESS:PORT`` (an IPv6 address in brackets) as (address, port)."""
    host, sep, number = str(text).rpartition(":")
    host = host.strip("[]")
    if not sep or not number.isdigit():
        raise UsageError(f"{name} must be ADDRESS:PORT")
    check_ip(host, name)
    return host, port(int(number), name)


def is_multicast(host: str) -> bool:
    """Whether ``host`` is a multicast address (False for a name or anything unparsable).

    >>> is_multicast("239.7.7.7"), is_multicast("10.0.4.9"), is_multicast("ff02::1")
    (True, False, True)
    """
    try:
        return ipaddress.ip_address(host).is_multicast
    except ValueError:
        return False
