"""The incremental engine and its scheduler, held to the full-recompute reference."""

import random

import pytest
import torch

from engines.blt import incremental
from engines.blt.engine import BltEngine
from engines.blt.patching import patch_ids_from_starts
from engines.blt.reference import prompt_tokens
from engines.generation import FinishReason, Generation, SamplingParams
from engines.scheduler import AdmissionError, RequestCancelled, SchedulerConfig
from tests.conftest import random_blt

# Thresholds sit inside the random model's entropy range (about 5.0 to 5.2
# nats), so every mode cuts patches of mixed lengths.
PATCHINGS = {
    "entropy": {"threshold": 5.12},
    "entropy-max-length": {"threshold": 5.14, "max_patch_length": 3},
    "monotonic": {"mode": "monotonic", "threshold": 0.045},
    "static": {"mode": "static", "patch_size": 3},
    "space": {"mode": "space"},
}


def make_engine(patching: dict | None = None, window: int = 6, **scheduler) -> BltEngine:
    # Short windows: the ring caches wrap around within the tests' lengths.
    model = random_blt(seed=4, window=window, patching=patching or PATCHINGS["entropy"])
    config = SchedulerConfig(**{"max_batch_size": 4, "max_sequence_bytes": 400, **scheduler})
    return BltEngine(model, model.cfg, name="random", scheduler=config)


def random_prompts(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    kinds = [
        lambda: b"",
        lambda: bytes(rng.randrange(256) for _ in range(rng.randint(1, 40))),  # binary
        lambda: "".join(rng.choice("ñandú日本語🎉 ok") for _ in range(rng.randint(1, 12))).encode(),
        lambda: bytes(rng.choice(b"abc de\n") for _ in range(rng.randint(1, 90))),
    ]
    return [kinds[i % len(kinds)]() for i in range(count)]


def reference(engine: BltEngine, prompt: bytes, params: SamplingParams) -> Generation:
    *_, result = engine.generate_reference(prompt, params)
    return result


@pytest.mark.parametrize("patching", list(PATCHINGS))
def test_greedy_batch_of_one_is_byte_identical_to_the_reference(patching):
    engine = make_engine(PATCHINGS[patching])
    for i, prompt in enumerate(random_prompts(seed=len(patching), count=4)):
        params = SamplingParams(max_new_bytes=[5, 23, 40, 11][i])
        fast = engine.generate_one(prompt, params)
        slow = reference(engine, prompt, params)
        assert fast.text == slow.text, prompt
        assert fast.patch_lengths == slow.patch_lengths
        assert fast.finish_reason == slow.finish_reason


def test_mixed_batches_match_the_reference_and_leave_no_state_behind():
    engine = make_engine(max_batch_size=3)  # 7 prompts through 3 slots: slots are reused
    prompts = random_prompts(seed=1, count=7)
    lengths = [17, 3, 30, 8, 25, 1, 12]
    requests = [engine.submit(p, SamplingParams(max_new_bytes=n)) for p, n in zip(prompts, lengths)]
    results = [r.result() for r in requests]
    for prompt, n, result in zip(prompts, lengths, results):
        slow = reference(engine, prompt, SamplingParams(max_new_bytes=n))
        assert result.text == slow.text and result.patch_lengths == slow.patch_lengths
    assert max(engine.scheduler.batch_sizes) == 3


def test_a_failing_prefill_fails_only_its_request():
    engine = make_engine()
    prefill = engine.prefill

    def failing(caches, slot, prompt):
        if prompt == b"bad":
            raise RuntimeError("prefill failed")
        return prefill(caches, slot, prompt)

    engine.prefill = failing
    good = engine.submit(b"good", SamplingParams(max_new_bytes=20))
    bad = engine.submit(b"bad", SamplingParams(max_new_bytes=20))
    with pytest.raises(RuntimeError, match="prefill failed"):
        bad.result()
    assert len(good.result().text) == 20


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
    assert result.global_steps == 1 + sum(1 for p in range(4, 33) if (p - 1) % 3 == 0)


def test_a_request_that_can_never_fit_is_refused():
    engine = make_engine(max_sequence_bytes=50)
    with pytest.raises(AdmissionError, match="needs 61 bytes of cache; a sequence may use at most 50"):
        engine.submit(b"x" * 11, SamplingParams(max_new_bytes=50))


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


def test_cache_memory_per_sequence_is_bounded_by_the_config():
    engine = make_engine(max_sequence_bytes=100)
    caches = engine.scheduler.caches
    assert all(c.ring and c.capacity == 6 for c in (caches.entropy, caches.encoder, caches.decoder))
    assert not caches.global_.ring and caches.global_.capacity == 101
    assert caches.global_.size < 101  # linear caches grow only as patches arrive
    engine.generate_one(b"x" * 40, SamplingParams(max_new_bytes=60))
    assert caches.global_.size <= caches.global_.capacity
    assert caches.bytes_per_slot <= caches.max_bytes_per_slot
    per_position = caches.global_.bytes_per_position()
    assert caches.max_bytes_per_slot - caches.bytes_per_slot == (101 - caches.global_.size) * per_position


def test_trained_checkpoint_fast_path_matches_the_reference(tiny_checkpoint):
    import engines

    engine = engines.load(tiny_checkpoint, scheduler=SchedulerConfig(max_batch_size=3, max_sequence_bytes=300))
    prompts = [b"def ", "# ñandú 日本\n".encode(), b"", b"\x00\xff\x10binary", b"import os\nimport sys\n"]
    params = SamplingParams(max_new_bytes=48)
    requests = [engine.submit(p, params) for p in prompts]  # 5 requests through 3 slots
    for prompt, request in zip(prompts, requests):
        fast, slow = request.result(), reference(engine, prompt, params)
        assert fast.text == slow.text and fast.patch_lengths == slow.patch_lengths
    sampled = SamplingParams(max_new_bytes=48, temperature=0.9, top_k=40, seed=7)
    assert engine.generate_one(b"class ", sampled).text == reference(engine, b"class ", sampled).text
