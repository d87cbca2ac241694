import torch

from patchwork.kernels.hash_embedding import (
    PRIMES,
    hash_table_ids,
    last_hash_table_ids,
    last_position_coefficients,
    ngram_hash_ids,
    rolling_hash,
)


def int64_wrap(value: int) -> int:
    """Python's unbounded integer reduced to a two's-complement int64."""
    value %= 2**64
    return value - 2**64 if value >= 2**63 else value


def hand_hash(window: list[int], prime: int) -> int:
    total = 0
    for j, symbol in enumerate(window):
        total = int64_wrap(total + int64_wrap(symbol * int64_wrap(prime**j)))
    return total


def test_trigram_without_overflow_matches_the_polynomial():
    # 5 + 6 p + 7 p^2 fits in int64 for p = 1e9 + 7.
    p = PRIMES[0]
    assert rolling_hash(torch.tensor([[5, 6, 7]]), p).item() == 5 + 6 * p + 7 * p * p
    assert rolling_hash(torch.tensor([[5, 6, 7]]), p).item() == 7000000104000000390


def test_long_ngram_wraps_around_like_int64():
    window = [259, 104, 105, 33, 200, 7, 1, 0]
    for prime in PRIMES[:3]:
        expected = hand_hash(window, prime)
        assert rolling_hash(torch.tensor([window]), prime).item() == expected
    # Computed with unbounded integers reduced mod 2^64; p^4 alone exceeds 2^63.
    assert rolling_hash(torch.tensor([window[:5]]), PRIMES[0]).item() == 7949086820570894835


def test_bucket_ids_are_non_negative_remainders_of_left_padded_windows():
    tokens = torch.tensor([[10, 250, 33, 97, 98, 99, 4]])
    n, prime, buckets = 4, PRIMES[1], 500_002
    ids = ngram_hash_ids(tokens, n, prime, buckets)
    padded = [0] * (n - 1) + tokens[0].tolist()
    for t in range(tokens.shape[1]):
        expected = hand_hash(padded[t : t + n], prime) % buckets  # Python % is non-negative here
        assert ids[0, t].item() == expected
    assert (ids >= 0).all() and (ids < buckets).all()
    assert any(hand_hash(padded[t : t + n], prime) < 0 for t in range(tokens.shape[1]))


def test_tables_are_offset_per_function_and_size():
    tokens = torch.randint(0, 260, (2, 9))
    ids = hash_table_ids(tokens, [3, 5], n_functions=2, buckets=97)
    assert ids.shape == (2, 9, 4)
    expected = [ngram_hash_ids(tokens, n, PRIMES[f], 97) + table * 97
                for table, (f, n) in enumerate([(0, 3), (0, 5), (1, 3), (1, 5)])]
    assert torch.equal(ids, torch.stack(expected, dim=-1))


def test_last_position_ids_equal_the_full_computation():
    torch.manual_seed(0)
    tokens = torch.randint(0, 260, (3, 20))
    sizes, functions, buckets = [3, 4, 5, 6, 7, 8], 2, 500_002
    full = hash_table_ids(tokens, sizes, functions, buckets)
    for end in (1, 2, 5, 8, 20):
        window = tokens[:, max(0, end - 8) : end]
        window = torch.cat([window.new_zeros(3, 8 - window.shape[1]), window], dim=1)
        coefficients = last_position_coefficients(sizes, functions, "cpu")
        assert torch.equal(last_hash_table_ids(window, coefficients, buckets), full[:, end - 1])
