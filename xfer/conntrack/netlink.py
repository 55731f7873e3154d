"""ctnetlink sockets: the only module that talks to the conntrack table.

Needs CAP_NET_ADMIN in the namespace the socket is opened in (and CAP_SYS_ADMIN
to enter a namespace, see ``xfer.netns``).
"""

from __future__ import annotations

import errno as errno_mod
import socket
import struct
from collections.abc import Iterable, Iterator
from types import TracebackType

from xfer import netns
from xfer.conntrack import constants as c
from xfer.conntrack import wire
from xfer.errors import KernelError, PermissionDenied

_NLMSG = struct.Struct("=IHHII")
_ERR = struct.Struct("=i")
RECV_SIZE = 1 << 20
SEND_CHUNK = 256 * 1024
SOCKET_BUFFER = 16 << 20


class CtNetlink:
    """A ctnetlink socket bound to one network namespace.

    >>> with CtNetlink("fw-dst") as ct:            # doctest: +SKIP
    ...     entries = list(ct.dump(socket.AF_INET))
    """

    def __init__(self, namespace: str | None = None) -> None:
        self.namespace = namespace
        self._seq = 0
        with netns.entered(namespace):
            try:
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, c.NETLINK_NETFILTER)
            except PermissionError:
                raise PermissionDenied("opening ctnetlink needs CAP_NET_ADMIN (run as root)") from None
            except OSError as exc:
                raise KernelError(exc.errno or 0, "opening a ctnetlink socket") from None
        self.sock = sock
        for opt in (c.SO_SNDBUFFORCE, c.SO_RCVBUFFORCE):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
            except OSError:  # without CAP_NET_ADMIN in the init ns: keep the defaults
                pass
        # Error acks carry only the header of the failed request, not all of it.
        sock.setsockopt(c.SOL_NETLINK, c.NETLINK_CAP_ACK, 1)
        sock.bind((0, 0))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> CtNetlink:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def reserve(self, count: int) -> int:
        """Reserve ``count`` sequence numbers for a batch; returns the first."""
        first = self._seq + 1
        self._seq += count
        return first

    # --- dumps -------------------------------------------------------------------

    def dump_raw(self, request: bytes, family: int) -> Iterator[bytes]:
        """Send a dump request; yield each entry's attribute bytes as the kernel sent them."""
        self.sock.send(request)
        recv = self.sock.recv
        unpack = _NLMSG.unpack_from
        hdrlen = wire.NLMSG_HDRLEN
        while True:
            buf = recv(RECV_SIZE)
            pos, end = 0, len(buf)
            while pos + 16 <= end:
                length, mtype, _flags, _seq, _pid = unpack(buf, pos)
                if length < 16 or pos + length > end:
                    raise KernelError(errno_mod.EPROTO, "malformed ctnetlink message")
                if mtype == c.NLMSG_DONE:
                    return
                if mtype == c.NLMSG_ERROR:
                    err = -_ERR.unpack_from(buf, pos + 16)[0]
                    if err:
                        raise KernelError(err, f"conntrack dump (family {family})")
                elif buf[pos + 16] == family or not family:
                    yield buf[pos + hdrlen:pos + length]
                pos += (length + 3) & ~3

    def dump(self, family: int, **selectors: object) -> Iterator[bytes]:
        """Filtered dump; ``selectors`` are those of ``wire.dump_request``."""
        return self.dump_raw(wire.dump_request(family, self.next_seq(), **selectors), family)  # type: ignore[arg-type]

    # --- batched requests ------------------------------------------------------------

    def batch(self, messages: Iterable[tuple[int, bytes]]) -> dict[int, int]:
        """Send many requests, several per send(2); return ``{seq: errno}`` for the failures.

        Requests carry no NLM_F_ACK: the kernel answers only those that fail, so the
        answers stay few. ctnetlink handles a datagram synchronously inside send(2),
        so every answer is queued by the time send returns.
        """
        failures: dict[int, int] = {}
        chunk: list[bytes] = []
        size = 0
        for seq, msg in messages:
            if size + len(msg) > SEND_CHUNK and chunk:
                self._send_chunk(chunk, failures)
                chunk, size = [], 0
            chunk.append(msg)
            size += len(msg)
        if chunk:
            self._send_chunk(chunk, failures)
        return failures

    def _send_chunk(self, chunk: list[bytes], failures: dict[int, int]) -> None:
        try:
            self.sock.send(b"".join(chunk))
        except OSError as exc:
            raise KernelError(exc.errno or 0, "sending a ctnetlink batch") from None
        self._drain_errors(failures)

    def _drain_errors(self, failures: dict[int, int]) -> None:
        unpack = _NLMSG.unpack_from
        while True:
            try:
                buf = self.sock.recv(RECV_SIZE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno_mod.ENOBUFS:
                    raise KernelError(exc.errno, "ctnetlink answers overflowed the socket buffer") from None
                raise KernelError(exc.errno or 0, "reading ctnetlink answers") from None
            pos, end = 0, len(buf)
            while pos + 16 <= end:
                length, mtype, _f, _s, _p = unpack(buf, pos)
                if length < 16:
                    break
                if mtype == c.NLMSG_ERROR:
                    err = -_ERR.unpack_from(buf, pos + 16)[0]
                    # the echoed request header follows: its seq names the request
                    req_seq = unpack(buf, pos + 20)[3]
                    if err:
                        failures[req_seq] = err
                pos += (length + 3) & ~3
