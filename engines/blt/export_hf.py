"""Writes a Patchwork BLT checkpoint in Hugging Face's layout (``BltForCausalLM``:
config.json and model.safetensors), the inverse of ``engines.blt.convert_hf``.

    patchwork hf export CHECKPOINT OUT

The exported directory loads with ``transformers.BltForCausalLM.from_pretrained``
and computes what Patchwork computes; ``benchmarks.blt`` runs transformers'
``generate`` on it as a peer. A checkpoint whose settings transformers cannot
express (another patching mode, ``max_patch_length``, different windows in the
two local models, anything ``config_from_hf`` would not read back to the same
config) is refused with the reason, rather than written to compute something
else.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from patchwork.engines.blt.config import BltConfig
from patchwork.engines.blt.convert_hf import CONFIG_FILE, ConversionError, config_from_hf, hf_name, run_conversion
from patchwork.engines.checkpoint import CheckpointError
from patchwork.engines.layers import TransformerConfig
from patchwork.engines.loading import load

WEIGHTS_FILE = "model.safetensors"


def _stack(stack: TransformerConfig) -> dict:
    return {
        "hidden_size": stack.dim,
        "num_hidden_layers": stack.n_layers,
        "num_attention_heads": stack.n_heads,
        "num_key_value_heads": stack.kv_heads,
        "intermediate_size": stack.hidden_dim,
        "rms_norm_eps": stack.norm_eps,
        "hidden_act": "silu",
        "rope_parameters": {"rope_type": "default", "rope_theta": stack.rope_theta},
    }


def _explicit(config: BltConfig) -> BltConfig:
    """``config`` with the defaults a stack derives (key/value heads, feed-forward width) written out."""
    stacks = ("entropy_model", "local_encoder", "local_decoder", "global_model")
    return config.model_copy(update={
        name: getattr(config, name).model_copy(update={"n_kv_heads": getattr(config, name).kv_heads,
                                                       "ffn_dim": getattr(config, name).hidden_dim})
        for name in stacks
    })


def config_to_hf(config: BltConfig) -> dict:
    """The Hugging Face config.json (as a dict) of ``config``; raises
    ConversionError for settings transformers cannot express."""
    if config.patching.mode != "entropy":
        raise ConversionError(f"patching mode {config.patching.mode!r}: transformers patches by entropy only")
    if config.patching.max_patch_length is not None:
        raise ConversionError("max_patch_length: transformers computes it differently (see engines.blt.convert_hf)")
    if config.local_encoder.window != config.local_decoder.window:
        raise ConversionError(f"local windows {config.local_encoder.window} (encoder) and "
                              f"{config.local_decoder.window} (decoder): transformers uses one for both")
    global_dim = config.global_model.dim
    hf = {
        "model_type": "blt",
        "architectures": ["BltForCausalLM"],
        "vocab_size": config.vocab_size,
        "patch_in_forward": True,
        "patching_mode": "entropy",
        "patching_threshold": config.patching.threshold,
        "patch_size": config.patching.patch_size,
        "max_patch_length": None,
        "local_attention_window_len": config.local_encoder.window,
        "cross_attn_k": config.cross_attn_k,
        "encoder_hash_byte_group_size": list(config.hash_embeddings.ngram_sizes),
        "encoder_hash_byte_group_vocab": config.hash_embeddings.buckets,
        "encoder_hash_byte_group_nb_functions": config.hash_embeddings.n_functions,
        "patcher_config": {**_stack(config.entropy_model), "vocab_size": config.vocab_size,
                           "sliding_window": config.entropy_model.window},
        "encoder_config": {**_stack(config.local_encoder), "vocab_size": config.vocab_size,
                           "cross_attn_all_layers": False, "cross_attn_k": config.cross_attn_k,
                           "hidden_size_global": global_dim},
        "decoder_config": {**_stack(config.local_decoder), "vocab_size": config.vocab_size,
                           "cross_attn_all_layers": config.decoder_cross_attn_all_layers,
                           "cross_attn_k": config.cross_attn_k, "hidden_size_global": global_dim},
        "global_config": _stack(config.global_model),
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    }
    if _explicit(config_from_hf(hf)) != _explicit(config):  # reading back differently computes something else
        raise ConversionError("the config does not read back unchanged from Hugging Face's layout")
    return hf


def export(checkpoint: str | Path, out: str | Path) -> Path:
    """Writes the Hugging Face layout of the BLT checkpoint at ``checkpoint`` to ``out``."""
    engine = load(checkpoint)
    engine.close()  # only its config and weights are needed
    if not isinstance(engine.config, BltConfig):
        raise ConversionError(f"{checkpoint}: a {engine.config.family} checkpoint; only BLT has a Hugging Face layout")
    hf = config_to_hf(engine.config)
    # Contiguous copies: fused projections share storage with the parameters, which safetensors refuses.
    tensors = {hf_name(name): tensor.detach().contiguous().clone() for name, tensor in engine.model.state_dict().items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n")
    save_file(tensors, out / WEIGHTS_FILE, metadata={"format": "pt"})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="patchwork hf export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="Patchwork BLT checkpoint directory")
    parser.add_argument("out", type=Path, help="directory to write config.json and model.safetensors to")
    args = parser.parse_args(argv)
    return run_conversion(lambda: export(args.checkpoint, args.out), args.out, "Hugging Face checkpoint",
                          errors=(ConversionError, CheckpointError))


if __name__ == "__main__":
    sys.exit(main())
