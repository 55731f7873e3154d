"""SSL contexts for mutual TLS: both ends present a certificate signed by one CA.

Shared by the agent, the manager and their clients (the hypervisor hook, the CLI).

The server refuses a handshake without a client certificate signed by its CA
(CERT_REQUIRED); the client checks the server's certificate against the same CA
and its address against the certificate's subjectAltName.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xfer.errors import AuthError


@dataclass(frozen=True)
class TlsFiles:
    """A daemon's certificate and key, and the CA that signs every peer it accepts."""

    cert: Path
    key: Path
    ca: Path


def _load(ctx: ssl.SSLContext, ca: Path, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if cert is not None:
            ctx.load_cert_chain(str(cert), str(key or cert))
        ctx.load_verify_locations(cafile=str(ca))
    except FileNotFoundError as exc:
        raise AuthError(f"TLS file not found: {exc.filename}") from None
    except (ssl.SSLError, OSError) as exc:
        raise AuthError(f"cannot load TLS material ({cert}, {key}, {ca}): {exc}") from None
    return ctx


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """A daemon's listening context: its own certificate, client certificates required.

    >>> ctx = server_context(TlsFiles(Path("fw.pem"), Path("fw.key"), Path("ca.pem")))  # doctest: +SKIP
    """
    ctx = _load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), files.ca, files.cert, files.key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A client context trusting only ``ca``, presenting ``cert`` when given.

    Without a certificate every agent refuses the handshake; that is for tests and
    for probing, not a mode the agents accept.
    """
    ctx = _load(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), ca, cert, key)
    ctx.xfer_has_cert = cert is not None  # type: ignore[attr-defined]  # for the client's messages
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def peer_name(peercert: dict[str, Any] | None) -> str:
    """The common name of a verified peer certificate (``getpeercert()`` form), or ''."""
    for rdn in (peercert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""


def client_tls(ca: Path | None, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext | None:
    """The client context for an https manager: trust ``ca`` (default: the system's),
    present ``cert``/``key`` for mutual TLS. None when nothing is given.

    >>> client_tls(None) is None
    True
    """
    if ca is None and cert is None:
        return None
    try:
        ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
        if cert is not None:
            ctx.load_cert_chain(str(cert), str(key or cert))
    except FileNotFoundError as exc:
        raise AuthError(f"TLS file not found: {exc.filename}") from None
    except (ssl.SSLError, OSError) as exc:
        raise AuthError(f"cannot load TLS material ({ca}, {cert}, {key}): {exc}") from None
    return ctx
