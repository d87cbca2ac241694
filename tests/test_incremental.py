"""The incremental engine and its scheduler, held to the full-recompute reference."""

import random
import threading

import pytest
import torch

from patchwork.engines.api import AdmissionError, FinishReason, RequestCancelled, RequestTooLarge, SamplingParams
from patchwork.engines.blt import incremental
from patchwork.engines.blt.patching import patch_ids_from_starts
from patchwork.engines.blt.reference import prompt_tokens
from patchwork.engines.scheduler import SchedulerConfig, StepBatch
from tests.helpers import PATCHINGS, make_engine, random_prompts, reference


@pytest.mark.parametrize("patching", list(PATCHINGS))
def test_greedy_batch_of_one_is_byte_identical_to_the_reference(patching):
    engine = make_engine(PATCHINGS[patching])
    for i, prompt in enumerate(random_prompts(seed=len(patching), count=4)):
        params = SamplingParams(max_new_bytes=[5, 23, 40, 11][i])
        fast = engine.generate_one(prompt, params)
        slow = reference(engine, prompt, params)
        assert fast.text == slow.text, prompt
        assert fast.details.patch_lengths == slow.details.patch_lengths
        assert fast.finish_reason == slow.finish_reason


def test_mixed_batches_match_the_reference_and_leave_no_state_behind():
    engine = make_engine(max_batch_size=3)  # 7 prompts through 3 slots: slots are reused
    prompts = random_prompts(seed=1, count=7)
    lengths = [17, 3, 30, 8, 25, 1, 12]
    requests = [engine.submit(p, SamplingParams(max_new_bytes=n)) for p, n in zip(prompts, lengths)]
    results = [r.result() for r in requests]
    for prompt, n, result in zip(prompts, lengths, results):
        slow = reference(engine, prompt, SamplingParams(max_new_bytes=n))
        assert result.text == slow.text and result.details.patch_lengths == slow.details.patch_lengths
    assert max(engine.scheduler.batch_sizes) == 3
    table = engine.scheduler.caches.table  # every slot's row is back to a fresh sequence's
    assert table.length.eq(0).all() and table.open_length.eq(0).all() and table.closed.eq(0).all()
    assert table.opens_next.all() and table.recent.eq(0).all() and table.entropy.eq(0).all()
    assert table.ahead_symbol.eq(0).all() and not table.ahead_opens.any()


def test_a_failing_prefill_fails_only_its_request():
    engine = make_engine()
    step = engine.step
    bad_prompt = prompt_tokens(b"bad")

    def failing(caches, chunks, decodes):
        if chunks is not None and bad_prompt in chunks.symbols:
            raise RuntimeError("prefill failed")
        return step(caches, chunks, decodes)

    engine.step = failing
    # Submitted together, both are prefilled in one batch that fails; each is
    # then retried alone, so only the bad one fails.
    good = engine.submit(b"good", SamplingParams(max_new_bytes=20))
    bad = engine.submit(b"bad", SamplingParams(max_new_bytes=20))
    with pytest.raises(RuntimeError, match="prefill failed"):
        bad.result()
    assert good.result().text == reference(engine, b"good", SamplingParams(max_new_bytes=20)).text


def test_seeded_sampling_does_not_depend_on_the_batch():
    engine = make_engine()
    params = SamplingParams(max_new_bytes=30, temperature=1.0, top_p=0.9, seed=21)
    alone = engine.generate_one(b"same prompt", params)
    others = [engine.submit(p, SamplingParams(max_new_bytes=40, temperature=0.7, seed=i))
              for i, p in enumerate(random_prompts(seed=5, count=3))]
    together = engine.submit(b"same prompt", params)
    assert together.result().text == alone.text == reference(engine, b"same prompt", params).text
    for other in others:
        other.result()


def test_step_logits_match_the_full_forward():
    engine = make_engine(PATCHINGS["entropy-max-length"])
    model, caches = engine.model, incremental.BltCaches(engine.model, slots=2, max_patches=200)
    tokens = prompt_tokens(b"the caches hold") + [ord(c) + 4 for c in "exactly what a full pass computes"]
    logits, state = incremental.prefill(model, caches, 1, tokens[:6])
    for n in range(6, len(tokens)):
        x = torch.tensor([tokens[:n]])
        starts, _ = model.patch(x)
        with torch.no_grad():
            full = model(x, patch_ids_from_starts(starts))[0, -1]
        assert state.starts == starts[0].tolist()
        torch.testing.assert_close(logits, full, atol=1e-4, rtol=1e-4)
        logits = incremental.decode_step(model, caches, [1], [state], [tokens[n]])[0]


def test_stop_and_end_of_sequence_in_the_fast_path():
    engine = make_engine()
    full = engine.generate_one(b"q", SamplingParams(max_new_bytes=30)).text
    stop = full[9:11]
    result = engine.generate_one(b"q", SamplingParams(max_new_bytes=30, stop=(stop,)))
    assert result.finish_reason == FinishReason.STOP and result.text == full[: full.find(stop)]
    with torch.no_grad():
        engine.model.local_decoder.lm_head.weight.zero_()  # ties everywhere: EOS is the first allowed id
    eos = engine.generate_one(b"q", SamplingParams(max_new_bytes=30))
    assert eos.finish_reason == FinishReason.END_OF_SEQUENCE and eos.text == b""


def test_streamed_deltas_match_the_result():
    engine = make_engine()
    *deltas, result = engine.submit("héllo".encode(), SamplingParams(max_new_bytes=25, temperature=0.8, seed=1))
    assert b"".join(deltas) == result.text and len(result.text) == 25


def test_global_model_runs_once_per_patch():
    engine = make_engine(PATCHINGS["static"])
    result = engine.generate_one(b"ab", SamplingParams(max_new_bytes=30))
    # prefill runs it once over BOS and "ab" (patches [BOS] [a b .]); then once per closed patch
    assert result.details.global_steps == 1 + sum(1 for p in range(4, 33) if (p - 1) % 3 == 0)


def test_a_request_that_can_never_fit_is_refused():
    engine = make_engine(max_sequence_bytes=50)
    refusal = r"^max_new_bytes: prompt \(11\) plus max_new_bytes \(50\) need 61 cache positions; a sequence may use at most 50"
    with pytest.raises(RequestTooLarge, match=refusal):
        engine.submit(b"x" * 11, SamplingParams(max_new_bytes=50))
    with pytest.raises(RequestTooLarge, match="^prompt: "):
        engine.submit(b"x" * 50, SamplingParams(max_new_bytes=1))


def test_queue_is_bounded():
    engine = make_engine(max_batch_size=1, max_queue=1)
    long = SamplingParams(max_new_bytes=300)
    first, second = engine.submit(b"a", long), engine.submit(b"b", long)
    with pytest.raises(AdmissionError, match="waiting for a slot"):
        engine.submit(b"c", long)
    first.cancel()
    second.cancel()


def test_cancelling_frees_the_slot_for_the_next_request():
    engine = make_engine(max_batch_size=1, max_queue=4)
    blocker = engine.submit(b"a", SamplingParams(max_new_bytes=390))
    iterator = iter(blocker)
    next(iterator)  # it is running
    waiting = engine.submit(b"b", SamplingParams(max_new_bytes=3))
    blocker.cancel()
    assert len(waiting.result().text) == 3
    assert engine.scheduler.running == 0 and engine.scheduler.queue_depth == 0
    with pytest.raises(RequestCancelled):
        list(iterator)  # the cancelled request ends instead of waiting forever


def test_trained_checkpoint_fast_path_matches_the_reference(tiny_checkpoint):
    from patchwork.engines.loading import load

    engine = load(tiny_checkpoint, scheduler=SchedulerConfig(max_batch_size=3, max_sequence_bytes=300))
    prompts = [b"def ", "# ñandú 日本\n".encode(), b"", b"\x00\xff\x10binary", b"import os\nimport sys\n"]
    params = SamplingParams(max_new_bytes=48)
    requests = [engine.submit(p, params) for p in prompts]  # 5 requests through 3 slots
    for prompt, request in zip(prompts, requests):
        fast, slow = request.result(), reference(engine, prompt, params)
        assert fast.text == slow.text and fast.details.patch_lengths == slow.details.patch_lengths
    sampled = SamplingParams(max_new_bytes=48, temperature=0.9, top_k=40, seed=7)
    assert engine.generate_one(b"class ", sampled).text == reference(engine, b"class ", sampled).text


# -- long prompts, chunked prefill, slots that move ----------------------------

LONG_PROMPT_LENGTHS = [100, 1000, 350, 600, 220]
STAGGERED_NEW_BYTES = [5, 24, 12, 30, 1]


def text_prompt(seed: int, length: int) -> bytes:
    rng = random.Random(seed)
    words = [b"def", b"return", b"\xc3\xb1and\xc3\xba", b"x", b"(self)", b"\n    ", b"\xe6\x97\xa5\xe6\x9c\xac", b"42"]
    out = bytearray()
    while len(out) < length:
        out += rng.choice(words) + rng.choice([b" ", b"", b"\n"])
    return bytes(out[:length])


@pytest.mark.parametrize("patching", list(PATCHINGS))
def test_long_prompts_with_staggered_lengths_match_the_reference(patching):
    # Five requests through three slots: long prompts are read in chunks while
    # others generate, sequences finish out of order and move between slots
    # after their caches hold hundreds of positions.
    engine = make_engine(PATCHINGS[patching], max_batch_size=3, max_sequence_bytes=1100, prefill_budget=48)
    prompts = [text_prompt(i, n) for i, n in enumerate(LONG_PROMPT_LENGTHS)]
    params = [SamplingParams(max_new_bytes=n) for n in STAGGERED_NEW_BYTES]
    requests = [engine.submit(p, q) for p, q in zip(prompts, params)]
    for prompt, param, request in zip(prompts, params, requests):
        fast, slow = request.result(), reference(engine, prompt, param)
        assert fast.text == slow.text and fast.details.patch_lengths == slow.details.patch_lengths, len(prompt)
    assert max(engine.scheduler.prefill_sizes) <= 512  # chunks within the idle budget...
    assert any(size <= 48 for size in engine.scheduler.prefill_sizes)  # ...and the busy one
    assert engine.scheduler.running == 0


def test_a_long_request_then_concurrent_requests_that_finish_out_of_order():
    engine = make_engine(PATCHINGS["static"], max_batch_size=4, max_sequence_bytes=1100, prefill_budget=32)
    long = text_prompt(7, 1000)
    first = SamplingParams(max_new_bytes=40)
    assert engine.generate_one(long, first).text == reference(engine, long, first).text
    # The first submitted finishes last; each later one finishes before the one before it.
    prompts = [text_prompt(10 + i, n) for i, n in enumerate([700, 300, 150, 20])]
    params = [SamplingParams(max_new_bytes=n) for n in (40, 25, 10, 3)]
    requests = [engine.submit(p, q) for p, q in zip(prompts, params)]
    for prompt, param, request in zip(prompts, params, requests):
        assert request.result().text == reference(engine, prompt, param).text


@pytest.mark.parametrize("budget", [1, 7, 64, 2000])
def test_how_a_prompt_is_cut_into_chunks_does_not_change_the_output(budget):
    engine = make_engine(PATCHINGS["entropy-max-length"], prefill_budget=budget, idle_prefill_budget=budget)
    prompt, params = text_prompt(3, 120), SamplingParams(max_new_bytes=20)
    assert engine.generate_one(prompt, params).text == reference(engine, prompt, params).text
    assert max(engine.scheduler.prefill_sizes) == min(budget, len(prompt) + 1)


def test_a_step_with_prompt_chunks_and_decoding_sequences_matches_the_full_forward():
    engine = make_engine(PATCHINGS["monotonic"])
    model = engine.model
    caches = incremental.BltCaches(model, slots=3, max_patches=200)
    tokens = prompt_tokens(text_prompt(5, 60))
    sequences = [tokens[:20], tokens[5:30], tokens]
    states = [incremental.new_state(model, caches, len(s)) for s in sequences]
    incremental.step(model, caches, chunks=StepBatch([0, 1], states[:2], sequences[:2]))
    rng, read = random.Random(3), 0
    while read < len(sequences[2]):
        chunk = sequences[2][read : read + 7]
        new = [rng.randrange(4, 260) for _ in range(2)]
        chunk_logits, decode_logits = incremental.step(
            model, caches, chunks=StepBatch([2], [states[2]], [chunk]),
            decodes=StepBatch([0, 1], states[:2], [[n] for n in new]),
        )
        read += len(chunk)
        checks = []
        for i in range(2):
            sequences[i] = sequences[i] + [new[i]]
            checks.append((i, sequences[i], decode_logits[i]))
        if read == len(sequences[2]):
            checks.append((2, sequences[2], chunk_logits[0]))
        for i, symbols, logits in checks:
            x = torch.tensor([symbols])
            starts, _ = model.patch(x)
            with torch.no_grad():
                full = model(x, patch_ids_from_starts(starts))[0, -1]
            assert states[i].starts == starts[0].tolist()
            torch.testing.assert_close(logits, full, atol=1e-4, rtol=1e-4)


def test_the_decoder_skips_prompt_positions_no_generated_byte_can_see():
    engine = make_engine(PATCHINGS["entropy"], prefill_budget=16, idle_prefill_budget=16)
    decoder = engine.model.local_decoder
    layers, window = engine.model.cfg.local_decoder.n_layers, engine.model.cfg.local_decoder.window
    ran = []
    step = decoder.step

    def counting(byte_states, keys, values, view):
        ran.append(int((view.positions >= 0).sum()))
        return step(byte_states, keys, values, view)

    decoder.step = counting
    prompt, params = text_prompt(9, 200), SamplingParams(max_new_bytes=6)
    assert engine.generate_one(prompt, params).text == reference(engine, prompt, params).text
    prompt_symbols = len(prompt) + 1
    needed = 1 + layers * (window - 1)  # the positions from decoder_start on
    assert incremental.decoder_start(engine.model, prompt_symbols) == prompt_symbols - needed
    assert sum(ran) == needed + 5  # the prompt's last positions, then one per generated byte but the last


# Ways a tensor's values reach the host from Python.
DEVICE_READS = ("tolist", "item", "numpy", "__bool__", "__int__", "__float__", "__index__")


def test_a_decode_step_reads_the_device_once_even_when_patches_close(monkeypatch):
    """The scheduler's decode steps (model step, choice, the next step's
    patch decisions) read the device once: the chosen symbols and whether
    each closes its patch, together."""
    engine = make_engine(PATCHINGS["entropy"], max_batch_size=3, prefill_budget=8)
    scheduler, model = engine.scheduler, engine.model
    counting = {"thread": None, "reads": 0, "global": 0}
    for name in DEVICE_READS:
        def read(self, *args, _original=getattr(torch.Tensor, name), **kwargs):
            if threading.get_ident() == counting["thread"]:
                counting["reads"] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, read)
    global_step, run_model, steps = model.global_model.step, scheduler._run_model, []

    def counted_global(*args, **kwargs):
        counting["global"] += 1
        return global_step(*args, **kwargs)

    def counted_run_model():
        prefills, batches = len(scheduler.prefill_sizes), len(scheduler.batch_sizes)
        counting.update({"thread": threading.get_ident(), "reads": 0, "global": 0})
        try:
            run_model()
        finally:
            counting["thread"] = None
        decode_only = len(scheduler.prefill_sizes) == prefills and len(scheduler.batch_sizes) > batches
        steps.append((decode_only, counting["reads"], counting["global"]))

    monkeypatch.setattr(model.global_model, "step", counted_global)
    scheduler._run_model = counted_run_model
    prompts, lengths = [b"a", b"short prompt", b"a prompt read in several chunks " * 2], [40, 25, 12]
    requests = [engine.submit(p, SamplingParams(max_new_bytes=n)) for p, n in zip(prompts, lengths)]
    results = [r.result() for r in requests]
    for prompt, n, result in zip(prompts, lengths, results):
        assert result.text == reference(engine, prompt, SamplingParams(max_new_bytes=n)).text
    decode_steps = [(reads, globals_) for decode_only, reads, globals_ in steps if decode_only]
    # The longest generation decodes in max(lengths) - 1 steps after its own
    # prompt's; a step among those that also reads prompt symbols either ends
    # a prompt or reads the whole budget, so at most this many are not
    # decode-only (each prompt counted with a start symbol):
    others = [len(p) + 1 for p, n in zip(prompts, lengths) if n != max(lengths)]
    with_prefill = len(others) + sum(others) // engine.scheduler.config.prefill_budget
    assert len(decode_steps) >= max(lengths) - 1 - with_prefill
    assert {reads for reads, _ in decode_steps} == {1}
    assert sum(1 for _, globals_ in decode_steps if globals_) >= 3  # steps in which patches closed


def test_a_failed_run_ahead_leaves_the_next_step_to_do_it():
    engine = make_engine(PATCHINGS["entropy-max-length"], max_batch_size=2)
    run_ahead, calls = engine.run_ahead, []

    def fails_every_third(caches, slots, states, symbols):
        calls.append(len(slots))
        if len(calls) % 3 == 0:
            raise RuntimeError("run ahead failed")
        return run_ahead(caches, slots, states, symbols)

    engine.run_ahead = fails_every_third
    prompts, params = [b"one", b"and two"], [SamplingParams(max_new_bytes=30), SamplingParams(max_new_bytes=17)]
    results = [r.result() for r in [engine.submit(p, q) for p, q in zip(prompts, params)]]
    for prompt, param, result in zip(prompts, params, results):
        slow = reference(engine, prompt, param)
        assert result.text == slow.text and result.details.patch_lengths == slow.details.patch_lengths
    assert len(calls) >= 30  # one per step that chose symbols
