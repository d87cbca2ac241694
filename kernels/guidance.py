"""CM3Leon's guided next-token scores: the plain PyTorch reference and the
Triton kernel that must match it.

The conditional stream reads the request's prompt; the unconditional one
reads the same sequence with the prompt's text replaced by ``<mask>``. Both
run in one batch, each with its own cache rows, and give logits over the
joint vocabulary at every step; guidance turns the pair into the scores the
sampler draws from (papers.md section 3):

- classifier-free guidance (``classifier_free``): uncond + scale * (cond - uncond);
- CD-K, self-contained contrastive decoding (``contrastive``): log p_cond(t)
  - log p_uncond(t) over the plausible tokens, p_cond(t) >= alpha * (k-th
  largest p_cond), and -inf elsewhere.

A call of ``guidance`` takes a decode step's paired logits, one row per
sequence, and the mask of what each row may write (text tokens inside an
image, image codes inside text are at -inf in both streams before either is
applied). Each row gets the next-token scores CM3Leon samples from
(``engines.cm3leon.decoding``) under its own guidance: none, classifier-free
or CD-K, with what the row may not write at -inf. Given a temperature, it
also gets the probabilities the sampler draws from before its top-k and
top-p: ``softmax((scores - max) / temperature)`` in float32, which top-p can
sort (a row with a NaN score or no finite one is all NaN, as in the
sampler). The engine does not ask for them yet: the shared sampler
(``engines.sampling``) computes its own.

Every setting (mode, scale, alpha, k, temperature) is one value for all the
rows or a sequence of one per row, so a batch of requests with different
guidance is one call: one kernel launch on a GPU."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch

from patchwork.kernels import dispatch
from patchwork.kernels.benchcase import BenchCase, sets_beyond_cache
from patchwork.kernels.dispatch import launched

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a declared dependency
    triton = None

# A row's guidance; its index here is the kernel's code for it.
MODES = ("none", "classifier_free", "contrastive")
# (atol, rtol) of the kernel against the reference, by logits dtype. Logits
# widen exactly to float32 and all that follows is float32 in both, so every
# dtype gets the same bound: it covers the order of float32 operations (an
# online normaliser against a two-pass one, fused multiply-adds).
TOLERANCE = {torch.float32: (1e-4, 1e-5), torch.float16: (1e-4, 1e-5), torch.bfloat16: (1e-4, 1e-5)}
# The kernel keeps CD-K's k largest logits in registers up to this k; for a
# larger one the k-th largest comes from torch.topk before the launch.
MAX_TOP_K = 64
MAX_BLOCK = 2048

T = TypeVar("T")
PerRow = T | Sequence[T]


def _per_row(value: PerRow, rows: int) -> list:
    """One setting for every row, or one per row."""
    if isinstance(value, (list, tuple)):
        if len(value) != rows:
            raise ValueError(f"{len(value)} settings for {rows} rows")
        return list(value)
    return [value] * rows


def _settings(rows: int, mode, scale, alpha, k) -> list[tuple[str, float, float, int]]:
    """Each row's (mode, scale, alpha, k), the mode one of ``MODES``."""
    modes = _per_row(mode, rows)
    for m in modes:
        if m not in MODES:
            raise ValueError(f"guidance mode {m!r}: expected one of {', '.join(MODES)}")
    modes = [MODES[MODES.index(m)] for m in modes]  # a str enum's member -> its plain value
    return list(zip(modes, _per_row(scale, rows), _per_row(alpha, rows), _per_row(k, rows)))


def _temperatures(temperature: PerRow[float], rows: int) -> list[float]:
    temperatures = _per_row(temperature, rows)
    if not all(t > 0 for t in temperatures):
        raise ValueError(f"temperatures must be positive, not {temperatures}")
    return temperatures


def classifier_free(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """cond, uncond: logits [..., V] -> guided logits [..., V]; scale 1 is the conditional stream."""
    return uncond + scale * (cond - uncond)


def plausible(log_cond: torch.Tensor, alpha: float, k: int) -> torch.Tensor:
    """CD-K's plausible set: log-probabilities [..., V] -> bool [..., V], the
    tokens with p >= alpha * (the k-th largest p)."""
    kth = torch.topk(log_cond, min(k, log_cond.shape[-1]), dim=-1).values[..., -1:]
    return log_cond >= kth + torch.log(torch.tensor(alpha))  # in logs


def contrastive(cond: torch.Tensor, uncond: torch.Tensor, alpha: float, k: int) -> torch.Tensor:
    """cond, uncond: logits [..., V] -> CD-K scores [..., V] (-inf outside the plausible set)."""
    log_cond = torch.log_softmax(cond.float(), dim=-1)
    log_uncond = torch.log_softmax(uncond.float(), dim=-1)
    plausible_set = plausible(log_cond, alpha, k)
    # Guard tokens masked in both streams (-inf - -inf) from turning into NaN.
    return torch.where(plausible_set, log_cond - log_uncond.clamp(min=torch.finfo(log_uncond.dtype).min),
                       float("-inf"))


def _guided(cond: torch.Tensor, uncond: torch.Tensor | None, allowed: torch.Tensor, mode: str, scale: float,
            alpha: float, k: int) -> torch.Tensor:
    """The scores of rows that share one setting: logits [n, V] of both
    streams, allowed [V] or [n, V] -> scores [n, V]. The mask comes after
    classifier-free guidance's combination and before CD-K's softmaxes."""
    cond = cond.float()
    if mode == "none":
        return cond.masked_fill(~allowed, float("-inf"))
    if uncond is None:
        raise ValueError(f"a {mode} row needs its unconditional logits")
    uncond = uncond.float()
    if mode == "classifier_free":
        return classifier_free(cond, uncond, scale).masked_fill(~allowed, float("-inf"))
    return contrastive(cond.masked_fill(~allowed, float("-inf")), uncond.masked_fill(~allowed, float("-inf")),
                       alpha, k)


def guidance_reference(cond: torch.Tensor, uncond: torch.Tensor | None, allowed: torch.Tensor, mode: PerRow[str],
                       scale: PerRow[float], alpha: PerRow[float], k: PerRow[int],
                       temperature: PerRow[float] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """cond, uncond: logits [R, V] (uncond None when no row is guided);
    allowed: bool [V] or [R, V] -> (scores [R, V], probs [R, V] or None
    without a temperature), both float32. The rows that share a setting are
    computed together (the same numbers as one at a time)."""
    rows = cond.shape[0]
    groups: dict[tuple, list[int]] = {}
    for row, setting in enumerate(_settings(rows, mode, scale, alpha, k)):
        groups.setdefault(setting, []).append(row)
    scores = torch.empty(cond.shape, dtype=torch.float32, device=cond.device)
    for setting, members in groups.items():
        index = slice(None) if len(members) == rows else torch.tensor(members, device=cond.device)
        scores[index] = _guided(cond[index], None if uncond is None else uncond[index],
                                allowed if allowed.dim() == 1 else allowed[index], *setting)
    if temperature is None:
        return scores, None
    temperatures = torch.tensor(_temperatures(temperature, rows), device=cond.device)[:, None]
    return scores, torch.softmax((scores - scores.amax(dim=-1, keepdim=True)) / temperatures, dim=-1)


if triton is not None:

    @triton.jit
    def _online_softmax(running_max, total, x, temperature):
        """The running max and sum of exp((x - max) / temperature) after the
        block ``x`` (no NaN in it; -inf adds nothing, even when all is -inf)."""
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        base = tl.where(new_max == float("-inf"), 0.0, new_max)
        total = total * tl.exp((running_max - base) / temperature) + tl.sum(tl.exp((x - base) / temperature), axis=0)
        return new_max, total

    @triton.jit
    def _merge_top(top, x, slots, cols, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
        """top [TOP_K] (the largest values so far, unsorted), a block x [BLOCK]
        -> the TOP_K largest of both, ties counted as topk counts them."""
        low = tl.min(top, axis=0)
        best = tl.max(x, axis=0)
        while best > low:  # the block's best replaces one copy of the smallest kept value
            top = tl.where(slots == tl.min(tl.where(top == low, slots, TOP_K), axis=0), best, top)
            x = tl.where(cols == tl.min(tl.where(x == best, cols, BLOCK), axis=0), float("-inf"), x)
            low = tl.min(top, axis=0)
            best = tl.max(x, axis=0)
        return top

    @triton.jit
    def _load(cond_row, uncond_row, allowed_row, cols, n_cols, n_uncond):
        """One block of a row: both streams in float32 (-inf past the row; the
        unconditional one read up to ``n_uncond``, 0 for an unguided row) and
        the allowed mask."""
        in_row = cols < n_cols
        cond = tl.load(cond_row + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        uncond = tl.load(uncond_row + cols, mask=cols < n_uncond, other=float("-inf")).to(tl.float32)
        allowed = tl.load(allowed_row + cols, mask=in_row, other=0) != 0
        return cond, uncond, allowed

    @triton.jit
    def _block_scores(cond, uncond, allowed, mode, scale, max_cond, log_sum_cond, max_uncond, log_sum_uncond,
                      threshold):
        """A block's scores in the row's mode (0 none, 1 classifier-free, 2
        CD-K), each as the reference computes it."""
        cfg = tl.where(allowed, uncond + scale * (cond - uncond), float("-inf"))
        cond = tl.where(allowed, cond, float("-inf"))
        uncond = tl.where(allowed, uncond, float("-inf"))
        log_cond = cond - max_cond - log_sum_cond
        log_uncond = uncond - max_uncond - log_sum_uncond
        # The reference's clamp: both streams at -inf give -inf, not NaN (and NaN stays NaN).
        log_uncond = tl.where(log_uncond < -3.4028234663852886e38, -3.4028234663852886e38, log_uncond)
        cdk = tl.where(log_cond >= threshold, log_cond - log_uncond, float("-inf"))
        return tl.where(mode == 0, cond, tl.where(mode == 1, cfg, cdk))

    @triton.jit
    def _guidance_kernel(cond_ptr, uncond_ptr, allowed_ptr, settings_ptr, scores_ptr, probs_ptr,
                         cond_row_stride, uncond_row_stride, allowed_row_stride, settings_row_stride,
                         out_row_stride, n_cols,
                         BLOCK: tl.constexpr, TOP_K: tl.constexpr, PROBS: tl.constexpr):
        # One program per row. Settings: mode, scale, log alpha, k, temperature, k-th largest (TOP_K 0).
        row = tl.program_id(0).to(tl.int64)
        setting = settings_ptr + row * settings_row_stride
        mode = tl.load(setting).to(tl.int32)
        scale = tl.load(setting + 1)
        log_alpha = tl.load(setting + 2)
        temperature = tl.load(setting + 4)
        cond_row = cond_ptr + row * cond_row_stride
        uncond_row = uncond_ptr + row * uncond_row_stride
        allowed_row = allowed_ptr + row * allowed_row_stride
        cols = tl.arange(0, BLOCK)
        n_uncond = tl.where(mode == 0, 0, n_cols)

        # Pass 1, CD-K rows only: both streams' log-softmax normalisers (online
        # max and sum) and the k-th largest allowed conditional logit.
        max_cond = float("-inf")
        sum_cond = 0.0
        max_uncond = float("-inf")
        sum_uncond = 0.0
        nan_cond = 0
        nan_uncond = 0
        if TOP_K > 0:
            slots = tl.arange(0, TOP_K)
            top = tl.where(slots < tl.load(setting + 3).to(tl.int32), float("-inf"), float("inf"))  # +inf: unused
        for start in range(0, tl.where(mode == 2, n_cols, 0), BLOCK):
            cond, uncond, allowed = _load(cond_row, uncond_row, allowed_row, start + cols, n_cols, n_uncond)
            cond = tl.where(allowed, cond, float("-inf"))
            uncond = tl.where(allowed, uncond, float("-inf"))
            nan_cond += tl.sum((cond != cond).to(tl.int32), axis=0)
            nan_uncond += tl.sum((uncond != uncond).to(tl.int32), axis=0)
            cond = tl.where(cond != cond, float("-inf"), cond)
            uncond = tl.where(uncond != uncond, float("-inf"), uncond)
            max_cond, sum_cond = _online_softmax(max_cond, sum_cond, cond, 1.0)
            max_uncond, sum_uncond = _online_softmax(max_uncond, sum_uncond, uncond, 1.0)
            if TOP_K > 0:
                top = _merge_top(top, cond, slots, cols, TOP_K, BLOCK)
        if TOP_K > 0:
            kth = tl.min(top, axis=0)
        else:
            kth = tl.load(setting + 5)
        log_sum_cond = tl.log(sum_cond)
        # As in the reference: a stream with a NaN or nothing allowed normalises to NaN; a NaN
        # conditional stream leaves nothing plausible, a NaN unconditional one NaN scores.
        log_sum_uncond = tl.where((nan_uncond > 0) | (max_uncond == float("-inf")), float("nan"),
                                  tl.log(sum_uncond))
        threshold = tl.where((nan_cond > 0) | (max_cond == float("-inf")), float("inf"),
                             kth - max_cond - log_sum_cond + log_alpha)  # log p >= log(alpha * p_k)

        # Pass 2, with probabilities: the scores' max and sum of exp((s - max) / temperature).
        if PROBS:
            max_score = float("-inf")
            sum_score = 0.0
            nan_score = 0
            for start in range(0, n_cols, BLOCK):
                cond, uncond, allowed = _load(cond_row, uncond_row, allowed_row, start + cols, n_cols, n_uncond)
                scores = _block_scores(cond, uncond, allowed, mode, scale, max_cond, log_sum_cond, max_uncond,
                                       log_sum_uncond, threshold)
                nan_score += tl.sum((scores != scores).to(tl.int32), axis=0)
                max_score, sum_score = _online_softmax(max_score, sum_score,
                                                       tl.where(scores != scores, float("-inf"), scores), temperature)
            unusable = (nan_score > 0) | (max_score == float("-inf"))

        # Last pass: the scores (and probabilities) written.
        for start in range(0, n_cols, BLOCK):
            cond, uncond, allowed = _load(cond_row, uncond_row, allowed_row, start + cols, n_cols, n_uncond)
            scores = _block_scores(cond, uncond, allowed, mode, scale, max_cond, log_sum_cond, max_uncond,
                                   log_sum_uncond, threshold)
            in_row = start + cols < n_cols
            tl.store(scores_ptr + row * out_row_stride + start + cols, scores, mask=in_row)
            if PROBS:
                probs = tl.where(unusable, float("nan"), tl.exp((scores - max_score) / temperature) / sum_score)
                tl.store(probs_ptr + row * out_row_stride + start + cols, probs, mask=in_row)


def guidance_triton(cond: torch.Tensor, uncond: torch.Tensor | None, allowed: torch.Tensor, mode: PerRow[str],
                    scale: PerRow[float], alpha: PerRow[float], k: PerRow[int],
                    temperature: PerRow[float] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``guidance_reference`` in one launch, one program per row: a pass over
    the row for CD-K's normalisers and k-th largest logit (CD-K rows only),
    one for the temperature softmax's max and sum (with a temperature only),
    and one that writes. For k beyond ``MAX_TOP_K`` the k-th largest comes
    from torch.topk before the launch. Rows may be strided; a strided last
    dimension is copied first."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    rows, n_cols = cond.shape
    settings = _settings(rows, mode, scale, alpha, k)
    if uncond is None and any(m != "none" for m, *_ in settings):
        raise ValueError("guided rows need their unconditional logits")
    cond = cond if cond.stride(-1) == 1 else cond.contiguous()
    uncond = cond if uncond is None else uncond if uncond.stride(-1) == 1 else uncond.contiguous()
    allowed = allowed if allowed.stride(-1) == 1 else allowed.contiguous()
    temperatures = [1.0] * rows if temperature is None else _temperatures(temperature, rows)
    log_alphas = {a: torch.log(torch.tensor(a)).item() for _, _, a, _ in settings}  # as the reference rounds it
    ks = [min(row_k, n_cols) if m == "contrastive" else 1 for m, _, _, row_k in settings]
    table = torch.tensor([[MODES.index(m), s, log_alphas[a], row_k, t, 0.0]
                          for (m, s, a, _), row_k, t in zip(settings, ks, temperatures)], dtype=torch.float32)
    table = table.to(cond.device)
    top_k = triton.next_power_of_2(max(ks))
    if top_k > MAX_TOP_K:
        masked = cond.float().masked_fill(~allowed, float("-inf"))
        wanted = table[:, 3:4].long() - 1
        table[:, 5] = torch.topk(masked, max(ks), dim=-1).values.gather(1, wanted)[:, 0]
        top_k = 0
    scores = torch.empty((rows, n_cols), dtype=torch.float32, device=cond.device)
    probs = None if temperature is None else torch.empty_like(scores)
    block = min(triton.next_power_of_2(n_cols), MAX_BLOCK)
    launched("guidance")
    _guidance_kernel[(rows,)](
        cond, uncond, allowed.view(torch.uint8), table, scores, scores if probs is None else probs,
        cond.stride(0), uncond.stride(0), 0 if allowed.dim() == 1 else allowed.stride(0), table.stride(0),
        scores.stride(0), n_cols, BLOCK=block, TOP_K=top_k, PROBS=probs is not None,
        num_warps=8 if block >= 1024 else 4,
    )
    return scores, probs


def guidance(cond: torch.Tensor, uncond: torch.Tensor | None, allowed: torch.Tensor, mode: PerRow[str],
             scale: PerRow[float], alpha: PerRow[float], k: PerRow[int],
             temperature: PerRow[float] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``guidance_reference`` or the kernel, as ``dispatch`` decides for the logits."""
    if dispatch.use_triton(cond, *([] if uncond is None else [uncond])):
        return guidance_triton(cond, uncond, allowed, mode, scale, alpha, k, temperature)
    return guidance_reference(cond, uncond, allowed, mode, scale, alpha, k, temperature)


def bench_case(scale: int, device, dtype: torch.dtype) -> BenchCase:
    """A decode step of ``4 * scale`` sequences over ``min(1024 * scale,
    65,536)`` symbols (a CM3Leon-sized joint vocabulary at the GPU's scale
    64) per input set, with temperature-1 probabilities. Rows cycle through
    none, classifier-free (scale 3) and CD-K (k 5, alpha 0.1) and alternate
    between writing text (the first 7/8 of the vocabulary) and image codes
    (the last 1/8). Logits lie on a 1/64 grid, so no logit sits within
    rounding of CD-K's cut (log 0.1 is far from a multiple of 1/64)."""
    rows, vocab = 4 * scale, min(1024 * scale, 65_536)
    sets = sets_beyond_cache(2 * rows * vocab * dtype.itemsize, device)
    generator = torch.Generator(device=device).manual_seed(vocab)
    text = torch.arange(vocab, device=device) < vocab * 7 // 8
    allowed = torch.stack([text if row % 2 == 0 else ~text for row in range(rows)])
    settings = ([MODES[row % 3] for row in range(rows)], 3.0, 0.1, 5, 1.0)

    def logits() -> torch.Tensor:
        return (torch.round(torch.randn(rows, vocab, device=device, generator=generator) * 192) / 64).to(dtype)

    inputs = [(logits(), logits(), allowed, *settings) for _ in range(sets)]
    return BenchCase(
        name=f"guidance[{rows}x{vocab}]", inputs=inputs, triton=guidance_triton, baseline=guidance_reference,
        bytes_moved=2 * rows * vocab * dtype.itemsize + rows * vocab + 2 * rows * vocab * 4,  # logits, mask, outputs
        tolerance=TOLERANCE[dtype],
    )
