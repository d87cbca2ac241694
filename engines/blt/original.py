"""BLT checkpoints in the layout of the original release (the reference code,
facebookresearch/blt; the files of facebook/blt-1b and facebook/blt-7b):

    DIR/params.json                     training arguments: "model" holds the BLT's arguments,
                                        "data.patcher_args" the patcher's
    DIR/consolidated.pth                {"model": state dict}, the reference's parameter names
    DIR/entropy_model/params.json       "entropy_model" holds the entropy model's arguments
    DIR/entropy_model/consolidated.pth  {"model": state dict}

The BLT's arguments may also come as ``config.json`` holding ``{"args": ...}``
beside ``model.safetensors`` (what the reference's hub export writes); the
patcher's arguments then come from ``train_args.json`` or
``entropy_model/params.json``. PyTorch files are read with
``torch.load(weights_only=True)``: tensors only, never arbitrary objects.

The arguments are read as the reference code reads them: its defaults for what
params.json omits, its feed-forward widths (``multiple_of`` and
``ffn_dim_multiplier``), one rotary base for the local and global stacks, and
for the entropy model what the reference's loader fixes (a 512-byte window,
rotary base 10000, ``multiple_of`` 256). Patching follows the patcher's
arguments, including ``max_patch_length`` and ``monotonicity``. Architectures
of the reference that are not the released one (no cross-attention pooling,
byte n-gram tables, a token projection in the local encoder, ...) are refused
with one sentence. The tensor names map to the Hugging Face port's as
transformers' conversion script maps them.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch

from patchwork.engines.blt.config import PatchingConfig
from patchwork.engines.blt.convert_hf import (
    ConversionError,
    check_weights,
    config_from_hf,
    hf_name,
    read_hf_weights,
    weights_from_hf,
)
from patchwork.engines.blt.engine import BltEngine, build_engine

PARAMS_FILE, WEIGHTS_FILE, ENTROPY_DIR = "params.json", "consolidated.pth", "entropy_model"

# The reference's defaults (ByteLatentTransformerArgs) for what the model's arguments omit.
MODEL_DEFAULTS = {
    "vocab_size": -1, "dim_global": 512, "dim_local_decoder": 512, "dim_local_encoder": 512,
    "n_layers_global": 8, "n_layers_local_decoder": 8, "n_layers_local_encoder": 8,
    "n_heads_global": 8, "n_heads_local_decoder": 8, "n_heads_local_encoder": 8,
    "n_kv_heads": None, "n_kv_heads_global": None, "head_dim": None, "dim_token": None,
    "use_local_encoder_transformer": False, "cross_attn_encoder": False, "cross_attn_decoder": False,
    "cross_attn_k": None, "cross_attn_nheads": None, "cross_attn_all_layers_encoder": False,
    "cross_attn_all_layers_decoder": False, "cross_attn_init_by_pooling": False,
    "cross_attn_window_encoder": None, "cross_attn_window_decoder": None,
    "encoder_hash_byte_group_size": None, "encoder_hash_byte_group_vocab": 30000,
    "encoder_hash_byte_group_nb_functions": 3, "encoder_enable_byte_ngrams": False,
    "encoder_ngram_to_size_str": None, "local_attention_window_len": None,
    "norm_eps": 1e-5, "rope_theta": 10000.0, "multiple_of": 256, "ffn_dim_multiplier": 1.0,
    "use_rope": True, "non_linearity": "swiglu", "norm_type": "rmsnorm", "pm_size": 0, "weight_tying": False,
    "share_encoder_decoder_emb": True, "patch_size": None,
    "patching_mode": None, "patching_threshold": None, "patching_threshold_add": None, "monotonicity": False,
    "max_patch_length": None,
}
# The reference's PatcherArgs defaults.
PATCHER_DEFAULTS = {"patching_mode": "entropy", "threshold": 1.335442066192627, "threshold_add": None,
                    "max_patch_length": None, "monotonicity": False}
# What the reference's entropy-model loader does not read from params.json.
ENTROPY_FIXED = {"window": 512, "rope_theta": 10000.0, "multiple_of": 256, "norm_eps": 1e-5}

# Reference name part -> Hugging Face name part (transformers' conversion script).
_PARTS = [
    (".attention.", ".self_attn."), (".feed_forward.", ".mlp."), (".attention_norm.", ".input_layernorm."),
    (".ffn_norm.", ".post_attention_layernorm."), (".tok_embeddings.", ".embed_tokens."),
    (".cross_attn_norm_q.", ".q_norm."), (".cross_attn_norm_kv.", ".k_norm."), (".w1.", ".gate_proj."),
    (".w2.", ".down_proj."), (".w3.", ".up_proj."), (".wq.", ".q_proj."), (".wk.", ".k_proj."),
    (".wv.", ".v_proj."), (".wo.", ".o_proj."), (".output.", ".lm_head."),
]
_HASH_TABLE = re.compile(r"^encoder_hash_tok_embedding\.(\d+)\.weight$")


def _reference_to_hf(name: str, entropy: bool) -> str:
    name = ("patcher." if entropy else "") + name
    for old, new in _PARTS:
        name = ("." + name).replace(old, new)[1:]
    if name == "local_decoder.lm_head.weight":
        return "lm_head.weight"
    return "model." + name


def _hf_to_reference(name: str) -> str:
    """The reference name (and which file) of a Hugging Face tensor name."""
    if name == "lm_head.weight":
        return f"{WEIGHTS_FILE}: tensor local_decoder.output.weight"
    name = name.removeprefix("model.")
    if name == "encoder_hash_tok_embedding.weight":
        return f"{WEIGHTS_FILE}: tensor encoder_hash_tok_embedding.0.weight"
    where = WEIGHTS_FILE
    if name.startswith("patcher."):
        name, where = name.removeprefix("patcher."), f"{ENTROPY_DIR}/{WEIGHTS_FILE}"
    for old, new in _PARTS:
        name = ("." + name).replace(new, old)[1:]
    return f"{where}: tensor {name}"


def _read_json(path: Path) -> dict:
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(document, dict):
        raise ConversionError(f"{path}: not a JSON object")
    return document


def _read_pth(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a PyTorch file, reading tensors only (no arbitrary unpickling)."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise ConversionError(f"{path}: no such file") from None
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(f"{path}: holds objects other than tensors, which are never unpickled "
                              f"({first})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ConversionError(f"{path}: not a readable PyTorch file ({type(e).__name__})") from None
    state = loaded.get("model", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ConversionError(f"{path}: expected a state dict (of tensors) under 'model'")
    return state


def _ffn_width(dim: int, multiple_of: int, multiplier: float | None) -> int:
    """The reference's SwiGLU width for a block of width ``dim``."""
    hidden = int(2 * (4 * dim) / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _model_arguments(model_dir: Path) -> tuple[dict, dict, str]:
    """The BLT's arguments, the patcher's arguments (or {}), and the file they came from."""
    params = model_dir / PARAMS_FILE
    if params.is_file():
        document = _read_json(params)
        if not isinstance(document.get("model"), dict):
            raise ConversionError(f"{params}: no 'model' object (the BLT's arguments)")
        return document["model"], (document.get("data") or {}).get("patcher_args") or {}, str(params)
    config = model_dir / "config.json"
    if config.is_file():
        document = _read_json(config)
        if not isinstance(document.get("args"), dict):
            raise ConversionError(f"{config}: no 'args' object (the BLT's arguments)")
        train_args = model_dir / "train_args.json"
        patcher = {}
        if train_args.is_file():
            patcher = (_read_json(train_args).get("data") or {}).get("patcher_args") or {}
        return document["args"], patcher, str(config)
    raise ConversionError(f"{model_dir}: neither {PARAMS_FILE} nor config.json with the BLT's arguments")


def _refuse_other_architectures(args: dict) -> None:
    required = {
        "cross_attn_encoder": True, "cross_attn_decoder": True, "cross_attn_init_by_pooling": True,
        "cross_attn_all_layers_encoder": False, "use_rope": True, "non_linearity": "swiglu",
        "norm_type": "rmsnorm", "pm_size": 0, "weight_tying": False, "encoder_enable_byte_ngrams": False,
        "encoder_ngram_to_size_str": None, "cross_attn_window_encoder": None, "cross_attn_window_decoder": None,
        "share_encoder_decoder_emb": True,
    }
    for key, value in required.items():
        if args[key] != value:
            raise ConversionError(f"{key} {args[key]!r} is not supported (the released BLT has {value!r})")
    if args["encoder_hash_byte_group_size"] is None:
        raise ConversionError("encoder_hash_byte_group_size is null: a BLT without hash n-gram embeddings "
                              "is not supported")
    token_width = args["dim_token"] if args["dim_token"] is not None else (
        args["dim_local_encoder"] if args["use_local_encoder_transformer"] else None)
    if token_width != args["dim_local_encoder"]:
        raise ConversionError("the local encoder's byte embeddings must have its width (dim_token null and "
                              "use_local_encoder_transformer true, as released)")
    for stack, heads in (("local_encoder", args["n_heads_local_encoder"]),
                         ("local_decoder", args["n_heads_local_decoder"])):
        if args["cross_attn_nheads"] not in (None, heads):
            raise ConversionError(f"cross_attn_nheads {args['cross_attn_nheads']} != n_heads of the {stack} "
                                  f"({heads}) is not supported")
    for key in ("dim_local_encoder", "dim_local_decoder", "dim_global"):
        heads = args[key.replace("dim_", "n_heads_")]
        if args["head_dim"] not in (None, args[key] // max(heads, 1)):
            raise ConversionError(f"head_dim {args['head_dim']} != {key} / heads is not supported")


def config_from_reference(args: dict, patcher: dict, entropy: dict):
    """A ``BltConfig`` from the reference's model, patcher and entropy-model arguments."""
    args = {**MODEL_DEFAULTS, **args}  # keys not listed are training-only (seeds, recompute, sharding)
    _refuse_other_architectures(args)
    patcher = {**PATCHER_DEFAULTS, **{key: value for key, value in patcher.items() if key in PATCHER_DEFAULTS}}
    if patcher["patching_mode"] != "entropy":
        raise ConversionError(f"patching_mode {patcher['patching_mode']!r} is not supported (only 'entropy')")
    if patcher["threshold_add"] is not None:
        raise ConversionError("threshold_add is not supported")

    def stack(width: int, layers: int, heads: int, kv_heads, theta: float, eps: float, ffn: int, window=None):
        return {"hidden_size": width, "num_hidden_layers": layers, "num_attention_heads": heads,
                "num_key_value_heads": kv_heads, "intermediate_size": ffn, "rms_norm_eps": eps,
                "rope_parameters": {"rope_type": "default", "rope_theta": theta}, "sliding_window": window}

    def ffn(width: int) -> int:
        return _ffn_width(width, args["multiple_of"], args["ffn_dim_multiplier"])

    theta, eps = args["rope_theta"], args["norm_eps"]
    for key in ("dim", "n_layers", "n_heads", "vocab_size"):
        if key not in entropy:
            raise ConversionError(f"the entropy model's arguments lack {key!r}")
    entropy_dim = entropy["dim"]
    hf = {
        "model_type": "blt",
        "vocab_size": args["vocab_size"],
        "patching_threshold": patcher["threshold"],
        "local_attention_window_len": args["local_attention_window_len"],
        "cross_attn_k": args["cross_attn_k"],
        "encoder_hash_byte_group_size": args["encoder_hash_byte_group_size"],
        "encoder_hash_byte_group_vocab": args["encoder_hash_byte_group_vocab"],
        "encoder_hash_byte_group_nb_functions": args["encoder_hash_byte_group_nb_functions"],
        "patcher_config": {
            **stack(entropy_dim, entropy["n_layers"], entropy["n_heads"], None,
                    ENTROPY_FIXED["rope_theta"], ENTROPY_FIXED["norm_eps"],
                    _ffn_width(entropy_dim, ENTROPY_FIXED["multiple_of"], entropy.get("ffn_dim_multiplier")),
                    ENTROPY_FIXED["window"]),
            "vocab_size": entropy["vocab_size"],
        },
        "encoder_config": {**stack(args["dim_local_encoder"], args["n_layers_local_encoder"],
                                   args["n_heads_local_encoder"], args["n_kv_heads"], theta, eps,
                                   ffn(args["dim_local_encoder"])),
                           "vocab_size": args["vocab_size"], "cross_attn_k": args["cross_attn_k"]},
        "decoder_config": {**stack(args["dim_local_decoder"], args["n_layers_local_decoder"],
                                   args["n_heads_local_decoder"], args["n_kv_heads"], theta, eps,
                                   ffn(args["dim_local_decoder"])),
                           "vocab_size": args["vocab_size"], "cross_attn_k": args["cross_attn_k"],
                           "cross_attn_all_layers": args["cross_attn_all_layers_decoder"]},
        "global_config": stack(args["dim_global"], args["n_layers_global"], args["n_heads_global"],
                               args["n_kv_heads_global"], theta, eps, ffn(args["dim_global"])),
    }
    config = config_from_hf(hf)
    mode = "monotonic" if patcher["monotonicity"] else "entropy"
    patching = PatchingConfig(mode=mode, threshold=patcher["threshold"], max_patch_length=patcher["max_patch_length"])
    return config.model_copy(update={"patching": patching})


def read_reference_weights(model_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Both models' tensors under Hugging Face names (the hash tables fused into
    one, as the port keeps them), and where each came from."""
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    pth = model_dir / WEIGHTS_FILE
    if pth.is_file():
        main = _read_pth(pth)
    else:
        hub = read_hf_weights(model_dir)
        main, pth = hub.tensors, model_dir / "model.safetensors"
    entropy_pth = model_dir / ENTROPY_DIR / WEIGHTS_FILE
    tables = sorted(((int(m.group(1)), name) for name in main if (m := _HASH_TABLE.match(name))))
    if tables:
        fused = "model.encoder_hash_tok_embedding.weight"
        tensors[fused] = torch.cat([main[name] for _, name in tables])
        origin[fused] = f"{pth}: tensor encoder_hash_tok_embedding.*.weight"
    for source, entropy, path in ((main, False, pth), (_read_pth(entropy_pth), True, entropy_pth)):
        for name, tensor in source.items():
            if not entropy and _HASH_TABLE.match(name):
                continue
            target = _reference_to_hf(name, entropy)
            tensors[target], origin[target] = tensor, f"{path}: tensor {name}"
    return tensors, origin


def load_original(model_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                  **options) -> BltEngine:
    """An engine from a checkpoint in the original release's layout; raises
    ConversionError (one line, naming the file) for anything it cannot load exactly."""
    model_dir = Path(model_dir)
    args, patcher, args_path = _model_arguments(model_dir)
    entropy_params = _read_json(model_dir / ENTROPY_DIR / PARAMS_FILE)
    entropy = entropy_params.get("entropy_model")
    if not isinstance(entropy, dict):
        raise ConversionError(f"{model_dir / ENTROPY_DIR / PARAMS_FILE}: no 'entropy_model' object")
    patcher = patcher or (entropy_params.get("data") or {}).get("patcher_args") or {}
    try:
        config = config_from_reference(args, patcher, entropy)
    except ConversionError as e:
        raise ConversionError(f"{args_path}: {e}") from None
    tensors, origin = read_reference_weights(model_dir)
    weights, names = weights_from_hf(tensors, lambda name: origin[name])
    check_weights(
        config, weights,
        describe=lambda name: origin[names[name]],
        describe_missing=lambda name: str(model_dir / _hf_to_reference(hf_name(name))),
        config_path=args_path,
    )
    return build_engine(config, weights, device=torch.device(device), dtype=dtype, name=model_dir.name, **options)
