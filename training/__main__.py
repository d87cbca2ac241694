"""python -m training <family> ...: train a checkpoint."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from training.data import DataError, build_corpus


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _patch_size(text: str) -> float:
    value = float(text)
    if not value > 1.0:
        raise argparse.ArgumentTypeError("must be greater than 1 byte")
    return value


def parser() -> argparse.ArgumentParser:
    from training.blt.presets import PRESETS

    root = argparse.ArgumentParser(prog="python -m training", description="Train a Patchwork checkpoint.")
    families = root.add_subparsers(dest="family", required=True)
    blt = families.add_parser("blt", help="Byte Latent Transformer (entropy model + BLT)")
    blt.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    blt.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    blt.add_argument("--data", type=Path, help="directory of text files or a JSONL file (default: the Python "
                     "standard library's sources and docs)")
    blt.add_argument("--steps", type=_positive_int, help="override the preset's steps for both stages")
    blt.add_argument("--target-patch-size", type=_patch_size, help="average bytes per patch to calibrate for")
    return root


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    from training.blt.presets import PRESETS
    from training.blt.train import train_blt

    preset = PRESETS[args.preset]()
    try:
        corpus = build_corpus(args.data, preset.corpus_bytes)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    metrics = train_blt(
        preset, corpus, args.out, command=shlex.join(["python", "-m", "training", *argv]),
        steps=args.steps, target_patch_size=args.target_patch_size,
    )
    for name, value in metrics.items():
        print(f"{name}: {value:.4f}")
    print(f"checkpoint: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
