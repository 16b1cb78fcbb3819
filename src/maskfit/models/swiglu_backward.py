"""SwiGLU's activation, silu(gate) * value, with an optional hand-written Triton backward for compiled CUDA runs.

The H200 profile of FiT-B/2-dit (BENCHMARKS.md, issue 14 item 3) has Inductor's SwiGLU backward kernel moving its
bytes at 2.4 TB/s where the forward reaches 4.4: it writes the gradient of fc1's (T, 2h) output one element at a
time, so the gate half and the value half each re-read the inputs the other reads. Our kernel
(:mod:`maskfit.models.swiglu_triton`) reads the gate, the value and the incoming gradient once per element pair
and writes both halves, in fp32 arithmetic.
Measured on the H200 (2026-12-02, `tools/probes/swiglu_backward.py`, 12 compiled FFN sublayers forward +
backward on 61 696 tokens, bf16): 47.22 -> 44.03 ms at hidden 2048, 65.73 -> 61.89 ms at 3072.

Not yet the default: the whole training step has not been timed with it. ``MASKFIT_SWIGLU_BACKWARD=triton`` in
the environment turns it on for compiled CUDA steps (``maskfit bench`` / ``train`` with ``train.compile``); eager
runs and the CPU always use autograd's derivative of the plain expression, which the kernel is tested against.

The derivative (s = sigmoid(g), h = silu(g) * v = g s v):
    dh/dg = v s (1 + g (1 - s)),    dh/dv = g s.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

BACKWARDS = ("autograd", "triton")


def backward_choice() -> str:
    """The backward the environment asks for (MASKFIT_SWIGLU_BACKWARD), checked."""
    choice = os.environ.get("MASKFIT_SWIGLU_BACKWARD", "autograd")
    if choice not in BACKWARDS:
        raise ValueError(f"MASKFIT_SWIGLU_BACKWARD={choice!r}; choose one of {BACKWARDS} (or leave it unset)")
    return choice


BACKWARD = backward_choice()  # read once, at import: torch.compile guards on this global, not on the environment


def swiglu(y: Tensor) -> Tensor:
    """(T, 2h) fc1 output, gate half first -> (T, h) silu(gate) * value."""
    if BACKWARD == "triton" and y.is_cuda and y.requires_grad and torch.compiler.is_compiling():
        return _TritonBackward.apply(y)
    gate, value = y.chunk(2, dim=-1)  # (T, h) each
    return F.silu(gate) * value


def launch_grad_kernel(kernel, y: Tensor, dh: Tensor) -> Tensor:
    """(T, 2h) fc1 output and (T, h) gradient of the activation -> (T, 2h) gradient of the fc1 output, by the
    kernel (:func:`make_grad_kernel`'s, or it wrapped by ``wrap_triton`` inside the custom op)."""
    import triton

    T, h = dh.shape
    dy = torch.empty_like(y)
    kernel[(triton.cdiv(T, 16), triton.cdiv(h, 128))](y, dh, dy, T, h, y.stride(0), dh.stride(0), dy.stride(0),
                                                      BT=16, BH=128)
    return dy


_OP = None  # the registered triton_op (triton is imported only when it is registered)


def grad_op():
    """The kernel as the custom op ``maskfit::swiglu_grad``, registered on the first call. Registered at import under
    MASKFIT_SWIGLU_BACKWARD=triton on a CUDA machine; whoever switches :data:`BACKWARD` later calls this first, so
    that no traced step registers it (a registration inside torch.compile's tracing would break the graph)."""
    global _OP
    if _OP is None:
        try:
            from torch.library import triton_op, wrap_triton

            kernel = make_grad_kernel()
        except ImportError as err:
            raise RuntimeError(f"SwiGLU's Triton backward needs triton ({err}); install it or unset "
                               "MASKFIT_SWIGLU_BACKWARD") from err

        @triton_op("maskfit::swiglu_grad", mutates_args=())
        def swiglu_grad(y: Tensor, dh: Tensor) -> Tensor:
            return launch_grad_kernel(wrap_triton(kernel), y, dh)

        _OP = swiglu_grad
    return _OP


def make_grad_kernel():
    """The Triton kernel (imports triton, from its own module: Triton reads a kernel's globals, not a closure's)."""
    from maskfit.models import swiglu_triton

    return swiglu_triton.swiglu_grad_kernel


class _TritonBackward(torch.autograd.Function):
    """silu(gate) * value forward as PyTorch writes it (Inductor fuses it with its neighbours); the Triton kernel
    for the backward (a triton_op: torch.compile keeps the call and launches the kernel as written)."""

    @staticmethod
    def forward(ctx, y: Tensor) -> Tensor:  # (T, 2h) -> (T, h)
        ctx.save_for_backward(y)
        gate, value = y.chunk(2, dim=-1)
        return F.silu(gate) * value

    @staticmethod
    def backward(ctx, dh: Tensor) -> Tensor:  # (T, h) -> (T, 2h)
        (y,) = ctx.saved_tensors
        if _OP is None:
            raise RuntimeError("maskfit::swiglu_grad is not registered: call maskfit.models.swiglu_backward.grad_op() "
                               "before the step is traced (it is, at import, under MASKFIT_SWIGLU_BACKWARD=triton)")
        return _OP(y, dh.contiguous())


if BACKWARD == "triton" and torch.cuda.is_available():
    grad_op()  # before any step is traced
