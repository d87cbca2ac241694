"""The MAViL encoder: audio and video ViTs and a fusion encoder over their
joined tokens, all built from the shared transformer block.

Patches are embedded linearly with a learned embedding per place; the
encoders attend bidirectionally with rotary positions at each token's place
in the whole input, so a masked input (training) is just fewer tokens at
their own places. The fusion encoder reads [audio; video] tokens, each
modality with its own learned offset. The pooled outputs are the clip's
embeddings; the projections map the audio and video ones into the shared
space that cross-modal retrieval searches; the linear heads (trained on the
frozen encoder) classify each embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from patchwork.engines.layers import RMSNorm, TransformerStack
from patchwork.engines.mavil.config import MavilConfig

MODALITIES = ("audio", "video", "fused")


class MavilModel(nn.Module):
    def __init__(self, config: MavilConfig):
        super().__init__()
        self.config = config
        dim = config.dim
        self.audio_embed = nn.Linear(config.audio.patch_values, dim)
        self.video_embed = nn.Linear(config.video.patch_values, dim)
        self.audio_places = nn.Parameter(0.02 * torch.randn(config.audio.tokens, dim))
        self.video_places = nn.Parameter(0.02 * torch.randn(config.video.tokens, dim))
        self.modality_offsets = nn.Parameter(0.02 * torch.randn(2, dim))  # audio, video
        self.audio_encoder = TransformerStack(config.audio_encoder)
        self.audio_norm = RMSNorm(dim, config.audio_encoder.norm_eps)
        self.video_encoder = TransformerStack(config.video_encoder)
        self.video_norm = RMSNorm(dim, config.video_encoder.norm_eps)
        self.fusion = TransformerStack(config.fusion)
        self.fusion_norm = RMSNorm(dim, config.fusion.norm_eps)
        self.audio_projection = nn.Linear(dim, config.embed_dim, bias=False)
        self.video_projection = nn.Linear(dim, config.embed_dim, bias=False)
        self.heads = nn.ModuleDict(
            {modality: nn.Linear(dim, len(config.labels)) for modality in MODALITIES} if config.labels else {}
        )

    @staticmethod
    def _places(tokens: int, batch: int, keep: torch.Tensor | None, device) -> torch.Tensor:
        return keep if keep is not None else torch.arange(tokens, device=device).expand(batch, tokens)

    def encode_audio(self, patches: torch.Tensor, keep: torch.Tensor | None = None):
        """Spectrogram patches [B, N, P] (only the places ``keep`` [B, K] when
        masked) -> (tokens [B, K, dim], their places [B, K])."""
        places = self._places(patches.shape[1], patches.shape[0], keep, patches.device)
        h = self.audio_embed(patches) + self.audio_places
        h = torch.gather(h, 1, places[..., None].expand(-1, -1, h.shape[-1])) if keep is not None else h
        return self.audio_norm(self.audio_encoder.encode(h, places)), places

    def encode_video(self, tubes: torch.Tensor, keep: torch.Tensor | None = None):
        """Tubelets [B, N, P] (only the places ``keep`` [B, K] when masked) ->
        (tokens [B, K, dim], their places [B, K])."""
        places = self._places(tubes.shape[1], tubes.shape[0], keep, tubes.device)
        h = self.video_embed(tubes) + self.video_places
        h = torch.gather(h, 1, places[..., None].expand(-1, -1, h.shape[-1])) if keep is not None else h
        return self.video_norm(self.video_encoder.encode(h, places)), places

    def fuse(self, audio: torch.Tensor, audio_places: torch.Tensor, video: torch.Tensor,
             video_places: torch.Tensor) -> torch.Tensor:
        """Audio [B, Ka, dim] and video [B, Kv, dim] tokens -> fused tokens [B, Ka + Kv, dim]."""
        h = torch.cat([audio + self.modality_offsets[0], video + self.modality_offsets[1]], dim=1)
        places = torch.cat([audio_places, video_places + self.config.audio.tokens], dim=1)
        return self.fusion_norm(self.fusion.encode(h, places))

    def shared_audio(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled audio embeddings [B, dim] -> unit vectors in the shared space [B, embed_dim]."""
        return F.normalize(self.audio_projection(pooled), dim=-1)

    def shared_video(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.video_projection(pooled), dim=-1)
