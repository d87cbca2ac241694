"""What a CM3Leon checkpoint does, judged by the image world's ground truth.

    patchwork eval cm3leon --checkpoint DIR [--prompts 48] [--samples 4]
        [--documents 0,1,2] [--record] [--markdown OUT.md] [--grid OUT.png] [--json OUT.json]

Everything runs in one process on the same checkpoint, so the numbers compare
like with like on a shared machine:

- text->image attribute accuracy: prompts are true captions of held-out
  scenes; the scene parser reads each generated image, and a prompt's facts
  (each shape's kind, colour and size, at its cell) count as right when the
  parsed shape in that cell has them. Per decoding mode and per number of
  retrieved documents: the mean over every sample, and over the best-ranked
  sample of each prompt (ranked by the model's likelihood of the prompt as
  the image's caption). Modes: temperature 1, top-p 0.9, CFG at scales 1, 2,
  3, 5, 7, CD-K over K in {1, 2, 5} and alpha in {0.1, 0.3, 0.5} (all with
  top-p 0.9), CD-K as first measured (K 5, alpha 0.1, no top-p), and the
  paper's mix (half CFG 3, half the best CD-K cell of the same document
  count, ranked together); and, as the floor every mode must beat, images
  drawn from the unconditional stream alone (the prompt's text replaced by
  ``<mask>``), judged against the same prompts. For CD-K, the plausible set's
  size at each of the image's steps (read from the conditional stream along
  the images drawn);
- the best single mode by accuracy over every sample is what a request that
  sets nothing should get: ``--record`` writes it into the checkpoint's
  manifest (``engines.checkpoint.record_decoding``), where the server reads
  its defaults;
- image->text: precision and recall of the facts a greedy caption states,
  against the scene; and the same for captions written with a noisy alt-text
  to re-align, beside the alt-texts' own precision and recall;
- speed: images/s of the classifier-free pair in one batch against the two
  streams run one after the other (the conditional prompts, then the
  unconditional ones, each its own batch), at 1, 4 and ``batch`` concurrent
  prompts; and unguided images/s at 1 and ``batch`` concurrent requests.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from patchwork.engines.api import InvalidRequest
from patchwork.engines.checkpoint import CheckpointError, record_decoding
from patchwork.engines.cm3leon.decoding import Cm3Params, Guidance
from patchwork.engines.cm3leon.prompts import Cm3Prompt, Task
from patchwork.engines.loading import load
from patchwork.engines.scheduler import SchedulerConfig
from patchwork.kernels.guidance import plausible
from patchwork.training.cm3leon.train import HELDOUT_START
from patchwork.training.imageworld import Example, ImageWorld, Scene, parse_image, read_caption
from patchwork.training.progress import Phases

# Held-out examples for evaluation start past the ones training measures on.
EVALUATION_START = HELDOUT_START + 1_000_000


def facts(scene_attributes: list[tuple[str, str, str, int]]) -> set[tuple[int, str, str]]:
    """(cell, attribute, value) of every shape."""
    return {(cell, name, value) for kind, colour, size, cell in scene_attributes
            for name, value in (("kind", kind), ("colour", colour), ("size", size))}


def attribute_accuracy(prompt: Scene, image: np.ndarray) -> float:
    wanted = facts(prompt.attributes)
    return len(wanted & facts(parse_image(image).attributes)) / len(wanted)


def stated_facts(text: str) -> set[tuple[int, str, str]]:
    """The located facts a text states (a shape mentioned without its cell states none)."""
    return {(m.cell, name, value) for m in read_caption(text) if m.cell is not None
            for name, value in (("kind", m.kind), ("colour", m.colour), ("size", m.size)) if value is not None}


def precision_recall(texts: list[str], scenes: list[Scene]) -> tuple[float, float]:
    stated = [stated_facts(t) for t in texts]
    truth = [facts(s.attributes) for s in scenes]
    correct = sum(len(s & t) for s, t in zip(stated, truth))
    return correct / max(1, sum(map(len, stated))), correct / max(1, sum(map(len, truth)))


TOP_P = {"temperature": 1.0, "top_p": 0.9}
CD_K_GRID = [(alpha, k) for k in (1, 2, 5) for alpha in (0.1, 0.3, 0.5)]
MIX_CFG_SCALE = 3.0


def cd_k(alpha: float, k: int) -> Cm3Params:
    return Cm3Params(**TOP_P, guidance=Guidance.CONTRASTIVE, contrastive_alpha=alpha, contrastive_k=k)


def modes() -> dict[str, list[Cm3Params]]:
    """Single decoding modes: name -> its samples' params (seeds are added per sample)."""
    table = {"temperature 1": [Cm3Params(temperature=1.0)], "top-p 0.9": [Cm3Params(**TOP_P)]}
    for scale in (1, 2, 3, 5, 7):
        table[f"CFG {scale}"] = [Cm3Params(**TOP_P, guidance=Guidance.CLASSIFIER_FREE, guidance_scale=scale)]
    for alpha, k in CD_K_GRID:
        table[f"CD-K a={alpha} K={k}"] = [cd_k(alpha, k)]
    table["CD-K a=0.1 K=5, no top-p"] = [Cm3Params(temperature=1.0, guidance=Guidance.CONTRASTIVE)]
    return table


def mix(contrastive: Cm3Params) -> list[Cm3Params]:
    """The paper's mix: CFG with top-p for half the samples, ``contrastive`` for the rest."""
    return [Cm3Params(**TOP_P, guidance=Guidance.CLASSIFIER_FREE, guidance_scale=MIX_CFG_SCALE), contrastive]


def generate(engine, prompts: list[Cm3Prompt], params: list[Cm3Params]) -> list:
    requests = [engine.submit(prompt, p) for prompt, p in zip(prompts, params)]
    return [request.result() for request in requests]


UNCONDITIONAL = "no prompt (unconditional stream)"


@torch.inference_mode()
def plausible_set_sizes(engine, prompts: list[Cm3Prompt], results: list, alpha: float, k: int) -> list[float]:
    """CD-K's plausible-set size at each step of the images drawn (the mean
    over images): the conditional stream re-read along each image."""
    allowed = engine.allowed[Task.IMAGE]
    sizes = []
    for prompt, result in zip(prompts, results):
        tokens = torch.tensor([[*prompt.cond, *result.details.tokens[:-1]]], device=engine.device)
        logits = engine.model.lm(tokens)[0, len(prompt.cond) - 1:].float()  # [image_tokens, V]
        log_cond = torch.log_softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        sizes.append((plausible(log_cond, alpha, k) & allowed).sum(dim=-1).float())
    return torch.stack(sizes).mean(dim=0).tolist()


def judged(engine, examples: list[Example], prompts: list[Cm3Prompt], kinds: list[Cm3Params], samples: int) -> dict:
    """``samples`` images per prompt (sample s with ``kinds[s % len(kinds)]``),
    judged against its example's scene; the best-ranked sample of each prompt
    is the one the model finds likeliest to have the example's caption."""
    asks = [(i, kinds[s % len(kinds)].model_copy(update={"seed": 1000 * s + i}))
            for i in range(len(examples)) for s in range(samples)]
    results = generate(engine, [prompts[i] for i, _ in asks], [params for _, params in asks])
    images = engine.images(results)
    accuracy = [attribute_accuracy(examples[i].scene, image) for (i, _), image in zip(asks, images)]
    best = []  # per prompt: the index (into asks) of its best-ranked sample; asks are prompt by prompt
    for i, example in enumerate(examples):
        first = i * samples
        ranking = engine.caption_scores(results[first:first + samples], example.caption)
        best.append(first + int(np.argmax(ranking)))
    outcome = {"accuracy": float(np.mean(accuracy)), "best_ranked_accuracy": float(np.mean([accuracy[j] for j in best])),
               "exact_scenes": float(np.mean([a == 1.0 for a in accuracy])), "best": [images[j] for j in best]}
    if len(kinds) == 1 and kinds[0].guidance is Guidance.CONTRASTIVE:
        outcome["plausible_set"] = plausible_set_sizes(engine, [prompts[i] for i, _ in asks], results,
                                                       kinds[0].contrastive_alpha, kinds[0].contrastive_k)
    return outcome


def _row(name: str, count: int, outcome: dict) -> dict:
    return {"mode": name, "documents": count, **{k: v for k, v in outcome.items() if k != "best"}}


def text_to_image(engine, examples: list[Example], samples: int, documents: list[int]) -> tuple[list[dict], dict]:
    rows, grid = [], {}
    prompts = [engine.image_prompt(e.caption, documents=0) for e in examples]
    unconditional = [Cm3Prompt(Task.IMAGE, p.uncond, p.uncond) for p in prompts]
    floor = judged(engine, examples, unconditional, [Cm3Params(temperature=1.0)], samples)
    rows.append(_row(UNCONDITIONAL, 0, floor))
    table = modes()
    for count in documents:
        prompts = [engine.image_prompt(e.caption, documents=count) for e in examples]
        outcomes = {name: judged(engine, examples, prompts, kinds, samples) for name, kinds in table.items()}
        best_cd_k = max(CD_K_GRID, key=lambda cell: outcomes[f"CD-K a={cell[0]} K={cell[1]}"]["accuracy"])
        mixed = f"mix CFG {MIX_CFG_SCALE:g} + CD-K a={best_cd_k[0]} K={best_cd_k[1]}"
        outcomes[mixed] = judged(engine, examples, prompts, mix(cd_k(*best_cd_k)), samples)
        for name, outcome in outcomes.items():
            if count == documents[-1]:
                grid[name] = outcome["best"]
            rows.append(_row(name, count, outcome))
    grid[UNCONDITIONAL] = floor["best"]
    return rows, grid


def best_decoding(rows: list[dict], prompts: int, samples: int) -> dict:
    """The single mode with the highest accuracy over every sample (its row's
    mode and documents) and, as ``defaults``, the manifest's image decoding
    defaults it makes (``engines.cm3leon.decoding.DecodingDefaults``)."""
    table = modes()
    best = max((r for r in rows if r["mode"] in table), key=lambda r: r["accuracy"])
    (params,) = table[best["mode"]]
    settings = params.model_dump(mode="json", include={"guidance", "guidance_scale", "temperature", "top_p",
                                                       "contrastive_alpha", "contrastive_k"})
    chosen_by = (f"evaluation: {best['mode']} with {best['documents']} documents, attribute accuracy "
                 f"{best['accuracy']:.3f} over {prompts} prompts x {samples} samples")
    return {"mode": best["mode"], "documents": best["documents"],
            "defaults": {**settings, "documents": best["documents"], "chosen_by": chosen_by}}


def image_to_text(engine, examples: list[Example]) -> dict:
    plain = Cm3Params(max_new_bytes=200)
    captions = generate(engine, [engine.caption_prompt(e.image) for e in examples], [plain] * len(examples))
    realigned = generate(engine, [engine.caption_prompt(e.image, alt_text=e.alt_text) for e in examples],
                         [plain] * len(examples))
    scenes = [e.scene for e in examples]
    noisy = [i for i, e in enumerate(examples) if e.noise]
    out = {}
    for name, texts, subset in [("caption", [r.text.decode(errors="replace") for r in captions], range(len(examples))),
                                ("alt-text as given (noisy ones)", [e.alt_text for e in examples], noisy),
                                ("caption re-aligning the alt-text (noisy ones)",
                                 [r.text.decode(errors="replace") for r in realigned], noisy)]:
        precision, recall = precision_recall([texts[i] for i in subset], [scenes[i] for i in subset])
        out[name] = {"precision": precision, "recall": recall, "count": len(subset)}
    return out


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def speed(engine, examples: list[Example], batch: int, repeats: int = 3) -> dict:
    """CFG pairing and throughput; each time is the best of ``repeats`` (the
    machine is shared, and the least disturbed run is the closest to the cost)."""
    prompts = [engine.image_prompt(e.caption, documents=0) for e in examples]
    prompts = (prompts * batch)[:batch]
    cfg = Cm3Params(guidance=Guidance.CLASSIFIER_FREE)
    generate(engine, prompts[:2], [cfg] * 2)  # warm up
    pairing = []
    for concurrent in sorted({1, min(4, batch), batch}):
        asked = prompts[:concurrent]
        unconditional = [Cm3Prompt(p.task, p.uncond, p.uncond) for p in asked]
        paired = min(timed(lambda: generate(engine, asked, [cfg] * concurrent)) for _ in range(repeats))
        sequential = min(timed(lambda: (generate(engine, asked, [Cm3Params()] * concurrent),
                                        generate(engine, unconditional, [Cm3Params()] * concurrent)))
                         for _ in range(repeats))
        pairing.append({"prompts": concurrent, "paired_images_per_s": concurrent / paired,
                        "one_after_the_other_images_per_s": concurrent / sequential, "speedup": sequential / paired})
    rates = {}
    for concurrent in (1, batch):
        seconds = min(timed(lambda: generate(engine, prompts[:concurrent], [Cm3Params(temperature=1.0)] * concurrent))
                      for _ in range(repeats))
        rates[str(concurrent)] = concurrent / seconds
    return {"cfg_pairing": pairing, "batch": batch, "images_per_s": rates}


def save_grid(grid: dict[str, list[np.ndarray]], path: Path, scale: int = 3) -> None:
    from PIL import Image

    rows = [np.concatenate(images, axis=1) for images in grid.values()]
    picture = np.concatenate(rows, axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(picture)
    image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST).save(path)


def markdown(report: dict) -> str:
    lines = [f"Checkpoint `{report['checkpoint']}` on {report['machine']}; {report['prompts']} held-out prompts, "
             f"{report['samples']} samples each.", "", "| mode | documents | attribute accuracy | best-ranked sample "
             "| exact scenes |", "| --- | --- | --- | --- | --- |"]
    rows = report["text_to_image"]
    lines += [f"| {r['mode']} | {r['documents']} | {r['accuracy']:.3f} | {r['best_ranked_accuracy']:.3f} "
              f"| {r['exact_scenes']:.3f} |" for r in rows]
    best = report["best_decoding"]
    same_mode = [r for r in rows if r["mode"] == best["mode"]]
    lines += ["", f"Best single mode (what `--record` makes the served default): {best['mode']} with "
              f"{best['documents']} documents; the same mode with "
              + ", ".join(f"{r['documents']} documents {r['accuracy']:.3f}" for r in same_mode) + "."]
    retrieval = report["retrieval"]
    lines += ["", f"Near-duplicate skipping fired in {retrieval['near_duplicates_skipped']} of the "
              f"{retrieval['searches']} prompts' bank searches."]
    lines += ["", "| CD-K (top-p 0.9) | documents | plausible set: mean size over steps | first step | last step |",
              "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['mode']} | {r['documents']} | {np.mean(r['plausible_set']):.1f} | {r['plausible_set'][0]:.1f} "
              f"| {r['plausible_set'][-1]:.1f} |" for r in rows if "plausible_set" in r]
    lines += ["", "| documents | mix | its best-ranked sample | CFG 3 alone, best-ranked | its CD-K alone, "
              "best-ranked |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["mode"].startswith("mix "):
            at = {x["mode"]: x for x in rows if x["documents"] == r["documents"]}
            alone = r["mode"].split(" + ")[1]
            lines.append(f"| {r['documents']} | {r['mode']} | {r['best_ranked_accuracy']:.3f} "
                         f"| {at['CFG 3']['best_ranked_accuracy']:.3f} | {at[alone]['best_ranked_accuracy']:.3f} |")
    lines += ["", "| image -> text | precision | recall | texts |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {v['precision']:.3f} | {v['recall']:.3f} | {v['count']} |"
              for name, v in report["image_to_text"].items()]
    s = report["speed"]
    lines += ["", "| CFG prompts at once | pair in one batch (images/s) | streams one after the other (images/s) "
              "| speed-up |", "| --- | --- | --- | --- |"]
    lines += [f"| {p['prompts']} | {p['paired_images_per_s']:.2f} | {p['one_after_the_other_images_per_s']:.2f} "
              f"| {p['speedup']:.2f}x |" for p in s["cfg_pairing"]]
    lines += ["", f"Unguided images/s at 1 and {s['batch']} concurrent requests: "
              + ", ".join(f"{v:.2f}" for v in s["images_per_s"].values()) + "."]
    return "\n".join(lines) + "\n"


def evaluate(checkpoint: Path, prompts: int, samples: int, batch: int,
             documents: list[int] | None = None) -> tuple[dict, dict]:
    torch.manual_seed(0)
    # Every sample of a mode is submitted at once: the queue holds them all.
    queue = prompts * samples
    engine = load(checkpoint, scheduler=SchedulerConfig(max_batch_size=max(16, batch), max_queue=queue))
    try:
        size = engine.config.vq.image_size
        world = engine.manifest.training.data.get("image_world", {}) if engine.manifest else {}
        examples = ImageWorld(seed=world.get("seed", 0), image_size=size,
                              jitter=world.get("jitter")).take(prompts, start=EVALUATION_START)
        counts = list(range(engine.config.retrieval.max_documents + 1)) if documents is None else documents
        for count in counts:
            engine.image_prompt("", documents=count)  # a count the model cannot take: InvalidRequest, at once
        bank = engine.model.bank
        searched, skipped = bank.searches, bank.deduplicated
        phases = Phases("eval cm3leon", 3)
        with phases(f"text to image: every mode, {prompts} prompts x {samples} samples, documents {counts}") as phase:
            rows, grid = text_to_image(engine, examples, samples, counts)
            best = best_decoding(rows, prompts, samples)
            phase.result = f"best {best['mode']} with {best['documents']} documents"
        retrieval = {"searches": bank.searches - searched, "near_duplicates_skipped": bank.deduplicated - skipped}
        with phases(f"image to text: {prompts} captions, plain and re-aligning alt-texts") as phase:
            captions = image_to_text(engine, examples)
            phase.result = (f"caption precision {captions['caption']['precision']:.2f}, "
                            f"recall {captions['caption']['recall']:.2f}")
        with phases(f"speed: CFG pairing and images/s up to {batch} requests") as phase:
            measured = speed(engine, examples, batch)
            phase.result = f"{measured['images_per_s'][str(batch)]:.1f} unguided images/s at {batch}"
        report = {
            "checkpoint": str(checkpoint), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}", "prompts": prompts, "samples": samples,
            "text_to_image": rows, "best_decoding": best, "retrieval": retrieval,
            "image_to_text": captions, "speed": measured,
        }
    finally:
        engine.close()
    return report, grid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="patchwork eval cm3leon", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16, help="concurrent requests in the speed measurements")
    parser.add_argument("--documents", type=lambda text: [int(n) for n in text.split(",")],
                        help="retrieved-document counts to measure, e.g. 0,2 (default: 0 to the model's most)")
    parser.add_argument("--record", action="store_true",
                        help="write the best single mode into the checkpoint's manifest: the served default")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--grid", type=Path, help="PNG grid: a row per mode, the best-ranked image per prompt")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    try:
        report, grid = evaluate(args.checkpoint, args.prompts, args.samples, args.batch, args.documents)
    except (CheckpointError, InvalidRequest) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.record:
        record_decoding(args.checkpoint, {"image": report["best_decoding"]["defaults"]})
    text = markdown(report)
    print(text)
    for path in (args.markdown, args.grid, args.json):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    if args.markdown:
        args.markdown.write_text(text)
    if args.grid:
        save_grid(grid, args.grid)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
