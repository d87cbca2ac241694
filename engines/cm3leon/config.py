"""Configuration of a CM3Leon checkpoint: one validated pydantic model, stored as config.json."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from patchwork.engines.cm3leon.audio import AudioVqConfig
from patchwork.engines.cm3leon.retrieval import RetrievalConfig
from patchwork.engines.cm3leon.tokenizer import SPECIALS
from patchwork.engines.cm3leon.vqvae import VqConfig
from patchwork.engines.layers import TransformerConfig
from patchwork.engines.mot.config import Untied

# 2: the text vocabulary's specials gained <audio> and </audio> (format-1 checkpoints must be retrained).
FORMAT_VERSION = 2


class Cm3LeonConfig(BaseModel):
    """A decoder-only transformer over text tokens, image codes and, when
    trained on sound, audio codes.

    The joint vocabulary is the text tokenizer's ``text_vocab`` ids, then the
    image tokenizer's ``vq.codes`` codes, then the audio tokenizer's
    ``audio.codes``. An image takes ``image_tokens`` positions (its code grid,
    row by row) between ``<img>`` and ``</img>``; a sound ``audio.tokens``
    between ``<audio>`` and ``</audio>``.
    """

    model_config = ConfigDict(extra="forbid")

    family: Literal["cm3leon"] = "cm3leon"
    format_version: Literal[2] = FORMAT_VERSION
    # The backbone's weights: one dense transformer, or a Mixture-of-Transformers
    # (``engines.mot``) that unties the ``untied`` weights by modality.
    backbone: Literal["dense", "mot"] = "dense"
    untied: Untied = Untied.ALL
    transformer: TransformerConfig
    text_vocab: int = Field(gt=len(SPECIALS))
    vq: VqConfig
    # The audio tokenizer of a checkpoint trained on sound (None: text and images only).
    audio: AudioVqConfig | None = None
    # Positions a sequence may take: retrieved documents, prompt and output.
    max_sequence: int = Field(default=512, ge=16)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)

    @model_validator(mode="after")
    def _no_window(self) -> "Cm3LeonConfig":
        if self.transformer.window is not None:
            raise ValueError("transformer.window: CM3Leon attends to the whole sequence")
        if self.retrieval.default_documents > self.retrieval.max_documents:
            raise ValueError("retrieval.default_documents must not exceed retrieval.max_documents")
        if self.backbone == "dense" and self.untied is not Untied.ALL:
            raise ValueError("untied: only a mot backbone unties weights")
        return self

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities the model reads and writes, in vocabulary order."""
        return ("text", "image", "audio") if self.audio else ("text", "image")

    @property
    def modality_boundaries(self) -> list[int]:
        """Where each modality after the first begins in the joint vocabulary."""
        return [self.text_vocab, self.image_end][: len(self.modalities) - 1]

    @property
    def image_end(self) -> int:
        """One past the last image code's id."""
        return self.text_vocab + self.vq.codes

    @property
    def vocab_size(self) -> int:
        return self.image_end + (self.audio.codes if self.audio else 0)

    @property
    def image_tokens(self) -> int:
        return self.vq.grid**2

    def image_token(self, code: int) -> int:
        return self.text_vocab + code
