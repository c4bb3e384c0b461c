"""Certificate identities (pure) and the certificates `tandemctl certs` writes (files in a temp dir)."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest
from cryptography import x509

from controlplane import pki
from controlplane.agent import AgentSettings
from controlplane.securemode import SecureFleet
from controlplane.server import ControlPlaneSettings
from registry.etcd_auth import worker_user
from router_svc.settings import RouterSettings
from runtime.channels import is_handshake_failure
from runtime.config import load_config
from runtime.peers import PeerTls, identity_label, peer_identity
from worker.settings import WorkerSettings

DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def test_plain_names_are_kept_in_the_identity() -> None:
    assert peer_identity("decode-0", "gpu-node-7") == "decode-0.gpu-node-7.worker.tandem"


@pytest.mark.parametrize("name", ["Decode-0", "decode_0", "a.b", "w:1", "x" * 128, "h--abc", "-x", "a--b", "9"])
def test_every_registry_name_becomes_one_valid_dns_label(name: str) -> None:
    label = identity_label(name)
    assert DNS_LABEL.match(label), label
    assert identity_label(name) == label, "deterministic: issuer and verifier must agree"


def test_distinct_names_get_distinct_identities() -> None:
    names = ["decode", "Decode", "DECODE", "decode_0", "decode-0", "decode.0", "h--decode", "a--b", "a-b"]
    assert len({identity_label(n) for n in names}) == len(names)
    # A hashed label (it carries "--") can never equal a kept one (kept names have no "--").
    assert "--" in identity_label("Decode") and "--" not in identity_label("decode")


def test_the_node_is_part_of_the_identity() -> None:
    assert peer_identity("d0", "n1") != peer_identity("d0", "n2")
    with pytest.raises(ValueError, match="non-empty"):
        identity_label("")


def test_a_record_without_a_node_gets_a_name_no_certificate_carries() -> None:
    nameless = peer_identity("d0", "")
    assert nameless == "d0.x--none.worker.tandem"
    assert all(peer_identity("d0", node) != nameless for node in ("x--none", "none", "x", "X--NONE"))
    with pytest.raises(ValueError, match="needs its node"):
        pki.worker_spec("d0", "")


def load(directory: Path, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((directory / f"{name}.pem").read_bytes())


def test_a_worker_certificate_names_its_identity_and_its_etcd_user(tmp_path: Path) -> None:
    ca, created = pki.ensure_ca(tmp_path)
    assert created
    spec = pki.worker_spec("decode-0", "n1", hosts=("gpu-7", "10.0.0.7"))
    assert pki.issue_into(tmp_path, ca, [spec]) == ["worker-decode-0"]
    cert = load(tmp_path, "worker-decode-0")
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["decode-0.n1.worker.tandem", "gpu-7"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    assert pki.cert_names(tmp_path / "worker-decode-0.pem")[0] == worker_user("decode-0")
    cert.verify_directly_issued_by(ca.cert)
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.ExtendedKeyUsageOID.SERVER_AUTH in usages and x509.ExtendedKeyUsageOID.CLIENT_AUTH in usages


def test_keys_are_private_to_their_owner(tmp_path: Path) -> None:
    ca, _ = pki.ensure_ca(tmp_path)
    pki.issue_into(tmp_path, ca, pki.fleet_specs([("d0", "n1")], ["n1"]))
    keys = sorted(tmp_path.glob("*.key"))
    assert {k.name for k in keys} >= {"ca.key", "worker-d0.key", "agent-n1.key", "router.key", "root.key"}
    assert all(stat.S_IMODE(k.stat().st_mode) == 0o600 for k in keys)


def test_running_again_keeps_the_ca_and_current_certificates(tmp_path: Path) -> None:
    ca, _ = pki.ensure_ca(tmp_path)
    specs = pki.fleet_specs([("d0", "n1")], [])
    pki.issue_into(tmp_path, ca, specs)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    again, created = pki.ensure_ca(tmp_path)
    assert not created
    assert pki.issue_into(tmp_path, again, specs) == []
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    # A changed spec (a new host name) is reissued; the others stay.
    moved = [pki.worker_spec("d0", "n1", hosts=("gpu-9",))]
    assert pki.issue_into(tmp_path, again, moved) == ["worker-d0"]


def test_a_new_ca_only_when_asked_and_then_every_certificate_is_reissued(tmp_path: Path) -> None:
    ca, _ = pki.ensure_ca(tmp_path)
    specs = [pki.worker_spec("d0", "n1")]
    pki.issue_into(tmp_path, ca, specs)
    replaced, created = pki.ensure_ca(tmp_path, force=True)
    assert created and replaced.cert != ca.cert
    assert pki.issue_into(tmp_path, replaced, specs) == ["worker-d0"], "signed by the old CA: stale"


def test_half_a_ca_is_refused(tmp_path: Path) -> None:
    pki.ensure_ca(tmp_path)
    (tmp_path / "ca.key").unlink()
    with pytest.raises(ValueError, match="half a CA"):
        pki.ensure_ca(tmp_path)


def test_worker_flags_name_the_worker_and_its_node() -> None:
    assert pki.parse_worker("decode-0@gpu-7") == ("decode-0", "gpu-7")
    with pytest.raises(ValueError, match="WORKER_ID@NODE"):
        pki.parse_worker("decode-0")


def test_a_call_for_a_record_verifies_its_identity_only_when_asked(tmp_path: Path) -> None:
    checked = PeerTls(tmp_path / "ca.pem", server_name="fleet.tandem", verify_identity=True)
    assert checked.target_name(peer_identity("d0", "n1")) == "d0.n1.worker.tandem"
    assert checked.options(peer_identity("d0", "n1")) == (("grpc.ssl_target_name_override", "d0.n1.worker.tandem"),)
    assert checked.target_name("") == "fleet.tandem", "a call for no record: the shared name"
    shared = PeerTls(tmp_path / "ca.pem", server_name="fleet.tandem")
    assert shared.target_name(peer_identity("d0", "n1")) == "fleet.tandem"
    assert PeerTls(tmp_path / "ca.pem").options("ignored") == ()


@pytest.mark.parametrize(("details", "handshake"), [
    # What grpc said in the secure-mode drill: a certificate naming another worker, one of another CA.
    ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Custom verification check "
     "failed with error: UNAUTHENTICATED: Hostname Verification Check failed.", True),
    ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Tls handshake failed "
     "(TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED",
     True),
    ("failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:1: Connection refused", False),
    ("worker is draining", False),
])
def test_handshake_failures_are_told_from_other_unavailability(details: str, handshake: bool) -> None:
    assert is_handshake_failure(details) is handshake


def test_the_secure_flags_are_settings_every_service_takes(tmp_path: Path) -> None:
    fleet = SecureFleet(tmp_path)
    worker = load_config(WorkerSettings, [*fleet.etcd_args("worker-d0"), *fleet.peer_args("worker-d0"),
                                          *fleet.serve_args("worker-d0")], prog="tandem-decode", env={})
    assert worker.etcd_cert_file == worker.peer_cert_file == worker.tls_cert == tmp_path / "worker-d0.pem"
    assert worker.tls_client_ca == worker.etcd_ca_file == tmp_path / "ca.pem"
    tls = worker.peer_tls()
    assert tls is not None and tls.verify_identity
    router = load_config(RouterSettings, [*fleet.etcd_args("router"), *fleet.peer_args("router"),
                                          *fleet.serve_args("router")], prog="tandem-router", env={})
    assert router.tls_cert == tmp_path / "router.pem" and router.peer_verify_identity
    cp = load_config(ControlPlaneSettings, [*fleet.etcd_args("controlplane"), *fleet.peer_args("controlplane"),
                                            *fleet.serve_args("controlplane")], prog="tandem-controlplane", env={})
    assert cp.tls_cert == tmp_path / "controlplane.pem" and cp.peer_verify_identity
    agent = load_config(AgentSettings, [*fleet.etcd_args("agent-n1"), *fleet.peer_args("agent-n1")],
                        prog="tandem-agent", env={})
    assert agent.etcd_key_file == tmp_path / "agent-n1.key"


def test_a_gpu_host_run_leaves_the_fleet_wide_certificates_alone() -> None:
    names = [s.name for s in pki.fleet_specs([("w0", "gpu-a")], ["gpu-a"], ("gpu-a",), services=False)]
    assert names == ["agent-gpu-a", "worker-w0"]
    assert {"controlplane", "router", "operator", "root", "etcd"} <= {s.name for s in pki.fleet_specs([], [])}
