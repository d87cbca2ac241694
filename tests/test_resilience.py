"""Deadlines, backpressure, a killed replica and fuzzed input, through the real proxy."""

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import wait_serving
from tests.helpers import wait_until


def wait_idle(model_handle, timeout_s=60.0) -> dict:
    """The replica's stats once nothing runs or waits on it."""
    return wait_until(lambda: (stats := model_handle.stats.remote().result())["running"] == stats["waiting"] == 0
                      and stats, timeout_s=timeout_s, interval_s=0.05, what="the replica to be idle")


def test_a_deadline_ends_the_work(stub, pb2, model_handle):
    for method in ("Generate", "GenerateStream"):
        with pytest.raises(grpc.RpcError) as error:
            call = getattr(stub, method)(pb2.GenerateRequest(prompt=b"slow", max_new_bytes=512), timeout=0.4)
            if method == "GenerateStream":
                list(call)
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        stats = wait_idle(model_handle)
        assert (stats["running"], stats["waiting"]) == (0, 0), "the expired request still holds a batch slot"


def test_past_the_queue_bound_requests_are_refused_quickly(stub, pb2, model_handle, serving_config):
    wait_idle(model_handle)
    admitted = serving_config.models.max_ongoing_requests + serving_config.models.max_queued_requests
    request = pb2.GenerateRequest(prompt=b"busy", max_new_bytes=1900)  # far longer than the refusals take
    calls = [stub.GenerateStream(request, timeout=600) for _ in range(admitted + 12)]
    try:
        # Exactly the requests past the bound end, refused, while the admitted
        # ones (running or queued for a slot) are still generating.
        wait_until(lambda: sum(call.done() for call in calls) >= len(calls) - admitted, timeout_s=120,
                   what="the requests past the queue bound to be refused")
        outcomes = [call.code() if call.done() else "admitted" for call in calls]
    finally:
        for call in calls:
            call.cancel()
    assert outcomes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == len(calls) - admitted
    assert outcomes.count("admitted") == admitted
    assert wait_idle(model_handle)["running"] == 0


@pytest.mark.timeout(900)
def test_killing_a_replica_under_load_hangs_nothing_and_the_service_recovers(stub, pb2, model_handle, grpc_target,
                                                                            serving_config):
    # A known idle state: the gateway's handle knows the replica (a first
    # request queues until it does), and nothing is in flight.
    stub.Generate(pb2.GenerateRequest(prompt=b"warm", max_new_bytes=1), timeout=60)
    wait_idle(model_handle)
    pid = model_handle.stats.remote().result()["pid"]
    # Longer than a replacement replica takes to start on a busy machine, so
    # the requests queued meanwhile end with OK or UNAVAILABLE, not their deadline.
    deadline_s = 240
    admitted = serving_config.models.max_ongoing_requests + serving_config.models.max_queued_requests

    # Long enough that the requests on the replica are still running when it is killed.
    def unary(i):
        return stub.Generate(pb2.GenerateRequest(prompt=b"kill %d" % i, max_new_bytes=1000), timeout=deadline_s)

    def stream(i):
        return list(stub.GenerateStream(pb2.GenerateRequest(prompt=b"kill %d" % i, max_new_bytes=1000),
                                        timeout=deadline_s))[-1]

    def outcome(future):
        try:
            future.result()
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()

    with ThreadPoolExecutor(serving_config.models.max_ongoing_requests + serving_config.models.max_queued_requests) as pool:
        started = time.monotonic()
        futures = [pool.submit(unary if i % 2 else stream, i) for i in range(admitted)]
        wait_until(lambda: model_handle.stats.remote().result()["running"] > 0, timeout_s=120,
                   what="requests running on the replica")
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        codes = [outcome(f) for f in futures]
    assert time.monotonic() - started < deadline_s + 5, "a request outlived its deadline"
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
    assert grpc.StatusCode.UNAVAILABLE in codes  # requests in flight on the killed replica
    # New requests succeed once Ray Serve has replaced the replica.
    wait_until(lambda: answers(stub, pb2), timeout_s=300, interval_s=0.2, what="the service to answer again")
    recovered = time.monotonic() - killed
    print(f"service answered again {recovered:.1f} s after the replica was killed")
    wait_serving(grpc_target, timeout_s=300)
    assert model_handle.stats.remote().result()["pid"] != pid


def answers(stub, pb2) -> bool:
    """Whether a generation succeeds now; a replica being replaced makes it UNAVAILABLE."""
    try:
        return stub.Generate(pb2.GenerateRequest(prompt=b"back", max_new_bytes=4), timeout=30).usage.generated_bytes > 0
    except grpc.RpcError as e:
        assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), e
        return False


@pytest.fixture(scope="module")
def serving_now(grpc_target, stub, pb2):
    """A known state: every replica up and answering (the test before this one
    killed one, and a dead replica is noticed only at its next health check)."""
    wait_serving(grpc_target, timeout_s=300)
    wait_until(lambda: answers(stub, pb2), timeout_s=300, interval_s=0.2, what="the service to answer")


PROPER = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}

generate_requests = st.fixed_dictionaries({}, optional={
    "prompt": st.binary(max_size=1500),
    "max_new_bytes": st.one_of(st.integers(0, 6), st.integers(0, 2**32 - 1)),
    "temperature": st.floats(width=32),
    "top_p": st.floats(width=32),
    "top_k": st.integers(0, 2**32 - 1),
    "seed": st.integers(0, 2**64 - 1),
    "stop": st.lists(st.binary(max_size=80), max_size=6),
    "model": st.one_of(st.just("tiny"), st.text(max_size=20)),
})


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(fields=generate_requests, method=st.sampled_from(["Generate", "GenerateStream", "Score", "raw"]),
       raw=st.binary(max_size=64))
def test_fuzzed_requests_get_proper_status_codes(serving_now, stub, pb2, channel, fields, method, raw):
    if fields.get("max_new_bytes", 0) > 6:
        fields["max_new_bytes"] = fields["max_new_bytes"] % 7 if fields["max_new_bytes"] % 3 else 10**6
    try:
        if method == "Score":
            stub.Score(pb2.ScoreRequest(text=fields.get("prompt", b""), model=fields.get("model", "")), timeout=60)
        elif method == "raw":  # bytes that may not even parse as a GenerateRequest
            channel.unary_unary("/patchwork.v1.ByteLM/Generate")(raw, timeout=60)
        elif method == "Generate":
            stub.Generate(pb2.GenerateRequest(**fields), timeout=60)
        else:
            list(stub.GenerateStream(pb2.GenerateRequest(**fields), timeout=60))
        code = grpc.StatusCode.OK
    except grpc.RpcError as e:
        code = e.code()
    assert code in PROPER, (method, fields, raw, code)


def test_still_healthy_after_the_fuzzing(grpc_target, stub, pb2):
    wait_serving(grpc_target, timeout_s=30)
    assert stub.Generate(pb2.GenerateRequest(prompt=b"ok", max_new_bytes=3), timeout=30).usage.generated_bytes == 3
