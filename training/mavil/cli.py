"""MAViL: a masked audio-video encoder (stage 1, or stage 2 from a stage-1 teacher) on the procedural audio-video world.

The command line of ``patchwork train mavil``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from patchwork.training.arguments import command_line, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from patchwork.training.mavil.presets import PRESETS

    parser.add_argument("--stage", type=int, choices=(1, 2), default=1,
                        help="1: masked reconstruction and contrast; 2: distil a stage-1 --teacher")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    parser.add_argument("--teacher", type=Path, help="the stage-1 checkpoint stage 2 distils")
    parser.add_argument("--objective", choices=("full", "reconstruction", "contrastive"), default="full",
                        help="stage 1's losses: both (MAViL), or one alone (ablations)")
    parser.add_argument("--steps", type=positive_int, help="override the preset's steps")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from patchwork.engines.checkpoint import CheckpointError
    from patchwork.training.mavil.presets import PRESETS
    from patchwork.training.mavil.train import train_mavil

    if (args.stage == 2) != (args.teacher is not None):
        print("error: --teacher is required with --stage 2, and only then", file=sys.stderr)
        return 2
    if args.stage == 2 and args.objective != "full":
        print("error: --objective chooses stage 1's losses", file=sys.stderr)
        return 2
    try:
        metrics = train_mavil(PRESETS[args.preset](), args.out, command_line(argv),
                              stage=args.stage, teacher=args.teacher, objective=args.objective, steps=args.steps)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, value in metrics.items():
        print(f"{name}: {value:.4f}")
    print(f"checkpoint: {args.out}")
    return 0
