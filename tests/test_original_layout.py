"""Checkpoints in the original release's layout (params.json, consolidated.pth,
entropy_model/), written from random weights, load to the model transformers
computes from the same weights."""

import json
import re

import pytest
import torch
import transformers

from patchwork.engines.blt.convert_hf import ConversionError
from patchwork.engines.blt.original import load_original
from patchwork.engines.loading import load
from tests.conftest import run_patchwork
from tests.test_hf_conversion import assert_same_greedy_bytes, assert_same_logits, prompt_ids

# The reference's arguments of a small BLT built like the released ones.
MODEL_ARGS = {
    "vocab_size": 260, "dim": 512, "dim_global": 48, "dim_local_encoder": 32, "dim_local_decoder": 32,
    "n_layers_global": 2, "n_layers_local_encoder": 1, "n_layers_local_decoder": 2,
    "n_heads_global": 4, "n_heads_local_encoder": 2, "n_heads_local_decoder": 2,
    "patch_in_forward": False, "patch_size": 4.5, "patching_mode": "entropy", "use_local_encoder_transformer": True,
    "cross_attn_encoder": True, "cross_attn_decoder": True, "cross_attn_k": 2, "cross_attn_nheads": 2,
    "cross_attn_all_layers_decoder": True, "cross_attn_all_layers_encoder": False, "cross_attn_init_by_pooling": True,
    "encoder_hash_byte_group_size": [3, 4, 5], "encoder_hash_byte_group_vocab": 61,
    "encoder_hash_byte_group_nb_functions": 2, "local_attention_window_len": 24, "rope_theta": 100000.0,
    "norm_eps": 1e-6, "multiple_of": 8, "ffn_dim_multiplier": 1.0, "max_encoder_seq_length": 24576,
    "seed": 777, "recompute_attn": False,
}
ENTROPY_ARGS = {"dim": 32, "n_layers": 2, "n_heads": 2, "max_seqlen": 8192, "ffn_dim_multiplier": 1.0,
                "vocab_size": 260}

# Reference name part <- Hugging Face name part (transformers' conversion script, read backwards).
PARTS = {".self_attn.": ".attention.", ".mlp.": ".feed_forward.", ".input_layernorm.": ".attention_norm.",
         ".post_attention_layernorm.": ".ffn_norm.", ".embed_tokens.": ".tok_embeddings.",
         ".q_norm.": ".cross_attn_norm_q.", ".k_norm.": ".cross_attn_norm_kv.", ".gate_proj.": ".w1.",
         ".down_proj.": ".w2.", ".up_proj.": ".w3.", ".q_proj.": ".wq.", ".k_proj.": ".wk.", ".v_proj.": ".wv.",
         ".o_proj.": ".wo.", ".lm_head.": ".output."}


def reference_name(hf_name: str) -> str:
    name = "." + hf_name.removeprefix("model.").removeprefix("patcher.")
    for hf_part, reference_part in PARTS.items():
        name = name.replace(hf_part, reference_part)
    return name[1:]


def hf_model_with_reference_semantics(threshold: float | None = None) -> transformers.BltForCausalLM:
    """The transformers BLT that the reference computes from MODEL_ARGS and ENTROPY_ARGS."""
    def stack(width, layers, heads, ffn, theta, eps=1e-6):
        return dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=ffn,
                    rms_norm_eps=eps, rope_parameters={"rope_type": "default", "rope_theta": theta})

    torch.manual_seed(3)
    config = transformers.BltConfig(
        vocab_size=260, patching_threshold=threshold or 5.0, local_attention_window_len=24, cross_attn_k=2,
        encoder_hash_byte_group_size=[3, 4, 5], encoder_hash_byte_group_vocab=61,
        encoder_hash_byte_group_nb_functions=2,
        # The reference's entropy model: multiple_of 256, rotary base 10000, a 512-byte window, eps 1e-5.
        patcher_config={**stack(32, 2, 2, 256, 10000.0, 1e-5), "sliding_window": 512},
        encoder_config={**stack(32, 1, 2, 88, 100000.0), "hidden_size_global": 48},  # 88: int(2 * 128 / 3) -> 8s
        decoder_config={**stack(32, 2, 2, 88, 100000.0), "hidden_size_global": 48, "cross_attn_all_layers": True},
        global_config=stack(48, 2, 4, 128, 100000.0),
    )
    return transformers.BltForCausalLM(config).eval()


def write_original_layout(model: transformers.BltForCausalLM, path, threshold: float, **patcher) -> None:
    """The model's weights and arguments in the original release's files."""
    main, entropy = {}, {}
    for name, tensor in model.state_dict().items():
        if name.startswith("model.patcher."):
            entropy[reference_name(name)] = tensor.clone()
        elif name == "lm_head.weight":
            main["local_decoder.output.weight"] = tensor.clone()
        elif name == "model.encoder_hash_tok_embedding.weight":
            for i, table in enumerate(tensor.split(61)):  # one table per (function, n-gram size)
                main[f"encoder_hash_tok_embedding.{i}.weight"] = table.clone()
        else:
            main[reference_name(name)] = tensor.clone()
    (path / "entropy_model").mkdir(parents=True)
    patcher_args = {"patching_mode": "entropy", "threshold": threshold, "realtime_patching": True, **patcher}
    (path / "params.json").write_text(json.dumps({
        "name": "blt_small", "model": MODEL_ARGS, "entropy_model": None,
        "data": {"patcher_args": patcher_args}, "distributed": {"model_dtype": "bf16"},
    }))
    torch.save({"model": main}, path / "consolidated.pth")
    (path / "entropy_model" / "params.json").write_text(json.dumps({
        "entropy_model": ENTROPY_ARGS, "data": {"patcher_args": patcher_args},
    }))
    torch.save({"model": entropy}, path / "entropy_model" / "consolidated.pth")


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    model = hf_model_with_reference_semantics()
    with torch.no_grad():
        entropies, _, _ = model.model.patcher(prompt_ids(9, 200), patch_size=4, threshold=1.0)
    threshold = float(entropies.median())  # inside the random patcher's range: patches of mixed lengths
    model.config.patching_threshold = threshold
    path = tmp_path_factory.mktemp("original") / "blt-small"
    write_original_layout(model, path, threshold)
    return model, path


def test_the_original_layout_loads_to_the_model_transformers_computes(original):
    hf_model, path = original
    engine = load_original(path)
    assert engine.config.local_encoder.window == 24 and engine.config.entropy_model.window == 512
    assert engine.config.global_model.rope_theta == 100000.0 and engine.config.entropy_model.rope_theta == 10000.0
    assert engine.config.local_decoder.ffn_dim == 88 and engine.config.entropy_model.ffn_dim == 256
    ids = prompt_ids(11, 90)
    starts = assert_same_logits(hf_model, engine, ids)
    assert 5 < int(starts.sum()) < 80  # patches of mixed lengths
    assert_same_greedy_bytes(hf_model, engine, ids[:, :40], 25)


def test_the_converter_reads_the_original_layout(original, tmp_path):
    _, path = original
    result = run_patchwork("hf", "import", str(path), str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    converted, direct = load(tmp_path / "out"), load_original(path)
    assert converted.config == direct.config
    for name, tensor in direct.model.state_dict().items():
        assert torch.equal(converted.model.state_dict()[name], tensor), name


def test_the_patchers_own_settings_are_read(tmp_path):
    model = hf_model_with_reference_semantics()
    write_original_layout(model, tmp_path, 0.3, monotonicity=True, max_patch_length=6)
    patching = load_original(tmp_path).config.patching
    assert (patching.mode, patching.threshold, patching.max_patch_length) == ("monotonic", 0.3, 6)


class NotATensor:
    pass


def test_pytorch_files_are_read_as_tensors_only(original, tmp_path):
    import shutil

    _, path = original
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    state = torch.load(copy / "consolidated.pth", weights_only=True)
    torch.save({**state, "extra": NotATensor()}, copy / "consolidated.pth")
    with pytest.raises(ConversionError, match="holds objects other than tensors, which are never unpickled"):
        load_original(copy)


@pytest.mark.parametrize("change, message", [
    ({"cross_attn_init_by_pooling": False}, "cross_attn_init_by_pooling False is not supported"),
    ({"encoder_hash_byte_group_size": None}, "without hash n-gram embeddings"),
    ({"use_local_encoder_transformer": False}, "the local encoder's byte embeddings must have its width"),
    ({"cross_attn_all_layers_encoder": True}, "cross_attn_all_layers_encoder True is not supported"),
])
def test_other_architectures_of_the_reference_are_refused(tmp_path, change, message):
    write_original_layout(hf_model_with_reference_semantics(), tmp_path, 5.0)
    params = json.loads((tmp_path / "params.json").read_text())
    params["model"].update(change)
    (tmp_path / "params.json").write_text(json.dumps(params))
    with pytest.raises(ConversionError, match=re.escape(str(tmp_path / "params.json")) + ".*" + re.escape(message)):
        load_original(tmp_path)


def test_a_missing_tensor_is_named_by_its_reference_name(original, tmp_path):
    import shutil

    _, path = original
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    state = torch.load(copy / "entropy_model" / "consolidated.pth", weights_only=True)
    del state["model"]["layers.1.feed_forward.w3.weight"]
    torch.save(state, copy / "entropy_model" / "consolidated.pth")
    result = run_patchwork("hf", "import", str(copy), str(tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "entropy_model/consolidated.pth: tensor layers.1.feed_forward.w3.weight is missing" in result.stderr
