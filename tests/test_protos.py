import subprocess
import sys

from tests.conftest import REPO

GENERATED = REPO / "protos" / "patchwork" / "v1"


def test_committed_stubs_match_the_proto(tmp_path):
    subprocess.run([sys.executable, str(REPO / "protos" / "generate.py"), "--out", str(tmp_path)], check=True)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert [p.name for p in fresh] == [
        "audiovideo_pb2.py", "audiovideo_pb2.pyi", "audiovideo_pb2_grpc.py",
        "bytelm_pb2.py", "bytelm_pb2.pyi", "bytelm_pb2_grpc.py", "models_pb2.py", "models_pb2.pyi", "models_pb2_grpc.py",
        "multimodal_pb2.py", "multimodal_pb2.pyi", "multimodal_pb2_grpc.py",
    ]
    for relative in fresh:
        committed = REPO / "protos" / relative
        assert committed.read_text() == (tmp_path / relative).read_text(), (
            f"{committed} is out of date; run `make protos`"
        )


def test_service_surface():
    from patchwork.v1 import bytelm_pb2

    service = bytelm_pb2.DESCRIPTOR.services_by_name["ByteLM"]
    methods = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert methods == {"Generate": (False, False), "GenerateStream": (False, True), "Score": (False, False)}
    assert bytelm_pb2.DESCRIPTOR.package == "patchwork.v1"
    fields = set(bytelm_pb2.GenerateRequest.DESCRIPTOR.fields_by_name)
    assert fields == {"prompt", "max_new_bytes", "temperature", "top_p", "top_k", "seed", "stop", "model"}
    usage = set(bytelm_pb2.Usage.DESCRIPTOR.fields_by_name)
    assert usage == {"prompt_bytes", "generated_bytes", "patches", "global_steps"}
