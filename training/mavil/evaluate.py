"""What MAViL's training buys, measured on the held-out clips of the world a checkpoint was trained on.

    patchwork eval mavil --model stage-2=DIR [--model stage-1=DIR ...] [--json FILE] [--markdown FILE]

For a randomly initialised encoder (of the first model's config) and each
named checkpoint: linear-probe accuracy of the audio, video and fused
embeddings (a probe trained on the training clips, scored on the held-out
ones; 12 classes, of which audio alone or video alone can tell at most
half), and audio->video / video->audio retrieval recall@1 and @5 among the
held-out clips, beside the ceiling the world allows (many clips sound and
look alike in everything their two modalities share).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from patchwork.engines.checkpoint import CheckpointError, read_manifest
from patchwork.engines.mavil.engine import load_mavil
from patchwork.engines.mavil.model import MavilModel
from patchwork.training.avworld import LABELS, AudioVideoWorld
from patchwork.training.mavil.train import HELDOUT_START, encoder_inputs, probe_and_heads

COLUMNS = {
    "probe_audio_accuracy": "probe audio", "probe_video_accuracy": "probe video",
    "probe_fused_accuracy": "probe fused", "audio_to_video_recall@1": "A->V R@1",
    "audio_to_video_recall@5": "A->V R@5", "video_to_audio_recall@1": "V->A R@1",
    "video_to_audio_recall@5": "V->A R@5",
}
RANDOM = "random init"


def _named(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=DIR")
    return name, Path(path)


def evaluate(models: dict[str, Path], probe_steps: int = 300, seed: int = 0) -> dict[str, dict[str, float]]:
    """Metrics of a random encoder and of each checkpoint, on the world the first was trained on."""
    loaded = {}
    for name, path in models.items():
        engine = load_mavil(path, device="cpu", dtype=torch.float32)
        engine.close()
        loaded[name] = engine.model
    first = next(iter(models.values()))
    world_record = read_manifest(first).training.data["avworld"]
    config = next(iter(loaded.values())).config
    torch.manual_seed(seed)
    loaded = {RANDOM: MavilModel(config).eval(), **loaded}
    world = AudioVideoWorld(seed=world_record["seed"], frames=config.video.frames, image_size=config.video.image_size,
                            seconds=config.audio.seconds)
    train_clips = world.take(world_record["train_clips"])
    heldout_clips = world.take(world_record["heldout_clips"], start=HELDOUT_START)
    train_labels = torch.tensor([clip.label for clip in train_clips])
    heldout_labels = torch.tensor([clip.label for clip in heldout_clips])
    results = {"retrieval ceiling": retrieval_ceiling(heldout_clips)}
    for name, model in loaded.items():  # each reads the clips with its own input settings
        train, heldout = encoder_inputs(train_clips, model.config), encoder_inputs(heldout_clips, model.config)
        results[name] = probe_and_heads(model, train, train_labels, heldout, heldout_labels, probe_steps)
    return results


def heard_and_seen(clip) -> tuple:
    """What a clip's sound and its frames both show: kind, size, speed, and
    whether it moves up, down or sideways (left and right sound alike)."""
    motion = clip.motion
    return motion.kind, motion.side, motion.speed, motion.direction if motion.direction in ("up", "down") else "sideways"


def retrieval_ceiling(clips: list, ks=(1, 5)) -> dict[str, float]:
    """Expected recall@k of a retriever that knows exactly what sound and sight
    share and ranks the clips that share it with the query in random order:
    what the world lets any audio<->video retriever reach (the same both ways)."""
    shared = [heard_and_seen(clip) for clip in clips]
    group = [shared.count(key) for key in shared]
    return {f"recall@{k}": sum(min(1.0, k / size) for size in group) / len(group) for k in ks}


def markdown(results: dict[str, dict[str, float]], heldout: int, ceiling: dict[str, float]) -> str:
    lines = [f"| encoder | {' | '.join(COLUMNS.values())} |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, metrics in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{metrics[key]:.3f}" for key in COLUMNS) + " |")
    lines.append("")
    lines.append(f"Chance: probe {1 / len(LABELS):.3f} (one modality alone at most 0.5); recall@1 {1 / heldout:.4f}, "
                 f"recall@5 {5 / heldout:.4f} ({heldout} held-out clips). The world's ceiling for retrieval (a "
                 f"retriever that knows exactly what sound and sight share): recall@1 {ceiling['recall@1']:.3f}, "
                 f"recall@5 {ceiling['recall@5']:.3f}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="patchwork eval mavil", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=_named, action="append", required=True, help="NAME=DIR (repeatable)")
    parser.add_argument("--probe-steps", type=int, default=300)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    models = dict(args.model)
    try:
        results = evaluate(models, args.probe_steps)
        heldout = read_manifest(next(iter(models.values()))).training.data["avworld"]["heldout_clips"]
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ceiling = results.pop("retrieval ceiling")
    table = markdown(results, heldout, ceiling)
    print(table, end="")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**results, "retrieval ceiling": ceiling}, indent=2) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
