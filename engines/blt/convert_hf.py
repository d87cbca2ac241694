"""Hugging Face-format BLT checkpoints (``BltForCausalLM``: config.json plus
safetensors, one file or shards) -> Patchwork BLT models and checkpoints.

    patchwork hf import SOURCE_DIR OUT_DIR

(SOURCE_DIR may also hold the original release's layout, read by
``engines.blt.original``.)

A checkpoint loads only when Patchwork computes exactly what transformers
computes from it. A config.json is read as transformers reads it: a key it
omits takes transformers' default (``HF_DEFAULTS``: 512-byte attention windows
for the local models and the patcher, rotary base 10000 for the patcher and
500000 for the other stacks, and so on), legacy ``rope_theta`` and
``rope_scaling`` keys count like ``rope_parameters``, and keys transformers
ignores are ignored. What transformers computes differently from the model
Patchwork runs, or what the engine does not implement, is refused with one
sentence:

- ``patch_in_forward: false``, a ``patching_mode`` other than entropy, or
  ``patch_size: null`` (transformers then patches differently or not at all);
- ``max_patch_length``: transformers drops the empty patch that marks "the
  next byte opens a patch", so its last byte reads the previous patch;
- rotary scaling of any type but ``default``, or partial rotary embeddings;
- encoder cross-attention in every layer, grouped-query cross-attention,
  activations other than SiLU, sub-configs that disagree with the top level
  (``cross_attn_k``, ``vocab_size``).

Bad input never ends in a traceback: the CLI prints one line naming the file
(for a tensor, the shard that holds it, by its Hugging Face name) and exits 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file

from patchwork.engines.blt.config import VOCAB_SIZE, BltConfig, HashEmbeddingConfig, PatchingConfig
from patchwork.engines.blt.engine import BltEngine, build_engine
from patchwork.engines.blt.model import BltModel
from patchwork.engines.checkpoint import TrainingRecord, save_checkpoint, validation_summary
from patchwork.engines.layers import TransformerConfig

CONFIG_FILE = "config.json"

# transformers' defaults (BltConfig and its sub-configs) for every key of a
# config.json that changes what the model computes; tests compare them with
# the installed transformers. A null intermediate_size means int(8 * hidden / 3).
HF_DEFAULTS: dict = {
    "vocab_size": 260,
    "patch_in_forward": True,
    "patch_size": 4,
    "patching_mode": "entropy",
    "patching_threshold": 1.335442066192627,
    "max_patch_length": None,
    "local_attention_window_len": 512,
    "cross_attn_k": 2,
    "encoder_hash_byte_group_size": [3, 4, 5, 6, 7, 8],
    "encoder_hash_byte_group_vocab": 500002,
    "encoder_hash_byte_group_nb_functions": 1,
}
_STACK = {"num_key_value_heads": None, "rms_norm_eps": 1e-5, "hidden_act": "silu"}
HF_SECTION_DEFAULTS: dict[str, dict] = {
    "patcher_config": {**_STACK, "vocab_size": 260, "hidden_size": 768, "num_hidden_layers": 14,
                       "num_attention_heads": 12, "intermediate_size": 2048, "sliding_window": 512,
                       "rope_theta": 10000.0},
    "encoder_config": {**_STACK, "vocab_size": 260, "hidden_size": 1024, "num_hidden_layers": 1,
                       "num_attention_heads": 16, "intermediate_size": None, "cross_attn_all_layers": False,
                       "cross_attn_k": 2, "hidden_size_global": 2048, "rope_theta": 500000.0},
    "decoder_config": {**_STACK, "vocab_size": 260, "hidden_size": 1024, "num_hidden_layers": 9,
                       "num_attention_heads": 16, "intermediate_size": 2816, "cross_attn_all_layers": True,
                       "cross_attn_k": 2, "hidden_size_global": 2048, "rope_theta": 500000.0},
    "global_config": {**_STACK, "hidden_size": 2048, "num_hidden_layers": 25, "num_attention_heads": 16,
                      "intermediate_size": 5632, "rope_theta": 500000.0},
}

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
# Patchwork prefix -> Hugging Face prefix, to name a tensor that is missing.
_HF_NAMES = [
    ("entropy_model.stack.layers.", "model.patcher.layers."),
    ("entropy_model.", "model.patcher."),
    ("local_encoder.hash_embeddings.", "model.encoder_hash_tok_embedding."),
    ("local_encoder.stack.layers.", "model.local_encoder.layers."),
    ("local_encoder.cross_attn.", "model.local_encoder.cross_attn_layers.0."),
    ("local_encoder.", "model.local_encoder."),
    ("global_model.stack.layers.", "model.global_transformer.layers."),
    ("global_model.", "model.global_transformer."),
    ("local_decoder.stack.layers.", "model.local_decoder.layers."),
    ("local_decoder.lm_head.", "lm_head."),
    ("local_decoder.", "model.local_decoder."),
]


class ConversionError(Exception):
    """A checkpoint this engine cannot load exactly, with the reason in one line."""


def _rope_theta(part: dict, name: str) -> float:
    """The rotary base of a sub-config, read as transformers reads it: the
    legacy ``rope_scaling`` overrides ``rope_parameters``, which overrides the
    legacy ``rope_theta``."""
    parameters, scaling = part.get("rope_parameters") or {}, part.get("rope_scaling") or {}
    kind = scaling.get("rope_type") or scaling.get("type") or parameters.get("rope_type") or "default"
    if kind != "default":
        raise ConversionError(f"{name}: rotary scaling {kind!r} is not supported (only 'default')")
    if {**parameters, **scaling}.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConversionError(f"{name}: partial rotary embeddings are not supported")
    theta = scaling.get("rope_theta", parameters.get("rope_theta", part["rope_theta"]))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise ConversionError(f"{name}: rope_theta must be a positive number, not {theta!r}")
    return float(theta)


def _section(hf: dict, name: str) -> dict:
    """A sub-config with transformers' defaults for what it omits."""
    given = hf.get(name)
    if given is not None and not isinstance(given, dict):
        raise ConversionError(f"{name} must be an object, not {type(given).__name__}")
    return {**HF_SECTION_DEFAULTS[name], **(given or {})}


def _positive(value, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConversionError(f"{key} must be a positive integer, not {value!r}")
    return value


def _stack(part: dict, name: str, window: int | None) -> TransformerConfig:
    if name != "patcher_config" and part["hidden_act"] != "silu":  # transformers' patcher always uses SiLU
        raise ConversionError(f"{name}: activation {part['hidden_act']!r} is not supported (only 'silu')")
    hidden = _positive(part["hidden_size"], f"{name}.hidden_size")
    heads = _positive(part["num_attention_heads"], f"{name}.num_attention_heads")
    if hidden % heads:
        raise ConversionError(f"{name}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    if window is not None:
        _positive(window, f"{name} attention window")
    return TransformerConfig(
        dim=hidden,
        n_layers=_positive(part["num_hidden_layers"], f"{name}.num_hidden_layers"),
        n_heads=heads,
        n_kv_heads=part["num_key_value_heads"] or heads,
        ffn_dim=part["intermediate_size"] or int(8 * hidden / 3),
        norm_eps=part["rms_norm_eps"],
        rope_theta=_rope_theta(part, name),
        window=window,
    )


def config_from_hf(hf: dict) -> BltConfig:
    """A ``BltConfig`` from a Hugging Face BLT config.json (as a dict), read
    with transformers' defaults; raises ConversionError for what is not matched."""
    if not isinstance(hf, dict):
        raise ConversionError("the config is not a JSON object")
    if hf.get("model_type") != "blt":
        raise ConversionError(f"model_type is {hf.get('model_type')!r}, expected 'blt'")
    top = {**HF_DEFAULTS, **hf}  # an explicit null stays null, as in transformers
    top["encoder_hash_byte_group_size"] = top["encoder_hash_byte_group_size"] or HF_DEFAULTS[
        "encoder_hash_byte_group_size"]
    patcher, encoder, decoder, global_ = (_section(hf, name) for name in HF_SECTION_DEFAULTS)
    for part, name in ((top, "config"), (patcher, "patcher_config"), (encoder, "encoder_config"),
                       (decoder, "decoder_config")):
        if part["vocab_size"] != VOCAB_SIZE:
            raise ConversionError(f"{name}: vocab_size {part['vocab_size']} != {VOCAB_SIZE} (256 bytes, 4 specials)")
    if not top["patch_in_forward"]:
        raise ConversionError("patch_in_forward is false: transformers then patches without the entropy model "
                              "(every byte a patch), which Patchwork does not reproduce")
    if top["patching_mode"] != "entropy":
        raise ConversionError(f"patching_mode {top['patching_mode']!r} is not supported (only 'entropy')")
    if top["patch_size"] is None:
        raise ConversionError("patch_size is null: transformers then makes every byte a patch and its last byte "
                              "reads the previous one, which Patchwork does not reproduce")
    if top["max_patch_length"] is not None:
        raise ConversionError(
            f"max_patch_length {top['max_patch_length']} is not supported: transformers drops the empty patch that "
            "marks 'the next byte opens a patch', so its last byte reads the previous patch"
        )
    cross_attn_k = _positive(top["cross_attn_k"], "cross_attn_k")
    for part, name in ((encoder, "encoder_config"), (decoder, "decoder_config")):
        if part["cross_attn_k"] != cross_attn_k:
            raise ConversionError(f"{name}.cross_attn_k {part['cross_attn_k']} != cross_attn_k {cross_attn_k}")
        if (part["num_key_value_heads"] or part["num_attention_heads"]) != part["num_attention_heads"]:
            raise ConversionError(f"{name}: grouped-query cross-attention is not supported")
    if encoder["cross_attn_all_layers"]:
        raise ConversionError("encoder cross-attention in every layer is not supported")
    functions = _positive(top["encoder_hash_byte_group_nb_functions"], "encoder_hash_byte_group_nb_functions")
    limit = HashEmbeddingConfig.model_fields["n_functions"].metadata[-1].le
    if functions > limit:
        raise ConversionError(f"encoder_hash_byte_group_nb_functions {functions} is out of range (at most {limit})")
    sizes = top["encoder_hash_byte_group_size"]
    if not isinstance(sizes, list) or not sizes:
        raise ConversionError(f"encoder_hash_byte_group_size must be a list of n-gram sizes, not {sizes!r}")
    for size in sizes:
        _positive(size, "encoder_hash_byte_group_size")
    threshold = top["patching_threshold"]
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
        raise ConversionError(f"patching_threshold must be a number, not {threshold!r}")
    window = top["local_attention_window_len"]
    try:
        return BltConfig(
            entropy_model=_stack(patcher, "patcher_config", patcher["sliding_window"]),
            patching=PatchingConfig(mode="entropy", threshold=float(threshold)),
            hash_embeddings=HashEmbeddingConfig(
                ngram_sizes=sizes,
                buckets=_positive(top["encoder_hash_byte_group_vocab"], "encoder_hash_byte_group_vocab"),
                n_functions=functions,
            ),
            # transformers applies the encoder's window (local_attention_window_len) to both local models.
            local_encoder=_stack(encoder, "encoder_config", window),
            local_decoder=_stack(decoder, "decoder_config", window),
            global_model=_stack(global_, "global_config", None),
            cross_attn_k=cross_attn_k,
            decoder_cross_attn_all_layers=bool(decoder["cross_attn_all_layers"]),
        )
    except (ValidationError, TypeError, ValueError) as e:
        message = validation_summary(e) if isinstance(e, ValidationError) else str(e)
        raise ConversionError(f"unsupported settings: {message}") from None


def read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / CONFIG_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


@dataclass
class SourceWeights:
    """Tensors by their names in the source checkpoint, and the file that holds each."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    # Where the checkpoint says each tensor is (a sharded checkpoint's index), or the single file.
    listed: dict[str, str] = field(default_factory=dict)
    default_file: str = ""

    def add(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            if name in self.tensors:
                raise ConversionError(f"{path}: tensor {name} is also in {self.files[name]}")
            self.tensors[name], self.files[name] = tensor, str(path)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except FileNotFoundError:
        raise ConversionError(f"{path}: no such file") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise ConversionError(f"{path}: not a readable safetensors file ({e})") from None


def read_hf_weights(hf_dir: Path) -> SourceWeights:
    """All tensors of a single-file or sharded safetensors checkpoint."""
    weights = SourceWeights()
    single = hf_dir / "model.safetensors"
    if single.is_file():
        weights.add(single, _read_safetensors(single))
        weights.default_file = str(single)
        return weights
    index = hf_dir / "model.safetensors.index.json"
    if not index.is_file():
        raise ConversionError(f"{hf_dir}: neither model.safetensors nor model.safetensors.index.json")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ConversionError(f"{index}: not a safetensors index (a JSON object with a weight_map): {e}") from None
    for shard in shards:
        weights.add(hf_dir / shard, _read_safetensors(hf_dir / shard))
    weights.listed = {name: str(hf_dir / shard) for name, shard in weight_map.items()}
    weights.default_file = str(index)
    return weights


def hf_name(name: str) -> str:
    """The Hugging Face name of a Patchwork parameter."""
    for prefix, replacement in _HF_NAMES:
        if name.startswith(prefix):
            return replacement + name[len(prefix):]
    return name


def weights_from_hf(tensors: dict[str, torch.Tensor], describe: Callable[[str], str]
                    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors renamed from Hugging Face names to Patchwork's, and each one's
    Hugging Face name; ``describe`` says where a tensor came from."""
    renamed, names = {}, {}
    for name, tensor in tensors.items():
        for pattern, replacement in _RENAMES:
            if re.match(pattern, name):
                target = re.sub(pattern, replacement, name)
                renamed[target], names[target] = tensor, name
                break
        else:
            raise ConversionError(f"{describe(name)} is not part of a BLT")
    return renamed, names


def check_weights(config: BltConfig, weights: dict[str, torch.Tensor], describe: Callable[[str], str],
                  describe_missing: Callable[[str], str], config_path: str) -> None:
    """Raises ConversionError naming the first tensor that is extra, missing or
    of the wrong shape for ``config``. ``describe`` says where a Patchwork
    parameter came from (file and source name), ``describe_missing`` where
    a missing one was expected."""
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in BltModel(config).state_dict().items()}
    for name, tensor in weights.items():
        if name not in expected:
            raise ConversionError(f"{describe(name)} is not part of the model {config_path} describes")
        if tuple(tensor.shape) != expected[name]:
            raise ConversionError(
                f"{describe(name)} has shape {list(tensor.shape)}; {config_path} needs {list(expected[name])}"
            )
        if not tensor.is_floating_point():
            raise ConversionError(f"{describe(name)} has dtype {tensor.dtype}; weights must be floating point")
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ConversionError(f"{describe_missing(missing[0])} is missing ({len(missing)} missing in all)")


def load_hf(hf_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32, **options) -> BltEngine:
    """An engine straight from a Hugging Face checkpoint directory; raises
    ConversionError (one line) for anything it cannot load exactly."""
    hf_dir = Path(hf_dir)
    config_path = hf_dir / CONFIG_FILE
    try:
        config = config_from_hf(read_hf_config(hf_dir))
    except ConversionError as e:
        raise ConversionError(e if str(e).startswith(str(config_path)) else f"{config_path}: {e}") from None
    source = read_hf_weights(hf_dir)
    weights, names = weights_from_hf(source.tensors, lambda name: f"{source.files[name]}: tensor {name}")
    check_weights(
        config, weights,
        describe=lambda name: f"{source.files[names[name]]}: tensor {names[name]}",
        describe_missing=lambda name: f"{source.listed.get(hf_name(name), source.default_file)}: tensor "
                                      f"{hf_name(name)}",
        config_path=str(config_path),
    )
    return build_engine(config, weights, device=torch.device(device), dtype=dtype, name=hf_dir.name, **options)


def load_published(directory: str | Path, **options) -> BltEngine:
    """An engine from either published layout: the original release's (an
    ``entropy_model`` directory beside the model's files, see
    ``engines.blt.original``) or Hugging Face's."""
    from patchwork.engines.blt.original import ENTROPY_DIR, load_original

    directory = Path(directory)
    return load_original(directory, **options) if (directory / ENTROPY_DIR).is_dir() else load_hf(directory, **options)


def convert(source_dir: str | Path, out: str | Path) -> Path:
    """Writes the Patchwork checkpoint of a published BLT checkpoint (either layout)."""
    source_dir = Path(source_dir)
    engine = load_published(source_dir)
    record = TrainingRecord(
        command=f"patchwork hf import {source_dir.name} {Path(out).name}",
        data={"source": f"published BLT checkpoint {source_dir.name}"},
        metrics={},
    )
    return save_checkpoint(out, engine.config, engine.model.state_dict(), record)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="patchwork hf import", description=__doc__.splitlines()[0])
    parser.add_argument("hf_dir", type=Path, help="directory of a Hugging Face (config.json and safetensors) or "
                        "original-release (params.json, consolidated.pth, entropy_model/) BLT checkpoint")
    parser.add_argument("out", type=Path, help="Patchwork checkpoint directory to write")
    args = parser.parse_args(argv)
    if not args.hf_dir.is_dir():
        print(f"error: {args.hf_dir}: not a directory", file=sys.stderr)
        return 2
    return run_conversion(lambda: convert(args.hf_dir, args.out), args.out, "checkpoint")


def run_conversion(write: Callable[[], Path], out: Path, what: str, errors: tuple = (ConversionError,)) -> int:
    """A conversion command's end: prints the directory ``write`` wrote, or one
    line naming the problem (exit code 2) for ``errors`` and OS errors."""
    try:
        path = write()
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename or out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"{what}: {path}")
    return 0


if __name__ == "__main__":
    # The imported module's main, so that errors raised in engines.blt.original
    # are the ConversionError it catches (not this __main__ copy's).
    from patchwork.engines.blt.convert_hf import main as imported_main

    sys.exit(imported_main())
