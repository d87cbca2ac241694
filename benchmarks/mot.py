"""What the modality grouping costs: one decode step and one prefill of the
Mixture-of-Transformers language model against the dense one of the same shape.

    patchwork bench mot [--preset default|tiny] [--batch 16] [--context 128] [--rounds 50] [--json FILE]

Both models have the shape of CM3Leon's default transformer (``--preset``)
over a joint vocabulary of text, image and audio ids, random weights (the
cost does not depend on them) and the engine's inference settings (fused
projections, the MoT's stacked by modality; no gradients). A decode step is
``--batch`` rows, each one new token at ``--context`` positions of cache;
the rows are (a) one modality for the whole batch and (b) the three
modalities mixed, as the scheduler steps sequences writing captions, image
codes and sounds together. A prefill is the same rows reading ``--context``
tokens of interleaved modalities. Every configuration runs in turn within
each round (so machine noise falls on all alike); the median over the
rounds is reported, with MoT / dense ratios. Each phase says on stderr when it
starts and what it measured when it ends (``training.progress``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from patchwork.engines.layers import CausalLM, TransformerConfig, fuse_projections
from patchwork.engines.mot.config import Untied
from patchwork.engines.mot.model import MotLM
from patchwork.training.machine import machine
from patchwork.training.progress import Phases

PRESETS = {
    "default": TransformerConfig(dim=128, n_layers=4, n_heads=4),
    "tiny": TransformerConfig(dim=32, n_layers=2, n_heads=4),
}
# Joint vocabulary of the default CM3Leon with sound: text, image codes, audio codes.
TEXT, IMAGE, AUDIO = 512, 256, 128


def _models(cfg: TransformerConfig) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    vocab, boundaries = TEXT + IMAGE + AUDIO, [TEXT, TEXT + IMAGE]
    models = {"dense": CausalLM(cfg, vocab), "mot-all": MotLM(cfg, vocab, boundaries, Untied.ALL)}
    fuse_projections(models["dense"].eval())
    models["mot-all"].eval().fuse()
    return models


def _tokens(rows: int, width: int, mixed: bool, generator: torch.Generator) -> torch.Tensor:
    """[rows, width] ids: text alone, or each position's modality drawn at random."""
    if not mixed:
        return torch.randint(0, TEXT, (rows, width), generator=generator)
    starts = torch.tensor([0, TEXT, TEXT + IMAGE])
    sizes = torch.tensor([TEXT, IMAGE, AUDIO])
    modality = torch.randint(0, 3, (rows, width), generator=generator)
    return starts[modality] + (torch.rand(rows, width, generator=generator) * sizes[modality]).long()


@torch.inference_mode()
def measure(cfg: TransformerConfig, batch: int, context: int, rounds: int) -> dict:
    phases = Phases("bench mot", 3)
    with phases("building the dense and MoT models") as phase:
        models = _models(cfg)
        phase.result = ", ".join(models)
    generator = torch.Generator().manual_seed(1)
    cases = {}  # name -> a call that runs it once
    for name, model in models.items():
        cache = model.stack.new_cache(batch, context + 1, "cpu", torch.float32)
        slots = list(range(batch))
        positions = torch.arange(context)[None].expand(batch, context)
        model.step(_tokens(batch, context, True, generator), model.stack.extend_view(cache, slots, positions))
        last = torch.full((batch,), context)
        for mixed in (False, True):
            step_tokens = _tokens(batch, 1, mixed, generator)
            prefill_tokens = _tokens(batch, context, mixed, generator)
            label = "mixed" if mixed else "one modality"

            def decode(model=model, cache=cache, tokens=step_tokens):
                # Rewrites position `context` of every row: the same step each time.
                model.step(tokens, model.stack.decode_view(cache, slots, last))

            cases[f"{name} decode, {label}"] = decode
            cases[f"{name} prefill, {label}"] = lambda model=model, tokens=prefill_tokens: model(tokens)
    with phases("a warm-up of every case") as phase:
        for run in cases.values():
            run()
        phase.result = f"{len(cases)} cases"
    times: dict[str, list[float]] = {name: [] for name in cases}
    with phases(f"{rounds} rounds of every case") as phase:
        for _ in range(rounds):
            for name, run in cases.items():
                started = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - started)
        milliseconds = {name: 1000 * sorted(values)[len(values) // 2] for name, values in times.items()}
        phase.result = ", ".join(f"{name} {ms:.2f} ms" for name, ms in milliseconds.items() if "decode" in name)
    ratios = {f"{kind}, {label}": milliseconds[f"mot-all {kind}, {label}"] / milliseconds[f"dense {kind}, {label}"]
              for kind in ("decode", "prefill") for label in ("one modality", "mixed")}
    parameters = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    return {"milliseconds": milliseconds, "mot_over_dense": ratios, "parameters": parameters,
            "parameter_bytes_fp32": {name: 4 * count for name, count in parameters.items()}}


def markdown(result: dict) -> str:
    lines = ["| case | dense ms | MoT ms | MoT / dense |", "|---|---|---|---|"]
    ms = result["milliseconds"]
    for case, ratio in result["mot_over_dense"].items():
        lines.append(f"| {case} | {ms['dense ' + case]:.2f} | {ms['mot-all ' + case]:.2f} | {ratio:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="patchwork bench mot", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if min(args.batch, args.context, args.rounds) < 1:
        parser.error("--batch, --context and --rounds must be at least 1")
    result = {"preset": args.preset, "batch": args.batch, "context": args.context, "rounds": args.rounds,
              "machine": machine(), **measure(PRESETS[args.preset], args.batch, args.context, args.rounds)}
    print(markdown(result), end="")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
