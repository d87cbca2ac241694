"""The family-neutral contract (engines.api) and the shared layers every family reuses."""

import pytest
import torch

from patchwork.engines.api import (
    EngineStats,
    FinishReason,
    Generation,
    GenerativeEngine,
    ModelInfo,
    RequestTooLarge,
    SamplingParams,
    Usage,
)
from patchwork.engines.blt.reference import BltDetails
from patchwork.engines.layers import CrossAttention
from patchwork.engines.loading import load
from patchwork.engines.registry import register
from patchwork.engines.scheduler import SchedulerConfig
from tests import echo_family
from tests.helpers import admitted_together, make_engine


def test_the_shared_cross_attention_adds_no_residual():
    torch.manual_seed(0)
    attention = CrossAttention(dim=8, n_heads=2, norm_eps=1e-5)
    torch.nn.init.zeros_(attention.o_proj.weight)
    queries, keys = torch.randn(1, 3, 8), torch.randn(1, 5, 8)
    everything = torch.ones(1, 3, 5, dtype=torch.bool)
    assert torch.equal(attention(queries, keys, everything), torch.zeros(1, 3, 8))


def test_the_blt_engine_keeps_the_contract():
    engine = make_engine()
    try:
        assert isinstance(engine, GenerativeEngine)
        info = engine.describe()
        assert isinstance(info, ModelInfo) and (info.name, info.family) == ("random", "blt")
        assert engine.stats() == EngineStats(running=0, waiting=0, steps=0, cache_bytes=0, health=None)
        items = list(engine.submit(b"abc", SamplingParams(max_new_bytes=5)))
        result = items[-1]
        assert isinstance(result, Generation) and all(isinstance(item, bytes) for item in items[:-1])
        assert b"".join(items[:-1]) == result.text
        assert (result.usage.prompt_tokens, result.usage.generated_tokens) == (3, len(result.text))
        assert isinstance(result.details, BltDetails) and sum(result.details.patch_lengths) == len(result.text)
        assert engine.stats().steps > 0
    finally:
        engine.close()


def test_a_request_larger_than_a_slot_is_refused_naming_the_field_that_fills_it():
    engine = make_engine(max_sequence_bytes=20)
    try:
        assert engine.request_cost(b"abcd", SamplingParams(max_new_bytes=7)) == {"prompt": 4, "max_new_bytes": 7}
        for prompt, new, field in [(b"x" * 20, 1, "prompt"), (b"x" * 5, 20, "max_new_bytes"),
                                   (b"x" * 10, 11, "max_new_bytes")]:
            with pytest.raises(RequestTooLarge) as refusal:
                engine.submit(prompt, SamplingParams(max_new_bytes=new))
            assert refusal.value.field == field
    finally:
        engine.close()


@pytest.fixture(scope="module")
def echo_checkpoint(tmp_path_factory):
    register({"echo": "tests.echo_family"})
    path = tmp_path_factory.mktemp("echo") / "echo"
    echo_family.write_checkpoint(path, shift=3)
    return path


def test_a_family_defined_outside_the_engines_loads_and_generates_through_the_shared_scheduler(echo_checkpoint):
    engine = load(echo_checkpoint, scheduler=SchedulerConfig(max_batch_size=2, max_sequence_bytes=64))
    try:
        assert engine.describe() == ModelInfo(name="echo", family="echo", config={"family": "echo", "format_version": 1},
                                              metrics={"shift": 3.0})
        # More requests than slots, of different lengths, finishing out of order:
        # the third takes the second's slot and is moved down when the first
        # ends, and the fourth starts in the slot it left.
        asks = [(b"hello", 12), (b"", 3), (b"a longer prompt than the others", 30), (b"xyz", 2)]
        with admitted_together(engine):
            requests = [engine.submit(prompt, SamplingParams(max_new_bytes=new)) for prompt, new in asks]
        for (prompt, new), request in zip(asks, requests):
            result = request.result()
            assert result.text == echo_family.echo(prompt, 3, new)
            assert result.usage == Usage(prompt_tokens=len(prompt), generated_tokens=new)
        stopped = engine.submit(b"abcabc", SamplingParams(max_new_bytes=20, stop=(b"f",))).result()
        assert (stopped.text, stopped.finish_reason) == (b"de", FinishReason.STOP)
        with pytest.raises(RequestTooLarge, match="^prompt: "):
            engine.submit(b"x" * 64, SamplingParams(max_new_bytes=0))
    finally:
        engine.close()


def test_a_family_name_cannot_be_taken_twice():
    with pytest.raises(ValueError, match="'blt' is already defined by patchwork.engines.blt.engine"):
        register({"blt": "tests.echo_family"})


def test_the_test_family_is_served_beside_blt_over_grpc(stub, pb2):
    import grpc

    from tests.conftest import ECHO_MODEL

    for prompt in [b"echo me", b"", "ñandú".encode()]:
        request = pb2.GenerateRequest(prompt=prompt, max_new_bytes=9, model=ECHO_MODEL)
        unary = stub.Generate(request, timeout=60)
        assert (unary.text, unary.model) == (echo_family.echo(prompt, 1, 9), ECHO_MODEL)
        assert (unary.usage.prompt_bytes, unary.usage.generated_bytes, unary.usage.patches) == (len(prompt), 9, 0)
        chunks = list(stub.GenerateStream(request, timeout=60))
        assert b"".join(chunk.text for chunk in chunks) == unary.text
        assert chunks[-1].finish_reason == pb2.FINISH_REASON_LENGTH
    blt = stub.Generate(pb2.GenerateRequest(prompt=b"beside", max_new_bytes=4), timeout=60)
    assert blt.model == "tiny" and blt.usage.patches > 0
    with pytest.raises(grpc.RpcError) as refusal:
        stub.Score(pb2.ScoreRequest(text=b"x", model=ECHO_MODEL), timeout=60)
    assert refusal.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refusal.value.details() == ("model: 'echo' (family echo) does not serve Score; it serves Generate, "
                                       "GenerateStream, Reverse")


def reverse_call(channel):
    from google.protobuf import struct_pb2

    return channel.unary_unary("/patchwork.test.Echo/Reverse", request_serializer=struct_pb2.Struct.SerializeToString,
                               response_deserializer=struct_pb2.Struct.FromString)


def test_a_family_answers_a_service_of_its_own_from_a_deployment_class_of_its_own(channel, grpc_target):
    import grpc
    from google.protobuf import struct_pb2
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tests.conftest import ECHO_MODEL

    reverse = reverse_call(channel)
    answer = reverse(struct_pb2.Struct(fields={"text": struct_pb2.Value(string_value="abc"),
                                               "model": struct_pb2.Value(string_value=ECHO_MODEL)}), timeout=60)
    assert (answer["text"], answer["model"]) == ("dcb", ECHO_MODEL)  # reversed, each byte shifted by the weight 1
    # A request that names no model goes to the first model whose family serves the RPC.
    unnamed = reverse(struct_pb2.Struct(fields={"text": struct_pb2.Value(string_value="xy")}), timeout=60)
    assert (unnamed["text"], unnamed["model"]) == ("zy", ECHO_MODEL)
    refusals = [
        (struct_pb2.Struct(fields={"text": struct_pb2.Value(string_value="abc"),
                                   "model": struct_pb2.Value(string_value="tiny")}),
         "model: 'tiny' (family blt) does not serve Reverse; it serves Generate, GenerateStream, Score"),
        (struct_pb2.Struct(fields={"model": struct_pb2.Value(string_value=ECHO_MODEL)}), "text: a string is required"),
    ]
    for request, details in refusals:
        with pytest.raises(grpc.RpcError) as refusal:
            reverse(request, timeout=60)
        assert (refusal.value.code(), refusal.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, details)
    with grpc.insecure_channel(grpc_target) as raw:
        health = health_pb2_grpc.HealthStub(raw).Check(health_pb2.HealthCheckRequest(service="patchwork.test.Echo"),
                                                       timeout=60)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_services_are_checked_against_their_handlers_and_the_families_that_name_them():
    from patchwork.serving.bytelm import ByteLMHandlers
    from patchwork.serving.families import ServedFamily
    from patchwork.serving.grpc_services import GrpcService, services_of

    with pytest.raises(ValueError, match="ByteLMHandlers does not answer x.Y's Reverse"):
        GrpcService(name="x.Y", rpcs=frozenset({"Reverse"}), handlers=ByteLMHandlers, add_to_server="x.add")
    stray = ServedFamily(rpcs=frozenset({"Generate", "Reverse"}))
    with pytest.raises(ValueError, match=r"family stray serves \['Reverse'\], which none of its services has"):
        services_of({"stray": stray})
    assert [service.name for service in services_of({"echo": echo_family.SERVING})] == ["patchwork.test.Echo",
                                                                                       "patchwork.v1.ByteLM"]


def test_prompts_may_be_typed_segments_and_a_family_refuses_what_it_does_not_read():
    from patchwork.engines.api import InvalidRequest, Modality, Segment

    engine = make_engine()
    try:
        params = SamplingParams(max_new_bytes=6)
        segments = (Segment(Modality.TEXT, b"ab"), Segment(Modality.TEXT, b"c"))
        assert engine.submit(segments, params).result().text == engine.submit(b"abc", params).result().text
        with pytest.raises(InvalidRequest) as refusal:
            engine.submit((Segment(Modality.TEXT, b"a"), Segment(Modality.IMAGE, b"\x89PNG")), params)
        assert str(refusal.value) == "prompt: family blt reads text only, not image"
    finally:
        engine.close()


def test_patch_facts_reach_the_wire_only_from_families_that_patch():
    from patchwork.engines.api import PatchedOutput

    assert isinstance(BltDetails(patch_lengths=[1, 2], global_steps=3), PatchedOutput)
    assert not isinstance(None, PatchedOutput)  # the echo family has no details


def test_the_proxy_registers_services_without_importing_the_models():
    """Ray Serve's proxy imports every servicer function when it starts and
    has 60 s to come up: on a busy machine importing torch there takes longer."""
    import subprocess
    import sys

    from patchwork.serving.config import ServingConfig
    from patchwork.serving.deploy import deploy_config
    from tests.conftest import REPO

    register({"echo": "tests.echo_family"})
    functions = deploy_config(ServingConfig(families={"echo": "tests.echo_family"}), ["m"])["grpc_options"][
        "grpc_servicer_functions"]
    assert "tests.echo_service.add_Echo_to_server" in functions
    imports = "; ".join(f"import {path.rsplit('.', 1)[0]}" for path in functions)
    check = subprocess.run([sys.executable, "-c", f"import sys; {imports}; print(sorted(m for m in sys.modules "
                            f"if m.split('.')[0] in ('torch', 'numpy') or m.startswith('patchwork.engines.')))"],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == "[]"
