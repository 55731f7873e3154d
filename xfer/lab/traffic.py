"""Traffic peers for the lab: a line protocol driven over stdin/stdout.

Run inside a namespace as ``python -m xfer.lab.traffic MODE ...``:

    tcp-listen PORT          accept one TCP connection (IPv4 and IPv6)
    tcp-connect HOST PORT    connect to HOST
    udp-listen PORT [ADDR]   answer the last peer that wrote (bind ADDR so that
                             answers leave from the address the peer wrote to)
    udp-connect HOST PORT

Commands on stdin: ``send TEXT`` (one line), ``bulk N`` (N bytes as fast as the
socket takes them), ``quit``. Events on stdout: ``ready``, ``connected``,
``recv TEXT``, ``bulk N SECONDS`` (a whole bulk arrived), ``closed``, ``error ...``.
``Peer`` drives one from Python.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from xfer.lab.hosts import Hosts

_BULK = b"BULK "


def _emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _serve(sock: socket.socket, stream: bool, peer: tuple[str, int] | None = None) -> None:
    buf = b""
    bulk_left, bulk_size, bulk_start = 0, 0, 0.0
    stdin = sys.stdin.buffer
    while True:
        ready, _, _ = select.select([sock, stdin], [], [])
        if stdin in ready:
            line = stdin.readline().decode().rstrip("\n")
            if not line or line == "quit":
                return
            verb, _, arg = line.partition(" ")
            if verb == "send":
                data = (arg + "\n").encode()
            elif verb == "bulk":
                data = _BULK + arg.encode() + b"\n" + b"x" * int(arg)
            else:
                _emit(f"error unknown command {verb}")
                continue
            if stream:
                sock.sendall(data)
            elif peer is not None:
                sock.sendto(data, peer)
            else:
                sock.send(data)
        if sock in ready:
            if stream:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    _emit("closed")
                    return
            else:
                chunk, peer = sock.recvfrom(65535)
            buf += chunk
            while True:
                if bulk_left:
                    take = min(bulk_left, len(buf))
                    bulk_left -= take
                    buf = buf[take:]
                    if bulk_left:
                        break
                    _emit(f"bulk {bulk_size} {time.monotonic() - bulk_start:.6f}")
                nl = buf.find(b"\n")
                if nl < 0:
                    break
                line, buf = buf[:nl], buf[nl + 1:]
                if line.startswith(_BULK):
                    bulk_size = bulk_left = int(line[len(_BULK):])
                    bulk_start = time.monotonic()
                else:
                    _emit("recv " + line.decode(errors="replace"))


def main(argv: Sequence[str]) -> int:
    mode, *args = argv
    if mode == "tcp-listen":
        srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("::", int(args[0])))
        srv.listen(1)
        _emit("ready")
        conn, addr = srv.accept()
        _emit(f"connected {addr[0]}")
        _serve(conn, stream=True)
    elif mode == "tcp-connect":
        conn = socket.create_connection((args[0], int(args[1])), timeout=10)
        conn.settimeout(None)
        _emit("connected")
        _serve(conn, stream=True)
    elif mode == "udp-listen":
        addr = args[1] if len(args) > 1 else "::"
        sock = socket.socket(socket.AF_INET if "." in addr else socket.AF_INET6, socket.SOCK_DGRAM)
        if addr == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((addr, int(args[0])))
        _emit("ready")
        _serve(sock, stream=False)
    elif mode == "udp-connect":
        family = socket.AF_INET6 if ":" in args[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.connect((args[0], int(args[1])))
        _emit("connected")
        _serve(sock, stream=False)
    else:
        _emit(f"error unknown mode {mode}")
        return 2
    return 0


class Peer:
    """One traffic peer process in a lab namespace.

    >>> srv = Peer(hosts, "xfer-srv", "tcp-listen", "7000"); srv.expect("ready")  # doctest: +SKIP
    """

    def __init__(self, hosts: Hosts, ns: str, mode: str, *args: str,
                 argv: Sequence[str] | None = None) -> None:
        """A traffic peer (``mode``), or with ``argv`` any command whose output lines to read."""
        self.proc = hosts.spawn(
            ns, argv or [sys.executable, "-u", "-m", "xfer.lab.traffic", mode, *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self._buf = b""

    @classmethod
    def watch(cls, hosts: Hosts, ns: str, argv: Sequence[str]) -> Peer:
        """Read the output lines of any command (``ping``...) with ``expect``."""
        return cls(hosts, ns, "", argv=argv)

    def command(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((line + "\n").encode())
        self.proc.stdin.flush()

    def send(self, text: str) -> None:
        self.command(f"send {text}")

    def expect(self, prefix: str, timeout: float = 5.0) -> str | None:
        """The next event line starting with ``prefix``, or None after ``timeout`` seconds."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                text = line.decode(errors="replace")
                if text.startswith(prefix):
                    return text
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    return None
                self._buf += chunk


def conversation_continues(vm: Peer, srv: Peer, tag: str, timeout: float = 3) -> bool:
    """The server speaks first, then the VM answers: both must arrive.

    Server first, because a VM-first packet would be picked up mid-stream by a
    destination with tcp_loose=1 and pass without any transfer.
    """
    srv.send(f"{tag}-from-server")
    if not vm.expect(f"recv {tag}-from-server", timeout=timeout):
        return False
    vm.send(f"{tag}-from-vm")
    return srv.expect(f"recv {tag}-from-vm", timeout=timeout) is not None


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
