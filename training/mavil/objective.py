"""MAViL's training objectives.

Stage 1 (``stage_one_loss``): both inputs are masked (a random
``audio_masking`` / ``video_masking`` fraction of patches hidden per clip);
the encoders read what is left, the fusion encoder joins it, and

- a small decoder per modality (``MaskedDecoder``) rebuilds the hidden
  patches from the fused tokens of that modality (mean squared error on the
  hidden patches, each patch normalised to zero mean and unit variance, as MAE
  does);
- inter-modal InfoNCE pulls each clip's pooled audio and video embeddings
  (in the shared space) together against the other clips of the batch. It
  reads a second, lightly masked view of each modality (``contrastive_masking``
  hidden): at the reconstruction's masking a small moving shape is often
  hidden altogether, and the pair would teach the shared space nothing;
- intra-modal InfoNCE pulls the heavily and the lightly masked view of one
  modality together, through projection heads of its own
  (``TrainingHeads``, dropped after training), so that what makes two views
  of one clip alike does not have to live in the shared audio-video space.

Stage 2 (``stage_two_loss``): a student with masked inputs predicts, through
the same decoders, the frozen stage-1 teacher's fused tokens of the whole
clip (normalised per token, as data2vec does) at the hidden places, with the
same contrastive terms. The teacher reads whole clips, so its targets depend
on the clip alone: ``teacher_targets`` computes them once per training clip,
not once per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from patchwork.engines.layers import RMSNorm, TransformerConfig, TransformerStack
from patchwork.engines.mavil.model import MavilModel
from patchwork.training.mavil.presets import MavilPreset


class MaskedDecoder(nn.Module):
    """Visible tokens [B, K, dim_in] at places ``keep`` [B, K] -> a prediction
    [B, tokens, out] at every place: the visible tokens and a learned mask token
    elsewhere, each with a learned embedding of its place, through a small
    bidirectional transformer."""

    def __init__(self, dim_in: int, config: TransformerConfig, tokens: int, out: int):
        super().__init__()
        self.project = nn.Linear(dim_in, config.dim)
        self.mask_token = nn.Parameter(0.02 * torch.randn(config.dim))
        self.places = nn.Parameter(0.02 * torch.randn(tokens, config.dim))
        self.stack = TransformerStack(config)
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.out = nn.Linear(config.dim, out)

    def forward(self, visible: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        batch, tokens = visible.shape[0], self.places.shape[0]
        h = self.mask_token.expand(batch, tokens, -1)
        h = torch.scatter(h, 1, keep[..., None].expand(-1, -1, h.shape[-1]), self.project(visible)) + self.places
        places = torch.arange(tokens, device=h.device).expand(batch, tokens)
        return self.out(self.norm(self.stack.encode(h, places)))


class TrainingHeads(nn.Module):
    """What training adds to the model and drops afterwards: a masked decoder
    per modality (``audio_out`` / ``video_out`` values per place) and the
    intra-modal projection heads (pooled tokens -> the intra-modal space)."""

    def __init__(self, model: MavilModel, preset: MavilPreset, audio_out: int, video_out: int):
        super().__init__()
        config = model.config
        self.audio = MaskedDecoder(config.dim, preset.decoder, config.audio.tokens, audio_out)
        self.video = MaskedDecoder(config.dim, preset.decoder, config.video.tokens, video_out)
        self.intra_audio = nn.Linear(config.dim, config.embed_dim, bias=False)
        self.intra_video = nn.Linear(config.dim, config.embed_dim, bias=False)


@dataclass
class Batch:
    audio: torch.Tensor  # spectrogram patches [B, Na, Pa]
    video: torch.Tensor  # tubelets [B, Nv, Pv]


def kept_places(batch: int, tokens: int, masking: float, generator: torch.Generator) -> torch.Tensor:
    """[B, K] sorted places each clip keeps visible (at least one)."""
    keep = max(1, round(tokens * (1 - masking)))
    return torch.rand(batch, tokens, generator=generator).argsort(dim=1)[:, :keep].sort(dim=1).values


def hidden(keep: torch.Tensor, tokens: int) -> torch.Tensor:
    """Bool [B, tokens]: True at the places ``keep`` leaves out."""
    mask = torch.ones(keep.shape[0], tokens, dtype=torch.bool, device=keep.device)
    return mask.scatter(1, keep, False)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between unit vectors a [B, E] and b [B, E]; row i of each is a pair."""
    logits = a @ b.T / temperature
    labels = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def normalised_patches(patches: torch.Tensor) -> torch.Tensor:
    mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
    return (patches - mean) / (var + 1e-6).sqrt()


def _masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return ((prediction - target).pow(2).mean(-1) * mask).sum() / mask.sum().clamp(min=1)


def _contrastive(model: MavilModel, heads: TrainingHeads, batch: Batch, preset: MavilPreset,
                 generator: torch.Generator, audio: torch.Tensor, video: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inter- and intra-modal InfoNCE, given the heavily masked views' audio and video tokens."""
    if not (preset.inter_weight or preset.intra_weight):
        return {}
    config = model.config
    light_audio = model.encode_audio(
        batch.audio, kept_places(len(batch.audio), config.audio.tokens, preset.contrastive_masking, generator))[0]
    light_video = model.encode_video(
        batch.video, kept_places(len(batch.video), config.video.tokens, preset.contrastive_masking, generator))[0]
    losses = {}
    if preset.inter_weight:
        losses["inter"] = preset.inter_weight * info_nce(
            model.shared_audio(light_audio.mean(1)), model.shared_video(light_video.mean(1)), preset.temperature)
    if preset.intra_weight:
        def intra(head: nn.Linear, heavy: torch.Tensor, light: torch.Tensor) -> torch.Tensor:
            return info_nce(F.normalize(head(heavy.mean(1)), dim=-1), F.normalize(head(light.mean(1)), dim=-1),
                            preset.temperature)

        losses["intra"] = preset.intra_weight * (intra(heads.intra_audio, audio, light_audio)
                                                 + intra(heads.intra_video, video, light_video)) / 2
    return losses


def _masked_forward(model: MavilModel, batch: Batch, preset: MavilPreset, generator: torch.Generator):
    config = model.config
    audio_keep = kept_places(len(batch.audio), config.audio.tokens, preset.audio_masking, generator)
    video_keep = kept_places(len(batch.video), config.video.tokens, preset.video_masking, generator)
    audio, audio_places = model.encode_audio(batch.audio, audio_keep)
    video, video_places = model.encode_video(batch.video, video_keep)
    fused = model.fuse(audio, audio_places, video, video_places)
    return audio, audio_keep, video, video_keep, fused


def stage_one_loss(model: MavilModel, heads: TrainingHeads, batch: Batch, preset: MavilPreset,
                   generator: torch.Generator, objective: str = "full") -> dict[str, torch.Tensor]:
    """The stage-1 loss terms (their sum is the loss) of one batch."""
    audio, audio_keep, video, video_keep, fused = _masked_forward(model, batch, preset, generator)
    losses = {}
    if objective in ("full", "reconstruction"):
        fused_audio, fused_video = fused[:, : audio.shape[1]], fused[:, audio.shape[1]:]
        losses["audio"] = _masked_mse(heads.audio(fused_audio, audio_keep), normalised_patches(batch.audio),
                                      hidden(audio_keep, batch.audio.shape[1]))
        losses["video"] = _masked_mse(heads.video(fused_video, video_keep), normalised_patches(batch.video),
                                      hidden(video_keep, batch.video.shape[1]))
    if objective in ("full", "contrastive"):
        losses.update(_contrastive(model, heads, batch, preset, generator, audio, video))
    return losses


@torch.no_grad()
def teacher_targets(teacher: MavilModel, clips: Batch, chunk: int = 256) -> torch.Tensor:
    """The teacher's fused tokens of each whole clip, normalised per token: [B, Na + Nv, teacher dim]."""
    targets = []
    for audio, video in zip(clips.audio.split(chunk), clips.video.split(chunk)):
        fused = teacher.fuse(*teacher.encode_audio(audio), *teacher.encode_video(video))
        targets.append(F.layer_norm(fused, fused.shape[-1:]))
    return torch.cat(targets)


def stage_two_loss(model: MavilModel, heads: TrainingHeads, targets: torch.Tensor, batch: Batch,
                   preset: MavilPreset, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The stage-2 loss terms of one batch, given its clips' ``teacher_targets``: the
    teacher's features at the hidden places, and the contrastive terms."""
    audio, audio_keep, video, video_keep, fused = _masked_forward(model, batch, preset, generator)
    tokens = batch.audio.shape[1]
    losses = {
        "audio": _masked_mse(heads.audio(fused[:, : audio.shape[1]], audio_keep), targets[:, :tokens],
                             hidden(audio_keep, tokens)),
        "video": _masked_mse(heads.video(fused[:, audio.shape[1]:], video_keep), targets[:, tokens:],
                             hidden(video_keep, batch.video.shape[1])),
    }
    losses.update(_contrastive(model, heads, batch, preset, generator, audio, video))
    return losses
