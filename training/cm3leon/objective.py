"""Documents of captions and images, and the CM3 causal-masked objective.

A document is a caption and an image in either order, the two parts split by
``<break>``:

    caption <break> <img> codes </img>                     (caption -> image)
    <img> codes </img> <break> caption                     (image -> caption)
    <img> codes </img> <break> alt-text <break> caption    (re-aligning an alt-text)

A caption-and-sound document is the same with ``<audio> codes </audio>``
for the picture (and no alt-text).

A document may have its condition (the part before the first ``<break>``)
dropped to ``<mask>``: ``<mask> <break> <img> codes </img>``. That is what the
unconditional stream of guided decoding reads (``engines.cm3leon.prompts``),
so training on such documents teaches the model the unconditional
distribution that classifier-free guidance and CD-K contrast against. The
condition of infilling is the whole masked document: a CM3 sequence may have
it dropped, ``<mask> <mask:0> span ... <eos>``, the shape guided infilling's
unconditional stream reads.

The CM3 objective masks n ~ clamp(Poisson(1), 1, 16) non-overlapping spans,
each inside one part (so none crosses ``<break>``; the image markers are
never masked), replaces the i-th span (in document order) by ``<mask:i>``,
and appends every span after its sentinel at the end, then ``<eos>``:

    a <mask:0> circle <break> <img> ... </img> <mask:0> large red <eos>

The model is trained with the next-token loss on the whole sequence, so it
learns infilling, and both directions of generation, from one objective.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from patchwork.engines.cm3leon.prompts import IMAGE_MARKERS
from patchwork.engines.cm3leon.tokenizer import BREAK, EOS, MASK, MAX_SPANS, sentinel

Part = tuple[int, int]  # [start, end) of a maskable part of a document


def document(caption: Sequence[int], image: Sequence[int], image_first: bool,
             alt_text: Sequence[int] | None = None, condition_dropped: bool = False,
             markers: tuple[int, int] = IMAGE_MARKERS) -> tuple[list[int], list[Part]]:
    """The tokens of a caption-and-image document and its maskable parts (the
    caption, the codes). An image-first document may carry the image's
    alt-text between the image and the caption, which teaches re-aligning it;
    the alt-text itself is never masked. With ``condition_dropped`` the first
    part (the image of an image-first document, else the caption) is ``<mask>``.
    A caption-and-sound document is the same with the sound's codes between
    ``AUDIO_MARKERS``."""
    picture = [markers[0], *image, markers[1]]
    if image_first:
        noted = [*alt_text, BREAK] if alt_text is not None else []
        condition = [MASK] if condition_dropped else picture
        tokens = [*condition, BREAK, *noted, *caption]
        parts = [(len(condition) + 1 + len(noted), len(tokens))]
        if not condition_dropped:
            parts.insert(0, (1, 1 + len(image)))
    else:
        condition = [MASK] if condition_dropped else list(caption)
        tokens = [*condition, BREAK, *picture]
        parts = [(len(condition) + 2, len(condition) + 2 + len(image))]
        if not condition_dropped:
            parts.insert(0, (0, len(caption)))
    return tokens, [(start, end) for start, end in parts if end > start]


def bank_document(caption: Sequence[int], image: Sequence[int]) -> list[int]:
    """A memory-bank document as it is prepended to a prompt: caption -> image, then ``<eos>``."""
    return [*document(caption, image, image_first=False)[0], EOS]


def span_count(rng: random.Random) -> int:
    """clamp(Poisson(1), 1, MAX_SPANS), by Knuth's method."""
    limit, count, product = math.exp(-1.0), 0, rng.random()
    while product > limit:
        count += 1
        product *= rng.random()
    return min(max(count, 1), MAX_SPANS)


def pick_spans(parts: Sequence[Part], count: int, rng: random.Random, tries: int = 20) -> list[Part]:
    """Up to ``count`` non-overlapping, non-adjacent spans, each inside one part:
    a start drawn uniformly over every maskable position, a length uniform in
    [1, half its part] (cut at the part's end)."""
    positions = [p for start, end in parts for p in range(start, end)]
    spans: list[Part] = []
    for _ in range(count):
        for _ in range(tries):
            begin = rng.choice(positions)
            start, end = next(part for part in parts if part[0] <= begin < part[1])
            length = rng.randint(1, max(1, (end - start) // 2))
            span = (begin, min(begin + length, end))
            if all(span[1] < other[0] or other[1] < span[0] for other in spans):
                spans.append(span)
                break
    return sorted(spans)


def mask(tokens: Sequence[int], spans: Sequence[Part]) -> list[int]:
    """The CM3 sequence: the spans (sorted, disjoint) replaced by sentinels and moved to the end, then <eos>."""
    masked, tail, cursor = [], [], 0
    for i, (start, end) in enumerate(spans):
        masked += [*tokens[cursor:start], sentinel(i)]
        tail += [sentinel(i), *tokens[start:end]]
        cursor = end
    return [*masked, *tokens[cursor:], *tail, EOS]


def cm3(tokens: Sequence[int], parts: Sequence[Part], rng: random.Random, document_dropped: bool = False) -> list[int]:
    """One training sequence of a document under the CM3 objective; with
    ``document_dropped``, the masked document before the spans is ``<mask>``."""
    spans = pick_spans(parts, span_count(rng), rng)
    sequence = mask(tokens, spans)
    if not document_dropped:
        return sequence
    tail = sum(1 + end - start for start, end in spans) + 1  # each span behind its sentinel, then <eos>
    return [MASK, *sequence[-tail:]]
