"""The BLT engine's reference path: generation, streaming, stop, scoring."""

import math

import pytest
import torch
import torch.nn.functional as F

from patchwork.engines.api import FinishReason, Generation, SamplingParams
from patchwork.engines.blt.config import EOS_ID, OFFSET
from patchwork.engines.blt.engine import BltEngine
from patchwork.engines.blt.patching import patch_ids_from_starts
from patchwork.engines.blt.reference import prompt_tokens
from tests.conftest import random_blt


@pytest.fixture(scope="module")
def engine() -> BltEngine:
    model = random_blt(seed=3)
    return BltEngine(model, model.cfg, name="random")


def test_greedy_generation_is_the_argmax_of_the_full_forward(engine):
    prompt = b"hello"
    (result,) = engine.generate([prompt], max_new_bytes=12)
    tokens = prompt_tokens(prompt)
    for byte in result.text:
        x = torch.tensor([tokens])
        starts, _ = engine.model.patch(x)
        with torch.no_grad():
            logits = engine.model(x, patch_ids_from_starts(starts))[0, -1]
        logits[:OFFSET] = float("-inf")
        logits[EOS_ID] = float("-inf") if result.finish_reason != FinishReason.END_OF_SEQUENCE else logits[EOS_ID]
        assert int(logits.argmax()) == byte + OFFSET
        tokens.append(byte + OFFSET)


def test_result_accounting(engine):
    (result,) = engine.generate([b"abc"], max_new_bytes=20)
    assert result.finish_reason == FinishReason.LENGTH and len(result.text) == 20
    assert sum(result.details.patch_lengths) == len(result.text)
    assert result.usage.prompt_tokens == 3
    *_, reference = engine.generate_reference(b"abc", SamplingParams(max_new_bytes=20))
    assert reference.details.global_steps == 20  # the reference path runs the global model once per byte
    assert reference.text == result.text and reference.details.patch_lengths == result.details.patch_lengths


def test_generate_takes_a_batch_and_each_result_equals_its_own_run(engine):
    prompts = [b"", b"x", "ünïcode".encode(), bytes(range(250, 256))]
    together = engine.generate(prompts, max_new_bytes=8, temperature=0.9, seed=5)
    alone = [engine.generate([p], max_new_bytes=8, temperature=0.9, seed=5)[0] for p in prompts]
    assert [g.text for g in together] == [g.text for g in alone]


def test_seeded_sampling_is_reproducible(engine):
    first = engine.generate([b"seed"], max_new_bytes=16, temperature=1.0, top_k=50, seed=11)[0].text
    again = engine.generate([b"seed"], max_new_bytes=16, temperature=1.0, top_k=50, seed=11)[0].text
    other = engine.generate([b"seed"], max_new_bytes=16, temperature=1.0, top_k=50, seed=12)[0].text
    assert first == again and first != other


def test_reference_stream_deltas_add_up_to_the_result(engine):
    params = SamplingParams(max_new_bytes=15, temperature=0.7, seed=2)
    items = list(engine.generate_reference(b"stream", params))
    *deltas, result = items
    assert isinstance(result, Generation) and all(isinstance(d, bytes) and d for d in deltas)
    assert b"".join(deltas) == result.text == engine.generate_one(b"stream", params).text


def test_stop_sequence_ends_generation_and_is_not_returned(engine):
    full = engine.generate([b"q"], max_new_bytes=24)[0].text
    stop = full[5:7]
    first = full.find(stop)
    result = engine.generate([b"q"], max_new_bytes=24, stop=[stop])[0]
    assert result.finish_reason == FinishReason.STOP
    assert result.text == full[:first]
    assert sum(result.details.patch_lengths) == len(result.text)
    deltas = [d for d in engine.generate_reference(b"q", SamplingParams(max_new_bytes=24, stop=(stop,)))
              if isinstance(d, bytes)]
    assert b"".join(deltas) == full[:first]


def test_end_of_sequence_ends_generation(engine):
    # A zero head ties every symbol; EOS is the lowest id that may be generated.
    model = random_blt(seed=3)
    with torch.no_grad():
        model.local_decoder.lm_head.weight.zero_()
    result = BltEngine(model, model.cfg, "eos").generate([b"abc"], max_new_bytes=10)[0]
    assert result.finish_reason == FinishReason.END_OF_SEQUENCE
    assert result.text == b"" and result.details.patch_lengths == []
    assert result.details.global_steps == 1  # the prefill


def test_cancellation_stops_the_stream(engine):
    calls = []

    def cancelled():
        calls.append(1)
        return len(calls) > 3

    *deltas, result = engine.generate_reference(b"c", SamplingParams(max_new_bytes=50), cancelled)
    assert len(result.text) == 3


def test_score_matches_a_direct_computation(engine):
    text = b"def f(x):\n    return x"
    score = engine.score(text)
    assert len(score.entropies) == len(text) and sum(score.patch_lengths) == len(text)
    tokens = torch.tensor([prompt_tokens(text)])
    with torch.no_grad():
        starts, entropies = engine.model.patch(tokens)
        logits = engine.model(tokens[:, :-1], patch_ids_from_starts(starts[:, :-1]))
    nll = F.cross_entropy(logits[0], tokens[0, 1:], reduction="sum").item()
    assert score.bits_per_byte == pytest.approx(nll / math.log(2) / len(text), rel=1e-5)
    assert score.entropies == pytest.approx(entropies[0, :-1].tolist(), rel=1e-5)
    assert engine.score(b"").bits_per_byte == 0.0


def test_invalid_parameters_name_the_field(engine):
    with pytest.raises(ValueError, match="temperature"):
        engine.generate([b"x"], temperature=-0.5)
    with pytest.raises(ValueError, match="top_p"):
        engine.generate([b"x"], top_p=1.5)
    with pytest.raises(ValueError, match="stop"):
        engine.generate([b"x"], stop=[b""])
