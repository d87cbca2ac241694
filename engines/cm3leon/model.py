"""The CM3Leon model: a decoder-only transformer over the joint vocabulary
(the shared ``CausalLM``, or a Mixture-of-Transformers ``MotLM``), the image
tokenizer that turns images into codes and back, the audio tokenizer of a
model trained on sound, and the retriever with its memory bank. Weights are
stored as ``lm.*``, ``vq.*``, ``audio.*``, ``retriever.*`` and ``bank.*``."""

from __future__ import annotations

import torch
from torch import nn

from patchwork.engines.cm3leon.audio import AudioTokenizer
from patchwork.engines.cm3leon.config import Cm3LeonConfig
from patchwork.engines.cm3leon.retrieval import DualEncoder, MemoryBank
from patchwork.engines.cm3leon.tokenizer import BREAK, PAD
from patchwork.engines.cm3leon.vqvae import VqVae
from patchwork.engines.layers import CausalLM, fuse_projections
from patchwork.engines.mot.model import MotLM
from patchwork.engines.mot.routing import ModalityRouter


class Cm3LeonModel(nn.Module):
    def __init__(self, config: Cm3LeonConfig):
        super().__init__()
        self.config = config
        self.modality_of = ModalityRouter(config.modality_boundaries)  # token ids [...] -> modality [...]
        if config.backbone == "mot":
            self.lm = MotLM(config.transformer, config.vocab_size, config.modality_boundaries, config.untied)
        else:
            self.lm = CausalLM(config.transformer, config.vocab_size)
        self.vq = VqVae(config.vq)
        self.audio = AudioTokenizer(config.audio) if config.audio else None
        self.retriever = DualEncoder(config.retrieval, config.text_vocab, config.vq.codes, config.image_tokens)
        self.bank = MemoryBank(config.retrieval)

    def fuse(self) -> None:
        """Inference, once on its device and in its dtype: the backbone's
        projections fused (a MoT's stacked by modality, one grouped linear each)."""
        if isinstance(self.lm, MotLM):
            self.lm.fuse()
        else:
            fuse_projections(self.lm)

    @torch.no_grad()
    def index_bank(self) -> None:
        """The bank's near-duplicate keys from its stored documents (each
        ``caption <break> <img> codes </img> <eos>``), after loading."""
        if len(self.bank) == 0:
            return
        documents = [self.bank.document(i) for i in range(len(self.bank))]
        captions = [document[:document.index(BREAK)] or [PAD] for document in documents]
        codes = torch.tensor([[t - self.config.text_vocab for t in document
                               if self.config.text_vocab <= t < self.config.image_end] for document in documents],
                             device=self.bank.vectors.device)
        self.bank.index(self.retriever.embed_texts(captions), self.retriever.embed_images(codes))

    def image_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """The image tokenizer's code ids (b, image_tokens) -> image tokens of the joint vocabulary."""
        return codes + self.config.text_vocab

    def audio_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """The audio tokenizer's codes (b, audio.tokens) -> audio tokens of the joint vocabulary."""
        return codes + self.config.image_end

    def images(self, ids: torch.Tensor) -> torch.Tensor:
        """Image tokens (b, image_tokens) of the joint vocabulary -> uint8 images (b, size, size, 3)."""
        return self.vq.decode(ids - self.config.text_vocab)
