"""Dense against Mixture-of-Transformers: the same data, FLOPs and schedule.

    patchwork train mot-study --preset tiny|default --out DIR [--steps N] [--evaluations K] [--seeds S]

One corpus (``training.cm3leon.train.prepare``: text, images and sounds; no
retrieval, so every document is its own) and one stream of training batches
(the same seed for every run) train four transformers of the same width and
depth: the dense backbone, and MoT backbones that untie the feed-forward
alone, the feed-forward and attention, and every non-embedding weight (the
paper's model). Every token costs the same FLOPs in all four (each token runs
through one set of weights of the dense shape), so the runs compare loss at
equal training FLOPs.

The whole comparison runs once per seed (``--seeds``, 3 by default): a
seed sets every run's initial weights and the stream of batches, which the
four runs of one seed share. Every ``steps / evaluations`` steps each run
measures its held-out loss per modality of the predicted token and over all
of them (``overall``), and four times as often in the last quarter of
training, where the fractions are read. The study writes ``study.json``
(every curve and summary), ``study.md`` (the tables) and ``loss.png`` (loss
per modality against training FLOPs, every seed's points and fitted curve).

Per modality and overall, for each MoT run: the fraction of the dense run's
training FLOPs at which its fitted curve reaches the dense run's fitted final
loss (``training.mot.fractions``), per seed and as a mean with its 95%
interval over the seeds that reach it; beside it the raw first crossing of
the points (linear between evaluations), what a single noisy curve gives. And
each run's final loss minus the dense run's of the same seed (same batches:
a paired difference), with its interval.

Training FLOPs per token are 3x the forward pass's: 2 per weight of every
matmul a token runs through (blocks and output head) plus the attention's
2 x 2 x dim per layer for each key a token attends to (its causal context).
Also measured: seconds per training step of each run (side by side on the
same batches, interleaved, after the runs), and the parameters each
backbone holds.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from patchwork.engines.cm3leon.model import Cm3LeonModel
from patchwork.engines.cm3leon.tokenizer import PAD
from patchwork.engines.mot.config import Untied
from patchwork.training.arguments import command_line, positive_int
from patchwork.training.cm3leon.presets import PRESETS, Cm3LeonPreset
from patchwork.training.cm3leon.train import Corpus, heldout_losses, lm_loss, prepare
from patchwork.training.loop import fit
from patchwork.training.machine import machine
from patchwork.training.mot.fractions import curve_fit, fitted_fraction, interval

# Run name -> (backbone, untied).
RUNS = {
    "dense": ("dense", Untied.ALL),
    "mot-ffn": ("mot", Untied.FFN),
    "mot-ffn-attention": ("mot", Untied.FFN_ATTENTION),
    "mot-all": ("mot", Untied.ALL),
}


# A seed's runs draw their weights and batches from seeds this far apart.
SEED_STRIDE = 1000
OVERALL = "overall"


class StudyPreset(BaseModel):
    model_config = ConfigDict(extra="forbid")

    corpus: Cm3LeonPreset
    evaluations: int
    timing_rounds: int
    seeds: int = 3


def loss_keys(modalities) -> dict[str, str]:
    """What the study reads: each modality's held-out loss, and the loss over every token."""
    return {**{m: f"heldout_loss_{m}" for m in modalities}, OVERALL: "heldout_loss"}


def evaluation_steps(steps: int, evaluations: int) -> list[int]:
    """Every ``steps / evaluations`` steps, four times as often in the last
    quarter of training, and the last step."""
    every = max(1, steps // evaluations)
    late = max(1, every // 4)
    regular = range(every, steps + 1, every)
    dense_end = range(steps - steps // 4, steps + 1, late)
    return sorted({*regular, *(step for step in dense_end if step > 0), steps})


def _study(base: Cm3LeonPreset, evaluations: int, timing_rounds: int) -> StudyPreset:
    """``base``'s corpus (with sound) and schedule, without retrieval."""
    return StudyPreset(corpus=base.model_copy(update={"bank_size": 0}), evaluations=evaluations,
                       timing_rounds=timing_rounds)


STUDY_PRESETS = {
    "tiny": lambda: _study(PRESETS["mot-tiny"](), evaluations=3, timing_rounds=2),
    "default": lambda: _study(PRESETS["mot-default"](), evaluations=16, timing_rounds=20),
}


def with_backbone(source: Cm3LeonModel, backbone: str, untied: Untied, seed: int) -> Cm3LeonModel:
    """A model with ``source``'s frozen tokenizers, retriever and bank and a
    fresh transformer of the given backbone."""
    config = source.config.model_copy(update={"backbone": backbone, "untied": untied})
    torch.manual_seed(seed)
    model = Cm3LeonModel(config)
    torch.nn.init.normal_(model.lm.embed_tokens.weight, std=0.02)
    frozen = {name: value for name, value in source.state_dict().items() if not name.startswith("lm.")}
    missing, unexpected = model.load_state_dict(frozen, strict=False)
    if unexpected or any(not name.startswith("lm.") for name in missing):
        raise RuntimeError(f"the frozen parts do not fit: missing {missing}, unexpected {unexpected}")
    return model


def flops_per_token(model: Cm3LeonModel, batch: torch.Tensor) -> float:
    """Training FLOPs per real token of ``batch`` (see the module's docstring)."""
    cfg = model.config.transformer
    block = cfg.dim * (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim + cfg.n_heads * cfg.head_dim * cfg.dim
    block += 3 * cfg.dim * cfg.hidden_dim
    matmul = cfg.n_layers * block + cfg.dim * model.config.vocab_size  # weights one token runs through
    inputs = batch[:, :-1]
    real = inputs != PAD
    context = real.cumsum(dim=1)[real].float().mean().item()  # keys a real token attends to, on average
    return 3 * (2 * matmul + 2 * 2 * cfg.dim * cfg.n_layers * context)


def _real_tokens(batch: torch.Tensor) -> int:
    return int((batch[:, 1:] != PAD).sum())


def train_run(model: Cm3LeonModel, corpus: Corpus, preset: Cm3LeonPreset, evaluations: int, name: str,
              seed: int = 0) -> dict:
    """Trains ``model.lm`` on seed ``seed``'s batches; its held-out curve and timing."""
    schedule = preset.lm_schedule
    rng = random.Random(preset.seed + 1 + SEED_STRIDE * seed)  # the same batches for every run of a seed
    measured = set(evaluation_steps(schedule.steps, evaluations))
    curve, seen = [], {"tokens": 0, "flops": 0.0}

    def next_batch() -> torch.Tensor:
        batch = corpus.batch(rng, schedule.batch_size)
        seen["tokens"] += _real_tokens(batch)
        seen["flops"] += flops_per_token(model, batch) * _real_tokens(batch)
        return batch

    def evaluate(step: int) -> None:
        if step + 1 in measured:
            model.lm.eval()
            curve.append({"step": step + 1, "tokens": seen["tokens"], "flops": seen["flops"],
                          **heldout_losses(model, corpus.heldout)})
            model.lm.train()

    model.lm.train()
    started = time.monotonic()
    fit(model.lm.parameters(), lambda batch: lm_loss(model, batch), next_batch, schedule, name, on_step=evaluate)
    model.lm.eval()
    return {"curve": curve, "wall_seconds": time.monotonic() - started,
            "parameters": sum(p.numel() for p in model.lm.parameters()),
            "non_embedding_parameters": sum(p.numel() for n, p in model.lm.named_parameters()
                                            if not n.startswith(("embed_tokens", "lm_head")))}


def step_seconds(models: dict[str, Cm3LeonModel], corpus: Corpus, preset: Cm3LeonPreset, rounds: int) -> dict:
    """Seconds per training step (forward, backward, AdamW) of each model on
    the same batches, the runs interleaved round by round so machine noise
    falls on all alike; the median over ``rounds``."""
    rng = random.Random(preset.seed + 2)
    batches = [corpus.batch(rng, preset.lm_schedule.batch_size) for _ in range(rounds)]
    optimizers = {name: torch.optim.AdamW(model.lm.parameters(), lr=1e-6) for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for batch in batches:
        for name, model in models.items():
            model.lm.train()
            started = time.perf_counter()
            loss = lm_loss(model, batch)
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[name].step()
            times[name].append(time.perf_counter() - started)
            model.lm.eval()
    return {name: sorted(values)[len(values) // 2] for name, values in times.items()}


def flops_fraction(run: list[dict], dense: list[dict], key: str) -> dict | None:
    """The fraction of the dense run's training FLOPs at which ``run`` first
    reaches the dense run's final loss ``key`` (linear between evaluations),
    and whether it is only an upper bound (reached by the first evaluation);
    None if it never does."""
    target, total = dense[-1][key], dense[-1]["flops"]
    previous = None
    for point in run:
        if point[key] <= target:
            if previous is None:
                return {"fraction": point["flops"] / total, "upper_bound": True}
            share = (previous[key] - target) / (previous[key] - point[key])
            flops = previous["flops"] + share * (point["flops"] - previous["flops"])
            return {"fraction": flops / total, "upper_bound": False}
        previous = point
    return None


def _fraction_cell(fraction: dict | None) -> str:
    if fraction is None:
        return "never"
    return ("≤ " if fraction["upper_bound"] else "") + f"{fraction['fraction']:.1%}"


def summarise(runs: dict[str, list[dict]], modalities: tuple[str, ...]) -> dict:
    """``runs``: each run's result per seed (the seeds in the same order for every run)."""
    keys = loss_keys(modalities)
    dense = [seed["curve"] for seed in runs["dense"]]
    fractions, raw, final, gap = {}, {}, {}, {}
    for name, seeds in runs.items():
        curves = [seed["curve"] for seed in seeds]
        final[name] = {m: interval([c[-1][key] for c in curves]).as_dict() for m, key in keys.items()}
        if name == "dense":
            continue
        fractions[name], raw[name], gap[name] = {}, {}, {}
        for m, key in keys.items():
            per_seed = [fitted_fraction(c, d, key) for c, d in zip(curves, dense)]
            reached = [f for f in per_seed if f is not None]
            fractions[name][m] = {"per_seed": per_seed,
                                  "reached": interval(reached).as_dict() if reached else None}
            raw[name][m] = [flops_fraction(c, d, key) for c, d in zip(curves, dense)]
            gap[name][m] = interval([c[-1][key] - d[-1][key] for c, d in zip(curves, dense)]).as_dict()
    ranking = sorted(runs, key=lambda name: final[name][OVERALL]["mean"])
    return {"flops_fraction": fractions, "raw_first_crossing": raw, "final_loss": final,
            "final_loss_minus_dense": gap, "ranking_by_overall_final_loss": ranking}


def plot(runs: dict[str, list[dict]], modalities: tuple[str, ...], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = loss_keys(modalities)
    figure, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4))
    for axis, (modality, key) in zip(axes, keys.items()):
        for colour, (name, seeds) in enumerate(runs.items()):
            for number, seed in enumerate(seeds):
                flops = [p["flops"] for p in seed["curve"]]
                axis.plot(flops, [p[key] for p in seed["curve"]], ".", color=f"C{colour}", alpha=0.35, markersize=3)
                law = curve_fit(seed["curve"], key)
                axis.plot(flops, [law(f) for f in flops], color=f"C{colour}", linewidth=1,
                          label=name if number == 0 else None)
        axis.set_title(f"{modality} tokens" if modality != OVERALL else "every token")
        axis.set_xlabel("training FLOPs")
        axis.set_ylabel("held-out loss (nats/token)")
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(out)
    plt.close(figure)


def _interval_cell(value: dict, percent: bool = False) -> str:
    if percent:
        return f"{value['mean']:.1%} [{value['low']:.1%}, {value['high']:.1%}]"
    return f"{value['mean']:.3f} [{value['low']:.3f}, {value['high']:.3f}]"


def _fitted_cell(fraction: dict) -> str:
    seeds = len(fraction["per_seed"])
    if fraction["reached"] is None:
        return f"never (0 of {seeds})"
    reached = fraction["reached"]
    cell = _interval_cell(reached, percent=True)
    return cell if reached["n"] == seeds else f"{cell}, {reached['n']} of {seeds} (never in the rest)"


def markdown(report: dict) -> str:
    summary, seeds = report["summary"], report["seeds"]
    columns = [*report["modalities"], OVERALL]
    header = "| run | " + " | ".join(columns) + " |"
    rule = "|" + "---|" * (len(columns) + 1)
    lines = [f"{seeds} seeds; mean [95% interval] over them.", "", "Final held-out loss:", "", header, rule]
    for name, final in summary["final_loss"].items():
        lines.append(f"| {name} | " + " | ".join(_interval_cell(final[m]) for m in columns) + " |")
    lines += ["", "Final loss minus the dense run's of the same seed (negative: better than dense):", "", header, rule]
    for name, gap in summary["final_loss_minus_dense"].items():
        lines.append(f"| {name} | " + " | ".join(_interval_cell(gap[m]) for m in columns) + " |")
    lines += ["", "Fraction of the dense run's training FLOPs at which each run's fitted curve reaches the dense "
              "run's fitted final loss:", "", header, rule]
    for name, fractions in summary["flops_fraction"].items():
        lines.append(f"| {name} | " + " | ".join(_fitted_cell(fractions[m]) for m in columns) + " |")
    lines += ["", "The raw first crossing of the points, per seed:", "", header, rule]
    for name, crossings in summary["raw_first_crossing"].items():
        lines.append(f"| {name} | " + " | ".join(", ".join(_fraction_cell(c) for c in crossings[m]) for m in columns)
                     + " |")
    lines += ["", "| run | non-embedding parameters | s/step (side by side) |", "|---|---|---|"]
    for name, seeds_of_run in report["runs"].items():
        lines.append(f"| {name} | {seeds_of_run[0]['non_embedding_parameters']:,} | "
                     f"{report['step_seconds'][name]:.3f} |")
    lines += ["", "Ranking by mean overall final loss: " + ", ".join(summary["ranking_by_overall_final_loss"]) + "."]
    return "\n".join(lines) + "\n"


def run_study(preset: StudyPreset, out: Path, command: str, steps: int | None = None,
              evaluations: int | None = None, seeds: int | None = None) -> dict:
    corpus_preset = preset.corpus
    if steps is not None:
        corpus_preset = corpus_preset.model_copy(update={
            "lm_schedule": corpus_preset.lm_schedule.model_copy(update={"steps": steps})})
    seeds = seeds or preset.seeds
    started = time.monotonic()
    source, corpus, corpus_metrics, data = prepare(corpus_preset)
    modalities = source.config.modalities
    models, runs = {}, {name: [] for name in RUNS}
    for seed in range(seeds):
        for name, (backbone, untied) in RUNS.items():
            models[name] = with_backbone(source, backbone, untied, corpus_preset.seed + SEED_STRIDE * seed)
            runs[name].append(train_run(models[name], corpus, corpus_preset, evaluations or preset.evaluations,
                                        f"{name} (seed {seed + 1} of {seeds})", seed))
    report = {
        "command": command,
        "machine": machine(),
        "seeds": seeds,
        "modalities": list(modalities),
        "corpus": {"data": data, "metrics": corpus_metrics, "batch_size": corpus_preset.lm_schedule.batch_size,
                   "steps": corpus_preset.lm_schedule.steps, "transformer": corpus_preset.transformer.model_dump(),
                   "audio_fraction": corpus_preset.audio_fraction},
        "runs": runs,
        "step_seconds": step_seconds(models, corpus, corpus_preset, preset.timing_rounds),
        "summary": summarise(runs, modalities),
        "seconds": time.monotonic() - started,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "study.md").write_text(markdown(report))
    plot(runs, modalities, out / "loss.png")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(STUDY_PRESETS), default="tiny")
    parser.add_argument("--out", type=Path, required=True, help="directory for study.json, study.md and loss.png")
    parser.add_argument("--steps", type=positive_int, help="override the preset's training steps of every run")
    parser.add_argument("--evaluations", type=positive_int, help="held-out evaluations per run")
    parser.add_argument("--seeds", type=positive_int, help="repetitions of the comparison (default: the preset's)")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    report = run_study(STUDY_PRESETS[args.preset](), args.out, command_line(argv),
                       steps=args.steps, evaluations=args.evaluations, seeds=args.seeds)
    print(markdown(report), end="")
    print(f"written: {args.out / 'study.json'}, {args.out / 'study.md'}, {args.out / 'loss.png'}")
    return 0
