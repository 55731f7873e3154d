"""Follow ports that appear later: snoop every new interface whose name matches a pattern.

A hypervisor creates a VM's tap when the VM's QEMU starts — on a migration's
destination that is seconds before the VM arrives, long after the snooper was
attached. ``PortFollower`` compiles the snooping program once, subscribes to the
namespace's link events (RTM_NEWLINK/RTM_DELLINK on a netlink socket) and, for
each new interface matching one of its patterns, marks it untrusted in the
``ports`` map and attaches the already loaded program: about a millisecond after
the kernel announced the interface, instead of the second a compile takes.

It needs the device attached first (``device.attach`` with the trusted port):
the maps must exist. Needs root (CAP_NET_ADMIN, CAP_BPF, CAP_SYS_ADMIN for setns).

    follower = PortFollower("sw2", ["tap*"], trusted=["up0"])
    follower.start()        # attaches to the matching ports present now, then follows
    ...                     # ip tuntap add tap-vm1 mode tap -> snooped within ~1 ms
    follower.stop()
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from xfer import netns
from xfer.dhcp import abi, datapath
from xfer.dhcp.store import pin_dir
from xfer.ebpf import loader
from xfer.errors import UsageError, XferError

log = logging.getLogger("xfer.dhcp")

RTMGRP_LINK = 0x1
RTM_NEWLINK, RTM_DELLINK = 16, 17
IFLA_IFNAME = 3
_NLMSG = struct.Struct("=IHHII")       # len, type, flags, seq, pid
_IFINFO = struct.Struct("=BxHiII")     # family, type, index, flags, change
_RTA = struct.Struct("=HH")


@dataclass(frozen=True)
class LinkEvent:
    kind: int          # RTM_NEWLINK or RTM_DELLINK
    index: int
    name: str | None


@dataclass(frozen=True)
class Followed:
    """One port the follower attached to; ``latency_s`` from the kernel's event to attached."""

    name: str
    index: int
    latency_s: float | None     # None: present at start, not announced


def parse_link_events(data: bytes) -> Iterator[LinkEvent]:
    """The link messages in one netlink datagram (others are skipped). Pure.

    >>> list(parse_link_events(b""))
    []
    """
    offset = 0
    while offset + _NLMSG.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(data, offset)
        if length < _NLMSG.size or offset + length > len(data):
            return   # truncated: nothing after it can be trusted
        body = offset + _NLMSG.size
        if kind in (RTM_NEWLINK, RTM_DELLINK) and body + _IFINFO.size <= offset + length:
            _family, _type, index, _iflags, _change = _IFINFO.unpack_from(data, body)
            yield LinkEvent(kind, index, _ifname_attr(data, body + _IFINFO.size, offset + length))
        offset += (length + 3) & ~3


def _ifname_attr(data: bytes, pos: int, end: int) -> str | None:
    while pos + _RTA.size <= end:
        length, kind = _RTA.unpack_from(data, pos)
        if length < _RTA.size or pos + length > end:
            return None
        if kind == IFLA_IFNAME:
            return data[pos + _RTA.size:pos + length].split(b"\0", 1)[0].decode(errors="replace")
        pos += (length + 3) & ~3
    return None


def link_socket(namespace: str | None, rcvbuf: int = 1 << 20) -> socket.socket:
    """A netlink socket in ``namespace`` subscribed to link events. CAP_SYS_ADMIN for setns."""
    with netns.entered(namespace):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((0, RTMGRP_LINK))
    except OSError:
        sock.close()
        raise
    return sock


class PortFollower:
    """Attach the snooper (untrusted role) to each interface matching ``patterns``, now and later.

    ``on_attach`` is called (from the follower's thread) with each ``Followed``.
    """

    def __init__(self, namespace: str | None, patterns: Sequence[str], trusted: Sequence[str],
                 mode: str = "enforce", on_attach: Callable[[Followed], None] | None = None,
                 max_bindings: int = abi.DEFAULT_MAX_BINDINGS) -> None:
        if not patterns:
            raise UsageError("no port pattern to follow")
        if mode not in datapath.MODES:
            raise UsageError(f"mode {mode!r} is not one of {', '.join(datapath.MODES)}")
        self.namespace = namespace
        self.patterns = tuple(patterns)
        self.trusted = tuple(trusted)
        self.mode = mode
        datapath.check_max_bindings(max_bindings)   # a bad limit fails now, not at the first port
        self.max_bindings = max_bindings
        self.on_attach = on_attach
        self.attached: dict[int, Followed] = {}
        self._pins = pin_dir(namespace)
        self._sock: socket.socket | None = None
        self._loaded: loader.Loaded | None = None
        self._ipr: Any = None
        self._wake_r, self._wake_w = -1, -1
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failed: BaseException | None = None

    def matches(self, name: str) -> bool:
        return name not in self.trusted and any(fnmatch.fnmatchcase(name, p) for p in self.patterns)

    def start(self) -> PortFollower:
        """Subscribe, compile, attach to the ports present, then follow on a thread."""
        if not os.path.exists(os.path.join(self._pins, "ports")):
            raise UsageError(f"the DHCP snooper is not attached in {self.namespace or 'this namespace'} "
                             "(attach it with its trusted port first)")
        try:
            # Subscribe before listing: a port created while we compile is in the socket's queue.
            self._sock = link_socket(self.namespace)
            self._loaded = loader.load(datapath.PROGRAM, loader.pin_dir(datapath.PIN_NAME, self.namespace),
                                       [f'-DDS_PIN_DIR="{self._pins}"'])
            self._wake_r, self._wake_w = os.pipe()
            self._thread = threading.Thread(target=self._run, name="dhcp-port-follower", daemon=True)
            self._thread.start()
            self._ready.wait()
            if self._failed is not None:
                raise self._failed
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop following; the attached ports stay attached (the datapath outlives us)."""
        if self._thread is not None:
            os.write(self._wake_w, b"x")
            self._thread.join(5)
            self._thread = None
        self._ready.clear()
        self._failed = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._loaded is not None:
            self._loaded.close()
            self._loaded = None

    def __enter__(self) -> PortFollower:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the thread -------------------------------------------------------------------------

    def _open_netlink(self) -> Any:
        from pyroute2 import IPRoute

        # NOTE: pyroute2's IPRoute(netns=...) forks a helper process and later signals it;
        # the fork shares asyncio's signal wakeup fd with a daemon (the agent), whose loop
        # then reads the helper's SIGTERM as its own and shuts down. And pyroute2 (0.9)
        # gives each thread its own socket, made in that thread's namespace: so the one
        # IPRoute is made, and only used, on this thread after setns(2).
        with netns.entered(self.namespace):
            ipr = IPRoute()
            ipr.link_lookup(ifname="lo")   # the socket exists (in this namespace) from here on
        return ipr

    def _run(self) -> None:
        try:
            self._follow()
        finally:
            if self._ipr is not None:
                with contextlib.suppress(Exception):
                    self._ipr.close()
                self._ipr = None

    def _follow(self) -> None:
        assert self._sock is not None
        try:
            self._ipr = self._open_netlink()
            self._resync()
        except BaseException as exc:
            self._failed = exc
            return
        finally:
            self._ready.set()
        while True:
            ready, _, _ = select.select([self._sock.fileno(), self._wake_r], [], [])
            if self._wake_r in ready:
                return
            received = time.monotonic()
            try:
                data = self._sock.recv(1 << 16)
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    # NOTE: the kernel dropped link events (our queue overflowed): list
                    # the interfaces again rather than miss a port.
                    log.warning("link events lost; listing the ports again")
                    self._resync()
                    continue
                log.error("link event socket failed: %s", exc)
                return
            for event in parse_link_events(data):
                self._handle(event, received)

    def _handle(self, event: LinkEvent, received: float | None) -> None:
        if event.kind == RTM_DELLINK:
            if self.attached.pop(event.index, None) is not None:
                with contextlib.suppress(XferError, OSError):
                    datapath.unconfigure(self._pins, event.index)
            return
        if event.name is None or not self.matches(event.name):
            return
        known = self.attached.get(event.index)
        if known is not None and known.name == event.name:
            return
        try:
            # The role first: the program lets an unconfigured port's packets through.
            datapath.configure(self._pins, {event.name: event.index}, self.trusted, self.mode,
                               self.max_bindings)
            loader.attach_loaded(self._loaded, self._ipr, event.name, self.namespace)  # type: ignore[arg-type]
        except (XferError, OSError) as exc:
            log.warning("could not snoop new port %s: %s", event.name, exc)
            return
        done = Followed(event.name, event.index,
                        None if received is None else time.monotonic() - received)
        self.attached[event.index] = done
        log.info("snooping new port %s (ifindex %d)", event.name, event.index)
        if self.on_attach is not None:
            self.on_attach(done)

    def _resync(self) -> None:
        with netns.entered(self.namespace):
            present = socket.if_nameindex()
        for index, name in present:
            self._handle(LinkEvent(RTM_NEWLINK, index, name), None)
