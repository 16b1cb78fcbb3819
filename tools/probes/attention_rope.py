"""Probe: RoPE's cost inside the attention layer, and one joint form of it (issue 14 item 3).

    PYTHONPATH=src python3 tools/probes/attention_rope.py [IMAGES]

The profile of 2026-12-01 gave the kernels named after RoPE 5.5 ms of a 92.8 ms FiT-B/2-dit step (their backward
fused with the q/k split of the qkv output: 347 us a layer), while RoPE alone on q and k takes 0.8 ms for all
12 layers (tools/probes/rope_variants.py). This times 12 compiled attention layers (768 wide, 12 heads, varlen,
bf16 autocast), forward and backward, on an ImageNet-like packed stream, three ways:

- ``model``: ``maskfit.models.transformer.Attention`` as it is (q and k rotated one after the other);
- ``joint_qk``: q and k rotated together as one (T, 2, H, D_h) slab of the qkv output, so the backward writes
  both gradients into the qkv gradient in one kernel;
- ``no_rope``: no rotation at all (the floor RoPE's in-layer cost is measured against; not a model);
- ``triton_bwd`` (added 2026-12-02, fifth session): the model's forward, and a backward whose one Triton kernel
  turns the gradients of the rotated q and k and of v into the qkv output's gradient, each input read once
  (``qkv_rope_grad_kernel``): the profile's backward kernel for this (``fused_add_mul_neg_select_select_backward_
  stack``, 347 us a layer) moves its bytes at 1.6 TB/s, where the forward's moves them at 3.5.

``joint_qk`` and ``triton_bwd`` are checked against ``model`` first (``triton_bwd``'s gradients too). On a machine
without CUDA only the checks run (dense attention, fp32; ``triton_bwd`` under Triton's interpreter when triton is
installed). Prints one line per form: ms for 12 layers' forward + backward (median of 20).
"""
import sys

import torch
import torch.nn.functional as F

from maskfit.models.attention import attention, prepare_attention
from maskfit.models.rope import RopeTables, apply_rope, rope_tables
from maskfit.models.transformer import Attention
from maskfit.tokens import pack

from cuda_timing import check_then_time, import_triton, kernel_checked  # tools/probes/, the script's own folder

triton, tl = import_triton()  # None, None without triton: the other forms are still checked and timed


class JointAttention(Attention):
    def forward(self, x, rope: RopeTables, plan):
        T, D = x.shape
        qkv = self.qkv(x).view(T, 3, self.num_heads, D // self.num_heads)  # (T, 3, H, D_h)
        both = RopeTables(rope.cos[:, None], rope.sin[:, None])  # (T, 1, D_h): broadcast over q/k and heads
        qk = apply_rope(qkv[:, :2], both).to(qkv.dtype)  # (T, 2, H, D_h)
        out = attention(qk[:, 0], qk[:, 1], qkv[:, 2], plan)  # (T, H, D_h)
        return self.proj(out.reshape(T, D))


if triton is not None:

    @triton.jit
    def qkv_rope_grad_kernel(dq_ptr, dk_ptr, dv_ptr, cos_ptr, sin_ptr, out_ptr, T, HD, DH,
                             BT: tl.constexpr, BP: tl.constexpr):
        """out (T, 3, H*D_h): slot 0 and 1 the gradients of q and k before y = x cos + rotate_pairs(x) sin, from
        those of the rotated q and k (dx_2i = dy_2i c_2i + dy_2i+1 s_2i+1, dx_2i+1 = dy_2i+1 c_2i+1 - dy_2i s_2i);
        slot 2 the gradient of v as it is. Program axis 1 picks the slot; each handles BT tokens x BP pairs."""
        slot = tl.program_id(1)
        rows = tl.program_id(0) * BT + tl.arange(0, BT)[:, None]
        pairs = tl.program_id(2) * BP + tl.arange(0, BP)[None, :]
        mask = (rows < T) & (pairs < HD // 2)
        rows = rows.to(tl.int64)
        even, odd = 2 * pairs, 2 * pairs + 1
        out = out_ptr + rows * 3 * HD + slot * HD
        if slot == 2:
            tl.store(out + even, tl.load(dv_ptr + rows * HD + even, mask=mask, other=0.0), mask=mask)
            tl.store(out + odd, tl.load(dv_ptr + rows * HD + odd, mask=mask, other=0.0), mask=mask)
        elif slot == 0:
            _unrotate_pairs(dq_ptr, cos_ptr, sin_ptr, out, rows, even, odd, mask, HD, DH)
        else:
            _unrotate_pairs(dk_ptr, cos_ptr, sin_ptr, out, rows, even, odd, mask, HD, DH)

    @triton.jit
    def _unrotate_pairs(src, cos_ptr, sin_ptr, out, rows, even, odd, mask, HD, DH):
        a = tl.load(src + rows * HD + even, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(src + rows * HD + odd, mask=mask, other=0.0).to(tl.float32)
        d_even, d_odd = even % DH, odd % DH
        c0 = tl.load(cos_ptr + rows * DH + d_even, mask=mask, other=0.0)
        c1 = tl.load(cos_ptr + rows * DH + d_odd, mask=mask, other=0.0)
        s0 = tl.load(sin_ptr + rows * DH + d_even, mask=mask, other=0.0)
        s1 = tl.load(sin_ptr + rows * DH + d_odd, mask=mask, other=0.0)
        tl.store(out + even, (a * c0 + b * s1).to(out.dtype.element_ty), mask=mask)
        tl.store(out + odd, (b * c1 - a * s0).to(out.dtype.element_ty), mask=mask)


def qkv_rope_grad(dq, dk, dv, cos, sin):
    """(T, H, D_h) x 3 gradients, (T, D_h) fp32 tables -> (T, 3, H, D_h) gradient of the qkv output."""
    T, H, Dh = dq.shape
    out = torch.empty(T, 3, H, Dh, dtype=dv.dtype, device=dv.device)
    grid = (triton.cdiv(T, 16), 3, triton.cdiv(H * Dh // 2, 128))
    qkv_rope_grad_kernel[grid](dq, dk, dv, cos, sin, out, T, H * Dh, Dh, BT=16, BP=128)
    return out


if triton is not None and torch.cuda.is_available():
    from torch.library import triton_op, wrap_triton

    @triton_op("maskfit_probe::qkv_rope_grad", mutates_args=())
    def _qkv_rope_grad_cuda(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor,
                            sin: torch.Tensor) -> torch.Tensor:
        T, H, Dh = dq.shape
        out = torch.empty(T, 3, H, Dh, dtype=dv.dtype, device=dv.device)
        grid = (triton.cdiv(T, 16), 3, triton.cdiv(H * Dh // 2, 128))
        wrap_triton(qkv_rope_grad_kernel)[grid](dq, dk, dv, cos, sin, out, T, H * Dh, Dh, BT=16, BP=128)
        return out

    _qkv_rope_grad_op = _qkv_rope_grad_cuda
else:
    _qkv_rope_grad_op = qkv_rope_grad


class _QKVRope(torch.autograd.Function):
    """(T, 3, H, D_h) qkv output -> rotated q, rotated k, v (each (T, H, D_h), contiguous), as the model computes
    them; the backward is one kernel (qkv_rope_grad)."""

    @staticmethod
    def forward(ctx, qkv, cos, sin):
        q, k, v = qkv.unbind(1)
        tables = RopeTables(cos, sin)
        ctx.save_for_backward(cos, sin)
        return apply_rope(q, tables).to(v.dtype), apply_rope(k, tables).to(v.dtype), v.contiguous()

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        return _qkv_rope_grad_op(dq.contiguous(), dk.contiguous(), dv.contiguous(), cos.float().contiguous(),
                                 sin.float().contiguous()), None, None


class TritonBackwardAttention(Attention):
    def forward(self, x, rope: RopeTables, plan):
        T, D = x.shape
        qkv = self.qkv(x).view(T, 3, self.num_heads, D // self.num_heads)  # (T, 3, H, D_h)
        q, k, v = _QKVRope.apply(qkv, rope.cos, rope.sin)
        return self.proj(attention(q, k, v, plan).reshape(T, D))


def check_kernel() -> None:
    """The kernel against autograd through the model's rotation, fp32, odd sizes (masks at the edges)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # a compiled Triton kernel reads device memory only
    g = torch.Generator().manual_seed(0)
    T, H, Dh = 37, 3, 16
    qkv = torch.randn(T, 3, H, Dh, generator=g).to(dev).requires_grad_()
    angle = torch.randn(T, Dh, generator=g).to(dev)
    tables = RopeTables(angle.cos(), angle.sin())
    q, k, v = qkv.unbind(1)
    outs = (apply_rope(q, tables), apply_rope(k, tables), v)
    grads = [torch.randn(T, H, Dh, generator=g).to(dev) for _ in range(3)]
    (expected,) = torch.autograd.grad(outs, qkv, grads)
    torch.testing.assert_close(qkv_rope_grad(*grads, tables.cos, tables.sin), expected, atol=1e-5, rtol=1e-5)
    print(f"triton_bwd kernel equals autograd through the rotation (fp32, {T} x 3 x {H} x {Dh})", flush=True)


class NoRopeAttention(Attention):
    def forward(self, x, rope, plan):
        T, D = x.shape
        q, k, v = self.qkv(x).view(T, 3, self.num_heads, D // self.num_heads).unbind(1)
        return self.proj(attention(q, k, v, plan).reshape(T, D))


def stream(num_images: int, device, backend: str):
    g = torch.Generator().manual_seed(0)
    grids = [(int(h), int(w)) for h, w in torch.randint(12, 17, (num_images, 2), generator=g)]  # 144-256 tokens
    batch = pack([torch.zeros(h * w, 1) for h, w in grids], grids, torch.zeros(num_images, dtype=torch.long))
    layout = batch.layout.to(device)
    tables = rope_tables(layout.pos, layout.seq_id, layout.grid, 64, None, 10000.0)
    return layout, tables, prepare_attention(layout, backend)


def main():
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    images = int(sys.argv[1]) if len(sys.argv) > 1 else (256 if cuda else 6)
    global triton
    triton = kernel_checked(triton, check_kernel)
    layout, tables, plan = stream(images, dev, "varlen" if cuda else "dense")
    T = layout.num_tokens
    torch.manual_seed(0)
    forms = {"model": Attention, "joint_qk": JointAttention, "no_rope": NoRopeAttention}
    if triton is not None:
        forms["triton_bwd"] = TritonBackwardAttention
    layers = {name: torch.nn.ModuleList(cls(768, 12, False) for _ in range(12)).to(dev) for name, cls in forms.items()}
    for name in forms:
        layers[name].load_state_dict(layers["model"].state_dict())
    x0 = torch.randn(T, 768, device=dev)

    def run(name, x):
        for layer in layers[name]:
            x = x + layer(F.layer_norm(x, x.shape[-1:]), tables, plan)
        return x

    check_then_time(layers, run, x0, [n for n in forms if n in ("joint_qk", "triton_bwd")],
                    f"12 attention layers on {T} tokens")


if __name__ == "__main__":
    main()
