"""The hash n-gram embedding kernel against its PyTorch reference, run by
Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set in conftest)."""

import pytest
import torch

from patchwork.engines.api import SamplingParams
from patchwork.engines.blt.config import VOCAB_SIZE
from patchwork.kernels import dispatch
from patchwork.kernels.hash_embedding import (
    TOLERANCE,
    bench_case,
    hash_embedding,
    hash_embedding_reference,
    hash_embedding_triton,
    hash_table_ids,
    last_hash_embedding,
    last_hash_embedding_reference,
)
from tests.helpers import generate_on_kernels, make_engine

LARGEST = VOCAB_SIZE - 1


def symbols(kind: str, shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randint(0, VOCAB_SIZE, shape, generator=generator)
    if kind == "extremes":  # 0 and the largest symbol, mixed
        return torch.randint(0, 2, shape, generator=generator) * LARGEST
    if kind == "largest":  # every product of a long window wraps
        return torch.full(shape, LARGEST)
    assert kind == "int64"  # any int64, the int64 limits included
    tokens = torch.randint(-(2**63), 2**63 - 1, shape, generator=generator)
    tokens.view(-1)[0], tokens.view(-1)[-1] = 2**63 - 1, -(2**63)
    return tokens


def id_revealing_table(n_tables: int, buckets: int) -> torch.Tensor:
    """Row ``table * buckets + b`` holds b in column ``table`` and 0 elsewhere,
    so the kernel's output is each table's bucket id, exactly in float32."""
    weight = torch.zeros(n_tables * buckets, n_tables)
    rows = torch.arange(n_tables * buckets)
    weight[rows, rows // buckets] = (rows % buckets).float()
    return weight


@pytest.mark.parametrize("kind", ["random", "extremes", "largest", "int64"])
@pytest.mark.parametrize("batch, length, ngram_sizes, n_functions, buckets, history", [
    (1, 1, [3, 4, 5, 6, 7, 8], 1, 500_002, 0),  # one symbol: every window is mostly padding
    (3, 37, [1, 2, 3, 8, 12], 2, 97, 0),  # 37 positions: a partial block
    (2, 5, [3, 8], 3, 4093, 0),  # n larger than the sequence
    (2, 23, [3, 4, 5, 6, 7, 8], 2, 10_007, 7),  # a chunk after 7 symbols of history
])
def test_the_kernel_hashes_every_id_bit_exactly(kind, batch, length, ngram_sizes, n_functions, buckets, history):
    tokens = symbols(kind, (batch, length), seed=length)
    n_tables = n_functions * len(ngram_sizes)
    expected = hash_table_ids(tokens, ngram_sizes, n_functions, buckets)[:, history:] - torch.arange(n_tables) * buckets
    ids = hash_embedding_triton(tokens, id_revealing_table(n_tables, buckets), ngram_sizes, n_functions, buckets,
                                history=history)
    assert ids.shape == (batch, length - history, n_tables)
    assert torch.equal(ids.long(), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch, length, history, dim", [(1, 1, 0, 64), (2, 37, 0, 40), (3, 21, 7, 160)])
@pytest.mark.parametrize("with_bytes", [False, True])
def test_the_kernel_matches_the_reference(dtype, batch, length, history, dim, with_bytes):
    ngram_sizes, n_functions, buckets = [3, 4, 5, 6, 7, 8], 1, 1021
    generator = torch.Generator().manual_seed(dim)
    tokens = torch.randint(0, VOCAB_SIZE, (batch, length), generator=generator)
    weight = torch.randn(len(ngram_sizes) * buckets, dim, generator=generator).to(dtype)
    byte_weight = torch.randn(VOCAB_SIZE, dim, generator=generator).to(dtype) if with_bytes else None
    expected = hash_embedding_reference(tokens, weight, ngram_sizes, n_functions, buckets, byte_weight, history)
    actual = hash_embedding_triton(tokens, weight, ngram_sizes, n_functions, buckets, byte_weight, history)
    assert actual.shape == expected.shape == (batch, length - history, dim) and actual.dtype == dtype
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_one_table_is_gathered_exactly(dtype):
    tokens = symbols("random", (2, 19))
    weight = torch.randn(257, 48, generator=torch.Generator().manual_seed(1)).to(dtype)
    assert torch.equal(hash_embedding_triton(tokens, weight, [5], 1, 257),
                       hash_embedding_reference(tokens, weight, [5], 1, 257))


def test_the_kernel_reads_strided_tokens_and_tables():
    generator = torch.Generator().manual_seed(2)
    wide_tokens = torch.randint(0, VOCAB_SIZE, (9, 2 * 4), generator=generator)
    wide_weight = torch.randn(2 * 3 * 131, 2 * 24, generator=generator)
    tokens, weight, byte_weight = wide_tokens.t()[::2], wide_weight[::2, 24:], wide_weight[:VOCAB_SIZE, ::2]
    assert not (tokens.is_contiguous() or weight.is_contiguous() or byte_weight.is_contiguous())
    expected = hash_embedding_reference(tokens, weight, [2, 5, 9], 1, 131, byte_weight)
    torch.testing.assert_close(hash_embedding_triton(tokens, weight, [2, 5, 9], 1, 131, byte_weight), expected,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_decode_step_is_the_last_position_of_the_sequence(dtype):
    ngram_sizes, n_functions, buckets = [3, 4, 5, 6, 7, 8], 2, 509
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB_SIZE, (3, 12), generator=generator)
    tokens[0, -8:] = LARGEST
    weight = torch.randn(2 * 6 * buckets, 24, generator=generator).to(dtype)
    byte_weight = torch.randn(VOCAB_SIZE, 24, generator=generator).to(dtype)
    atol, rtol = TOLERANCE[dtype]
    for end in (1, 3, 8, 12):  # fewer symbols than the context: left-padded with 0
        recent = tokens[:, max(0, end - 8):end]
        recent = torch.cat([recent.new_zeros(3, 8 - recent.shape[1]), recent], dim=1)
        full = hash_embedding_reference(tokens[:, :end], weight, ngram_sizes, n_functions, buckets, byte_weight)
        last = last_hash_embedding_reference(recent, weight, ngram_sizes, n_functions, buckets, byte_weight)
        assert torch.equal(last, full[:, -1:])
        with dispatch.forced("triton"):
            step = last_hash_embedding(recent, weight, ngram_sizes, n_functions, buckets, byte_weight)
        assert step.shape == (3, 1, 24)
        torch.testing.assert_close(step, last, atol=atol, rtol=rtol)


def test_dispatch_runs_the_kernel_only_when_triton_is_chosen():
    tokens, weight, byte_weight = symbols("random", (2, 9)), torch.randn(3 * 61, 16), torch.randn(VOCAB_SIZE, 16)
    args = (weight, [2, 3, 4], 1, 61, byte_weight)
    before = dispatch.launches["hash_embedding"]
    assert not dispatch.use_triton(weight)  # auto, CPU tables: the reference
    assert torch.equal(hash_embedding(tokens, *args), hash_embedding_reference(tokens, *args))
    assert torch.equal(last_hash_embedding(tokens[:, -4:], *args), last_hash_embedding_reference(tokens[:, -4:], *args))
    assert dispatch.launches["hash_embedding"] == before
    with dispatch.forced("triton"):
        torch.testing.assert_close(hash_embedding(tokens, *args), hash_embedding_reference(tokens, *args))
        last_hash_embedding(tokens[:, -4:], *args)
    assert dispatch.launches["hash_embedding"] == before + 2
    if torch.cuda.is_available():
        with torch.no_grad():
            on_gpu = hash_embedding(tokens.cuda(), weight.cuda(), *args[1:4], byte_weight.cuda())
        assert dispatch.launches["hash_embedding"] == before + 3
        torch.testing.assert_close(on_gpu.cpu(), hash_embedding_reference(tokens, *args))


def test_an_engine_on_the_kernel_generates_the_reference_bytes():
    expected, actual, launches = generate_on_kernels(make_engine(), b"kernels!", SamplingParams(max_new_bytes=8),
                                                     "hash_embedding")
    assert launches > 1  # the prompt's chunk and the decode steps
    assert actual.text == expected.text and len(actual.text) == 8
    assert actual.details.patch_lengths == expected.details.patch_lengths


def test_the_bench_case_agrees_with_its_baseline():
    case = bench_case(1, "cpu", torch.float32)
    assert len(case.inputs) > 1 and case.bytes_moved > 0
    torch.testing.assert_close(case.triton(*case.inputs[0]), case.baseline(*case.inputs[0]),
                               atol=case.tolerance[0], rtol=case.tolerance[1])
