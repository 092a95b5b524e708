"""Certificates made at test time (the cryptography package): a CA, server and client
certificates signed by it, an expired server certificate, and a second, unrelated CA."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass
class Pair:
    cert: Path
    key: Path


@dataclass
class Certs:
    ca: Path              # the CA that signed everything below
    other_ca: Path        # a CA that signed nothing here (a wrong --cacert)
    server: Pair          # CN localhost, SAN localhost + 127.0.0.1
    client: Pair
    expired: Pair         # a server certificate whose validity ended yesterday
    wrong_host: Pair      # a server certificate for another host name only


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, cert: x509.Certificate, key=None) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))


def _ca(cn: str):
    key = _key()
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def _leaf(ca_cert, ca_key, cn: str, hosts: list[str], usage, *, days: tuple[int, int] = (-1, 30)):
    key = _key()
    now = dt.datetime.now(dt.timezone.utc)
    sans = [x509.IPAddress(ip_address(h)) if h[0].isdigit() else x509.DNSName(h) for h in hosts]
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now + dt.timedelta(days=days[0]))
         .not_valid_after(now + dt.timedelta(days=days[1]))
         .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(ca_key, hashes.SHA256()), key


def make_certs(root: Path) -> Certs:
    root.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _ca("conveyor test CA")
    other_cert, _ = _ca("some other CA")
    _write(root / "ca.crt", ca_cert)
    _write(root / "other-ca.crt", other_cert)
    pairs = {}
    for name, cn, hosts, usage, days in (
            ("server", "localhost", ["localhost", "127.0.0.1"], ExtendedKeyUsageOID.SERVER_AUTH, (-1, 30)),
            ("client", "conveyor", [], ExtendedKeyUsageOID.CLIENT_AUTH, (-1, 30)),
            ("expired", "localhost", ["localhost", "127.0.0.1"], ExtendedKeyUsageOID.SERVER_AUTH, (-10, -1)),
            ("wrong-host", "elsewhere.example", ["elsewhere.example"],
             ExtendedKeyUsageOID.SERVER_AUTH, (-1, 30))):
        cert, key = _leaf(ca_cert, ca_key, cn, hosts, usage, days=days)
        _write(root / f"{name}.crt", cert, key)
        pairs[name] = Pair(root / f"{name}.crt", root / f"{name}.key")
    return Certs(root / "ca.crt", root / "other-ca.crt", pairs["server"], pairs["client"],
                 pairs["expired"], pairs["wrong-host"])
