"""patchwork avworld --out DIR --count N [--start I] [--seed S]: writes clips of the
audio-video world as clip directories (an ``audio.wav`` and PNG frames each), e.g. to build a
MAViL retrieval index from or to send to a server."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from patchwork.training.arguments import positive_int
from patchwork.training.avworld.files import write_clip
from patchwork.training.avworld.world import AudioVideoWorld


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="patchwork avworld", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=positive_int, required=True)
    parser.add_argument("--start", type=int, default=0, help="the first clip's index in the world")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", type=positive_int, default=8)
    parser.add_argument("--image-size", type=positive_int, default=32)
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args(argv)
    if args.start < 0:
        print(f"error: --start must be at least 0, not {args.start}", file=sys.stderr)
        return 2
    try:
        world = AudioVideoWorld(args.seed, args.frames, args.image_size, args.seconds)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for clip in world.take(args.count, args.start):
        write_clip(args.out, clip)
    print(f"{args.count} clips -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
