"""TLS for clients: NGINX in front of the public gRPC port.

Ray Serve 2.60's gRPC proxy and direct ingress speak plaintext only (its
``gRPCOptions`` have no TLS setting, and ``RAY_USE_TLS`` covers Ray's own
servers, not these). With ``ServingConfig.tls`` Patchwork keeps them on
loopback and starts NGINX (Debian's ``nginx-light``) to terminate TLS on
``host:tls.port`` and pass each call, HTTP/2 end to end, to the gateway's own
port (``grpc_pass``): streams, deadlines (``grpc-timeout``), metadata (the
bearer token, which now travels encrypted) and cancellations go through. Its
configuration, pid file and logs live in the state directory
(``serving.cluster_tls.state_dir``); ``patchwork serve down`` stops it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from patchwork.serving.binding import address
from patchwork.serving.cluster_tls import state_dir
from patchwork.serving.config import ServingConfig

FOLDER = "tls-front"
# A call may stream for as long as a generation takes; NGINX's 60 s default would cut it.
STREAM_TIMEOUT_S = 3600

CONFIG = """\
# Written by `patchwork serve up`: TLS in front of the gateway's own gRPC port.
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {folder}/body;
    upstream patchwork_gateway {{
        server {upstream};
        keepalive 32;
    }}
    server {{
        listen {listen} ssl http2;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        client_max_body_size {max_body};
        location / {{
            grpc_pass grpc://patchwork_gateway;
            grpc_read_timeout {timeout}s;
            grpc_send_timeout {timeout}s;
        }}
    }}
}}
"""


class FrontError(RuntimeError):
    """NGINX is missing or would not start; the message says why."""


def folder() -> Path:
    return state_dir() / FOLDER


def start(config: ServingConfig, upstream_port: int) -> str:
    """Starts NGINX for ``config.tls`` in front of ``127.0.0.1:upstream_port``;
    returns the address it listens on."""
    nginx = shutil.which("nginx") or (Path("/usr/sbin/nginx") if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        raise FrontError("TLS for clients needs NGINX (Debian: `apt-get install nginx-light`); it is not installed")
    stop()
    where = folder()
    where.mkdir(mode=0o700, parents=True, exist_ok=True)
    listen = address(config.host, config.tls.port)
    (where / "nginx.conf").write_text(CONFIG.format(
        folder=where, upstream=address("127.0.0.1", upstream_port), listen=listen,
        cert=config.tls.cert.resolve(), key=config.tls.key.resolve(), max_body=config.limits.max_message_bytes,
        timeout=STREAM_TIMEOUT_S))
    run = subprocess.run([str(nginx), "-p", str(where), "-c", str(where / "nginx.conf"), "-e", str(where / "error.log")],
                         capture_output=True, text=True)
    if run.returncode != 0:
        raise FrontError(f"NGINX did not start: {run.stderr.strip() or (where / 'error.log').read_text()[-500:]}")
    return listen


def stop(timeout_s: float = 10.0) -> bool:
    """Stops a running NGINX of this state directory (its open calls finish first); whether one ran."""
    pid_file = folder() / "nginx.pid"
    if not pid_file.exists():
        return False
    try:
        pid = int(pid_file.read_text().strip())
        Path(f"/proc/{pid}").stat()
    except (ValueError, OSError):
        pid_file.unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGQUIT)  # NGINX's graceful shutdown
    deadline = time.monotonic() + timeout_s
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if Path(f"/proc/{pid}").exists():
        os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    return True
