"""Configuration of a CM3Leon checkpoint: one validated pydantic model, stored as config.json."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engines.cm3leon.retrieval import RetrievalConfig
from engines.cm3leon.tokenizer import SPECIALS
from engines.cm3leon.vqvae import VqConfig
from engines.layers import TransformerConfig

FORMAT_VERSION = 1


class Cm3LeonConfig(BaseModel):
    """A decoder-only transformer over text tokens and image codes.

    The joint vocabulary is the text tokenizer's ``text_vocab`` ids, then the
    image tokenizer's ``vq.codes`` codes. An image takes ``image_tokens``
    positions (its code grid, row by row) between ``<img>`` and ``</img>``.
    """

    model_config = ConfigDict(extra="forbid")

    family: Literal["cm3leon"] = "cm3leon"
    format_version: Literal[1] = FORMAT_VERSION
    # The backbone's weights: one dense transformer (Mixture-of-Transformers
    # backbones untie them by modality).
    backbone: Literal["dense"] = "dense"
    transformer: TransformerConfig
    text_vocab: int = Field(gt=len(SPECIALS))
    vq: VqConfig
    # Positions a sequence may take: retrieved documents, prompt and output.
    max_sequence: int = Field(default=512, ge=16)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)

    @model_validator(mode="after")
    def _no_window(self) -> "Cm3LeonConfig":
        if self.transformer.window is not None:
            raise ValueError("transformer.window: CM3Leon attends to the whole sequence")
        if self.retrieval.default_documents > self.retrieval.max_documents:
            raise ValueError("retrieval.default_documents must not exceed retrieval.max_documents")
        return self

    @property
    def vocab_size(self) -> int:
        return self.text_vocab + self.vq.codes

    @property
    def image_tokens(self) -> int:
        return self.vq.grid**2

    def image_token(self, code: int) -> int:
        return self.text_vocab + code
