"""Where a server listens and how its cluster's processes trust each other:
the rebinding of Ray Serve's gRPC servers, the environment a cluster starts
with, the cluster's CA and certificates, and the test server's own sockets
(tests/test_security.py tries a server across a network)."""

from __future__ import annotations

import ipaddress
import os
import stat
import subprocess

import psutil
import pytest
from cryptography import x509
from pydantic import ValidationError

from patchwork.serving import binding, cluster_tls
from patchwork.serving.cluster import cluster_environment
from patchwork.serving.config import ServingConfig
from tests.conftest import PATCHWORK, run_patchwork


def test_ray_serves_every_interface_binds_move_to_the_configured_host():
    bound = []
    rebound = binding._rebinding(lambda server, where: bound.append(where) or 7, "127.0.0.1")
    assert rebound("server", "[::]:9000") == 7 and rebound("server", "[::]:0") == 7
    rebound("server", "10.0.0.5:9000")  # an address someone chose is left alone
    v6 = binding._rebinding(lambda server, where: bound.append(where), "::1")
    v6("server", "[::]:9010")
    assert bound == ["127.0.0.1:9000", "127.0.0.1:0", "10.0.0.5:9000", "[::1]:9010"]


def test_the_cluster_environment_says_where_each_server_listens():
    default = cluster_environment(ServingConfig())
    assert default[binding.HOST_ENV] == "127.0.0.1" and default[binding.INTERNAL_HOST_ENV] == "127.0.0.1"
    assert cluster_environment(ServingConfig(host="0.0.0.0"))[binding.HOST_ENV] == "0.0.0.0"
    behind_tls = ServingConfig(host="0.0.0.0", tls={"cert": "c.pem", "key": "k.pem"})
    assert cluster_environment(behind_tls)[binding.HOST_ENV] == "127.0.0.1"  # NGINX takes the open port
    assert (behind_tls.plaintext_host(), behind_tls.client_host()) == ("127.0.0.1", "127.0.0.1")
    assert ServingConfig(host="::").client_host() == "::1"
    networked = cluster_environment(ServingConfig(metrics_host="0.0.0.0"))
    assert binding.INTERNAL_HOST_ENV not in networked  # the node's own address: Ray's binding, under mutual TLS


def test_a_host_that_is_not_an_address_is_refused_naming_the_field():
    with pytest.raises(ValidationError, match="host"):
        ServingConfig(host="example.com")
    refused = run_patchwork("serve", "config", "--host", "everywhere")
    assert refused.returncode == 1 and refused.stderr.startswith("error: host: ")


def test_the_clusters_ca_and_node_certificate_are_made_once_and_kept_private(tmp_path, monkeypatch):
    monkeypatch.setenv(cluster_tls.STATE_ENV, str(tmp_path / "state"))
    for variable in cluster_tls.RAY_TLS_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    environment = cluster_tls.environment(["127.0.0.1"])
    folder = tmp_path / "state" / cluster_tls.TLS_FOLDER
    assert environment == {"RAY_USE_TLS": "1", "RAY_TLS_CA_CERT": str(folder / "ca.crt"),
                           "RAY_TLS_SERVER_CERT": str(folder / "node.crt"),
                           "RAY_TLS_SERVER_KEY": str(folder / "node.key")}
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.glob("*.*")} == {0o600}
    ca = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    node = x509.load_pem_x509_certificate((folder / "node.crt").read_bytes())
    node.verify_directly_issued_by(ca)
    names = node.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")} <= set(
        names.get_values_for_type(x509.IPAddress))
    files = {p.name: p.read_bytes() for p in folder.glob("*.*")}
    cluster_tls.environment(["127.0.0.1"])  # a second process joining: the same files
    assert {p.name: p.read_bytes() for p in folder.glob("*.*")} == files
    cluster_tls.environment(["127.0.0.1", "10.1.2.3"])  # a node reached at another address: a new certificate
    renewed = x509.load_pem_x509_certificate((folder / "node.crt").read_bytes())
    renewed.verify_directly_issued_by(ca)
    assert ipaddress.ip_address("10.1.2.3") in renewed.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.IPAddress)
    assert (folder / "ca.crt").read_bytes() == files["ca.crt"]


def test_an_environment_with_its_own_ray_tls_keeps_it(tmp_path, monkeypatch):
    monkeypatch.setenv(cluster_tls.STATE_ENV, str(tmp_path))
    monkeypatch.setenv("RAY_USE_TLS", "0")
    assert cluster_tls.environment(["127.0.0.1"]) == {}
    assert not (tmp_path / cluster_tls.TLS_FOLDER).exists()


def test_every_socket_of_the_test_servers_cluster_listens_on_loopback(grpc_target):
    ray_processes = [p for p in psutil.process_iter(["cmdline"])
                     if p.info["cmdline"] and (p.info["cmdline"][0].startswith("ray::")
                                               or any("/ray/" in part for part in p.info["cmdline"][:2]))]
    pids = {p.pid for p in ray_processes}
    sockets = [c for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert len(sockets) > 20  # the gateway's ports, every replica's, Ray's own
    public = {int(grpc_target.rsplit(":", 1)[1])}
    assert public <= {c.laddr.port for c in sockets}
    assert {c.laddr.ip.removeprefix("::ffff:") for c in sockets} == {"127.0.0.1"}


def test_a_command_with_another_state_directory_is_told_so_at_once(grpc_target, tmp_path):
    """Ray's own client would retry the refused handshake for many minutes."""
    env = {key: value for key, value in os.environ.items() if key not in cluster_tls.RAY_TLS_VARIABLES}
    env[cluster_tls.STATE_ENV] = str(tmp_path)  # a CA of its own: not the test cluster's
    run = subprocess.run([*PATCHWORK, "serve", "status"], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr
    assert "does not let this process in with the certificates in" in run.stderr and str(tmp_path) in run.stderr
