"""The grouped linear (Mixture-of-Transformers projections): the Triton kernel
against the loop of matmuls, run for real by Triton's interpreter on CPU
tensors (TRITON_INTERPRET=1, set in conftest), and the MoT model that runs it."""

import pytest
import torch

from patchwork.engines.layers import TransformerConfig
from patchwork.engines.mot.config import Untied
from patchwork.engines.mot.model import MotLM
from patchwork.kernels import dispatch
from patchwork.kernels.grouped_linear import bench_case, grouped_linear, grouped_linear_reference, grouped_linear_triton

# One rounding of the output either way (the kernel accumulates in float32, as the reference does).
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
# Rows per group; the interpreter's tiles are 32 rows, so most groups end inside one.
LAYOUTS = {
    "uneven": [37, 12, 21],
    "first empty": [0, 40, 9],
    "middle empty": [25, 0, 30],
    "last empty": [33, 1, 0],
    "all in one group": [0, 45, 0],
    "a single row": [0, 0, 1],
}


def inputs(sizes, n_in, n_out, dtype, seed=0):
    """x [N, n_in], weight [G, n_out, n_in] (outputs of about unit size), offsets [G + 1]."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), n_in, generator=generator).to(dtype)
    weight = (torch.randn(len(sizes), n_out, n_in, generator=generator) / n_in**0.5).to(dtype)
    return x, weight, torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])


def launches_of(call) -> int:
    before = dispatch.launches["grouped_linear"]
    call()
    return dispatch.launches["grouped_linear"] - before


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_kernel_matches_the_loop_of_matmuls(layout, dtype):
    x, weight, offsets = inputs(LAYOUTS[layout], 48, 72, dtype)  # K and Nout not powers of two
    expected = grouped_linear_reference(x, weight, offsets)
    actual = []
    assert launches_of(lambda: actual.append(grouped_linear_triton(x, weight, offsets))) == 1  # every group at once
    assert actual[0].shape == expected.shape == (x.shape[0], 72) and actual[0].dtype == dtype
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual[0], expected, atol=atol, rtol=rtol)


def test_a_projection_of_model_size_and_strided_operands():
    """A q/k/v projection of a 64-wide model with grouped-query attention
    (K 64, Nout 128: several tiles each way), then the same numbers read
    through strides: rows of a wider x, and each weight the transpose of an
    [in, out] matrix."""
    x, weight, offsets = inputs([50, 20, 30], 64, 128, torch.bfloat16, seed=1)
    atol, rtol = TOLERANCE[torch.bfloat16]
    expected = grouped_linear_reference(x, weight, offsets)
    torch.testing.assert_close(grouped_linear_triton(x, weight, offsets), expected, atol=atol, rtol=rtol)
    wide = torch.cat([x, torch.full_like(x, float("nan"))], dim=1)[:, :64]
    transposed = weight.transpose(1, 2).contiguous().transpose(1, 2)
    assert not wide.is_contiguous() and not transposed.is_contiguous()
    torch.testing.assert_close(grouped_linear_triton(wide, transposed, offsets), expected, atol=atol, rtol=rtol)


def test_nan_in_a_row_stays_in_that_row():
    x, weight, offsets = inputs([10, 0, 23], 48, 72, torch.float32)
    x[3, 5] = x[20, 0] = float("nan")
    actual = grouped_linear_triton(x, weight, offsets)
    poisoned = torch.zeros(33, dtype=torch.bool)
    poisoned[[3, 20]] = True
    assert actual[poisoned].isnan().all() and not actual[~poisoned].isnan().any()
    torch.testing.assert_close(actual, grouped_linear_reference(x, weight, offsets), atol=1e-5, rtol=1e-5,
                               equal_nan=True)


def test_auto_mode_on_cpu_runs_the_reference_and_forced_triton_the_kernel():
    x, weight, offsets = inputs([9, 0, 14], 48, 40, torch.float32)
    matrices = list(weight)  # unstacked weights: the reference reads them in place, the kernel stacks them
    expected = grouped_linear_reference(x, weight, offsets)
    assert not dispatch.use_triton(x)
    assert launches_of(lambda: torch.testing.assert_close(grouped_linear(x, matrices, offsets), expected,
                                                          atol=0, rtol=0)) == 0
    with dispatch.forced("triton"):
        for stacked_or_not in (weight, matrices):
            assert launches_of(lambda: torch.testing.assert_close(grouped_linear(x, stacked_or_not, offsets),
                                                                  expected, atol=1e-5, rtol=1e-5)) == 1


def test_calls_that_record_gradients_differentiate_the_reference():
    x, weight, offsets = inputs([5, 7, 0], 48, 40, torch.float32)
    x.requires_grad_()
    matrices = [w.clone().requires_grad_() for w in weight]
    launches = launches_of(lambda: grouped_linear(x, matrices, offsets).sum().backward())
    assert launches == 0
    torch.testing.assert_close(matrices[0].grad, x[:5].detach().sum(0).expand(40, 48))
    assert matrices[2].grad is None  # the empty group's weight is never read


CONFIG = TransformerConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2)
VOCAB, BOUNDARIES = 60, [20, 40]  # text, image, audio


@pytest.mark.parametrize("untied, grouped_per_layer", [(Untied.ALL, 4), (Untied.FFN, 2)])
def test_the_mot_model_runs_one_launch_per_untied_projection_and_matches_the_reference(untied, grouped_per_layer):
    torch.manual_seed(3)
    model = MotLM(CONFIG, VOCAB, BOUNDARIES, untied).eval()
    tokens = torch.randint(0, 40, (2, 9))  # text and image codes, no sound: the audio group is empty
    with torch.inference_mode():
        unfused = model(tokens)
        model.fuse()
        reference = model(tokens)
        with dispatch.forced("triton"):
            logits = []
            launches = launches_of(lambda: logits.append(model(tokens)))
    assert torch.equal(reference, unfused)  # stacking the weights changes no number
    assert launches == grouped_per_layer * CONFIG.n_layers  # tied projections stay one plain matmul
    torch.testing.assert_close(logits[0], reference, atol=1e-4, rtol=1e-4)


def test_fusing_keeps_the_checkpoint_layout_and_one_copy_of_the_weights():
    model = MotLM(CONFIG, VOCAB, BOUNDARIES, Untied.ALL)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    model.fuse()
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[name], before[name]) for name in before)
    block = model.stack.layers[0]
    stacked = block.stacked["qkv"]  # [modalities, (H + 2 Hkv) * hd, dim]
    assert stacked.shape == (3, 64, 32)
    attention = block.self_attn[1]
    assert attention.k_proj.weight.untyped_storage().data_ptr() == stacked.untyped_storage().data_ptr()
    with torch.no_grad():
        attention.k_proj.weight.fill_(0.5)  # loading weights writes through to the stack
    assert float(stacked[1, 32:48].min()) == float(stacked[1, 32:48].max()) == 0.5
    assert torch.equal(block.stacked["down"][2], block.mlp[2].down_proj.weight)


def test_the_bench_case_checks_against_the_loop_and_a_dense_matmul():
    case = bench_case(1, "cpu", torch.bfloat16)
    x, weight, offsets = case.inputs[0]
    assert 0 in offsets.diff().tolist() and len(case.inputs) >= 2  # a group left empty
    assert case.flops == 2 * x.shape[0] * x.shape[1] * weight.shape[1]
    assert case.dense(x, weight, offsets).shape == case.baseline(x, weight, offsets).shape
    atol, rtol = case.tolerance
    torch.testing.assert_close(case.triton(x, weight, offsets), case.baseline(x, weight, offsets), atol=atol, rtol=rtol)
