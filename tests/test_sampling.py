import pytest
import torch

from patchwork.engines.api import SamplingParams
from patchwork.engines.generation import Decoding
from patchwork.engines.sampling import choose_rows, make_generator, sample_next


def draws(logits, params, n=200, seed=0):
    generator = make_generator(seed, "cpu")
    return [sample_next(logits, params, generator) for _ in range(n)]


LOGITS = torch.tensor([0.0, 2.0, 1.0, -1.0, 1.5, float("-inf")])


def test_greedy_is_argmax():
    assert sample_next(LOGITS, SamplingParams(), make_generator(0, "cpu")) == 1


def test_top_k_one_is_argmax_at_any_temperature():
    assert set(draws(LOGITS, SamplingParams(temperature=5.0, top_k=1))) == {1}


def test_top_k_keeps_only_the_k_best():
    assert set(draws(LOGITS, SamplingParams(temperature=10.0, top_k=3))) == {1, 2, 4}


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.softmax(LOGITS, dim=-1)  # sorted: 1 (.45), 4 (.27), 2 (.17), ...
    top_two = float(probs[1] + probs[4])
    assert set(draws(LOGITS, SamplingParams(temperature=1.0, top_p=top_two - 0.01))) == {1, 4}
    assert set(draws(LOGITS, SamplingParams(temperature=1.0, top_p=0.01))) == {1}


def test_masked_symbols_are_never_drawn_and_all_others_can_be():
    assert set(draws(LOGITS, SamplingParams(temperature=3.0), n=2000)) == {0, 1, 2, 3, 4}


def test_same_seed_same_draws_and_other_seeds_differ():
    params = SamplingParams(temperature=1.0)
    assert draws(LOGITS, params, seed=7) == draws(LOGITS, params, seed=7)
    assert draws(LOGITS, params, seed=7) != draws(LOGITS, params, seed=8)


def test_extreme_temperatures_stay_finite():
    tiny = draws(LOGITS, SamplingParams(temperature=1.4e-45), n=50)
    assert set(tiny) == {1}  # as good as greedy
    huge = draws(LOGITS, SamplingParams(temperature=3.0e38), n=2000)
    assert set(huge) == {0, 1, 2, 3, 4}  # as good as uniform over the allowed symbols


def chosen(logits, decodings) -> list:
    """``choose_rows`` read to the host: each row's symbol, or "failed"."""
    symbols, failed = choose_rows(logits, decodings)
    assert symbols.device == failed.device == logits.device and symbols.shape == failed.shape == (len(decodings),)
    return ["failed" if row_failed else symbol for symbol, row_failed in zip(symbols.tolist(), failed.tolist())]


def test_choosing_a_batch_at_once_gives_each_row_what_it_gets_alone():
    logits = torch.randn(6, 260, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(), SamplingParams(temperature=0.8, seed=1), SamplingParams(temperature=1.3, top_p=0.9, seed=2),
              SamplingParams(), SamplingParams(temperature=0.5, top_k=5, seed=1), SamplingParams(temperature=1.0, seed=9)]
    batched, alone = [Decoding(p, "cpu") for p in params], [Decoding(p, "cpu") for p in params]
    for _ in range(5):  # the generators advance as they would one row at a time
        assert chosen(logits, batched) == [d.choose(row) for d, row in zip(alone, logits)]
    greedy = [Decoding(SamplingParams(), "cpu") for _ in range(6)]
    assert chosen(logits, greedy) == logits.argmax(dim=-1).tolist()


def test_a_row_that_cannot_be_sampled_fails_alone():
    logits = torch.randn(3, 260, generator=torch.Generator().manual_seed(4))
    logits[1] = float("nan")
    params = [SamplingParams(temperature=1.0, seed=5), SamplingParams(temperature=1.0, seed=6), SamplingParams()]
    rows = chosen(logits, [Decoding(p, "cpu") for p in params])
    assert rows[1] == "failed"
    with pytest.raises(RuntimeError, match="probability tensor"):
        Decoding(params[1], "cpu").choose(logits[1])  # alone, the row fails the same way
    assert rows[0] == Decoding(params[0], "cpu").choose(logits[0]) and rows[2] == int(logits[2].argmax())
