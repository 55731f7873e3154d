"""The manager's configuration file (TOML), in the agent's shape.

    [manager]
    topology = "topology.yaml"        # relative paths are relative to this file
    journal = "/var/lib/xfer/manager.db"
    mode = "relay"                    # default mode: relay | pull | push | store
    cleanup = "delete"                # delete | age-out
    budget_ms = 300
    store_ttl_s = 60
    device_timeout_s = 10             # device-driven variant: how long to wait for the devices
    precopy_interval_s = 0.5          # pre-copy: seconds between rounds of changes
    precopy_expire_s = 600            # a prepared migration without "not-running" is undone after
    netns = ""                        # optional: reach the agents from this namespace

    [listen]
    address = "10.0.4.9"              # the message endpoint (mutual TLS only)
    port = 8700
    metrics = "127.0.0.1:9465"        # optional plain-HTTP Prometheus endpoint
    udp = "10.0.4.9:8701"             # optional: messages as datagrams
    multicast = "239.7.7.7:8702"      # optional: the group agents and manager listen on
    multicast_interface = "10.0.4.9"  # address of the interface to join it on

    [tls]
    cert = "manager.pem"
    key = "manager.key"
    ca = "ca.pem"
    allowed_peers = []                # optional: certificate names allowed to send messages

    [limits]                          # slow clients (xfer/net/guard.py); these are the defaults
    max_connections = 256             # open TCP connections, TLS handshakes included
    handshake_timeout_s = 5
    header_timeout_s = 10             # from the handshake to the first request's headers

    [journal]                         # optional; where journal, store and message ids live
    backend = "sqlite"                # sqlite (one manager) | etcd (several managers, one leader)
    retention_days = 30               # finished migrations older than this are pruned
    maintenance_s = 60                # how often expired bundles and old migrations are deleted
    # backend = "etcd":
    endpoints = ["https://10.0.4.20:2379", "https://10.0.4.21:2379"]
    prefix = "/xfer/"                 # every key the managers write starts with it
    ca = "etcd-ca.pem"                # TLS to etcd (optional: plain http:// endpoints need none)
    cert = "etcd-client.pem"
    key = "etcd-client.key"
    lease_s = 3                       # the leader's lease: a dead leader is replaced within it
    url = "https://10.0.4.9:8700/v1/migrations"   # how the others reach this manager (redirects)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xfer import tomlfile
from xfer.errors import UsageError
from xfer.manager.settings import DEFAULT_DEVICE_TIMEOUT_S, Cleanup, Settings
from xfer.net import address as addr
from xfer.net.guard import ConnectionLimits, limits_from
from xfer.net.message import Mode
from xfer.net.tls import TlsFiles

DEFAULT_PORT = 8700
DEFAULT_JOURNAL = Path("/var/lib/xfer/manager.db")
API_PATH = "/v1/migrations"
DEFAULT_RETENTION_DAYS = 30.0
DEFAULT_LEASE_S = 3.0


@dataclass(frozen=True)
class JournalConfig:
    """The [journal] section: which backend keeps journal, store and message ids."""

    backend: str = "sqlite"
    retention_days: float = DEFAULT_RETENTION_DAYS
    maintenance_s: float = 60.0
    endpoints: tuple[str, ...] = ()
    prefix: str = "/xfer/"
    tls: TlsFiles | None = None        # client certificate for etcd
    ca: Path | None = None             # CA of etcd's server certificate
    lease_s: float = DEFAULT_LEASE_S
    url: str | None = None             # this manager's message URL as the others redirect to it


@dataclass(frozen=True)
class ManagerConfig:
    topology: Path
    tls: TlsFiles
    settings: Settings = field(default_factory=Settings)
    journal: Path = DEFAULT_JOURNAL
    store_ttl_s: float = 60.0
    netns: str | None = None
    address: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    metrics: tuple[str, int] | None = None
    udp: tuple[str, int] | None = None
    multicast: tuple[str, int] | None = None
    multicast_interface: str = "0.0.0.0"
    allowed_peers: frozenset[str] = frozenset()
    connection_limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    backend: JournalConfig = field(default_factory=JournalConfig)

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"https://{host}:{self.port}{API_PATH}"


def load(path: Path) -> ManagerConfig:
    """Read and check a manager configuration; UsageError names the defect.

    >>> load(Path("/etc/xfer/manager.toml")).port   # doctest: +SKIP
    8700
    """
    return parse(tomlfile.read(path, "manager config"), path.parent)


def parse(raw: Mapping[str, Any], base: Path = Path(".")) -> ManagerConfig:
    unknown = sorted(set(raw) - {"manager", "listen", "tls", "limits", "journal"})
    if unknown:
        raise UsageError(f"manager config: unknown section(s) {', '.join(unknown)}")
    mgr, listen, tls = (_table(raw, n) for n in ("manager", "listen", "tls"))
    if not mgr.get("topology"):
        raise UsageError("manager config: manager.topology is required")
    for key in ("cert", "key", "ca"):
        if not tls.get(key):
            raise UsageError(f"manager config: tls.{key} is required (the endpoint is mutual TLS only)")
    budget = mgr.get("budget_ms", 300)
    if not isinstance(budget, int | float) or budget <= 0:
        raise UsageError("manager config: manager.budget_ms must be a positive number")
    timeout = mgr.get("device_timeout_s", DEFAULT_DEVICE_TIMEOUT_S)
    if not isinstance(timeout, int | float) or timeout <= 0:
        raise UsageError("manager config: manager.device_timeout_s must be a positive number")
    ttl = mgr.get("store_ttl_s", 60)
    if not isinstance(ttl, int | float) or ttl <= 0:
        raise UsageError("manager config: manager.store_ttl_s must be a positive number")
    precopy: dict[str, float] = {}
    for key in ("precopy_interval_s", "precopy_expire_s"):
        value = mgr.get(key)
        if value is not None:
            if not isinstance(value, int | float) or value <= 0:
                raise UsageError(f"manager config: manager.{key} must be a positive number")
            precopy[key] = float(value)
    try:
        settings = Settings(Mode.of(str(mgr.get("mode", "relay"))),
                            Cleanup.of(str(mgr.get("cleanup", "delete"))), float(budget), float(timeout),
                            **precopy)
    except UsageError as exc:
        raise UsageError(f"manager config: manager.{exc}") from None
    address = str(listen.get("address", "127.0.0.1"))
    addr.check_ip(address, "manager config: listen.address")
    peers = tls.get("allowed_peers", [])
    if not isinstance(peers, list):
        raise UsageError("manager config: tls.allowed_peers must be a list of names")

    def hostport(key: str) -> tuple[str, int] | None:
        return addr.hostport(listen[key], f"manager config: listen.{key}") if listen.get(key) else None

    return ManagerConfig(
        topology=base / str(mgr["topology"]),
        tls=TlsFiles(*(base / str(tls[k]) for k in ("cert", "key", "ca"))),
        settings=settings,
        journal=base / str(mgr.get("journal", DEFAULT_JOURNAL)),
        store_ttl_s=float(ttl),
        netns=str(mgr.get("netns") or "") or None,
        address=address, port=addr.port(listen.get("port", DEFAULT_PORT), "manager config: listen.port"),
        metrics=hostport("metrics"), udp=hostport("udp"), multicast=hostport("multicast"),
        multicast_interface=str(listen.get("multicast_interface", "0.0.0.0")),
        allowed_peers=frozenset(str(p) for p in peers),
        connection_limits=limits_from(_table(raw, "limits"), "manager config: limits"),
        backend=_journal(_table(raw, "journal"), base),
    )


def _journal(table: Mapping[str, Any], base: Path) -> JournalConfig:
    known = {"backend", "retention_days", "maintenance_s", "endpoints", "prefix", "ca", "cert", "key",
             "lease_s", "url"}
    unknown = sorted(set(table) - known)
    if unknown:
        raise UsageError(f"manager config: unknown key(s) in [journal]: {', '.join(unknown)}")
    backend = str(table.get("backend", "sqlite"))
    if backend not in ("sqlite", "etcd"):
        raise UsageError(f"manager config: journal.backend {backend!r} must be sqlite or etcd")
    numbers = {}
    for key, default in (("retention_days", DEFAULT_RETENTION_DAYS), ("maintenance_s", 60.0),
                         ("lease_s", DEFAULT_LEASE_S)):
        value = table.get(key, default)
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise UsageError(f"manager config: journal.{key} must be a positive number")
        numbers[key] = float(value)
    endpoints = table.get("endpoints", [])
    if not isinstance(endpoints, list) or not all(isinstance(e, str) for e in endpoints):
        raise UsageError("manager config: journal.endpoints must be a list of URLs")
    for e in endpoints:
        if not e.startswith(("http://", "https://")):
            raise UsageError(f"manager config: journal.endpoints: {e!r} must be http:// or https://")
    if backend == "etcd" and not endpoints:
        raise UsageError("manager config: journal.endpoints is required with backend = \"etcd\"")
    prefix = str(table.get("prefix", "/xfer/"))
    if not prefix or "\0" in prefix:
        raise UsageError("manager config: journal.prefix must be a non-empty key prefix")
    cert_file, key_file = table.get("cert"), table.get("key")
    if bool(cert_file) != bool(key_file):
        raise UsageError("manager config: journal.cert and journal.key go together")
    ca = base / str(table["ca"]) if table.get("ca") else None
    files = (TlsFiles(base / str(cert_file), base / str(key_file), ca or Path(""))
             if cert_file and key_file else None)
    url: str | None = str(table["url"]) if table.get("url") else None
    return JournalConfig(backend, numbers["retention_days"], numbers["maintenance_s"], tuple(endpoints),
                         prefix if prefix.endswith("/") else prefix + "/", files, ca, numbers["lease_s"], url)


def _table(raw: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, Mapping):
        raise UsageError(f"manager config: [{name}] must be a table")
    return value
