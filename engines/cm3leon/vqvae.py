"""The image tokenizer: a VQ-VAE with an exponential-moving-average codebook.

An image (size x size RGB) becomes a grid of codes, size/4 on a side (two
stride-2 convolutions), each one of ``codes`` vectors; the decoder turns the
grid back into pixels. The codebook follows the EMA scheme of van den Oord
et al. (2017, appendix): code vectors are running means of the encoder
outputs assigned to them, with Laplace smoothing of the counts, and the
encoder is held near its codes by a commitment loss. The codes start on
encoder outputs of the first training batch, and a code whose count falls
below ``RESTART_BELOW`` is restarted on a random encoder output of the
current batch. This is the small-scale counterpart of CM3Leon's
tokenizer (256x256 -> 32x32 codes of 8192): 32x32 -> 8x8 codes of 512 here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class VqConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image_size: int = 32
    channels: int = 64
    codes: int = Field(default=512, ge=2)
    code_dim: int = 32
    commitment: float = 0.25
    decay: float = 0.99

    @property
    def grid(self) -> int:
        """Codes on each side of an image's grid."""
        return self.image_size // 4


# A code whose EMA count of assignments falls below this is restarted.
RESTART_BELOW = 0.1


class _Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Codebook(nn.Module):
    """Nearest-code quantisation; in training, the EMA update of the codes."""

    def __init__(self, codes: int, dim: int, decay: float):
        super().__init__()
        self.decay = decay
        self.register_buffer("vectors", torch.randn(codes, dim) * 0.1)  # (codes, dim)
        self.register_buffer("counts", torch.ones(codes))  # EMA of assignments per code
        self.register_buffer("sums", self.vectors.clone())  # EMA of the sum of assigned vectors
        self.register_buffer("started", torch.tensor(False))  # codes drawn from the first batch yet

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """flat (n, dim) -> code ids (n,)."""
        distances = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.vectors.T + self.vectors.pow(2).sum(1)
        return distances.argmin(1)

    @torch.no_grad()
    def update(self, flat: torch.Tensor, ids: torch.Tensor) -> None:
        if not self.started:
            self._restart(torch.ones_like(self.counts, dtype=torch.bool), flat)
            self.started.fill_(True)
            return
        one_hot = F.one_hot(ids, self.vectors.shape[0]).type_as(flat)  # (n, codes)
        self.counts.mul_(self.decay).add_(one_hot.sum(0), alpha=1 - self.decay)
        self.sums.mul_(self.decay).add_(one_hot.T @ flat, alpha=1 - self.decay)
        total = self.counts.sum()
        smoothed = (self.counts + 1e-5) / (total + self.vectors.shape[0] * 1e-5) * total
        self.vectors.copy_(self.sums / smoothed[:, None])
        self._restart(self.counts < RESTART_BELOW, flat)

    def _restart(self, dead: torch.Tensor, flat: torch.Tensor) -> None:
        """Moves the ``dead`` codes onto random encoder outputs of this batch."""
        if dead.any():
            picks = flat[torch.randint(len(flat), (int(dead.sum()),), device=flat.device)]
            self.vectors[dead] = picks
            self.sums[dead] = picks
            self.counts[dead] = 1.0


class VqVae(nn.Module):
    def __init__(self, config: VqConfig):
        super().__init__()
        self.config = config
        c = config.channels
        self.encoder = nn.Sequential(
            nn.Conv2d(3, c, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(c, c, 4, stride=2, padding=1), _Residual(c), _Residual(c), nn.ReLU(),
            nn.Conv2d(c, config.code_dim, 1),
        )
        self.codebook = Codebook(config.codes, config.code_dim, config.decay)
        self.decoder = nn.Sequential(
            nn.Conv2d(config.code_dim, c, 3, padding=1), _Residual(c), _Residual(c), nn.ReLU(),
            nn.ConvTranspose2d(c, c, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(c, 3, 4, stride=2, padding=1),
        )

    @staticmethod
    def to_unit(images: torch.Tensor) -> torch.Tensor:
        """uint8 (b, size, size, 3) -> float (b, 3, size, size) in [-1, 1]."""
        return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0

    @staticmethod
    def to_pixels(unit: torch.Tensor) -> torch.Tensor:
        """float (b, 3, size, size) in [-1, 1] -> uint8 (b, size, size, 3)."""
        return ((unit.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)

    def _latents(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.to_unit(images))  # (b, code_dim, grid, grid)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (b, size, size, 3) -> code ids (b, grid * grid), row by row."""
        latents = self._latents(images)
        flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        return self.codebook.nearest(flat).view(len(images), -1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """code ids (b, grid * grid) -> uint8 (b, size, size, 3)."""
        grid = self.config.grid
        vectors = self.codebook.vectors[codes].view(len(codes), grid, grid, -1).permute(0, 3, 1, 2)
        return self.to_pixels(self.decoder(vectors))

    def loss(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Training loss on a batch (reconstruction + commitment); updates the codebook."""
        target = self.to_unit(images)
        latents = self.encoder(target)
        flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        ids = self.codebook.nearest(flat.detach())
        quantized = self.codebook.vectors[ids]
        commitment = F.mse_loss(flat, quantized)
        self.codebook.update(flat.detach(), ids)
        straight_through = flat + (quantized - flat).detach()
        grid = self.config.grid
        decoded = self.decoder(straight_through.view(len(images), grid, grid, -1).permute(0, 3, 1, 2))
        reconstruction = F.mse_loss(decoded, target)
        used = ids.unique().numel()
        return reconstruction + self.config.commitment * commitment, {
            "reconstruction": reconstruction.item(), "commitment": commitment.item(), "codes_used": used,
        }
