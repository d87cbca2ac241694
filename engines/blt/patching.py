"""Patch boundaries from next-byte entropies (and the static baselines).

Patches are represented by a boolean start mask over positions 0..T of a
sequence of T symbols: position T is the symbol that would come next, so the
mask also says whether the next byte opens a new patch. That decision is
known from the prefix alone, which is what lets the decoder pick its patch
before the byte is generated.
"""

from __future__ import annotations

import torch

from patchwork.engines.blt.config import OFFSET, PatchingConfig


def _space_like(tokens: torch.Tensor) -> torch.Tensor:
    """Symbols that end a patch in space patching: not an ASCII letter or digit,
    not a UTF-8 continuation byte; special symbols always count."""
    byte = tokens - OFFSET
    alnum = (
        ((byte >= ord("0")) & (byte <= ord("9")))
        | ((byte >= ord("A")) & (byte <= ord("Z")))
        | ((byte >= ord("a")) & (byte <= ord("z")))
        | ((byte >= 0x80) & (byte < 0xC0))
    )
    return ~alnum | (tokens < OFFSET)


def rule_starts(
    cfg: PatchingConfig,
    position: torch.Tensor,
    entropy_prev: torch.Tensor | None,
    entropy_prev2: torch.Tensor | None,
    token_prev: torch.Tensor,
    token_prev2: torch.Tensor,
) -> torch.Tensor:
    """Whether position p >= 2 starts a patch by the mode's own rule (before
    ``max_patch_length``), from what is known once symbol p - 1 exists:
    H(x_p | x_<p), H(x_{p-1} | x_<p-1), x_{p-1} and x_{p-2}. All arguments
    broadcast: the full-sequence patcher passes whole rows, the incremental
    engine one position per sequence."""
    if cfg.mode == "entropy":
        return entropy_prev > cfg.threshold
    if cfg.mode == "monotonic":
        return (position == 2) | (entropy_prev - entropy_prev2 > cfg.threshold)
    if cfg.mode == "static":
        return (position - 1) % cfg.patch_size == 0
    # space: x_{p-1} is the first of a run of separators (special symbols always count)
    return _space_like(token_prev) & (~_space_like(token_prev2) | (token_prev < OFFSET))


def uses_entropies(cfg: PatchingConfig) -> bool:
    return cfg.mode in ("entropy", "monotonic")


def patch_starts(tokens: torch.Tensor, entropies: torch.Tensor | None, cfg: PatchingConfig) -> torch.Tensor:
    """tokens: [B, T]; entropies: [B, T] with entropies[:, t] = H(x_{t+1} | x_<=t)
    (needed by the entropy modes). Returns bool [B, T + 1]."""
    batch, seq = tokens.shape
    starts = torch.zeros(batch, seq + 1, dtype=torch.bool, device=tokens.device)
    starts[:, : min(2, seq + 1)] = True
    if seq >= 2:
        positions = torch.arange(2, seq + 1, device=tokens.device)
        starts[:, 2:] = rule_starts(
            cfg,
            positions,
            entropies[:, 1:] if entropies is not None else None,
            entropies[:, :-1] if entropies is not None else None,
            tokens[:, 1:],
            tokens[:, :-1],
        )
    if cfg.max_patch_length is not None:
        starts = split_long_patches(starts, cfg.max_patch_length)
    return starts


def split_long_patches(starts: torch.Tensor, max_length: int) -> torch.Tensor:
    """Add starts so that no patch is longer than ``max_length``: a patch of
    length L becomes L // max_length full pieces and the remainder."""
    positions = torch.arange(starts.shape[1], device=starts.device).expand_as(starts)
    patch_start = torch.where(starts, positions, torch.zeros_like(positions)).cummax(dim=1).values
    return starts | ((positions - patch_start) % max_length == 0)


def patch_ids_from_starts(starts: torch.Tensor) -> torch.Tensor:
    """Index of the patch each position belongs to: [B, T + 1] -> [B, T + 1]."""
    return starts.long().cumsum(dim=1) - 1


def lengths_from_starts(starts: list[bool] | torch.Tensor) -> list[int]:
    """Patch lengths of one sequence's start mask (the first entry must be a start)."""
    flags = starts.tolist() if isinstance(starts, torch.Tensor) else list(starts)
    lengths: list[int] = []
    for flag in flags:
        if flag or not lengths:
            lengths.append(1)
        else:
            lengths[-1] += 1
    return lengths
