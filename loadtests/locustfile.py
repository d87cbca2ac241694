"""Locust users for the Patchwork gRPC endpoints (run through `python -m loadtests`).

Settings come from the environment: PATCHWORK_MAX_NEW_BYTES (64),
PATCHWORK_TEMPERATURE (0.8), PATCHWORK_MODEL (the server's default),
PATCHWORK_AUTH_TOKEN (no auth).
"""

from __future__ import annotations

import os
import random

import grpc
from locust import between, task

from loadtests.grpc_user import GrpcUser

PROMPTS = [
    b"def ", b"import ", b"class Parser:\n", b"    return ", b"# Copyright", b"for i in range(",
    b"The quick brown fox", b"if __name__ == '__main__':\n", b"with open(path) as f:\n", b"try:\n    ",
]


class ByteLMUser(GrpcUser):
    """Mostly streams, some unary generations, scoring and listing."""

    wait_time = between(0.0, 0.1)
    token = os.environ.get("PATCHWORK_AUTH_TOKEN") or None
    max_new_bytes = int(os.environ.get("PATCHWORK_MAX_NEW_BYTES", "64"))
    temperature = float(os.environ.get("PATCHWORK_TEMPERATURE", "0.8"))
    model = os.environ.get("PATCHWORK_MODEL", "")

    def on_start(self):
        from patchwork.v1 import bytelm_pb2_grpc, models_pb2_grpc

        self.bytelm = bytelm_pb2_grpc.ByteLMStub(self.channel)
        self.models = models_pb2_grpc.ModelsStub(self.channel)

    def _request(self):
        from patchwork.v1 import bytelm_pb2

        return bytelm_pb2.GenerateRequest(
            prompt=random.choice(PROMPTS), max_new_bytes=self.max_new_bytes, temperature=self.temperature,
            seed=random.getrandbits(32), model=self.model,
        )

    # Failed calls are already reported by the interceptor; the user goes on.

    @task(6)
    def generate_stream(self):
        try:
            for _ in self.bytelm.GenerateStream(self._request(), timeout=120):
                pass
        except grpc.RpcError:
            pass

    @task(3)
    def generate(self):
        try:
            self.bytelm.Generate(self._request(), timeout=120)
        except grpc.RpcError:
            pass

    @task(1)
    def score(self):
        from patchwork.v1 import bytelm_pb2

        try:
            self.bytelm.Score(bytelm_pb2.ScoreRequest(text=random.choice(PROMPTS) * 4, model=self.model), timeout=60)
        except grpc.RpcError:
            pass
