"""Operations through the real proxy: auth, reflection, models, status, scaling, metrics, config files."""

import math
import subprocess
import threading
import urllib.request

import grpc
import pytest
import yaml

from tests.conftest import (
    AUTH_TOKEN,
    AUTOSCALED_MODEL,
    BOUNDED_MODEL,
    CM3LEON_MODEL,
    ECHO_MODEL,
    IN_GATEWAY_MODEL,
    MAVIL_MODEL,
    MOT_MODEL,
    PATCHWORK,
    REPO,
    WIDE_MODEL,
)
from tests.helpers import scrape, wait_until


def serving_cli(*args, timeout=300):
    return subprocess.run([*PATCHWORK, "serve", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


# -- deployment config files ------------------------------------------------


@pytest.mark.parametrize("setup", ["cpu", "gpu", "autoscale"])
def test_committed_config_files_are_what_the_config_generates(setup):
    from ray.serve.schema import ServeDeploySchema

    committed = REPO / "serving" / "configs" / f"{setup}.yaml"
    generated = serving_cli("config", "--setup", setup)  # a process of its own: no family the tests registered
    assert generated.returncode == 0, generated.stderr
    assert committed.read_text() == generated.stdout, (
        f"{committed} is stale: regenerate it with `patchwork serve config --setup {setup} --out FILE`")
    schema = ServeDeploySchema.model_validate(yaml.safe_load(committed.read_text()))
    deployments = {d.name: d for d in schema.applications[0].deployments}
    assert set(deployments) == {"gateway"}  # one model (blt-default): the gateway runs it, with its resources
    gateway = deployments["gateway"]
    assert gateway.ray_actor_options.num_cpus == 1.0
    if setup == "gpu":
        assert gateway.ray_actor_options.num_gpus == 1.0
    if setup == "autoscale":
        assert gateway.autoscaling_config["max_replicas"] == 4 and "num_replicas" not in gateway.model_fields_set
    assert schema.grpc_options.port == 9000 and len(schema.grpc_options.grpc_servicer_functions) == 5


def test_the_config_file_builder_builds_the_application(tiny_checkpoint, tmp_path):
    from patchwork.engines.checkpoint import CheckpointError
    from patchwork.serving.app import build

    # The checkpoint itself: its folder gains the test server's checkpoints (one of a test family) when it starts.
    app = build({"config": {"checkpoints": str(tiny_checkpoint)}})
    assert type(app).__name__ == "Application"
    with pytest.raises(CheckpointError, match="no checkpoints found"):
        build({"config": {"checkpoints": str(tmp_path)}})
    with pytest.raises(ValueError, match="grpc_port"):
        build({"config": {"checkpoints": str(tiny_checkpoint), "grpc_port": 0}})


# -- auth and discovery -------------------------------------------------------


def test_every_service_needs_the_token(grpc_target, pb2):
    from patchwork.v1 import bytelm_pb2_grpc, models_pb2, models_pb2_grpc

    with grpc.insecure_channel(grpc_target) as raw:
        stub = bytelm_pb2_grpc.ByteLMStub(raw)
        calls = [
            lambda md: stub.Generate(pb2.GenerateRequest(prompt=b"x", max_new_bytes=2), timeout=30, metadata=md),
            lambda md: list(stub.GenerateStream(pb2.GenerateRequest(max_new_bytes=2), timeout=30, metadata=md)),
            lambda md: stub.Score(pb2.ScoreRequest(text=b"x"), timeout=30, metadata=md),
            lambda md: models_pb2_grpc.ModelsStub(raw).ListModels(models_pb2.ListModelsRequest(), timeout=30,
                                                                   metadata=md),
        ]
        for call in calls:
            for metadata in ([], [("authorization", "Bearer wrong")], [("authorization", AUTH_TOKEN)]):
                with pytest.raises(grpc.RpcError) as error:
                    call(metadata)
                assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
            call([("authorization", f"Bearer {AUTH_TOKEN}")])


def test_reflection_lists_the_services(grpc_target):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(grpc_target) as raw:
        services = set(ProtoReflectionDescriptorDatabase(raw).get_services())
    assert {"patchwork.v1.ByteLM", "patchwork.v1.Models", "grpc.health.v1.Health"} <= services


def test_models_service_and_command(channel, grpc_target, tiny_checkpoint):
    import json

    from patchwork.v1 import models_pb2, models_pb2_grpc

    listed = models_pb2_grpc.ModelsStub(channel).ListModels(models_pb2.ListModelsRequest(), timeout=30).models
    assert [m.name for m in listed] == sorted([AUTOSCALED_MODEL, BOUNDED_MODEL, CM3LEON_MODEL, ECHO_MODEL,
                                               IN_GATEWAY_MODEL, MAVIL_MODEL, MOT_MODEL, "tiny", WIDE_MODEL])
    assert next(m for m in listed if m.name == ECHO_MODEL).family == "echo"
    assert next(m for m in listed if m.name == CM3LEON_MODEL).family == "cm3leon"
    mot = json.loads(next(m for m in listed if m.name == MOT_MODEL).config_json)
    assert (mot["backbone"], mot["untied"], mot["audio"]["seconds"]) == ("mot", "all", 1.0)
    mavil = next(m for m in listed if m.name == MAVIL_MODEL)
    assert mavil.family == "mavil" and json.loads(mavil.config_json)["indexes"]["heldout"]["audio"] > 0
    model, wide = (next(m for m in listed if m.name == name) for name in ("tiny", WIDE_MODEL))
    assert (wide.deployment, wide.is_default) == ("model-wide", False)
    manifest = json.loads((tiny_checkpoint / "manifest.json").read_text())
    assert (model.name, model.family, model.deployment, model.is_default) == ("tiny", "blt", "model-tiny", True)
    assert json.loads(model.config_json) == json.loads((tiny_checkpoint / "config.json").read_text())
    assert model.metrics["heldout_bits_per_byte"] == pytest.approx(manifest["training"]["metrics"]["heldout_bits_per_byte"])
    listed = serving_cli("models", "--target", grpc_target, timeout=60)
    assert listed.returncode == 0 and "tiny (default): family=blt deployment=model-tiny" in listed.stdout
    assert "heldout_bits_per_byte" in listed.stdout
    assert '  defaults[image] = {"chosen_by": "evaluation: CFG 2, top-p 0.8, one document"' in listed.stdout


# -- status and scaling -------------------------------------------------------


@pytest.mark.timeout(1800)  # bounds for a busy machine: a new replica waits for CPUs, a stopped one drains
def test_status_and_scaling_without_dropping_requests(stub, pb2, grpc_target, serving_config):
    report = serving_cli("status", "--json", timeout=120)
    assert report.returncode == 0, report.stderr
    deployments = yaml.safe_load(report.stdout)["patchwork"]["deployments"]
    assert deployments["model-tiny"]["replicas"] == {"RUNNING": 1}
    models = ("tiny", WIDE_MODEL, BOUNDED_MODEL, ECHO_MODEL, CM3LEON_MODEL, MOT_MODEL, MAVIL_MODEL, AUTOSCALED_MODEL)
    assert set(deployments) == {"gateway", *(f"model-{name}" for name in models)}
    # Which models each deployment runs: the gateway its own, each model deployment its model.
    assert deployments["gateway"]["models"] == [IN_GATEWAY_MODEL]
    assert all(deployments[f"model-{name}"]["models"] == [name] for name in models)
    from patchwork.serving.ops import format_status

    text = format_status(yaml.safe_load(report.stdout))  # what `status` prints without --json
    assert f"gateway: HEALTHY (1 RUNNING); runs {IN_GATEWAY_MODEL}" in text
    assert "model-tiny: HEALTHY (1 RUNNING); runs tiny" in text
    in_gateway = serving_cli("scale", f"model-{IN_GATEWAY_MODEL}", "2")
    assert in_gateway.returncode == 1 and f"{IN_GATEWAY_MODEL} runs in the gateway's replicas" in in_gateway.stderr

    for replicas in (2, 1):
        results = []

        def stream(results=results):
            request = pb2.GenerateRequest(prompt=b"scaling", max_new_bytes=300)
            results.append(list(stub.GenerateStream(request, timeout=600))[-1])  # a bound for a busy machine

        in_flight = [threading.Thread(target=stream) for _ in range(2)]
        for thread in in_flight:
            thread.start()
        # Scaling down waits while the stopped replica's streams finish, for up to the drain's grace.
        wait_s = 300 + serving_config.drain_grace_s
        scaled = serving_cli("scale", "model-tiny", str(replicas), "--timeout", str(wait_s), timeout=wait_s + 60)
        assert scaled.returncode == 0, scaled.stderr
        for thread in in_flight:
            thread.join(timeout=600)
        assert [r.usage.generated_bytes for r in results] == [300, 300]  # none dropped
        assert yaml.safe_load(serving_cli("status", "--json").stdout)["patchwork"]["deployments"]["model-tiny"][
            "replicas"] == {"RUNNING": replicas}
    missing = serving_cli("scale", "model-nope", "2")
    assert missing.returncode == 1 and "no deployment 'model-nope'" in missing.stderr


class Streams:
    """Users that each stream generations of ``new_bytes`` from ``model`` back
    to back until told to stop (after their call in flight); every call's
    outcome is kept: its bytes, or the error it ended with."""

    def __init__(self, stub, pb2, model: str, new_bytes: int):
        self.request = pb2.GenerateRequest(prompt=b"autoscaling", max_new_bytes=new_bytes, model=model)
        self.stub = stub
        self.generated: list[int] = []
        self.errors: list[str] = []
        self.users: list[tuple[threading.Thread, threading.Event]] = []

    def add(self, users: int) -> None:
        for _ in range(users):
            stop = threading.Event()
            thread = threading.Thread(target=self._user, args=(stop,))
            thread.start()
            self.users.append((thread, stop))

    def remove(self, users: int) -> None:
        leaving, self.users = self.users[:users], self.users[users:]
        for thread, stop in leaving:
            stop.set()
        for thread, _ in leaving:
            thread.join(timeout=600)

    def _user(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                last = list(self.stub.GenerateStream(self.request, timeout=300))[-1]
                self.generated.append(last.usage.generated_bytes)
            except grpc.RpcError as e:
                self.errors.append(f"{e.code().name}: {e.details()}")


@pytest.mark.timeout(1800)  # bounds for a busy machine: a new replica waits for its turn, a stopped one drains
def test_autoscaling_follows_the_load_up_and_down_without_a_failed_request(stub, pb2, serving_config):
    from patchwork.serving.ops import replica_counts

    deployment = f"model-{AUTOSCALED_MODEL}"
    scaling = serving_config.options_for(AUTOSCALED_MODEL).autoscaling_config
    assert replica_counts()[deployment] == {"target": scaling.min_replicas, "running": scaling.min_replicas}
    # Ray Serve asks for ceil(ongoing requests / target) replicas: users that keep more
    # than max_replicas * target requests going ask for the most, users that keep at
    # most min_replicas * target going (a call at a time each) for the fewest.
    busy_users = math.floor(scaling.max_replicas * scaling.target_ongoing_requests) + 2
    calm_users = math.floor(scaling.min_replicas * scaling.target_ongoing_requests)
    assert calm_users >= 1
    streams = Streams(stub, pb2, AUTOSCALED_MODEL, new_bytes=64)
    try:
        streams.add(busy_users)
        wait_until(lambda: replica_counts()[deployment]["running"] == scaling.max_replicas
                   and len(streams.generated) >= busy_users, timeout_s=600, interval_s=0.5,
                   what=f"{deployment} to run {scaling.max_replicas} replicas under load")
        # The load falls to what one replica is meant for, and goes on while the other stops.
        streams.remove(busy_users - calm_users)
        calls_before = len(streams.generated)
        wait_until(lambda: replica_counts()[deployment] == {"target": scaling.min_replicas,
                                                           "running": scaling.min_replicas}
                   and len(streams.generated) > calls_before, timeout_s=600, interval_s=0.5,
                   what=f"{deployment} to scale back to {scaling.min_replicas} replica under load")
    finally:
        streams.remove(len(streams.users))
    assert streams.errors == []
    assert set(streams.generated) == {64}  # every call whole, wherever it ran


# -- metrics --------------------------------------------------------------------


def totals(port: int) -> dict[str, float]:
    """Sum of each metric's samples by name, and by name[method] where there is a method label."""
    summed: dict[str, float] = {}
    for name, labels, value in scrape(port):
        summed[name] = summed.get(name, 0.0) + value
        if "method" in labels:
            key = f"{name}[{labels['method']}]"
            summed[key] = summed.get(key, 0.0) + value
    return summed


def test_metrics_are_exported_after_traffic(stub, pb2, ray_cluster):
    stop = threading.Event()

    def traffic():
        while not stop.is_set():
            list(stub.GenerateStream(pb2.GenerateRequest(prompt=b"metrics", max_new_bytes=200), timeout=120))

    workers = [threading.Thread(target=traffic) for _ in range(2)]
    for worker in workers:
        worker.start()
    stub.Generate(pb2.GenerateRequest(prompt=b"m", max_new_bytes=5), timeout=60)
    with pytest.raises(grpc.RpcError):
        stub.Generate(pb2.GenerateRequest(temperature=-1), timeout=60)
    wanted = [
        "ray_patchwork_requests_total[Generate]", "ray_patchwork_requests_total[GenerateStream]",
        "ray_patchwork_request_duration_seconds_count[Generate]", "ray_patchwork_time_to_first_byte_seconds_count",
        "ray_patchwork_inter_byte_latency_seconds_count", "ray_patchwork_generated_bytes_total",
        "ray_patchwork_patch_length_bytes_count", "ray_patchwork_running_sequences", "ray_patchwork_kv_cache_bytes",
        "ray_serve_num_grpc_requests_total",
    ]
    try:
        def exported() -> dict | None:
            seen = totals(ray_cluster)
            return seen if all(seen.get(name, 0) > 0 for name in wanted) else None

        metrics = wait_until(exported, timeout_s=90, interval_s=1, what=f"every one of {wanted} to be exported")
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=120)
    assert {name: metrics.get(name, 0) > 0 for name in wanted} == {name: True for name in wanted}
    assert "ray_patchwork_queued_requests" in metrics
    error_lines = [line for line in urllib.request.urlopen(f"http://127.0.0.1:{ray_cluster}/metrics").read()
                   .decode().splitlines() if line.startswith("ray_patchwork_requests_total") and "INVALID_ARGUMENT" in line]
    assert error_lines, "requests are counted by status code"


def test_a_config_whose_limits_an_engine_cannot_hold_is_refused():
    from pydantic import ValidationError

    from patchwork.engines.scheduler import SchedulerConfig
    from patchwork.serving.config import Limits, ServingConfig

    with pytest.raises(ValidationError, match=r"limits.max_prompt_bytes \(8192\) plus limits.default_new_bytes "
                                              r"\(256\) exceeds engine.max_sequence_bytes \(8192\)"):
        ServingConfig(limits=Limits(max_prompt_bytes=8192))
    with pytest.raises(ValidationError, match=r"exceeds engine_overrides\[small\].max_sequence_bytes \(1024\)"):
        ServingConfig(engine_overrides={"small": SchedulerConfig(max_sequence_bytes=1024)})
    with pytest.raises(ValidationError, match="limits.max_new_bytes"):
        ServingConfig(limits=Limits(max_new_bytes=9000, max_prompt_bytes=100), engine=SchedulerConfig())
    default = ServingConfig()  # the defaults fit, and a request at every limit fits in the proxy's message size
    assert default.limits.max_prompt_bytes + default.limits.default_new_bytes <= default.engine.max_sequence_bytes
    assert 8 * default.limits.max_prompt_bytes < default.limits.max_message_bytes < 2**20


def test_a_local_cluster_advertises_cpus_for_one_replica_of_every_model():
    import os

    from patchwork.serving.cluster import cpus_needed, local_cpus
    from patchwork.serving.config import ActorOptions, DeploymentOptions
    from patchwork.serving.deploy import setup

    config = setup("cpu")  # one 1-CPU replica per model, a 0-CPU gateway
    models = ["blt-default", "cm3leon-default", "mavil-default"]
    assert cpus_needed(config, models) == 3
    assert local_cpus(config, models) == max(os.cpu_count(), 3)
    assert cpus_needed(setup("autoscale"), models) == 3  # the minimum replicas of each
    heavy = config.model_copy(update={"model_overrides": {"mavil-default": DeploymentOptions(
        num_replicas=2, ray_actor_options=ActorOptions(num_cpus=1.5))}})
    assert cpus_needed(heavy, models) == 5
