"""The plain reference path: one sequence at a time, every step recomputing
both streams from scratch with the full forward. The engine's cached,
batched path is tested against it."""

from __future__ import annotations

import torch

from patchwork.engines.api import Generation, Usage
from patchwork.engines.cm3leon.decoding import Cm3Params, Cm3State, record, scores
from patchwork.engines.cm3leon.model import Cm3LeonModel
from patchwork.engines.cm3leon.prompts import Cm3Prompt, allowed_tokens
from patchwork.engines.cm3leon.tokenizer import TextTokenizer
from patchwork.engines.generation import Decoding


@torch.inference_mode()
def generate_reference(model: Cm3LeonModel, tokenizer: TextTokenizer, prompt: Cm3Prompt,
                       params: Cm3Params) -> Generation:
    from patchwork.engines.cm3leon.engine import Cm3Details

    config = model.config
    device = next(model.parameters()).device
    allowed = allowed_tokens(prompt.task, config.text_vocab, config.image_end, config.vocab_size).to(device)
    decoding = Decoding(params, device)
    state = Cm3State(task=prompt.task, params=params, uncond=prompt.uncond)
    cond, uncond = list(prompt.cond), list(prompt.uncond)
    while not decoding.finished:
        cond_logits = model.lm(torch.tensor([cond], device=device))[0, -1]
        uncond_logits = model.lm(torch.tensor([uncond], device=device))[0, -1] if params.guided else None
        symbol = decoding.choose(scores(cond_logits, uncond_logits, params, allowed))
        record(state, decoding, symbol, tokenizer, config.image_tokens)
        cond.append(symbol)
        uncond.append(symbol)
    return Generation(
        text=decoding.stop.text, finish_reason=decoding.finish_reason,
        usage=Usage(prompt_tokens=len(prompt.cond), generated_tokens=len(state.generated)),
        details=Cm3Details(task=prompt.task, tokens=list(state.generated)),
    )
