"""Transformer building blocks shared by every model family.

Pre-norm blocks in the Llama style: RMSNorm, rotary position embeddings on
interleaved pairs (the layout of Meta's reference code and of the Hugging Face
BLT port), grouped-query self-attention with an optional sliding window, a
SwiGLU feed-forward, and a cross-attention block with normalised queries and
keys/values. Parameter names follow the Hugging Face layout (``q_proj``,
``gate_proj``, ``input_layernorm`` ...), so converting official weights is a
matter of prefixes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, model_validator
from torch import nn

from patchwork.engines.kv_cache import CacheView, KVCache
from patchwork.kernels.add_rmsnorm import add_rms_norm
from patchwork.kernels.rmsnorm import rms_norm


class TransformerConfig(BaseModel):
    """Hyperparameters of one stack of transformer blocks."""

    model_config = ConfigDict(extra="forbid")

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    # Hidden size of the SwiGLU feed-forward; None takes int(8 * dim / 3).
    ffn_dim: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Causal attention window in positions (a query sees itself and the
    # window - 1 positions before it); None attends to the whole prefix.
    window: int | None = None

    @model_validator(mode="after")
    def _check_heads(self) -> "TransformerConfig":
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError("head dimension must be even for rotary embeddings")
        if self.window is not None and self.window < 1:
            raise ValueError("window must be at least 1")
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        return self.ffn_dim or int(8 * self.dim / 3)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """Rotations for rotary embeddings over interleaved pairs (x0, x1), (x2, x3), ...,
    as unit complex numbers: pair j at position p turns by p * theta^(-2j / head_dim)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        # positions: [..., T] -> complex rotations [..., T, head_dim / 2]
        angles = positions.to(torch.float32)[..., None] * self.inv_freq
        return torch.polar(torch.ones_like(angles), angles)


def apply_rotary(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    # x: [B, T, heads, hd]; rotations: [B or 1, T, hd / 2] complex
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotations.unsqueeze(-2)).flatten(-2).to(x.dtype)


def fuse_linears(*linears: nn.Linear) -> torch.Tensor:
    """Stacks the weights of ``linears`` (which read the same input) into one
    matrix and makes each weight a view into it, so inference runs them as one
    matmul with no second copy of the weights. The parameters keep their names
    and shapes; writing to one (``load_state_dict``) writes the stacked matrix."""
    fused = torch.cat([linear.weight.detach() for linear in linears])
    point_weights_into(fused, linears)
    return fused


def point_weights_into(matrix: torch.Tensor, linears: Sequence[nn.Linear]) -> None:
    """Makes each of ``linears``' weights a view of its rows of ``matrix``
    (their weights one above the other), keeping whether it requires grad."""
    offset = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight = nn.Parameter(matrix[offset : offset + rows], requires_grad=linear.weight.requires_grad)
        offset += rows


def stacked_weight(fused: torch.Tensor | None, *linears: nn.Linear) -> torch.Tensor:
    """The stacked weight of ``linears``: the fused matrix when there is one
    (inference), else a concatenation that autograd sees through (training)."""
    return fused if fused is not None else torch.cat([linear.weight for linear in linears])


def fuse_projections(model: nn.Module) -> None:
    """Fuses the q/k/v and gate/up projections of every block of ``model``
    (inference: one matmul each, one copy of the weights)."""
    for module in model.modules():
        if isinstance(module, (SelfAttention, FeedForward)):
            module.fuse()


def causal_mask(n_queries: int, n_keys: int, window: int | None, device) -> torch.Tensor:
    """Boolean [n_queries, n_keys] mask, True where attention is allowed.

    The queries are the last ``n_queries`` positions of the ``n_keys`` keys.
    """
    query_pos = torch.arange(n_keys - n_queries, n_keys, device=device)[:, None]
    key_pos = torch.arange(n_keys, device=device)[None, :]
    allowed = key_pos <= query_pos
    if window is not None:
        allowed &= key_pos > query_pos - window
    return allowed


class PaddedRows:
    """The real positions of a right-padded batch [B, T]: the first
    ``lengths[b]`` of row b. Position-wise work (norms, projections, the
    feed-forward) runs on the real positions alone, packed [N, ...]; causal
    attention runs in the padded layout, where every padded key comes after
    the real queries of its row and is never read by them."""

    def __init__(self, lengths: torch.Tensor, seq: int):
        self.batch, self.seq = len(lengths), seq
        real = torch.arange(seq, device=lengths.device) < lengths[:, None]  # [B, T]
        self.index = real.flatten().nonzero().squeeze(1)  # [N] flat places of the real positions

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> the real positions [N, ...]."""
        return x.flatten(0, 1).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[N, ...] -> [B, T, ...], zero at the padded places."""
        padded = x.new_zeros(self.batch * self.seq, *x.shape[1:]).index_copy(0, self.index, x)
        return padded.unflatten(0, (self.batch, self.seq))


class SelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.qkv_weight: torch.Tensor | None = None

    def fuse(self) -> None:
        self.qkv_weight = fuse_linears(self.q_proj, self.k_proj, self.v_proj)

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., dim] -> queries, keys and values side by side [..., (H + 2 Hkv) * hd]."""
        return F.linear(x, stacked_weight(self.qkv_weight, self.q_proj, self.k_proj, self.v_proj))

    def attend(self, qkv: torch.Tensor, rotations, mask, cache: CacheView | None, layer: int) -> torch.Tensor:
        """qkv: [B, T, (H + 2 Hkv) * hd] -> the heads' outputs [B, T, H * hd],
        before the output projection. Without ``cache`` the tokens attend among
        themselves under ``mask``; with it they are stored in the cache and
        attend to what the cache holds for them."""
        batch, seq, _ = qkv.shape
        n_qk = self.n_heads + self.n_kv_heads
        qkv = qkv.view(batch, seq, n_qk + self.n_kv_heads, self.head_dim)
        qk = apply_rotary(qkv[:, :, :n_qk], rotations).transpose(1, 2)  # [B, H + Hkv, T, hd]
        q, k, v = qk[:, : self.n_heads], qk[:, self.n_heads :], qkv[:, :, n_qk:].transpose(1, 2)
        gqa = self.n_heads != self.n_kv_heads
        if cache is not None:
            out = cache.attend(layer, q, k, v, gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return out.transpose(1, 2).reshape(batch, seq, -1)

    def forward(self, x, rotations, mask, cache: CacheView | None = None, layer: int = 0,
                rows: PaddedRows | None = None):
        """x: [B, T, dim] -> [B, T, dim]; see ``attend``. With ``rows``, x is
        their real positions [N, dim] and so is the result."""
        qkv = self.qkv(x)
        if rows is None:
            return self.o_proj(self.attend(qkv, rotations, mask, cache, layer))
        return self.o_proj(rows.pack(self.attend(rows.unpack(qkv), rotations, mask, cache, layer)))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)
        self.gate_up_weight: torch.Tensor | None = None

    def fuse(self) -> None:
        self.gate_up_weight = fuse_linears(self.gate_proj, self.up_proj)

    def forward(self, x):
        gate, up = F.linear(x, stacked_weight(self.gate_up_weight, self.gate_proj, self.up_proj)).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = SelfAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = FeedForward(cfg.dim, cfg.hidden_dim)

    def forward(self, x, rotations, mask, cache: CacheView | None = None, layer: int = 0,
                rows: PaddedRows | None = None):
        attended = self.self_attn(self.input_layernorm(x), rotations, mask, cache, layer, rows)
        norm = self.post_attention_layernorm  # x + attended, and its norm: one fused kernel on a GPU
        normed, x = add_rms_norm(x, attended, norm.weight, norm.eps)
        return x + self.mlp(normed)


class StackPositions(nn.Module):
    """What every stack of blocks shares: rotary positions, the causal mask
    and the key/value cache's views. ``layers`` are the subclass's blocks."""

    layers: nn.ModuleList

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)

    def positions(self, seq: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotations and the causal mask for positions 0..seq-1."""
        rotations = self.rotary(torch.arange(seq, device=device)[None])
        return rotations, causal_mask(seq, seq, self.cfg.window, device)

    def new_cache(self, slots: int, capacity: int, device, dtype) -> KVCache:
        """The stack's cache: a ring of ``window`` entries for local attention,
        else up to ``capacity`` positions."""
        ring = self.cfg.window is not None
        size = self.cfg.window if ring else capacity
        return KVCache(len(self.layers), slots, self.cfg.kv_heads, self.cfg.head_dim, size, ring, device, dtype)

    def decode_view(
        self, cache: KVCache, slots: list[int], positions: torch.Tensor, ends: list[int] | None = None
    ) -> CacheView:
        """One new token per sequence of ``slots``, at ``positions`` [B] (also
        on the host as ``ends`` when the caller knows them)."""
        return cache.decode_view(slots, positions, self.cfg.window, ends)

    def extend_view(
        self, cache: KVCache, slots: list[int], positions: torch.Tensor, ends: list[int] | None = None
    ) -> CacheView:
        """A chunk of new tokens per sequence of ``slots`` at ``positions`` [B, T]
        (-1: padding); ``ends``, when given, each one's last new position."""
        return cache.extend_view(slots, positions, self.cfg.window, ends)


class TransformerStack(StackPositions):
    """``n_layers`` blocks with rotary positions and a causal (optionally windowed) mask."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__(cfg)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))

    def forward(self, h: torch.Tensor, rows: PaddedRows | None = None) -> torch.Tensor:
        """h: [B, T, dim], a whole sequence at positions 0..T-1; or, with
        ``rows`` (a right-padded batch), their real positions [N, dim] alone,
        and so is the result."""
        seq = h.shape[1] if rows is None else rows.seq
        rotations, mask = self.positions(seq, h.device)
        for i, layer in enumerate(self.layers):
            h = layer(h, rotations, mask, None, i, rows)
        return h

    def encode(self, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Bidirectional (an encoder): h [B, T, dim], every token attending to
        every other, at rotary ``positions`` [B, T] (a masked input's tokens
        keep the places they had in the whole input)."""
        rotations = self.rotary(positions)
        for i, layer in enumerate(self.layers):
            h = layer(h, rotations, None, None, i)
        return h

    def step(self, h: torch.Tensor, cache: CacheView) -> torch.Tensor:
        """h: [B, T, dim], new tokens at ``cache.positions`` that attend to the
        cache (one decode step, or a chunk of a prompt)."""
        rotations = self.rotary(cache.positions.clamp(min=0))
        for i, layer in enumerate(self.layers):
            h = layer(h, rotations, cache.mask, cache, i)
        return h


class CausalLM(nn.Module):
    """A decoder-only language model over one vocabulary: token embeddings,
    a transformer stack, a final norm and a linear head. BLT's entropy model
    and CM3Leon's dense backbone are both this."""

    def __init__(self, cfg: TransformerConfig, vocab_size: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, cfg.dim)
        self.stack = TransformerStack(cfg)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, rows: PaddedRows | None = None) -> torch.Tensor:
        # tokens: [B, T] at positions 0..T-1 -> logits [B, T, V]; with ``rows``, those of their real positions [N, V]
        h = self.embed_tokens(tokens if rows is None else rows.pack(tokens))
        return self.lm_head(self.norm(self.stack(h, rows)))

    def step(self, tokens: torch.Tensor, cache: CacheView) -> torch.Tensor:
        # new tokens [B, T] at cache.positions -> logits [B, T, V]
        return self.lm_head(self.norm(self.stack.step(self.embed_tokens(tokens), cache)))


class CrossAttention(nn.Module):
    """Queries attend to keys/values of another sequence; no rotary positions.

    Queries and keys/values are RMS-normalised first. It returns the
    attention output alone; each family adds its own residual.
    """

    def __init__(self, dim: int, n_heads: int, norm_eps: float):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.q_norm = RMSNorm(dim, norm_eps)
        self.k_norm = RMSNorm(dim, norm_eps)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def _heads(self, x):
        return x.unflatten(-1, (self.n_heads, self.head_dim))

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """queries: [B, Q, dim]; keys: [B, K, dim]; mask: bool [B, Q, K], True = attend.

        Rows with nothing to attend to get uniform weights (a finite mask value,
        as in the Hugging Face port), so padding never produces NaNs.
        """
        q = self._heads(self.q_proj(self.q_norm(queries))).transpose(1, 2)
        kv = self.k_norm(keys)
        k = self._heads(self.k_proj(kv)).transpose(1, 2)
        v = self._heads(self.v_proj(kv)).transpose(1, 2)
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
        bias.masked_fill_(~mask, torch.finfo(q.dtype).min)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(1))
        return self.o_proj(out.transpose(1, 2).flatten(-2))

    def project_slots(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of key/value slots [..., S, dim] -> [..., S, H, hd] each."""
        kv = self.k_norm(slots)
        return self._heads(self.k_proj(kv)), self._heads(self.v_proj(kv))

    def attend_slots(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Each query attends to its own S slots: queries [B, T, dim]; keys and
        values [B, T, S, H, hd] (from ``project_slots``)."""
        q = self._heads(self.q_proj(self.q_norm(queries)))  # [B, T, H, hd]
        scores = torch.einsum("bthd,btshd->bths", q, keys) / math.sqrt(self.head_dim)
        out = torch.einsum("bths,btshd->bthd", scores.softmax(dim=-1), values)
        return self.o_proj(out.flatten(-2))

    def forward_grouped(self, queries: torch.Tensor, slots: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        """Each query attends to the slots of one group.

        queries: [B, T, dim]; slots: [B, G, S, dim] (S key/value slots per
        group); group: [B, T], the group each query reads. Equal to ``forward``
        with a mask that opens exactly those slots, at O(T * S) cost; keys and
        values are projected once per group, not once per query.
        """
        keys, values = self.project_slots(slots)  # [B, G, S, H, hd]
        batch_index = torch.arange(group.shape[0], device=group.device)[:, None]
        return self.attend_slots(queries, keys[batch_index, group], values[batch_index, group])
