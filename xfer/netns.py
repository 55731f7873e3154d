"""Network namespace entry: the one privileged primitive every device command uses.

Entering uses setns(2) through libc rather than pyroute2 because importing
pyroute2 costs about 0.2 s here, which a one-shot ``xfer export`` inside the
pause window cannot afford. setns(2) changes the namespace of the calling
thread only; sockets opened inside stay bound to that namespace after leaving.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager

from xfer.errors import KernelError, NamespaceNotFound, PermissionDenied

NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def netns_path(name: str) -> str:
    """The bind-mount path of a named namespace (``ip netns`` convention) or ``name`` if a path."""
    return name if name.startswith("/") else os.path.join(NETNS_RUN_DIR, name)


def exists(name: str) -> bool:
    return os.path.exists(netns_path(name))


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        if err == errno.EPERM:
            raise PermissionDenied(f"setns into {what} needs CAP_SYS_ADMIN (run as root)")
        raise KernelError(err, f"setns into {what}")


@contextmanager
def entered(name: str | None) -> Iterator[None]:
    """Run the block inside network namespace ``name``; ``None`` stays where we are.

    Needs CAP_SYS_ADMIN. Example::

        with entered("fw-src"):
            sock = open_ctnetlink()   # bound to fw-src for its whole life
    """
    if not name:
        yield
        return
    path = netns_path(name)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NamespaceNotFound(name) from None
    except PermissionError:
        raise PermissionDenied(f"cannot open {path}: run as root") from None
    try:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target, f"namespace {name!r}")
            try:
                yield
            finally:
                _setns(home, "the original namespace")
        finally:
            os.close(home)
    finally:
        os.close(target)
