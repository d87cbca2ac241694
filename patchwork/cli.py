"""The `patchwork` command: one entry point for what users run.

    patchwork serve up|down|config|status|scale|models ...
    patchwork client generate|score|image|caption|infill|embed|classify|retrieve ...
    patchwork train blt|cm3leon|mavil|mot-study ...
    patchwork eval cm3leon|mavil ...
    patchwork bench blt|mavil|mot|kernels ...
    patchwork loadtest run|sweep|overhead|compare ...
    patchwork index | avworld | hf import|export ...

Each command is the ``main(argv)`` of one module, imported only when it runs
(``patchwork --help`` imports nothing heavy); ``python -m <that module>``
runs the same code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import PackageNotFoundError, version

# command -> (module whose main(argv) runs it, one line of help), or a group of such commands
Command = tuple[str, str]
COMMANDS: dict[str, Command | dict[str, Command]] = {
    "serve": ("patchwork.serving.__main__", "start, stop, scale and inspect a server"),
    "client": ("patchwork.serving.client", "call a running server"),
    "train": ("patchwork.training.__main__", "train a checkpoint (or run the MoT study)"),
    "eval": {
        "cm3leon": ("patchwork.training.cm3leon.evaluate", "CM3Leon's evaluation: guidance, retrieval, captions"),
        "mavil": ("patchwork.training.mavil.evaluate", "MAViL's evaluation: retrieval, probes, classification"),
    },
    "bench": {
        "blt": ("patchwork.benchmarks.blt", "BLT generation speed against the reference and transformers"),
        "mavil": ("patchwork.benchmarks.mavil", "MAViL's embedding speed, in process and served"),
        "mot": ("patchwork.benchmarks.mot", "a MoT decode step against the dense one"),
        "kernels": ("patchwork.benchmarks.kernels", "the Triton kernels against their references"),
    },
    "loadtest": ("patchwork.loadtests.__main__", "Locust load tests and the served overhead"),
    "index": ("patchwork.training.mavil.index", "build a retrieval index into a MAViL checkpoint"),
    "avworld": ("patchwork.training.avworld.__main__", "write clips of the audio-video world"),
    "hf": {
        "import": ("patchwork.engines.blt.convert_hf", "a Hugging Face BLT checkpoint -> a Patchwork checkpoint"),
        "export": ("patchwork.engines.blt.export_hf", "a Patchwork BLT checkpoint -> Hugging Face's layout"),
    },
}


def _dispatch(prog: str, commands: dict[str, Command | dict[str, Command]], argv: list[str], description: str) -> int:
    lines = []
    for name, entry in commands.items():
        if isinstance(entry, dict):
            lines.append(f"  {name} {'|'.join(entry)}")
        else:
            lines.append(f"  {name:<10} {entry[1]}")
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog="commands:\n" + "\n".join(lines),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if prog == "patchwork":
        parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("command", choices=list(commands), metavar="COMMAND")
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="the command's own (see COMMAND --help)")
    args = parser.parse_args(argv)
    entry = commands[args.command]
    if isinstance(entry, dict):
        return _dispatch(f"{prog} {args.command}", entry, args.arguments, f"patchwork {args.command}")
    return importlib.import_module(entry[0]).main(args.arguments)


def _version() -> str:
    try:
        return version("patchwork")
    except PackageNotFoundError:
        return "(not installed)"


def main(argv: list[str] | None = None) -> int:
    return _dispatch("patchwork", COMMANDS, sys.argv[1:] if argv is None else argv,
                     "Train, serve, call and measure Patchwork models.")
