"""CM3Leon: the joint vocabulary's text tokenizer."""

import pytest
from tokenizers import Tokenizer, models

from patchwork.engines.cm3leon.tokenizer import (
    BREAK,
    EOS,
    IMAGE_END,
    IMAGE_START,
    MAX_SPANS,
    SPECIALS,
    TextTokenizer,
    sentinel,
)
from patchwork.training.imageworld import ImageWorld
from tests.conftest import run_patchwork


@pytest.fixture(scope="module")
def text_tokenizer():
    examples = ImageWorld(seed=0).take(300)
    return TextTokenizer.train((text for e in examples for text in (e.caption, e.alt_text)), vocab_size=512)


def test_the_tokenizer_round_trips_any_text_and_never_makes_specials_from_it(text_tokenizer):
    assert text_tokenizer.vocab_size <= 512
    for text in ["a large red circle at the top left", "ñandú 🙂 unseen-words\n\t", "", "<break> <mask:3> <eos>"]:
        ids = text_tokenizer.encode(text)
        assert text_tokenizer.decode(ids) == text
        assert all(i >= len(SPECIALS) for i in ids)
    # The world's words are whole tokens: a caption takes far fewer tokens than bytes.
    caption = "a small blue triangle at the bottom right"
    assert len(text_tokenizer.encode(caption)) <= len(caption.split())
    assert text_tokenizer.decode([BREAK, *text_tokenizer.encode("red"), EOS]) == "red"
    for text in ["ñandú 🙂 a red circle", "\x00\x7f\n zero"]:
        pieces = [text_tokenizer.token_bytes(i) for i in text_tokenizer.encode(text)]
        assert b"".join(pieces) == text.encode()
    assert text_tokenizer.token_bytes(EOS) == b""


def test_specials_keep_their_ids_through_the_checkpoints_json(text_tokenizer):
    loaded = TextTokenizer.from_json(text_tokenizer.to_json())
    assert loaded.vocab_size == text_tokenizer.vocab_size
    assert loaded.encode("<mask:0> a red square") == text_tokenizer.encode("<mask:0> a red square")
    assert sentinel(0) == SPECIALS.index("<mask:0>")
    assert sentinel(MAX_SPANS - 1) == SPECIALS.index(f"<mask:{MAX_SPANS - 1}>")
    with pytest.raises(ValueError, match="span 16"):
        sentinel(MAX_SPANS)
    bare = Tokenizer(models.BPE())
    bare.add_special_tokens(["<eos>", "<pad>"])
    with pytest.raises(ValueError, match="'<pad>' is not id 0"):
        TextTokenizer(bare)


# -- the CM3 objective ---------------------------------------------------------


def unmask(sequence):
    """The document a CM3 sequence was made from (the inverse of ``objective.mask``)."""
    from patchwork.engines.cm3leon.tokenizer import EOS, MAX_SPANS, sentinel

    assert sequence[-1] == EOS
    sentinels = {sentinel(i): i for i in range(MAX_SPANS)}
    first_tail = next(i for i, t in enumerate(sequence) if t in sentinels and
                      sequence.index(t) != i)  # a sentinel's second appearance starts the tail
    body, tail = sequence[:first_tail], sequence[first_tail:-1]
    spans, current = {}, None
    for token in tail:
        if token in sentinels:
            current = sentinels[token]
            spans[current] = []
        else:
            spans[current].append(token)
    return [piece for token in body for piece in (spans[sentinels[token]] if token in sentinels else [token])]


def test_cm3_moves_spans_inside_one_part_to_the_end_and_back():
    import random

    from patchwork.engines.cm3leon.tokenizer import BREAK, IMAGE_END, IMAGE_START, sentinel
    from patchwork.training.cm3leon.objective import cm3, document, mask, pick_spans, span_count

    caption, image = [100, 101, 102, 103], [500 + i for i in range(16)]
    tokens, parts = document(caption, image, image_first=False)
    assert tokens == [*caption, BREAK, IMAGE_START, *image, IMAGE_END] and parts == [(0, 4), (6, 22)]
    tokens, parts = document(caption, image, image_first=True)
    assert tokens == [IMAGE_START, *image, IMAGE_END, BREAK, *caption] and parts == [(1, 17), (19, 23)]
    tokens, parts = document(caption, image, image_first=True, alt_text=[300, 301])
    assert tokens == [IMAGE_START, *image, IMAGE_END, BREAK, 300, 301, BREAK, *caption]
    assert parts == [(1, 17), (22, 26)]  # the alt-text is never masked
    assert mask([1, 2, 3, 4, 5], [(1, 2), (3, 5)])[:-1] == [1, sentinel(0), 3, sentinel(1), sentinel(0), 2,
                                                            sentinel(1), 4, 5]
    rng = random.Random(0)
    counts = [span_count(rng) for _ in range(4000)]
    assert min(counts) == 1 and max(counts) <= 16
    assert 1.3 < sum(counts) / len(counts) < 1.7  # E[clamp(Poisson(1), 1, 16)] = 1 + e^-1 ≈ 1.37
    for seed in range(300):
        rng = random.Random(seed)
        image_first = rng.random() < 0.5
        tokens, parts = document(caption[: rng.randint(1, 4)], image, image_first)
        spans = pick_spans(parts, rng.randint(1, 6), rng)
        assert spans and all(any(s >= a and e <= b for a, b in parts) for s, e in spans)
        assert all(e1 < s2 for (_, e1), (s2, _) in zip(spans, spans[1:]))
        sequence = mask(tokens, spans)
        assert len(sequence) == len(tokens) + 2 * len(spans) + 1
        assert unmask(sequence) == tokens
        assert unmask(cm3(tokens, parts, rng)) == tokens


def test_a_dropped_condition_is_what_the_unconditional_stream_reads():
    import random

    from patchwork.engines.cm3leon.prompts import caption_prompt, image_prompt, infill_prompt
    from patchwork.engines.cm3leon.tokenizer import IMAGE_END
    from patchwork.training.cm3leon.objective import cm3, document

    caption, image, alt = [100, 101, 102], [500 + i for i in range(16)], [300, 301]
    tokens, parts = document(caption, image, image_first=False, condition_dropped=True)
    uncond = list(image_prompt(caption).uncond)
    assert tokens == [*uncond, *image, IMAGE_END] and parts == [(len(uncond), len(uncond) + len(image))]
    for noted in (alt, None):
        tokens, parts = document(caption, image, image_first=True, alt_text=noted, condition_dropped=True)
        uncond = list(caption_prompt(image, alt_text=noted or ()).uncond)
        assert tokens == [*uncond, *caption] and parts == [(len(uncond), len(tokens))]
    # Infilling's condition is the whole masked document: dropped, the spans follow <mask>.
    tokens, parts = document(caption, image, image_first=False)
    for seed in range(20):
        sequence = cm3(tokens, parts, random.Random(seed), document_dropped=True)
        kept = cm3(tokens, parts, random.Random(seed))
        spans = kept[kept.index(sentinel(0), kept.index(sentinel(0)) + 1):]  # behind the second <mask:0>
        assert sequence == [*infill_prompt(tokens).uncond, *spans[1:]]


def test_training_sequences_drop_conditions_at_the_configured_rate(cm3leon_checkpoint):
    import random

    import torch

    from patchwork.engines.cm3leon.tokenizer import MASK
    from patchwork.engines.loading import load
    from patchwork.training.cm3leon.train import sequences

    path, _ = cm3leon_checkpoint
    engine = load(path)
    try:
        examples = ImageWorld(seed=9).take(64)
        captions = [engine.tokenizer.encode(e.caption) for e in examples]
        alts = [engine.tokenizer.encode(e.alt_text) for e in examples]
        codes = torch.cat([engine.model.vq.encode(torch.from_numpy(e.image)[None]) for e in examples])
        text_vocab, image_tokens = engine.config.text_vocab, engine.config.image_tokens
        for rate, expected in ((0.0, 0), (1.0, len(examples))):
            made = sequences(engine.model, captions, alts, codes, random.Random(0), max_documents=2,
                             own=[-1] * len(examples), condition_dropout=rate)
            # A dropped condition starts the sequence: nothing is retrieved before it.
            assert sum(sequence[0] == MASK for sequence in made) == expected
            assert sum(MASK in sequence for sequence in made) == expected
            # Dropped, about half keep their image or caption after <mask> <break>; the others
            # start <mask> <mask:0>, as the unconditional stream of guided infilling reads.
            infills = [sequence for sequence in made if sequence[:2] == [MASK, sentinel(0)]]
            assert len(infills) == 0 if rate == 0.0 else 16 <= len(infills) <= 48
            # Images are written in the joint vocabulary's image ids, as the engine reads and writes
            # them: every document (and every retrieved one) holds one image's worth, but an
            # image-first document whose condition (its image) was dropped holds none.
            in_images = [sum(token >= text_vocab for token in sequence) for sequence in made if sequence not in infills]
            assert all(count % image_tokens == 0 for count in in_images)
            assert all(in_images) if rate == 0.0 else any(in_images)
        for i in range(len(engine.model.bank)):
            assert sum(token >= text_vocab for token in engine.model.bank.document(i)) == image_tokens
    finally:
        engine.close()


# -- guidance --------------------------------------------------------------------


def test_guidance_follows_the_papers_equations():
    import torch

    from patchwork.kernels.guidance import classifier_free, contrastive

    torch.manual_seed(0)
    cond, uncond = torch.randn(3, 40), torch.randn(3, 40)
    assert torch.allclose(classifier_free(cond, uncond, 1.0), cond)
    assert torch.allclose(classifier_free(cond, uncond, 3.0), uncond + 3 * (cond - uncond))
    alpha, k = 0.1, 4
    scores = contrastive(cond, uncond, alpha, k)
    p_cond, p_uncond = cond.softmax(-1), uncond.softmax(-1)
    for row in range(3):
        kth = p_cond[row].sort(descending=True).values[k - 1]
        for token in range(40):
            if p_cond[row, token] >= alpha * kth:
                expected = (p_cond[row, token].log() - p_uncond[row, token].log()).item()
                assert abs(scores[row, token].item() - expected) < 1e-5
            else:
                assert scores[row, token].item() == float("-inf")
    # K = 1 with alpha = 1 keeps only the conditional stream's best token.
    only = contrastive(cond, uncond, 1.0, 1)
    assert torch.equal(torch.isfinite(only).sum(-1), torch.ones(3, dtype=torch.long))
    assert torch.equal(only.argmax(-1), cond.argmax(-1))
    # Tokens masked out in both streams stay out, with no NaN.
    cond[:, :10] = uncond[:, :10] = float("-inf")
    masked = contrastive(cond, uncond, 1e-9, 40)
    assert not masked.isnan().any() and torch.isinf(masked[:, :10]).all() and torch.isfinite(masked[:, 10:]).all()


# -- the image tokenizer ---------------------------------------------------------


def test_the_image_tokenizer_maps_images_to_a_code_grid_and_back():
    import numpy as np
    import torch

    from patchwork.engines.cm3leon.vqvae import VqConfig, VqVae

    torch.manual_seed(0)
    model = VqVae(VqConfig(channels=8, codes=16, code_dim=4))
    images = torch.from_numpy(np.stack([e.image for e in ImageWorld(seed=1).take(6)]))
    loss, metrics = model.loss(images)  # the first batch starts the codes on encoder outputs
    assert model.codebook.started and torch.isfinite(loss) and metrics["codes_used"] >= 1
    codes = model.encode(images)
    assert codes.shape == (6, 64) and codes.dtype == torch.long and 0 <= codes.min() and codes.max() < 16
    rebuilt = model.decode(codes)
    assert rebuilt.shape == images.shape and rebuilt.dtype == torch.uint8
    assert torch.equal(model.decode(codes[:1]), rebuilt[:1])  # each image decodes on its own
    model.codebook.counts[3] = 0.0  # an unused code is restarted on this batch's encoder outputs
    model.loss(images)
    assert model.codebook.counts[3] == 1.0


# -- training, the checkpoint and the engine -------------------------------------


def test_training_writes_a_checkpoint_that_learned(cm3leon_checkpoint):
    import json
    import math

    from patchwork.engines.checkpoint import read_manifest

    path, metrics = cm3leon_checkpoint
    manifest = read_manifest(path)
    assert set(manifest.files) == {"config.json", "model.safetensors", "tokenizer.json"}
    config = json.loads((path / "config.json").read_text())
    assert (config["family"], config["backbone"]) == ("cm3leon", "dense")
    vocab = config["text_vocab"] + config["vq"]["codes"]
    # Better than a uniform guess over the joint vocabulary on held-out documents.
    assert metrics["heldout_loss"] < 0.8 * math.log(vocab)
    assert 0.0 <= metrics["vq_parser_agreement"] <= 1.0 and metrics["vq_heldout_rmse"] > 0
    # How often retrieval skipped a near-duplicate of the training document, over its searches.
    assert metrics["retrieval_searches"] > 0 and 0.0 <= metrics["retrieval_near_duplicate_rate"] <= 1.0


def test_the_training_command_line_trains_a_checkpoint(tmp_path):
    out = tmp_path / "cli"
    run = run_patchwork("train", "cm3leon", "--preset", "tiny", "--steps", "2",
                        "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert "heldout_loss:" in run.stdout and (out / "tokenizer.json").is_file()


def test_a_checkpoint_without_its_tokenizer_is_refused(cm3leon_checkpoint, tmp_path):
    import shutil

    from patchwork.engines.checkpoint import CheckpointError, read_manifest
    from patchwork.engines.loading import load

    path, _ = cm3leon_checkpoint
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    manifest = read_manifest(broken)
    (broken / "manifest.json").write_text(manifest.model_copy(update={"files": {
        k: v for k, v in manifest.files.items() if k != "tokenizer.json"}}).model_dump_json())
    with pytest.raises(CheckpointError, match=r"needs its text tokenizer \(tokenizer.json\)"):
        load(broken)


def _engine(path, **scheduler):
    from patchwork.engines.loading import load
    from patchwork.engines.scheduler import SchedulerConfig

    return load(path, scheduler=SchedulerConfig(**scheduler))


def test_batched_guided_generation_matches_the_reference_token_for_token(cm3leon_checkpoint):
    from patchwork.engines.cm3leon.decoding import Cm3Params, Guidance
    from patchwork.engines.cm3leon.reference import generate_reference
    from tests.helpers import admitted_together

    path, _ = cm3leon_checkpoint
    # Two slots for seven requests: they wait, finish out of order and are
    # moved between slots; prompts longer than the prefill budget are read in
    # chunks beside running sequences.
    engine = _engine(path, max_batch_size=2, prefill_budget=8, short_prompt=4)
    try:
        world = ImageWorld(seed=5)
        asks = [
            (engine.image_prompt(world[0].caption, documents=0), Cm3Params(guidance=Guidance.CLASSIFIER_FREE)),
            (engine.caption_prompt(world[1].image, documents=1), Cm3Params(max_new_bytes=30)),
            (engine.image_prompt(world[2].caption),
             Cm3Params(guidance=Guidance.CONTRASTIVE, temperature=1.0, seed=3, contrastive_k=3)),
            (engine.caption_prompt(world[3].image),
             Cm3Params(max_new_bytes=25, guidance=Guidance.CLASSIFIER_FREE, temperature=0.8, top_p=0.9, seed=7)),
            (engine.image_prompt("a red circle", documents=0), Cm3Params(temperature=1.0, seed=1)),
            (engine.caption_prompt(world[4].image), Cm3Params(max_new_bytes=12, guidance=Guidance.CONTRASTIVE)),
            (engine.image_prompt(world[5].caption), Cm3Params(guidance=Guidance.CLASSIFIER_FREE, guidance_scale=1.0)),
        ]
        with admitted_together(engine):
            requests = [engine.submit(prompt, params) for prompt, params in asks]
        results = [request.result() for request in requests]
        for (prompt, params), result in zip(asks, results):
            reference = generate_reference(engine.model, engine.tokenizer, prompt, params)
            assert result.details.tokens == reference.details.tokens
            assert (result.text, result.finish_reason) == (reference.text, reference.finish_reason)
            if prompt.task.value == "image":
                assert len(result.details.tokens) == engine.config.image_tokens
                assert min(result.details.tokens) >= engine.config.text_vocab  # codes only
            else:
                assert all(t < engine.config.text_vocab for t in result.details.tokens)
        # CFG at scale 1 is the conditional stream alone.
        plain = engine.submit(asks[6][0], Cm3Params()).result()
        assert plain.details.tokens == results[6].details.tokens
        images = engine.images([results[0], results[2]])
        assert images.shape == (2, 32, 32, 3) and images.dtype.name == "uint8"
    finally:
        engine.close()
    assert engine.scheduler.running == 0


def test_infilling_writes_the_masked_spans_after_their_sentinels(cm3leon_checkpoint):
    from patchwork.engines.api import InvalidRequest, RequestTooLarge
    from patchwork.engines.cm3leon.decoding import Cm3Params
    from patchwork.engines.cm3leon.reference import generate_reference
    from patchwork.engines.cm3leon.tokenizer import sentinel

    path, _ = cm3leon_checkpoint
    engine = _engine(path, max_batch_size=2)
    try:
        example = ImageWorld(seed=8)[0]
        prompt = engine.infill_prompt("a large <mask> circle at the <mask>", example.image)
        text = engine.tokenizer.encode
        assert prompt.cond[:len(text("a large "))] == tuple(text("a large "))
        assert prompt.cond.count(sentinel(0)) == 2 and prompt.cond.count(sentinel(1)) == 1
        assert prompt.cond[-1] == sentinel(0) and prompt.cond[-2] == IMAGE_END
        params = Cm3Params(max_new_bytes=20)
        result = engine.submit(prompt, params).result()
        reference = generate_reference(engine.model, engine.tokenizer, prompt, params)
        assert result.details.tokens == reference.details.tokens and result.text == reference.text
        assert 1 <= len(result.details.tokens) <= 20
        spans = engine.spans(result, 2)
        assert len(spans) == 2 and "".join(spans) == engine.tokenizer.decode(
            t for t in result.details.tokens if t < engine.config.text_vocab)
        for bad, message in [("no mask here", "^text: no <mask> to fill"),
                             ("<mask>" * 17, "^text: 17 masks; at most 16")]:
            with pytest.raises(InvalidRequest, match=message):
                engine.infill_prompt(bad)
        with pytest.raises(RequestTooLarge, match="^prompt: "):
            engine.submit(engine.infill_prompt("red " * engine.config.max_sequence + "<mask>"), params)
    finally:
        engine.close()


def test_spans_are_read_back_by_their_sentinels(cm3leon_checkpoint):
    from patchwork.engines.api import FinishReason, Generation, Usage
    from patchwork.engines.cm3leon.engine import Cm3Details
    from patchwork.engines.cm3leon.prompts import Task
    from patchwork.engines.cm3leon.tokenizer import sentinel

    path, _ = cm3leon_checkpoint
    engine = _engine(path, max_batch_size=1)
    try:
        red, circle = engine.tokenizer.encode("red"), engine.tokenizer.encode(" circle")
        tokens = [*red, sentinel(1), *circle, engine.config.text_vocab + 5, sentinel(2), *red]
        result = Generation(b"", FinishReason.END_OF_SEQUENCE, Usage(1, len(tokens)), Cm3Details(Task.INFILL, tokens))
        assert engine.spans(result, 2) == ["red", " circle"]  # an image code is not text; span 2 was not asked for
        assert engine.spans(result, 4) == ["red", " circle", "red", ""]
    finally:
        engine.close()


def test_an_alt_text_follows_the_image_and_samples_are_scored_by_their_caption(cm3leon_checkpoint):
    from patchwork.engines.cm3leon.decoding import Cm3Params

    path, _ = cm3leon_checkpoint
    engine = _engine(path, max_batch_size=2)
    try:
        example = ImageWorld(seed=3)[1]
        plain = engine.caption_prompt(example.image, documents=0)
        noted = engine.caption_prompt(example.image, documents=0, alt_text="stock photo")
        alt = tuple(engine.tokenizer.encode("stock photo"))
        assert noted.cond == (*plain.cond, *alt, BREAK) and noted.uncond == (*plain.uncond, *alt, BREAK)
        results = [engine.submit(engine.image_prompt(example.caption, documents=0),
                                 Cm3Params(temperature=1.0, seed=seed)).result() for seed in (1, 2)]
        scores = engine.caption_scores(results, example.caption)
        assert len(scores) == 2 and all(s < 0 for s in scores)
        # The score is the mean log-probability of the caption's tokens and <eos> after the image.
        caption = [*engine.tokenizer.encode(example.caption), EOS]
        sequence = [IMAGE_START, *results[0].details.tokens, IMAGE_END, BREAK, *caption]
        import torch

        with torch.inference_mode():
            log_probs = engine.model.lm(torch.tensor([sequence[:-1]]))[0].log_softmax(-1)
        expected = sum(log_probs[len(sequence) - 1 - len(caption) + i, t].item() for i, t in enumerate(caption))
        assert abs(scores[0] - expected / len(caption)) < 1e-4
    finally:
        engine.close()


# -- retrieval -------------------------------------------------------------------


def test_the_retriever_learns_to_pair_captions_with_images_and_skips_near_duplicates():
    import random

    import numpy as np
    import torch

    import torch.nn.functional as F

    from patchwork.engines.cm3leon.retrieval import DualEncoder, MemoryBank, Query, RetrievalConfig
    from patchwork.engines.cm3leon.vqvae import VqConfig, VqVae
    from patchwork.training.loop import Schedule, fit

    torch.manual_seed(0)
    world = ImageWorld(seed=4)
    examples = world.take(160)
    tokenizer = TextTokenizer.train((e.caption for e in examples), vocab_size=400)
    vq = VqVae(VqConfig(channels=8, codes=32, code_dim=8))
    images = torch.from_numpy(np.stack([e.image for e in examples]))
    vq.loss(images)  # codes start on encoder outputs; enough for distinct grids
    with torch.no_grad():
        codes = vq.encode(images)
    captions = [tokenizer.encode(e.caption) for e in examples]
    config = RetrievalConfig(dim=32, bank_size=len(examples))
    retriever = DualEncoder(config, tokenizer.vocab_size, 32, 64)
    rng = random.Random(0)

    def batch():
        picks = rng.sample(range(128), 32)
        return [captions[i] for i in picks], codes[picks]

    fit(retriever.parameters(), lambda b: retriever.loss(*b), batch, Schedule(steps=150, batch_size=32, lr=5e-3),
        "retriever")
    with torch.no_grad():
        texts, images = retriever.embed_texts(captions), retriever.embed_images(codes)
        similarity = texts[128:] @ images[128:].T
        recall = float((similarity.argmax(1) == torch.arange(32)).float().mean())
        assert recall > 4 / 32  # chance is 1/32
        bank = MemoryBank(config)
        bank.fill(texts, images, [[i] for i in range(len(examples))])
        # Queries of both sides, as in training: each document's own entry excluded (the last: not in the bank).
        found = bank.search(Query(bank.vectors[:5], texts=texts[:5], images=images[:5]), count=3,
                            exclude=[0, 1, 2, 3, -1])
    documents = F.normalize(texts + images, dim=-1)
    for query, indices in enumerate(found):
        assert len(indices) == 3 and query not in indices  # the last is its own near-duplicate: skipped too
        scores = (bank.vectors[query] @ bank.vectors[indices].T).tolist()
        assert scores == sorted(scores, reverse=True)
        assert (documents[query] @ documents[indices].T).max() <= config.near_duplicate
    assert bank.document(7) == [7]
    copy = MemoryBank(config)
    copy.load_state_dict(bank.state_dict())
    assert copy.document(7) == [7] and len(copy) == len(examples)


def test_near_duplicates_are_judged_document_to_document_and_counted():
    import torch

    from patchwork.engines.cm3leon.retrieval import MemoryBank, Query, RetrievalConfig

    # Four documents whose text and image embeddings differ (cos 0): each one's
    # retrieval vector scores at most 0.5 against a one-sided query from itself.
    texts, images = torch.eye(8)[:4], torch.eye(8)[4:]
    bank = MemoryBank(RetrievalConfig(dim=8, bank_size=4))
    bank.fill(texts, images, [[0], [1], [2], [3]])
    assert float(texts[1] @ bank.vectors[1]) == 0.5  # below 0.9: a score threshold could never fire
    for query, kept in ((Query(texts[1:2], texts=texts[1:2]), [0, 2, 3]),
                        (Query(images[2:3], images=images[2:3]), [0, 1, 3]),
                        (Query(bank.vectors[3:4], texts=texts[3:4], images=images[3:4]), [0, 1, 2])):
        assert sorted(bank.search(query, count=4)[0]) == kept
    found = bank.search(Query(texts[1:2]), count=4)[0]  # nothing to judge duplicates by: nothing skipped
    assert found[0] == 1 and sorted(found) == [0, 1, 2, 3]
    # Three searches found their duplicate among the best and skipped it; one had nothing to skip.
    assert (bank.searches, bank.deduplicated) == (4, 3)
    far = Query(texts[0:1] + 0.2 * texts[2:3] - 0.1 * texts[1:2], texts=texts[1:2])  # the duplicate ranks last
    assert bank.search(far, count=2) == [[0, 2]] and (bank.searches, bank.deduplicated) == (5, 3)


def test_a_prompt_made_from_a_bank_document_does_not_retrieve_it(cm3leon_checkpoint):
    import torch

    from patchwork.engines.cm3leon.tokenizer import BREAK

    engine = _engine(cm3leon_checkpoint[0], max_batch_size=1)
    engine.close()
    bank = engine.model.bank
    for index in (0, 5, 17):
        document = bank.document(index)
        caption = engine.tokenizer.decode(document[:document.index(BREAK)])
        before = bank.deduplicated
        prompt = engine.image_prompt(caption, documents=2)
        assert tuple(document) not in _documents_in(prompt.cond, engine) and bank.deduplicated == before + 1
        codes = [t - engine.config.text_vocab for t in document if engine.config.text_vocab <= t < engine.config.image_end]
        picture = engine.model.images(engine.model.image_ids(torch.tensor([codes])))[0].numpy()
        assert tuple(document) not in _documents_in(engine.caption_prompt(picture, documents=2).cond, engine)


def _documents_in(tokens, engine) -> set[tuple[int, ...]]:
    """The retrieved documents a prompt starts with (each ends with <eos>)."""
    from patchwork.engines.cm3leon.tokenizer import EOS

    found, start = set(), 0
    for i, token in enumerate(tokens):
        if token == EOS:
            found.add(tuple(tokens[start:i + 1]))
            start = i + 1
    return found


def test_a_request_gets_the_retrieved_documents_it_asks_for(cm3leon_checkpoint):
    from patchwork.engines.api import InvalidRequest

    path, _ = cm3leon_checkpoint
    engine = _engine(path, max_batch_size=1)
    try:
        example = ImageWorld(seed=6)[0]
        alone = engine.image_prompt(example.caption, documents=0)
        assert alone.cond == (*engine.tokenizer.encode(example.caption), BREAK, 3)
        for count in (1, 2):
            prompt = engine.image_prompt(example.caption, documents=count)
            context = prompt.cond[: len(prompt.cond) - len(alone.cond)]
            assert list(context).count(EOS) == count  # each bank document ends with <eos>
            assert prompt.cond[len(context):] == alone.cond
        # Unset: the model's defaults, for images the family's (none), for text the config's (2).
        assert engine.image_prompt(example.caption) == alone
        assert engine.caption_prompt(example.image) == engine.caption_prompt(example.image, documents=2)
        with pytest.raises(InvalidRequest, match="^documents: 3 retrieved documents; this model takes 0 to 2"):
            engine.image_prompt(example.caption, documents=3)
        captioned = engine.caption_prompt(example.image, documents=1)
        assert list(captioned.cond).count(EOS) == 1
        with pytest.raises(InvalidRequest, match="^image: 16x16x3 pixels; this model reads 32x32x3"):
            engine.caption_prompt(example.image[:16, :16])
    finally:
        engine.close()


def test_a_request_names_only_what_it_changes_and_mixed_is_cfg_then_cd_k():
    from patchwork.engines.api import InvalidRequest
    from patchwork.engines.cm3leon.decoding import FAMILY_DEFAULTS, MIXED, Guidance, sample_params

    image = FAMILY_DEFAULTS["image"]
    (alone,) = sample_params(image, {}, 1, 0)
    assert (alone.guidance, alone.guidance_scale, alone.temperature, alone.top_p) == (
        image.guidance, image.guidance_scale, image.temperature, image.top_p)
    (unconditional,) = sample_params(image, {"guidance_scale": 0.0}, 1, 0)
    assert unconditional.guidance_scale == 0.0 and unconditional.top_p == image.top_p
    mixed = sample_params(image, {"guidance": MIXED, "seed": 7, "contrastive_k": 2}, 5, 0)
    assert [p.guidance for p in mixed] == [Guidance.CLASSIFIER_FREE] * 3 + [Guidance.CONTRASTIVE] * 2
    assert [p.seed for p in mixed] == [7, 8, 9, 10, 11]
    assert {(p.temperature, p.top_p, p.contrastive_k) for p in mixed} == {(image.temperature, image.top_p, 2)}
    text = FAMILY_DEFAULTS["text"]
    (caption,) = sample_params(text, {}, 1, 40)
    assert (caption.guidance, caption.temperature, caption.max_new_bytes) == (Guidance.NONE, 0.0, 40)
    with pytest.raises(InvalidRequest, match="^decoding.temperature: 0 .greedy. makes all 3 samples the same"):
        sample_params(image, {"temperature": 0.0}, 3, 0)


def test_decoding_defaults_come_from_the_manifest_the_evaluation_wrote(cm3leon_checkpoint, tmp_path):
    import shutil

    from patchwork.engines.checkpoint import CheckpointError, read_manifest, record_decoding
    from patchwork.engines.cm3leon.decoding import FAMILY_DEFAULTS

    path = tmp_path / "recorded"
    shutil.copytree(cm3leon_checkpoint[0], path)
    engine = _engine(path, max_batch_size=1)
    engine.close()
    assert engine.defaults["image"] == FAMILY_DEFAULTS["image"]  # nothing recorded
    recorded = {"guidance": "contrastive", "temperature": 1.0, "top_p": 0.9, "contrastive_alpha": 0.3,
                "contrastive_k": 2, "documents": 1, "chosen_by": "evaluation: CD-K a=0.3 K=2"}
    record_decoding(path, {"image": recorded})
    assert read_manifest(path).decoding == {"image": recorded}  # every hash still verifies
    engine = _engine(path, max_batch_size=1)
    engine.close()
    assert engine.defaults["image"].model_dump(mode="json") == {**recorded, "guidance_scale": 3.0}
    assert engine.defaults["text"] == FAMILY_DEFAULTS["text"].model_copy(update={"documents": 2})
    assert engine.describe().defaults["image"]["chosen_by"] == "evaluation: CD-K a=0.3 K=2"
    (params,) = engine.params("image", {"seed": 4})
    assert (params.guidance.value, params.contrastive_alpha, params.contrastive_k, params.seed) == (
        "contrastive", 0.3, 2, 4)
    record_decoding(path, {"image": {**recorded, "top_p": 2.0}})
    with pytest.raises(CheckpointError, match="recorded: manifest.json: decoding.image: top_p: Input should be"):
        _engine(path, max_batch_size=1)


def test_the_evaluation_runs_and_reports_every_measurement(cm3leon_checkpoint, tmp_path):
    import json
    import shutil

    from PIL import Image

    from patchwork.engines.checkpoint import read_manifest
    from patchwork.engines.loading import load
    from patchwork.engines.scheduler import SchedulerConfig
    from patchwork.training.cm3leon.evaluate import UNCONDITIONAL, main, modes

    path = tmp_path / "checkpoint"
    shutil.copytree(cm3leon_checkpoint[0], path)
    out = tmp_path / "report.json"
    assert main(["--checkpoint", str(path), "--prompts", "2", "--samples", "2", "--batch", "3", "--documents", "2",
                 "--record", "--json", str(out), "--markdown", str(tmp_path / "report.md"),
                 "--grid", str(tmp_path / "grid.png")]) == 0
    report = json.loads(out.read_text())
    rows = report["text_to_image"]
    mixes = {(r["mode"], r["documents"]) for r in rows if r["mode"].startswith("mix CFG 3 + CD-K a=")}
    assert {(r["mode"], r["documents"]) for r in rows} == {
        (mode, 2) for mode in modes()} | {(UNCONDITIONAL, 0)} | mixes
    assert [documents for _, documents in mixes] == [2]
    assert all(0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["best_ranked_accuracy"] <= 1.0 for r in rows)
    # CD-K's plausible set, per step of the 32x32 image's 8x8 codes, within the 256 codes, at least K.
    for r in rows:
        if r["mode"].startswith("CD-K a=") and "no top-p" not in r["mode"]:
            k = int(r["mode"].split("K=")[1])
            assert len(r["plausible_set"]) == 64 and all(k <= size <= 256 for size in r["plausible_set"])
    # Each prompt searches the bank once per document count above 0 (here one: 2).
    assert report["retrieval"]["searches"] == 2 and 0 <= report["retrieval"]["near_duplicates_skipped"] <= 2
    # The best single mode is recorded in the manifest: the served default.
    best = max((r for r in rows if r["mode"] in modes()), key=lambda r: r["accuracy"])
    recorded = read_manifest(path).decoding["image"]
    assert (report["best_decoding"]["mode"], recorded["documents"]) == (best["mode"], best["documents"])
    engine = load(path, scheduler=SchedulerConfig(max_batch_size=1))
    engine.close()
    assert engine.defaults["image"].chosen_by == recorded["chosen_by"]
    assert set(report["image_to_text"]) == {"caption", "alt-text as given (noisy ones)",
                                            "caption re-aligning the alt-text (noisy ones)"}
    # More concurrent prompts (3) than held-out prompts (2): the speed runs reuse prompts.
    assert [p["prompts"] for p in report["speed"]["cfg_pairing"]] == [1, 3]
    assert all(p["speedup"] > 0 for p in report["speed"]["cfg_pairing"])
    assert set(report["speed"]["images_per_s"]) == {"1", "3"}
    assert Image.open(tmp_path / "grid.png").size == (2 * 32 * 3, (len(modes()) + 2) * 32 * 3)  # the mix, the floor
    assert "| mode | documents |" in (tmp_path / "report.md").read_text()
    assert main(["--checkpoint", str(tmp_path / "missing")]) == 2


def test_attribute_accuracy_counts_the_facts_the_parser_finds():
    from patchwork.training.cm3leon.evaluate import attribute_accuracy, precision_recall
    from patchwork.training.imageworld import Scene, Shape, render

    prompt = Scene((Shape("circle", "red", "large", 0), Shape("square", "blue", "small", 3)))
    assert attribute_accuracy(prompt, render(prompt)) == 1.0
    wrong_colour = Scene((Shape("circle", "green", "large", 0), Shape("square", "blue", "small", 3)))
    assert attribute_accuracy(prompt, render(wrong_colour)) == 5 / 6
    assert attribute_accuracy(prompt, render(Scene(()))) == 0.0
    precision, recall = precision_recall(["a large red circle at the top left and a small circle"], [prompt])
    assert (precision, recall) == (1.0, 0.5)  # a shape without a cell states no located fact
