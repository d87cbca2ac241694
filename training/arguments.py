"""What the trainers' command lines share: argument types and the command a checkpoint records."""

from __future__ import annotations

import argparse
import shlex


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def command_line(argv: list[str]) -> str:
    """The `patchwork train` command that ``argv`` (its arguments) spells, as a checkpoint's manifest records it."""
    return shlex.join(["patchwork", "train", *argv])
