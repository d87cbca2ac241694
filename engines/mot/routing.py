"""Which weights each token runs through.

The router is deterministic: a token's modality is the range of the joint
vocabulary its id falls in (text, then image codes, then audio codes), so a
token fed back during decoding is routed exactly as it was in training. No
router is learned.

``ModalityGroups`` holds one batch's grouping: the tokens sorted by modality
(a stable sort, so each group keeps its tokens in sequence order) and each
group's size. A Mixture-of-Transformers stack keeps its residual stream in
that sorted order, so each modality's weights read one contiguous slice; each
layer scatters its queries, keys and values back to sequence order for the
global attention and gathers the attention's output again: one scatter and
one gather per layer. A projection whose weights are untied runs every
modality's slice through its own weight in one grouped linear
(``kernels.grouped_linear``: one Triton launch on a GPU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn

from patchwork.engines.layers import PaddedRows
from patchwork.kernels.grouped_linear import Weights, grouped_linear


class ModalityRouter(nn.Module):
    """Token id -> modality index, by ``boundaries``: ids below
    ``boundaries[0]`` are modality 0, ids in [boundaries[i - 1], boundaries[i])
    modality i, the rest the last modality."""

    def __init__(self, boundaries: Sequence[int]):
        super().__init__()
        if list(boundaries) != sorted(set(boundaries)):
            raise ValueError(f"modality boundaries must increase, not {list(boundaries)}")
        self.modalities = len(boundaries) + 1
        self.register_buffer("boundaries", torch.tensor(list(boundaries), dtype=torch.long), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens [...] -> modality index [...]
        return torch.bucketize(tokens.contiguous(), self.boundaries, right=True)

    def groups(self, tokens: torch.Tensor, rows: PaddedRows | None = None) -> ModalityGroups:
        """The grouping of ``tokens`` [B, T]; with ``rows``, of their real positions alone."""
        return ModalityGroups(self(tokens), self.modalities, rows)


class ModalityGroups:
    """The tokens of a [B, T] batch grouped by modality; with ``rows`` (a
    right-padded batch), its real positions alone."""

    def __init__(self, modality: torch.Tensor, modalities: int, rows: PaddedRows | None = None):
        self.shape = modality.shape  # [B, T]
        self.rows = rows
        flat = modality.flatten() if rows is None else rows.pack(modality)
        self.order = torch.argsort(flat, stable=True)  # [N]: sorted place -> flat index
        # One host sync per forward pass (not per layer): the groups' sizes.
        self.sizes: list[int] = torch.bincount(flat, minlength=modalities).tolist()
        # Group g owns sorted rows offsets[g]:offsets[g + 1]; on the host, read without a sync.
        self.offsets = torch.tensor([0, *accumulate(self.sizes)])

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, D] in sequence order -> [N, D] sorted by modality."""
        flat = x.flatten(0, 1) if self.rows is None else self.rows.pack(x)
        return flat.index_select(0, self.order)

    def unsort(self, x: torch.Tensor) -> torch.Tensor:
        """[N, D] sorted by modality -> [N, D] in sequence order (the order of ``rows.pack``)."""
        return x.new_empty(x.shape).index_copy(0, self.order, x)

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """[N, D] sorted by modality -> [B, T, D] in sequence order (zero at padded places)."""
        flat = self.unsort(x)
        return flat.unflatten(0, self.shape) if self.rows is None else self.rows.unpack(flat)

    def apply(self, x: torch.Tensor, functions: Sequence[Callable[[torch.Tensor], torch.Tensor]]) -> torch.Tensor:
        """Each modality's slice of ``x`` [N, D] (sorted) through its own
        function; one function is shared by every modality (tied weights)."""
        if len(functions) == 1:
            return functions[0](x)
        parts = [function(part) for function, part in zip(functions, x.split(self.sizes)) if part.shape[0]]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def linear(self, x: torch.Tensor, weights: Weights) -> torch.Tensor:
        """Each modality's slice of ``x`` [N, in] (sorted) times its own weight
        (``weights``: [modalities, out, in] stacked, or one [out, in] matrix
        per modality) in one grouped linear; one weight is shared by every
        modality (tied weights) -> [N, out]."""
        if len(weights) == 1:
            return F.linear(x, weights[0])
        return grouped_linear(x, weights, self.offsets)
