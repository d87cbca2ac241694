"""A model the gateway runs itself (``ServingConfig.gateway_models``): no hop
to a model deployment, and the same answers, streaming, deadlines,
cancellation, auth, metrics and health as through one."""

import asyncio
from types import SimpleNamespace

import grpc
import pytest

from patchwork.engines.loading import load
from patchwork.serving.config import ActorOptions, DeploymentOptions, ServingConfig
from patchwork.serving.deploy import deploy_config, setup
from tests.conftest import IN_GATEWAY_MODEL, PATCHWORK
from tests.helpers import scrape, wait_until


@pytest.fixture(scope="module")
def local_engine(tiny_checkpoint):
    return load(tiny_checkpoint)


def local_stats(gateway_handle) -> dict:
    return gateway_handle.model_stats.remote(IN_GATEWAY_MODEL).result(timeout_s=120)


def local_idle(gateway_handle) -> bool:
    current = local_stats(gateway_handle)
    return current["running"] == 0 and current["waiting"] == 0


def test_it_answers_as_the_engine_does_unary_and_streaming(stub, pb2, local_engine):
    for params in ({"max_new_bytes": 30}, {"max_new_bytes": 30, "temperature": 0.9, "seed": 4}):
        request = pb2.GenerateRequest(prompt="naïve ".encode(), model=IN_GATEWAY_MODEL, **params)
        expected = local_engine.generate([request.prompt], **params)[0]
        unary = stub.Generate(request, timeout=120)
        chunks = list(stub.GenerateStream(request, timeout=120))
        assert unary.text == expected.text == b"".join(c.text for c in chunks)
        assert list(unary.patch_lengths) == expected.details.patch_lengths == list(chunks[-1].patch_lengths)
        assert unary.model == chunks[-1].model == IN_GATEWAY_MODEL
    score = stub.Score(pb2.ScoreRequest(text=b"def f():", model=IN_GATEWAY_MODEL), timeout=120)
    assert score.bits_per_byte == pytest.approx(local_engine.score(b"def f():").bits_per_byte, rel=1e-5)


def test_it_is_listed_as_run_by_the_gateway(channel):
    from patchwork.v1 import models_pb2, models_pb2_grpc

    listed = models_pb2_grpc.ModelsStub(channel).ListModels(models_pb2.ListModelsRequest(), timeout=30).models
    model = next(m for m in listed if m.name == IN_GATEWAY_MODEL)
    assert (model.family, model.deployment) == ("blt", "gateway")


def test_concurrent_requests_of_different_lengths_each_get_what_they_get_alone(stub, pb2, local_engine,
                                                                                   gateway_handle):
    from concurrent.futures import ThreadPoolExecutor

    lengths = [5, 60, 17, 90]
    requests = [pb2.GenerateRequest(prompt=b"x" * (3 + 40 * i), max_new_bytes=n, model=IN_GATEWAY_MODEL,
                                    temperature=0.7, seed=i) for i, n in enumerate(lengths)]
    with ThreadPoolExecutor(len(requests)) as pool:
        responses = list(pool.map(lambda r: stub.Generate(r, timeout=300), requests))
    for i, (request, response) in enumerate(zip(requests, responses)):
        alone = local_engine.generate([request.prompt], max_new_bytes=lengths[i], temperature=0.7, seed=i)[0]
        assert response.text == alone.text
    wait_until(lambda: local_idle(gateway_handle), what="every request to leave")


def test_a_cancelled_stream_frees_its_slot(stub, pb2, gateway_handle):
    wait_until(lambda: local_idle(gateway_handle))
    call = stub.GenerateStream(pb2.GenerateRequest(prompt=b"x", max_new_bytes=1500, model=IN_GATEWAY_MODEL),
                               timeout=120)
    next(call)
    assert local_stats(gateway_handle)["running"] == 1
    call.cancel()
    wait_until(lambda: local_idle(gateway_handle), timeout_s=30, interval_s=0.05,
               what="the cancelled stream's slot to be freed")


def test_a_deadline_ends_the_work(stub, pb2, gateway_handle):
    for method in ("Generate", "GenerateStream"):
        with pytest.raises(grpc.RpcError) as error:
            call = getattr(stub, method)(pb2.GenerateRequest(prompt=b"slow", max_new_bytes=1500,
                                                             model=IN_GATEWAY_MODEL), timeout=0.4)
            if method == "GenerateStream":
                list(call)
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(lambda: local_idle(gateway_handle), what="the expired request to leave its batch slot")


def test_it_needs_the_token(grpc_target, pb2):
    from patchwork.v1 import bytelm_pb2_grpc

    with grpc.insecure_channel(grpc_target) as bare:
        with pytest.raises(grpc.RpcError) as error:
            bytelm_pb2_grpc.ByteLMStub(bare).Generate(pb2.GenerateRequest(prompt=b"x", model=IN_GATEWAY_MODEL),
                                                      timeout=30)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_its_metrics_are_exported(stub, pb2, ray_cluster):
    list(stub.GenerateStream(pb2.GenerateRequest(prompt=b"metrics", max_new_bytes=40, model=IN_GATEWAY_MODEL),
                             timeout=120))

    def exported() -> bool:
        samples = scrape(ray_cluster)
        return all(any(name == wanted and labels.get("model") == IN_GATEWAY_MODEL and value > 0
                       for name, labels, value in samples)
                   for wanted in ("ray_patchwork_time_to_first_byte_seconds_count",
                                  "ray_patchwork_generated_bytes_total"))

    wait_until(exported, timeout_s=90, interval_s=1, what="the local model's metrics to be exported")


def test_health_reads_the_heartbeat_of_the_models_the_gateway_runs(monkeypatch):
    from patchwork.serving import gateway

    monkeypatch.setattr(gateway, "HEALTH_REFRESH_S", 0.01)
    deployment = SimpleNamespace(replica_states={"RUNNING": 1})
    status = SimpleNamespace(applications={gateway.APP_NAME: SimpleNamespace(deployments={"m": deployment})})
    monkeypatch.setattr(gateway.serve, "status", lambda: status)
    server = SimpleNamespace(problem=lambda: None)

    async def checks():
        health = gateway.ModelHealth(["m"], [server])
        wait = 0
        while not health.current() and wait < 2000:
            await asyncio.sleep(0.01)
            wait += 1
        assert health.current()
        server.problem = lambda: "the scheduler stopped: RuntimeError: boom"
        assert not health.current()  # at once: the heartbeat is read at each check
        health._reader.cancel()

    asyncio.run(checks())


def test_a_stopped_health_reader_reads_no_more_and_ends_quietly(monkeypatch):
    """What a stopping gateway replica does (``GatewayCore.__del__``): the
    reader ends, even in the middle of a reading, and reads no more."""
    from patchwork.serving import gateway

    reads = []
    monkeypatch.setattr(gateway, "HEALTH_REFRESH_S", 0.01)
    monkeypatch.setattr(gateway.serve, "status", lambda: reads.append(1) or SimpleNamespace(applications={}))

    async def stops():
        alone = gateway.ModelHealth([], [SimpleNamespace(problem=lambda: None)])
        assert alone.current() and not reads  # every model runs here: nothing to read, serving at once
        alone.stop()
        health = gateway.ModelHealth(["m"])
        while len(reads) < 3:
            await asyncio.sleep(0.01)
        health.stop()
        health.stop()  # a second stop changes nothing
        await asyncio.wait([health._reader], timeout=5)
        assert health._reader.done() and (health._reader.cancelled() or health._reader.exception() is None)
        count = len(reads)
        await asyncio.sleep(0.1)
        assert len(reads) == count

    asyncio.run(stops())


def test_which_models_the_gateway_runs_and_the_resources_it_takes(tiny_checkpoint):
    half = DeploymentOptions(ray_actor_options=ActorOptions(num_cpus=0.5, num_gpus=0.25))
    config = ServingConfig(checkpoints=tiny_checkpoint, models=half)
    # "auto": the model when only one is served; of several, those that share the gateway's one CPU replica.
    assert config.in_gateway(["a"]) == ["a"] and config.in_gateway(["a", "b"]) == []  # these ask for a GPU
    assert config.gateway_for(["a"]).ray_actor_options == ActorOptions(num_cpus=0.5, num_gpus=0.25)
    assert config.gateway_for(["a", "b"]).ray_actor_options == config.gateway.ray_actor_options
    cpu = setup("cpu")  # `make serve`'s setup: every model in the gateway, one hop less each
    assert cpu.in_gateway(["b", "a", "c"]) == ["a", "b", "c"]
    assert cpu.gateway_for(["a", "b", "c"]).ray_actor_options == ActorOptions(num_cpus=3.0)
    own = cpu.model_copy(update={"model_overrides": {"b": DeploymentOptions(num_replicas=2)}})
    assert own.in_gateway(["a", "b", "c"]) == ["a", "c"]  # a model with options of its own keeps its deployment
    assert setup("autoscale").in_gateway(["a", "b"]) == [] and setup("gpu").in_gateway(["a", "b"]) == []
    names = [entry["name"] for entry in deploy_config(own, ["a", "b", "c"])["applications"][0]["deployments"]]
    assert names == ["gateway", "model-b"]
    chosen = config.model_copy(update={"gateway_models": ["b"]})
    assert chosen.in_gateway(["a", "b"]) == ["b"]
    with pytest.raises(ValueError, match=r"gateway_models names \['b'\], which are not among the served models"):
        chosen.in_gateway(["a"])
    document = deploy_config(config, ["tiny"])
    names = [entry["name"] for entry in document["applications"][0]["deployments"]]
    assert names == ["gateway"]  # one model: the gateway runs it, no hop
    assert document["applications"][0]["deployments"][0]["ray_actor_options"]["num_cpus"] == 0.5


def test_up_refuses_a_gateway_model_that_is_not_served(tiny_checkpoint):
    import subprocess

    from tests.conftest import REPO

    refused = subprocess.run([*PATCHWORK, "serve", "up", "--checkpoints", str(tiny_checkpoint),
                              "--gateway-models", "nope"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert "gateway_models names ['nope'], which are not among the served models" in refused.stderr
