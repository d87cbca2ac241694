"""CM3Leon: the text and image tokenizers, then the transformer, on the procedural image world.

The command line of ``python -m training cm3leon``.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from training.arguments import positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from training.cm3leon.presets import PRESETS

    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    parser.add_argument("--steps", type=positive_int, help="override the preset's steps for both stages")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from training.cm3leon.presets import PRESETS
    from training.cm3leon.train import train_cm3leon

    metrics = train_cm3leon(PRESETS[args.preset](), args.out, command=shlex.join(["python", "-m", "training", *argv]),
                            steps=args.steps)
    for name, value in metrics.items():
        print(f"{name}: {value:.4f}")
    print(f"checkpoint: {args.out}")
    return 0
