"""The continuous-batching scheduler under failures, cancellations and bounds."""

import threading
import time

import pytest

from patchwork.engines.api import DeadlineExceeded, EngineUnavailable, RequestCancelled, SamplingParams
from patchwork.engines.scheduler import _share_budget
from tests.helpers import PATCHINGS, admitted_together, make_engine, reference, wait_until


def free_slots_are_consistent(engine) -> bool:
    scheduler = engine.scheduler
    free = sorted(scheduler._free)
    used = sorted(r.slot for r in scheduler._running)
    return len(set(free)) == len(free) and not set(free) & set(used) and len(free) + len(used) == \
        scheduler.config.max_batch_size


def test_the_budget_is_shared_evenly_and_short_prompts_finish_in_one_step():
    assert _share_budget([1000, 20], 64) == [44, 20]
    assert _share_budget([5, 5, 5], 64) == [5, 5, 5]
    assert _share_budget([100, 100, 100], 30) == [10, 10, 10]
    assert sum(_share_budget([7] * 40, 16)) == 16  # at least one each, in order, while it lasts


def test_prefill_work_per_step_stays_within_the_budget_while_others_generate():
    engine = make_engine(max_batch_size=4, max_sequence_bytes=1000, prefill_budget=24, idle_prefill_budget=100)
    running = engine.submit(b"running", SamplingParams(max_new_bytes=490))  # outlasts the long prompt's chunks
    next(iter(running))  # it is generating
    long = engine.submit(b"x" * 500, SamplingParams(max_new_bytes=2))
    long.result()
    sizes = list(engine.scheduler.prefill_sizes)
    assert sizes[0] == len(b"running") + 1  # alone: one chunk within the idle budget
    assert max(sizes[1:]) == 24 and len(sizes[1:]) == -(-501 // 24)
    running.cancel()


def test_a_failing_choice_during_admission_fails_only_its_request_and_leaks_no_slot():
    engine = make_engine(max_batch_size=3)
    accept = engine.accept
    failing = SamplingParams(max_new_bytes=9, seed=666)

    def fails_for_one(decoding, symbol, state, ahead):
        if decoding.params.seed == 666:
            raise RuntimeError("sampling failed")
        return accept(decoding, symbol, state, ahead)

    engine.accept = fails_for_one
    with admitted_together(engine):  # in the same step as the failing one
        requests = [engine.submit(b"a", SamplingParams(max_new_bytes=9)), engine.submit(b"b", failing),
                    engine.submit(b"c", SamplingParams(max_new_bytes=9))]
    with pytest.raises(RuntimeError, match="sampling failed"):
        requests[1].result()
    assert [len(requests[i].result().text) for i in (0, 2)] == [9, 9]
    wait_until(lambda: engine.scheduler.running == 0, what="every request to leave")
    assert free_slots_are_consistent(engine) and len(engine.scheduler._free) == 3


def test_a_failing_consumer_is_cancelled_and_the_loop_serves_on():
    engine = make_engine()

    def broken(item):
        raise ValueError("consumer broke")

    engine.submit(b"doomed", SamplingParams(max_new_bytes=50), emit=broken)
    survivor = engine.submit(b"fine", SamplingParams(max_new_bytes=20))
    assert survivor.result().text == reference(engine, b"fine", SamplingParams(max_new_bytes=20)).text
    wait_until(lambda: engine.scheduler.running == 0, what="the broken request to leave")
    assert engine.scheduler.health() is None


def test_a_failed_move_fails_its_request_and_leaves_no_slot_both_free_and_used():
    engine = make_engine(max_batch_size=3)
    move = engine.move
    failures = []

    def fails_once(caches, source, target):
        if not failures:
            failures.append((source, target))
            raise RuntimeError("move failed")
        return move(caches, source, target)

    engine.move = fails_once
    short, long = SamplingParams(max_new_bytes=2), SamplingParams(max_new_bytes=60)
    with admitted_together(engine):  # slots 0, 1, 2
        first, mover, other = engine.submit(b"a", short), engine.submit(b"b", long), engine.submit(b"c", long)
    first.result()  # slot 0 frees; the sequence in slot 2 moves down
    outcomes = []
    for request in (mover, other):
        try:
            outcomes.append(len(request.result().text))
        except RuntimeError as error:
            outcomes.append(str(error))
    assert sorted(outcomes, key=str) == [60, "move failed"]
    wait_until(lambda: engine.scheduler.running == 0)
    assert free_slots_are_consistent(engine)
    again = engine.generate_one(b"b", long)  # every slot still works
    assert again.text == reference(engine, b"b", long).text


def test_a_failing_decode_step_fails_its_sequences_and_the_next_requests_succeed():
    engine = make_engine()
    step = engine.step
    calls = []

    def fails_on_third_decode(caches, chunks, decodes):
        if decodes is not None:
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("decode failed")
        return step(caches, chunks, decodes)

    engine.step = fails_on_third_decode
    doomed = [engine.submit(p, SamplingParams(max_new_bytes=30)) for p in (b"x", b"y")]
    for request in doomed:
        with pytest.raises(RuntimeError, match="decode failed"):
            request.result()
    params = SamplingParams(max_new_bytes=12)
    assert engine.generate_one(b"z", params).text == reference(engine, b"z", params).text
    assert engine.scheduler.health() is None


class Fatal(BaseException):
    """Something a step cannot recover from (what kills the thread)."""


def test_a_dead_scheduler_fails_its_requests_refuses_new_ones_and_says_so():
    engine = make_engine()
    step = engine.step

    def dies(caches, chunks, decodes):
        if decodes is not None:
            raise Fatal()
        return step(caches, chunks, decodes)

    engine.step = dies
    running = engine.submit(b"x", SamplingParams(max_new_bytes=30))
    with pytest.raises(EngineUnavailable):
        running.result()
    wait_until(lambda: engine.scheduler.health(), what="health to report the dead thread")
    assert "stopped" in engine.scheduler.health()
    with pytest.raises(EngineUnavailable, match="stopped"):
        engine.submit(b"y", SamplingParams(max_new_bytes=3))


def test_a_stalled_step_is_reported_by_health():
    engine = make_engine(stall_timeout_s=0.2)
    release = threading.Event()
    step = engine.step

    def stalls(caches, chunks, decodes):
        release.wait(timeout=30)
        return step(caches, chunks, decodes)

    engine.step = stalls
    request = engine.submit(b"slow", SamplingParams(max_new_bytes=2))
    assert "has not finished a step" in wait_until(engine.scheduler.health, what="a stall report")
    release.set()
    request.result()
    assert engine.scheduler.health() is None


def test_idle_health_needs_no_model_call():
    engine = make_engine()
    engine.generate_one(b"warm", SamplingParams(max_new_bytes=2))
    engine.step = None  # a health check that touched the model would fail now
    time.sleep(0.1)
    assert engine.scheduler.health() is None


@pytest.mark.parametrize("stop", ["cancel", "deadline"])
def test_every_cancel_and_deadline_frees_its_slot_within_two_steps_at_32_streams(stop):
    engine = make_engine(max_batch_size=32, max_queue=0)
    scheduler = engine.scheduler
    started = [threading.Event() for _ in range(32)]

    def on_item(i):
        return lambda item: started[i].set()

    far = time.monotonic() + 3600
    requests = [engine.submit(b"stream %d" % i, SamplingParams(max_new_bytes=390), emit=on_item(i),
                              deadline=None if stop == "cancel" else far) for i in range(32)]
    for event in started:
        assert event.wait(timeout=60)
    for request in requests:
        if stop == "cancel":
            request.cancel()
        else:
            request.deadline = time.monotonic()
    steps = scheduler.steps  # the step under way may miss the last of them; the next one may not
    wait_until(lambda: scheduler.running == 0, what="every slot to be freed")
    assert scheduler.steps - steps <= 2
    assert free_slots_are_consistent(engine)


def test_stopped_requests_get_the_reason():
    engine = make_engine(max_batch_size=1, max_queue=4)
    blocker = engine.submit(b"a", SamplingParams(max_new_bytes=390))
    next(iter(blocker))
    expired = engine.submit(b"b", SamplingParams(max_new_bytes=3), deadline=time.monotonic() + 0.05)
    with pytest.raises(DeadlineExceeded):
        expired.result()  # it expires while waiting for the slot
    blocker.cancel()
    with pytest.raises(RequestCancelled):
        blocker.result()


def test_abort_all_ends_waiting_and_running_requests_with_the_reason():
    engine = make_engine(max_batch_size=1, max_queue=4)
    requests = [engine.submit(b"r%d" % i, SamplingParams(max_new_bytes=390)) for i in range(3)]
    next(iter(requests[0]))
    assert engine.scheduler.abort_all(EngineUnavailable("draining")) == 3
    for request in requests:
        with pytest.raises(EngineUnavailable, match="draining"):
            request.result()
    wait_until(lambda: engine.scheduler.running == 0 and engine.scheduler.queue_depth == 0)


def test_close_fails_what_is_left_and_refuses_new_requests():
    engine = make_engine(max_batch_size=1, max_queue=4)
    running, waiting = (engine.submit(b"r%d" % i, SamplingParams(max_new_bytes=390)) for i in range(2))
    next(iter(running))
    engine.close()
    for request in (running, waiting):
        with pytest.raises(EngineUnavailable):
            request.result()
    with pytest.raises(EngineUnavailable, match="shutting down"):
        engine.submit(b"late", SamplingParams(max_new_bytes=1))
    assert "shutting down" in engine.scheduler.health()


def test_many_mixed_requests_with_cancellations_leave_a_clean_scheduler():
    engine = make_engine(PATCHINGS["static"], max_batch_size=5, max_sequence_bytes=1200, prefill_budget=40, max_queue=64)
    import random

    rng = random.Random(11)
    requests, expected = [], []
    for i in range(40):
        prompt = bytes(rng.choice(b"abcdef \n") for _ in range(rng.randint(1, 900)))
        params = SamplingParams(max_new_bytes=rng.randint(1, 60))
        requests.append(engine.submit(prompt, params))
        expected.append((prompt, params))
    for i, request in enumerate(requests):
        if i % 5 == 4:
            request.cancel()
    for i, (request, (prompt, params)) in enumerate(zip(requests, expected)):
        if i % 5 == 4:
            try:
                request.result()
            except RequestCancelled:
                pass
            continue
        if i % 4 == 0:  # check a sample against the reference; the rest must simply finish
            assert request.result().text == reference(engine, prompt, params).text
        else:
            result = request.result()
            assert len(result.text) == params.max_new_bytes or result.finish_reason.value == "end_of_sequence"
    wait_until(lambda: engine.scheduler.running == 0)
    assert free_slots_are_consistent(engine) and engine.scheduler.health() is None


def test_short_prompts_are_read_whole_in_the_step_they_are_admitted():
    engine = make_engine(max_batch_size=6, prefill_budget=8, short_prompt=20)
    running = engine.submit(b"r", SamplingParams(max_new_bytes=390))
    next(iter(running))  # generating: the busy budget applies
    with admitted_together(engine):
        burst = [engine.submit(b"0123456789", SamplingParams(max_new_bytes=5)) for _ in range(4)]
    for request in burst:
        request.result()
    running.cancel()
    sizes = list(engine.scheduler.prefill_sizes)[1:]  # after the first prompt
    assert sizes == [4 * 11]  # all four in one step, beyond the budget of 8
