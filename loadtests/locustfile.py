"""Locust users for the Patchwork gRPC endpoints (run through `patchwork loadtest`).

Settings come from the environment: PATCHWORK_MAX_NEW_BYTES (64),
PATCHWORK_TEMPERATURE (0.8), PATCHWORK_MODEL (the server's default),
PATCHWORK_AUTH_TOKEN (no auth).
"""

from __future__ import annotations

import os
import random

import grpc
from locust import between, task

from patchwork.loadtests.grpc_user import GrpcUser

PROMPTS = [
    b"def ", b"import ", b"class Parser:\n", b"    return ", b"# Copyright", b"for i in range(",
    b"The quick brown fox", b"if __name__ == '__main__':\n", b"with open(path) as f:\n", b"try:\n    ",
]


class ByteLMUser(GrpcUser):
    """Mostly streams, some unary generations, some scoring."""

    wait_time = between(0.0, 0.1)
    token = os.environ.get("PATCHWORK_AUTH_TOKEN") or None
    max_new_bytes = int(os.environ.get("PATCHWORK_MAX_NEW_BYTES", "64"))
    temperature = float(os.environ.get("PATCHWORK_TEMPERATURE", "0.8"))
    model = os.environ.get("PATCHWORK_MODEL", "")

    def _request(self) -> dict:
        return {"prompt": random.choice(PROMPTS), "max_new_bytes": self.max_new_bytes,
                "temperature": self.temperature, "seed": random.getrandbits(32), "model": self.model}

    # Failed calls are already reported by the interceptor; the user goes on.

    @task(6)
    def generate_stream(self):
        try:
            for _ in self.client.generate_stream(**self._request(), timeout=120):
                pass
        except grpc.RpcError:
            pass

    @task(3)
    def generate(self):
        try:
            self.client.generate(**self._request(), timeout=120)
        except grpc.RpcError:
            pass

    @task(1)
    def score(self):
        try:
            self.client.score(random.choice(PROMPTS) * 4, model=self.model, timeout=60)
        except grpc.RpcError:
            pass
