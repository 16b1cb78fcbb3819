"""Probe: the SwiGLU backward's cost in the compiled step, and two other forms of it (issue 14 item 3).

    PYTHONPATH=src python3 tools/probes/swiglu_backward.py [IMAGES] [FFN_HIDDEN]

The 2026-12-01 profile of FiT-B/2-dit (bench_results/h200_2026-12-01_item3.log) gives the SwiGLU backward, one
Inductor kernel ``fused_cat_mul_silu_silu_backward``, 534 us a layer (6.4 ms of a 92.8 ms step): 2.4 TB/s on the
bytes it must move (read the gate and value halves of fc1's output and the incoming gradient, write the two
halves of fc1's output gradient), where the forward's kernel moves its bytes at 4.4 TB/s. Its output is the
concatenation of the two halves, computed one output element at a time, so each half re-reads what the other read.
This times 12 compiled FFN sublayers (LayerNorm, SwiGLU 768 -> 2 x FFN_HIDDEN -> 768, residual), forward and
backward in bf16 on an ImageNet-like stream, three ways:

- ``model``: ``maskfit.models.transformer.SwiGLU`` as it is;
- ``split``: the gate and value halves as two matmuls on the halves of the same weight (no concatenation in the
  backward: the two halves' gradients are separate tensors, each feeding its own matmul);
- ``triton_bwd``: the model's forward, and a backward whose one Triton kernel reads each input once and writes
  both halves of the gradient (the model's own since 2026-12-02: ``maskfit.models.swiglu_backward``).

Each form is first checked against the model's gradients. Without CUDA only the checks run (``triton_bwd`` under
Triton's interpreter when triton is installed). Prints one line per form: ms for 12 sublayers' forward + backward
(median of 20).
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tools/probes/: the probes' shared helpers
from cuda_timing import check_then_time, import_triton, kernel_checked  # noqa: E402

from maskfit.models.transformer import SwiGLU  # noqa: E402

triton, tl = import_triton()  # None, None without triton: the other forms are still checked and timed


def swiglu_grad(y: torch.Tensor, dh: torch.Tensor) -> torch.Tensor:
    """(T, 2H) fc1 output and (T, H) gradient of silu(gate) * value -> (T, 2H) gradient of the fc1 output, by the
    model's kernel (maskfit.models.swiglu_triton) launched directly."""
    from maskfit.models.swiglu_backward import launch_grad_kernel, make_grad_kernel

    return launch_grad_kernel(make_grad_kernel(), y, dh)


class SplitSwiGLU(SwiGLU):
    def forward(self, x):
        h = self.hidden
        w, b = self.fc1.weight, self.fc1.bias
        gate, value = F.linear(x, w[:h], b[:h]), F.linear(x, w[h:], b[h:])  # (T, h) each
        return self.fc2(F.silu(gate) * value)


class TritonSwiGLU(SwiGLU):
    def forward(self, x):  # the model's form under MASKFIT_SWIGLU_BACKWARD=triton, whether compiled or not
        from maskfit.models.swiglu_backward import _TritonBackward

        return self.fc2(_TritonBackward.apply(self.fc1(x)))


if triton is not None:
    from maskfit.models.swiglu_backward import grad_op

    grad_op()  # the custom op registered before any form is compiled


def check_kernel() -> None:
    """The kernel against autograd's derivative of silu(g) * v, fp32, odd sizes (masks at both edges)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # a compiled Triton kernel reads device memory only
    g = torch.Generator().manual_seed(0)
    y = (3 * torch.randn(37, 2 * 200, generator=g)).to(dev).requires_grad_()
    dh = torch.randn(37, 200, generator=g).to(dev)
    gate, value = y.chunk(2, dim=-1)
    (expected,) = torch.autograd.grad(F.silu(gate) * value, y, dh)
    torch.testing.assert_close(swiglu_grad(y.detach(), dh), expected, atol=1e-5, rtol=1e-5)
    print("triton_bwd kernel equals autograd's derivative (fp32, 37 x 200)", flush=True)


def main():
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    images = int(sys.argv[1]) if len(sys.argv) > 1 else (256 if cuda else 4)
    hidden = int(sys.argv[2]) if len(sys.argv) > 2 else 2048  # FiT-B/2-dit; FiT-B/2 is 3072
    global triton
    triton = kernel_checked(triton, check_kernel)
    T = images * 241  # the mean tokens per image of the ImageNet-like stream (61 762 for 256 images)
    torch.manual_seed(0)
    forms = {"model": SwiGLU, "split": SplitSwiGLU}
    if triton is not None:
        forms["triton_bwd"] = TritonSwiGLU
    layers = {name: torch.nn.ModuleList(cls(768, hidden) for _ in range(12)).to(dev) for name, cls in forms.items()}
    for name in forms:
        layers[name].load_state_dict(layers["model"].state_dict())
    x0 = torch.randn(T, 768, device=dev)

    def run(name, x):
        for layer in layers[name]:
            x = x + layer(F.layer_norm(x, x.shape[-1:]))
        return x

    check_then_time(layers, run, x0, [n for n in forms if n != "model"],
                    f"12 SwiGLU sublayers, hidden {hidden}, on {T} tokens")


if __name__ == "__main__":
    main()
