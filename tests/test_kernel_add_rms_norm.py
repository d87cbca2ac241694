"""RMSNorm with a fused residual add: the Triton forward and backward against
the PyTorch reference (with autograd), run by Triton's interpreter on CPU
tensors (TRITON_INTERPRET=1, set in conftest), and the transformer block that
uses it."""

from collections import Counter

import pytest
import torch

from patchwork.engines.api import SamplingParams
from patchwork.engines.layers import TransformerConfig, TransformerStack
from patchwork.kernels import dispatch
from patchwork.kernels.add_rmsnorm import add_rms_norm, add_rms_norm_reference, add_rms_norm_triton, bench_case
from patchwork.kernels.rmsnorm import rms_norm_reference
from tests.helpers import generate_on_kernels, make_engine

# (atol, rtol). The interpreter rounds float32 to bfloat16 by truncation (a
# GPU rounds to nearest), so a bfloat16 sum may be one unit in the last place off.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
# Gradients: the reference rounds d_weight's every product to the low precision
# before summing over rows, the kernel sums in float32, hence a larger atol.
GRAD_TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (5e-3, 2e-3), torch.bfloat16: (5e-2, 2e-2)}
SHAPES = [(1, 8), (5, 123), (3, 7, 64), (2, 1, 300), (3, 4096)]
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
          (torch.float16, torch.float16)]


def inputs(shape, dtype, weight_dtype, seed=0):
    """x, residual, weight, and gradients for normed and summed."""
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=generator) * 3).to(dtype)
    residual = (torch.randn(shape, generator=generator) * 3).to(dtype)
    weight = (1 + torch.randn(shape[-1], generator=generator) / 4).to(weight_dtype)
    d_normed = torch.randn(shape, generator=generator).to(torch.promote_types(dtype, weight_dtype))
    d_summed = torch.randn(shape, generator=generator).to(dtype)
    return x, residual, weight, d_normed, d_summed


def outputs_and_gradients(function, x, residual, weight, loss, eps=1e-5):
    """(normed, summed), then the gradients of x, residual and weight for
    ``loss(normed, summed)``."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, residual, weight)]
    normed, summed = function(*leaves, eps)
    loss(normed, summed).backward()
    return (normed.detach(), summed.detach()), tuple(leaf.grad for leaf in leaves)


def assert_all_close(actual, expected, tolerance, names):
    for name, a, e in zip(names, actual, expected):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        torch.testing.assert_close(a, e, atol=tolerance[0], rtol=tolerance[1], msg=name)


def coarser(table, *dtypes):
    return max(table[dtype] for dtype in dtypes)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype, weight_dtype", DTYPES)
def test_the_forward_matches_the_reference(shape, dtype, weight_dtype):
    x, residual, weight, *_ = inputs(shape, dtype, weight_dtype)
    before = dispatch.launches["add_rms_norm"]
    actual = add_rms_norm_triton(x, residual, weight, 1e-5)
    assert dispatch.launches["add_rms_norm"] == before + 1
    expected = add_rms_norm_reference(x, residual, weight, 1e-5)
    assert_all_close(actual, expected, coarser(TOLERANCE, dtype, weight_dtype), ["normed", "summed"])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype, weight_dtype", DTYPES)
def test_the_backward_matches_autograd_through_the_reference(shape, dtype, weight_dtype):
    x, residual, weight, d_normed, d_summed = inputs(shape, dtype, weight_dtype, seed=1)

    def loss(normed, summed):  # both outputs feed the loss, as in a block (the sum is the next residual)
        return (normed * d_normed).sum() + (summed * d_summed).sum()

    before = dispatch.launches["add_rms_norm_backward"]
    actual = outputs_and_gradients(add_rms_norm_triton, x, residual, weight, loss)
    assert dispatch.launches["add_rms_norm_backward"] == before + 1
    expected = outputs_and_gradients(add_rms_norm_reference, x, residual, weight, loss)
    assert_all_close(actual[0], expected[0], coarser(TOLERANCE, dtype, weight_dtype), ["normed", "summed"])
    assert_all_close(actual[1], expected[1], coarser(GRAD_TOLERANCE, dtype, weight_dtype),
                     ["d_x", "d_residual", "d_weight"])


def test_strided_inputs_and_broadcast_gradients():
    wide, residual, weight, *_ = inputs((6, 2 * 300), torch.float32, torch.float32, seed=2)
    x, residual, weight = wide[:, 300:], residual[:, ::2], weight[::2]  # strided rows, last dim and weight
    assert not (x.is_contiguous() or residual.is_contiguous() or weight.is_contiguous())

    def loss(normed, summed):  # normed's gradient arrives broadcast (stride 0), summed's strided
        return normed.sum() + (summed[:, ::3] ** 2).sum()

    actual = outputs_and_gradients(add_rms_norm_triton, x, residual, weight, loss)
    expected = outputs_and_gradients(add_rms_norm_reference, x, residual, weight, loss)
    assert_all_close(actual[0] + actual[1], expected[0] + expected[1], TOLERANCE[torch.float32],
                     ["normed", "summed", "d_x", "d_residual", "d_weight"])


def test_mismatched_addends_are_refused():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="same shape and dtype"):
        add_rms_norm_triton(x, x.to(torch.bfloat16), torch.ones(8), 1e-5)
    with pytest.raises(ValueError, match="same shape and dtype"):
        add_rms_norm_triton(x, x[:1], torch.ones(8), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_nan_spreads_over_its_row_and_no_further(dtype):
    x, residual, weight, d_normed, d_summed = inputs((4, 50), dtype, dtype, seed=3)
    x[1, 7] = float("nan")

    def loss(normed, summed):
        return (normed * d_normed).sum() + (summed * d_summed).sum()

    (normed, summed), (d_x, d_residual, d_weight) = outputs_and_gradients(add_rms_norm_triton, x, residual,
                                                                         weight, loss)
    assert normed[1].isnan().all() and summed[1, 7].isnan() and d_x[1].isnan().all()
    assert d_weight.isnan().all()  # every column sums over the NaN row
    others = [0, 2, 3]
    assert normed[others].isfinite().all() and summed[others].isfinite().all() and d_x[others].isfinite().all()
    expected = add_rms_norm_reference(x[others], residual[others], weight, 1e-5)
    assert_all_close((normed[others], summed[others]), expected, TOLERANCE[dtype], ["normed", "summed"])


def test_the_dispatcher_runs_triton_when_forced_and_the_reference_on_cpu():
    x, residual, weight, d_normed, d_summed = inputs((3, 40), torch.float32, torch.float32, seed=4)

    def loss(normed, summed):
        return (normed * d_normed).sum() + (summed * d_summed).sum()

    before = dispatch.launches.copy()
    with dispatch.forced("triton"):
        forced = outputs_and_gradients(add_rms_norm, x, residual, weight, loss)
    assert dispatch.launches["add_rms_norm"] == before["add_rms_norm"] + 1
    assert dispatch.launches["add_rms_norm_backward"] == before["add_rms_norm_backward"] + 1
    automatic = outputs_and_gradients(add_rms_norm, x, residual, weight, loss)  # auto, CPU tensors: the reference
    assert dispatch.launches == before + Counter(add_rms_norm=1, add_rms_norm_backward=1)
    expected = outputs_and_gradients(add_rms_norm_reference, x, residual, weight, loss)
    assert all(torch.equal(a, e) for a, e in zip(automatic[0] + automatic[1], expected[0] + expected[1]))
    assert_all_close(forced[0] + forced[1], expected[0] + expected[1], TOLERANCE[torch.float32],
                     ["normed", "summed", "d_x", "d_residual", "d_weight"])
    if torch.cuda.is_available():
        assert dispatch.use_triton(x.cuda().requires_grad_(), differentiable=True)  # training on a GPU runs it


def test_the_reference_is_the_unfused_add_then_norm_bit_for_bit():
    x, residual, weight, *_ = inputs((2, 9, 96), torch.bfloat16, torch.bfloat16, seed=5)
    normed, summed = add_rms_norm_reference(x, residual, weight, 1e-6)
    assert torch.equal(summed, x + residual) and torch.equal(normed, rms_norm_reference(x + residual, weight, 1e-6))


def block_input(seed=0):
    """One transformer block (dim 48: no power of two) with non-trivial norm
    weights, an input [2, 5, 48], its rotations and causal mask."""
    torch.manual_seed(seed)
    stack = TransformerStack(TransformerConfig(dim=48, n_layers=1, n_heads=4))
    block = stack.layers[0]
    with torch.no_grad():
        for norm in (block.input_layernorm, block.post_attention_layernorm):
            norm.weight.add_(torch.randn(48) / 4)
    x = torch.randn(2, 5, 48)
    return block, x, *stack.positions(5, "cpu")


def block_gradients(forward, block, x, grad):
    """The block's output and the gradients of its input and parameters."""
    x = x.clone().requires_grad_()
    out = forward(x)
    gradients = torch.autograd.grad((out * grad).sum(), [x, *block.parameters()])
    return [out.detach(), *gradients]


def test_a_training_step_through_the_block_matches_the_reference():
    block, x, rotations, mask = block_input()
    grad = torch.randn(x.shape)

    def unfused(h):  # the block as it was before the fusion
        h = h + block.self_attn(block.input_layernorm(h), rotations, mask)
        return h + block.mlp(block.post_attention_layernorm(h))

    expected = block_gradients(unfused, block, x, grad)
    automatic = block_gradients(lambda h: block(h, rotations, mask), block, x, grad)
    assert all(torch.equal(a, e) for a, e in zip(automatic, expected))  # CPU: the same numbers, bit for bit
    # Gradients on: the forward-only RMSNorm kernel leaves the first norm to the reference.
    before = dispatch.launches.copy()
    with dispatch.forced("triton"):
        fused = block_gradients(lambda h: block(h, rotations, mask), block, x, grad)
    assert dispatch.launches == before + Counter(add_rms_norm=1, add_rms_norm_backward=1)
    names = ["output", "d_input"] + [name for name, _ in block.named_parameters()]
    assert_all_close(fused, expected, (1e-5, 1e-5), names)


def test_a_blt_engine_on_the_kernels_generates_the_reference_bytes():
    expected, actual, launches = generate_on_kernels(make_engine(), b"kernel", SamplingParams(max_new_bytes=6),
                                                     "add_rms_norm")
    assert launches > 0 and actual.text == expected.text and len(actual.text) == 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backward", [False, True])
def test_the_bench_case_agrees_with_its_baseline(backward, dtype):
    case = bench_case(1, "cpu", dtype, backward=backward)
    assert len(case.inputs) > 1 and case.bytes_moved > 0
    assert_all_close(case.triton(*case.inputs[0]), case.baseline(*case.inputs[0]), case.tolerance,
                     ["normed", "summed", "d_x", "d_residual", "d_weight"])
