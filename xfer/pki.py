"""A small CA for labs and small sites: ``xfer pki init`` and ``xfer pki issue``.

Files in one directory: ``ca.pem``/``ca.key`` for the CA, ``NAME.pem``/``NAME.key``
for each device (and for the manager or an operator). Every certificate is good
for both ends of a connection (serverAuth and clientAuth), because an agent is a
server to its callers and a client when it pushes or pulls. Keys are EC P-256,
written 0600.

    init_ca(Path("pki"))
    issue(Path("pki"), "fw-src", ips=["10.0.4.1"])
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from xfer.errors import UsageError

CA_CERT, CA_KEY = "ca.pem", "ca.key"


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "xfer"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _now() -> dt.datetime:
    # A minute back: a peer whose clock is slightly behind still accepts a fresh certificate.
    return dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)


def init_ca(directory: Path, name: str = "xfer CA", days: int = 3650, force: bool = False) -> Path:
    """Create a CA (``ca.pem``, ``ca.key``) in ``directory``; returns the certificate path.

    >>> init_ca(Path("/etc/xfer/pki"))   # doctest: +SKIP
    PosixPath('/etc/xfer/pki/ca.pem')
    """
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if cert_path.exists() and not force:
        raise UsageError(f"a CA already exists in {directory} (use --force to replace it)")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(name)
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now()).not_valid_after(_now() + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return cert_path


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), None)
    except FileNotFoundError:
        raise UsageError(f"no CA in {directory}: run `xfer pki init --dir {directory}` first") from None
    except ValueError as exc:
        raise UsageError(f"CA in {directory} is unreadable: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise UsageError(f"CA key in {directory} is not an EC key")
    return cert, key


def issue(directory: Path, name: str, ips: Sequence[str] = (), dns: Sequence[str] = (),
          days: int = 825) -> tuple[Path, Path]:
    """Issue a certificate for ``name`` signed by the CA in ``directory``.

    ``name`` becomes the common name (what ``allowed_peers`` lists) and a DNS
    subjectAltName; ``ips`` are the addresses the device is reached at (clients
    check them). Returns (certificate path, key path).

    >>> issue(Path("pki"), "fw-src", ips=["10.0.4.1"])   # doctest: +SKIP
    (PosixPath('pki/fw-src.pem'), PosixPath('pki/fw-src.key'))
    """
    if not name or "/" in name or name.startswith("."):
        raise UsageError(f"certificate name {name!r} must be a plain file name")
    if name == "ca":
        raise UsageError("'ca' is the CA's own file name")
    ca_cert, ca_key = _load_ca(directory)
    try:
        addresses = [ipaddress.ip_address(a) for a in ips]
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dict.fromkeys([name, *dns])]
    sans += [x509.IPAddress(a) for a in addresses]
    cert = (x509.CertificateBuilder()
            .subject_name(_name(name)).issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now()).not_valid_after(_now() + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return cert_path, key_path
