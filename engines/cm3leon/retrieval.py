"""Retrieval augmentation: a dense retriever over a memory bank of documents.

The retriever is a small dual encoder trained contrastively (symmetric
InfoNCE, as CLIP) on the image world's (caption, image) pairs: the text side
averages token embeddings, the image side averages embeddings of the image's
codes at their grid positions, each followed by a projection. A document's
vector is the mean of its normalised text and image embeddings (the paper's
rule); a query is one side's normalised embedding (the prompt's text for
text->image, the image for image->text). Search is maximum inner product
over the whole bank with one matrix product: at this scale (tens of
thousands of 64-dimensional vectors) that takes well under a millisecond on a
CPU, so an approximate index (faiss) would add a dependency and no speed.

Near-duplicates of the query document are skipped (the paper's 0.9), judged
document to document with normalised vectors of the same kind: a query with
both sides (a training document) by the cosine of its normalised document
vector with each bank document's; a one-sided query (a prompt's text, or an
image) by the cosine of its embedding with the same side's embedding of each
bank document. (The retrieval score itself cannot serve: a unit query against
a mean of two unit vectors scores at most (1 + cos(text, image)) / 2, even for
the document itself.) In training, a document's own bank entry is excluded
by index as well. The bank counts the searches in which skipping changed
what was found.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class RetrievalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dim: int = Field(default=64, ge=2)
    # Documents in the memory bank (stored with the checkpoint's weights).
    bank_size: int = Field(default=0, ge=0)
    near_duplicate: float = 0.9
    # Retrieved documents a request gets unless it asks otherwise, and at most.
    default_documents: int = Field(default=2, ge=0)
    max_documents: int = Field(default=2, ge=0)


class DualEncoder(nn.Module):
    def __init__(self, config: RetrievalConfig, text_vocab: int, codes: int, image_tokens: int):
        super().__init__()
        self.text_embedding = nn.EmbeddingBag(text_vocab, config.dim, mode="mean")
        self.text_projection = nn.Linear(config.dim, config.dim)
        self.code_embedding = nn.Embedding(codes, config.dim)
        self.code_positions = nn.Parameter(torch.zeros(image_tokens, config.dim))
        self.image_projection = nn.Sequential(nn.Linear(config.dim, config.dim), nn.GELU(),
                                              nn.Linear(config.dim, config.dim))
        self.log_scale = nn.Parameter(torch.tensor(2.6592))  # log(1 / 0.07), CLIP's starting temperature

    def embed_texts(self, texts: list[list[int]]) -> torch.Tensor:
        """Token id lists -> normalised embeddings [n, dim]."""
        device = self.code_positions.device
        flat = torch.tensor([t for text in texts for t in text], dtype=torch.long, device=device)
        lengths = torch.tensor([len(t) for t in texts], device=device)
        offsets = lengths.cumsum(0) - lengths  # where each text starts in ``flat``
        return F.normalize(self.text_projection(self.text_embedding(flat, offsets)), dim=-1)

    def embed_images(self, codes: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Code grids [n, image_tokens] -> normalised embeddings [n, dim];
        ``keep`` (bool, like ``codes``) leaves the other positions out."""
        embedded = self.code_embedding(codes) + self.code_positions  # [n, image_tokens, dim]
        if keep is None:
            pooled = embedded.mean(dim=1)
        else:
            pooled = (embedded * keep[..., None]).sum(dim=1) / keep.sum(dim=1, keepdim=True).clamp(min=1)
        return F.normalize(self.image_projection(pooled), dim=-1)

    def loss(self, texts: list[list[int]], codes: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE over a batch of matching (text, image) pairs."""
        logits = self.embed_texts(texts) @ self.embed_images(codes).T * self.log_scale.exp().clamp(max=100)
        labels = torch.arange(len(texts), device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


@dataclass(frozen=True)
class Query:
    """What a search ranks the bank by (``vectors`` [n, dim]) and what it
    judges near-duplicates by: the query documents' normalised text and/or
    image embeddings (``texts``, ``images``, [n, dim] each; a side the query
    lacks is None)."""

    vectors: torch.Tensor
    texts: torch.Tensor | None = None
    images: torch.Tensor | None = None


class MemoryBank(nn.Module):
    """Documents (as the token sequences prepended to a prompt), their
    retrieval vectors, and each side's normalised embedding (the keys
    near-duplicates are found by: made by ``fill``, or again after loading
    by ``Cm3LeonModel.index_bank``, from the stored documents)."""

    def __init__(self, config: RetrievalConfig):
        super().__init__()
        self.near_duplicate = config.near_duplicate
        self.register_buffer("vectors", torch.zeros(config.bank_size, config.dim))
        self.register_buffer("offsets", torch.zeros(config.bank_size + 1, dtype=torch.long))
        self.register_buffer("tokens", torch.zeros(0, dtype=torch.long), persistent=True)
        self.register_buffer("text_keys", torch.zeros(config.bank_size, config.dim), persistent=False)
        self.register_buffer("image_keys", torch.zeros(config.bank_size, config.dim), persistent=False)
        self.searches = self.deduplicated = 0  # queries searched; those whose results skipping changed

    def fill(self, texts: torch.Tensor, images: torch.Tensor, documents: list[list[int]]) -> None:
        """``texts``, ``images``: each document's normalised embeddings [n, dim]."""
        lengths = torch.tensor([len(d) for d in documents])
        self.vectors = ((texts + images) / 2).detach().clone()  # the paper's document vector
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        self.tokens = torch.tensor([t for d in documents for t in d], dtype=torch.long)
        self.index(texts, images)

    def index(self, texts: torch.Tensor, images: torch.Tensor) -> None:
        self.text_keys, self.image_keys = texts.detach().clone(), images.detach().clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The bank's token count is known only from the checkpoint.
        self.tokens = torch.empty_like(state_dict[prefix + "tokens"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def duplicates(self, query: Query) -> torch.Tensor:
        """bool [n, bank]: the bank documents that near-duplicate each query document."""
        if query.texts is not None and query.images is not None:
            mine = F.normalize(query.texts + query.images, dim=-1)
            similarity = mine @ F.normalize(self.text_keys + self.image_keys, dim=-1).T
        elif query.texts is not None:
            similarity = query.texts @ self.text_keys.T
        elif query.images is not None:
            similarity = query.images @ self.image_keys.T
        else:
            return torch.zeros(len(query.vectors), len(self), dtype=torch.bool, device=query.vectors.device)
        return similarity > self.near_duplicate

    def search(self, query: Query, count: int, exclude: list[int] | None = None) -> list[list[int]]:
        """The ``count`` best documents (bank indices, best first) for each
        query, skipping its near-duplicates and, for query i, the document
        ``exclude[i]`` (its own, in training; -1 for none)."""
        if count == 0 or len(self) == 0:
            return [[] for _ in range(len(query.vectors))]
        scores = query.vectors @ self.vectors.T  # [n, bank]
        if exclude is not None:
            rows = [i for i, index in enumerate(exclude) if 0 <= index < len(self)]
            scores[rows, [exclude[i] for i in rows]] = float("-inf")
        count = min(count, len(self))
        duplicates = self.duplicates(query)
        unskipped = scores.topk(count, dim=-1).indices
        best = scores.masked_fill(duplicates, float("-inf")).topk(count, dim=-1)
        self.searches += len(scores)
        self.deduplicated += int(duplicates.gather(1, unskipped).any(dim=1).sum())
        return [[i for i, s in zip(row, values) if s > float("-inf")]
                for row, values in zip(best.indices.tolist(), best.values.tolist())]

    def document(self, index: int) -> list[int]:
        return self.tokens[self.offsets[index]:self.offsets[index + 1]].tolist()
