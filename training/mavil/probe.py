"""What a MAViL encoder's embeddings are worth: linear probes and cross-modal retrieval.

A linear probe is a logistic regression on frozen embeddings (standardised
with the training set's mean and deviation, full-batch AdamW), trained on
the training clips and scored on held-out ones; the standardisation is folded
into the returned weights, so the head reads raw embeddings. Retrieval
recall@k: the fraction of held-out clips whose own other-modality embedding
is among the k nearest (cosine, in the shared space) of all held-out clips'.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from patchwork.engines.mavil.model import MavilModel
from patchwork.training.mavil.objective import Batch


@torch.no_grad()
def clip_embeddings(model: MavilModel, clips: Batch, chunk: int = 256) -> dict[str, torch.Tensor]:
    """Unmasked embeddings of every clip: pooled audio, video and fused [N, dim];
    shared_audio and shared_video [N, embed_dim]."""
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(clips.audio), chunk):
        audio, audio_places = model.encode_audio(clips.audio[start:start + chunk])
        video, video_places = model.encode_video(clips.video[start:start + chunk])
        found = {"audio": audio.mean(1), "video": video.mean(1),
                 "fused": model.fuse(audio, audio_places, video, video_places).mean(1)}
        found["shared_audio"], found["shared_video"] = model.shared_audio(found["audio"]), model.shared_video(
            found["video"])
        for name, value in found.items():
            parts.setdefault(name, []).append(value)
    return {name: torch.cat(values) for name, values in parts.items()}


def linear_probe(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                 classes: int, steps: int, seed: int = 0) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(held-out accuracy, weight [classes, dim], bias [classes]) of a probe reading raw embeddings."""
    mean, std = train.mean(0), train.std(0).clamp(min=1e-6)
    x = (train - mean) / std
    generator = torch.Generator().manual_seed(seed)
    weight = torch.nn.Parameter(0.01 * torch.randn(classes, train.shape[1], generator=generator))
    bias = torch.nn.Parameter(torch.zeros(classes))
    optimizer = torch.optim.AdamW([weight, bias], lr=0.05, weight_decay=1e-3)
    for _ in range(steps):
        loss = F.cross_entropy(x @ weight.T + bias, train_labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    folded_weight = (weight / std).detach()
    folded_bias = (bias - folded_weight @ mean).detach()
    accuracy = ((test @ folded_weight.T + folded_bias).argmax(1) == test_labels).float().mean().item()
    return accuracy, folded_weight, folded_bias


def retrieval_recall(shared_audio: torch.Tensor, shared_video: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """Audio->video and video->audio recall@k over one set of clips (row i of each is clip i)."""
    similarity = shared_audio @ shared_video.T
    truth = torch.arange(len(similarity))[:, None]
    metrics = {}
    for direction, scores in (("audio_to_video", similarity), ("video_to_audio", similarity.T)):
        ranked = scores.argsort(dim=1, descending=True)
        for k in ks:
            metrics[f"{direction}_recall@{k}"] = (ranked[:, :k] == truth).any(1).float().mean().item()
    return metrics


def attribute_probes(train: dict[str, torch.Tensor], train_attributes: dict[str, dict[str, torch.Tensor]],
                     heldout: dict[str, torch.Tensor], heldout_attributes: dict[str, dict[str, torch.Tensor]],
                     steps: int) -> dict[str, float]:
    """Held-out accuracy of a linear probe of each attribute each modality
    carries, on that modality's pooled embeddings: ``{"audio kind": ...}``.
    The attributes are ``training.mavil.attributes.labels`` of the clips, per modality."""
    metrics = {}
    for modality, attributes in train_attributes.items():
        for name, labels in attributes.items():
            metrics[f"{modality} {name}"] = linear_probe(train[modality], labels, heldout[modality],
                                                         heldout_attributes[modality][name],
                                                         int(labels.max()) + 1, steps)[0]
    return metrics
