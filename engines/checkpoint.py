"""Checkpoint directories: config.json + model.safetensors + manifest.json.

- ``config.json``: the family's pydantic config; it names the ``family`` and a
  ``format_version``.
- ``model.safetensors``: the weights (safetensors, never pickle).
- assets: text files a family keeps beside its weights (CM3Leon's text
  tokenizer as ``tokenizer.json``, MAViL's retrieval indexes), listed in the
  manifest like the rest; ``add_assets`` adds some to a checkpoint.
- ``manifest.json``: the sha256 of every other file, how the checkpoint was
  made (command, data), its held-out metrics and, once an evaluation chose
  them, the decoding defaults a server uses for it (``decoding``: the family's
  own format, per kind of output; ``record_decoding``).

Reading verifies every hash before anything is parsed; every failure raises
``CheckpointError`` naming the file and what was expected.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1


class CheckpointError(Exception):
    """A checkpoint directory that cannot be used, with the file at fault."""


class TrainingRecord(BaseModel):
    model_config = ConfigDict(extra="allow")

    command: str
    data: dict
    metrics: dict[str, float]


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    manifest_version: int = MANIFEST_VERSION
    family: str
    created: str
    files: dict[str, str]  # file name -> sha256 hex digest
    training: TrainingRecord
    decoding: dict[str, dict] = {}  # kind of output -> the family's decoding defaults


class CheckpointHeader(BaseModel):
    """The part of config.json that says how to read the rest."""

    model_config = ConfigDict(extra="allow")

    family: str
    format_version: int


def validation_summary(error: ValidationError) -> str:
    """One line per pydantic error: 'field.path: message'."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}" for e in error.errors())


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(
    path: str | os.PathLike, config: BaseModel, state_dict: dict[str, torch.Tensor], training: TrainingRecord,
    assets: dict[str, str] | None = None,
) -> Path:
    """Writes the checkpoint (and ``assets``: file name -> text) into a
    temporary sibling directory and moves it into place, so a reader never
    sees half a checkpoint."""
    assets = assets or {}
    _check_asset_names(assets)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        (staging / CONFIG_FILE).write_text(config.model_dump_json(indent=2) + "\n")
        save_file({name: t.detach().contiguous().cpu() for name, t in state_dict.items()}, staging / WEIGHTS_FILE)
        for name, text in assets.items():
            (staging / name).write_text(text)
        manifest = Manifest(
            family=CheckpointHeader.model_validate(config.model_dump()).family,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            files={name: sha256_of(staging / name) for name in (CONFIG_FILE, WEIGHTS_FILE, *assets)},
            training=training,
        )
        (staging / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
        if path.exists():
            shutil.rmtree(path)
        staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _check_asset_names(names) -> None:
    for name in names:
        if name in (CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE) or Path(name).name != name:
            raise ValueError(f"asset name {name!r}: a plain file name other than the checkpoint's own files")


def add_assets(path: str | os.PathLike, assets: dict[str, str]) -> Path:
    """Adds ``assets`` (file name -> text; an existing one is replaced) to the
    checkpoint at ``path``, verified first, and rewrites its manifest; like
    ``save_checkpoint``, the new checkpoint is built beside the old one and
    swapped in whole."""
    _check_asset_names(assets)
    path = Path(path)
    manifest = read_manifest(path)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    retired = staging.with_name(staging.name + ".old")
    try:
        for name in manifest.files:
            if name not in assets:
                shutil.copy2(path / name, staging / name)
        for name, text in assets.items():
            (staging / name).write_text(text)
        files = {name: sha256_of(staging / name) for name in (*manifest.files, *assets)}
        updated = manifest.model_copy(update={"files": files})
        (staging / MANIFEST_FILE).write_text(updated.model_dump_json(indent=2) + "\n")
        path.rename(retired)
        staging.rename(path)
        shutil.rmtree(retired)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if retired.exists() and not path.exists():
            retired.rename(path)
        raise
    return path


def record_decoding(path: str | os.PathLike, decoding: dict[str, dict]) -> None:
    """Records decoding defaults (kind of output -> settings; an existing kind
    is replaced) in the manifest of the checkpoint at ``path``, verified
    first; the new manifest replaces the old one in a single rename."""
    path = Path(path)
    manifest = read_manifest(path)
    updated = manifest.model_copy(update={"decoding": {**manifest.decoding, **decoding}})
    staging = path / f".{MANIFEST_FILE}.new"
    staging.write_text(updated.model_dump_json(indent=2) + "\n")
    staging.replace(path / MANIFEST_FILE)


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Parses and checks manifest.json and every hash it lists."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path}: missing (every checkpoint needs {MANIFEST_FILE})")
    try:
        manifest = Manifest.model_validate_json(manifest_path.read_bytes())
    except ValidationError as e:
        raise CheckpointError(f"{manifest_path}: not a valid manifest: {validation_summary(e)}") from None
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if required not in manifest.files:
            raise CheckpointError(f"{manifest_path}: lists no hash for {required}")
    for name, expected in manifest.files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (listed in {MANIFEST_FILE})")
        actual = sha256_of(file)
        if actual != expected:
            raise CheckpointError(f"{file}: sha256 is {actual}, {MANIFEST_FILE} expects {expected}")
    return manifest


def read_header(path: str | os.PathLike) -> tuple[CheckpointHeader, dict]:
    """The family/format header and the raw config dict of config.json."""
    config_path = Path(path) / CONFIG_FILE
    try:
        raw = json.loads(config_path.read_bytes())
        return CheckpointHeader.model_validate(raw), raw
    except FileNotFoundError:
        raise CheckpointError(f"{config_path}: missing") from None
    except ValidationError as e:
        raise CheckpointError(f"{config_path}: expected 'family' and 'format_version': {validation_summary(e)}") from None
    except ValueError as e:
        raise CheckpointError(f"{config_path}: not valid JSON: {e}") from None


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    weights_path = Path(path) / WEIGHTS_FILE
    try:
        return load_file(weights_path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights_path}: cannot read safetensors weights: {e}") from None


def load_state(model: torch.nn.Module, weights: dict[str, torch.Tensor], name: str) -> None:
    """Loads ``weights`` into ``model``, every tensor and nothing else;
    CheckpointError naming the checkpoint ``name`` when they do not fit."""
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{name}/{WEIGHTS_FILE}: weights do not match {CONFIG_FILE}: {e}") from None


def read_assets(path: str | os.PathLike, manifest: Manifest) -> dict[str, str]:
    """The checkpoint's assets (file name -> text); ``read_manifest`` has checked their hashes."""
    return {name: (Path(path) / name).read_text() for name in manifest.files if name not in (CONFIG_FILE, WEIGHTS_FILE)}
