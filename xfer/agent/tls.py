"""SSL contexts for mutual TLS: both ends present a certificate signed by one CA.

The server refuses a handshake without a client certificate signed by its CA
(CERT_REQUIRED); the client checks the server's certificate against the same CA
and its address against the certificate's subjectAltName.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from xfer.agent.config import TlsFiles
from xfer.errors import AuthError


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
    """The agent's listening context: its own certificate, client certificates required.

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
