"""Configuration of a BLT checkpoint: one validated pydantic model, stored as config.json."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from patchwork.engines.layers import TransformerConfig

# Vocabulary: byte value + OFFSET, plus four special symbols.
BOE_ID, BOS_ID, EOS_ID, BPE_ID = 0, 1, 2, 3
OFFSET = 4
VOCAB_SIZE = 256 + OFFSET
FORMAT_VERSION = 1


class PatchingConfig(BaseModel):
    """How bytes are grouped into patches.

    In every mode the first symbol (BOS) is a patch of its own and the byte
    after it starts the second patch, as in the reference patcher; the rules
    below decide for every later position p whether byte p starts a patch,
    using only bytes before p, so closed patches never change as text grows.

    - ``entropy``: H(x_p | x_<p) > threshold (the paper's global constraint).
    - ``monotonic``: H(x_p | x_<p) - H(x_{p-1} | x_<p-1) > threshold (the
      approximate monotonic constraint; position 2 always starts a patch, as
      in the reference).
    - ``static``: fixed-size patches of ``patch_size`` bytes after BOS.
    - ``space``: a patch ends after the first of a run of bytes that are not
      ASCII letters or digits. As in the reference, UTF-8 continuation bytes
      count as letters and lead bytes as separators, so a patch can end
      right after the lead byte of a multi-byte character.

    ``max_patch_length`` splits longer patches into pieces of that length.
    """

    model_config = ConfigDict(extra="forbid")

    mode: Literal["entropy", "monotonic", "static", "space"] = "entropy"
    threshold: float = 1.335442066192627
    patch_size: int = Field(default=4, ge=1)
    max_patch_length: int | None = Field(default=None, ge=1)


class HashEmbeddingConfig(BaseModel):
    """Hash n-gram embeddings added to the byte embeddings of the local encoder."""

    model_config = ConfigDict(extra="forbid")

    ngram_sizes: list[int] = Field(default_factory=lambda: [3, 4, 5, 6, 7, 8])
    buckets: int = Field(default=500_002, ge=1)
    # Each function uses the next prime of the reference list.
    n_functions: int = Field(default=1, ge=1, le=11)

    @model_validator(mode="after")
    def _check_sizes(self) -> "HashEmbeddingConfig":
        if any(n < 1 for n in self.ngram_sizes):
            raise ValueError("n-gram sizes must be positive")
        return self

    @property
    def n_tables(self) -> int:
        return self.n_functions * len(self.ngram_sizes)


class BltConfig(BaseModel):
    """A whole BLT model: entropy model, local encoder, global transformer, local decoder."""

    model_config = ConfigDict(extra="forbid")

    family: Literal["blt"] = "blt"
    format_version: Literal[1] = FORMAT_VERSION
    vocab_size: Literal[260] = VOCAB_SIZE

    entropy_model: TransformerConfig
    patching: PatchingConfig = Field(default_factory=PatchingConfig)
    hash_embeddings: HashEmbeddingConfig = Field(default_factory=HashEmbeddingConfig)
    # Byte-level stacks; encoder and decoder share one width (the decoder
    # starts from the encoder's byte states).
    local_encoder: TransformerConfig
    local_decoder: TransformerConfig
    global_model: TransformerConfig
    # Each patch is represented by k vectors of the local width.
    cross_attn_k: int = Field(default=2, ge=1)
    # Cross-attention to the patch in every decoder layer (True) or the first only.
    decoder_cross_attn_all_layers: bool = True

    @model_validator(mode="after")
    def _check_widths(self) -> "BltConfig":
        if self.local_encoder.dim != self.local_decoder.dim:
            raise ValueError(
                f"local_encoder.dim ({self.local_encoder.dim}) must equal local_decoder.dim "
                f"({self.local_decoder.dim})"
            )
        if self.global_model.window is not None:
            raise ValueError("the global model attends to all previous patches; window must be null")
        return self
