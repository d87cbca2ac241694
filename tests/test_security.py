"""What a Patchwork server exposes, tested for real across a network.

The test makes two network namespaces of its own joined by a veth pair (a
server host and a client host; no traffic leaves them), starts a detached
three-model server in the first with TLS for clients on every interface
(two models in the gateway's replica, one in a deployment of its own), and
checks from the second: every socket but the TLS port refuses a
connection (Ray Serve's plaintext ports and every internal one included);
over TLS, a client with the CA and the token is served, one without the
token is refused on every RPC, one without the CA fails the handshake. On
the server's host, a replica's internal ports complete no call without the
cluster's certificate. The sockets are those docs/security.md lists. And
a normal stop (`patchwork serve down`) leaves no traceback in any log.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from patchwork.serving.cluster import DIRECT_HTTP_PORT
from patchwork.serving.config import ServingConfig
from tests.conftest import PATCHWORK, REPO, SERVER_START_TIMEOUT_S

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

SERVER_ADDRESS, CLIENT_ADDRESS = "10.77.0.1", "10.77.0.2"
TOKEN = "security-test-token"
# The models the server's gateway runs itself; "blt" keeps a deployment of its own.
IN_GATEWAY = ("cm3leon", "mavil")
# Ports Ray opens at fixed numbers, by what docs/security.md calls them.
RAY_PORTS = {6379: "6379", DIRECT_HTTP_PORT: "30000", 52365: "52365", 44217: "44217", 44227: "44227", 10001: "10001"}


def sh(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=check, capture_output=True, text=True, timeout=120)


class Namespaces:
    """A server and a client network namespace joined by a veth pair."""

    def __init__(self):
        tag = secrets.token_hex(3)
        self.server, self.client = f"pws-{tag}", f"pwc-{tag}"
        sh("ip", "netns", "add", self.server)
        sh("ip", "netns", "add", self.client)
        sh("ip", "link", "add", f"pw{tag}s", "type", "veth", "peer", "name", f"pw{tag}c")
        for namespace, link, address in ((self.server, f"pw{tag}s", SERVER_ADDRESS),
                                         (self.client, f"pw{tag}c", CLIENT_ADDRESS)):
            sh("ip", "link", "set", link, "netns", namespace)
            for step in (("addr", "add", f"{address}/30", "dev", link), ("link", "set", link, "up"),
                         ("link", "set", "lo", "up")):
                sh("ip", "netns", "exec", namespace, "ip", *step)

    def run(self, namespace: str, command: list, env: dict | None = None, timeout: float = 600):
        return subprocess.run(["ip", "netns", "exec", namespace, *map(str, command)], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=REPO)

    def close(self) -> None:
        """Kills every process in the namespaces, then removes them."""
        for namespace in (self.server, self.client):
            for pid in sh("ip", "netns", "pids", namespace, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            sh("ip", "netns", "del", namespace, check=False)


def certificate_authority(folder: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate it signed for the server's address: (ca, cert, key) files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(text):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    now = datetime.datetime.now(datetime.timezone.utc)

    def signed(subject, key, issuer, issuer_key, extensions):
        builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1)))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = signed("test CA", ca_key, "test CA", ca_key, [(x509.BasicConstraints(ca=True, path_length=0), True)])
    addresses = [x509.IPAddress(ipaddress.ip_address(a)) for a in (SERVER_ADDRESS, "127.0.0.1")]
    cert = signed("patchwork", key, "test CA", ca_key, [(x509.SubjectAlternativeName(addresses), False)])
    files = (folder / "ca.pem", folder / "cert.pem", folder / "key.pem")
    files[0].write_bytes(ca)
    files[1].write_bytes(cert)
    files[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return files


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint, cm3leon_checkpoint, mavil_checkpoints):
    """A detached server of three models (BLT, CM3Leon, MAViL) in its own
    namespace: TLS for clients on every interface, BLT in a deployment of its
    own (CM3Leon and MAViL in the gateway's replica), the rest as by default."""
    root = tmp_path_factory.mktemp("security")
    checkpoints = root / "checkpoints"
    for name, path in (("blt", tiny_checkpoint), ("cm3leon", cm3leon_checkpoint[0]), ("mavil", mavil_checkpoints[1])):
        shutil.copytree(path, checkpoints / name)
    ca, cert, key = certificate_authority(root)
    ray_tmp = Path(f"/tmp/pw-{secrets.token_hex(3)}")  # Ray's sockets need a short path
    ray_tmp.mkdir()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, "RAY_TMPDIR": str(ray_tmp),
           "PATCHWORK_STATE_DIR": str(root / "state"), "PATCHWORK_AUTH_TOKEN": TOKEN}
    namespaces = Namespaces()
    config = ServingConfig(checkpoints=checkpoints, host="0.0.0.0", tls={"cert": cert, "key": key})
    try:
        up = namespaces.run(namespaces.server, [*PATCHWORK, "serve", "up", "--checkpoints", checkpoints, "--host",
                                                config.host, "--tls-cert", cert, "--tls-key", key,
                                                "--gateway-models", ",".join(IN_GATEWAY), "--detach",
                                                "--timeout", SERVER_START_TIMEOUT_S], env)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        assert f"on 0.0.0.0:{config.tls.port} (every interface) with TLS" in up.stdout
        yield namespaces, config, ca, env
    finally:
        namespaces.close()  # ends every process in them: the cluster and NGINX
        shutil.rmtree(ray_tmp, ignore_errors=True)


def listening(namespaces: Namespaces, env: dict) -> list[tuple[str, int, str]]:
    """(process, port, bind address) of every listening TCP socket in the server's namespace."""
    lines = namespaces.run(namespaces.server, ["ss", "-ltnpH"], env).stdout.splitlines()
    found = set()
    for line in lines:
        local = line.split()[3]
        host, port = local.rsplit(":", 1)
        for pid in re.findall(r"pid=(\d+)", line):
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            found.add((process_name(command), int(port), host.strip("[]").removeprefix("::ffff:")))
    return sorted(found)


def process_name(command: str) -> str:
    """What docs/security.md calls the process that runs ``command``."""
    if command.startswith("ray::"):  # an actor busy in a method says which: ray::Actor.method
        name = command.split()[0].split(".")[0]
        return re.sub(r"model-[^\s]+$", "model-NAME", name)
    if command.startswith("nginx"):
        return "nginx"
    scripts = {"gcs_server": "gcs_server", "raylet/raylet": "raylet", "monitor.py": "monitor.py",
               "dashboard/dashboard.py": "dashboard.py", "ray.util.client.server": "ray.util.client.server"}
    for script, name in scripts.items():
        if script in command:
            return name
    return command.split()[0]


def inventory() -> list[dict]:
    """The rows of the socket table in docs/security.md."""
    text = (REPO / "docs" / "security.md").read_text()
    table = text[text.index("| process |"):]
    rows = []
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows.append({"process": re.findall(r"`([^`]+)`", cells[0])[0], "port": re.findall(r"`([^`]+)`", cells[1])[0],
                     "bind": re.findall(r"`([^`]+)`", cells[2])[0]})
    return rows


def expected_sockets(config: ServingConfig, models: int) -> list[tuple[str, str, str]]:
    named_ports = {"grpc_port": config.grpc_port, "direct_grpc_port": config.direct_grpc_port,
                   "http_port": config.http_port, "metrics_port": config.metrics_port, "tls.port": config.tls.port}
    binds = {"host": config.host, "plaintext_host": config.plaintext_host(), "127.0.0.1": "127.0.0.1"}
    expected = []
    for row in inventory():
        port = str(named_ports.get(row["port"], row["port"]))
        copies = models if row["process"].endswith("model-NAME") else 1
        expected += [(row["process"], port, binds[row["bind"]])] * copies
    return sorted(expected)


def test_the_sockets_are_those_the_security_notes_list(server):
    namespaces, config, _, env = server
    found = [(process, str(port) if port in RAY_PORTS or port in (
        config.grpc_port, config.direct_grpc_port, config.http_port, config.metrics_port, config.tls.port)
        else "a free port", bind) for process, port, bind in listening(namespaces, env)]
    assert sorted(found) == expected_sockets(config, models=1)  # one model with a deployment of its own


def test_from_another_host_only_the_tls_port_answers(server):
    namespaces, config, _, env = server
    ports = sorted({port for _, port, _ in listening(namespaces, env)})
    assert config.grpc_port in ports and config.direct_grpc_port in ports and len(ports) > 15
    probe = ("import socket, sys\n"
             "for port in map(int, sys.argv[1:]):\n"
             "    with socket.socket() as s:\n"
             "        s.settimeout(5)\n"
             f"        print(port, s.connect_ex(({SERVER_ADDRESS!r}, port)))\n")
    run = namespaces.run(namespaces.client, [sys.executable, "-c", probe, *ports], env)
    assert run.returncode == 0, run.stderr
    answered = {int(port): int(code) for port, code in (line.split() for line in run.stdout.splitlines())}
    assert {port for port, code in answered.items() if code == 0} == {config.tls.port}
    refused = {port: code for port, code in answered.items() if port != config.tls.port}
    assert set(refused.values()) == {111}, refused  # ECONNREFUSED: nothing listens there for this host


CALLS = """
import grpc, sys
from patchwork.client import NO_RETRY, Client
with Client(sys.argv[1], token=sys.argv[2], ca_file=sys.argv[3] or None, retry=NO_RETRY, timeout=120) as client:
    calls = {
        "Generate": lambda: client.generate("def ", max_new_bytes=4),
        "GenerateStream": lambda: list(client.generate_stream("def ", max_new_bytes=4)),
        "Score": lambda: client.score("def "),
        "GenerateImage": lambda: client.generate_image("a red circle"),
        "Caption": lambda: client.caption(b"not an image"),
        "Infill": lambda: client.infill("a <mask> circle", max_new_bytes=4),
        "Embed": lambda: client.embed(wav=b"x"),
        "Classify": lambda: client.classify(wav=b"x"),
        "Retrieve": lambda: client.retrieve(wav=b"x", index="heldout"),
        "ListModels": lambda: client.list_models(),
    }
    for name, call in calls.items():
        try:
            call()
            print(name, "OK")
        except grpc.RpcError as error:
            print(name, error.code().name)
"""


def calls_from_the_client_host(server, token: str, ca_file: str) -> dict[str, str]:
    namespaces, config, _, env = server
    run = namespaces.run(namespaces.client, [sys.executable, "-c", CALLS, f"{SERVER_ADDRESS}:{config.tls.port}",
                                             token, ca_file], env)
    assert run.returncode == 0, run.stderr
    return dict(line.split() for line in run.stdout.splitlines())


def test_over_tls_the_token_decides_every_rpc(server):
    _, _, ca, _ = server
    anonymous = calls_from_the_client_host(server, "", str(ca))
    assert len(anonymous) == 10 and set(anonymous.values()) == {"UNAUTHENTICATED"}, anonymous
    wrong = calls_from_the_client_host(server, "not-the-token", str(ca))
    assert set(wrong.values()) == {"UNAUTHENTICATED"}, wrong
    served = calls_from_the_client_host(server, TOKEN, str(ca))
    assert {name for name, code in served.items() if code == "OK"} >= {"Generate", "GenerateStream", "Score",
                                                                      "GenerateImage", "Infill", "ListModels"}
    assert set(served.values()) <= {"OK", "INVALID_ARGUMENT"}, served  # the bad media are the requests' own fault


def test_without_the_ca_the_handshake_fails(server):
    untrusted = calls_from_the_client_host(server, TOKEN, "")  # plaintext to the TLS port
    assert set(untrusted.values()) == {"UNAVAILABLE"}, untrusted
    namespaces, config, _, env = server
    system_roots = ("import grpc\nfrom patchwork.client import NO_RETRY, Client\n"
                    f"client = Client({SERVER_ADDRESS + ':' + str(config.tls.port)!r}, token={TOKEN!r}, "
                    "credentials=grpc.ssl_channel_credentials(), retry=NO_RETRY, timeout=60)\n"
                    "try:\n    client.generate('x')\n"
                    "except grpc.RpcError as e:\n    print(e.code().name, e.details())\n")
    run = namespaces.run(namespaces.client, [sys.executable, "-c", system_roots], env)
    assert run.stdout.startswith("UNAVAILABLE") and "handshak" in run.stdout.lower(), run.stdout + run.stderr


def test_on_the_servers_host_a_replicas_internal_ports_need_the_clusters_certificate(server):
    """A local caller without the cluster's key reaches the loopback ports but
    completes no call, in plaintext or over TLS trusting the cluster's CA:
    the replica demands a client certificate that CA signed."""
    namespaces, config, _, env = server
    internal = [port for process, port, _ in listening(namespaces, env)
                if process.startswith("ray::ServeReplica") and port not in (config.direct_grpc_port, DIRECT_HTTP_PORT)]
    assert len(internal) == 2 * 2  # gateway and BLT's replica: Ray's worker port, Ray Serve's inter-deployment port
    cluster_ca = Path(env["PATCHWORK_STATE_DIR"]) / "cluster-tls" / "ca.crt"
    probe = ("import grpc, sys\n"
             "ca = open(sys.argv[1], 'rb').read()\n"
             "for port in sys.argv[2:]:\n"
             "    for credentials in (None, grpc.ssl_channel_credentials(root_certificates=ca)):\n"
             "        target = f'127.0.0.1:{port}'\n"
             "        channel = grpc.secure_channel(target, credentials) if credentials else "
             "grpc.insecure_channel(target)\n"
             "        try:\n"
             "            channel.unary_unary('/ray.serve.ASGIService/HandleRequest')(b'', timeout=5)\n"
             "            print(port, 'ANSWERED')\n"
             "        except grpc.RpcError as e:\n"
             "            print(port, e.code().name)\n")
    run = namespaces.run(namespaces.server, [sys.executable, "-c", probe, cluster_ca, *internal], env)
    outcomes = [line.split()[1] for line in run.stdout.splitlines()]
    assert len(outcomes) == 2 * len(internal) and set(outcomes) <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}, run.stdout


def test_a_normal_stop_leaves_no_traceback_in_any_log(server):
    """Runs last: `serve down` drains and stops the server, and no process of
    the cluster (controller, proxy, gateway, the models in it and in their
    own replica) wrote a traceback while it served these tests and stopped."""
    namespaces, _, _, env = server
    down = namespaces.run(namespaces.server, [*PATCHWORK, "serve", "down", "--grace", "5"], env)
    assert down.returncode == 0 and "stopped in" in down.stdout, down.stdout[-2000:] + down.stderr[-2000:]
    logs = [path for path in Path(env["RAY_TMPDIR"]).rglob("session_*/logs/**/*") if path.is_file()]
    assert any("gateway" in path.name for path in logs) and any("model-blt" in path.name for path in logs)
    with_tracebacks = {path.name: path.read_text(errors="replace") for path in logs
                       if "Traceback" in path.read_text(errors="replace")}
    assert not with_tracebacks, "\n\n".join(f"{name}:\n{text[-3000:]}" for name, text in with_tracebacks.items())
    assert "Traceback" not in down.stdout + down.stderr
