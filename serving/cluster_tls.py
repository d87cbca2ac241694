"""Mutual TLS between the Ray cluster's own processes.

Ray's gRPC servers (GCS, raylets, workers, and Ray Serve's inter-deployment
servers, whose handlers unpickle what they receive) trust whoever reaches
them. With ``RAY_USE_TLS`` and a CA, a certificate and its key
(``RAY_TLS_CA_CERT``, ``RAY_TLS_SERVER_CERT``, ``RAY_TLS_SERVER_KEY``) every
Ray process demands and presents a certificate the CA signed, so a process
without the cluster's key cannot complete a call on any of them.

Patchwork makes the CA at a cluster's first start, in its state directory
(``$PATCHWORK_STATE_DIR``, else ``$XDG_STATE_HOME/patchwork``, else
``~/.local/state/patchwork``), and a certificate signed by it for the node's
addresses; the folder is its owner's alone (0700) and so are the keys (0600).
Every process that starts or joins the cluster (``serving.cluster``) takes
Ray's variables from ``environment``. An environment that sets
``RAY_USE_TLS`` itself keeps its own certificates.
"""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import os
import tempfile
from pathlib import Path

STATE_ENV = "PATCHWORK_STATE_DIR"
TLS_FOLDER = "cluster-tls"
CA_CERT, CA_KEY, NODE_CERT, NODE_KEY = "ca.crt", "ca.key", "node.crt", "node.key"
VALID_FOR = datetime.timedelta(days=3650)
RAY_TLS_VARIABLES = ("RAY_USE_TLS", "RAY_TLS_SERVER_CERT", "RAY_TLS_SERVER_KEY", "RAY_TLS_CA_CERT")


def state_dir() -> Path:
    """Where Patchwork keeps what a cluster needs across processes."""
    if os.environ.get(STATE_ENV):
        return Path(os.environ[STATE_ENV])
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "patchwork"


def environment(addresses: list[str]) -> dict[str, str]:
    """Ray's TLS variables for a node reached at ``addresses`` (IPs), making the
    CA and the node's certificate first when they are missing, expired or do
    not name every address; nothing when the environment has its own."""
    if "RAY_USE_TLS" in os.environ:
        return {}
    folder = state_dir() / TLS_FOLDER
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    # One process makes them; the others wait, then read.
    with os.fdopen(os.open(folder / ".lock", os.O_CREAT | os.O_RDWR, 0o600)) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / CA_KEY).exists():
            _write_private(folder, _authority())
        if not _covers(folder / NODE_CERT, addresses):
            _write_private(folder, _node_certificate(folder, addresses))
    return {"RAY_USE_TLS": "1", "RAY_TLS_CA_CERT": str(folder / CA_CERT),
            "RAY_TLS_SERVER_CERT": str(folder / NODE_CERT), "RAY_TLS_SERVER_KEY": str(folder / NODE_KEY)}


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _pem(obj) -> bytes:
    from cryptography.hazmat.primitives import serialization

    if hasattr(obj, "private_bytes"):
        return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    return obj.public_bytes(serialization.Encoding.PEM)


def _certificate(subject: str, key, issuer, issuer_key, extensions: list) -> bytes:
    """A certificate of ``key`` named ``subject``, signed by ``issuer_key`` as ``issuer`` (an x509.Name)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALID_FOR))
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return _pem(builder.sign(issuer_key, hashes.SHA256()))


def _authority() -> dict[str, bytes]:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    key, name = _key(), "Patchwork cluster CA"
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    certificate = _certificate(name, key, issuer, key, [(x509.BasicConstraints(ca=True, path_length=0), True)])
    return {CA_CERT: certificate, CA_KEY: _pem(key)}


def _node_certificate(folder: Path, addresses: list[str]) -> dict[str, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca_key = load_pem_private_key((folder / CA_KEY).read_bytes(), password=None)
    issuer = x509.load_pem_x509_certificate((folder / CA_CERT).read_bytes()).subject
    names = [x509.DNSName("localhost"), *(x509.IPAddress(ipaddress.ip_address(a)) for a in _names(addresses))]
    key = _key()
    certificate = _certificate("Patchwork cluster node", key, issuer, ca_key, [
        (x509.SubjectAlternativeName(names), False),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), False),
    ])
    return {NODE_CERT: certificate, NODE_KEY: _pem(key)}


def _names(addresses: list[str]) -> list[str]:
    return sorted({"127.0.0.1", "::1", *addresses})


def _covers(path: Path, addresses: list[str]) -> bool:
    """Whether the certificate at ``path`` is valid a while yet and names every address."""
    from cryptography import x509

    if not path.exists():
        return False
    certificate = x509.load_pem_x509_certificate(path.read_bytes())
    if certificate.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc) < datetime.timedelta(days=1):
        return False
    named = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {ipaddress.ip_address(a) for a in _names(addresses)} <= set(named.get_values_for_type(x509.IPAddress))


def _write_private(folder: Path, files: dict[str, bytes]) -> None:
    """Writes each file readable by its owner alone (0600), replacing it whole."""
    for name, data in files.items():
        descriptor, staged = tempfile.mkstemp(dir=folder)
        with os.fdopen(descriptor, "wb") as out:
            out.write(data)
        os.replace(staged, folder / name)
