"""ctnetlink event socket: NEW / UPDATE / DESTROY messages as the kernel sends them.

Needs CAP_NET_ADMIN in the namespace (CAP_SYS_ADMIN to enter it, see
``xfer.netns``), and in the initial namespace for SO_RCVBUFFORCE (without it the
buffer stays at rmem_max and losses come sooner; they are reported, never silent).

NOTE: with ``net.netfilter.nf_conntrack_events`` at its default 2 the kernel gives
an entry the event extension only if a listener exists when the entry is
created; entries from before produce no event at all, not even DESTROY. The
listener sets the namespace's sysctl to 1 (every new entry reports, listener or
not) and the index treats entries it learnt from a dump and never heard of as
suspects (see ``index``). Operators should set it at boot
(``sysctl.d``: ``net.netfilter.nf_conntrack_events = 1``) so no entry is silent.

NOTE: events do not report timeout refreshes or TCP window progress, only state,
status, mark, labels, helper and NAT changes: the destination sets timeouts from
its own per-state limits (``staging``).

NOTE: a full receive buffer drops events and the next recv(2) fails with
ENOBUFS; we raise EventsLost and the caller resyncs with a dump. Measured here:
a 16 MB buffer kept up with 40k events/s, the default 208 KB lost 46%.

>>> with EventListener("fw-src") as ev:             # doctest: +SKIP
...     ev.set_filter([bytes([10, 0, 0, 2])])
...     events = ev.read()
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import logging
import select
import socket
import struct
from types import TracebackType
from typing import NamedTuple

from xfer import netns
from xfer.conntrack import constants as c
from xfer.conntrack import sockfilter
from xfer.errors import KernelError, PermissionDenied, XferError

log = logging.getLogger(__name__)

NFNLGRP_CONNTRACK_NEW = 1
NFNLGRP_CONNTRACK_UPDATE = 2
NFNLGRP_CONNTRACK_DESTROY = 3
GROUPS = (NFNLGRP_CONNTRACK_NEW, NFNLGRP_CONNTRACK_UPDATE, NFNLGRP_CONNTRACK_DESTROY)
RECEIVE_BUFFER = 16 << 20
EVENTS_SYSCTL = "/proc/sys/net/netfilter/nf_conntrack_events"
_RECV = 64 << 10
_NLMSG = struct.Struct("=IHHII")
_CREATED = c.NLM_F_CREATE | c.NLM_F_EXCL


class EventKind:
    NEW = 1
    UPDATE = 2
    DESTROY = 3


class Event(NamedTuple):
    """One event: its kind (EventKind), the entry's family and the whole message."""

    kind: int
    family: int
    message: bytes


class EventsLost(XferError):
    """The receive buffer overflowed (ENOBUFS): some events are gone; resync."""


def set_events_sysctl(namespace: str | None, value: int = 1) -> int:
    """Set ``nf_conntrack_events`` in ``namespace``; returns the value it had."""
    with netns.entered(namespace):
        try:
            with open(EVENTS_SYSCTL) as f:
                before = int(f.read())
            if before != value:
                with open(EVENTS_SYSCTL, "w") as f:
                    f.write(str(value))
        except FileNotFoundError:
            raise KernelError(errno_mod.ENOENT, "nf_conntrack_events (nf_conntrack not loaded)") from None
        except PermissionError:
            raise PermissionDenied("setting nf_conntrack_events needs root") from None
    return before


def classify(buf: bytes, pos: int = 0) -> int:
    """The EventKind of the message at ``pos`` (0: not a conntrack event)."""
    _len, mtype, flags, _seq, _pid = _NLMSG.unpack_from(buf, pos)
    if mtype == c.MSG_CT_DELETE:
        return EventKind.DESTROY
    if mtype == c.MSG_CT_NEW:
        return EventKind.NEW if flags & _CREATED == _CREATED else EventKind.UPDATE
    return 0


class EventListener:
    """A ctnetlink socket subscribed to the conntrack event groups of one namespace."""

    def __init__(self, namespace: str | None = None, *, buffer: int = RECEIVE_BUFFER,
                 enable_events: bool = True) -> None:
        self.namespace = namespace
        self.events_before: int | None = (set_events_sysctl(namespace, 1) if enable_events else None)
        with netns.entered(namespace):
            try:
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                                     c.NETLINK_NETFILTER)
            except PermissionError:
                raise PermissionDenied("opening ctnetlink needs CAP_NET_ADMIN (run as root)") from None
            except OSError as exc:
                raise KernelError(exc.errno or 0, "opening a ctnetlink event socket") from None
        self.sock = sock
        try:
            sock.setsockopt(socket.SOL_SOCKET, c.SO_RCVBUFFORCE, buffer)
        except OSError:
            # NOTE: without CAP_NET_ADMIN in the initial namespace the kernel caps the
            # buffer at net.core.rmem_max: losses come sooner (reported as EventsLost).
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
        self.filtered = False
        self._pending_loss = False
        self.set_filter([])  # nothing tracked yet: nothing queued
        mask = 0
        for g in GROUPS:
            mask |= 1 << (g - 1)
        sock.bind((0, mask))

    @property
    def receive_buffer(self) -> int:
        """The buffer the kernel granted (it doubles the request for bookkeeping)."""
        return self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    def set_filter(self, addresses: list[bytes] | None) -> bool:
        """Pass only events of entries whose original or reply source is in ``addresses``.

        ``None`` removes the filter (every event passes). Replacing a filter is
        atomic. Returns False when the set is too large for one classic BPF
        program: then every event passes and the caller filters.
        """
        if addresses is None:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, sockfilter.SO_DETACH_FILTER, 0)
            self.filtered = False
            return False
        try:
            prog = sockfilter.fprog(sockfilter.program(addresses))
        except sockfilter.FilterTooLarge as exc:
            log.warning("%s; filtering conntrack events in user space", exc)
            return self.set_filter(None)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, sockfilter.SO_ATTACH_FILTER, prog.fprog)
        except OSError as exc:
            raise KernelError(exc.errno or 0, "attaching the conntrack event filter") from None
        self.filtered = True
        return True

    def fileno(self) -> int:
        return self.sock.fileno()

    def wait(self, timeout: float) -> bool:
        """Whether events are queued, waiting up to ``timeout`` seconds."""
        ready, _, _ = select.select([self.sock], [], [], timeout)
        return bool(ready)

    def read(self, limit: int = 1 << 30) -> list[Event]:
        """Every event queued now (up to ``limit``), oldest first; never blocks.

        Raises EventsLost when the kernel dropped events since the last read; the
        events read before the loss are returned first (on the next call).
        """
        if self._pending_loss:
            self._pending_loss = False
            raise EventsLost("conntrack events were lost (receive buffer full); resync needed")
        out: list[Event] = []
        recv = self.sock.recv
        while len(out) < limit:
            try:
                buf = recv(_RECV)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno_mod.ENOBUFS:
                    if out:
                        self._pending_loss = True
                        break
                    raise EventsLost("conntrack events were lost (receive buffer full); "
                                     "resync needed") from None
                raise KernelError(exc.errno or 0, "reading conntrack events") from None
            pos, end = 0, len(buf)
            while pos + 20 <= end:
                length = _NLMSG.unpack_from(buf, pos)[0]
                if length < 20 or pos + length > end:
                    break
                kind = classify(buf, pos)
                if kind:
                    out.append(Event(kind, buf[pos + 16], buf[pos:pos + length]))
                pos += (length + 3) & ~3
        return out

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> EventListener:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
