"""Official-format (Hugging Face ``BltForCausalLM``) checkpoints through Patchwork."""

import json
import subprocess
import sys

import pytest
import torch
import transformers

import engines
from engines.blt.convert_hf import ConversionError, config_from_hf, load_hf
from engines.blt.patching import patch_ids_from_starts
from engines.generation import SamplingParams
from tests.conftest import REPO



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


def test_full_sequence_logits_agree(hf_model, hf_dir):
    engine = load_hf(hf_dir)
    for seed, length in [(1, 2), (2, 17), (3, 60)]:
        ids = prompt_ids(seed, length)
        with torch.no_grad():
            expected = hf_model(ids, use_cache=False).logits
            starts, _ = engine.model.patch(ids)
            actual = engine.model(ids, patch_ids_from_starts(starts))
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)
    assert 3 < int(starts.sum()) < 55  # patches of mixed lengths were exercised


@pytest.mark.parametrize("seed", [4, 5, 6])
def test_greedy_generation_matches_uncached_transformers(hf_model, hf_dir, seed):
    engine = load_hf(hf_dir)
    ids = prompt_ids(seed, 3 + 9 * seed % 20)
    with torch.no_grad():
        out = hf_model.generate(ids, max_new_tokens=30, do_sample=False, use_cache=False,
                                suppress_tokens=[0, 1, 3], eos_token_id=2, pad_token_id=2)
    expected = bytes(t - 4 for t in out[0, ids.shape[1]:].tolist() if t >= 4)
    prompt = bytes(t - 4 for t in ids[0, 1:].tolist())
    assert engine.generate_one(prompt, SamplingParams(max_new_bytes=30)).text == expected
    *_, reference = engine.generate_reference(prompt, SamplingParams(max_new_bytes=30))
    assert reference.text == expected


def test_converter_writes_a_verified_patchwork_checkpoint(hf_dir, tmp_path):
    out = tmp_path / "converted"
    result = subprocess.run([sys.executable, "-m", "engines.blt.convert_hf", str(hf_dir), str(out)],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    engine = engines.load(out)
    direct = load_hf(hf_dir)
    assert engine.config == direct.config
    assert engine.config.local_decoder.window == 12 and engine.config.entropy_model.window == 10
    assert engine.config.hash_embeddings.n_functions == 2
    for name, tensor in direct.model.state_dict().items():
        assert torch.equal(engine.model.state_dict()[name], tensor), name


def test_unsupported_settings_are_refused(hf_dir, tmp_path):
    hf = json.loads((hf_dir / "config.json").read_text())
    hf["encoder_config"]["cross_attn_all_layers"] = True
    with pytest.raises(ConversionError, match="encoder cross-attention in every layer"):
        config_from_hf(hf)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**hf, "model_type": "llama"}))
    result = subprocess.run([sys.executable, "-m", "engines.blt.convert_hf", str(bad), str(tmp_path / "o")],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "model_type is 'llama', expected 'blt'" in result.stderr
