"""What CM3Leon reads for each task, and what it may write.

Every request is a conditional prompt and an unconditional one, the same
with its condition (the text of text->image, the image of image->text)
replaced by ``<mask>``; guided decoding reads both streams.

- image: ``caption <break> <img>`` -> exactly ``image_tokens`` image codes;
- caption: ``<img> codes </img> <break>`` (then the alt-text to re-align and
  ``<break>``, if any) -> text tokens until ``<eos>``; a sound's caption reads
  ``<audio> codes </audio> <break>`` instead;
- infill: a document with ``<mask:i>`` sentinels, then ``<mask:0>`` -> each
  span after its sentinel, until ``<eos>``.

Retrieved documents, when a request has them, come before the conditional
prompt, each ending with ``<eos>`` as in training.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from patchwork.engines.cm3leon.tokenizer import (
    AUDIO_END,
    AUDIO_START,
    BREAK,
    EOS,
    IMAGE_END,
    IMAGE_START,
    MASK,
    MAX_SPANS,
    SPECIALS,
    sentinel,
)


class Task(str, enum.Enum):
    IMAGE = "image"
    CAPTION = "caption"
    INFILL = "infill"


@dataclass(frozen=True)
class Cm3Prompt:
    task: Task
    cond: tuple[int, ...]
    uncond: tuple[int, ...]


def image_prompt(text: Sequence[int], retrieved: Sequence[Sequence[int]] = ()) -> Cm3Prompt:
    context = [token for document in retrieved for token in document]
    return Cm3Prompt(Task.IMAGE, (*context, *text, BREAK, IMAGE_START), (MASK, BREAK, IMAGE_START))


IMAGE_MARKERS = (IMAGE_START, IMAGE_END)
AUDIO_MARKERS = (AUDIO_START, AUDIO_END)


def caption_prompt(media: Sequence[int], retrieved: Sequence[Sequence[int]] = (), alt_text: Sequence[int] = (),
                   markers: tuple[int, int] = IMAGE_MARKERS) -> Cm3Prompt:
    """``media`` is an image's codes (or a sound's, with ``AUDIO_MARKERS``).
    An alt-text, when there is one, follows the image (to be re-aligned)."""
    context = [token for document in retrieved for token in document]
    noted = (*alt_text, BREAK) if alt_text else ()
    start, end = markers
    return Cm3Prompt(Task.CAPTION, (*context, start, *media, end, BREAK, *noted), (MASK, BREAK, *noted))


def infill_prompt(document: Sequence[int]) -> Cm3Prompt:
    return Cm3Prompt(Task.INFILL, (*document, sentinel(0)), (MASK, sentinel(0)))


def allowed_tokens(task: Task, text_vocab: int, image_end: int, vocab_size: int) -> torch.Tensor:
    """bool [vocab_size]: what the task may generate. Image codes
    ([text_vocab, image_end)) only in an image; text tokens and ``<eos>`` in a
    caption; text, any codes, the later sentinels and ``<eos>`` in an infill."""
    allowed = torch.zeros(vocab_size, dtype=torch.bool)
    if task is Task.IMAGE:
        allowed[text_vocab:image_end] = True
        return allowed
    allowed[len(SPECIALS):text_vocab] = True
    allowed[EOS] = True
    if task is Task.INFILL:
        allowed[text_vocab:] = True
        allowed[sentinel(1):sentinel(MAX_SPANS - 1) + 1] = True
    return allowed
