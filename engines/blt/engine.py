"""The BLT engine: what ``engines.load`` returns for a BLT checkpoint."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engines.blt.config import BltConfig, FORMAT_VERSION
from engines.blt.model import BltModel
from engines.blt.patching import entropies_from_logits, lengths_from_starts, patch_ids_from_starts
from engines.blt.reference import generate_reference, prompt_tokens
from engines.checkpoint import WEIGHTS_FILE, CheckpointError, Manifest
from engines.generation import Generation, SamplingParams
from engines.registry import Family


@dataclass
class Score:
    # entropies[i] = H(x_i | x_<i) in nats, one per byte.
    entropies: list[float]
    patch_lengths: list[int]
    bits_per_byte: float


class BltEngine:
    family = "blt"

    def __init__(self, model: BltModel, config: BltConfig, name: str, manifest: Manifest | None = None):
        self.model = model.eval()
        self.config = config
        self.name = name
        self.manifest = manifest
        self.device = next(model.parameters()).device

    def generate(self, prompts: list[bytes], **params) -> list[Generation]:
        """Generates a continuation of each prompt. ``params`` are the fields of
        ``SamplingParams`` (max_new_bytes, temperature, top_p, top_k, seed, stop)."""
        sampling = SamplingParams(**params)
        return [self.generate_one(prompt, sampling) for prompt in prompts]

    def generate_one(self, prompt: bytes, params: SamplingParams) -> Generation:
        *_, result = self.stream(prompt, params)
        return result

    def stream(
        self, prompt: bytes, params: SamplingParams, cancelled: Callable[[], bool] = lambda: False
    ) -> Iterator[bytes | Generation]:
        """Yields byte deltas as they are generated, then the ``Generation``."""
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

    def describe(self) -> dict:
        """Name, family, config and held-out metrics, for listings."""
        return {
            "name": self.name,
            "family": self.family,
            "config": self.config.model_dump(),
            "metrics": dict(self.manifest.training.metrics) if self.manifest else {},
        }


def build_engine(
    config: BltConfig, weights: dict[str, torch.Tensor], *, device: torch.device, dtype: torch.dtype, name: str,
    manifest: Manifest | None = None,
) -> BltEngine:
    model = BltModel(config)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{WEIGHTS_FILE}: weights do not match config.json: {e}") from None
    return BltEngine(model.to(device=device, dtype=dtype), config, name, manifest)


FAMILY = Family(name="blt", config_type=BltConfig, format_version=FORMAT_VERSION, build_engine=build_engine)
