"""Each Triton kernel against its PyTorch reference, run for real by Triton's
interpreter on CPU tensors (TRITON_INTERPRET=1, set in conftest)."""

import pytest
import torch

from patchwork.kernels import dispatch, rmsnorm
from patchwork.kernels.rmsnorm import TOLERANCE, rms_norm, rms_norm_reference, rms_norm_triton
from tests.helpers import record_launch_grids


@pytest.fixture
def launches(monkeypatch):
    """The grids the RMSNorm kernel was launched with: proof that the Triton path ran."""
    return record_launch_grids(monkeypatch, rmsnorm, "_rms_norm_kernel")


def inputs(shape, dtype, weight_dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=generator) * 3).to(dtype)
    weight = (1 + torch.randn(shape[-1], generator=generator) / 4).to(weight_dtype)
    return x, weight


@pytest.mark.parametrize("shape", [(1, 8), (5, 123), (3, 7, 64), (2, 1, 300), (3, 4096)])
@pytest.mark.parametrize("dtype, weight_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                 (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                                 (torch.float32, torch.bfloat16)])
def test_rms_norm_kernel_matches_reference(shape, dtype, weight_dtype, launches):
    x, weight = inputs(shape, dtype, weight_dtype)
    expected = rms_norm_reference(x, weight, 1e-5)
    actual = rms_norm_triton(x, weight, 1e-5)
    assert launches == [(x.numel() // shape[-1],)]  # one program per row
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    atol, rtol = max(TOLERANCE[dtype], TOLERANCE[weight_dtype])  # the coarser of the two
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_kernel_reads_strided_inputs(dtype, launches):
    wide, weight_source = inputs((6, 2 * 4096), dtype, dtype, seed=1)
    cases = {
        "rows of a wider tensor": (wide[:, 4096:], weight_source[::2]),  # strided rows and a strided weight
        "transposed leading dims": (wide.view(2, 3, 8192).transpose(0, 1)[..., :4096], weight_source[:4096]),
        "strided last dim": (wide[:, ::2], weight_source[1::2]),
    }
    for name, (x, weight) in cases.items():
        assert not x.is_contiguous()
        expected = rms_norm_reference(x, weight, 1e-6)
        actual = rms_norm_triton(x, weight, 1e-6)
        atol, rtol = TOLERANCE[dtype]
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=name)
    assert len(launches) == len(cases)


def test_dispatch_picks_the_kernel_only_for_gpu_inference(launches):
    x, weight = torch.randn(4, 16, requires_grad=True), torch.randn(16)
    assert not dispatch.use_triton(x)  # CPU: the reference, with autograd for training
    rms_norm(x, weight, 1e-6).sum().backward()
    assert x.grad is not None and launches == []
    if torch.cuda.is_available():
        on_gpu = x.detach().cuda()
        with torch.no_grad():
            assert dispatch.use_triton(on_gpu)
            torch.testing.assert_close(rms_norm(on_gpu, weight.cuda(), 1e-6).cpu(),
                                       rms_norm_reference(x.detach(), weight, 1e-6))
        assert not dispatch.use_triton(on_gpu.requires_grad_())  # forward-only kernels: training uses the reference


def test_the_mode_switch_forces_either_path(launches):
    x, weight = torch.randn(3, 40), torch.randn(40)
    before = dispatch.launches["rms_norm"]
    with dispatch.forced("triton"):  # CPU tensors, through the interpreter
        torch.testing.assert_close(rms_norm(x, weight, 1e-6), rms_norm_reference(x, weight, 1e-6))
    assert launches == [(3,)] and dispatch.launches["rms_norm"] == before + 1
    assert dispatch.mode() is dispatch.KernelMode.AUTO  # restored after the block
    with dispatch.forced("reference"):
        assert not dispatch.use_triton(x)
    with pytest.raises(ValueError):
        dispatch.configure("fastest")


def test_forcing_triton_never_drops_gradients(launches):
    x, weight = torch.randn(3, 16, requires_grad=True), torch.randn(16, requires_grad=True)
    with dispatch.forced("triton"):
        rms_norm(x, weight, 1e-6).sum().backward()  # the forward-only kernel leaves it to the reference
        with torch.no_grad():
            rms_norm(x, weight, 1e-6)
    assert x.grad is not None and weight.grad is not None and launches == [(3,)]


def test_the_environment_names_the_mode(monkeypatch):
    monkeypatch.setenv(dispatch.ENVIRONMENT_VARIABLE, "reference")
    assert dispatch.settings_from_environment().mode is dispatch.KernelMode.REFERENCE
    monkeypatch.setenv(dispatch.ENVIRONMENT_VARIABLE, "gpu")
    with pytest.raises(ValueError, match="PATCHWORK_KERNELS='gpu': expected one of auto, triton, reference"):
        dispatch.settings_from_environment()


@pytest.mark.parametrize("shape", [(1, 1, 128), (16, 1, 128), (3, 57, 256), (2, 700, 341)])
def test_the_float32_reference_is_the_cast_formula_bit_for_bit(shape):
    generator = torch.Generator().manual_seed(sum(shape))
    x, weight = torch.randn(shape, generator=generator) * 3, torch.randn(shape[-1], generator=generator)
    formula = weight * torch.nn.functional.rms_norm(x.float(), (shape[-1],), eps=1e-5).to(x.dtype)
    assert torch.equal(rms_norm_reference(x, weight, 1e-5), formula)
