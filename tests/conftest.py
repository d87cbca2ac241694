"""Shared fixtures: a tiny trained checkpoint and one Ray cluster per session."""

from __future__ import annotations

import os

# Triton kernels run on CPU tensors through the interpreter; set before triton loads.
os.environ.setdefault("TRITON_INTERPRET", "1")

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engines.blt.config import BltConfig, HashEmbeddingConfig
from engines.layers import TransformerConfig

REPO = Path(__file__).resolve().parent.parent


def small_blt_config(window: int = 16, **updates) -> BltConfig:
    """A BLT small enough for exhaustive unit tests; ``window`` is the local
    models' attention window, ``updates`` replace top-level config fields."""
    local = TransformerConfig(dim=32, n_layers=1, n_heads=2, window=window)
    config = BltConfig(
        entropy_model=TransformerConfig(dim=32, n_layers=1, n_heads=2, window=window),
        hash_embeddings=HashEmbeddingConfig(ngram_sizes=[3, 4, 5], buckets=257),
        local_encoder=local,
        local_decoder=local.model_copy(update={"n_layers": 2}),
        global_model=TransformerConfig(dim=48, n_layers=2, n_heads=4),
        patching={"threshold": 5.45},
    )
    return BltConfig.model_validate({**config.model_dump(), **updates})


def random_blt(seed: int = 0, window: int = 16, **updates):
    """A randomly initialised BLT (see ``small_blt_config``)."""
    from engines.blt.model import BltModel

    torch.manual_seed(seed)
    model = BltModel(small_blt_config(window, **updates))
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    return model.eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The tiny preset, trained once per session through the real CLI."""
    out = tmp_path_factory.mktemp("checkpoints") / "tiny"
    subprocess.run(
        [sys.executable, "-m", "training", "blt", "--preset", "tiny", "--out", str(out)],
        check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def grpc_target(ray_cluster, tiny_checkpoint) -> str:
    """host:port of a running Patchwork application serving the tiny checkpoint."""
    from serving.app import start
    from engines.scheduler import SchedulerConfig
    from serving.config import APP_NAME, ROUTE_PREFIX, ActorOptions, DeploymentOptions, Limits, ServingConfig

    config = ServingConfig(
        checkpoints=tiny_checkpoint.parent,
        grpc_port=free_port(),
        http_port=free_port(),
        limits=Limits(max_new_bytes=512, default_new_bytes=16, max_prompt_bytes=1024, max_stop_sequences=4),
        models=DeploymentOptions(ray_actor_options=ActorOptions(num_cpus=1)),
        engine=SchedulerConfig(max_batch_size=4, max_sequence_bytes=700, max_queue=8),
    )
    start(config, APP_NAME, ROUTE_PREFIX)
    return f"127.0.0.1:{config.grpc_port}"
