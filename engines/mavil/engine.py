"""The MAViL engine: audio, video and fused embeddings of clips, their
classes and cross-modal retrieval, with requests batched dynamically.

A request's clip is checked and turned into patches by the caller
(``prepare``: errors are InvalidRequest naming the field); the patches wait
in the engine's micro-batcher (``engines.batching``), and one batch is one
pass of each encoder: every clip with audio through the audio encoder
together, every clip with frames through the video encoder, and every clip
with both through the fusion encoder. Nothing is masked at inference.

What a clip may be, and what the engine does with it:
- audio: float samples at 16 kHz (the gateway resamples other rates and
  bounds the length), at least a quarter of the model's clip
  (``MIN_AUDIO_FRACTION`` of ``audio.seconds``). Audio shorter than the
  model's clip is padded in the filterbank with the training set's quietest
  level (``AudioInput.floor``); longer audio is cut into windows of the
  model's clip length spread evenly from its start to its end (overlapping
  where the length is not a whole number of clips), each window is embedded,
  and the clip's embeddings are the mean of its windows' (as MAViL's
  evaluation pools long clips);
- frames: any number of RGB frames of any size, as floats in [0, 1]; they are
  sampled evenly to the model's frame count and resized (area averaging) to
  its frame size. With windowed audio, the frames are taken to span the
  sound's duration, and each window reads the frames of its own span.
The embeddings are the mean-pooled outputs of the audio, video and fusion
encoders (fused only when the clip has both); the shared ones are the audio
and video embeddings projected into the space cross-modal retrieval searches
(unit vectors: a client compares them by dot product). Classification uses
the fused head when the clip has both modalities, else the head of the one it
has.
"""

from __future__ import annotations

import math
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
# The shortest audio a clip may hold, as a fraction of the model's clip.
MIN_AUDIO_FRACTION = 0.25


@dataclass(frozen=True)
class Clip:
    """One request's clip, decoded: audio samples at 16 kHz and/or frames."""

    audio: np.ndarray | None = None  # float32 (samples,)
    frames: np.ndarray | None = None  # float32 (frames, height, width, 3) in [0, 1]


@dataclass(frozen=True)
class Prepared:
    """A clip's encoder inputs, one row per window (one window unless the audio is longer than the model's clip)."""

    audio: torch.Tensor | None  # spectrogram patches [W, Na, P]
    video: torch.Tensor | None  # tubelets [W, Nv, P]

    @property
    def windows(self) -> int:
        return len(self.audio if self.audio is not None else self.video)


@dataclass(frozen=True)
class ClipEmbedding:
    """Mean-pooled embeddings (float32 [dim]) of the modalities the clip had,
    the audio and video ones in the shared space (unit [embed_dim]), and how
    many windows of the model's clip length they are the mean of."""

    audio: np.ndarray | None
    video: np.ndarray | None
    fused: np.ndarray | None
    shared_audio: np.ndarray | None
    shared_video: np.ndarray | None
    windows: int = 1


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

    @property
    def clip_samples(self) -> int:
        audio = self.config.audio
        return round(audio.seconds * audio.sample_rate)

    @property
    def min_audio_samples(self) -> int:
        return math.ceil(MIN_AUDIO_FRACTION * self.clip_samples)

    def prepare(self, clip: Clip) -> Prepared:
        """The clip's patches, or InvalidRequest naming the field at fault."""
        if clip.audio is None and clip.frames is None:
            raise InvalidRequest("clip", "holds neither audio nor frames")
        if clip.frames is not None and (clip.frames.ndim != 4 or clip.frames.shape[-1] != 3 or not len(clip.frames)):
            raise InvalidRequest("clip.frames", "expected RGB frames (frames, height, width, 3)")
        if clip.audio is None:
            return Prepared(None, self._tubelets([clip.frames]))
        starts = self._windows(clip.audio)
        windows = [clip.audio[start:start + self.clip_samples] for start in starts]
        audio = audio_patches(torch.from_numpy(np.stack(windows).astype(np.float32, copy=False)), self.config.audio)
        if clip.frames is None:
            return Prepared(audio, None)
        return Prepared(audio, self._tubelets(window_frames(len(clip.frames), starts, self.clip_samples,
                                                            len(clip.audio), clip.frames)))

    def _windows(self, samples: np.ndarray) -> list[int]:
        """Where each window of the model's clip length starts in ``samples``."""
        audio = self.config.audio
        if samples.ndim != 1 or not len(samples):
            raise InvalidRequest("clip.audio", "expected a non-empty mono waveform")
        if len(samples) < self.min_audio_samples:
            raise InvalidRequest("clip.audio", f"{len(samples) / audio.sample_rate:.3f} s; model {self.name} reads at "
                                 f"least {self.min_audio_samples / audio.sample_rate:g} s (a quarter of its "
                                 f"{audio.seconds:g} s clip)")
        count = math.ceil(len(samples) / self.clip_samples)
        if count == 1:
            return [0]
        return np.linspace(0, len(samples) - self.clip_samples, count).round().astype(int).tolist()

    def _tubelets(self, frames: list[np.ndarray]) -> torch.Tensor:
        """Each window's frames [F, H, W, 3] -> tubelets [windows, Nv, P]."""
        return torch.cat([video_tubelets(torch.from_numpy(np.ascontiguousarray(part, dtype=np.float32))[None],
                                         self.config.video) for part in frames])

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
        """One pass of each encoder over every window of the prepared clips (the batcher's thread calls it)."""
        model, dtype = self.model, next(self.model.parameters()).dtype
        with_audio = [i for i, item in enumerate(items) if item.audio is not None]
        with_video = [i for i, item in enumerate(items) if item.video is not None]
        both = [i for i in with_audio if items[i].video is not None]
        audio = video = None
        if with_audio:
            audio = model.encode_audio(torch.cat([items[i].audio for i in with_audio]).to(self.device, dtype))
        if with_video:
            video = model.encode_video(torch.cat([items[i].video for i in with_video]).to(self.device, dtype))
        fused = None
        if both:
            a_rows = _window_rows(items, with_audio, both, "audio", self.device)
            v_rows = _window_rows(items, with_video, both, "video", self.device)
            fused = model.fuse(audio[0][a_rows], audio[1][a_rows], video[0][v_rows], video[1][v_rows]).mean(1)
        pooled_audio = None if audio is None else _clip_means(audio[0].mean(1), items, with_audio)  # [Ba, dim]
        pooled_video = None if video is None else _clip_means(video[0].mean(1), items, with_video)  # [Bv, dim]
        found = {
            "audio": _by_clip(with_audio, pooled_audio),
            "video": _by_clip(with_video, pooled_video),
            "fused": _by_clip(both, None if fused is None else _clip_means(fused, items, both)),
            "shared_audio": _by_clip(with_audio, None if audio is None else model.shared_audio(pooled_audio)),
            "shared_video": _by_clip(with_video, None if video is None else model.shared_video(pooled_video)),
        }
        return [ClipEmbedding(**{field: rows.get(i) for field, rows in found.items()}, windows=item.windows)
                for i, item in enumerate(items)]

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


def window_frames(count: int, starts: list[int], window: int, samples: int, frames: np.ndarray) -> list[np.ndarray]:
    """The frames of each audio window: the ``count`` frames are taken to span
    the ``samples`` of sound evenly, and a window reads those whose middle
    falls in its span (the nearest one when none does)."""
    if len(starts) == 1:
        return [frames]
    middles = (np.arange(count) + 0.5) * samples / count
    parts = []
    for start in starts:
        inside = np.flatnonzero((middles >= start) & (middles < start + window))
        parts.append(frames[inside] if len(inside) else frames[[np.abs(middles - start - window / 2).argmin()]])
    return parts


def _window_rows(items: list[Prepared], encoded: list[int], wanted: list[int], modality: str, device) -> torch.Tensor:
    """Rows (of the windows of the clips ``encoded``, in order) that hold the windows of the clips ``wanted``."""
    first, offsets = 0, {}
    for i in encoded:
        offsets[i] = first
        first += len(getattr(items[i], modality))
    return torch.tensor([offsets[i] + w for i in wanted for w in range(items[i].windows)], device=device)


def _clip_means(rows: torch.Tensor, items: list[Prepared], clips: list[int]) -> torch.Tensor:
    """Rows [sum of windows, dim] of the clips ``clips`` (their windows in order) -> each clip's mean [clips, dim]."""
    return torch.stack([part.mean(0) for part in rows.split([items[i].windows for i in clips])])


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
