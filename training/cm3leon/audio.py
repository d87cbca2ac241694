"""Fitting the audio tokenizer (``engines.cm3leon.audio``) on training sounds.

The per-bin normalisation is the training spectrograms' mean and standard
deviation; the codebook is k-means (Lloyd's iterations) over every training
token vector, started on distinct random vectors; a code left with no
vectors restarts on the vector farthest from its code.
"""

from __future__ import annotations

import torch

from patchwork.engines.cm3leon.audio import AudioTokenizer


@torch.no_grad()
def fit_audio_tokenizer(tokenizer: AudioTokenizer, waveforms: torch.Tensor, iterations: int,
                        generator: torch.Generator) -> None:
    """waveforms: [n, samples] at 16 kHz, at least ``codes / tokens`` of them."""
    spectrogram = torch.cat([tokenizer.spectrogram(chunk) for chunk in waveforms.split(256)])  # [n, frames, mel]
    tokenizer.mean.copy_(spectrogram.mean(dim=(0, 1)))
    tokenizer.std.copy_(spectrogram.std(dim=(0, 1)).clamp(min=1e-3))
    vectors = tokenizer.vectors(spectrogram).flatten(0, 1)  # [n * tokens, token_dim]
    codes = tokenizer.config.codes
    if len(vectors) < codes:
        raise ValueError(f"{len(vectors)} token vectors cannot start {codes} codes")
    codebook = vectors[torch.randperm(len(vectors), generator=generator)[:codes]].clone()
    for _ in range(iterations):
        distances = torch.cdist(vectors, codebook)
        nearest = distances.argmin(dim=1)
        counts = torch.bincount(nearest, minlength=codes)
        sums = torch.zeros_like(codebook).index_add_(0, nearest, vectors)
        codebook = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], codebook)
        empty = (counts == 0).nonzero().flatten()
        if len(empty):
            farthest = distances.gather(1, nearest[:, None])[:, 0].topk(len(empty)).indices
            codebook[empty] = vectors[farthest]
    tokenizer.codebook.copy_(codebook)


@torch.no_grad()
def quantisation_error(tokenizer: AudioTokenizer, waveforms: torch.Tensor) -> float:
    """Mean squared error of the quantised token vectors over their variance
    (0: exact; 1: no better than every vector's mean), on ``waveforms``."""
    vectors = tokenizer.vectors(tokenizer.spectrogram(waveforms))
    quantised = tokenizer.codebook[tokenizer.quantise(vectors)]
    return float((quantised - vectors).pow(2).mean() / vectors.var(dim=(0, 1)).mean())
