"""Loading a checkpoint: ``load(path)`` (also ``patchwork.load``) reads a
checkpoint directory, verifies it, and returns its family's engine."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from pydantic import ValidationError

from patchwork.engines.checkpoint import (
    CONFIG_FILE,
    MANIFEST_FILE,
    CheckpointError,
    read_assets,
    read_header,
    read_manifest,
    read_weights,
    validation_summary,
)
from patchwork.engines.registry import get_family, known_families


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU, bfloat16 on GPUs."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, **options):
    """Verifies the checkpoint at ``path`` and returns its family's engine.
    ``options`` go to the family's engine (e.g. ``scheduler=SchedulerConfig(...)``),
    and ``assets`` (file name -> text) when the checkpoint has any."""
    path = Path(path)
    manifest = read_manifest(path)
    header, raw_config = read_header(path)
    family = get_family(header.family)
    if family is None:
        raise CheckpointError(
            f"{path / CONFIG_FILE}: unknown family {header.family!r}; expected one of {known_families()}"
        )
    if header.format_version != family.format_version:
        raise CheckpointError(
            f"{path / CONFIG_FILE}: format_version {header.format_version} of family {family.name!r} is not "
            f"supported; expected {family.format_version}"
        )
    if manifest.family != header.family:
        raise CheckpointError(
            f"{path / MANIFEST_FILE}: family {manifest.family!r} does not match {CONFIG_FILE} ({header.family!r})"
        )
    try:
        config = family.config_type.model_validate(raw_config)
    except ValidationError as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: invalid {family.name} config: {validation_summary(e)}") from None
    device = torch.device(device)
    assets = read_assets(path, manifest)
    if assets:
        options["assets"] = assets
    return family.build_engine(
        config, read_weights(path), device=device, dtype=dtype or default_dtype(device), name=path.name,
        manifest=manifest, **options,
    )

