"""The Mixture-of-Transformers language model.

Each block holds, per modality, the shared block's own parts (``RMSNorm``,
``SelfAttention``'s projections, ``FeedForward``): a token runs through its
modality's norms and projections, and attends globally over the whole
interleaved sequence (causal, one key/value cache whose keys and values each
come from their token's own projections). With one modality, or with every
modality holding the same weights, it computes what the dense
``TransformerBlock`` computes.

The residual stream stays sorted by modality through the stack
(``engines.mot.routing``); the sequence order returns only for attention.
Each projection runs every modality's tokens through their own weights in
one grouped linear (one Triton launch on a GPU).
FLOPs per token equal the dense model's; the untied parameters are
``modalities`` times the dense ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from patchwork.engines.kv_cache import CacheView
from patchwork.engines.layers import (
    FeedForward,
    PaddedRows,
    RMSNorm,
    SelfAttention,
    StackPositions,
    TransformerConfig,
    point_weights_into,
)
from patchwork.engines.mot.config import Untied
from patchwork.engines.mot.routing import ModalityGroups, ModalityRouter


def _copies(count: int, make) -> nn.ModuleList:
    return nn.ModuleList(make() for _ in range(count))


def _side_by_side(linears: Sequence[nn.Linear]) -> torch.Tensor:
    """One matrix of ``linears`` that read the same input (a concatenation
    autograd sees through)."""
    return linears[0].weight if len(linears) == 1 else torch.cat([linear.weight for linear in linears])


def _stack(by_modality: Sequence[Sequence[nn.Linear]]) -> torch.Tensor:
    """[modalities, out, in]: each modality's ``linears`` side by side, and
    each linear's weight made a view into it (one copy of the weights; the
    parameters keep their names and shapes, as ``fuse_linears`` leaves them)."""
    stacked = torch.stack([torch.cat([linear.weight.detach() for linear in linears]) for linears in by_modality])
    for matrix, linears in zip(stacked, by_modality):
        point_weights_into(matrix, linears)
    return stacked


class MotBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig, modalities: int, untied: Untied):
        super().__init__()
        norms = modalities if untied.norms else 1
        self.input_layernorm = _copies(norms, lambda: RMSNorm(cfg.dim, cfg.norm_eps))
        self.self_attn = _copies(modalities if untied.attention else 1, lambda: SelfAttention(cfg))
        self.post_attention_layernorm = _copies(norms, lambda: RMSNorm(cfg.dim, cfg.norm_eps))
        self.mlp = _copies(modalities, lambda: FeedForward(cfg.dim, cfg.hidden_dim))
        self.stacked: dict[str, torch.Tensor] = {}  # projection -> [modalities or 1, out, in], once fused

    def _linears(self) -> dict[str, list[list[nn.Linear]]]:
        """Each projection's linears by modality (one entry when tied)."""
        return {"qkv": [[a.q_proj, a.k_proj, a.v_proj] for a in self.self_attn],
                "o": [[a.o_proj] for a in self.self_attn],
                "gate_up": [[f.gate_proj, f.up_proj] for f in self.mlp],
                "down": [[f.down_proj] for f in self.mlp]}

    def fuse(self) -> None:
        """Inference: each projection's weights stacked once by modality, so
        that it runs as one grouped linear with no stacking per call."""
        self.stacked = {name: _stack(by_modality) for name, by_modality in self._linears().items()}

    def _weights(self, name: str) -> torch.Tensor | list[torch.Tensor]:
        """A projection's weights by modality: stacked once fused, else each modality's matrix."""
        if name in self.stacked:
            return self.stacked[name]
        return [_side_by_side(linears) for linears in self._linears()[name]]

    def forward(self, x: torch.Tensor, groups: ModalityGroups, rotations, mask, cache: CacheView | None,
                layer: int) -> torch.Tensor:
        """x: [N, dim], the batch's tokens sorted by modality -> [N, dim]."""
        qkv = groups.linear(groups.apply(x, list(self.input_layernorm)), self._weights("qkv"))
        heads = self.self_attn[0].attend(groups.scatter(qkv), rotations, mask, cache, layer)  # [B, T, H * hd]
        x = x + groups.linear(groups.gather(heads), self._weights("o"))
        normed = groups.apply(x, list(self.post_attention_layernorm))
        gate, up = groups.linear(normed, self._weights("gate_up")).chunk(2, dim=-1)  # [N, hidden] each
        return x + groups.linear(F.silu(gate) * up, self._weights("down"))


class MotStack(StackPositions):
    """``n_layers`` Mixture-of-Transformers blocks, causal over the whole sequence."""

    def __init__(self, cfg: TransformerConfig, modalities: int, untied: Untied):
        super().__init__(cfg)
        self.layers = nn.ModuleList(MotBlock(cfg, modalities, untied) for _ in range(cfg.n_layers))

    def forward(self, h: torch.Tensor, groups: ModalityGroups) -> torch.Tensor:
        """h: [N, dim] sorted by modality, a batch of whole sequences at positions 0..T-1."""
        rotations, mask = self.positions(groups.shape[1], h.device)
        for i, layer in enumerate(self.layers):
            h = layer(h, groups, rotations, mask, None, i)
        return h

    def step(self, h: torch.Tensor, groups: ModalityGroups, cache: CacheView) -> torch.Tensor:
        """h: [N, dim] sorted by modality, new tokens at ``cache.positions`` that attend to the cache."""
        rotations = self.rotary(cache.positions.clamp(min=0))
        for i, layer in enumerate(self.layers):
            h = layer(h, groups, rotations, cache.mask, cache, i)
        return h


class MotLM(nn.Module):
    """``CausalLM``'s interface (``forward``, ``step``) over a Mixture-of-Transformers
    stack: shared token embeddings and output head, the final norm untied with
    the other norms, and the router that sends each token to its modality."""

    def __init__(self, cfg: TransformerConfig, vocab_size: int, boundaries: Sequence[int], untied: Untied):
        super().__init__()
        self.router = ModalityRouter(boundaries)
        modalities = self.router.modalities
        self.embed_tokens = nn.Embedding(vocab_size, cfg.dim)
        self.stack = MotStack(cfg, modalities, untied)
        self.norm = _copies(modalities if untied.norms else 1, lambda: RMSNorm(cfg.dim, cfg.norm_eps))
        self.lm_head = nn.Linear(cfg.dim, vocab_size, bias=False)

    def fuse(self) -> None:
        """Inference, once the model is on its device and in its dtype (and
        instead of ``fuse_projections``): every block's projections stacked
        by modality, each a view of the checkpoint's own parameters."""
        for layer in self.stack.layers:
            layer.fuse()

    def _logits(self, h: torch.Tensor, groups: ModalityGroups) -> torch.Tensor:
        # h [N, dim] sorted -> logits in sequence order: [B, T, V], or [N, V] for the real positions of groups.rows
        normed = groups.apply(h, list(self.norm))
        return self.lm_head(groups.scatter(normed) if groups.rows is None else groups.unsort(normed))

    def forward(self, tokens: torch.Tensor, rows: PaddedRows | None = None) -> torch.Tensor:
        # tokens: [B, T] at positions 0..T-1 -> logits [B, T, V]; with ``rows``, those of their real positions [N, V]
        groups = self.router.groups(tokens, rows)
        return self._logits(self.stack(groups.gather(self.embed_tokens(tokens)), groups), groups)

    def step(self, tokens: torch.Tensor, cache: CacheView) -> torch.Tensor:
        # new tokens [B, T] at cache.positions -> logits [B, T, V]
        groups = self.router.groups(tokens)
        return self._logits(self.stack.step(groups.gather(self.embed_tokens(tokens)), groups, cache), groups)
