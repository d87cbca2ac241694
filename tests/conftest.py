"""Shared fixtures: the tiny checkpoints the session trains and one Ray cluster per session."""

from __future__ import annotations

import os

# Triton kernels run on CPU tensors through the interpreter; set before triton loads.
os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib
import io
import json
import random
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from patchwork.engines.blt.config import BltConfig, HashEmbeddingConfig
from patchwork.engines.layers import TransformerConfig

REPO = Path(__file__).resolve().parent.parent
# The `patchwork` command of the environment running the tests.
PATCHWORK = [str(Path(sys.executable).with_name("patchwork"))]


@dataclass
class Ran:
    returncode: int
    stdout: str  # decoded, as `subprocess.run(..., text=True)` gives it
    stderr: str
    stdout_bytes: bytes  # as written


def run_patchwork(*args, cwd: Path | None = None) -> Ran:
    """`patchwork ARGS` run in this process (``patchwork.cli.main``, what the
    console script runs), its output captured: no interpreter to start. For the
    commands that start no cluster and leave no setting behind; the others (and
    the checkpoints the session trains) run as processes, through ``PATCHWORK``."""
    from patchwork.cli import main

    stdout, stderr = (io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True) for _ in range(2))
    previous = Path.cwd()
    try:
        os.chdir(cwd or previous)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = main([str(arg) for arg in args])
            except SystemExit as exit:  # argparse's errors and --help, or a message as the interpreter prints it
                code = exit.code
                if code is not None and not isinstance(code, int):
                    print(code, file=sys.stderr)
                    code = 1
    finally:
        os.chdir(previous)
    written = stdout.buffer.getvalue()
    return Ran(code or 0, written.decode(errors="replace"), stderr.buffer.getvalue().decode(errors="replace"), written)


# What a test needs, said by a marker that collection adds from the fixtures it uses:
# `make test-fast` runs the tests that need neither.
NEEDS = {
    "checkpoints": {"tiny_checkpoint", "cm3leon_checkpoint", "mot_checkpoint", "mavil_checkpoints"},
    "server": {"ray_cluster"},
}


def pytest_collection_modifyitems(items):
    """Marks each test with what it needs, and orders them: first the tests that
    need nothing the session makes (while its checkpoints train), then those
    that need checkpoints, then the server's; tests that stop Ray Serve run
    last, so no other test sees the restart."""
    for item in items:
        for marker, fixtures in NEEDS.items():
            if fixtures & set(getattr(item, "fixturenames", ())):
                item.add_marker(marker)
    items.sort(key=lambda item: tuple(item.get_closest_marker(marker) is not None
                                      for marker in ("stops_serve", "server", "checkpoints")))


class Trainings:
    """The checkpoints the session trains through the real command line, all
    started at once when the session starts, each process on one thread (they
    share the machine with the tests that need none and run meanwhile)."""

    def __init__(self, tmp_path_factory):
        roots = {name: tmp_path_factory.mktemp(name) for name in ("checkpoints", "cm3leon", "mot", "mavil")}
        self.paths = {"blt": roots["checkpoints"] / "tiny", "cm3leon": roots["cm3leon"] / "cm3leon-tiny",
                      "mot": roots["mot"] / "mot-tiny", "mavil-1": roots["mavil"] / "mavil-stage1",
                      "mavil-2": roots["mavil"] / "mavil-stage2"}
        paths = self.paths
        commands = {
            "blt": [["train", "blt", "--preset", "tiny", "--out", paths["blt"]]],
            "cm3leon": [["train", "cm3leon", "--preset", "tiny", "--out", paths["cm3leon"]]],
            "mot": [["train", "cm3leon", "--preset", "mot-tiny", "--out", paths["mot"]]],
            "mavil": [["train", "mavil", "--stage", "1", "--preset", "tiny", "--out", paths["mavil-1"]],
                      ["train", "mavil", "--stage", "2", "--preset", "tiny", "--teacher", paths["mavil-1"],
                       "--out", paths["mavil-2"]]],
        }
        self.logs = tmp_path_factory.getbasetemp()
        self.processes: list[subprocess.Popen] = []
        self.pool = ThreadPoolExecutor(len(commands))
        self.done = {name: self.pool.submit(self._run, name, steps) for name, steps in commands.items()}

    def _run(self, name: str, steps: list[list]) -> None:
        for step in steps:
            log = self.logs / f"{name}.log"
            with open(log, "w") as out:
                process = subprocess.Popen([*PATCHWORK, *map(str, step)], cwd=REPO, stdout=out,
                                           stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
                self.processes.append(process)
                if process.wait(timeout=1800) != 0:
                    raise RuntimeError(f"`patchwork {' '.join(map(str, step))}` failed:\n{log.read_text()[-3000:]}")

    def wait(self, name: str) -> None:
        self.done[name].result()

    def stop(self) -> None:
        for process in self.processes:
            process.kill()
        self.pool.shutdown(wait=True)


@pytest.fixture(scope="session", autouse=True)
def trainings(request, tmp_path_factory):
    """Starts the session's trainings before the first test, when a selected test needs a checkpoint."""
    if not any(item.get_closest_marker("checkpoints") for item in request.session.items):
        yield None
        return
    started = Trainings(tmp_path_factory)
    yield started
    started.stop()


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
    from patchwork.engines.blt.model import BltModel

    torch.manual_seed(seed)
    model = BltModel(small_blt_config(window, **updates))
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    return model.eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(trainings) -> Path:
    """BLT's tiny preset, trained once per session through the real command line."""
    trainings.wait("blt")
    return trainings.paths["blt"]


def training_metrics(path: Path) -> dict[str, float]:
    return json.loads((path / "manifest.json").read_text())["training"]["metrics"]


@pytest.fixture(scope="session")
def cm3leon_checkpoint(trainings) -> tuple[Path, dict[str, float]]:
    """CM3Leon's tiny preset, trained once per session; its path and metrics."""
    trainings.wait("cm3leon")
    return trainings.paths["cm3leon"], training_metrics(trainings.paths["cm3leon"])


@pytest.fixture(scope="session")
def mot_checkpoint(trainings) -> tuple[Path, dict[str, float]]:
    """CM3Leon's mot-tiny preset (a Mixture-of-Transformers backbone, trained
    on text, images and sound), trained once per session; its path and metrics."""
    trainings.wait("mot")
    return trainings.paths["mot"], training_metrics(trainings.paths["mot"])


@pytest.fixture(scope="session")
def mavil_checkpoints(trainings) -> tuple[Path, Path]:
    """MAViL's tiny preset, stage 1 and stage 2 from it, trained once per session."""
    trainings.wait("mavil")
    return trainings.paths["mavil-1"], trainings.paths["mavil-2"]


@pytest.fixture(scope="session")
def mavil_engine(mavil_checkpoints):
    """The stage-2 tiny checkpoint (the one the test server serves), loaded here."""
    from patchwork.engines.loading import load

    engine = load(mavil_checkpoints[1])
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def mavil_world(mavil_engine):
    """The audio-video world at the tiny checkpoint's clip length, frame count and size."""
    from patchwork.training.avworld import AudioVideoWorld

    video, audio = mavil_engine.config.video, mavil_engine.config.audio
    return AudioVideoWorld(seed=0, frames=video.frames, image_size=video.image_size, seconds=audio.seconds)


_PORTS = random.Random()


def free_port() -> int:
    """A port free now, below the kernel's ephemeral range: a process that binds
    port 0 (Ray starts many) is never handed it before the test server binds it."""
    ephemeral_start = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    while True:
        port = _PORTS.randrange(10_000, ephemeral_start)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


AUTH_TOKEN = "patchwork-test-token"


class BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds the test server's bearer token to every call."""

    def __init__(self, token: str):
        self.metadata = [("authorization", f"Bearer {token}")]

    def _with_token(self, details):
        return details._replace(metadata=list(details.metadata or []) + self.metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)


@pytest.fixture(scope="session")
def ray_cluster(serving_config, tmp_path_factory):
    """One Ray cluster for the session, started as `patchwork serve up`
    starts it; returns its Prometheus metrics port."""
    import ray

    from patchwork.serving import cluster

    # Replicas inherit the environment of the cluster: the gateway finds the
    # token there, and metrics reach the exporter every second.
    os.environ["PATCHWORK_AUTH_TOKEN"] = AUTH_TOKEN
    os.environ["RAY_metrics_report_interval_ms"] = "1000"
    # The cluster's CA and certificates (mutual TLS between its processes) belong to this session.
    os.environ["PATCHWORK_STATE_DIR"] = str(tmp_path_factory.mktemp("state"))
    cluster.start(serving_config, num_cpus=2, logging_level="ERROR", log_to_driver=False)
    yield serving_config.metrics_port
    from ray import serve

    serve.shutdown()
    ray.shutdown()


WIDE_MODEL = "wide"
BOUNDED_MODEL = "bounded"
ECHO_MODEL = "echo"
CM3LEON_MODEL = "cm3leon"
MOT_MODEL = "mot"
MAVIL_MODEL = "mavil"
IN_GATEWAY_MODEL = "local"
AUTOSCALED_MODEL = "autoscaled"
# The image decoding the served ``cm3leon`` checkpoint's manifest records as its
# evaluation's best (``mot`` has none recorded: it takes the family's).
RECORDED_IMAGE_DEFAULTS = {"guidance": "classifier_free", "guidance_scale": 2.0, "temperature": 1.0, "top_p": 0.8,
                           "contrastive_alpha": 0.3, "contrastive_k": 2, "documents": 1,
                           "chosen_by": "evaluation: CFG 2, top-p 0.8, one document"}


@pytest.fixture(scope="session")
def serving_config(tiny_checkpoint, cm3leon_checkpoint, mot_checkpoint, mavil_checkpoints):
    """The test server: the tiny checkpoint three times, as ``tiny`` (4 slots,
    4 requests in flight and 4 queued per replica), ``wide`` (32 slots, for
    tests with many concurrent streams) and ``bounded`` (2 slots and 2 places
    in the engine's queue behind a generous Ray Serve bound, so the engine's
    own queue bound is what refuses; the tests that kill a replica have it to
    themselves); ``echo``, a model of the test family in
    ``tests/echo_family.py``; ``cm3leon``, CM3Leon's tiny preset (4 slots and
    16 places in its engine's queue); ``mot``, its mot-tiny preset
    (Mixture-of-Transformers, with sound); and
    ``mavil``, MAViL's tiny preset after stage 2 (8 clips a batch, 32
    requests in flight); ``local``, the tiny checkpoint once more, run by the
    gateway's replica itself (no hop to a model deployment); ``autoscaled``,
    the tiny checkpoint in a deployment that Ray Serve's autoscaler moves
    between one and two replicas within seconds (the autoscaling test has it
    to itself). ``cm3leon``'s manifest records image decoding defaults
    (``RECORDED_IMAGE_DEFAULTS``)."""
    import shutil

    from patchwork.engines.checkpoint import record_decoding
    from patchwork.engines.scheduler import SchedulerConfig
    from patchwork.serving.config import ActorOptions, AutoscalingConfig, DeploymentOptions, Limits, ServingConfig
    from tests.echo_family import write_checkpoint

    for name in (WIDE_MODEL, BOUNDED_MODEL, IN_GATEWAY_MODEL, AUTOSCALED_MODEL):
        shutil.copytree(tiny_checkpoint, tiny_checkpoint.parent / name, dirs_exist_ok=True)
    write_checkpoint(tiny_checkpoint.parent / ECHO_MODEL, shift=1)
    shutil.copytree(cm3leon_checkpoint[0], tiny_checkpoint.parent / CM3LEON_MODEL, dirs_exist_ok=True)
    record_decoding(tiny_checkpoint.parent / CM3LEON_MODEL, {"image": RECORDED_IMAGE_DEFAULTS})
    shutil.copytree(mot_checkpoint[0], tiny_checkpoint.parent / MOT_MODEL, dirs_exist_ok=True)
    shutil.copytree(mavil_checkpoints[1], tiny_checkpoint.parent / MAVIL_MODEL, dirs_exist_ok=True)
    half_cpu = ActorOptions(num_cpus=0.5)
    return ServingConfig(
        checkpoints=tiny_checkpoint.parent,
        grpc_port=free_port(),
        direct_grpc_port=free_port(),
        http_port=free_port(),
        metrics_port=free_port(),
        default_model="tiny",
        # Scaling down lets the stopped replica's streams finish for this long: a bound
        # for a busy machine, as long as the scaling test's deadline for a stream.
        drain_grace_s=600.0,
        families={"echo": "tests.echo_family"},
        gateway_models=[IN_GATEWAY_MODEL],
        limits=Limits(max_new_bytes=1900, default_new_bytes=16, max_prompt_bytes=1536, max_stop_sequences=4,
                      max_samples=4, max_image_side=256, max_clip_pixels=16 * 256 * 256),
        models=DeploymentOptions(max_ongoing_requests=4, max_queued_requests=4, ray_actor_options=half_cpu),
        # The frozen-replica test freezes `wide`: a shorter health-check timeout finds it sooner.
        model_overrides={WIDE_MODEL: DeploymentOptions(max_ongoing_requests=64, max_queued_requests=64,
                                                       health_check_timeout_s=10, ray_actor_options=half_cpu),
                         BOUNDED_MODEL: DeploymentOptions(max_ongoing_requests=32, max_queued_requests=-1,
                                                          ray_actor_options=half_cpu),
                         ECHO_MODEL: DeploymentOptions(ray_actor_options=ActorOptions(num_cpus=0.0)),
                         IN_GATEWAY_MODEL: DeploymentOptions(ray_actor_options=ActorOptions(num_cpus=0.0)),
                         CM3LEON_MODEL: DeploymentOptions(ray_actor_options=ActorOptions(num_cpus=0.0)),
                         MOT_MODEL: DeploymentOptions(ray_actor_options=ActorOptions(num_cpus=0.0)),
                         MAVIL_MODEL: DeploymentOptions(max_ongoing_requests=32, max_queued_requests=32,
                                                        ray_actor_options=ActorOptions(num_cpus=0.0)),
                         AUTOSCALED_MODEL: DeploymentOptions(
                             autoscaling_config=AutoscalingConfig(
                                 min_replicas=1, max_replicas=2, target_ongoing_requests=1, upscale_delay_s=0,
                                 downscale_delay_s=2, metrics_interval_s=0.5, look_back_period_s=2),
                             max_queued_requests=-1, ray_actor_options=ActorOptions(num_cpus=0.0))},
        engine=SchedulerConfig(max_batch_size=4, max_sequence_bytes=2000, max_queue=8),
        # A larger prefill budget keeps the 160-request mixed-traffic test short on a busy machine.
        engine_overrides={WIDE_MODEL: SchedulerConfig(max_batch_size=32, max_sequence_bytes=2000, max_queue=64,
                                                      prefill_budget=128),
                          BOUNDED_MODEL: SchedulerConfig(max_batch_size=2, max_sequence_bytes=2000, max_queue=2),
                          # Room for a GenerateImage of two samples from each of the mixed load test's users.
                          CM3LEON_MODEL: SchedulerConfig(max_batch_size=4, max_sequence_bytes=2000, max_queue=16),
                          MAVIL_MODEL: SchedulerConfig(max_batch_size=8, max_sequence_bytes=2000, max_queue=32)},
    )


# How long a test waits for a server it starts to answer: a bound for a busy machine.
SERVER_START_TIMEOUT_S = 900


@pytest.fixture(scope="session")
def grpc_target(ray_cluster, serving_config) -> str:
    """host:port of the Patchwork application serving the tiny checkpoint,
    deployed from its Ray Serve config file as `patchwork serve up` does."""
    from patchwork.serving.app import discover_checkpoints
    from patchwork.serving.deploy import apply, deploy_config

    apply(deploy_config(serving_config, list(discover_checkpoints(serving_config.checkpoints, serving_config.families))))
    target = f"127.0.0.1:{serving_config.direct_grpc_port}"  # the gateway replica's own port (direct ingress)
    wait_serving(target, timeout_s=SERVER_START_TIMEOUT_S)
    return target


@pytest.fixture(scope="session")
def proxy_target(grpc_target, serving_config) -> str:
    """host:port of Ray Serve's gRPC proxy in front of the same application."""
    target = f"127.0.0.1:{serving_config.grpc_port}"
    wait_serving(target, timeout_s=300)
    return target


def wait_serving(target: str, timeout_s: float) -> float:
    """Polls the health check until SERVING; returns the seconds it took."""
    import time

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from patchwork.serving.ops import polling_channel
    from tests.helpers import wait_until

    start = time.monotonic()
    with polling_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def serving() -> bool:
            try:
                return health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1
            except grpc.RpcError:
                return False

        wait_until(serving, timeout_s=timeout_s, interval_s=0.2, what=f"{target} to report SERVING")
    return time.monotonic() - start


@pytest.fixture(scope="session")
def channel(grpc_target):
    """A channel that sends the server's bearer token."""
    with grpc.insecure_channel(grpc_target) as raw:
        grpc.channel_ready_future(raw).result(timeout=60)
        yield grpc.intercept_channel(raw, BearerToken(AUTH_TOKEN))


@pytest.fixture(scope="session")
def stub(channel):
    from patchwork.v1 import bytelm_pb2_grpc

    return bytelm_pb2_grpc.ByteLMStub(channel)


@pytest.fixture(scope="session")
def pb2():
    from patchwork.v1 import bytelm_pb2

    return bytelm_pb2


@pytest.fixture(scope="session")
def model_handle(grpc_target):
    from ray import serve

    return serve.get_deployment_handle("model-tiny", app_name="patchwork")


@pytest.fixture(scope="session")
def wide_handle(grpc_target):
    from ray import serve

    return serve.get_deployment_handle(f"model-{WIDE_MODEL}", app_name="patchwork")


@pytest.fixture(scope="session")
def gateway_handle(grpc_target):
    from ray import serve

    return serve.get_deployment_handle("gateway", app_name="patchwork")


@pytest.fixture(scope="session")
def bounded_handle(grpc_target):
    from ray import serve

    return serve.get_deployment_handle(f"model-{BOUNDED_MODEL}", app_name="patchwork")
