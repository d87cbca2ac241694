"""The BLT model (papers.md section 1): entropy model, local encoder with hash
n-gram embeddings and cross-attention pooling, global latent transformer over
patches, and local decoder cross-attending to the previous patch's output.

Every module computes over whole sequences; ``forward`` is the plain
full-recompute path that generation and training both build on.
"""

from __future__ import annotations

import torch
from torch import nn

from patchwork.engines.blt.config import BltConfig
from patchwork.engines.blt.patching import patch_starts, uses_entropies
from patchwork.engines.kv_cache import CacheView
from patchwork.engines.layers import CausalLM, CrossAttention, PaddedRows, RMSNorm, TransformerStack
from patchwork.kernels.entropy import entropies_from_logits
from patchwork.kernels.hash_embedding import hash_embedding, last_hash_embedding


def doubled_residual(h: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """BLT's cross-attention residual. The reference block returns
    ``h + attention`` and its caller adds ``h`` once more; the published
    weights were trained with that doubled residual."""
    return h + (h + attention)


class EntropyModel(CausalLM):
    """Small causal byte LM whose next-byte entropies place patch boundaries."""


class LocalEncoder(nn.Module):
    def __init__(self, cfg: BltConfig):
        super().__init__()
        local, hashing = cfg.local_encoder, cfg.hash_embeddings
        self.hashing, self.k = hashing, cfg.cross_attn_k
        self.embed_tokens = nn.Embedding(cfg.vocab_size, local.dim)
        self.hash_embeddings = nn.Embedding(hashing.n_tables * hashing.buckets, local.dim)
        self.stack = TransformerStack(local)
        self.patch_embedding_projection = nn.Linear(local.dim, local.dim * cfg.cross_attn_k, bias=False)
        self.cross_attn = CrossAttention(local.dim, local.n_heads, local.norm_eps)

    @property
    def context(self) -> int:
        """Symbols the hash n-grams of one position look back over (itself included)."""
        return max(self.hashing.ngram_sizes)

    def embed(self, tokens: torch.Tensor, history: int = 0) -> torch.Tensor:
        """Byte embedding plus the hash n-gram embeddings: [B, history + T] ->
        [B, T, dim]. The first ``history`` symbols only feed the n-grams of the
        others (the symbols before a chunk, zero-padded like the sequence start)."""
        hashing = self.hashing
        return hash_embedding(tokens, self.hash_embeddings.weight, hashing.ngram_sizes, hashing.n_functions,
                              hashing.buckets, byte_weight=self.embed_tokens.weight, history=history)

    def _attend_own_bytes(self, pooled: torch.Tensor, byte_states: torch.Tensor, own_bytes: torch.Tensor) -> torch.Tensor:
        """pooled: [B, P, dim] max-pooled states; own_bytes: bool [B, P * k, T].
        Projects each patch to k queries that cross-attend to the patch's own
        bytes: [B, P, k * dim]."""
        batch, n_patches, dim = pooled.shape
        queries = self.patch_embedding_projection(pooled).view(batch, n_patches * self.k, dim)
        queries = doubled_residual(queries, self.cross_attn(queries, byte_states, own_bytes))
        return queries.view(batch, n_patches, self.k * dim)

    def pool_patches(self, byte_states: torch.Tensor, patch_ids: torch.Tensor, n_patches: int) -> torch.Tensor:
        """Patch vectors [B, P, k * dim] from byte states [B, T, dim] and patch ids [B, T]."""
        batch, _, dim = byte_states.shape
        pooled = byte_states.new_zeros(batch, n_patches, dim).scatter_reduce(
            1, patch_ids[..., None].expand_as(byte_states), byte_states, reduce="amax", include_self=False
        )
        slot_patch = torch.arange(n_patches, device=patch_ids.device).repeat_interleave(self.k)
        own_bytes = slot_patch[None, :, None] == patch_ids[:, None, :]  # [B, P*k, T]
        return self._attend_own_bytes(pooled, byte_states, own_bytes)

    def pool_one_patch(self, byte_states: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """One patch per sequence, right-padded: byte_states [B, L, dim], valid
        bool [B, L] -> patch vectors [B, 1, k * dim]."""
        pooled = byte_states.masked_fill(~valid[..., None], float("-inf")).amax(dim=1, keepdim=True)
        own_bytes = valid[:, None, :].expand(-1, self.k, -1)
        return self._attend_own_bytes(pooled, byte_states, own_bytes)

    def forward(self, tokens: torch.Tensor, patch_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        byte_states = self.stack(self.embed(tokens))
        n_patches = int(patch_ids.max()) + 1
        return byte_states, self.pool_patches(byte_states, patch_ids, n_patches)

    def extend(self, tokens: torch.Tensor, cache: CacheView) -> torch.Tensor:
        """tokens: [B, context - 1 + T], the ``context - 1`` symbols before a
        chunk (left-padded with 0) then the chunk's T symbols at
        ``cache.positions``. Returns the chunk's byte states [B, T, dim]."""
        return self.stack.step(self.embed(tokens, history=self.context - 1), cache)

    def decode(self, recent_tokens: torch.Tensor, cache: CacheView) -> torch.Tensor:
        """recent_tokens: [B, context], the last ``context`` symbols of each
        sequence (left-padded with 0 like the hash windows), the new one last.
        Returns the new byte's states [B, 1, dim]."""
        hashing = self.hashing
        embedded = last_hash_embedding(recent_tokens, self.hash_embeddings.weight, hashing.ngram_sizes,
                                       hashing.n_functions, hashing.buckets, byte_weight=self.embed_tokens.weight)
        return self.stack.step(embedded, cache)


class GlobalModel(nn.Module):
    """Causal transformer over patch vectors."""

    def __init__(self, cfg: BltConfig):
        super().__init__()
        patch_width = cfg.local_encoder.dim * cfg.cross_attn_k
        self.token_embedding_projection = (
            nn.Linear(patch_width, cfg.global_model.dim, bias=False)
            if patch_width != cfg.global_model.dim
            else nn.Identity()
        )
        self.stack = TransformerStack(cfg.global_model)

    def forward(self, patch_vectors: torch.Tensor, rows: PaddedRows | None = None) -> torch.Tensor:
        # [B, P, k * local dim] -> [B, P, global dim]; with ``rows``, only their real patches are computed
        # (the padded ones come back zero)
        if rows is None:
            return self.stack(self.token_embedding_projection(patch_vectors))
        return rows.unpack(self.stack(self.token_embedding_projection(rows.pack(patch_vectors)), rows))

    def step(self, patch_vectors: torch.Tensor, cache: CacheView) -> torch.Tensor:
        # new patches [B, P, k * local dim] at cache.positions -> [B, P, global dim]
        return self.stack.step(self.token_embedding_projection(patch_vectors), cache)


class LocalDecoder(nn.Module):
    def __init__(self, cfg: BltConfig):
        super().__init__()
        local = cfg.local_decoder
        self.k, self.dim = cfg.cross_attn_k, local.dim
        self.patch_embedding_projection = nn.Linear(cfg.global_model.dim, local.dim * cfg.cross_attn_k, bias=False)
        n_cross = local.n_layers if cfg.decoder_cross_attn_all_layers else 1
        self.cross_attn_layers = nn.ModuleList(
            CrossAttention(local.dim, local.n_heads, local.norm_eps) for _ in range(n_cross)
        )
        self.stack = TransformerStack(local)
        self.norm = RMSNorm(local.dim, local.norm_eps)
        self.lm_head = nn.Linear(local.dim, cfg.vocab_size, bias=False)

    def patch_slots(self, global_states: torch.Tensor) -> torch.Tensor:
        """[B, P, global dim] -> the k key/value slots of each patch [B, P, k, dim]."""
        return self.patch_embedding_projection(global_states).unflatten(-1, (self.k, self.dim))

    def slot_keys_values(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys and values of every cross layer for patch slots
        [..., k, dim] -> [..., n_cross, k, H, hd] each."""
        projected = [layer.project_slots(slots) for layer in self.cross_attn_layers]
        return torch.stack([k for k, _ in projected], dim=-4), torch.stack([v for _, v in projected], dim=-4)

    def forward(self, byte_states: torch.Tensor, slots: torch.Tensor, read_patch: torch.Tensor) -> torch.Tensor:
        """byte_states: [B, T, dim]; slots: [B, P, k, dim]; read_patch: [B, T],
        the patch whose slots each byte reads. Returns logits [B, T, V]."""
        rotations, mask = self.stack.positions(byte_states.shape[1], byte_states.device)
        h = byte_states
        for i, layer in enumerate(self.stack.layers):
            if i < len(self.cross_attn_layers):
                h = doubled_residual(h, self.cross_attn_layers[i].forward_grouped(h, slots, read_patch))
            h = layer(h, rotations, mask, None, i)
        return self.logits(h)

    def step(
        self, byte_states: torch.Tensor, read_keys: torch.Tensor, read_values: torch.Tensor, cache: CacheView
    ) -> torch.Tensor:
        """New bytes at ``cache.positions``: byte_states [B, T, dim]; read_keys
        and read_values [B, T, n_cross, k, H, hd] of the patch each byte reads.
        Returns the final hidden states [B, T, dim] (``logits`` maps them)."""
        rotations = self.stack.rotary(cache.positions.clamp(min=0))
        h = byte_states
        for i, layer in enumerate(self.stack.layers):
            if i < len(self.cross_attn_layers):
                attention = self.cross_attn_layers[i].attend_slots(h, read_keys[:, :, i], read_values[:, :, i])
                h = doubled_residual(h, attention)
            h = layer(h, rotations, cache.mask, cache, i)
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))


class BltModel(nn.Module):
    def __init__(self, cfg: BltConfig):
        super().__init__()
        self.cfg = cfg
        self.entropy_model = EntropyModel(cfg.entropy_model, cfg.vocab_size)
        self.local_encoder = LocalEncoder(cfg)
        self.global_model = GlobalModel(cfg)
        self.local_decoder = LocalDecoder(cfg)

    def patch(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Patch start mask [B, T + 1] of ``tokens`` [B, T], and the next-symbol
        entropies [B, T] when the patching mode uses them (else None)."""
        entropies = None
        if uses_entropies(self.cfg.patching):
            entropies = entropies_from_logits(self.entropy_model(tokens))
        return patch_starts(tokens, entropies, self.cfg.patching), entropies

    def forward(self, tokens: torch.Tensor, patch_ids: torch.Tensor) -> torch.Tensor:
        """tokens: [B, T]; patch_ids: [B, T + 1] (position T is the next symbol).

        Byte t reads the global output of the patch before the one that holds
        byte t + 1: the latest patch that is complete once byte t is known.
        Returns next-symbol logits [B, T, V].
        """
        seq = tokens.shape[1]
        byte_states, patch_vectors = self.local_encoder(tokens, patch_ids[:, :seq])
        # Rows hold different numbers of patches (ids never decrease along a row); the global model
        # computes each row's own, not the padding up to the longest.
        patches = PaddedRows(patch_ids[:, seq - 1] + 1, patch_vectors.shape[1])
        global_states = self.global_model(patch_vectors, patches)
        read_patch = patch_ids[:, 1:] - 1  # [B, T]
        return self.local_decoder(byte_states, self.local_decoder.patch_slots(global_states), read_patch)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Truncated-normal init with std 1/sqrt(fan-in), as in the reference code."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                std = module.in_features**-0.5
            elif isinstance(module, nn.Embedding):
                std = module.embedding_dim**-0.5
            else:
                continue
            nn.init.trunc_normal_(module.weight, std=std, a=-3 * std, b=3 * std, generator=generator)
