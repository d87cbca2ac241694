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
   documents have their first part (the condition) replaced by ``<mask>`` and
   no retrieved documents: the unconditional stream guided decoding reads.
   Every other document is preceded by 0 to ``max_documents`` retrieved
   bank documents (uniformly, one draw per batch), found with the
   prompt side's embedding (the caption's, or the image's) with 20% of its
   tokens dropped (the paper's query dropout); never the document's own
   bank entry, nor a near-duplicate.
5. Measure the held-out loss and write the checkpoint (the text tokenizer
   as its ``tokenizer.json`` asset).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from engines.checkpoint import TrainingRecord, save_checkpoint
from engines.cm3leon.config import Cm3LeonConfig
from engines.cm3leon.engine import TOKENIZER_ASSET
from engines.cm3leon.model import Cm3LeonModel
from engines.cm3leon.tokenizer import PAD, TextTokenizer
from training.cm3leon.objective import bank_document, cm3, document
from training.cm3leon.presets import Cm3LeonPreset
from training.imageworld import Example, ImageWorld, parse_image
from training.loop import fit

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
    found = model.bank.search(queries, max(counts, default=0), exclude=own)
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


def padded(batch: list[list[int]]) -> torch.Tensor:
    longest = max(map(len, batch))
    return torch.tensor([sequence + [PAD] * (longest - len(sequence)) for sequence in batch])


def lm_loss(model: Cm3LeonModel, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss (nats) over every real token of the padded batch (b, t)."""
    logits = model.lm(batch[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), ignore_index=PAD)


@torch.no_grad()
def heldout_loss(model: Cm3LeonModel, batches: list[torch.Tensor]) -> float:
    total = sum(lm_loss(model, batch).item() * int((batch[:, 1:] != PAD).sum()) for batch in batches)
    return total / sum(int((batch[:, 1:] != PAD).sum()) for batch in batches)


def train_cm3leon(preset: Cm3LeonPreset, out: Path, command: str, steps: int | None = None) -> dict[str, float]:
    """Runs the whole recipe and writes the checkpoint to ``out``; returns its metrics."""
    started = time.monotonic()
    torch.manual_seed(preset.seed)
    rng = random.Random(preset.seed)
    vq_schedule, retriever_schedule, lm_schedule = preset.vq_schedule, preset.retriever_schedule, preset.lm_schedule
    if steps is not None:
        vq_schedule = vq_schedule.model_copy(update={"steps": steps})
        retriever_schedule = retriever_schedule.model_copy(update={"steps": steps})
        lm_schedule = lm_schedule.model_copy(update={"steps": steps})
    world = ImageWorld(seed=preset.world_seed, image_size=preset.vq.image_size, jitter=preset.world_jitter)
    train = world.take(preset.train_images)
    heldout = world.take(preset.heldout_images, start=HELDOUT_START)

    tokenizer = TextTokenizer.train((t for e in train for t in (e.caption, e.alt_text)), preset.text_vocab)
    bank_size = min(preset.bank_size, len(train))
    config = Cm3LeonConfig(transformer=preset.transformer, text_vocab=tokenizer.vocab_size, vq=preset.vq,
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
    vq_metrics = reconstruction_metrics(model, heldout)
    tqdm.write(f"image tokenizer: held-out RMSE {vq_metrics['vq_heldout_rmse']:.1f}, "
               f"parser agreement {vq_metrics['vq_parser_agreement']:.3f}")

    with torch.no_grad():
        codes = torch.cat([model.vq.encode(chunk) for chunk in images.split(256)])
        heldout_codes = model.vq.encode(images_of(heldout))
    captions = [tokenizer.encode(e.caption) for e in train]
    alt_texts = [tokenizer.encode(e.alt_text) for e in train]

    def retriever_batch() -> tuple[list[list[int]], torch.Tensor]:
        picks = [rng.randrange(len(train)) for _ in range(retriever_schedule.batch_size)]
        return [captions[i] for i in picks], codes[picks]

    model.retriever.train()
    fit(model.retriever.parameters(), lambda batch: model.retriever.loss(*batch), retriever_batch,
        retriever_schedule, "retriever")
    model.retriever.eval()
    model.retriever.requires_grad_(False)
    with torch.no_grad():
        bank_vectors = model.retriever.document_vectors(captions[:bank_size], codes[:bank_size])
    bank = [bank_document(caption, image)
            for caption, image in zip(captions[:bank_size], model.image_ids(codes[:bank_size]).tolist())]
    model.bank.fill(bank_vectors, bank)
    retrieval_metrics = retrieval_accuracy(model, [tokenizer.encode(e.caption) for e in heldout], heldout_codes)

    max_documents = config.retrieval.max_documents if bank_size else 0
    heldout_rng = random.Random(1)
    heldout_batches = [padded(sequences(
        model, [tokenizer.encode(e.caption) for e in chunk], [tokenizer.encode(e.alt_text) for e in chunk],
        heldout_codes[start:start + len(chunk)], heldout_rng, max_documents, own=[-1] * len(chunk),
        condition_dropout=preset.condition_dropout)) for start, chunk in _chunks(heldout, 32)]

    def next_batch() -> torch.Tensor:
        picks = [rng.randrange(len(train)) for _ in range(lm_schedule.batch_size)]
        return padded(sequences(model, [captions[i] for i in picks], [alt_texts[i] for i in picks], codes[picks],
                                rng, max_documents, own=[i if i < bank_size else -1 for i in picks],
                                condition_dropout=preset.condition_dropout))

    model.lm.train()
    fit(model.lm.parameters(), lambda batch: lm_loss(model, batch), next_batch, lm_schedule, "cm3leon")
    model.lm.eval()
    metrics = {
        "heldout_loss": heldout_loss(model, heldout_batches),
        **vq_metrics,
        **retrieval_metrics,
        "text_vocab": float(tokenizer.vocab_size),
        "parameters": float(sum(p.numel() for p in model.lm.parameters())),
        "vq_parameters": float(sum(p.numel() for p in model.vq.parameters())),
        "train_seconds": time.monotonic() - started,
    }
    record = TrainingRecord(
        command=command,
        data={"image_world": {"seed": preset.world_seed, "image_size": preset.vq.image_size,
                              "jitter": preset.world_jitter,
                              "train_images": len(train), "heldout_images": len(heldout),
                              "heldout_start": HELDOUT_START}},
        metrics=metrics,
    )
    save_checkpoint(out, config, model.state_dict(), record, assets={TOKENIZER_ASSET: tokenizer.to_json()})
    return metrics


def _chunks(items: list, size: int) -> list[tuple[int, list]]:
    """(start, items[start:start + size]) for every chunk."""
    return [(i, items[i:i + size]) for i in range(0, len(items), size)]
