"""What CM3Leon reads for each task, and what it may write.

Every request is a conditional prompt and an unconditional one, the same
with its condition (the text of text->image, the image of image->text)
replaced by ``<mask>``; guided decoding reads both streams.

- image: ``caption <break> <img>`` -> exactly ``image_tokens`` image codes;
- caption: ``<img> codes </img> <break>`` (then the alt-text to re-align and
  ``<break>``, if any) -> text tokens until ``<eos>``;
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

from engines.cm3leon.tokenizer import BREAK, EOS, IMAGE_END, IMAGE_START, MASK, SPECIALS, sentinel


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


def caption_prompt(image: Sequence[int], retrieved: Sequence[Sequence[int]] = (),
                   alt_text: Sequence[int] = ()) -> Cm3Prompt:
    """An alt-text, when there is one, follows the image (to be re-aligned)."""
    context = [token for document in retrieved for token in document]
    noted = (*alt_text, BREAK) if alt_text else ()
    return Cm3Prompt(Task.CAPTION, (*context, IMAGE_START, *image, IMAGE_END, BREAK, *noted), (MASK, BREAK, *noted))


def infill_prompt(document: Sequence[int]) -> Cm3Prompt:
    return Cm3Prompt(Task.INFILL, (*document, sentinel(0)), (MASK, sentinel(0)))


def allowed_tokens(task: Task, text_vocab: int, vocab_size: int) -> torch.Tensor:
    """bool [vocab_size]: what the task may generate. Image codes only in an
    image; text tokens and ``<eos>`` in a caption; text, codes, the later
    sentinels and ``<eos>`` in an infill."""
    allowed = torch.zeros(vocab_size, dtype=torch.bool)
    if task is Task.IMAGE:
        allowed[text_vocab:] = True
        return allowed
    allowed[len(SPECIALS):text_vocab] = True
    allowed[EOS] = True
    if task is Task.INFILL:
        allowed[text_vocab:] = True
        allowed[sentinel(1):len(SPECIALS)] = True
    return allowed
