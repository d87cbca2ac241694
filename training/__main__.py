"""patchwork train <family> ...: train a checkpoint; patchwork train mot-study: the backbone study.

Each known family (``patchwork.engines.registry``) whose trainer module
``patchwork.training.<family>.cli`` exists gets a sub-command, and so does
each study (``STUDIES``); its module's ``add_arguments(parser)`` declares the
options and ``run(args, argv)`` trains and returns the exit code.
``python -m patchwork.training`` is the same command.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from patchwork.engines.registry import known_families

# Commands that train more than one checkpoint's worth: name -> module.
STUDIES = {"mot-study": "patchwork.training.mot.study"}


def trainers() -> dict[str, str]:
    """Command -> its module: every family with a trainer, then the studies."""
    here = Path(__file__).parent
    families = {name: f"patchwork.training.{name}.cli" for name in known_families() if (here / name / "cli.py").is_file()}
    return {**families, **STUDIES}


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="patchwork train", description="Train a Patchwork checkpoint.")
    families = root.add_subparsers(dest="family", required=True)
    for name, module in trainers().items():
        description = importlib.import_module(module).__doc__.strip().splitlines()[0]
        importlib.import_module(module).add_arguments(families.add_parser(name, help=description))
    return root


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    return importlib.import_module(trainers()[args.family]).run(args, argv)


if __name__ == "__main__":
    sys.exit(main())
