"""BLT's training streams: each document as BOS, its bytes (+4), EOS."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from patchwork.engines.blt.config import BOS_ID, EOS_ID, OFFSET
from patchwork.training.data import Documents


def symbol_stream(docs: list[bytes]) -> torch.Tensor:
    """The documents as one int64 stream of BLT symbols."""
    parts = []
    for doc in docs:
        parts += [np.array([BOS_ID]), np.frombuffer(doc, dtype=np.uint8).astype(np.int64) + OFFSET, np.array([EOS_ID])]
    return torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0, dtype=torch.int64)


@dataclass
class ByteCorpus:
    train: torch.Tensor  # int64 symbol stream
    heldout: torch.Tensor
    description: dict

    @classmethod
    def from_documents(cls, documents: Documents) -> ByteCorpus:
        return cls(symbol_stream(documents.train), symbol_stream(documents.heldout), documents.description)

    def unigram_bits_per_byte(self) -> float:
        """Entropy of the held-out bytes' own byte histogram: the best any
        context-free byte model could do on them."""
        byte_values = self.heldout[self.heldout >= OFFSET] - OFFSET
        counts = torch.bincount(byte_values, minlength=256).double()
        probs = counts[counts > 0] / counts.sum()
        return float(-(probs * probs.log2()).sum())
