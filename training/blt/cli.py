"""Byte Latent Transformer: the entropy model, then BLT.

The command line of ``patchwork train blt``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from patchwork.training.arguments import command_line, positive_int
from patchwork.training.blt.corpus import ByteCorpus
from patchwork.training.data import DataError, build_documents


def _patch_size(text: str) -> float:
    value = float(text)
    if not value > 1.0:
        raise argparse.ArgumentTypeError("must be greater than 1 byte")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from patchwork.training.blt.presets import PRESETS

    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    parser.add_argument("--data", type=Path, help="directory of text files or a JSONL file (default: the Python "
                        "standard library's sources and docs)")
    parser.add_argument("--steps", type=positive_int, help="override the preset's steps for both stages")
    parser.add_argument("--target-patch-size", type=_patch_size, help="average bytes per patch to calibrate for")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from patchwork.training.blt.presets import PRESETS
    from patchwork.training.blt.train import train_blt

    preset = PRESETS[args.preset]()
    try:
        corpus = ByteCorpus.from_documents(build_documents(args.data, preset.corpus_bytes))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    metrics = train_blt(
        preset, corpus, args.out, command=command_line(argv),
        steps=args.steps, target_patch_size=args.target_patch_size,
    )
    for name, value in metrics.items():
        print(f"{name}: {value:.4f}")
    print(f"checkpoint: {args.out}")
    return 0
