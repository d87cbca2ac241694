"""The MAViL engine: audio, video and fused embeddings of clips, their
classes and cross-modal retrieval, with requests batched dynamically.

A request's clip is checked and turned into patches by the caller
(``prepare``: errors are InvalidRequest naming the field); the patches wait
in the engine's micro-batcher (``engines.batching``), and one batch is one
pass of each encoder: every clip with audio through the audio encoder
together, every clip with frames through the video encoder, and every clip
with both through the fusion encoder. Nothing is masked at inference.

What a clip may be, and what the engine does with it:
- audio: float samples at 16 kHz (the gateway resamples other rates), at
  most ``audio.seconds`` long; shorter audio is padded with silence;
- frames: any number of RGB frames of any size, as floats in [0, 1]; they are
  sampled evenly to the model's frame count and resized (area averaging) to
  its frame size.
The embeddings are the mean-pooled outputs of the audio, video and fusion
encoders (fused only when the clip has both); retrieval searches the shared
space the contrastive projections map them into. Classification uses the
fused head when the clip has both modalities, else the head of the one it has.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch

from patchwork.engines.api import EngineStats, InvalidRequest, ModelInfo
from patchwork.engines.batching import MicroBatcher
from patchwork.engines.checkpoint import WEIGHTS_FILE, CheckpointError, Manifest, load_state
from patchwork.engines.mavil.config import FORMAT_VERSION, MavilConfig
from patchwork.engines.mavil.features import audio_patches, video_tubelets
from patchwork.engines.mavil.index import ClipIndex, index_name
from patchwork.engines.mavil.model import MavilModel
from patchwork.engines.registry import Family
from patchwork.engines.scheduler import SchedulerConfig

# How long the oldest waiting request waits for others to share its batch.
BATCH_WAIT_S = 0.005


@dataclass(frozen=True)
class Clip:
    """One request's clip, decoded: audio samples at 16 kHz and/or frames."""

    audio: np.ndarray | None = None  # float32 (samples,)
    frames: np.ndarray | None = None  # float32 (frames, height, width, 3) in [0, 1]


@dataclass(frozen=True)
class Prepared:
    audio: torch.Tensor | None  # spectrogram patches [Na, P]
    video: torch.Tensor | None  # tubelets [Nv, P]


@dataclass(frozen=True)
class ClipEmbedding:
    """Mean-pooled embeddings (float32 [dim]) of the modalities the clip had,
    and the audio and video ones in the shared space (unit [embed_dim])."""

    audio: np.ndarray | None
    video: np.ndarray | None
    fused: np.ndarray | None
    shared_audio: np.ndarray | None
    shared_video: np.ndarray | None


class MavilEngine:
    family = "mavil"

    def __init__(self, model: MavilModel, device: torch.device, name: str, manifest: Manifest | None = None,
                 indexes: dict[str, ClipIndex] | None = None, scheduler: SchedulerConfig | None = None):
        self.model, self.device, self.name, self.manifest = model, device, name, manifest
        self.config: MavilConfig = model.config
        self.indexes = indexes or {}
        scheduler = scheduler or SchedulerConfig()
        self.batcher = MicroBatcher(self.run_batch, max_batch=scheduler.max_batch_size, max_wait_s=BATCH_WAIT_S,
                                    max_queue=scheduler.max_queue, stall_timeout_s=scheduler.stall_timeout_s,
                                    name=f"mavil-{name}")

    # -- inputs ---------------------------------------------------------------

    def prepare(self, clip: Clip) -> Prepared:
        """The clip's patches, or InvalidRequest naming the field at fault."""
        if clip.audio is None and clip.frames is None:
            raise InvalidRequest("clip", "holds neither audio nor frames")
        return Prepared(None if clip.audio is None else self._audio_patches(clip.audio),
                        None if clip.frames is None else self._tubelets(clip.frames))

    def _audio_patches(self, samples: np.ndarray) -> torch.Tensor:
        audio = self.config.audio
        if samples.ndim != 1 or not len(samples):
            raise InvalidRequest("clip.audio", "expected a non-empty mono waveform")
        if len(samples) > round(audio.seconds * audio.sample_rate):
            raise InvalidRequest("clip.audio", f"{len(samples) / audio.sample_rate:.2f} s; model {self.name} reads at "
                                 f"most {audio.seconds:g} s")
        return audio_patches(torch.tensor(samples, dtype=torch.float32)[None], audio)[0]

    def _tubelets(self, frames: np.ndarray) -> torch.Tensor:
        if frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
            raise InvalidRequest("clip.frames", "expected RGB frames (frames, height, width, 3)")
        return video_tubelets(torch.tensor(frames, dtype=torch.float32)[None], self.config.video)[0]

    # -- requests -------------------------------------------------------------

    def embed(self, clip: Clip, deadline: float | None = None) -> Future:
        """Checks ``clip`` (InvalidRequest at once) and queues it; the future
        receives its ClipEmbedding. ``deadline`` is a time.monotonic() instant."""
        return self.batcher.submit(self.prepare(clip), deadline)

    def check_classifier(self) -> None:
        if not self.config.labels:
            raise InvalidRequest("model", f"model {self.name} has no classification head")

    def classify(self, embedding: ClipEmbedding, top_k: int) -> tuple[str, list[tuple[str, float]]]:
        """(the head used, the ``top_k`` labels with their probabilities, best first)."""
        self.check_classifier()
        head = "fused" if embedding.fused is not None else "audio" if embedding.audio is not None else "video"
        features = torch.tensor(getattr(embedding, head))
        with torch.inference_mode():
            layer = self.model.heads[head]
            probabilities = torch.softmax(layer(features.to(self.device, layer.weight.dtype)).float(), dim=-1).cpu()
        best = torch.topk(probabilities, min(top_k, len(probabilities)))
        return head, [(self.config.labels[i], float(p)) for p, i in zip(best.values.tolist(), best.indices.tolist())]

    def searched_modality(self, clip: Clip, index: str) -> str:
        """The modality a query ``clip`` searches in ``index`` (the one it lacks), or InvalidRequest."""
        if index not in self.indexes:
            raise InvalidRequest("index", f"unknown index {index!r}; model {self.name} has "
                                 f"{sorted(self.indexes) or 'none'}")
        if (clip.audio is None) == (clip.frames is None):
            raise InvalidRequest("query", "a query holds one modality, audio or frames, not both")
        return "video" if clip.audio is not None else "audio"

    def retrieve(self, embedding: ClipEmbedding, index: str, searched: str, top_k: int) -> list[tuple[str, float]]:
        """The ``top_k`` clips of ``index`` whose ``searched`` modality is
        nearest the query's embedding in the shared space, with their cosine similarities."""
        query = embedding.shared_audio if searched == "video" else embedding.shared_video
        return self.indexes[index].search(query, searched, top_k)

    # -- one batch (the batcher's thread) ---------------------------------------

    @torch.inference_mode()
    def run_batch(self, items: list[Prepared]) -> list[ClipEmbedding]:
        """One pass of each encoder over prepared clips (the batcher's thread calls it)."""
        model, dtype = self.model, next(self.model.parameters()).dtype
        with_audio = [i for i, item in enumerate(items) if item.audio is not None]
        with_video = [i for i, item in enumerate(items) if item.video is not None]
        audio = video = None
        if with_audio:
            audio = model.encode_audio(torch.stack([items[i].audio for i in with_audio]).to(self.device, dtype))
        if with_video:
            video = model.encode_video(torch.stack([items[i].video for i in with_video]).to(self.device, dtype))
        both = [i for i in with_audio if items[i].video is not None]
        fused = None
        if both:
            a_rows = torch.tensor([with_audio.index(i) for i in both], device=self.device)
            v_rows = torch.tensor([with_video.index(i) for i in both], device=self.device)
            fused = model.fuse(audio[0][a_rows], audio[1][a_rows], video[0][v_rows], video[1][v_rows]).mean(1)
        pooled_audio = None if audio is None else audio[0].mean(1)  # [Ba, dim]
        pooled_video = None if video is None else video[0].mean(1)  # [Bv, dim]
        found = {
            "audio": _by_clip(with_audio, pooled_audio),
            "video": _by_clip(with_video, pooled_video),
            "fused": _by_clip(both, fused),
            "shared_audio": _by_clip(with_audio, None if audio is None else model.shared_audio(pooled_audio)),
            "shared_video": _by_clip(with_video, None if video is None else model.shared_video(pooled_video)),
        }
        return [ClipEmbedding(**{field: rows.get(i) for field, rows in found.items()}) for i in range(len(items))]

    # -- the Engine protocol ----------------------------------------------------

    def describe(self) -> ModelInfo:
        metrics = dict(self.manifest.training.metrics) if self.manifest else {}
        config = {**self.config.model_dump(), "indexes": {name: index.size() for name, index in self.indexes.items()}}
        return ModelInfo(name=self.name, family=self.family, config=config, metrics=metrics)

    def stats(self) -> EngineStats:
        return EngineStats(running=self.batcher.running, waiting=self.batcher.waiting, steps=self.batcher.batches,
                           cache_bytes=0, health=self.batcher.health())

    def abort_all(self, reason: BaseException) -> int:
        return self.batcher.abort_all(reason)

    def close(self) -> None:
        self.batcher.close()


def _by_clip(clips: list[int], rows: torch.Tensor | None) -> dict[int, np.ndarray]:
    """Clip number -> its row of ``rows`` (one row per clip of ``clips``)."""
    return {} if rows is None else dict(zip(clips, rows.float().cpu().numpy()))


def load_indexes(name: str, assets: dict[str, str], manifest: Manifest | None) -> dict[str, ClipIndex]:
    """The checkpoint's indexes; CheckpointError for one that is malformed or built by other weights."""
    from pydantic import ValidationError

    indexes = {}
    for asset, text in assets.items():
        index = index_name(asset)
        if index is None:
            continue
        try:
            loaded = ClipIndex.model_validate_json(text)
        except ValidationError as e:
            raise CheckpointError(f"{name}/{asset}: not a valid index: {e.errors()[0]['msg']}") from None
        if manifest is not None and loaded.weights_sha256 != manifest.files[WEIGHTS_FILE]:
            raise CheckpointError(f"{name}/{asset}: built by other weights; rebuild it with "
                                  "patchwork index")
        indexes[index] = loaded
    return indexes


def build_engine(
    config: MavilConfig, weights: dict[str, torch.Tensor], *, device: torch.device, dtype: torch.dtype, name: str,
    manifest: Manifest | None = None, scheduler: SchedulerConfig | None = None, assets: dict[str, str] | None = None,
) -> MavilEngine:
    model = MavilModel(config)
    load_state(model, weights, name)
    model.to(device=device, dtype=dtype).eval()
    return MavilEngine(model, device, name, manifest, load_indexes(name, assets or {}, manifest), scheduler)


def load_mavil(path, **options) -> MavilEngine:
    """``engines.load`` for a path that must hold a MAViL checkpoint; CheckpointError naming it otherwise."""
    from patchwork.engines.loading import load

    engine = load(path, **options)
    if engine.family != "mavil":
        engine.close()
        raise CheckpointError(f"{path}: a {engine.family} checkpoint, not a MAViL one")
    return engine


FAMILY = Family(name="mavil", config_type=MavilConfig, format_version=FORMAT_VERSION, build_engine=build_engine)
