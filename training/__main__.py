"""python -m training <family> ...: train a checkpoint; python -m training mot-study: the backbone study.

Each family with a trainer in the registry (``engines.registry.Family.trainer``)
gets a sub-command, and so does each study (``STUDIES``); its module's
``add_arguments(parser)`` declares the options and ``run(args, argv)`` trains
and returns the exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from engines.registry import get_family, known_families


# Commands that train more than one checkpoint's worth: name -> module.
STUDIES = {"mot-study": "training.mot.study"}


def trainers() -> dict[str, str]:
    """Command -> its module: every family with a trainer, then the studies."""
    families = {name: family.trainer for name in known_families() if (family := get_family(name)).trainer}
    return {**families, **STUDIES}


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m training", description="Train a Patchwork checkpoint.")
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
