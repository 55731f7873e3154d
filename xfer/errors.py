"""The one exception hierarchy of xfer.

Kernel and library errors are translated into these where they are raised; the
CLI maps each to an exit status and a one-line message (see ``xfer.cli``).
"""

from __future__ import annotations

import errno as _errno
import os
from typing import Any


class XferError(Exception):
    """Base of every error xfer raises on purpose. ``str()`` is a one-line reason."""


class UsageError(XferError):
    """The caller asked for something malformed (bad address, unknown kind...)."""


class KernelError(XferError):
    """A kernel call failed; ``errno`` holds the kernel's answer."""

    def __init__(self, errno: int, what: str) -> None:
        self.errno = errno
        super().__init__(f"{what}: {os.strerror(errno)} ({_errno.errorcode.get(errno, errno)})")


class NamespaceNotFound(XferError):
    """The named network namespace does not exist."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"network namespace {name!r} not found (see `ip netns list`)")


class PermissionDenied(XferError):
    """The operation needs a capability this process lacks."""


class BPFLoadError(XferError):
    """A BPF program failed to compile, load or attach."""


class BundleError(XferError):
    """A bundle is truncated, corrupted, of the wrong version, oversized or unsigned."""


class ForeignEntryError(BundleError):
    """A bundle holds state that does not belong to the VM it names."""


class ImportFailed(XferError):
    """An import failed and was rolled back; ``report`` says what happened."""

    def __init__(self, message: str, report: object | None = None) -> None:
        self.report = report
        super().__init__(message)


class MigrationCancelled(XferError):
    """The migration a request belongs to was rolled back meanwhile: nothing was done."""


class StoreExpired(XferError):
    """A bundle in the manager's store expired before the destination collected it."""


class AuthError(XferError):
    """A peer failed authentication or a signature did not verify."""


class HypervisorError(XferError):
    """The hypervisor (QEMU over QMP) refused, failed or went away during a migration."""


class QmpError(HypervisorError):
    """A QMP command failed; ``error_class`` is QEMU's class (e.g. ``GenericError``)."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        self.command = command
        self.error_class = error_class
        super().__init__(f"QMP {command}: {desc} ({error_class})")


class MigrationMessageError(HypervisorError):
    """The manager refused the migration message, failed, or missed the deadline."""


class FrameError(XferError):
    """A frame received from the network is malformed or truncated; it is ignored (and counted).

    ``reason`` is a short stable token for counters (``truncated``, ``bad-version``...).
    """

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


class AgentError(XferError):
    """A remote agent could not be reached, or failed or refused a request.

    ``status`` is the HTTP status (0 when there was no answer) and ``remote_type``
    the name of the error class the agent raised, so scripts can tell a refusal
    (``UsageError``: kind not held, wrong VM) from a failure.
    """

    def __init__(self, message: str, status: int = 0, remote_type: str = "") -> None:
        self.status = status
        self.remote_type = remote_type
        super().__init__(message)


class MigrationFailed(XferError):
    """A migration could not be done; its destinations were rolled back (``report`` says how)."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        self.report = report
        super().__init__(message)


class Overloaded(XferError):
    """The devices a migration needs are too busy to finish it within its deadline: not
    started (HTTP 503); try again after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)


class Conflict(UsageError):
    """A migration of that VM is already under way, or a device's request (device-driven
    variant) does not fit where its migration stands."""


class NotLeader(XferError):
    """This manager is not the leader of its group (etcd journal): nothing was done; ``leader`` is
    the message URL of the one that is, when known."""

    def __init__(self, message: str, leader: str | None = None) -> None:
        self.leader = leader
        super().__init__(message)
