"""A private CA and the certificates of a Tandem fleet (`tandemctl certs`, `tandemctl up --secure`).

One certificate per process identity serves three purposes:

- its DNS SANs name the service (`runtime.peers.peer_identity(worker, node)`
  for a worker, `router.tandem`, `controlplane.tandem`), plus the host names
  and addresses it is reached by (the prober and health checks dial by
  address), so callers that dial a worker for its registry record check the
  certificate names that record;
- it is the client certificate of mutual TLS between services;
- its Common Name is the process's etcd user (`registry.etcd_auth`): etcd
  started with `--client-cert-auth` takes the user from the CN, so no
  password has to be shipped.

Layout of a certificate directory (what an operator copies to each host):

    ca.pem  ca.key (0600, stays with the operator)
    {name}.pem  {name}.key (0600)     one pair per CertSpec.name

Contract: `ensure_ca` never replaces an existing CA unless `force`;
`issue_into` rewrites a certificate only when asked (`force`) or when it is
missing, expired or signed by another CA. Keys are P-256 ECDSA.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from registry.etcd_auth import agent_user, worker_user
from runtime.peers import peer_identity

CA_NAME = "ca"
ROOT_CN = "root"
CONTROLPLANE_CN = "tandem-controlplane"
ROUTER_CN = "tandem-router"
OPERATOR_CN = "tandem-operator"
ETCD_CN = "etcd"
DEFAULT_DAYS = 365
CA_DAYS = 3650
# Loopback names, so local tools (health checks, tandemctl on the host) can verify by address.
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class CertSpec:
    """What one certificate says. Pure value; `hosts` are DNS names or IP addresses."""

    name: str  # file stem: {name}.pem / {name}.key
    common_name: str  # the etcd user under --client-cert-auth
    dns: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()


def worker_spec(worker_id: str, node: str, hosts: Sequence[str] = LOCAL_HOSTS) -> CertSpec:
    """A worker's certificate: its identity (worker and node) as a DNS SAN, its etcd user as the CN. Pure."""
    if not node:
        raise ValueError(f"worker {worker_id!r} needs its node: its certificate names both")
    return CertSpec(f"worker-{worker_id}", worker_user(worker_id), (peer_identity(worker_id, node),), tuple(hosts))


def agent_spec(node: str, hosts: Sequence[str] = LOCAL_HOSTS) -> CertSpec:
    """A node agent's certificate (a client of etcd only). Pure."""
    return CertSpec(f"agent-{node}", agent_user(node), (), tuple(hosts))


def service_specs(hosts: Sequence[str] = LOCAL_HOSTS) -> list[CertSpec]:
    """The fleet-wide certificates: control plane, router, operator (tandemctl), etcd root, etcd server. Pure."""
    hosts = tuple(hosts)
    return [
        CertSpec("controlplane", CONTROLPLANE_CN, ("controlplane.tandem",), hosts),
        CertSpec("router", ROUTER_CN, ("router.tandem",), hosts),
        CertSpec("operator", OPERATOR_CN),
        CertSpec("root", ROOT_CN),
        CertSpec("etcd", ETCD_CN, ("etcd.tandem",), hosts),
    ]


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Writes atomically with `mode` from the start (a key is never readable by others, not even briefly)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass(frozen=True)
class Authority:
    """A loaded CA: its certificate and key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_path: Path


def ensure_ca(directory: Path, *, force: bool = False, days: int = CA_DAYS) -> tuple[Authority, bool]:
    """The CA in `directory` (created when absent, or replaced when `force`); returns (CA, created)."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{CA_NAME}.pem", directory / f"{CA_NAME}.key"
    if cert_path.exists() and key_path.exists() and not force:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path} is not an EC private key")
        return Authority(x509.load_pem_x509_certificate(cert_path.read_bytes()), key, cert_path), False
    if cert_path.exists() != key_path.exists() and not force:
        raise ValueError(f"{directory} holds half a CA ({CA_NAME}.pem and {CA_NAME}.key go together); "
                         "restore the missing file or pass --force-ca to make a new CA")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tandem-ca"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tandem")])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return Authority(cert, key, cert_path), True


def _san(spec: CertSpec) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for entry in (*spec.dns, *spec.hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(entry)))
        except ValueError:
            names.append(x509.DNSName(entry))
    return list(dict.fromkeys(names))


def issue(ca: Authority, spec: CertSpec, *, days: int = DEFAULT_DAYS) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) for `spec`, signed by `ca`; usable as server and as client certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, spec.common_name)]))
               .issuer_name(ca.cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                     ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                              critical=False))
    names = _san(spec)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _current(path: Path, ca: Authority, spec: CertSpec) -> bool:
    """Whether the certificate at `path` is still what `spec` asks, signed by `ca`, and not about to expire."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return False
    if cert.issuer != ca.cert.subject or cert.not_valid_after_utc < _now() + datetime.timedelta(days=1):
        return False
    try:
        cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature):  # another CA of the same name
        return False
    if cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value != spec.common_name:
        return False
    try:
        have = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        have = set()
    return have == set(_san(spec))


def issue_into(directory: Path, ca: Authority, specs: Iterable[CertSpec], *, force: bool = False,
               days: int = DEFAULT_DAYS) -> list[str]:
    """Writes {name}.pem and {name}.key (0600) for each spec that is missing or stale (all with `force`).

    Returns the names written; the others were left as they were."""
    written = []
    for spec in specs:
        cert_path, key_path = directory / f"{spec.name}.pem", directory / f"{spec.name}.key"
        if not force and key_path.exists() and _current(cert_path, ca, spec):
            continue
        cert, key = issue(ca, spec, days=days)
        _write(key_path, key, 0o600)
        _write(cert_path, cert, 0o644)
        written.append(spec.name)
    return written


def cert_names(path: Path) -> tuple[str, list[str]]:
    """(Common Name, SAN entries) of the certificate at `path`, for `tandemctl certs` to show."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    common = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    try:
        sans = [str(getattr(n, "value", n)) for n in
                cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value]
    except x509.ExtensionNotFound:
        sans = []
    return (str(common[0].value) if common else ""), sans


def parse_worker(text: str) -> tuple[str, str]:
    """'WORKER_ID@NODE' -> (worker_id, node); ValueError naming the expected form. Pure."""
    worker_id, sep, node = text.rpartition("@")
    if not sep or not worker_id or not node:
        raise ValueError(f"a worker is WORKER_ID@NODE (the --worker-id and --node it runs with), got {text!r}")
    return worker_id, node


def fleet_specs(workers: Iterable[tuple[str, str]], nodes: Iterable[str],
                hosts: Sequence[str] = LOCAL_HOSTS, *, services: bool = True) -> list[CertSpec]:
    """Every certificate of a fleet: the services' (unless not `services`), one per node agent, one per
    (worker_id, node). Pure."""
    workers = list(workers)
    all_nodes = dict.fromkeys([*nodes, *(node for _, node in workers)])
    return [*(service_specs(hosts) if services else []), *(agent_spec(node, hosts) for node in all_nodes),
            *(worker_spec(worker_id, node, hosts) for worker_id, node in workers)]
