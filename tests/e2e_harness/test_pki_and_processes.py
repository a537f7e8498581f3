"""Unit tests for the harness PKI and process table (no binaries needed)."""

from __future__ import annotations

import ipaddress
import sys
import time
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from e2e.cluster.pki import Pki
from e2e.cluster.processes import ProcessTable


def test_node_client_cert_identity_and_server_sans(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    pair = pki.issue("node-a", "system:node:a", ("system:nodes",), client=True)
    cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "system:node:a"
    orgs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    assert [o.value for o in orgs] == ["system:nodes"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]

    server = pki.issue(
        "api",
        "kube-apiserver",
        server=True,
        dns_names=("localhost",),
        ip_addresses=("127.0.0.1", "10.96.0.1"),
    )
    sans = x509.load_pem_x509_certificate(server.cert.read_bytes()).extensions
    san = sans.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert ipaddress.ip_address("10.96.0.1") in san.get_values_for_type(x509.IPAddress)
    # Signed by the CA.
    ca = x509.load_pem_x509_certificate(pki.ca.cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    # The CA survives a reload (same directory -> same CA).
    assert Pki(tmp_path).ca.cert.read_bytes() == pki.ca.cert.read_bytes()


def test_process_table_stops_groups_and_survives_reload(tmp_path: Path) -> None:
    table = ProcessTable(tmp_path)
    # A parent that spawns a child in the same group: both must die.
    script = "import subprocess, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"
    rec = table.start("sleeper", [sys.executable, "-c", script])
    time.sleep(0.5)
    reloaded = ProcessTable(tmp_path).load()
    assert [r.name for r in reloaded] == ["sleeper"]
    assert reloaded[0].alive()
    assert table.stop_all(timeout=5) == ["sleeper"]
    assert not rec.alive()
    assert ProcessTable(tmp_path).load() == []
