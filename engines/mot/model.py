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
FLOPs per token equal the dense model's; the untied parameters are
``modalities`` times the dense ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from engines.kv_cache import CacheView
from engines.layers import FeedForward, RMSNorm, SelfAttention, StackPositions, TransformerConfig
from engines.mot.config import Untied
from engines.mot.routing import ModalityGroups, ModalityRouter


def _copies(count: int, make) -> nn.ModuleList:
    return nn.ModuleList(make() for _ in range(count))


def _of(modules: nn.ModuleList, modality: int) -> nn.Module:
    """A modality's module, or the one every modality shares."""
    return modules[modality if len(modules) > 1 else 0]


class MotBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig, modalities: int, untied: Untied):
        super().__init__()
        norms = modalities if untied.norms else 1
        self.input_layernorm = _copies(norms, lambda: RMSNorm(cfg.dim, cfg.norm_eps))
        self.self_attn = _copies(modalities if untied.attention else 1, lambda: SelfAttention(cfg))
        self.post_attention_layernorm = _copies(norms, lambda: RMSNorm(cfg.dim, cfg.norm_eps))
        self.mlp = _copies(modalities, lambda: FeedForward(cfg.dim, cfg.hidden_dim))

    def _qkv(self, modality: int):
        return lambda x: _of(self.self_attn, modality).qkv(_of(self.input_layernorm, modality)(x))

    def _ffn(self, modality: int):
        return lambda x: self.mlp[modality](_of(self.post_attention_layernorm, modality)(x))

    def forward(self, x: torch.Tensor, groups: ModalityGroups, rotations, mask, cache: CacheView | None,
                layer: int) -> torch.Tensor:
        """x: [N, dim], the batch's tokens sorted by modality -> [N, dim]."""
        attention_weights = max(len(self.input_layernorm), len(self.self_attn))
        qkv = groups.apply(x, [self._qkv(i) for i in range(attention_weights)])
        heads = self.self_attn[0].attend(groups.scatter(qkv), rotations, mask, cache, layer)  # [B, T, H * hd]
        x = x + groups.apply(groups.gather(heads), [attention.o_proj for attention in self.self_attn])
        return x + groups.apply(x, [self._ffn(i) for i in range(len(self.mlp))])


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

    def _logits(self, h: torch.Tensor, groups: ModalityGroups) -> torch.Tensor:
        # h [N, dim] sorted -> logits [B, T, V] in sequence order
        return self.lm_head(groups.scatter(groups.apply(h, list(self.norm))))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens: [B, T] at positions 0..T-1 -> logits [B, T, V]
        groups = self.router.groups(tokens)
        return self._logits(self.stack(groups.gather(self.embed_tokens(tokens)), groups), groups)

    def step(self, tokens: torch.Tensor, cache: CacheView) -> torch.Tensor:
        # new tokens [B, T] at cache.positions -> logits [B, T, V]
        groups = self.router.groups(tokens)
        return self._logits(self.stack.step(groups.gather(self.embed_tokens(tokens)), groups, cache), groups)
