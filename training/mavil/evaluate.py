"""What MAViL's training buys, measured on the held-out clips of the world a checkpoint was trained on.

    patchwork eval mavil --model stage-2=DIR [--model stage-1=DIR ...] [--json FILE] [--markdown FILE]
    patchwork eval mavil --towers [--preset default] [--steps N] [--json FILE]

For a randomly initialised encoder (of the first model's config) and each
named checkpoint: linear-probe accuracy of the audio, video and fused
embeddings (a probe trained on the training clips, scored on the held-out
ones; 12 classes, of which audio alone or video alone can tell at most
half), a linear probe of each attribute each modality carries on that
modality's embedding (``training.mavil.attributes``), and audio->video /
video->audio retrieval recall@1 and @5 among the held-out clips, beside the
references of retrievers that match clips on part of what sound and sight
share (kind alone; kind, speed and glide; and coarse size; everything: the
world's ceiling, since many clips sound and look alike in all of it).

``--towers`` runs the supervised tower check of a preset's encoders instead
(``training.mavil.towers``), and exits 1 when an encoder misses a bar.
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
from patchwork.training.arguments import positive_int
from patchwork.training.avworld import LABELS, AudioVideoWorld
from patchwork.training.mavil.attributes import CARRIED, SHARED, labels, reference_recall
from patchwork.training.mavil.presets import PRESETS
from patchwork.training.mavil.probe import attribute_probes, clip_embeddings
from patchwork.training.mavil.towers import TowerCheck, check_towers, failures, required
from patchwork.training.mavil.train import HELDOUT_START, encoder_inputs, probe_and_heads
from patchwork.training.progress import Phases

COLUMNS = {
    "probe_audio_accuracy": "probe audio", "probe_video_accuracy": "probe video",
    "probe_fused_accuracy": "probe fused", "audio_to_video_recall@1": "A->V R@1",
    "audio_to_video_recall@5": "A->V R@5", "video_to_audio_recall@1": "V->A R@1",
    "video_to_audio_recall@5": "V->A R@5",
}
ATTRIBUTES = [f"{modality} {name}" for modality, carried in CARRIED.items() for name in carried]
RANDOM = "random init"
REFERENCES = "retrieval references"


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
    train_attributes = {modality: labels(train_clips, modality) for modality in CARRIED}
    heldout_attributes = {modality: labels(heldout_clips, modality) for modality in CARRIED}
    results = {REFERENCES: {name: reference_recall(heldout_clips, key) for name, key in SHARED.items()}}
    phases = Phases("eval mavil", len(loaded))
    for name, model in loaded.items():  # each reads the clips with its own input settings
        with phases(f"encoder {name}: embeddings, probes and retrieval") as phase:
            train = clip_embeddings(model, encoder_inputs(train_clips, model.config))
            heldout = clip_embeddings(model, encoder_inputs(heldout_clips, model.config))
            results[name] = probe_and_heads(model, train, train_labels, heldout, heldout_labels, probe_steps)
            results[name].update(attribute_probes(train, train_attributes, heldout, heldout_attributes, probe_steps))
            phase.result = ", ".join(f"{key} {results[name][key]:.3f}" for key in list(COLUMNS)[:3])
    return results


def markdown(results: dict[str, dict[str, float]], heldout: int, references: dict[str, dict[str, float]]) -> str:
    lines = [f"| encoder | {' | '.join(COLUMNS.values())} |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, metrics in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{metrics[key]:.3f}" for key in COLUMNS) + " |")
    lines += ["", f"Chance: probe {1 / len(LABELS):.3f} (one modality alone at most 0.5); recall@1 {1 / heldout:.4f}, "
              f"recall@5 {5 / heldout:.4f} ({heldout} held-out clips).", "",
              "What each encoder carries (a linear probe of each attribute on the modality's embedding):", "",
              f"| encoder | {' | '.join(ATTRIBUTES)} |", "|---" * (len(ATTRIBUTES) + 1) + "|"]
    for name, metrics in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{metrics[key]:.3f}" for key in ATTRIBUTES) + " |")
    lines += ["", "Retrieval references (a retriever matching clips exactly on what is named, in random order "
              "among the clips alike in it; the same both ways):", "", "| matches on | R@1 | R@5 |", "|---|---|---|"]
    for name, recall in references.items():
        lines.append(f"| {name} | {recall['recall@1']:.3f} | {recall['recall@5']:.3f} |")
    return "\n".join(lines) + "\n"


def towers_markdown(results: dict[str, dict[str, float]]) -> str:
    lines = ["| encoder | attribute | held-out accuracy | required |", "|---|---|---|---|"]
    for modality, accuracies in results.items():
        for name, accuracy in accuracies.items():
            lines.append(f"| {modality} | {name} | {accuracy:.3f} | {required(name)} |")
    return "\n".join(lines) + "\n"


def run_towers(args: argparse.Namespace) -> int:
    check = TowerCheck()
    if args.steps:
        check = check.model_copy(update={"schedule": check.schedule.model_copy(update={"steps": args.steps})})
    results = check_towers(PRESETS[args.preset](), check)
    print(towers_markdown(results), end="")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    missed = failures(results)
    for failure in missed:
        print(f"tower check failed: {failure}", file=sys.stderr)
    return 1 if missed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="patchwork eval mavil", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=_named, action="append", help="NAME=DIR (repeatable)")
    parser.add_argument("--probe-steps", type=int, default=300)
    parser.add_argument("--towers", action="store_true", help="run the supervised tower check of --preset instead")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default", help="the preset --towers checks")
    parser.add_argument("--steps", type=positive_int, help="--towers: override the check's training steps")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    if args.towers:
        return run_towers(args)
    if not args.model:
        parser.error("give at least one --model NAME=DIR (or --towers)")
    models = dict(args.model)
    try:
        results = evaluate(models, args.probe_steps)
        heldout = read_manifest(next(iter(models.values()))).training.data["avworld"]["heldout_clips"]
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    references = results.pop(REFERENCES)
    table = markdown(results, heldout, references)
    print(table, end="")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**results, REFERENCES: references}, indent=2) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
