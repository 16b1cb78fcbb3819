"""The Triton kernel of :mod:`maskfit.models.swiglu_backward` (imported only where it is used: triton is optional)."""
import triton
import triton.language as tl


@triton.jit
def swiglu_grad_kernel(y_ptr, dh_ptr, dy_ptr, T, H, stride_y, stride_dh, stride_dy, BT: tl.constexpr, BH: tl.constexpr):
    """dy[:, :H] = dh v s (1 + g (1 - s)), dy[:, H:] = dh g s, with (g, v) = (y[:, :H], y[:, H:]), s = sigmoid(g).

    One (BT, BH) tile of tokens x hidden units: gate, value and dh read once, both gradient halves written."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)[:, None]
    cols = tl.program_id(1) * BH + tl.arange(0, BH)[None, :]
    inside = (rows < T) & (cols < H)
    rows = rows.to(tl.int64)  # T x 2H elements may pass 2**31
    g = tl.load(y_ptr + rows * stride_y + cols, mask=inside, other=0.0).to(tl.float32)
    v = tl.load(y_ptr + rows * stride_y + H + cols, mask=inside, other=0.0).to(tl.float32)
    d = tl.load(dh_ptr + rows * stride_dh + cols, mask=inside, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(dy_ptr + rows * stride_dy + cols, (d * v * s * (1.0 + g * (1.0 - s))).to(dy_ptr.dtype.element_ty),
             mask=inside)
    tl.store(dy_ptr + rows * stride_dy + H + cols, (d * g * s).to(dy_ptr.dtype.element_ty), mask=inside)
