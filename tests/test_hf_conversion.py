"""Official-format (Hugging Face ``BltForCausalLM``) checkpoints through Patchwork."""

import json
import re
import shutil
import subprocess

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from patchwork.engines.api import SamplingParams
from patchwork.engines.blt.convert_hf import HF_DEFAULTS, HF_SECTION_DEFAULTS, ConversionError, config_from_hf, load_hf
from patchwork.engines.blt.patching import patch_ids_from_starts
from patchwork.engines.loading import load
from tests.conftest import run_patchwork


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    config = transformers.BltConfig(
        vocab_size=260, patch_in_forward=True, patching_threshold=5.1, local_attention_window_len=12,
        cross_attn_k=2, encoder_hash_byte_group_size=[3, 4, 5], encoder_hash_byte_group_vocab=101,
        encoder_hash_byte_group_nb_functions=2,
        patcher_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                            sliding_window=10, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}),
        encoder_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, hidden_size_global=48),
        decoder_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40,
                            hidden_size_global=48),
        global_config=dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96),
    )
    model = transformers.BltForCausalLM(config).eval()
    # Put the threshold inside the random patcher's entropy range so patches vary in length.
    ids = torch.randint(4, 260, (1, 64))
    with torch.no_grad():
        entropies, _, _ = model.model.patcher(ids, patch_size=4, threshold=1.0)
    model.config.patching_threshold = float(entropies.median())
    return model


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "blt-hf"
    hf_model.save_pretrained(path, max_shard_size="100KB")  # sharded, like the official 1B/7B files
    assert (path / "model.safetensors.index.json").exists()
    return path


def prompt_ids(seed: int, length: int) -> torch.Tensor:
    ids = torch.randint(4, 260, (1, length), generator=torch.Generator().manual_seed(seed))
    ids[0, 0] = 1  # BOS
    return ids


def assert_same_logits(hf_model, engine, ids: torch.Tensor) -> torch.Tensor:
    """Full-sequence logits agree; returns Patchwork's patch starts."""
    with torch.no_grad():
        expected = hf_model(ids, use_cache=False).logits
        starts, _ = engine.model.patch(ids)
        actual = engine.model(ids, patch_ids_from_starts(starts))
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)
    return starts


def assert_same_greedy_bytes(hf_model, engine, ids: torch.Tensor, new_bytes: int) -> None:
    """Greedy generation after ``ids`` matches transformers' uncached generate."""
    with torch.no_grad():
        out = hf_model.generate(ids, max_new_tokens=new_bytes, do_sample=False, use_cache=False,
                                suppress_tokens=[0, 1, 3], eos_token_id=2, pad_token_id=2)
    expected = bytes(t - 4 for t in out[0, ids.shape[1]:].tolist() if t >= 4)
    prompt = bytes(t - 4 for t in ids[0, 1:].tolist())
    assert engine.generate_one(prompt, SamplingParams(max_new_bytes=new_bytes)).text == expected


def test_full_sequence_logits_agree(hf_model, hf_dir):
    engine = load_hf(hf_dir)
    for seed, length in [(1, 2), (2, 17), (3, 60)]:
        starts = assert_same_logits(hf_model, engine, prompt_ids(seed, length))
    assert 3 < int(starts.sum()) < 55  # patches of mixed lengths were exercised


@pytest.mark.parametrize("seed", [4, 5, 6])
def test_greedy_generation_matches_uncached_transformers(hf_model, hf_dir, seed):
    engine = load_hf(hf_dir)
    ids = prompt_ids(seed, 3 + 9 * seed % 20)
    assert_same_greedy_bytes(hf_model, engine, ids, 30)
    prompt = bytes(t - 4 for t in ids[0, 1:].tolist())
    *_, reference = engine.generate_reference(prompt, SamplingParams(max_new_bytes=30))
    assert reference.text == engine.generate_one(prompt, SamplingParams(max_new_bytes=30)).text


def test_converter_writes_a_verified_patchwork_checkpoint(hf_dir, tmp_path):
    out = tmp_path / "converted"
    result = run_patchwork("hf", "import", str(hf_dir), str(out))
    assert result.returncode == 0, result.stderr
    engine = load(out)
    direct = load_hf(hf_dir)
    assert engine.config == direct.config
    assert engine.config.local_decoder.window == 12 and engine.config.entropy_model.window == 10
    assert engine.config.hash_embeddings.n_functions == 2
    for name, tensor in direct.model.state_dict().items():
        assert torch.equal(engine.model.state_dict()[name], tensor), name


def run_converter(hf_dir, out) -> subprocess.CompletedProcess:
    return run_patchwork("hf", "import", str(hf_dir), str(out))


# -- configs read as transformers reads them ----------------------------------


def test_the_defaults_are_those_of_the_installed_transformers():
    config = transformers.BltConfig()
    for key, value in HF_DEFAULTS.items():
        assert getattr(config, key) == value, key
    sections = {"patcher_config": config.patcher_config, "encoder_config": config.encoder_config,
                "decoder_config": config.decoder_config, "global_config": config.global_config}
    for name, defaults in HF_SECTION_DEFAULTS.items():
        section = sections[name]
        for key, value in defaults.items():
            if key == "rope_theta":
                assert section.rope_parameters == {"rope_type": "default", "rope_theta": value}, name
            elif key == "intermediate_size" and value is None:  # resolved to int(8 * hidden / 3)
                assert section.intermediate_size == int(8 * section.hidden_size / 3), name
            elif key == "num_key_value_heads":  # resolved to the number of heads
                assert section.num_key_value_heads == section.num_attention_heads, name
            else:
                assert getattr(section, key) == value, (name, key)


# The keys a hand-written config.json might give; everything else defaults.
MINIMAL = {
    "model_type": "blt", "cross_attn_k": 2, "encoder_hash_byte_group_size": [3, 4],
    "encoder_hash_byte_group_vocab": 53,
    "patcher_config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "intermediate_size": 40},
    "encoder_config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "hidden_size_global": 48},
    "decoder_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "intermediate_size": 40, "hidden_size_global": 48},
    "global_config": {"hidden_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4,
                      "intermediate_size": 64},
}
# The same, written the way transformers' own conversion script writes it:
# legacy rotary keys and keys transformers ignores.
LEGACY = {
    **MINIMAL, "realtime_patching": True, "monotonicity": False, "patching_device": "cuda",
    **{name: {**MINIMAL[name], "rope_theta": theta, "rope_scaling": {"rope_type": "default"}, "norm_eps": 1e-5}
       for name, theta in [("patcher_config", 2000.0), ("encoder_config", 3000.0), ("decoder_config", 4000.0),
                           ("global_config", 5000.0)]},
}


def write_with_config(config: dict, path):
    """A random transformers BLT saved with exactly ``config`` as its
    config.json (plus a patching threshold inside its entropy range)."""
    torch.manual_seed(1)
    model = transformers.BltForCausalLM(transformers.BltConfig(**config)).eval()
    with torch.no_grad():
        entropies, _, _ = model.model.patcher(prompt_ids(9, 200), patch_size=4, threshold=1.0)
    config = {**config, "patching_threshold": float(entropies.median())}
    model.save_pretrained(path)
    (path / "config.json").write_text(json.dumps(config))
    return config


@pytest.mark.parametrize("written", [MINIMAL, LEGACY], ids=["keys-omitted", "legacy-keys"])
def test_a_config_json_is_read_with_the_defaults_transformers_uses(written, tmp_path):
    write_with_config(written, tmp_path)
    hf_model = transformers.BltForCausalLM.from_pretrained(tmp_path).eval()  # reads the same file
    engine = load_hf(tmp_path)
    config = engine.config
    assert config.local_encoder.window == config.local_decoder.window == config.entropy_model.window == 512
    expected_theta = (10000.0, 500000.0) if written is MINIMAL else (2000.0, 3000.0)
    assert (config.entropy_model.rope_theta, config.local_encoder.rope_theta) == expected_theta
    ids = prompt_ids(10, 700)  # past the 512-byte windows
    assert_same_logits(hf_model, engine, ids)
    assert_same_greedy_bytes(hf_model, engine, ids[:, :520], 12)


@pytest.mark.parametrize("change, message", [
    ({"global_config": {**MINIMAL["global_config"], "rope_scaling": {"type": "linear", "factor": 2.0}}},
     "global_config: rotary scaling 'linear' is not supported"),
    ({"patcher_config": {**MINIMAL["patcher_config"], "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}},
     "patcher_config: rotary scaling 'dynamic'"),
    ({"encoder_config": {**MINIMAL["encoder_config"],
                         "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}}},
     "partial rotary embeddings"),
    ({"patch_in_forward": False}, "patch_in_forward is false"),
    ({"max_patch_length": 8}, "max_patch_length 8 is not supported: transformers drops the empty patch"),
    ({"patch_size": None}, "patch_size is null"),
    ({"patching_mode": "space"}, "patching_mode 'space' is not supported"),
    ({"encoder_hash_byte_group_nb_functions": 12}, "encoder_hash_byte_group_nb_functions 12 is out of range"),
    ({"encoder_config": {**MINIMAL["encoder_config"], "cross_attn_all_layers": True}},
     "encoder cross-attention in every layer"),
    ({"decoder_config": {**MINIMAL["decoder_config"], "cross_attn_k": 3}}, "decoder_config.cross_attn_k 3 != "),
    ({"global_config": {**MINIMAL["global_config"], "hidden_act": "gelu"}}, "activation 'gelu' is not supported"),
    ({"model_type": "llama"}, "model_type is 'llama', expected 'blt'"),
])
def test_what_transformers_computes_differently_is_refused(change, message):
    with pytest.raises(ConversionError, match=re.escape(message)):
        config_from_hf({**MINIMAL, "patching_threshold": 5.0, **change})


# -- bad input: one line, exit code 2 ------------------------------------------


def copy_checkpoint(hf_dir, tmp_path):
    target = tmp_path / "broken"
    shutil.copytree(hf_dir, target)
    return target


def edit_shard_holding(checkpoint, name: str, edit) -> str:
    """Applies ``edit`` to the tensors of the shard that holds ``name``; returns the shard's file name."""
    weight_map = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    shard = checkpoint / weight_map[name]
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    return shard.name


TENSOR = "model.local_decoder.layers.1.mlp.up_proj.weight"


@pytest.mark.parametrize("case", ["missing", "extra", "wrong-shape"])
def test_a_bad_tensor_is_named_with_its_shard(hf_dir, tmp_path, case):
    broken = copy_checkpoint(hf_dir, tmp_path)
    edits = {
        "missing": lambda tensors: tensors.pop(TENSOR),
        "extra": lambda tensors: tensors.update({"model.local_decoder.layers.7.mlp.up_proj.weight": tensors[TENSOR].clone()}),
        "wrong-shape": lambda tensors: tensors.update({TENSOR: tensors[TENSOR][:, :-1].contiguous()}),
    }
    shard = edit_shard_holding(broken, TENSOR, edits[case])
    result = run_converter(broken, tmp_path / "out")
    named = "model.local_decoder.layers.7.mlp.up_proj.weight" if case == "extra" else TENSOR
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert named in result.stderr and shard in result.stderr  # the shard the index lists it in
    if case == "missing":
        assert "is missing" in result.stderr
    if case == "wrong-shape":
        assert "has shape [40, 31]" in result.stderr
    with pytest.raises(ConversionError, match=re.escape(named)):
        load_hf(broken)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("config_text, message", [
    ("{not json", "config.json: not valid JSON"),
    ("[1, 2]", "config.json: the config is not a JSON object"),
    (None, "encoder_hash_byte_group_nb_functions 12 is out of range"),
])
def test_a_bad_config_is_named_in_one_line(hf_dir, tmp_path, config_text, message):
    broken = copy_checkpoint(hf_dir, tmp_path)
    if config_text is None:
        config = json.loads((broken / "config.json").read_text())
        config_text = json.dumps({**config, "encoder_hash_byte_group_nb_functions": 12})
    (broken / "config.json").write_text(config_text)
    result = run_converter(broken, tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert str(broken / "config.json") in result.stderr and message in result.stderr
