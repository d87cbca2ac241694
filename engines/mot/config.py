"""Which weights a Mixture-of-Transformers backbone unties by modality."""

from __future__ import annotations

import enum


class Untied(str, enum.Enum):
    """``all`` is the paper's model: every non-embedding weight per modality
    (attention, feed-forward and every norm). The other two are its ablations:
    the feed-forward alone, and the feed-forward with the attention's
    projections (the norms shared)."""

    FFN = "ffn"
    FFN_ATTENTION = "ffn_attention"
    ALL = "all"

    @property
    def attention(self) -> bool:
        return self is not Untied.FFN

    @property
    def norms(self) -> bool:
        return self is Untied.ALL
