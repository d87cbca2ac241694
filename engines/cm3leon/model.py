"""The CM3Leon model: a decoder-only transformer over the joint vocabulary
(the shared ``CausalLM``), the image tokenizer that turns images into codes
and back, and the retriever with its memory bank. Weights are stored as
``lm.*``, ``vq.*``, ``retriever.*`` and ``bank.*``."""

from __future__ import annotations

import torch
from torch import nn

from engines.cm3leon.config import Cm3LeonConfig
from engines.cm3leon.retrieval import DualEncoder, MemoryBank
from engines.cm3leon.vqvae import VqVae
from engines.layers import CausalLM


class Cm3LeonModel(nn.Module):
    def __init__(self, config: Cm3LeonConfig):
        super().__init__()
        self.config = config
        self.lm = CausalLM(config.transformer, config.vocab_size)
        self.vq = VqVae(config.vq)
        self.retriever = DualEncoder(config.retrieval, config.text_vocab, config.vq.codes, config.image_tokens)
        self.bank = MemoryBank(config.retrieval)

    def image_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """The image tokenizer's code ids (b, image_tokens) -> image tokens of the joint vocabulary."""
        return codes + self.config.text_vocab

    def images(self, ids: torch.Tensor) -> torch.Tensor:
        """Image tokens (b, image_tokens) of the joint vocabulary -> uint8 images (b, size, size, 3)."""
        return self.vq.decode(ids - self.config.text_vocab)
