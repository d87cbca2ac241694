"""Guided next-token scores from a conditional and an unconditional stream.

The conditional stream reads the request's prompt; the unconditional one
reads the same sequence with the prompt's text replaced by ``<mask>``. Both
run in one batch, each with its own cache rows, and give logits over the
joint vocabulary at every step; these functions turn the pair into the
scores the sampler draws from (papers.md section 3):

- classifier-free guidance: uncond + scale * (cond - uncond);
- CD-K (self-contained contrastive decoding): log p_cond(t) - log p_uncond(t)
  over the plausible tokens, p_cond(t) >= alpha * (k-th largest p_cond), and
  -inf elsewhere.

Tokens the current span may not hold (text tokens inside an image, image
codes inside text) are at -inf in both streams before either is applied.
"""

from __future__ import annotations

import torch


def classifier_free(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """cond, uncond: logits [..., V] -> guided logits [..., V]; scale 1 is the conditional stream."""
    return uncond + scale * (cond - uncond)


def contrastive(cond: torch.Tensor, uncond: torch.Tensor, alpha: float, k: int) -> torch.Tensor:
    """cond, uncond: logits [..., V] -> CD-K scores [..., V] (-inf outside the plausible set)."""
    log_cond = torch.log_softmax(cond.float(), dim=-1)
    log_uncond = torch.log_softmax(uncond.float(), dim=-1)
    kth = torch.topk(log_cond, min(k, log_cond.shape[-1]), dim=-1).values[..., -1:]
    plausible = log_cond >= kth + torch.log(torch.tensor(alpha))  # p >= alpha * p_k, in logs
    # Guard tokens masked in both streams (-inf - -inf) from turning into NaN.
    return torch.where(plausible, log_cond - log_uncond.clamp(min=torch.finfo(log_uncond.dtype).min), float("-inf"))
