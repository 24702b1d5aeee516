"""TLS and mutual TLS against a real server (certificates made with the openssl CLI)."""

import shutil
import subprocess

import pytest

import ern_registry
from ern_registry import Client, RetryPolicy

from conftest import Server

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def issue(dir, name, usage):
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=dir)
    (dir / f"{name}.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        f"keyUsage=critical,digitalSignature\nextendedKeyUsage={usage}\n"
    )
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=dir)


@pytest.fixture(scope="module")
def tls_server(ern_binary, tmp_path_factory):
    pki = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test-ca",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=pki)
    issue(pki, "server", "serverAuth")
    issue(pki, "client", "clientAuth")
    server = Server(tmp_path_factory.mktemp("tls"))
    server.cli("keygen")
    server.principal("dr-tls", "researcher", "--ern", "ERN-LUNG")
    server.start("--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
                 "--tls-client-ca", str(pki / "ca.pem"))
    server.pki = pki
    yield server
    server.stop()


def test_mutual_tls_with_a_client_certificate(tls_server):
    pki = tls_server.pki
    with Client(
        f"https://{tls_server.address}",
        api_key=tls_server.keys["dr-tls"],
        root_certificates=pki / "ca.pem",
        client_certificate=pki / "client.pem",
        client_key=pki / "client.key",
    ) as client:
        assert list(client.count_patients("ERN-LUNG").index) == ["total"]


def test_without_a_client_certificate_the_server_refuses(tls_server):
    with Client(
        tls_server.address,
        tls=True,
        api_key=tls_server.keys["dr-tls"],
        root_certificates=(tls_server.pki / "ca.pem").read_bytes(),
        retry=RetryPolicy(max_attempts=1),
        timeout=20,
    ) as client:
        with pytest.raises(ern_registry.Unavailable):
            client.count_patients("ERN-LUNG")


def test_plaintext_to_a_tls_server_fails(tls_server):
    with Client(tls_server.address, api_key="ern_x.y", retry=RetryPolicy(max_attempts=1), timeout=20) as client:
        with pytest.raises(ern_registry.RegistryError):
            client.count_patients("ERN-LUNG")
