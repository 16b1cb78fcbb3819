"""SwiGLU's activation and its hand-written Triton backward (maskfit.models.swiglu_backward) against the plain
expression and autograd's derivative of it. The kernel runs on the CPU under Triton's interpreter where triton is
installed (skipped otherwise); tests/test_gpu.py runs it compiled on CUDA."""
import importlib

import pytest
import torch
import torch.nn.functional as F

import maskfit.models.swiglu_backward as swiglu_backward
from maskfit.models.transformer import SwiGLU


def test_the_activation_is_silu_of_the_first_half_times_the_second():
    y = torch.randn(5, 6)
    expected = F.silu(y[:, :3]) * y[:, 3:]
    assert torch.equal(swiglu_backward.swiglu(y), expected)
    layer = SwiGLU(4, 3)
    x = torch.randn(5, 4)
    assert torch.equal(layer(x), layer.fc2(F.silu(layer.fc1(x)[:, :3]) * layer.fc1(x)[:, 3:]))


def test_the_triton_choice_changes_nothing_off_cuda_or_eager(monkeypatch):
    monkeypatch.setattr(swiglu_backward, "BACKWARD", "triton")
    y = torch.randn(7, 8, requires_grad=True)
    out = swiglu_backward.swiglu(y)
    assert out.grad_fn.name() == "MulBackward0"  # the plain expression, not the custom Function


def test_a_bad_choice_names_the_value_and_the_choices(monkeypatch):
    monkeypatch.setenv("MASKFIT_SWIGLU_BACKWARD", "fused")
    with pytest.raises(ValueError, match=r"MASKFIT_SWIGLU_BACKWARD='fused'; choose one of \('autograd', 'triton'\)"):
        swiglu_backward.backward_choice()
    monkeypatch.delenv("MASKFIT_SWIGLU_BACKWARD")
    assert swiglu_backward.backward_choice() == "autograd"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA tests/test_gpu.py runs the kernel itself")
def test_the_kernel_equals_autograds_derivative_under_the_interpreter(monkeypatch):
    import sys

    if "triton" in sys.modules:
        pytest.skip("triton is already imported without its interpreter in this process")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read when triton is first imported and when a kernel is decorated
    pytest.importorskip("triton")
    import maskfit.models.swiglu_triton as swiglu_triton

    importlib.reload(swiglu_triton)  # decorate the kernel again, now for the interpreter
    kernel = swiglu_backward.make_grad_kernel()
    g = torch.Generator().manual_seed(0)
    for T, h in ((37, 200), (16, 128), (1, 3)):  # odd sizes: the tile masks at both edges
        y = (3 * torch.randn(T, 2 * h, generator=g)).requires_grad_()
        dh = torch.randn(T, h, generator=g)
        (expected,) = torch.autograd.grad(F.silu(y[:, :h]) * y[:, h:], y, dh)
        got = swiglu_backward.launch_grad_kernel(kernel, y.detach(), dh)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_the_backward_without_its_registered_op_says_how_to_register_it(monkeypatch):
    monkeypatch.setattr(swiglu_backward, "_OP", None)
    y = torch.randn(4, 6, requires_grad=True)
    out = swiglu_backward._TritonBackward.apply(y)
    with pytest.raises(RuntimeError, match=r"not registered: call maskfit.models.swiglu_backward.grad_op\(\)"):
        out.sum().backward()
