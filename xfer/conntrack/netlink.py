"""ctnetlink sockets: the only module that talks to the conntrack table.

Needs CAP_NET_ADMIN in the namespace the socket is opened in (and CAP_SYS_ADMIN
to enter a namespace, see ``xfer.netns``).
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import queue
import socket
import struct
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType

from xfer import netns
from xfer.conntrack import constants as c
from xfer.conntrack import wire
from xfer.errors import KernelError, PermissionDenied, XferError

_NLMSG = struct.Struct("=IHHII")
_ERR = struct.Struct("=i")
RECV_SIZE = 1 << 20
SEND_CHUNK = 256 * 1024
SOCKET_BUFFER = 16 << 20


class BatchInterrupted(XferError):
    """Building a batch failed part way: the first ``sent`` requests reached the kernel."""

    def __init__(self, sent: int, failures: dict[int, int], cause: Exception) -> None:
        self.sent = sent
        self.failures = failures
        super().__init__(f"batch interrupted after {sent} requests: {cause}")


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
            # without CAP_NET_ADMIN in the initial namespace: keep the defaults
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
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

    def _entries(self, request: bytes, what: str) -> Iterator[tuple[int, bytes]]:
        """Send a dump request; yield (family, attribute bytes) of each entry as the kernel sent it."""
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
                        raise KernelError(err, what)
                else:
                    yield buf[pos + 16], buf[pos + hdrlen:pos + length]
                pos += (length + 3) & ~3

    def dump(self, family: int, **selectors: object) -> Iterator[bytes]:
        """Entries of one family, filtered in the kernel; ``selectors`` as in ``wire.dump_request``."""
        request = wire.dump_request(family, self.next_seq(), **selectors)  # type: ignore[arg-type]
        for _family, blob in self._entries(request, f"conntrack dump (family {family})"):
            yield blob

    def dump_all(self, **selectors: object) -> Iterator[tuple[int, bytes]]:
        """Entries of every family in one walk of the table: (family, attribute bytes)."""
        request = wire.dump_request(0, self.next_seq(), **selectors)  # type: ignore[arg-type]
        return self._entries(request, "conntrack dump")

    # --- batched requests ------------------------------------------------------------

    def batch(self, messages: Iterable[tuple[int, bytes]]) -> dict[int, int]:
        """Send many requests, several per send(2); return ``{seq: errno}`` for the failures.

        Requests carry no NLM_F_ACK: the kernel answers only those that fail, so the
        answers stay few. ctnetlink handles a datagram synchronously inside send(2),
        so every answer is queued by the time send returns. A sender thread does the
        sending: send(2) releases the GIL, so the kernel inserts one chunk while this
        thread builds the next.
        """
        failures: dict[int, int] = {}
        chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=4)
        errors: list[BaseException] = []

        def sender() -> None:
            while (chunk := chunks.get()) is not None:
                if errors:
                    continue  # keep draining so the producer never blocks
                try:
                    self._send_chunk(chunk, failures)
                except BaseException as exc:  # re-raised in the caller's thread
                    errors.append(exc)

        thread = threading.Thread(target=sender, name="ctnetlink-batch")
        thread.start()
        produced = 0
        try:
            pending: list[bytes] = []
            size = 0
            try:
                for _seq, msg in messages:
                    if size + len(msg) > SEND_CHUNK and pending:
                        chunks.put(b"".join(pending))
                        pending, size = [], 0
                    pending.append(msg)
                    size += len(msg)
                    produced += 1
            finally:
                # What was produced before a failure is sent too, so the caller
                # knows exactly what reached the kernel (the first ``produced``).
                if pending:
                    chunks.put(b"".join(pending))
        except Exception as exc:
            chunks.put(None)
            thread.join()
            raise BatchInterrupted(produced, failures, exc) from exc
        chunks.put(None)
        thread.join()
        if errors:
            raise errors[0]
        return failures

    def _send_chunk(self, chunk: bytes, failures: dict[int, int]) -> None:
        try:
            self.sock.send(chunk)
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


def dump_many(namespace: str | None, requests: Sequence[tuple[int, dict[str, object]]]) -> list[list[bytes]]:
    """Run several filtered dumps at once, one socket and thread each.

    The kernel walks the whole table for every filtered dump, inside recv(2) and
    without the GIL; on separate cores the walks overlap, so two dumps of a
    200k-entry table cost little more than one.
    """
    def one(request: tuple[int, dict[str, object]]) -> list[bytes]:
        family, selectors = request
        with CtNetlink(namespace) as ct:
            return list(ct.dump(family, **selectors))

    if len(requests) <= 1:
        return [one(r) for r in requests]
    with ThreadPoolExecutor(max_workers=len(requests), thread_name_prefix="ctnetlink-dump") as pool:
        return list(pool.map(one, requests))


def table_size(namespace: str | None) -> int:
    """Entries in the namespace's conntrack table (nf_conntrack_count)."""
    with netns.entered(namespace), open("/proc/sys/net/netfilter/nf_conntrack_count") as f:
        return int(f.read())
