"""Hugging Face-format BLT checkpoints (``BltForCausalLM``: config.json plus
safetensors, one file or shards) -> Patchwork BLT models and checkpoints.

    python -m engines.blt.convert_hf HF_DIR OUT_DIR

The Hugging Face port and the reference code are the same model; the
settings in which they could differ are fields of ``BltConfig`` (attention
windows, rotary bases per stack, cross-attention in every decoder layer or
the first only, hash n-gram sizes and functions). What the engine does not
implement (encoder cross-attention in every layer, grouped-query
cross-attention, non-default rotary scaling, patching modes other than
entropy) is refused with a clear error rather than converted wrongly.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from engines.blt.config import VOCAB_SIZE, BltConfig, HashEmbeddingConfig, PatchingConfig
from engines.blt.engine import BltEngine, build_engine
from engines.checkpoint import TrainingRecord, save_checkpoint
from engines.layers import TransformerConfig

# Hugging Face parameter name prefix -> Patchwork prefix (first match wins).
_RENAMES = [
    (r"^model\.patcher\.layers\.", "entropy_model.stack.layers."),
    (r"^model\.patcher\.", "entropy_model."),
    (r"^model\.encoder_hash_tok_embedding\.", "local_encoder.hash_embeddings."),
    (r"^model\.local_encoder\.layers\.", "local_encoder.stack.layers."),
    (r"^model\.local_encoder\.cross_attn_layers\.0\.", "local_encoder.cross_attn."),
    (r"^model\.local_encoder\.", "local_encoder."),
    (r"^model\.global_transformer\.layers\.", "global_model.stack.layers."),
    (r"^model\.global_transformer\.", "global_model."),
    (r"^model\.local_decoder\.layers\.", "local_decoder.stack.layers."),
    (r"^model\.local_decoder\.", "local_decoder."),
    (r"^lm_head\.", "local_decoder.lm_head."),
]


class ConversionError(Exception):
    """A Hugging Face checkpoint this engine cannot represent exactly, with the reason."""


def _rope_theta(part: dict, name: str) -> float:
    rope = part.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ConversionError(f"{name}: rotary scaling {rope.get('rope_type')!r} is not supported")
    return float(rope.get("rope_theta", part.get("rope_theta", 10000.0)))


def _stack(part: dict, name: str, window: int | None) -> TransformerConfig:
    if part.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{name}: activation {part['hidden_act']!r} is not supported")
    heads = part["num_attention_heads"]
    head_dim = part.get("head_dim") or part["hidden_size"] // heads
    if head_dim * heads != part["hidden_size"]:
        raise ConversionError(f"{name}: head_dim {head_dim} x {heads} heads != hidden_size {part['hidden_size']}")
    return TransformerConfig(
        dim=part["hidden_size"],
        n_layers=part["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=part.get("num_key_value_heads") or heads,
        ffn_dim=part.get("intermediate_size") or int(8 * part["hidden_size"] / 3),
        norm_eps=part.get("rms_norm_eps", 1e-5),
        rope_theta=_rope_theta(part, name),
        window=window,
    )


def config_from_hf(hf: dict) -> BltConfig:
    """A ``BltConfig`` from a Hugging Face BLT config.json (as a dict)."""
    if hf.get("model_type") != "blt":
        raise ConversionError(f"model_type is {hf.get('model_type')!r}, expected 'blt'")
    if hf.get("vocab_size", VOCAB_SIZE) != VOCAB_SIZE:
        raise ConversionError(f"vocab_size {hf['vocab_size']} != {VOCAB_SIZE}")
    if hf.get("patching_mode", "entropy") != "entropy" or hf.get("patcher_config") is None:
        raise ConversionError("only entropy patching with the patcher's weights is supported")
    encoder, decoder = hf["encoder_config"], hf["decoder_config"]
    if encoder.get("cross_attn_all_layers"):
        raise ConversionError("encoder cross-attention in every layer is not supported")
    for part, name in ((encoder, "encoder_config"), (decoder, "decoder_config")):
        if (part.get("num_key_value_heads") or part["num_attention_heads"]) != part["num_attention_heads"]:
            raise ConversionError(f"{name}: grouped-query cross-attention is not supported")
    window = hf.get("local_attention_window_len")
    return BltConfig(
        entropy_model=_stack(hf["patcher_config"], "patcher_config", hf["patcher_config"].get("sliding_window")),
        patching=PatchingConfig(
            mode="entropy", threshold=hf["patching_threshold"], max_patch_length=hf.get("max_patch_length")
        ),
        hash_embeddings=HashEmbeddingConfig(
            ngram_sizes=hf.get("encoder_hash_byte_group_size") or [3, 4, 5, 6, 7, 8],
            buckets=hf["encoder_hash_byte_group_vocab"],
            n_functions=hf.get("encoder_hash_byte_group_nb_functions", 1),
        ),
        # The Hugging Face port applies the encoder's sliding window to both local models.
        local_encoder=_stack(encoder, "encoder_config", window),
        local_decoder=_stack(decoder, "decoder_config", window),
        global_model=_stack(hf["global_config"], "global_config", None),
        cross_attn_k=hf["cross_attn_k"],
        decoder_cross_attn_all_layers=decoder.get("cross_attn_all_layers", True),
    )


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a single-file or sharded safetensors checkpoint."""
    single = hf_dir / "model.safetensors"
    if single.is_file():
        return load_file(single)
    index = hf_dir / "model.safetensors.index.json"
    if not index.is_file():
        raise ConversionError(f"{hf_dir}: neither model.safetensors nor model.safetensors.index.json")
    weights: dict[str, torch.Tensor] = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        weights.update(load_file(hf_dir / shard))
    return weights


def weights_from_hf(hf_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed = {}
    for name, tensor in hf_weights.items():
        for pattern, replacement in _RENAMES:
            if re.match(pattern, name):
                renamed[re.sub(pattern, replacement, name)] = tensor
                break
        else:
            raise ConversionError(f"unexpected parameter {name!r}")
    return renamed


def load_hf(hf_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32, **options) -> BltEngine:
    """An engine straight from a Hugging Face checkpoint directory."""
    hf_dir = Path(hf_dir)
    config = config_from_hf(json.loads((hf_dir / "config.json").read_text()))
    weights = weights_from_hf(read_hf_weights(hf_dir))
    return build_engine(config, weights, device=torch.device(device), dtype=dtype, name=hf_dir.name, **options)


def convert(hf_dir: str | Path, out: str | Path) -> Path:
    """Writes the Patchwork checkpoint of a Hugging Face BLT checkpoint."""
    hf_dir = Path(hf_dir)
    engine = load_hf(hf_dir)
    record = TrainingRecord(
        command=f"python -m engines.blt.convert_hf {hf_dir.name} {Path(out).name}",
        data={"source": f"Hugging Face BLT checkpoint {hf_dir.name}"},
        metrics={},
    )
    return save_checkpoint(out, engine.config, engine.model.state_dict(), record)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.blt.convert_hf", description=__doc__.splitlines()[0])
    parser.add_argument("hf_dir", type=Path, help="directory with config.json and safetensors weights")
    parser.add_argument("out", type=Path, help="Patchwork checkpoint directory to write")
    args = parser.parse_args(argv)
    try:
        path = convert(args.hf_dir, args.out)
    except (ConversionError, OSError, KeyError) as e:
        print(f"error: {args.hf_dir}: {e}", file=sys.stderr)
        return 2
    print(f"checkpoint: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
