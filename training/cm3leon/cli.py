"""CM3Leon: the text and image tokenizers, then the transformer, on the procedural image world.

The command line of ``patchwork train cm3leon``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from patchwork.training.arguments import command_line, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from patchwork.training.cm3leon.presets import PRESETS

    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    parser.add_argument("--steps", type=positive_int, help="override the preset's steps for both stages")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from patchwork.training.cm3leon.presets import PRESETS
    from patchwork.training.cm3leon.train import train_cm3leon

    metrics = train_cm3leon(PRESETS[args.preset](), args.out, command=command_line(argv),
                            steps=args.steps)
    for name, value in metrics.items():
        print(f"{name}: {value:.4f}")
    print(f"checkpoint: {args.out}")
    return 0
