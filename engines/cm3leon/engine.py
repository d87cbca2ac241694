"""The CM3Leon engine: text->image, image->text and infilling on the shared
continuous-batching scheduler.

Each sequence has two rows in one key/value cache: its conditional stream in
row 2s and, when its decoding is guided, its unconditional stream in row
2s + 1 (slot s). Both rows of every sequence run in the same model call, so
a guided batch of B sequences is one call over 2B rows (consecutive rows:
the cache reads them as views). The unconditional prompt is read with the
first chunk of the conditional one; every chosen token is fed to both rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import ValidationError

from patchwork.engines.api import EngineStats, Generation, InvalidRequest, ModelInfo, Usage
from patchwork.engines.checkpoint import MANIFEST_FILE, CheckpointError, Manifest, load_state, validation_summary
from patchwork.engines.cm3leon.audio import SAMPLE_RATE
from patchwork.engines.cm3leon.config import FORMAT_VERSION, Cm3LeonConfig
from patchwork.engines.cm3leon.decoding import (
    FAMILY_DEFAULTS,
    OUTPUTS,
    Cm3Params,
    Cm3State,
    DecodingDefaults,
    batch_scores,
    record,
    sample_params,
)
from patchwork.engines.cm3leon.model import Cm3LeonModel
from patchwork.engines.cm3leon.prompts import (
    AUDIO_MARKERS,
    Cm3Prompt,
    Task,
    allowed_tokens,
    caption_prompt,
    image_prompt,
    infill_prompt,
)
from patchwork.engines.cm3leon.retrieval import Query
from patchwork.engines.cm3leon.tokenizer import (
    BREAK,
    EOS,
    IMAGE_END,
    IMAGE_START,
    MAX_SPANS,
    PAD,
    TextTokenizer,
    sentinel,
)
from patchwork.engines.generation import Decoding
from patchwork.engines.kv_cache import KVCache
from patchwork.engines.registry import Family
from patchwork.engines.scheduler import Request, Scheduler, SchedulerConfig, StepBatch

TOKENIZER_ASSET = "tokenizer.json"
# Where an infill request's text misses a span.
MASK_MARKER = "<mask>"


@dataclass(frozen=True)
class Cm3Details:
    """What a CM3Leon generation produced, as tokens of the joint vocabulary."""

    task: Task
    tokens: list[int]


class Cm3LeonEngine:
    family = "cm3leon"

    def __init__(self, model: Cm3LeonModel, tokenizer: TextTokenizer, device: torch.device, name: str,
                 manifest: Manifest | None = None, scheduler: SchedulerConfig | None = None):
        self.model, self.tokenizer, self.device, self.name, self.manifest = model, tokenizer, device, name, manifest
        self.config: Cm3LeonConfig = model.config
        self.allowed = {task: allowed_tokens(task, self.config.text_vocab, self.config.image_end,
                                             self.config.vocab_size).to(device) for task in Task}
        # The same masks as one tensor [tasks, V], a step's rows gathered from it at once.
        self.task_rows = {task: i for i, task in enumerate(Task)}
        self.allowed_rows = torch.stack([self.allowed[task] for task in Task])
        self.defaults = decoding_defaults(self.config, manifest, name)
        scheduler = scheduler or SchedulerConfig()
        self.positions = min(scheduler.max_sequence_bytes, self.config.max_sequence)
        self.scheduler = Scheduler(self, scheduler.model_copy(update={"max_sequence_bytes": self.positions}), device)

    # -- requests ------------------------------------------------------------

    def _documents(self, count: int | None, output: str) -> int:
        retrieval = self.config.retrieval
        count = self.defaults[output].documents if count is None else count
        if not 0 <= count <= retrieval.max_documents:
            raise InvalidRequest("documents", f"{count} retrieved documents; this model takes 0 to "
                                 f"{retrieval.max_documents}")
        return min(count, len(self.model.bank))

    def params(self, output: str, explicit: dict, samples: int = 1, max_new_bytes: int = 0) -> list[Cm3Params]:
        """Each sample's params: the request's ``explicit`` settings over this
        model's defaults for ``output`` (``decoding.sample_params``); an
        image's budget is its ``image_tokens`` codes."""
        budget = self.config.image_tokens if output == "image" else max_new_bytes
        return sample_params(self.defaults[output], explicit, samples, budget)

    def text_budget(self, prompt: Cm3Prompt, requested: int, default: int, field: str) -> int:
        """A caption's or an infill's ``max_new_bytes``: the ``requested``
        budget as it is (the scheduler refuses one the context cannot hold),
        or, when the request set none (0), ``default`` or what the context
        leaves after the prompt, whichever is less."""
        if requested:
            return requested
        left = self.positions - len(prompt.cond)
        if left < 1:
            raise InvalidRequest(field, f"the prompt takes {len(prompt.cond)} of the model's {self.positions} "
                                 "positions and leaves none to write in")
        return min(default, left)

    @torch.inference_mode()
    def image_prompt(self, text: str, documents: int | None = None) -> Cm3Prompt:
        """Text -> image, after ``documents`` bank documents retrieved for the text (the model's default if None)."""
        ids = self.tokenizer.encode(text)
        count = self._documents(documents, "image")
        embedded = self.model.retriever.embed_texts([ids or [PAD]])
        found = self.model.bank.search(Query(embedded, texts=embedded), count)[0] if count else []
        return image_prompt(ids, [self.model.bank.document(i) for i in found])

    def _codes(self, image: np.ndarray) -> torch.Tensor:
        """uint8 (size, size, 3) -> its code grid [1, image_tokens]."""
        size = self.config.vq.image_size
        if np.shape(image) != (size, size, 3):
            raise InvalidRequest("image", f"{'x'.join(map(str, np.shape(image)))} pixels; this model reads "
                                 f"{size}x{size}x3")
        return self.model.vq.encode(torch.tensor(np.asarray(image, dtype=np.uint8))[None].to(self.device))

    @torch.inference_mode()
    def caption_prompt(self, image: np.ndarray, documents: int | None = None, alt_text: str = "") -> Cm3Prompt:
        """Image (uint8 (size, size, 3)) -> text, after ``documents`` bank
        documents retrieved for the image; an ``alt_text`` is re-aligned."""
        codes = self._codes(image)
        count = self._documents(documents, "text")
        embedded = self.model.retriever.embed_images(codes)
        found = self.model.bank.search(Query(embedded, images=embedded), count)[0] if count else []
        ids = self.model.image_ids(codes)[0].tolist()
        return caption_prompt(ids, [self.model.bank.document(i) for i in found], self.tokenizer.encode(alt_text))

    @torch.inference_mode()
    def audio_caption_prompt(self, samples: np.ndarray) -> Cm3Prompt:
        """A sound (float32 samples at 16 kHz, at most the audio tokenizer's
        ``seconds``; shorter sounds are padded with silence) -> text."""
        if self.model.audio is None:
            raise InvalidRequest("audio", f"model {self.name} was not trained on audio (it reads "
                                 f"{' and '.join(self.config.modalities)})")
        if np.ndim(samples) != 1 or not 0 < len(samples) <= self.config.audio.samples:
            raise InvalidRequest("audio", f"{np.size(samples) / SAMPLE_RATE:.2f} s of sound; this model reads "
                                 f"up to {self.config.audio.seconds:g} s")
        codes = self.model.audio.encode(torch.as_tensor(np.asarray(samples, dtype=np.float32))[None].to(self.device))
        return caption_prompt(self.model.audio_ids(codes)[0].tolist(), markers=AUDIO_MARKERS)

    @torch.inference_mode()
    def infill_prompt(self, text: str, image: np.ndarray | None = None) -> Cm3Prompt:
        """``text`` with a ``MASK_MARKER`` where each span is missing,
        followed by ``image`` (if any) as a caption -> image document."""
        pieces = text.split(MASK_MARKER)
        if len(pieces) < 2:
            raise InvalidRequest("text", f"no {MASK_MARKER} to fill")
        if len(pieces) - 1 > MAX_SPANS:
            raise InvalidRequest("text", f"{len(pieces) - 1} masks; at most {MAX_SPANS}")
        tokens = list(self.tokenizer.encode(pieces[0]))
        for span, piece in enumerate(pieces[1:]):
            tokens += [sentinel(span), *self.tokenizer.encode(piece)]
        if image is not None:
            codes = self.model.image_ids(self._codes(image))[0].tolist()
            tokens += [BREAK, IMAGE_START, *codes, IMAGE_END]
        return infill_prompt(tokens)

    def spans(self, result: Generation, count: int) -> list[str]:
        """An infill's ``count`` spans (the text after each sentinel); a span never written is empty."""
        spans, current = [[] for _ in range(count)], 0
        for token in result.details.tokens:
            if sentinel(1) <= token <= sentinel(MAX_SPANS - 1):
                current = token - sentinel(0)
            elif current < count and token < self.config.text_vocab:
                spans[current].append(token)
        return [self.tokenizer.decode(span) for span in spans]

    @torch.inference_mode()
    def caption_scores(self, results: list[Generation], text: str) -> list[float]:
        """For each finished image generation, the model's mean log-likelihood
        (nats per token) of ``text`` (and ``<eos>``) as the image's caption:
        the score that ranks samples, CLIP-style, with the model itself."""
        caption = [*self.tokenizer.encode(text), EOS]
        rows = [[IMAGE_START, *result.details.tokens, IMAGE_END, BREAK, *caption] for result in results]
        tokens = torch.tensor(rows, device=self.device)
        logits = self.model.lm(tokens[:, :-1])[:, -len(caption):]  # predicting the caption's tokens
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        targets = tokens[:, -len(caption):]
        return log_probs.gather(-1, targets[..., None])[..., 0].mean(dim=1).tolist()

    def submit(self, prompt: Cm3Prompt, params: Cm3Params, emit: Callable | None = None,
               deadline: float | None = None) -> Request:
        """Starts a generation; see ``engines.scheduler.Request``."""
        return self.scheduler.submit(prompt, params, emit, deadline)

    @torch.inference_mode()
    def images(self, results: list[Generation]) -> np.ndarray:
        """The images of finished image generations: uint8 (n, size, size, 3)."""
        codes = torch.tensor([result.details.tokens for result in results], device=self.device)
        return self.model.images(codes).cpu().numpy()

    def abort_all(self, reason: BaseException) -> int:
        return self.scheduler.abort_all(reason)

    def close(self) -> None:
        self.scheduler.close()

    def describe(self) -> ModelInfo:
        metrics = dict(self.manifest.training.metrics) if self.manifest else {}
        return ModelInfo(name=self.name, family=self.family, config=self.config.model_dump(), metrics=metrics,
                         defaults={output: d.model_dump(mode="json") for output, d in self.defaults.items()})

    def stats(self) -> EngineStats:
        return self.scheduler.stats()

    # -- what the scheduler needs (engines.scheduler.StepModel) ------------

    def request_cost(self, prompt: Cm3Prompt, params: Cm3Params) -> dict[str, int]:
        if prompt.task is Task.IMAGE:
            return {"prompt": len(prompt.cond), "image": self.config.image_tokens}
        return {"prompt": len(prompt.cond), "max_new_bytes": params.max_new_bytes}

    def new_caches(self, slots: int, max_sequence_bytes: int) -> KVCache:
        dtype = next(self.model.parameters()).dtype
        return self.model.lm.stack.new_cache(2 * slots, max_sequence_bytes, self.device, dtype)

    def encode(self, prompt: Cm3Prompt) -> list[int]:
        return list(prompt.cond)

    def new_state(self, caches, prompt: Cm3Prompt, symbols: list[int], params: Cm3Params) -> Cm3State:
        return Cm3State(task=prompt.task, params=params, uncond=prompt.uncond)

    def move(self, caches: KVCache, source: int, target: int) -> None:
        caches.move(2 * source, 2 * target)
        caches.move(2 * source + 1, 2 * target + 1)

    def release(self, caches: KVCache, slot: int) -> None:
        caches.release(2 * slot)
        caches.release(2 * slot + 1)

    def cache_bytes(self, caches: KVCache, states: list[Cm3State]) -> int:
        return caches.bytes_per_position() * sum(s.cond_length + s.uncond_length for s in states)

    def step(self, caches: KVCache, chunks: StepBatch | None, decodes: StepBatch | None):
        """Both streams of every sequence in two model calls (the prompt
        chunks, then the decodes), each scored for all its sequences at once;
        states change only once both succeeded."""
        lm, updates = self.model.lm, []
        chunk_scores = decode_scores = None
        if chunks:
            rows = []  # (cache row, first position, tokens)
            for slot, state, symbols in zip(chunks.slots, chunks.states, chunks.symbols):
                rows.append((2 * slot, state.cond_length, symbols))
                if state.params.guided and state.uncond_length == 0:
                    rows.append((2 * slot + 1, 0, list(state.uncond)))
            last, at = self._extend(lm, caches, rows)
            cond = last[[at[2 * slot] for slot in chunks.slots]]
            unconds = [last[at[2 * slot + 1]] if 2 * slot + 1 in at else state.uncond_logits
                       for slot, state in zip(chunks.slots, chunks.states)]
            uncond = None if all(u is None for u in unconds) else torch.stack(
                [c if u is None else u for c, u in zip(cond, unconds)])  # an unguided row's stand-in is never read
            chunk_scores = self._scores(chunks.states, cond, uncond)
            for slot, state, symbols, logits in zip(chunks.slots, chunks.states, chunks.symbols, unconds):
                updates.append((state, len(symbols), len(state.uncond) if 2 * slot + 1 in at else 0, logits))
        if decodes:
            cond, uncond = self._decode(lm, caches, decodes)
            decode_scores = self._scores(decodes.states, cond, uncond)
            updates += [(state, 1, 1 if state.params.guided else 0, None) for state in decodes.states]
        for state, cond_read, uncond_read, uncond_logits in updates:
            state.cond_length += cond_read
            state.uncond_length += uncond_read
            state.uncond_logits = uncond_logits
        return chunk_scores, decode_scores

    def _extend(self, lm, caches: KVCache,
                rows: list[tuple[int, int, list[int]]]) -> tuple[torch.Tensor, dict[int, int]]:
        """Reads each row's tokens from its first position: the logits after
        each row's last token [R, V], and where each cache row is among them."""
        rows = sorted(rows)
        width = max(len(tokens) for _, _, tokens in rows)
        tokens = torch.full((len(rows), width), PAD, dtype=torch.long)
        positions = torch.full((len(rows), width), -1, dtype=torch.long)
        for i, (_, start, row_tokens) in enumerate(rows):
            tokens[i, : len(row_tokens)] = torch.tensor(row_tokens)
            positions[i, : len(row_tokens)] = torch.arange(start, start + len(row_tokens))
        view = lm.stack.extend_view(caches, [row for row, _, _ in rows], positions.to(self.device))
        logits = lm.step(tokens.to(self.device), view)  # [R, width, V]
        ends = torch.tensor([len(row_tokens) - 1 for _, _, row_tokens in rows], device=self.device)
        return logits[torch.arange(len(rows), device=self.device), ends], {row: i for i, (row, _, _) in enumerate(rows)}

    def _decode(self, lm, caches: KVCache, decodes: StepBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One token per stream at its next position, in one model call over
        the cache rows in order (sequence s's conditional row 2s, then its
        unconditional row 2s + 1 when guided): the conditional logits [B, V]
        and the unconditional ones (None when no sequence is guided; an
        unguided sequence's stand-in is its conditional logits), in the
        order of ``decodes``."""
        count = len(decodes.slots)
        entries = []  # (cache row, position, token), in cache-row order
        cond_at, uncond_at = [0] * count, [0] * count  # each sequence's entries
        for i in sorted(range(count), key=lambda i: decodes.slots[i]):
            slot, state, (symbol,) = decodes.slots[i], decodes.states[i], decodes.symbols[i]
            cond_at[i] = uncond_at[i] = len(entries)
            entries.append((2 * slot, state.cond_length, symbol))
            if state.params.guided:
                uncond_at[i] = len(entries)
                entries.append((2 * slot + 1, state.uncond_length, symbol))
        rows, positions, tokens = (list(column) for column in zip(*entries))
        packed = torch.tensor([*positions, *tokens, *cond_at, *uncond_at], device=self.device)  # one copy a step
        width = len(entries)
        view = lm.stack.decode_view(caches, rows, packed[:width], ends=positions)
        logits = lm.step(packed[width:2 * width, None], view)[:, -1]  # [R, V]
        guided = uncond_at != cond_at
        return logits[packed[2 * width:2 * width + count]], logits[packed[2 * width + count:]] if guided else None

    def _scores(self, states: list[Cm3State], cond: torch.Tensor, uncond: torch.Tensor | None) -> torch.Tensor:
        """The step's sequences' scores [B, V] from their streams' logits [B, V] (one guidance call for them all)."""
        return batch_scores(cond, uncond, [state.params for state in states],
                            self.allowed_rows[[self.task_rows[state.task] for state in states]])

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits  # the step's guidance has already put what a task may not emit at -inf

    def run_ahead(self, caches: KVCache, slots: list[int], states: list[Cm3State], symbols: torch.Tensor) -> None:
        return None  # a step needs nothing from the device before it starts

    def accept(self, decoding: Decoding, symbol: int, state: Cm3State, ahead: int | None = None) -> bytes:
        return record(state, decoding, symbol, self.tokenizer, self.config.image_tokens)

    def result(self, prompt: Cm3Prompt, decoding: Decoding, state: Cm3State | None) -> Generation:
        tokens = list(state.generated) if state is not None else []
        return Generation(
            text=decoding.stop.text, finish_reason=decoding.finish_reason,
            usage=Usage(prompt_tokens=len(prompt.cond), generated_tokens=len(tokens)),
            details=Cm3Details(task=prompt.task, tokens=tokens),
        )


def decoding_defaults(config: Cm3LeonConfig, manifest: Manifest | None, name: str) -> dict[str, DecodingDefaults]:
    """Per kind of output: the defaults the checkpoint's evaluation recorded,
    else the family's; documents left to the config take its default."""
    recorded = manifest.decoding if manifest else {}
    defaults = {}
    for output in OUTPUTS:
        try:
            chosen = DecodingDefaults.model_validate(recorded[output]) if output in recorded else FAMILY_DEFAULTS[output]
        except ValidationError as e:
            raise CheckpointError(f"{name}: {MANIFEST_FILE}: decoding.{output}: {validation_summary(e)}") from None
        documents = config.retrieval.default_documents if chosen.documents is None else chosen.documents
        defaults[output] = chosen.model_copy(update={"documents": min(documents, config.retrieval.max_documents)})
    return defaults


def build_engine(
    config: Cm3LeonConfig, weights: dict[str, torch.Tensor], *, device: torch.device, dtype: torch.dtype, name: str,
    manifest: Manifest | None = None, scheduler: SchedulerConfig | None = None, assets: dict[str, str] | None = None,
) -> Cm3LeonEngine:
    if TOKENIZER_ASSET not in (assets or {}):
        raise CheckpointError(f"{name}: a CM3Leon checkpoint needs its text tokenizer ({TOKENIZER_ASSET})")
    tokenizer = TextTokenizer.from_json(assets[TOKENIZER_ASSET])
    if tokenizer.vocab_size != config.text_vocab:
        raise CheckpointError(f"{name}: {TOKENIZER_ASSET} has {tokenizer.vocab_size} tokens, the config "
                              f"text_vocab {config.text_vocab}")
    model = Cm3LeonModel(config)
    load_state(model, weights, name)
    model.index_bank()
    model.to(device=device, dtype=dtype).eval()
    model.fuse()
    return Cm3LeonEngine(model, tokenizer, device, name, manifest, scheduler)


FAMILY = Family(name="cm3leon", config_type=Cm3LeonConfig, format_version=FORMAT_VERSION, build_engine=build_engine)
