"""Patchwork BLT checkpoints written in Hugging Face's layout compute in
transformers what they compute in the engine."""

import json
import subprocess

import pytest
import torch
import transformers

from patchwork.engines.api import SamplingParams
from patchwork.engines.blt.config import PatchingConfig
from patchwork.engines.blt.convert_hf import ConversionError, config_from_hf, hf_name, load_hf
from patchwork.engines.blt.export_hf import config_to_hf, export
from patchwork.engines.blt.hf_peer import TransformersPeer
from patchwork.engines.loading import load
from tests.conftest import PATCHWORK, REPO


@pytest.fixture(scope="module")
def tiny_engine(tiny_checkpoint):
    engine = load(tiny_checkpoint)
    yield engine
    engine.close()


def test_an_exported_checkpoint_loads_in_transformers_and_reads_back(tiny_checkpoint, tiny_engine, tmp_path):
    out = export(tiny_checkpoint, tmp_path / "hf")
    read_back = config_from_hf(json.loads((out / "config.json").read_text()))
    assert read_back.model_dump(exclude={"entropy_model", "local_encoder", "local_decoder", "global_model"}) == \
        tiny_engine.config.model_dump(exclude={"entropy_model", "local_encoder", "local_decoder", "global_model"})
    for stack in ("entropy_model", "local_encoder", "local_decoder", "global_model"):
        ours, theirs = getattr(tiny_engine.config, stack), getattr(read_back, stack)
        assert (theirs.dim, theirs.n_layers, theirs.n_heads, theirs.kv_heads, theirs.hidden_dim, theirs.window,
                theirs.rope_theta, theirs.norm_eps) == (ours.dim, ours.n_layers, ours.n_heads, ours.kv_heads,
                                                        ours.hidden_dim, ours.window, ours.rope_theta, ours.norm_eps)
    theirs = transformers.BltForCausalLM.from_pretrained(out).state_dict()
    ours = {hf_name(name): tensor for name, tensor in tiny_engine.model.state_dict().items()}
    assert set(theirs) == set(ours)
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    # The published-layout loader reads it back to the same weights.
    reloaded = load_hf(out)
    assert all(torch.equal(tensor, tiny_engine.model.state_dict()[name])
               for name, tensor in reloaded.model.state_dict().items())
    reloaded.close()


def test_transformers_generates_the_engines_bytes_on_exported_weights(tiny_checkpoint, tiny_engine):
    peer = TransformersPeer(tiny_checkpoint)
    prompts = [b"The quick brown fox ", b"def generate(self, ", b"\xe2\x82\xac and \x00 bytes: "]
    for prompt in prompts:
        expected = tiny_engine.generate_one(prompt, SamplingParams(max_new_bytes=30)).text
        assert peer.generate([prompt], 30, use_cache=False).texts == [expected]
    # A batch of equal-length prompts: each row is what the engine makes of it alone.
    batch = [p[:12] for p in prompts]
    expected = [tiny_engine.generate_one(p, SamplingParams(max_new_bytes=20)).text for p in batch]
    assert peer.generate(batch, 20, use_cache=False).texts == expected
    with pytest.raises(ValueError, match="one length"):
        peer.generate(prompts, 4, use_cache=False)


def test_settings_transformers_cannot_express_are_refused(tiny_engine):
    config = tiny_engine.config
    for changed, reason in [
        ({"patching": PatchingConfig(mode="space")}, "patching mode 'space'"),
        ({"patching": PatchingConfig(max_patch_length=8)}, "max_patch_length"),
        ({"local_decoder": config.local_decoder.model_copy(update={"window": 32})}, "transformers uses one for both"),
    ]:
        with pytest.raises(ConversionError, match=reason):
            config_to_hf(config.model_copy(update=changed))


def test_the_export_cli_writes_a_directory_and_names_a_bad_checkpoint(tiny_checkpoint, tmp_path):
    command = [*PATCHWORK, "hf", "export"]
    ok = subprocess.run([*command, str(tiny_checkpoint), str(tmp_path / "hf")], cwd=REPO, capture_output=True,
                        text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert {p.name for p in (tmp_path / "hf").iterdir()} == {"config.json", "model.safetensors"}
    missing = tmp_path / "no-such-checkpoint"
    bad = subprocess.run([*command, str(missing), str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and str(missing) in bad.stderr and "Traceback" not in bad.stderr
