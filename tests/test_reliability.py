"""A server that holds under real traffic, through the real gRPC proxy: long
prompts beside short ones, sequences that finish out of order, 32 streams
cancelled at once, deadlines, a busy replica's health, a frozen replica,
oversized and doubly-authorized calls, metrics that match what clients saw, a
drain, and a stop that clients ride out."""

import asyncio
import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import grpc
import psutil
import pytest

from patchwork.engines.api import EngineUnavailable, SamplingParams
from patchwork.engines.loading import load
from tests.conftest import AUTH_TOKEN, IN_GATEWAY_MODEL, WIDE_MODEL, wait_serving
from tests.helpers import idle, metric, scrape, stats, wait_until


def text_prompt(seed: int, length: int) -> bytes:
    """Python-like text, what the tiny checkpoint was trained on."""
    rng = random.Random(seed)
    words = [b"def ", b"return ", b"self", b".value", b"(x)", b":\n    ", b"import os\n", b"# note ", b"for i in "]
    out = bytearray()
    while len(out) < length:
        out += rng.choice(words)
    return bytes(out[:length])


@pytest.fixture(scope="module")
def local_engine(tiny_checkpoint):
    return load(tiny_checkpoint)


@pytest.fixture(scope="module")
def stub(channel):
    from patchwork.v1 import bytelm_pb2_grpc

    return bytelm_pb2_grpc.ByteLMStub(channel)


# -- the crash that bricked a replica -----------------------------------------


def test_concurrent_long_prompts_finishing_out_of_order_match_the_engine(stub, pb2, local_engine, model_handle):
    # Sequences pass hundreds of cache positions, then finish out of order, so
    # cache slots move: what used to fail every request from then on.
    def generate(prompt, new_bytes):
        return stub.Generate(pb2.GenerateRequest(prompt=prompt, max_new_bytes=new_bytes, model="tiny"), timeout=300)

    long = text_prompt(1, 1400)
    assert generate(long, 60).text == local_engine.generate([long], max_new_bytes=60)[0].text
    prompts, new_bytes = [text_prompt(i, 600) for i in range(4)], [5, 200, 40, 300]
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(generate, prompts, new_bytes))
    for prompt, n, response in zip(prompts, new_bytes, responses):
        assert response.text == local_engine.generate([prompt], max_new_bytes=n)[0].text
    assert generate(b"still serving", 3).usage.generated_bytes == 3
    assert stats(model_handle)["health"] is None


# -- cancellations and deadlines at 32 streams ------------------------------


def test_32_streams_cancelled_after_their_first_chunk_all_free_their_slots(stub, pb2, wide_handle):
    # 1900 bytes each: a lost cancellation would hold its slot for ~1900 steps.
    wait_until(lambda: idle(wide_handle))
    calls = [stub.GenerateStream(pb2.GenerateRequest(prompt=b"cancel %d" % i, max_new_bytes=1900, model=WIDE_MODEL),
                                 timeout=300) for i in range(32)]

    def first_chunk_then_cancel(call):
        next(call)
        call.cancel()

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(first_chunk_then_cancel, calls))
    cancelled_at = stats(wide_handle)["steps"]
    wait_until(lambda: idle(wide_handle), timeout_s=120, what="every cancelled stream to leave the batch")
    assert stats(wide_handle)["steps"] - cancelled_at < 300
    assert all(call.code() == grpc.StatusCode.CANCELLED for call in calls)


def test_32_streams_past_their_deadline_all_free_their_slots(stub, pb2, wide_handle):
    wait_until(lambda: idle(wide_handle))
    calls = [stub.GenerateStream(pb2.GenerateRequest(prompt=b"deadline %d" % i, max_new_bytes=1900, model=WIDE_MODEL),
                                 timeout=1.5) for i in range(32)]

    def drain(call):
        try:
            for _ in call:
                pass
        except grpc.RpcError as error:
            return error.code()

    with ThreadPoolExecutor(32) as pool:
        codes = list(pool.map(drain, calls))
    assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 32
    expired_at = stats(wide_handle)["steps"]
    wait_until(lambda: idle(wide_handle), timeout_s=120, what="every expired stream to leave the batch")
    assert stats(wide_handle)["steps"] - expired_at < 300


# -- health ---------------------------------------------------------------------


def health_status(target: str, timeout: float = 5.0) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout).status


def test_health_answers_serving_while_every_slot_and_queue_place_is_taken(stub, pb2, grpc_target, model_handle,
                                                                       serving_config):
    from grpc_health.v1 import health_pb2

    wait_until(lambda: idle(model_handle))
    options = serving_config.models
    busy = [stub.GenerateStream(pb2.GenerateRequest(prompt=b"busy %d" % i, max_new_bytes=1900, model="tiny"),
                                timeout=300) for i in range(options.max_ongoing_requests + options.max_queued_requests)]
    for call in busy[: options.max_ongoing_requests]:
        next(call)
    try:
        # Checks never queue behind generations: each answers within its 5 s.
        assert [health_status(grpc_target) for _ in range(20)] == [health_pb2.HealthCheckResponse.SERVING] * 20
    finally:
        for call in busy:
            call.cancel()
    wait_until(lambda: idle(model_handle))


def test_health_answers_from_the_last_reading_and_never_waits_on_the_controller(monkeypatch):
    from patchwork.serving import gateway

    monkeypatch.setattr(gateway, "HEALTH_REFRESH_S", 0.01)
    controller_answers = threading.Semaphore(1)  # one reading, then the controller hangs
    asked = threading.Event()

    def status():
        asked.set()
        controller_answers.acquire()
        deployment = SimpleNamespace(replica_states={"RUNNING": 1})
        return SimpleNamespace(applications={gateway.APP_NAME: SimpleNamespace(deployments={"m": deployment})})

    monkeypatch.setattr(gateway.serve, "status", status)

    async def checks():
        health = gateway.ModelHealth(["m"])
        assert not health.current()  # no reading yet
        for _ in range(2000):
            if health.current():
                break
            await asyncio.sleep(0.01)
        assert health.current()
        asked.clear()
        for _ in range(2000):
            if asked.is_set():
                break
            await asyncio.sleep(0.01)
        assert asked.is_set() and health.current()  # the controller hangs; checks answer from the last reading
        monkeypatch.setattr(gateway, "HEALTH_STALE_S", 0.0)
        assert not health.current()  # a reading too old to vouch for the replicas
        health._reader.cancel()
        controller_answers.release()

    asyncio.run(checks())


def test_a_replica_whose_scheduler_stopped_fails_fast_and_fails_its_health_check(tiny_checkpoint):
    from patchwork.serving.model_server import ModelServer

    class Fatal(BaseException):
        pass

    server = ModelServer(str(tiny_checkpoint), "cpu")

    def dies(caches, chunks, decodes):
        raise Fatal()

    server.engine.step = dies

    async def generate():
        return await server.generate(b"x", SamplingParams(max_new_bytes=5))

    server.check_health()  # healthy before
    with pytest.raises(EngineUnavailable):
        asyncio.run(generate())
    with pytest.raises(RuntimeError, match="scheduler stopped"):
        server.check_health()
    with pytest.raises(EngineUnavailable, match="stopped"):
        asyncio.run(generate())  # refused at once


@pytest.mark.timeout(900)
def test_a_frozen_model_replica_is_reported_not_serving_and_replaced(grpc_target, wide_handle, stub, pb2):
    from grpc_health.v1 import health_pb2

    wait_serving(grpc_target, timeout_s=120)
    pid = stats(wide_handle)["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: health_status(grpc_target) == health_pb2.HealthCheckResponse.NOT_SERVING, timeout_s=300,
                   interval_s=0.5, what="health to report the frozen replica")
    finally:
        if psutil.pid_exists(pid):
            os.kill(pid, signal.SIGCONT)
    wait_serving(grpc_target, timeout_s=400)
    assert stats(wide_handle)["pid"] != pid
    response = stub.Generate(pb2.GenerateRequest(prompt=b"back", max_new_bytes=4, model=WIDE_MODEL), timeout=60)
    assert response.usage.generated_bytes == 4


# -- the edge: message sizes, auth ------------------------------------------------


def test_messages_larger_than_the_limits_need_are_refused_before_patchwork_reads_them(grpc_target, pb2, serving_config):
    from patchwork.v1 import bytelm_pb2_grpc

    limit = serving_config.limits.max_message_bytes
    with grpc.insecure_channel(grpc_target) as raw:
        unauthenticated = bytelm_pb2_grpc.ByteLMStub(raw)
        with pytest.raises(grpc.RpcError) as error:
            unauthenticated.Generate(pb2.GenerateRequest(prompt=b"x" * (limit + 1)), timeout=60)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # refused before Patchwork saw it
        with pytest.raises(grpc.RpcError) as error:
            unauthenticated.Generate(pb2.GenerateRequest(prompt=b"x" * (limit - 100)), timeout=60)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED  # within the size: the gateway decides


def test_two_authorization_headers_are_refused(grpc_target, pb2):
    from patchwork.v1 import bytelm_pb2_grpc

    good = ("authorization", f"Bearer {AUTH_TOKEN}")
    with grpc.insecure_channel(grpc_target) as raw:
        stub = bytelm_pb2_grpc.ByteLMStub(raw)
        for metadata in ([good, good], [good, ("authorization", "Bearer wrong")], [("authorization", "x"), good]):
            with pytest.raises(grpc.RpcError) as error:
                stub.Generate(pb2.GenerateRequest(prompt=b"x", max_new_bytes=2), timeout=30, metadata=metadata)
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.Generate(pb2.GenerateRequest(prompt=b"x", max_new_bytes=2), timeout=30,
                             metadata=[good]).usage.generated_bytes == 2


class FakeContext:
    """What the gateway reads and writes of Ray Serve's gRPC context."""

    def __init__(self, metadata=()):
        self.metadata = list(metadata)
        self.code = self.details = None

    def invocation_metadata(self):
        return self.metadata

    def request_id(self):
        return "req-123"

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details


def test_unexpected_errors_reach_clients_as_internal_with_only_a_request_id(caplog, monkeypatch):
    from patchwork.serving import gateway
    from patchwork.serving.gateway import GatewayCore, _Abort

    monkeypatch.setattr(gateway.serve, "status", lambda: SimpleNamespace(applications={}))  # no controller here
    context = FakeContext()

    async def fail_while_serving():  # the gateway is made on an event loop, as in its replica
        gateway = GatewayCore({}, {}, "none", {}, {"token_env": "NO_SUCH_TOKEN_VARIABLE"})
        with pytest.raises(_Abort):
            with gateway.serving(context):
                raise ValueError("secret at /srv/models/x.py, actor 7a02b1e")

    asyncio.run(fail_while_serving())
    assert context.code == grpc.StatusCode.INTERNAL
    assert context.details == "internal error (request id req-123)"
    assert "secret at /srv/models/x.py" in caplog.text and "req-123" in caplog.text  # the log has it all


def test_the_edge_rewrites_leaky_internal_details():
    from patchwork.serving.edge import _Call

    class Context:
        def __init__(self, details):
            self._details, self.written = details, {}

        def invocation_metadata(self):
            return (("request_id", "abc"),)

        def time_remaining(self):
            return None

        def peer(self):
            return "ipv4:127.0.0.1:1"

        def details(self):
            return self._details

        def set_code(self, code):
            self.written["code"] = code

        def set_details(self, details):
            self.written["details"] = details

    leaky = Context("Traceback (most recent call last):\n  File \"/srv/ray/actor.py\"\nRayActorError: actor 7a02")
    _Call("/patchwork.v1.ByteLM/Generate", leaky).finish(grpc.StatusCode.INTERNAL)
    assert leaky.written == {"code": grpc.StatusCode.INTERNAL, "details": "internal error (request id abc)"}
    short = Context("internal error (request id abc)")
    _Call("/patchwork.v1.ByteLM/Generate", short).finish(grpc.StatusCode.INTERNAL)
    assert short.written == {}


# -- metrics -------------------------------------------------------------------


def test_metrics_listen_on_loopback_only(ray_cluster):
    listening = [c for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN
                 and c.laddr.port == ray_cluster]
    assert listening and {c.laddr.ip for c in listening} == {"127.0.0.1"}


def test_metrics_count_each_request_with_the_code_its_client_saw(stub, pb2, ray_cluster, wide_handle):
    name = "ray_patchwork_requests_total"
    before = scrape(ray_cluster)

    def run(kind: int):
        prompt = b"metrics %d" % kind
        if kind % 3 == 0:
            list(stub.GenerateStream(pb2.GenerateRequest(prompt=prompt, max_new_bytes=5, model=WIDE_MODEL), timeout=120))
            return grpc.StatusCode.OK
        if kind % 3 == 1:
            call = stub.GenerateStream(pb2.GenerateRequest(prompt=prompt, max_new_bytes=1900, model=WIDE_MODEL),
                                       timeout=120)
            next(call)
            call.cancel()
            return grpc.StatusCode.CANCELLED
        try:
            # Long enough for the call to reach the server on a busy machine (one
            # whose deadline passes before any server code runs is counted by
            # nobody), far shorter than 1900 bytes among a dozen streams.
            list(stub.GenerateStream(pb2.GenerateRequest(prompt=prompt, max_new_bytes=1900, model=WIDE_MODEL),
                                     timeout=4.0))
            return grpc.StatusCode.OK
        except grpc.RpcError as error:
            return error.code()

    with ThreadPoolExecutor(12) as pool:
        seen = list(pool.map(run, range(36)))
    expected = {code.name: seen.count(code) for code in set(seen)}
    assert set(expected) == {"OK", "CANCELLED", "DEADLINE_EXCEEDED"} and expected["CANCELLED"] == 12

    counted = {}

    def recorded():
        after = scrape(ray_cluster)
        codes = {tags["code"] for sample, tags, _ in after if sample == name and tags.get("method") == "GenerateStream"}
        counted.clear()
        counted.update({code: metric(after, name, method="GenerateStream", code=code)
                        - metric(before, name, method="GenerateStream", code=code) for code in codes})
        return {code: n for code, n in counted.items() if n} == expected

    try:
        wait_until(recorded, timeout_s=60, interval_s=0.5)
    except AssertionError:
        raise AssertionError(f"the metrics counted {counted}, clients saw {expected}") from None
    wait_until(lambda: idle(wide_handle))


def test_the_running_sequences_gauge_follows_the_batch(stub, pb2, ray_cluster, wide_handle):
    gauge = "ray_patchwork_running_sequences"
    wait_until(lambda: idle(wide_handle))
    calls = [stub.GenerateStream(pb2.GenerateRequest(prompt=b"gauge %d" % i, max_new_bytes=1900, model=WIDE_MODEL),
                                 timeout=300) for i in range(3)]
    for call in calls:
        next(call)
    wait_until(lambda: metric(scrape(ray_cluster), gauge, model=WIDE_MODEL) == 3, timeout_s=60, interval_s=0.5,
               what="the gauge to show three running sequences")
    for call in calls:
        call.cancel()
    wait_until(lambda: metric(scrape(ray_cluster), gauge, model=WIDE_MODEL) == 0, timeout_s=60, interval_s=0.5,
               what="the gauge to drop to zero")


# -- mixed traffic ----------------------------------------------------------------


@pytest.mark.timeout(1800)  # a bound for a busy machine, where it takes about 14 minutes
def test_mixed_traffic_of_160_requests_has_no_failure_but_cancellations(stub, pb2, local_engine, wide_handle):
    rng = random.Random(160)
    plans = []
    for i in range(160):
        plans.append({
            "prompt": text_prompt(1000 + i, rng.randint(20, 1500)),
            "new": rng.randint(1, 300),
            "stream": rng.random() < 0.5,
            "cancel_after": rng.choice([None, None, None, 1, 3]),
        })

    def run(plan):
        request = pb2.GenerateRequest(prompt=plan["prompt"], max_new_bytes=plan["new"], model=WIDE_MODEL)
        try:
            if not plan["stream"]:
                return "ok", stub.Generate(request, timeout=300).text
            call = stub.GenerateStream(request, timeout=300)
            text = b""
            for count, chunk in enumerate(call, start=1):
                text += chunk.text
                if plan["cancel_after"] is not None and count == plan["cancel_after"] and not chunk.finish_reason:
                    call.cancel()
                    return "cancelled", None
            return "ok", text
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.CANCELLED and plan["cancel_after"] is not None:
                return "cancelled", None
            return error.code().name, error.details()

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(run, plans))
    failures = [(i, outcome) for i, outcome in enumerate(outcomes) if outcome[0] not in ("ok", "cancelled")]
    assert failures == []
    for i in range(0, 160, 16):  # a sample is held to the engine in process
        if outcomes[i][0] == "ok":
            expected = local_engine.generate([plans[i]["prompt"]], max_new_bytes=plans[i]["new"])[0].text
            assert outcomes[i][1] == expected
    wait_until(lambda: idle(wide_handle), what="the batch to empty")
    assert stats(wide_handle)["health"] is None


# -- drain and stop ----------------------------------------------------------------


def read_in_background(calls: dict) -> tuple[dict, list[threading.Thread]]:
    """Waits for each stream's first chunk (so every one is running), then
    reads each to its end on a thread of its own; returns where each one's
    outcome (code, whole text or details) will be, and the threads."""
    firsts = {name: next(call).text for name, call in calls.items()}
    outcomes = {}

    def finish(name, call):
        try:
            outcomes[name] = (grpc.StatusCode.OK, firsts[name] + b"".join(chunk.text for chunk in call))
        except grpc.RpcError as error:
            outcomes[name] = (error.code(), error.details())

    readers = [threading.Thread(target=finish, args=item) for item in calls.items()]
    for reader in readers:
        reader.start()
    return outcomes, readers


def test_a_drain_lets_requests_in_flight_finish_and_refuses_new_ones(stub, pb2, grpc_target, model_handle,
                                                                    wide_handle):
    from grpc_health.v1 import health_pb2

    from patchwork.serving import ops

    wait_until(lambda: idle(model_handle) and idle(wide_handle))
    pids = (stats(model_handle)["pid"], stats(wide_handle)["pid"])
    calls = {i: stub.GenerateStream(pb2.GenerateRequest(prompt=b"drain %d" % i, max_new_bytes=150, model=name),
                                    timeout=600)
             for i, name in enumerate(["tiny", WIDE_MODEL, WIDE_MODEL, IN_GATEWAY_MODEL])}
    outcomes, readers = read_in_background(calls)
    try:
        ops.drain(grace_s=300.0)  # far longer than the streams need, on any machine
        with pytest.raises(grpc.RpcError) as refused:
            stub.Generate(pb2.GenerateRequest(prompt=b"new", max_new_bytes=2), timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in refused.value.details()
        assert health_status(grpc_target) == health_pb2.HealthCheckResponse.NOT_SERVING
        for reader in readers:
            reader.join(timeout=300)
        assert {code for code, _ in outcomes.values()} == {grpc.StatusCode.OK}
        assert [len(text) for _, text in outcomes.values()] == [150] * 4
    finally:
        ops.resume()
    wait_serving(grpc_target, timeout_s=120)
    assert (stats(model_handle)["pid"], stats(wide_handle)["pid"]) == pids  # drained in place, not restarted
    assert stub.Generate(pb2.GenerateRequest(prompt=b"again", max_new_bytes=2), timeout=60).usage.generated_bytes == 2


def test_what_runs_past_the_drains_grace_period_ends_with_unavailable(stub, pb2, grpc_target, wide_handle):
    from patchwork.serving import ops

    wait_until(lambda: idle(wide_handle))
    # 16 streams of 1900 bytes share a batch: they run far longer than the drain takes to start.
    calls = {i: stub.GenerateStream(pb2.GenerateRequest(prompt=b"past %d" % i, max_new_bytes=1900, model=WIDE_MODEL),
                                    timeout=600) for i in range(16)}
    # ... and two on the model the gateway runs itself, which its replica drains too.
    calls.update({16 + i: stub.GenerateStream(pb2.GenerateRequest(prompt=b"past %d" % i, max_new_bytes=1900,
                                                                  model=IN_GATEWAY_MODEL), timeout=600)
                  for i in range(2)})
    outcomes, readers = read_in_background(calls)
    try:
        ops.drain(grace_s=0.0)
        for reader in readers:
            reader.join(timeout=300)
    finally:
        ops.resume()
    assert {code for code, _ in outcomes.values()} == {grpc.StatusCode.UNAVAILABLE}
    assert all("stopped before this request finished" in details for _, details in outcomes.values())
    wait_serving(grpc_target, timeout_s=120)
    wait_until(lambda: idle(wide_handle))


@pytest.mark.stops_serve
@pytest.mark.timeout(1800)  # a bound for a busy machine, where serving again takes minutes
def test_stopping_lets_requests_in_flight_finish_and_refuses_new_ones_and_clients_retry_until_it_is_back(
        stub, pb2, grpc_target, serving_config, caplog):
    from patchwork import Client, Retry
    from patchwork.serving import ops
    from patchwork.serving.app import discover_checkpoints
    from patchwork.serving.deploy import apply, deploy_config

    wait_serving(grpc_target, timeout_s=300)
    calls = [stub.GenerateStream(pb2.GenerateRequest(prompt=b"stop %d" % i, max_new_bytes=150, model=WIDE_MODEL),
                                 timeout=300) for i in range(4)]
    outcomes, readers = read_in_background(dict(enumerate(calls)))
    refused = []

    def draining() -> bool:
        from grpc_health.v1 import health_pb2

        try:
            return health_status(grpc_target) != health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:  # already stopped
            return True

    def arrive_during_the_drain():
        wait_until(draining, timeout_s=300, interval_s=0.05)
        try:
            stub.Generate(pb2.GenerateRequest(prompt=b"late", max_new_bytes=2), timeout=30)
        except grpc.RpcError as error:
            refused.append(error.code())

    late = threading.Thread(target=arrive_during_the_drain)
    late.start()
    started = time.monotonic()
    seconds = ops.stop(grace_s=300.0)
    for thread in (*readers, late):
        thread.join(timeout=300)
    assert [outcomes[i] for i in range(4)] == [(grpc.StatusCode.OK, outcomes[i][1]) for i in range(4)]
    assert [len(outcomes[i][1]) for i in range(4)] == [150] * 4  # every stream finished
    assert refused == [grpc.StatusCode.UNAVAILABLE]
    assert seconds < 300.0 and time.monotonic() - started < 300.0  # it did not wait out the grace period
    with pytest.raises(grpc.RpcError):
        health_status(grpc_target)  # Serve is down
    # A client call made now is refused (nothing listens) and tried again until
    # the server is back; the session's bound for the first deployment is its deadline.
    answered = []
    patient = Client(grpc_target, token=AUTH_TOKEN, timeout=900,
                     retry=Retry(attempts=10_000, initial_backoff_s=0.2, max_backoff_s=2.0))
    caplog.set_level("INFO", logger="patchwork.client")
    waiting = threading.Thread(target=lambda: answered.append(patient.generate("back", max_new_bytes=2)))
    waiting.start()
    def retries() -> list[str]:
        return [record.getMessage() for record in caplog.records if record.name == "patchwork.client"]

    wait_until(retries, timeout_s=60, what="the client's first retry")
    # Serve again, for it and for whatever runs after this test.
    models = list(discover_checkpoints(serving_config.checkpoints, serving_config.families))
    apply(deploy_config(serving_config, models))
    wait_serving(grpc_target, timeout_s=900)
    waiting.join(timeout=900)
    patient.close()
    assert [response.usage.generated_bytes for response in answered] == [2]
    assert all(message.startswith("Generate: UNAVAILABLE") for message in retries())


def test_the_clients_deadline_reaches_the_engine(wide_handle):
    from patchwork.engines.api import DeadlineExceeded
    from patchwork.serving.gateway import GatewayCore

    deadline_of = GatewayCore.deadline
    assert deadline_of(FakeContext([("x-patchwork-deadline", "1234.5")])) == 1234.5
    assert deadline_of(FakeContext()) is None
    params = SamplingParams(max_new_bytes=1900)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):  # straight to the model, no gRPC: the engine ends it on time by itself
        wide_handle.generate.remote(b"deadline", params, time.time() + 0.5).result()
    assert time.monotonic() - started < 60
    wait_until(lambda: idle(wide_handle))
