"""Training presets for BLT: model shape, data budget and schedule."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from patchwork.engines.blt.config import BltConfig, HashEmbeddingConfig
from patchwork.engines.layers import TransformerConfig
from patchwork.training.loop import Schedule


class WindowSchedule(Schedule):
    """A schedule over random windows of ``seq_len`` bytes of the corpus."""

    seq_len: int


class BltPreset(BaseModel):
    model_config = ConfigDict(extra="forbid")

    corpus_bytes: int
    target_patch_size: float
    model: BltConfig
    entropy_schedule: WindowSchedule
    blt_schedule: WindowSchedule
    eval_windows: int
    seed: int = 0


def _tiny() -> BltPreset:
    local = TransformerConfig(dim=64, n_layers=1, n_heads=4, window=64)
    return BltPreset(
        corpus_bytes=2_000_000,
        target_patch_size=4.0,
        model=BltConfig(
            entropy_model=TransformerConfig(dim=64, n_layers=2, n_heads=4, window=64),
            hash_embeddings=HashEmbeddingConfig(ngram_sizes=[3, 4, 5, 6], buckets=4099),
            local_encoder=local,
            local_decoder=local.model_copy(update={"n_layers": 2}),
            global_model=TransformerConfig(dim=128, n_layers=2, n_heads=4),
        ),
        entropy_schedule=WindowSchedule(steps=150, batch_size=16, seq_len=128, lr=3e-3),
        blt_schedule=WindowSchedule(steps=200, batch_size=16, seq_len=128, lr=3e-3),
        eval_windows=32,
    )


def _default() -> BltPreset:
    local = TransformerConfig(dim=128, n_layers=1, n_heads=4, window=256)
    return BltPreset(
        corpus_bytes=16_000_000,
        target_patch_size=4.0,
        model=BltConfig(
            entropy_model=TransformerConfig(dim=128, n_layers=2, n_heads=4, window=256),
            hash_embeddings=HashEmbeddingConfig(ngram_sizes=[3, 4, 5, 6, 7, 8], buckets=4093),
            local_encoder=local,
            local_decoder=local.model_copy(update={"n_layers": 3}),
            global_model=TransformerConfig(dim=256, n_layers=4, n_heads=8, rope_theta=500000.0),
        ),
        entropy_schedule=WindowSchedule(steps=400, batch_size=16, seq_len=256, lr=2e-3),
        blt_schedule=WindowSchedule(steps=300, batch_size=16, seq_len=256, lr=2e-3),
        eval_windows=128,
    )


PRESETS = {"tiny": _tiny, "default": _default}
