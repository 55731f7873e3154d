"""Privilege separation for the agent: a small privileged helper does the kernel work.

The process that terminates TLS and parses HTTP, JSON, zstd and other devices'
bundles should not hold CAP_NET_ADMIN, CAP_BPF or CAP_SYS_ADMIN. The helper
(``Helper.start``: a fresh interpreter on one end of a socketpair, as OpenSSH's
monitor and OpenStack's oslo.privsep daemon are) holds them and performs only
what it is asked over that channel, for the namespace and kinds it was started
with:

- ``export`` (VM, kinds) -> the bundle it exported;
- ``import`` (a bundle, the VM the request named, kinds) -> the import report;
  the helper reads the bundle strictly again (``xfer.bundle.decode`` and each
  kind's import checks), so a network process that lies gains nothing;
- ``forget`` (VM, kinds) -> per-kind reports;
- ``socket`` (family, type) -> an unconnected socket opened in the namespace,
  passed back with SCM_RIGHTS (outgoing connections of push/pull);
- ``counts`` -> per-kind counts for ``/status``, ``dhcp_counters`` -> the DHCP
  guard's counters for ``/metrics``; ``keep_dhcp`` starts the DHCP snooping
  database keeper (and port follower) in the helper;
- ``precopy_*``: pre-copy's tracker (changes since a cursor) and stages (stage a
  delta section, read strictly as an import is; cursor, abort, expire), which
  read and write ctnetlink (``Helper.precopy``).

``drop_capabilities`` empties the calling process's capability sets and bounding
set (and switches user); ``separate`` does it for a running agent, replacing the
event loop's executor threads, which were created with capabilities (they are per
thread). ``xfer agent serve`` uses all this with ``[privsep] user = ...``
(docs/privsep.md).

    helper = Helper.start("fw-src", [Kind.CONNTRACK])
    drop_capabilities()
    bundle = helper.transfer.export_bundle(vm, [Kind.CONNTRACK], "fw-src")
    helper.stop()
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import json
import os
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from xfer import bundle as bundle_mod
from xfer import errors
from xfer.errors import BundleError, KernelError, PermissionDenied, UsageError, XferError
from xfer.model import Kind, KindReport, VmIdentity
from xfer.transfer import ImportReport, Options

_FRAME = struct.Struct("!II")           # header length, payload length
MAX_HEADER = 1 << 20
MAX_PAYLOAD = 256 << 20                  # above any agent's max_bundle_bytes


# --- the channel ---------------------------------------------------------------------

def _send(sock: socket.socket, header: dict[str, Any], payload: bytes = b"",
          fds: Sequence[int] = ()) -> None:
    head = json.dumps(header, separators=(",", ":")).encode()
    first = _FRAME.pack(len(head), len(payload)) + head
    if fds:
        socket.send_fds(sock, [first], list(fds))
    else:
        sock.sendall(first)
    if payload:
        sock.sendall(payload)


def _recv_exact(sock: socket.socket, n: int, got: bytes = b"") -> bytes:
    parts, have = [got], len(got)
    while have < n:
        chunk = sock.recv(min(n - have, 1 << 20))
        if not chunk:
            raise PermissionDenied("privileged helper channel closed")
        parts.append(chunk)
        have += len(chunk)
    return b"".join(parts)


def _recv(sock: socket.socket) -> tuple[dict[str, Any], bytes, list[int]]:
    data, fds, _, _ = socket.recv_fds(sock, _FRAME.size, 4)
    if not data:
        raise PermissionDenied("privileged helper channel closed")
    head_len, payload_len = _FRAME.unpack(_recv_exact(sock, _FRAME.size, data))
    if head_len > MAX_HEADER or payload_len > MAX_PAYLOAD:
        for fd in fds:
            os.close(fd)
        raise UsageError("privileged helper: oversized message")
    header = json.loads(_recv_exact(sock, head_len))
    return header, _recv_exact(sock, payload_len) if payload_len else b"", fds


def _error_header(exc: XferError) -> dict[str, Any]:
    report = getattr(exc, "report", None)
    return {"error": type(exc).__name__, "message": str(exc),
            "errno": getattr(exc, "errno", None),
            "report": _report_dict(report) if isinstance(report, ImportReport) else None}


def _raise_from(header: dict[str, Any]) -> None:
    """Re-raise the helper's error as the same class from ``xfer.errors`` (XferError if unknown)."""
    cls = getattr(errors, str(header.get("error")), XferError)
    if not (isinstance(cls, type) and issubclass(cls, XferError)):
        cls = XferError
    exc = cls.__new__(cls)
    Exception.__init__(exc, header.get("message", ""))
    if header.get("errno") is not None:
        exc.errno = header["errno"]  # type: ignore[attr-defined]
    if cls is errors.ImportFailed:
        exc.report = _report_from(header["report"]) if header.get("report") else None  # type: ignore[attr-defined]
    raise exc


def _report_dict(report: ImportReport) -> dict[str, Any]:
    return {"kinds": {k.value: {**r.to_dict(), "errors": r.errors} for k, r in report.kinds.items()},
            "errors": {k.value: e for k, e in report.errors.items()}, "seconds": report.seconds}


def _kind_report(kind: Kind, d: dict[str, Any]) -> KindReport:
    return KindReport(kind, d["created"], d["updated"], d["skipped"], d["failed"], d["deleted"],
                      list(d["errors"]), list(d["warnings"]), bool(d["rolled_back"]),
                      float(d["seconds"]))


def _report_from(d: dict[str, Any]) -> ImportReport:
    return ImportReport(kinds={Kind(k): _kind_report(Kind(k), r) for k, r in d["kinds"].items()},
                        errors={Kind(k): e for k, e in d["errors"].items()},
                        seconds=float(d["seconds"]))


def _options(options: Options | None) -> dict[str, Any]:
    return {k.value: dict(v) for k, v in (options or {}).items()}


# --- the network-facing side -------------------------------------------------------------

@dataclass(frozen=True)
class DhcpPorts:
    """The DHCP snooper's ports as configured (``[dhcp]``): what the helper keeps and follows."""

    trusted: str
    untrusted: list[str]
    max_bindings: int


@dataclass(frozen=True)
class HelperSettings:
    """What the helper is configured with at start (from the agent's configuration, before
    the split): the network side can ask it to act within these, never to change them."""

    dhcp: DhcpPorts | None = None
    precopy_trust_seed: bool = False
    precopy_expire_s: float = 600.0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> HelperSettings:
        d = json.loads(text)
        return cls(DhcpPorts(**d["dhcp"]) if d.get("dhcp") else None,
                   bool(d.get("precopy_trust_seed")), float(d.get("precopy_expire_s", 600.0)))


class PrivilegedTransfer:
    """``xfer.transfer``'s agent-facing API (``TransferApi``), performed by the helper.

    One request at a time on the channel (a lock): the helper is single-threaded,
    as the kernel serializes ctnetlink creates anyway.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = threading.Lock()

    def _call(self, header: dict[str, Any], payload: bytes = b"") -> tuple[dict[str, Any], bytes, list[int]]:
        with self._lock:
            _send(self._sock, header, payload)
            answer, data, fds = _recv(self._sock)
        if "error" in answer:
            for fd in fds:
                os.close(fd)
            _raise_from(answer)
        return answer, data, fds

    def export_bundle(self, vm: VmIdentity, kinds: Sequence[Kind], namespace: str | None = None, *,
                      device: str | None = None, options: Options | None = None) -> bundle_mod.Bundle:
        _, data, _ = self._call({"op": "export", "vm": vm.to_dict(), "kinds": [k.value for k in kinds],
                                 "device": device, "options": _options(options)})
        return bundle_mod.decode(data, max_size=MAX_PAYLOAD)

    def import_bundle(self, bundle: bundle_mod.Bundle, namespace: str | None = None, *,
                      vm: VmIdentity | None = None, kinds: Iterable[Kind] | None = None,
                      options: Options | None = None) -> ImportReport:
        wanted = list(kinds) if kinds is not None else None
        if wanted is not None:      # the agent imports a kind at a time: send only its section
            bundle = dataclasses.replace(bundle, sections={k: s for k, s in bundle.sections.items()
                                                           if k in wanted})
        answer, _, _ = self._call({"op": "import", "vm": (vm or bundle.vm).to_dict(),
                                   "kinds": [k.value for k in wanted] if wanted is not None else None,
                                   "options": _options(options)}, bundle_mod.encode(bundle))
        return _report_from(answer["report"])

    def forget(self, vm: VmIdentity, kinds: Sequence[Kind], namespace: str | None = None, *,
               options: Options | None = None) -> dict[Kind, KindReport]:
        answer, _, _ = self._call({"op": "forget", "vm": vm.to_dict(), "kinds": [k.value for k in kinds],
                                   "options": _options(options)})
        return {Kind(k): _kind_report(Kind(k), r) for k, r in answer["reports"].items()}

    def open_socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
        """An unconnected socket opened in the helper's namespace (for outgoing connections)."""
        _, _, fds = self._call({"op": "socket", "family": int(family), "type": int(type)})
        if len(fds) != 1:
            raise PermissionDenied("privileged helper sent no socket")
        return socket.socket(fileno=fds[0])

    def counts(self) -> dict[str, Any]:
        """Per-kind counts for ``/status`` (``xfer.agent.status.counts``), read by the helper."""
        answer, _, _ = self._call({"op": "counts"})
        return dict(answer["counts"])

    def dhcp_counters(self) -> dict[str, dict[str, int]]:
        """The DHCP guard's per-port counters for ``/metrics``, read by the helper."""
        answer, _, _ = self._call({"op": "dhcp_counters"})
        return dict(answer["counters"])

    def keep_dhcp(self) -> None:
        """Have the helper keep the DHCP snooping database (once the snooper is attached)."""
        self._call({"op": "keep_dhcp"})

    def socket_factory(self, addr_info: Any) -> socket.socket:
        """aiohttp's ``socket_factory``: outgoing connections from the device's namespace."""
        family, type_, _, _, _ = addr_info
        sock = self.open_socket(family, type_)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


class HelperPrecopySource:
    """``xfer.agent.precopy.PrecopySource`` in the helper: its tracker reads ctnetlink."""

    started = None          # no index in this process: shared exports walk nothing here

    def __init__(self, transfer: PrivilegedTransfer) -> None:
        self._transfer = transfer

    def changes(self, vm: VmIdentity, cursor: str) -> bundle_mod.Section:
        answer, data, _ = self._transfer._call({"op": "precopy_changes", "vm": vm.to_dict(),
                                                "cursor": cursor})
        return bundle_mod.Section(Kind.CONNTRACK, str(answer["encoding"]), int(answer["count"]), data,
                                  dict(answer["meta"]))

    def stats(self) -> dict[str, int]:
        return dict(self._transfer._call({"op": "precopy_status"})[0]["source"])

    def close(self) -> None:
        """The helper stops its tracker when the agent closes the channel."""


class HelperPrecopyStages:
    """``xfer.agent.precopy.PrecopyStages`` in the helper: staging writes the conntrack table."""

    def __init__(self, transfer: PrivilegedTransfer) -> None:
        self._transfer = transfer

    def _ask(self, header: dict[str, Any], payload: bytes = b"") -> dict[str, Any]:
        return self._transfer._call(header, payload)[0]

    def stage(self, session: str, vm: VmIdentity, section: bundle_mod.Section, final: bool
              ) -> dict[str, Any]:
        return dict(self._ask({"op": "precopy_stage", "session": session, "vm": vm.to_dict(),
                               "encoding": section.encoding, "count": section.count,
                               "meta": dict(section.meta), "final": final}, section.payload)["staged"])

    def cursor(self, session: str) -> str:
        return str(self._ask({"op": "precopy_cursor", "session": session})["cursor"])

    def abort(self, session: str) -> int:
        return int(self._ask({"op": "precopy_abort", "session": session})["removed"])

    def abort_vm(self, vm: VmIdentity) -> int:
        return int(self._ask({"op": "precopy_abort_vm", "vm": vm.to_dict()})["removed"])

    def expire(self) -> list[str]:
        return [str(x) for x in self._ask({"op": "precopy_expire"})["sessions"]]

    def sessions(self) -> dict[str, dict[str, object]]:
        return dict(self._ask({"op": "precopy_status"})["stages"])

    def close(self) -> None:
        """The helper aborts what is still staged when the agent closes the channel."""


@dataclass
class Helper:
    """The running helper process and the transfer API that talks to it."""

    process: subprocess.Popen[bytes]
    transfer: PrivilegedTransfer
    sock: socket.socket = field(repr=False)

    @property
    def precopy(self) -> tuple[HelperPrecopySource, HelperPrecopyStages]:
        """Pre-copy's kernel side (``PrecopyOps(kernel=...)``), done by the helper."""
        return HelperPrecopySource(self.transfer), HelperPrecopyStages(self.transfer)

    @classmethod
    def start(cls, namespace: str | None, kinds: Sequence[Kind],
              settings: HelperSettings | None = None) -> Helper:
        """Start the helper (a fresh interpreter; it keeps this process's capabilities).

        ``settings`` (the snooper's ports, pre-copy's) come from the configuration and
        are fixed here: the network side can ask the helper to keep those ports, never
        to name others.

        >>> helper = Helper.start("fw-src", [Kind.CONNTRACK])  # doctest: +SKIP
        """
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv = [sys.executable, "-c", "import sys; from xfer.agent.privsep import main; "
                "sys.exit(main(sys.argv[1:]))", str(theirs.fileno()), namespace or "",
                ",".join(k.value for k in kinds), (settings or HelperSettings()).to_json()]
        try:
            proc = subprocess.Popen(argv, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        helper = cls(proc, PrivilegedTransfer(mine), mine)
        try:
            answer, _, _ = helper.transfer._call({"op": "hello"})
        except BaseException:
            helper.stop()
            raise
        if answer.get("namespace") != (namespace or ""):
            helper.stop()
            raise PermissionDenied("privileged helper serves another namespace")
        return helper

    def stop(self) -> None:
        self.sock.close()          # the helper exits at end of file
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# --- the privileged side -------------------------------------------------------------------

class _Served:
    """What the helper does for one request; refuses anything outside its namespace and kinds."""

    def __init__(self, namespace: str | None, kinds: Sequence[Kind],
                 settings: HelperSettings | None = None) -> None:
        from xfer import transfer

        self.namespace, self.kinds, self.transfer = namespace, tuple(kinds), transfer
        self.settings = settings or HelperSettings()
        self._precopy: tuple[Any, Any] | None = None    # PrecopySource, PrecopyStages (lazily)
        self.keeper: Any = None     # stops the DHCP database keeper, once started

    def _kinds(self, names: Any) -> list[Kind]:
        if not isinstance(names, list):
            raise UsageError("privileged helper: kinds must be a list")
        kinds = [Kind(str(n)) for n in names]
        foreign = [k.value for k in kinds if k not in self.kinds]
        if foreign:
            raise UsageError(f"privileged helper: this device does not hold {', '.join(foreign)}")
        return kinds

    def handle(self, header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes, list[int]]:
        op = header.get("op")
        options = {Kind(k): v for k, v in (header.get("options") or {}).items()}
        if op == "hello":
            return {"namespace": self.namespace or ""}, b"", []
        if op == "counts":
            from xfer.agent import status

            return {"counts": status.counts(self.kinds, self.namespace)}, b"", []
        if op == "dhcp_counters":
            from xfer.agent import status

            return {"counters": status.dhcp_counters(self.namespace)}, b"", []
        if op == "keep_dhcp":
            # it reads the pinned maps every second, which the network side no longer can
            if Kind.DHCP not in self.kinds:
                raise UsageError("privileged helper: this device does not hold dhcp")
            if self.keeper is None:
                self.keeper = _dhcp_keeper(self.namespace, self.settings.dhcp)
            return {}, b"", []
        if op == "export":
            vm = VmIdentity.from_dict(header["vm"])
            bundle = self.transfer.export_bundle(vm, self._kinds(header["kinds"]), self.namespace,
                                                 device=header.get("device"), options=options)
            return {}, bundle_mod.encode(bundle), []
        if op == "import":
            bundle = bundle_mod.decode(payload, max_size=MAX_PAYLOAD)   # read again, strictly
            vm_named = VmIdentity.from_dict(header["vm"])   # always named: checked against the bundle
            kinds = (self._kinds(header["kinds"]) if header.get("kinds") is not None
                     else self._kinds([k.value for k in bundle.sections]))
            report = self.transfer.import_bundle(bundle, self.namespace, vm=vm_named, kinds=kinds,
                                                 options=options)
            return {"report": _report_dict(report)}, b"", []
        if op == "forget":
            vm = VmIdentity.from_dict(header["vm"])
            reports = self.transfer.forget(vm, self._kinds(header["kinds"]), self.namespace,
                                           options=options)
            return {"reports": {k.value: {**r.to_dict(), "errors": r.errors}
                                for k, r in reports.items()}}, b"", []
        if isinstance(op, str) and op.startswith("precopy_"):
            return self._precopy_op(op, header, payload)
        if op == "socket":
            family, kind = int(header["family"]), int(header["type"])
            if family not in (socket.AF_INET, socket.AF_INET6) or kind != socket.SOCK_STREAM:
                raise UsageError("privileged helper: only TCP sockets are handed out")
            from xfer import netns

            with netns.entered(self.namespace):
                s = socket.socket(family, kind)
            return {}, b"", [s.detach()]
        raise UsageError(f"privileged helper: no operation {op!r}")

    def precopy(self) -> tuple[Any, Any]:
        """The tracker (source side) and the stages (destination side), made at first use."""
        if Kind.CONNTRACK not in self.kinds:
            raise UsageError("privileged helper: this device does not hold conntrack")
        if self._precopy is None:
            from xfer.agent.precopy import PrecopySource, PrecopyStages

            self._precopy = (PrecopySource(self.namespace, trust_seed=self.settings.precopy_trust_seed),
                             PrecopyStages(self.namespace, expire_s=self.settings.precopy_expire_s))
        return self._precopy

    def _precopy_op(self, op: str, header: dict[str, Any], payload: bytes
                    ) -> tuple[dict[str, Any], bytes, list[int]]:
        from xfer.conntrack.delta import is_delta

        source, stages = self.precopy()
        if op == "precopy_changes":
            section = source.changes(VmIdentity.from_dict(header["vm"]), str(header["cursor"]))
            return ({"encoding": section.encoding, "count": section.count, "meta": dict(section.meta)},
                    section.payload, [])
        if op == "precopy_stage":
            meta = header.get("meta")
            if not isinstance(meta, dict):
                raise UsageError("privileged helper: a delta section's meta must be an object")
            section = bundle_mod.Section(Kind.CONNTRACK, str(header["encoding"]), int(header["count"]),
                                         payload, meta)
            if not is_delta(section):
                raise BundleError("privileged helper: not a conntrack delta section")
            # Stage.apply reads every entry strictly (transfer._validated) for the VM named
            staged = stages.stage(str(header["session"]), VmIdentity.from_dict(header["vm"]), section,
                                  header.get("final") is True)
            return {"staged": staged}, b"", []
        if op == "precopy_cursor":
            return {"cursor": stages.cursor(str(header["session"]))}, b"", []
        if op == "precopy_abort":
            return {"removed": stages.abort(str(header["session"]))}, b"", []
        if op == "precopy_abort_vm":
            return {"removed": stages.abort_vm(VmIdentity.from_dict(header["vm"]))}, b"", []
        if op == "precopy_expire":
            return {"sessions": stages.expire()}, b"", []
        if op == "precopy_status":
            return {"source": source.stats(), "stages": stages.sessions()}, b"", []
        raise UsageError(f"privileged helper: no operation {op!r}")

    def close(self) -> None:
        """The agent went away: staged entries go (as ``PrecopyOps.close``), the tracker stops."""
        if self._precopy is not None:
            source, stages = self._precopy
            stages.close()
            source.close()
            self._precopy = None


def _dhcp_keeper(namespace: str | None, ports: DhcpPorts | None) -> Callable[[], None]:
    """The snooping database keeper (and port follower) on a thread of the helper."""
    import asyncio

    from xfer.agent.device import DhcpKeeper

    keeper = (DhcpKeeper(namespace, trusted=ports.trusted, untrusted=tuple(ports.untrusted),
                         max_bindings=ports.max_bindings) if ports else DhcpKeeper(namespace))
    box: dict[str, Any] = {}
    stopping = threading.Event()

    def run() -> None:
        async def keep() -> None:
            box["loop"] = asyncio.get_running_loop()
            await keeper.start()
            while not stopping.is_set():
                await asyncio.sleep(0.2)
            await keeper.stop()

        asyncio.run(keep())

    thread = threading.Thread(target=run, name="dhcp-keeper", daemon=True)
    thread.start()

    def stop() -> None:
        stopping.set()
        thread.join(10)

    return stop


def main(argv: Sequence[str]) -> int:
    """The helper's loop: one request, one answer, until the other end closes."""
    fd, namespace, kinds = int(argv[0]), argv[1] or None, [Kind(k) for k in argv[2].split(",") if k]
    settings = HelperSettings.from_json(argv[3]) if len(argv) > 3 and argv[3] else None
    sock = socket.socket(fileno=fd)
    served = _Served(namespace, kinds, settings)
    try:
        return _serve(sock, served)
    finally:
        served.close()
        if served.keeper is not None:
            served.keeper()


def _serve(sock: socket.socket, served: _Served) -> int:
    while True:
        try:
            header, payload, fds = _recv(sock)
        except PermissionDenied:
            return 0                                  # the agent closed the channel
        for extra in fds:
            os.close(extra)                           # the agent never sends descriptors
        passed: list[int] = []
        try:
            answer, data, passed = served.handle(header, payload)
        except XferError as exc:
            answer, data = _error_header(exc), b""
        except (KeyError, TypeError, ValueError) as exc:
            answer, data = _error_header(UsageError(f"privileged helper: bad request: {exc}")), b""
        _send(sock, answer, data, passed)
        for p in passed:
            os.close(p)


# --- capabilities ----------------------------------------------------------------------------

_CAP_VERSION_3 = 0x20080522
_PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 24, 38, 47, 4
CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF = 12, 21, 39


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def drop_capabilities(user: str | None = None) -> None:
    """Give up every capability of this thread for good (bounding set and ambient too).

    Call it before the process starts threads: capabilities are per thread. It can
    no longer enter namespaces or open ctnetlink. ``user`` also switches to that
    user (and its group): without it the process is still uid 0, and uid 0 owns the
    bpffs pins, which BPF_OBJ_GET opens by file permission alone on this kernel.

    >>> drop_capabilities("nobody")  # doctest: +SKIP
    """
    import pwd

    libc = _libc()
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):         # needs CAP_SETPCAP, so before the sets are emptied
        libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)
    if user is not None:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise UsageError(f"no user {user!r} to run the network-facing process as") from None
        os.setgroups([])
        os.setresgid(entry.pw_gid, entry.pw_gid, entry.pw_gid)
        os.setresuid(entry.pw_uid, entry.pw_uid, entry.pw_uid)   # clears the capability sets
    header, data = _CapHeader(_CAP_VERSION_3, 0), (_CapData * 2)()
    if libc.capset(ctypes.byref(header), data) != 0:
        raise KernelError(ctypes.get_errno(), "capset")


def separate(user: str, state_dir: os.PathLike[str] | str) -> None:
    """Make this process the unprivileged half: ``state_dir`` to ``user``, then drop.

    Meant for a running event loop's thread after start-up: the default executor's
    threads (created earlier, with capabilities) are replaced by a new executor
    whose threads inherit the dropped sets; then every thread of the process is
    checked. PermissionDenied if any still holds a capability.
    """
    import asyncio
    import concurrent.futures
    import pwd

    entry = pwd.getpwnam(user) if user else None
    if entry is not None:
        os.makedirs(state_dir, exist_ok=True)   # the journal would create it later, as the user
        for root, dirs, files in os.walk(state_dir):
            for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
                os.chown(name, entry.pw_uid, entry.pw_gid)
    loop = asyncio.get_running_loop()
    old = getattr(loop, "_default_executor", None)
    drop_capabilities(user or None)
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(thread_name_prefix="xfer"))
    if old is not None:
        old.shutdown(wait=True)
    holding = [t for t in os.listdir("/proc/self/task") if _thread_capabilities(t) != 0]
    if holding:
        raise PermissionDenied(f"threads {', '.join(holding)} still hold capabilities")


def _thread_capabilities(task: str) -> int:
    """A thread's effective capabilities; 0 for one that exited since it was listed (a
    worker thread finishing then is no thread that holds anything): its status file is
    gone (ENOENT) or, opened just before it went, reads ESRCH."""
    try:
        return effective_capabilities(f"self/task/{task}")
    except (FileNotFoundError, ProcessLookupError):
        return 0


def effective_capabilities(pid: int | str = "self") -> int:
    """The effective capability mask of a process (``CapEff`` in /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0
