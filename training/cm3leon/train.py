"""Training a CM3Leon checkpoint on the procedural image world.

1. Train the text tokenizer (byte-level BPE) on the training captions and alt-texts.
2. Train the image tokenizer (VQ-VAE) on the training images; measure its
   held-out reconstruction error and how often the scene parser reads a
   reconstruction as it reads the original.
3. Turn every training image into codes; train the retriever (a dual
   encoder, InfoNCE) on the (caption, codes) pairs and fill the memory bank
   with the first ``bank_size`` training documents.
4. Train the transformer with the CM3 objective on caption-and-image
   documents, each in a random order (caption -> image or image -> caption,
   half of the latter with the image's noisy alt-text before the caption),
   the tokenizers and retriever frozen. A ``condition_dropout`` fraction of
   documents have their condition replaced by ``<mask>`` and no retrieved
   documents: the unconditional stream guided decoding reads. Half of them
   drop their first part (the condition of text->image and image->text), the
   other half the whole masked document (the condition of infilling).
   Every other document is preceded by 0 to ``max_documents`` retrieved
   bank documents (uniformly, one draw per batch), found with the
   prompt side's embedding (the caption's, or the image's) with 20% of its
   tokens dropped (the paper's query dropout); never the document's own
   bank entry, nor a near-duplicate.
5. Measure the held-out loss (overall and per modality of the predicted
   token) and write the checkpoint (the text tokenizer as its
   ``tokenizer.json`` asset).

With ``audio_clips`` the model also learns sound: clips of the audio-video
world (``training.avworld``) described by what a listener can tell
(``Motion.sound_caption``); the audio tokenizer (k-means over log-mel frames,
``training.cm3leon.audio``) is fitted after the image tokenizer, and an
``audio_fraction`` of every batch's documents are caption-and-sound
documents (either order, the same condition dropout, no retrieval: the
retriever pairs captions with images).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from patchwork.engines.checkpoint import TrainingRecord, save_checkpoint
from patchwork.engines.cm3leon.config import Cm3LeonConfig
from patchwork.engines.cm3leon.engine import TOKENIZER_ASSET
from patchwork.engines.cm3leon.model import Cm3LeonModel
from patchwork.engines.cm3leon.prompts import AUDIO_MARKERS
from patchwork.engines.cm3leon.retrieval import Query
from patchwork.engines.cm3leon.tokenizer import PAD, TextTokenizer
from patchwork.engines.layers import PaddedRows
from patchwork.training.avworld import AudioVideoWorld
from patchwork.training.cm3leon.audio import fit_audio_tokenizer, quantisation_error
from patchwork.training.cm3leon.objective import bank_document, cm3, document
from patchwork.training.cm3leon.presets import Cm3LeonPreset
from patchwork.training.imageworld import Example, ImageWorld, parse_image
from patchwork.training.loop import Schedule, fit

# Held-out examples come from indices no training run reaches.
HELDOUT_START = 10_000_000


def images_of(examples: list[Example]) -> torch.Tensor:
    return torch.from_numpy(np.stack([example.image for example in examples]))  # uint8 (n, size, size, 3)


@torch.no_grad()
def reconstruction_metrics(model: Cm3LeonModel, examples: list[Example]) -> dict[str, float]:
    """Held-out pixel RMSE (0-255 scale) of the image tokenizer, and the fraction
    of images whose reconstruction the parser reads as it reads the original."""
    images = images_of(examples)
    rebuilt = torch.cat([model.vq.decode(model.vq.encode(chunk)) for chunk in images.split(64)])
    rmse = (rebuilt.float() - images.float()).pow(2).mean().sqrt().item()
    agree = np.mean([parse_image(r.numpy()).attributes == e.scene.attributes for r, e in zip(rebuilt, examples)])
    return {"vq_heldout_rmse": rmse, "vq_parser_agreement": float(agree)}


QUERY_DROPOUT = 0.2
# Image-first training documents that carry their alt-text before the caption.
ALT_TEXT_FRACTION = 0.5
# Of the documents whose condition is dropped, those that drop the whole masked
# document (infilling's condition) instead of its first part.
INFILL_DROPPED_FRACTION = 0.5


@torch.no_grad()
def retrieved(model: Cm3LeonModel, captions: list[list[int]], codes: torch.Tensor, image_first: list[bool],
              counts: list[int], own: list[int], rng: random.Random) -> list[list[list[int]]]:
    """Bank documents for each training document: ``counts[i]`` of them, found
    with its prompt side's embedding after query dropout, never its own
    bank entry ``own[i]`` (-1: not in the bank)."""
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    texts = [[t for t in caption if rng.random() >= QUERY_DROPOUT] or caption[:1] for caption in captions]
    keep = torch.rand(codes.shape, generator=generator) >= QUERY_DROPOUT
    by_text, by_image = model.retriever.embed_texts(texts), model.retriever.embed_images(codes, keep)
    queries = torch.where(torch.tensor(image_first)[:, None], by_image, by_text)
    # Near-duplicates of the whole document are skipped, not just of its query side.
    query = Query(queries, texts=model.retriever.embed_texts(captions), images=model.retriever.embed_images(codes))
    found = model.bank.search(query, max(counts, default=0), exclude=own)
    return [[model.bank.document(i) for i in indices[:count]] for indices, count in zip(found, counts)]


def sequences(model: Cm3LeonModel, captions: list[list[int]], alt_texts: list[list[int]], codes: torch.Tensor,
              rng: random.Random, max_documents: int, own: list[int], condition_dropout: float) -> list[list[int]]:
    """One training sequence per (caption, alt-text, image codes) triple
    (``own``: their bank entries, -1 for none): retrieved documents, then the
    document in a random order under the CM3 objective; half the image-first
    documents carry their alt-text; a ``condition_dropout`` fraction has its
    condition dropped to ``<mask>`` and nothing retrieved. The others all have
    the same number of retrieved documents, one draw per call, so a batch is
    never padded to a neighbour that retrieved more."""
    image_first = [rng.random() < 0.5 for _ in captions]
    dropped = [rng.random() < condition_dropout for _ in captions]
    count = rng.randint(0, max_documents)
    counts = [0 if drop else count for drop in dropped]
    context = retrieved(model, captions, codes, image_first, counts, own, rng)
    out = []
    images = model.image_ids(codes).tolist()  # the retriever reads code ids, the transformer joint-vocabulary ids
    for caption, alt, image, first, drop, documents in zip(captions, alt_texts, images, image_first, dropped, context):
        noted = alt if first and rng.random() < ALT_TEXT_FRACTION else None
        if drop and rng.random() < INFILL_DROPPED_FRACTION:
            tokens, parts = document(caption, image, image_first=first, alt_text=noted)
            out.append(cm3(tokens, parts, rng, document_dropped=True))
            continue
        tokens, parts = document(caption, image, image_first=first, alt_text=noted, condition_dropped=drop)
        out.append([*(t for d in documents for t in d), *cm3(tokens, parts, rng)])
    return out


@torch.no_grad()
def retrieval_accuracy(model: Cm3LeonModel, captions: list[list[int]], codes: torch.Tensor) -> dict[str, float]:
    """How often a held-out caption's embedding is nearest its own image's
    among the held-out images (and the other way round): the retriever's
    held-out recall@1, against 1/n by chance."""
    texts, images = model.retriever.embed_texts(captions), model.retriever.embed_images(codes)
    similarity = texts @ images.T
    labels = torch.arange(len(captions))
    return {"retriever_text_to_image_recall": float((similarity.argmax(1) == labels).float().mean()),
            "retriever_image_to_text_recall": float((similarity.argmax(0) == labels).float().mean())}


def sound_sequences(source: Cm3LeonModel, captions: list[list[int]], codes: torch.Tensor, rng: random.Random,
                    condition_dropout: float) -> list[list[int]]:
    """One CM3 training sequence per (caption, sound codes) pair, in a random order."""
    out = []
    for caption, sound in zip(captions, source.audio_ids(codes).tolist()):
        first, dropped = rng.random() < 0.5, rng.random() < condition_dropout
        tokens, parts = document(caption, sound, image_first=first, condition_dropped=dropped, markers=AUDIO_MARKERS)
        out.append(cm3(tokens, parts, rng))
    return out


def padded(batch: list[list[int]]) -> torch.Tensor:
    longest = max(map(len, batch))
    return torch.tensor([sequence + [PAD] * (longest - len(sequence)) for sequence in batch])


@dataclass
class Corpus:
    """What the transformer trains on: every training document's parts as
    token ids, and ``source``, the model whose frozen retriever and bank
    find each document's retrieved documents."""

    source: Cm3LeonModel
    tokenizer: TextTokenizer
    captions: list[list[int]]
    alt_texts: list[list[int]]
    codes: torch.Tensor  # image codes [n, image_tokens]
    bank_size: int
    max_documents: int
    condition_dropout: float
    sound_captions: list[list[int]]
    sound_codes: torch.Tensor | None  # [m, audio.tokens], None without sound
    audio_fraction: float
    heldout: list[torch.Tensor]  # padded held-out batches

    def batch(self, rng: random.Random, size: int) -> torch.Tensor:
        sounds = round(size * self.audio_fraction) if self.sound_codes is not None else 0
        picks = [rng.randrange(len(self.captions)) for _ in range(size - sounds)]
        rows = sequences(self.source, [self.captions[i] for i in picks], [self.alt_texts[i] for i in picks],
                         self.codes[picks], rng, self.max_documents,
                         own=[i if i < self.bank_size else -1 for i in picks],
                         condition_dropout=self.condition_dropout) if picks else []
        if sounds:
            heard = [rng.randrange(len(self.sound_captions)) for _ in range(sounds)]
            rows += sound_sequences(self.source, [self.sound_captions[i] for i in heard], self.sound_codes[heard],
                                    rng, self.condition_dropout)
        return padded(rows)


def lm_loss(model: Cm3LeonModel, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss (nats) over every real token of the right-padded batch (b, t)."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    # Only the inputs with a real next token are computed, not the padding.
    rows = PaddedRows((targets != PAD).sum(1), inputs.shape[1])
    return F.cross_entropy(model.lm(inputs, rows), rows.pack(targets))


@torch.no_grad()
def heldout_losses(model: Cm3LeonModel, batches: list[torch.Tensor]) -> dict[str, float]:
    """Mean next-token loss (nats) over the real tokens of ``batches``:
    ``heldout_loss`` over all of them, and ``heldout_loss_<modality>`` over
    the tokens of each modality (special tokens count as text)."""
    modalities = model.config.modalities
    totals, counts = torch.zeros(len(modalities), dtype=torch.float64), torch.zeros(len(modalities))
    for batch in batches:
        targets = batch[:, 1:]
        losses = F.cross_entropy(model.lm(batch[:, :-1]).flatten(0, 1).float(), targets.flatten(), reduction="none")
        real = targets.flatten() != PAD
        modality = model.modality_of(targets.flatten())[real]
        totals.index_add_(0, modality, losses[real].double())
        counts.index_add_(0, modality, torch.ones(len(modality)))
    out = {"heldout_loss": float(totals.sum() / counts.sum())}
    out.update({f"heldout_loss_{name}": float(totals[i] / counts[i]) for i, name in enumerate(modalities) if counts[i]})
    return out


def train_lm(model: Cm3LeonModel, corpus: Corpus, schedule: Schedule, rng: random.Random) -> None:
    """Trains ``model.lm`` on batches of ``corpus`` drawn with ``rng``."""
    model.lm.train()
    fit(model.lm.parameters(), lambda batch: lm_loss(model, batch), lambda: corpus.batch(rng, schedule.batch_size),
        schedule, f"{model.config.backbone} transformer")
    model.lm.eval()


def prepare(preset: Cm3LeonPreset, steps: int | None = None) -> tuple[Cm3LeonModel, Corpus, dict, dict]:
    """Steps 1-3 (and the audio tokenizer): the model with its tokenizers,
    retriever and bank trained and frozen, its transformer untrained; the
    corpus; their metrics; and the data record."""
    torch.manual_seed(preset.seed)
    rng = random.Random(preset.seed)
    generator = torch.Generator().manual_seed(preset.seed)
    vq_schedule, retriever_schedule = preset.vq_schedule, preset.retriever_schedule
    if steps is not None:
        vq_schedule = vq_schedule.model_copy(update={"steps": steps})
        retriever_schedule = retriever_schedule.model_copy(update={"steps": steps})
    world = ImageWorld(seed=preset.world_seed, image_size=preset.vq.image_size, jitter=preset.world_jitter)
    train = world.take(preset.train_images)
    heldout = world.take(preset.heldout_images, start=HELDOUT_START)
    sound_world = AudioVideoWorld(seed=preset.world_seed)
    sounds = sound_world.take(preset.audio_clips)
    heldout_sounds = sound_world.take(preset.heldout_audio_clips if sounds else 0, start=HELDOUT_START)

    texts = [t for e in train for t in (e.caption, e.alt_text)] + [clip.motion.sound_caption for clip in sounds]
    tokenizer = TextTokenizer.train(texts, preset.text_vocab)
    bank_size = min(preset.bank_size, len(train))
    config = Cm3LeonConfig(backbone=preset.backbone, untied=preset.untied, transformer=preset.transformer,
                           text_vocab=tokenizer.vocab_size, vq=preset.vq, audio=preset.audio if sounds else None,
                           max_sequence=preset.max_sequence,
                           retrieval=preset.retrieval.model_copy(update={"bank_size": bank_size}))
    model = Cm3LeonModel(config)
    torch.nn.init.normal_(model.lm.embed_tokens.weight, std=0.02)

    images = images_of(train)
    model.vq.train()
    fit(model.vq.parameters(), lambda batch: model.vq.loss(batch)[0],
        lambda: images[torch.randint(len(images), (vq_schedule.batch_size,))], vq_schedule, "image tokenizer")
    model.vq.eval()
    model.vq.requires_grad_(False)
    metrics = reconstruction_metrics(model, heldout)
    tqdm.write(f"image tokenizer: held-out RMSE {metrics['vq_heldout_rmse']:.1f}, "
               f"parser agreement {metrics['vq_parser_agreement']:.3f}")

    with torch.no_grad():
        codes = torch.cat([model.vq.encode(chunk) for chunk in images.split(256)])
        heldout_codes = model.vq.encode(images_of(heldout))
    captions = [tokenizer.encode(e.caption) for e in train]
    alt_texts = [tokenizer.encode(e.alt_text) for e in train]

    sound_codes = heldout_sound_codes = None
    if sounds:
        waveforms = torch.from_numpy(np.stack([clip.waveform for clip in sounds]))
        held_waveforms = torch.from_numpy(np.stack([clip.waveform for clip in heldout_sounds]))
        fit_audio_tokenizer(model.audio, waveforms, preset.audio_iterations, generator)
        metrics["audio_vq_heldout_error"] = quantisation_error(model.audio, held_waveforms)
        with torch.no_grad():
            sound_codes = torch.cat([model.audio.encode(chunk) for chunk in waveforms.split(256)])
            heldout_sound_codes = model.audio.encode(held_waveforms)
        tqdm.write(f"audio tokenizer: held-out relative error {metrics['audio_vq_heldout_error']:.3f}")

    def retriever_batch() -> tuple[list[list[int]], torch.Tensor]:
        picks = [rng.randrange(len(train)) for _ in range(retriever_schedule.batch_size)]
        return [captions[i] for i in picks], codes[picks]

    model.retriever.train()
    fit(model.retriever.parameters(), lambda batch: model.retriever.loss(*batch), retriever_batch,
        retriever_schedule, "retriever")
    model.retriever.eval()
    model.retriever.requires_grad_(False)
    if bank_size:
        with torch.no_grad():
            bank_texts = model.retriever.embed_texts(captions[:bank_size])
            bank_images = model.retriever.embed_images(codes[:bank_size])
        bank = [bank_document(caption, image)
                for caption, image in zip(captions[:bank_size], model.image_ids(codes[:bank_size]).tolist())]
        model.bank.fill(bank_texts, bank_images, bank)
    metrics.update(retrieval_accuracy(model, [tokenizer.encode(e.caption) for e in heldout], heldout_codes))

    max_documents = config.retrieval.max_documents if bank_size else 0
    heldout_rng = random.Random(1)
    heldout_batches = [padded(sequences(
        model, [tokenizer.encode(e.caption) for e in chunk], [tokenizer.encode(e.alt_text) for e in chunk],
        heldout_codes[start:start + len(chunk)], heldout_rng, max_documents, own=[-1] * len(chunk),
        condition_dropout=preset.condition_dropout)) for start, chunk in _chunks(heldout, 32)]
    heldout_batches += [padded(sound_sequences(
        model, [tokenizer.encode(clip.motion.sound_caption) for clip in chunk],
        heldout_sound_codes[start:start + len(chunk)], heldout_rng, preset.condition_dropout))
        for start, chunk in _chunks(heldout_sounds, 32)]
    corpus = Corpus(source=model, tokenizer=tokenizer, captions=captions, alt_texts=alt_texts, codes=codes, bank_size=bank_size,
                    max_documents=max_documents, condition_dropout=preset.condition_dropout,
                    sound_captions=[tokenizer.encode(clip.motion.sound_caption) for clip in sounds],
                    sound_codes=sound_codes, audio_fraction=preset.audio_fraction, heldout=heldout_batches)
    data = {"image_world": {"seed": preset.world_seed, "image_size": preset.vq.image_size,
                            "jitter": preset.world_jitter, "train_images": len(train),
                            "heldout_images": len(heldout), "heldout_start": HELDOUT_START}}
    if sounds:
        data["audio_video_world"] = {"seed": preset.world_seed, "train_clips": len(sounds),
                                     "heldout_clips": len(heldout_sounds), "heldout_start": HELDOUT_START}
    return model, corpus, metrics, data


def train_cm3leon(preset: Cm3LeonPreset, out: Path, command: str, steps: int | None = None) -> dict[str, float]:
    """Runs the whole recipe and writes the checkpoint to ``out``; returns its metrics."""
    started = time.monotonic()
    model, corpus, metrics, data = prepare(preset, steps)
    lm_schedule = preset.lm_schedule if steps is None else preset.lm_schedule.model_copy(update={"steps": steps})
    train_lm(model, corpus, lm_schedule, random.Random(preset.seed + 1))
    metrics = {
        **heldout_losses(model, corpus.heldout),
        **metrics,
        "text_vocab": float(model.config.text_vocab),
        "parameters": float(sum(p.numel() for p in model.lm.parameters())),
        "vq_parameters": float(sum(p.numel() for p in model.vq.parameters())),
        # Of the training documents' bank searches, those in which a near-duplicate was skipped.
        "retrieval_searches": float(model.bank.searches),
        "retrieval_near_duplicate_rate": model.bank.deduplicated / max(1, model.bank.searches),
        "train_seconds": time.monotonic() - started,
    }
    record = TrainingRecord(command=command, data=data, metrics=metrics)
    save_checkpoint(out, model.config, model.state_dict(), record, assets={TOKENIZER_ASSET: corpus.tokenizer.to_json()})
    return metrics


def _chunks(items: list, size: int) -> list[tuple[int, list]]:
    """(start, items[start:start + size]) for every chunk."""
    return [(i, items[i:i + size]) for i in range(0, len(items), size)]
