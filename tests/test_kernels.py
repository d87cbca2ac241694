"""Each Triton kernel against its PyTorch reference (Triton's interpreter on CPU)."""

import pytest
import torch

from kernels import rms_norm, rms_norm_reference, rms_norm_triton

TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}


@pytest.mark.parametrize("shape", [(1, 8), (5, 123), (3, 7, 64), (2, 1, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_kernel_matches_reference(shape, dtype):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 3).to(dtype)
    weight = torch.randn(shape[-1])
    expected = rms_norm_reference(x, weight, 1e-5)
    actual = rms_norm_triton(x, weight, 1e-5)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def test_dispatch_uses_the_reference_on_cpu():
    x, weight = torch.randn(4, 16, requires_grad=True), torch.randn(16)
    assert torch.equal(rms_norm(x, weight, 1e-6), rms_norm_reference(x, weight, 1e-6))
    rms_norm(x, weight, 1e-6).sum().backward()  # training on CPU keeps autograd
    assert x.grad is not None
