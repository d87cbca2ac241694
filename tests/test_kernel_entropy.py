"""The entropy/patch-boundary kernel against its PyTorch reference, run for
real by Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set in
conftest), and the BLT engine running it."""

import pytest
import torch

from patchwork.engines.api import SamplingParams
from patchwork.kernels import dispatch, entropy
from patchwork.kernels.entropy import (
    MAX_BLOCK,
    TOLERANCE,
    entropy_boundary,
    entropy_boundary_reference,
    entropy_boundary_triton,
)
from tests.helpers import PATCHINGS, generate_on_kernels, make_engine, record_launch_grids

NAN, INF = float("nan"), float("inf")
# The interpreter runs the kernel in numpy, which warns of the -inf and NaN arithmetic
# the masked rows' discarded branches do, and of the NaN a row without a distribution must give.
numpy_warnings = pytest.mark.filterwarnings("ignore:invalid value encountered", "ignore:divide by zero encountered")


@pytest.fixture
def grids(monkeypatch):
    """The grids the kernel was launched with: proof that the Triton path ran."""
    return record_launch_grids(monkeypatch, entropy, "_entropy_boundary_kernel")


def logits_like(shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    """Logits whose spread varies by row, so the entropies range from peaked to nearly flat."""
    generator = torch.Generator().manual_seed(seed)
    spread = 0.3 + 4 * torch.rand(*shape[:-1], 1, generator=generator)
    return (torch.randn(shape, generator=generator) * spread).to(dtype)


def assert_matches(logits, threshold, before=None):
    """Entropies within the dtype's tolerance (NaN where the reference has NaN), and
    the same decisions except where the quantity tested is within that tolerance of the threshold."""
    expected, expected_exceeds = entropy_boundary_reference(logits, threshold, before)
    actual, exceeds = entropy_boundary_triton(logits, threshold, before)
    assert actual.shape == exceeds.shape == logits.shape[:-1]
    assert actual.dtype == torch.float32 and exceeds.dtype == torch.bool
    atol, rtol = TOLERANCE[logits.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, equal_nan=True)
    rise = expected if before is None else expected - before
    tie = (rise - threshold).abs() <= atol + rtol * expected.abs()
    assert torch.equal(exceeds[~tie], expected_exceeds[~tie])
    return actual, exceeds


@pytest.mark.parametrize("shape", [(1, 260), (37, 260), (13, 300), (2, 5, 260), (3, 1, 300), (2, 50257)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_kernel_matches_the_reference_in_entropy_mode(shape, dtype, grids):
    logits = logits_like(shape, dtype)
    threshold = float(entropy_boundary_reference(logits, 0.0)[0].median())  # mixed decisions, one a tie
    _, exceeds = assert_matches(logits, threshold)
    assert grids == [(logits.numel() // shape[-1],)]  # one program per row
    if exceeds.numel() > 2:
        assert exceeds.any() and not exceeds.all()


@pytest.mark.parametrize("shape", [(1, 260), (4, 9, 260), (11, 300), (3, 50257)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_matches_the_reference_in_monotonic_mode(shape, dtype, grids):
    logits = logits_like(shape, dtype, seed=1)
    entropies = entropy_boundary_reference(logits, 0.0)[0]
    generator = torch.Generator().manual_seed(2)
    before = entropies + torch.randn(entropies.shape, generator=generator)  # each row's entropy one position earlier
    threshold = float((entropies - before).median())
    _, exceeds = assert_matches(logits, threshold, before)
    if exceeds.numel() > 2:
        assert exceeds.any() and not exceeds.all()
    strided = torch.stack([before, torch.full_like(before, NAN)], dim=-1)[..., 0]  # read in place, stride 2
    scalar = entropies.flatten()[:1].squeeze()  # one entropy before for every row, broadcast
    for other in (strided, scalar):
        assert_matches(logits, threshold, other)
    assert len(grids) == 3


def test_an_entropy_equal_to_the_threshold_starts_no_patch():
    """The rule is strict (H > threshold): a threshold equal to the kernel's own
    float32 entropy (or rise) decides False there, as the reference does on its own."""
    logits = logits_like((2, 300), seed=8)
    kernel_entropy = entropy_boundary_triton(logits, 0.0)[0]
    tie = float(kernel_entropy[0])
    assert entropy_boundary_triton(logits, tie)[1].tolist() == [False, bool(kernel_entropy[1] > tie)]
    before = kernel_entropy - 1.0  # each rise is 1.0 up to rounding; tie the first row's exactly
    rise = float(kernel_entropy[0] - before[0])
    assert not entropy_boundary_triton(logits, rise, before)[1][0]
    reference_entropy = entropy_boundary_reference(logits, 0.0)[0]
    assert not entropy_boundary_reference(logits, float(reference_entropy[0]))[1][0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_reads_strided_rows(dtype, grids):
    wide = logits_like((6, 2 * 300), dtype, seed=3)
    cases = {
        "rows of a wider tensor": wide[:, 300:],
        "transposed leading dims": wide.view(2, 3, 600).transpose(0, 1)[..., :300],
        "strided last dim": wide[:, ::2],
    }
    for name, logits in cases.items():
        assert not logits.is_contiguous(), name
        assert_matches(logits, 3.0)
    assert len(grids) == len(cases)


@numpy_warnings
def test_masked_symbols_add_nothing():
    """-inf logits (masked symbols) give no NaN, in blocks of the vocabulary
    that are wholly masked too; a row with one symbol left is certain (0 nats)."""
    width = 2 * MAX_BLOCK + 300  # three blocks
    logits = logits_like((5, width), seed=4)
    logits[0, : MAX_BLOCK + 100] = -INF  # the first block and more: the running max starts at -inf
    logits[1, MAX_BLOCK - 7 :] = -INF  # the last blocks
    logits[2, ::3] = -INF  # scattered
    logits[3, :] = -INF
    logits[3, MAX_BLOCK + 5] = 2.0  # one symbol left
    expected = entropy_boundary_reference(logits, 1.0)[0]
    actual, exceeds = assert_matches(logits, 1.0)
    assert torch.isfinite(actual).all() and torch.isfinite(expected).all()
    assert actual[3] == 0 and exceeds[:3].all() and not exceeds[3]
    # Masked symbols appended to a row leave its entropy as it was.
    narrow = logits_like((1, 300), seed=5)
    padded = torch.cat([narrow, torch.full((1, 500), -INF)], dim=1)
    torch.testing.assert_close(entropy_boundary_triton(padded, 1.0)[0], entropy_boundary_reference(narrow, 1.0)[0])


@numpy_warnings
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_never_passes_silently(dtype):
    """A row with a NaN or +inf logit, or wholly masked, has no distribution:
    NaN entropy and no patch start, as in the reference; a NaN entropy before
    decides nothing either."""
    logits = logits_like((5, 300), seed=6)
    logits[0, 17] = NAN
    logits[1, 299] = NAN  # in the last, partly padded block
    logits[2, 3] = INF
    logits[3, :] = -INF
    logits = logits.to(dtype)
    for before in (None, torch.full((5,), -10.0)):
        expected, expected_exceeds = entropy_boundary_reference(logits, -1.0, before)
        actual, exceeds = assert_matches(logits, -1.0, before)
        assert expected[:4].isnan().all() and not expected_exceeds[:4].any()  # what the kernel must match
        assert actual[:4].isnan().all() and not exceeds[:4].any() and exceeds[4]
    before = torch.tensor([0.0, 0.0, 0.0, 0.0, NAN])
    assert not assert_matches(logits, -1.0, before)[1][4]


def test_empty_input_launches_nothing(grids):
    actual, exceeds = entropy_boundary_triton(torch.randn(0, 3, 260), 1.0)
    assert actual.shape == exceeds.shape == (0, 3) and grids == []


def test_dispatch_runs_the_kernel_where_it_decides(grids):
    logits, before = logits_like((3, 260), seed=7), torch.full((3,), 4.0)
    launches = dispatch.launches["entropy_boundary"]
    with dispatch.forced("auto"):  # CPU tensors take the reference
        for mode_before in (None, before):
            expected = entropy_boundary_reference(logits, 2.0, mode_before)
            actual = entropy_boundary(logits, 2.0, mode_before)
            assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1])
    assert grids == [] and dispatch.launches["entropy_boundary"] == launches
    with dispatch.forced("triton"):  # CPU tensors, through the interpreter
        actual = entropy_boundary(logits, 2.0, before)
    assert grids == [(3,)] and dispatch.launches["entropy_boundary"] == launches + 1
    expected = entropy_boundary_reference(logits, 2.0, before)
    torch.testing.assert_close(actual[0], expected[0], atol=1e-5, rtol=1e-5)
    if torch.cuda.is_available():
        with dispatch.forced("auto"), torch.no_grad():  # a forward-only kernel: not while recording gradients
            on_gpu = entropy_boundary(logits.cuda(), 2.0)
        assert len(grids) == 2
        torch.testing.assert_close(on_gpu[0].cpu(), expected[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("patching", ["entropy", "monotonic"])
def test_the_engine_with_the_kernel_generates_the_reference_bytes(patching):
    expected, actual, launches = generate_on_kernels(make_engine(PATCHINGS[patching]), b"patch me",
                                                     SamplingParams(max_new_bytes=8), "entropy_boundary")
    assert launches > 1  # the prompt's chunk and each run-ahead
    assert actual.text == expected.text
    assert actual.details.patch_lengths == expected.details.patch_lengths
