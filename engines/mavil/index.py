"""Named clip indexes for cross-modal retrieval, kept in the checkpoint.

An index holds, for every clip it was built from, its id and its audio
and/or video embedding in the shared space (unit vectors), and the sha256 of
the weights that made them: an index is only searched by the model that
built it. It is stored as a checkpoint asset ``index.<name>.json`` (listed
and hashed in the manifest like every other file). A query of one modality
is searched against the other by cosine similarity: an exact inner-product
search with torch (an index of thousands of clips is one matrix product;
an approximate index would buy nothing at that size).
"""

from __future__ import annotations

import json
import re
from functools import cached_property

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

PREFIX, SUFFIX = "index.", ".json"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def asset_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise ValueError(f"index name {name!r}: letters, digits, '_' and '-' only")
    return f"{PREFIX}{name}{SUFFIX}"


def index_name(asset: str) -> str | None:
    """The index an asset file holds, or None if it holds none."""
    if asset.startswith(PREFIX) and asset.endswith(SUFFIX):
        return asset[len(PREFIX):-len(SUFFIX)]
    return None


class Vectors(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ids: list[str]
    vectors: list[list[float]]  # [len(ids), embed_dim], unit length


class ClipIndex(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    weights_sha256: str
    audio: Vectors
    video: Vectors

    @cached_property
    def matrices(self) -> dict[str, torch.Tensor]:
        """Each modality's vectors as one matrix [clips, embed_dim], made once."""
        return {modality: torch.tensor(getattr(self, modality).vectors, dtype=torch.float32)
                for modality in ("audio", "video")}

    def search(self, query: np.ndarray, modality: str, top_k: int) -> list[tuple[str, float]]:
        """The ``top_k`` clips whose ``modality`` embedding is nearest ``query``
        (a unit vector), best first, with their cosine similarities."""
        matrix = self.matrices[modality]
        if not len(matrix):
            return []
        scores = matrix @ torch.tensor(query, dtype=torch.float32)
        best = torch.topk(scores, min(top_k, len(scores)))
        ids = getattr(self, modality).ids
        return [(ids[i], float(s)) for s, i in zip(best.values.tolist(), best.indices.tolist())]

    def size(self) -> dict[str, int]:
        return {"audio": len(self.audio.ids), "video": len(self.video.ids)}


def to_json(index: ClipIndex) -> str:
    return json.dumps(index.model_dump(), separators=(",", ":"))
