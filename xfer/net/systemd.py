"""Readiness for systemd's ``Type=notify``: one datagram to ``$NOTIFY_SOCKET``.

The protocol is a line of ``KEY=VALUE`` on a Unix datagram socket whose path
systemd passes in the environment (``@`` starts an abstract name). Twenty lines
here rather than a dependency (python-systemd needs libsystemd's headers to build).

    notify("READY=1")        # once listening; False when not run by systemd
    notify("STOPPING=1")
"""

from __future__ import annotations

import os
import socket


def notify(state: str, environ: dict[str, str] | None = None) -> bool:
    """Tell the service manager ``state``; False when there is none to tell (no $NOTIFY_SOCKET).

    A socket that cannot be reached is not an error of the daemon's: it is ignored.

    >>> notify("READY=1", environ={})
    False
    """
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True
