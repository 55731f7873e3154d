"""xfer pki: a CA, device certificates it signs, refusals of bad names."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from xfer import pki
from xfer.errors import UsageError


def test_issue_signs_with_the_ca_and_names_the_device(tmp_path: Path) -> None:
    ca_path = pki.init_ca(tmp_path, "lab CA")
    cert_path, key_path = pki.issue(tmp_path, "fw-src", ips=["10.0.4.1", "fd00:4::1"], dns=["fw1.lab"])
    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert cert.issuer == ca.subject
    pub = ca.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fw-src", "fw1.lab"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.4.1"),
                                                       ipaddress.ip_address("fd00:4::1")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(eku)
    for key in (key_path, tmp_path / "ca.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no CA"):
        pki.issue(tmp_path, "fw")
    pki.init_ca(tmp_path)
    with pytest.raises(UsageError, match="already exists"):
        pki.init_ca(tmp_path)
    for bad in ("../x", ".hidden", "ca", ""):
        with pytest.raises(UsageError):
            pki.issue(tmp_path, bad)
    with pytest.raises(UsageError):
        pki.issue(tmp_path, "fw", ips=["not-an-ip"])
