"""The BLT engine: what ``engines.load`` returns for a BLT checkpoint.

Generation goes through the incremental engine and the continuous-batching
scheduler; ``generate_reference`` keeps the full-recompute path that the
fast one is held to.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from patchwork.engines.api import EngineStats, Generation, ModelInfo, Prompt, SamplingParams, text_of
from patchwork.engines.blt import incremental
from patchwork.engines.blt.config import EOS_ID, FORMAT_VERSION, OFFSET, BltConfig
from patchwork.engines.blt.model import BltModel
from patchwork.engines.blt.patching import lengths_from_starts, patch_ids_from_starts
from patchwork.engines.blt.reference import disallowed_symbols, finished_generation, generate_reference, prompt_tokens
from patchwork.engines.checkpoint import Manifest, load_state
from patchwork.engines.generation import Decoding
from patchwork.engines.layers import fuse_projections
from patchwork.engines.registry import Family
from patchwork.engines.scheduler import Request, Scheduler, SchedulerConfig
from patchwork.kernels.entropy import entropies_from_logits


@dataclass
class Score:
    # entropies[i] = H(x_i | x_<i) in nats, one per byte.
    entropies: list[float]
    patch_lengths: list[int]
    bits_per_byte: float


class BltEngine:
    family = "blt"

    def __init__(
        self, model: BltModel, config: BltConfig, name: str, manifest: Manifest | None = None,
        scheduler: SchedulerConfig | None = None,
    ):
        self.model = model.eval()
        fuse_projections(self.model)
        self.config = config
        self.name = name
        self.manifest = manifest
        self.device = next(model.parameters()).device
        self._banned = disallowed_symbols(self.device)
        self.scheduler = Scheduler(self, scheduler or SchedulerConfig(), self.device)

    # -- public API -------------------------------------------------------

    def generate(self, prompts: list[bytes], **params) -> list[Generation]:
        """Generates a continuation of each prompt, all in one continuous batch.
        ``params`` are the fields of ``SamplingParams`` (max_new_bytes,
        temperature, top_p, top_k, seed, stop)."""
        sampling = SamplingParams(**params)
        requests = [self.scheduler.submit(prompt, sampling) for prompt in prompts]
        return [request.result() for request in requests]

    def generate_one(self, prompt: bytes, params: SamplingParams) -> Generation:
        return self.scheduler.submit(prompt, params).result()

    def submit(
        self, prompt: Prompt, params: SamplingParams, emit: Callable | None = None, deadline: float | None = None
    ) -> Request:
        """Starts a generation from bytes or text segments; see ``engines.scheduler.Request``."""
        return self.scheduler.submit(text_of(prompt, self.family), params, emit, deadline)

    def abort_all(self, reason: BaseException) -> int:
        return self.scheduler.abort_all(reason)

    def close(self) -> None:
        self.scheduler.close()

    def generate_reference(
        self, prompt: bytes, params: SamplingParams, cancelled: Callable[[], bool] = lambda: False
    ) -> Iterator[bytes | Generation]:
        """The full-recompute path: byte deltas, then the ``Generation``."""
        return generate_reference(self.model, prompt, params, cancelled)

    @torch.inference_mode()
    def score(self, text: bytes) -> Score:
        if not text:
            return Score(entropies=[], patch_lengths=[], bits_per_byte=0.0)
        tokens = torch.tensor([prompt_tokens(text)], device=self.device)  # [1, n + 1]
        starts, entropies = self.model.patch(tokens)
        if entropies is None:
            entropies = entropies_from_logits(self.model.entropy_model(tokens))
        n = len(text)
        logits = self.model(tokens[:, :n], patch_ids_from_starts(starts[:, : n + 1]))
        nll = F.cross_entropy(logits[0].float(), tokens[0, 1:], reduction="sum")
        return Score(
            entropies=entropies[0, :n].tolist(),
            patch_lengths=lengths_from_starts(starts[0, 1 : n + 1]),
            bits_per_byte=float(nll) / math.log(2) / n,
        )

    def describe(self) -> ModelInfo:
        """Name, family, config and held-out metrics, for listings."""
        return ModelInfo(
            name=self.name,
            family=self.family,
            config=self.config.model_dump(),
            metrics=dict(self.manifest.training.metrics) if self.manifest else {},
        )

    def stats(self) -> EngineStats:
        return self.scheduler.stats()

    # -- what the scheduler needs (engines.scheduler.StepModel) ----------

    def request_cost(self, prompt: bytes, params: SamplingParams) -> dict[str, int]:
        # One cache position per byte, read or generated.
        return {"prompt": len(prompt), "max_new_bytes": params.max_new_bytes}

    def new_caches(self, slots: int, max_sequence_bytes: int) -> incremental.BltCaches:
        # BOS and every byte may each close a patch.
        return incremental.BltCaches(self.model, slots, max_patches=max_sequence_bytes + 1)

    def encode(self, prompt: bytes) -> list[int]:
        return prompt_tokens(prompt)

    def new_state(self, caches, prompt: bytes, symbols: list[int], params: SamplingParams) -> incremental.PatchState:
        return incremental.new_state(self.model, caches, len(symbols))

    def step(self, caches, chunks, decodes):
        return incremental.step(self.model, caches, chunks, decodes)

    def move(self, caches, source: int, target: int) -> None:
        caches.move(source, target)

    def release(self, caches, slot: int) -> None:
        caches.release(slot)

    def cache_bytes(self, caches, states) -> int:
        return sum(caches.bytes_used(state) for state in states)

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.masked_fill(self._banned, float("-inf"))

    def run_ahead(self, caches, slots: list[int], states: list[incremental.PatchState],
                  symbols: torch.Tensor) -> torch.Tensor:
        # Whether each chosen byte closes its patch, known before its own step.
        return incremental.run_ahead(self.model, caches, slots, states, symbols)

    def accept(self, decoding: Decoding, symbol: int, state=None, ahead: int | None = None) -> bytes:
        if ahead is not None:
            incremental.record_ahead(state, symbol, bool(ahead))
        if symbol == EOS_ID:
            decoding.end_of_sequence()
            return b""
        return decoding.accept(bytes([symbol - OFFSET]))

    def result(self, prompt: bytes, decoding: Decoding, state) -> Generation:
        starts = state.starts if state is not None else None
        steps = state.global_steps if state is not None else 0
        return finished_generation(prompt, decoding, starts, global_steps=steps)


def build_engine(
    config: BltConfig, weights: dict[str, torch.Tensor], *, device: torch.device, dtype: torch.dtype, name: str,
    manifest: Manifest | None = None, scheduler: SchedulerConfig | None = None,
) -> BltEngine:
    model = BltModel(config)
    load_state(model, weights, name)
    return BltEngine(model.to(device=device, dtype=dtype), config, name, manifest, scheduler)


FAMILY = Family(name="blt", config_type=BltConfig, format_version=FORMAT_VERSION, build_engine=build_engine)
