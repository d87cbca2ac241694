"""Integration: real gRPC calls to the tiny checkpoint through the gateway replica's own gRPC
server (direct ingress, the default) and through Ray Serve's proxy."""

import grpc
import pytest

from patchwork.engines.loading import load
from tests.conftest import AUTH_TOKEN, BearerToken, run_patchwork
from tests.helpers import idle, stats, wait_until


@pytest.fixture(scope="module")
def local_engine(tiny_checkpoint):
    return load(tiny_checkpoint)


def test_generate_matches_the_engine_in_process(stub, pb2, local_engine):
    response = stub.Generate(pb2.GenerateRequest(prompt=b"def ", max_new_bytes=24), timeout=120)
    expected = local_engine.generate([b"def "], max_new_bytes=24)[0]
    assert response.text == expected.text
    assert response.finish_reason == pb2.FINISH_REASON_LENGTH
    assert list(response.patch_lengths) == expected.details.patch_lengths
    assert response.usage.prompt_bytes == 4 and response.usage.generated_bytes == 24
    assert response.usage.patches == len(expected.details.patch_lengths)
    assert response.usage.global_steps == expected.details.global_steps
    assert response.model == "tiny"


def test_max_new_bytes_zero_takes_the_configured_default(stub, pb2):
    response = stub.Generate(pb2.GenerateRequest(prompt=b"import ", model="tiny"), timeout=120)
    assert response.usage.generated_bytes == 16  # default_new_bytes of the test server


def test_stream_reassembles_to_the_unary_result(stub, pb2):
    request = pb2.GenerateRequest(prompt="ünï ".encode(), max_new_bytes=40, temperature=1.0, seed=9)
    unary = stub.Generate(request, timeout=120)
    chunks = list(stub.GenerateStream(request, timeout=120))
    assert len(chunks) >= 2
    assert b"".join(c.text for c in chunks) == unary.text
    assert all(c.finish_reason == pb2.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason == unary.finish_reason
    assert list(last.patch_lengths) == list(unary.patch_lengths)
    assert last.usage == unary.usage
    boundary = 0
    for chunk in chunks[:-1]:
        boundary += len(chunk.text)
        assert not splits_a_character(unary.text, boundary), (unary.text, boundary)


def splits_a_character(text: bytes, boundary: int) -> bool:
    """Whether ``boundary`` falls inside a valid multi-byte UTF-8 character of
    ``text`` (invalid bytes cannot be split: there is no character to keep whole)."""
    for length in (2, 3, 4):
        for inside in range(1, length):
            piece = text[boundary - inside: boundary - inside + length]
            if boundary - inside < 0 or len(piece) < length:
                continue
            try:
                if len(piece.decode("utf-8")) == 1:
                    return True
            except UnicodeDecodeError:
                pass
    return False


def test_the_character_boundary_check_can_fail():
    text = "añb日".encode()
    assert splits_a_character(text, 2) and not splits_a_character(text, 3)
    assert splits_a_character(text, 5) and splits_a_character(text, 6) and not splits_a_character(text, 4)
    assert not splits_a_character(b"a\xe6\x97b", 2)  # not a character: nothing to keep whole


def test_stop_sequence_over_grpc(stub, pb2):
    full = stub.Generate(pb2.GenerateRequest(prompt=b"class ", max_new_bytes=30), timeout=120).text
    stop = full[10:12]
    response = stub.Generate(pb2.GenerateRequest(prompt=b"class ", max_new_bytes=30, stop=[stop]), timeout=120)
    assert response.finish_reason == pb2.FINISH_REASON_STOP
    assert response.text == full[: full.find(stop)]


def test_score(stub, pb2, local_engine):
    text = b"for i in range(10):\n    print(i)\n"
    response = stub.Score(pb2.ScoreRequest(text=text), timeout=60)
    expected = local_engine.score(text)
    assert len(response.entropies) == len(text)
    assert list(response.patch_lengths) == expected.patch_lengths
    assert response.bits_per_byte == pytest.approx(expected.bits_per_byte, rel=1e-5)
    assert response.entropies == pytest.approx(expected.entropies, rel=1e-5)


def test_standard_health_check(grpc_target):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = grpc.insecure_channel(grpc_target)  # the health check needs no token
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "patchwork.v1.ByteLM", "patchwork.v1.Models"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as error:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=30)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_the_proxy_serves_the_same_application_beside_the_gateways_own_port(proxy_target, grpc_target, stub, pb2):
    """Direct ingress is the default: clients reach the gateway replica's own
    gRPC server; Ray Serve's proxy still answers for the same application,
    with the same auth, and one more hop."""
    from patchwork.v1 import bytelm_pb2_grpc

    assert proxy_target != grpc_target
    request = pb2.GenerateRequest(prompt=b"class ", max_new_bytes=20)
    with grpc.insecure_channel(proxy_target) as raw:
        with pytest.raises(grpc.RpcError) as error:
            bytelm_pb2_grpc.ByteLMStub(raw).Generate(request, timeout=120)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        via_proxy = bytelm_pb2_grpc.ByteLMStub(grpc.intercept_channel(raw, BearerToken(AUTH_TOKEN)))
        unary = via_proxy.Generate(request, timeout=120)
        streamed = b"".join(chunk.text for chunk in via_proxy.GenerateStream(request, timeout=120))
    assert unary.text == streamed == stub.Generate(request, timeout=120).text


def test_the_gateway_replica_answers_on_the_configured_port(grpc_target, serving_config):
    from patchwork.serving import ops

    assert ops.gateway_ports() == [serving_config.direct_grpc_port]
    assert grpc_target.endswith(f":{serving_config.direct_grpc_port}")


def test_ingress_is_selectable_in_the_clusters_environment(serving_config):
    from patchwork.serving.cluster import cluster_environment

    direct = cluster_environment(serving_config)
    assert direct["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    assert direct["RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT"] == str(serving_config.direct_grpc_port)
    proxy_only = serving_config.model_copy(update={"ingress": "proxy"})
    assert cluster_environment(proxy_only)["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "0"


def test_ray_serve_healthz_and_application_list(channel):
    from ray.serve.generated import serve_pb2, serve_pb2_grpc

    api = serve_pb2_grpc.RayServeAPIServiceStub(channel)
    assert api.Healthz(serve_pb2.HealthzRequest(), timeout=30).message == "success"
    assert "patchwork" in api.ListApplications(serve_pb2.ListApplicationsRequest(), timeout=30).application_names


BAD_GENERATE = [
    ({"max_new_bytes": 1901}, "max_new_bytes"),
    ({"prompt": b"x" * 1537}, "prompt"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": -0.5}, "top_p"),
    ({"model": "no-such-model"}, "model"),
    ({"stop": [b""]}, "stop"),
    ({"stop": [b"a"] * 5}, "stop"),
]


@pytest.mark.parametrize("fields,field", BAD_GENERATE, ids=[f for _, f in BAD_GENERATE])
@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_bad_generate_requests_are_invalid_argument_naming_the_field(stub, pb2, method, fields, field):
    request = pb2.GenerateRequest(**{"prompt": b"ok", "max_new_bytes": 4, **fields})
    with pytest.raises(grpc.RpcError) as error:
        call = getattr(stub, method)(request, timeout=60)
        if method == "GenerateStream":
            list(call)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(f"{field}:")


@pytest.mark.parametrize("fields,field", [({"text": b"y" * 1537}, "text"), ({"model": "nope"}, "model")])
def test_bad_score_requests_are_invalid_argument_naming_the_field(stub, pb2, fields, field):
    with pytest.raises(grpc.RpcError) as error:
        stub.Score(pb2.ScoreRequest(**{"text": b"ok", **fields}), timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(f"{field}:")


@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_a_request_that_can_never_fit_the_cache_is_invalid_argument_naming_the_field(stub, pb2, method):
    request = pb2.GenerateRequest(prompt=b"p" * 1510, max_new_bytes=500)  # 2010 > 2000 bytes per slot
    with pytest.raises(grpc.RpcError) as error:
        call = getattr(stub, method)(request, timeout=60)
        if method == "GenerateStream":
            list(call)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith("max_new_bytes: ")
    assert "need 2010 cache positions" in error.value.details()


def test_a_cancelled_stream_frees_its_slot(stub, pb2, model_handle):
    wait_until(lambda: idle(model_handle))
    call = stub.GenerateStream(pb2.GenerateRequest(prompt=b"x", max_new_bytes=500), timeout=120)
    next(call)
    assert stats(model_handle)["running"] == 1
    call.cancel()
    wait_until(lambda: idle(model_handle), timeout_s=30, interval_s=0.05, what="the cancelled stream's slot to be freed")


def test_concurrent_requests_are_batched_and_each_matches_its_own_run(stub, pb2, local_engine):
    from concurrent.futures import ThreadPoolExecutor

    prompts = [b"def ", b"import ", b"class ", b"return "]
    requests = [pb2.GenerateRequest(prompt=p, max_new_bytes=40, temperature=0.8, seed=i) for i, p in enumerate(prompts)]
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda r: stub.Generate(r, timeout=120), requests))
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        alone = local_engine.generate([prompt], max_new_bytes=40, temperature=0.8, seed=i)[0]
        assert response.text == alone.text


def test_replica_keeps_serving_after_bad_requests(stub, pb2):
    for _ in range(3):
        with pytest.raises(grpc.RpcError):
            stub.Generate(pb2.GenerateRequest(temperature=-1), timeout=60)
    assert stub.Generate(pb2.GenerateRequest(prompt=b"ok", max_new_bytes=3), timeout=60).usage.generated_bytes == 3


def test_command_line_client(grpc_target):
    def client(*args):
        return run_patchwork("client", "--target", grpc_target, *args)

    generated = client("generate", "def ", "--max-new-bytes", "8")
    assert generated.returncode == 0 and len(generated.stdout_bytes) == 9  # 8 bytes and a newline
    assert "finish=FINISH_REASON_LENGTH" in generated.stderr
    streamed = client("generate", "def ", "--max-new-bytes", "8", "--stream")
    assert streamed.returncode == 0 and streamed.stdout_bytes == generated.stdout_bytes
    scored = client("score", "hello")
    assert scored.returncode == 0 and "bits_per_byte=" in scored.stdout
    rejected = client("generate", "x", "--temperature", "-1")
    assert rejected.returncode == 1 and "INVALID_ARGUMENT: temperature" in rejected.stderr


def test_an_empty_generation_is_recorded_without_error(ray_cluster, tiny_checkpoint):
    from patchwork.engines.api import FinishReason, Generation, Usage
    from patchwork.engines.blt.reference import BltDetails
    from patchwork.serving.model_server import ModelServer

    class Recorded:
        """Stands in for a Ray metric; Ray's counters refuse increments of 0."""

        def __init__(self):
            self.calls = []

        def inc(self, value, tags):
            assert value > 0, "a counter increment must be positive"
            self.calls.append(value)

        def observe(self, value, tags):
            self.calls.append(value)

    server = ModelServer(str(tiny_checkpoint), "cpu")
    server.metrics = {**server.metrics, "generated": Recorded(), "patch_length": Recorded()}
    empty = Generation(text=b"", finish_reason=FinishReason.END_OF_SEQUENCE, usage=Usage(3, 0),
                       details=BltDetails(patch_lengths=[], global_steps=1))
    server._record_result(empty)  # an immediate end of sequence generated nothing
    assert server.metrics["generated"].calls == server.metrics["patch_length"].calls == []
    some = Generation(text=b"abcde", finish_reason=FinishReason.LENGTH, usage=Usage(3, 5),
                      details=BltDetails(patch_lengths=[2, 3], global_steps=3))
    server._record_result(some)
    assert server.metrics["generated"].calls == [5] and server.metrics["patch_length"].calls == [2, 3]
