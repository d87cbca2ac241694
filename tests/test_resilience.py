"""Deadlines, backpressure, a killed replica and fuzzed input, through the real proxy."""

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import BOUNDED_MODEL, wait_serving
from tests.helpers import idle, stats, wait_until


def test_a_deadline_ends_the_work(stub, pb2, model_handle):
    for method in ("Generate", "GenerateStream"):
        with pytest.raises(grpc.RpcError) as error:
            call = getattr(stub, method)(pb2.GenerateRequest(prompt=b"slow", max_new_bytes=512), timeout=0.4)
            if method == "GenerateStream":
                list(call)
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(lambda: idle(model_handle), what="the expired request to leave its batch slot")


def test_past_the_engines_queue_bound_requests_are_refused_at_once(stub, pb2, bounded_handle, serving_config):
    """``bounded`` sits behind a generous Ray Serve bound, so its engine's own
    bound (every slot taken and ``max_queue`` waiting) is what refuses, exactly."""
    engine = serving_config.engine_for(BOUNDED_MODEL)
    capacity = engine.max_batch_size + engine.max_queue
    request = pb2.GenerateRequest(prompt=b"busy", max_new_bytes=1900, model=BOUNDED_MODEL)
    for _ in range(3):
        wait_until(lambda: idle(bounded_handle), timeout_s=120, what="the replica to be idle")
        calls = [stub.GenerateStream(request, timeout=600) for _ in range(capacity + 6)]
        try:
            wait_until(lambda: sum(call.done() for call in calls) >= len(calls) - capacity, timeout_s=120,
                       what="the requests past the engine's bound to be refused")
            outcomes = [call.code() if call.done() else "admitted" for call in calls]
            held = stats(bounded_handle)
        finally:
            for call in calls:
                call.cancel()
        # A request that finished before the last one arrived frees a place
        # for it; the exact count holds only when none did. Try again then.
        if grpc.StatusCode.OK not in outcomes:
            break
    assert outcomes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == len(calls) - capacity, outcomes
    assert outcomes.count("admitted") == capacity
    assert (held["running"], held["waiting"]) == (engine.max_batch_size, engine.max_queue)
    refused = next(call for call in calls if call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "waiting for a slot" in refused.details()
    wait_until(lambda: idle(bounded_handle), timeout_s=120, what="the cancelled requests to leave")


def test_past_ray_serves_queue_bound_requests_are_refused_before_any_finishes(stub, pb2, model_handle,
                                                                             serving_config):
    """``tiny`` takes ``max_ongoing_requests`` per replica and queues
    ``max_queued_requests`` more in each caller; past that Ray Serve refuses.
    Its count is approximate under a burst (it may refuse a few early), so
    what is checked is that refusals come first and are RESOURCE_EXHAUSTED."""
    wait_until(lambda: idle(model_handle), timeout_s=120, what="the replica to be idle")
    options = serving_config.models
    request = pb2.GenerateRequest(prompt=b"flood", max_new_bytes=1900)
    calls = [stub.GenerateStream(request, timeout=600)
             for _ in range(2 * (options.max_ongoing_requests + options.max_queued_requests))]
    try:
        wait_until(lambda: any(call.done() for call in calls), timeout_s=120, what="a refusal")
        first = [call.code() for call in calls if call.done()]
    finally:
        for call in calls:
            call.cancel()
    assert set(first) == {grpc.StatusCode.RESOURCE_EXHAUSTED}, first
    # A bound for a busy machine, where the cancellations take minutes to reach every request.
    wait_until(lambda: idle(model_handle), timeout_s=600, what="the cancelled requests to leave")


@pytest.mark.timeout(900)
def test_killing_a_replica_under_load_hangs_nothing_and_the_service_recovers(stub, pb2, bounded_handle, grpc_target,
                                                                            serving_config):
    wait_until(lambda: idle(bounded_handle), timeout_s=120, what="the replica to be idle")
    pid = stats(bounded_handle)["pid"]
    engine = serving_config.engine_for(BOUNDED_MODEL)
    capacity = engine.max_batch_size + engine.max_queue
    # Every request reaches the replica at once (its Ray Serve bound is far
    # above the engine's), so all of them are on it when it is killed.
    deadline_s = 240

    def unary(i):
        return stub.Generate(pb2.GenerateRequest(prompt=b"kill %d" % i, max_new_bytes=1900, model=BOUNDED_MODEL),
                             timeout=deadline_s)

    def stream(i):
        return list(stub.GenerateStream(pb2.GenerateRequest(prompt=b"kill %d" % i, max_new_bytes=1900,
                                                            model=BOUNDED_MODEL), timeout=deadline_s))[-1]

    def outcome(future):
        try:
            future.result()
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()

    with ThreadPoolExecutor(capacity) as pool:
        started = time.monotonic()
        futures = [pool.submit(unary if i % 2 else stream, i) for i in range(capacity)]

        def all_on_the_replica() -> bool:
            held = stats(bounded_handle)
            return held["running"] > 0 and held["running"] + held["waiting"] + sum(f.done() for f in futures) == capacity

        wait_until(all_on_the_replica, timeout_s=120, what="every request to reach the replica")
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        codes = [outcome(f) for f in futures]
    assert time.monotonic() - started < deadline_s + 5, "a request outlived its deadline"
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
    assert grpc.StatusCode.UNAVAILABLE in codes  # requests in flight on the killed replica
    # New requests succeed once Ray Serve has replaced the replica.
    wait_until(lambda: answers(stub, pb2, BOUNDED_MODEL), timeout_s=300, interval_s=0.2,
               what="the service to answer again")
    recovered = time.monotonic() - killed
    print(f"service answered again {recovered:.1f} s after the replica was killed")
    wait_serving(grpc_target, timeout_s=300)
    assert stats(bounded_handle)["pid"] != pid


def answers(stub, pb2, model: str = "") -> bool:
    """Whether a generation succeeds now; a replica being replaced makes it UNAVAILABLE."""
    request = pb2.GenerateRequest(prompt=b"back", max_new_bytes=4, model=model)
    try:
        return stub.Generate(request, timeout=30).usage.generated_bytes > 0
    except grpc.RpcError as e:
        assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), e
        return False


@pytest.fixture(scope="module")
def serving_now(grpc_target, stub, pb2):
    """A known state: every replica up and answering (a test before this one
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


@pytest.mark.timeout(1200)  # for all the examples together: over 5 minutes on a busy machine
@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
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
