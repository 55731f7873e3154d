"""ctnetlink sockets: the only module that talks to the conntrack table.

Needs CAP_NET_ADMIN in the namespace the socket is opened in (and CAP_SYS_ADMIN
to enter a namespace, see ``xfer.netns``).

NOTE: not pyroute2's NFCTSocket for bulk work (pyroute2 still does netns, links and
tc here). Its nfct_msg decodes every attribute of every dumped entry into Python
objects: measured on 2,000 dumped TCP entries, 3.08 s to decode them (1.5 ms an
entry), against 13.8 ms for xfer's whole import preparation of the same entries
(strict check and create requests), 224x; decode and encode again for a create,
744x (pyroute2 0.9.7, load average 8-11 on 2 cores; 20,000 entries: 32 s against
48 ms). xfer keeps the kernel's messages as received and patches them in place.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import os
import queue
import socket
import struct
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType

from xfer import netns
from xfer.conntrack import constants as c
from xfer.conntrack import stream, wire
from xfer.conntrack.stream import Stream
from xfer.errors import KernelError, PermissionDenied, XferError

_ERR = struct.Struct("=i")
RECV_SIZE = 1 << 20
# The kernel fills at most 32 KiB per dump read (netlink caps max_recvmsg_len), so
# a bigger buffer only costs an allocation (and its page faults) per read.
DUMP_RECV_SIZE = 64 << 10
SEND_CHUNK = 256 * 1024
SOCKET_BUFFER = 16 << 20
GIL_SWITCH_INTERVAL = 0.0005
_LONGEST_CONTROL = 36  # NLMSG_ERROR with NETLINK_CAP_ACK; NLMSG_DONE is 20
QUEUED_CHUNKS = 16  # built ahead of the sender: 4 MB at most


_switches_lock = threading.Lock()
_switches_users = 0
_switches_saved = 0.0


@contextlib.contextmanager
def _short_gil_switches() -> Iterator[None]:
    """A short GIL switch interval while a batch is being built beside its sender.

    The sender needs the GIL for a moment after each send(2); at the default 5 ms
    interval it waits on the producer that long, chunk after chunk (20k entries:
    60 ms against 50 ms of kernel work, with 0.5 ms). The interval is
    process-wide: the first batch in lowers it, the last one out restores it.
    """
    global _switches_users, _switches_saved
    with _switches_lock:
        if _switches_users == 0:
            _switches_saved = sys.getswitchinterval()
            sys.setswitchinterval(min(_switches_saved, GIL_SWITCH_INTERVAL))
        _switches_users += 1
    try:
        yield
    finally:
        with _switches_lock:
            _switches_users -= 1
            if _switches_users == 0:
                sys.setswitchinterval(_switches_saved)


class BatchInterrupted(XferError):
    """Building a batch failed part way: the first ``sent`` requests reached the kernel."""

    def __init__(self, sent: int, failures: dict[int, int], cause: Exception) -> None:
        self.sent = sent
        self.failures = failures
        super().__init__(f"batch interrupted after {sent} requests: {cause}")


class CtNetlink:
    """A ctnetlink socket bound to one network namespace.

    >>> with CtNetlink("fw-dst") as ct:            # doctest: +SKIP
    ...     entries = ct.dump_stream(socket.AF_INET)
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

    def _stream(self, request: bytes, what: str, sent: threading.Event | None = None) -> Stream:
        """Send a dump request; the entry messages of the answer as the kernel sent them.

        Receive buffers are kept whole (only the closing NLMSG_DONE is cut off):
        a dump answer copied entry by entry costs a microsecond an entry more.
        Messages are located a run of equal lengths at a time (``same_length_run``):
        a run of messages longer than NLMSG_DONE and NLMSG_ERROR holds entries only.
        """
        try:
            self.sock.send(request)
        finally:
            if sent is not None:
                sent.set()
        recv = self.sock.recv
        unpack = c.NLMSGHDR.unpack_from
        parts: list[bytes] = []
        offsets: list[int] = []
        base = 0
        while True:
            buf = recv(DUMP_RECV_SIZE)
            pos, end = 0, len(buf)
            words = memoryview(buf).cast("I") if end % 4 == 0 else None
            while pos + 16 <= end:
                length, mtype, _flags, _seq, _pid = unpack(buf, pos)
                if length < 16 or pos + length > end:
                    raise KernelError(errno_mod.EPROTO, "malformed ctnetlink message")
                if mtype == c.NLMSG_DONE:
                    # the dump's own error, if it failed part way, rides on DONE
                    err = -_ERR.unpack_from(buf, pos + 16)[0] if length >= 20 else 0
                    if err > 0:
                        raise KernelError(err, what)
                    parts.append(buf[:pos])
                    return Stream(b"".join(parts), offsets)
                if mtype == c.NLMSG_ERROR:
                    err = -_ERR.unpack_from(buf, pos + 16)[0]
                    raise KernelError(err or errno_mod.EPROTO, what)
                step = (length + 3) & ~3
                run = (stream.same_length_run(words, pos, length, end)
                       if words is not None and length > _LONGEST_CONTROL else 1)
                offsets += range(base + pos, base + pos + run * step, step)
                pos += run * step
            parts.append(buf)
            base += end

    def dump_stream(self, family: int, *, sent: threading.Event | None = None,
                    **selectors: object) -> Stream:
        """Entries of one family, filtered in the kernel; ``selectors`` as in ``wire.dump_request``.

        ``sent`` is set once the request is handed over (see ``dump_many``).
        """
        request = wire.dump_request(family, self.next_seq(), **selectors)  # type: ignore[arg-type]
        return self._stream(request, f"conntrack dump (family {family})", sent)

    def dump_all(self, **selectors: object) -> Stream:
        """Entries of every family in one walk of the table."""
        request = wire.dump_request(0, self.next_seq(), **selectors)  # type: ignore[arg-type]
        return self._stream(request, "conntrack dump")

    # --- batched requests ------------------------------------------------------------

    def batch(self, messages: Iterable[tuple[int, bytes]]) -> dict[int, int]:
        """Send many requests, several per send(2); return ``{seq: errno}`` for the failures.

        Requests carry no NLM_F_ACK: the kernel answers only those that fail, so the
        answers stay few.
        """
        def chunks() -> Iterator[tuple[bytes, int]]:
            pending: list[bytes] = []
            size = 0
            try:
                for _seq, msg in messages:
                    if size + len(msg) > SEND_CHUNK and pending:
                        yield b"".join(pending), len(pending)
                        pending, size = [], 0
                    pending.append(msg)
                    size += len(msg)
            except Exception:
                # What was built before the failure is sent too, so the caller
                # knows exactly what reached the kernel (BatchInterrupted.sent).
                if pending:
                    yield b"".join(pending), len(pending)
                raise
            if pending:
                yield b"".join(pending), len(pending)

        return self.send_chunks(chunks())

    def send_now(self, messages: Sequence[bytes]) -> dict[int, int]:
        """Send a few requests from this thread, several per send(2); ``{seq: errno}`` of
        the failures. For small batches (a delta in the pause): no sender thread to
        start, no GIL hand-over per chunk."""
        failures: dict[int, int] = {}
        chunk: list[bytes] = []
        size = 0
        for msg in messages:
            if size + len(msg) > SEND_CHUNK and chunk:
                self._send_chunk(b"".join(chunk), failures)
                chunk, size = [], 0
            chunk.append(msg)
            size += len(msg)
        if chunk:
            self._send_chunk(b"".join(chunk), failures)
        return failures

    def send_chunks(self, chunks: Iterable[tuple[bytes | bytearray | memoryview, int]]) -> dict[int, int]:
        """Send ready-made runs of requests (bytes, how many requests); ``{seq: errno}`` of failures.

        ctnetlink handles a datagram synchronously inside send(2), so every answer
        is queued by the time send returns. A sender thread does the sending:
        send(2) releases the GIL, so the kernel inserts one chunk while this thread
        builds the next. A chunk the iterator fails to build raises
        BatchInterrupted, saying how many requests went before.
        """
        failures: dict[int, int] = {}
        queued: queue.Queue[bytes | bytearray | memoryview | None] = queue.Queue(maxsize=QUEUED_CHUNKS)
        errors: list[BaseException] = []

        def sender() -> None:
            while (chunk := queued.get()) is not None:
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
            with _short_gil_switches():
                for chunk, count in chunks:
                    queued.put(chunk)
                    produced += count
        except Exception as exc:
            queued.put(None)
            thread.join()
            raise BatchInterrupted(produced, failures, exc) from exc
        queued.put(None)
        thread.join()
        if errors:
            raise errors[0]
        return failures

    def get_many(self, requests: Sequence[bytes]) -> Stream:
        """Send CT_GET requests (one entry each, by tuple), several per send(2); the
        entries found, as the kernel answered. Entries not found answer ENOENT and are
        left out; any other error raises.

        A get is a hash lookup, not a walk of the table: this re-reads a few entries
        in O(their number) whatever the size of the host's table.
        """
        parts: list[bytes] = []
        unpack = c.NLMSGHDR.unpack_from
        i = 0
        while i < len(requests):
            chunk: list[bytes] = []
            size = 0
            # answers are a few hundred bytes each: keep each round well inside the buffer
            while i < len(requests) and size < SEND_CHUNK and len(chunk) < 4096:
                chunk.append(requests[i])
                size += len(requests[i])
                i += 1
            try:
                self.sock.send(b"".join(chunk))
            except OSError as exc:
                raise KernelError(exc.errno or 0, "sending conntrack gets") from None
            while True:
                try:
                    buf = self.sock.recv(RECV_SIZE, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                except OSError as exc:
                    raise KernelError(exc.errno or 0, "reading conntrack get answers") from None
                pos, end = 0, len(buf)
                while pos + 16 <= end:
                    length, mtype, _f, _s, _p = unpack(buf, pos)
                    if length < 16 or pos + length > end:
                        break
                    if mtype == c.NLMSG_ERROR:
                        err = -_ERR.unpack_from(buf, pos + 16)[0]
                        if err and err != errno_mod.ENOENT:
                            raise KernelError(err, "conntrack get")
                    elif mtype == c.MSG_CT_NEW:
                        parts.append(buf[pos:pos + length] + bytes(-length % 4))
                    pos += (length + 3) & ~3
        return stream.from_parts(parts)

    def _send_chunk(self, chunk: bytes | bytearray | memoryview, failures: dict[int, int]) -> None:
        try:
            self.sock.send(chunk)
        except OSError as exc:
            raise KernelError(exc.errno or 0, "sending a ctnetlink batch") from None
        self._drain_errors(failures)

    def _drain_errors(self, failures: dict[int, int]) -> None:
        unpack = c.NLMSGHDR.unpack_from
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


def dump_many(namespace: str | None, requests: Sequence[tuple[int, dict[str, object]]]) -> list[Stream]:
    """Run several filtered dumps at once, one socket and thread each.

    The kernel walks the whole table for every filtered dump, inside recv(2) and
    without the GIL; on separate cores the walks overlap, so two dumps of a
    200k-entry table cost little more than one. Two things keep them overlapping:

    - NOTE: ctnetlink runs a dump's first batch inside send(2) under the
      subsystem's mutex, and a dump that matches little fills its first batch
      only at the end of its walk: sent while another dump is still starting, it
      holds that one back for its whole walk. The requests go out in the order
      given, each once the one before has been handed over; callers put first
      the dump likely to match most.
    - Each thread is pinned to a core of its own: left to the scheduler, two
      fresh threads often start on the same core and the walks run one after
      the other.
    """
    cpus = sorted(os.sched_getaffinity(0))
    handed_over = [threading.Event() for _ in requests]

    def one(job: tuple[int, tuple[int, dict[str, object]]]) -> Stream:
        index, (family, selectors) = job
        if len(requests) > 1 and len(cpus) > 1:
            os.sched_setaffinity(0, {cpus[index % len(cpus)]})  # this thread only
        if index:
            handed_over[index - 1].wait()
        try:
            with CtNetlink(namespace) as ct:
                return ct.dump_stream(family, sent=handed_over[index], **selectors)
        finally:
            handed_over[index].set()  # also when the socket or the send failed

    if len(requests) <= 1:
        return [one(job) for job in enumerate(requests)]
    with ThreadPoolExecutor(max_workers=len(requests), thread_name_prefix="ctnetlink-dump") as pool:
        return list(pool.map(one, enumerate(requests)))


def table_size(namespace: str | None) -> int:
    """Entries in the namespace's conntrack table (nf_conntrack_count)."""
    with netns.entered(namespace), open("/proc/sys/net/netfilter/nf_conntrack_count") as f:
        return int(f.read())
