"""Per-image rows repeated on each image's tokens, with a backward that sums each image's segment.

Every block gathers its per-image adaLN modulation (B, 6w) onto the stream's tokens: ``rows[seq_id]``
(T, 6w). Autograd's backward of that gather is a scatter-add of T rows into B rows, which Inductor
writes as atomic adds fused into the kernel that forms the products (on an H200, FiT-B/2-dit at batch
256: 8.9 ms of a 96 ms step, the largest kernel after the matmuls and attention).

A stream's images are contiguous (image b owns ``cu_seqlens[b]:cu_seqlens[b+1]``, ``maskfit.tokens``),
so the same gradient is a reduction over each image's segment: read the segment's rows as a (B, L, C)
window (L = the layout's ``max_seqlen``, rows past a segment's end masked to 0) and sum over L, with no
atomics. The blocks repeat each of their six modulation chunks separately: then each window reads a
product Inductor computes on the fly (e.g. grad * layer_norm(x)); repeating the whole (B, 6w) at once made
it write the (T, 6w) gradient out first, which measured slower than the atomics (step 100.9 ms against
96.3). With chunks the reductions take 2.1 ms/step instead of 8.9 and the step 92.8 ms (BENCHMARKS.md). The window pays B * L lanes for T tokens, so streams whose longest segment is far
longer than the rest (an uncapped padding segment under token batching) keep the scatter-add
(``SEGMENT_SUM_MAX_LEN``), and so do eager runs (``WINDOW_IN_EAGER``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from maskfit.tokens import TokenLayout

# The window is for compiled models, where Inductor fuses it; eager PyTorch would materialise the (B, L, C)
# window, so eager runs (the study's training, sampling) keep autograd's index_add. Tests switch it on.
WINDOW_IN_EAGER = False

# Longest segment for which the windowed reduction is used (FiT's budget is 256 tokens; 1 024 covers the
# high-resolution fine-tune's 1 024-token grids). Longer segments keep autograd's scatter-add.
SEGMENT_SUM_MAX_LEN = 1024


def segment_window_sum(values: Tensor, starts: Tensor, lengths: Tensor, max_len: int) -> Tensor:
    """(T, C) rows of contiguous segments -> (B, C) sum of each segment, as a masked (B, L, C) reduction.

    starts, lengths: (B,) int64 first row and row count of each segment; max_len: a bound on lengths.
    """
    T = values.shape[0]
    offsets = torch.arange(max_len, device=values.device)  # (L,)
    rows = (starts[:, None] + offsets[None, :]).clamp(max=max(T - 1, 0))  # (B, L): in range for the load
    inside = offsets[None, :] < lengths[:, None]  # (B, L)
    window = torch.where(inside[..., None], values[rows], values.new_zeros(()))  # (B, L, C)
    return window.sum(dim=1, dtype=torch.float32).to(values.dtype)  # (B, C)


class _RepeatPerSegment(torch.autograd.Function):
    """rows[seq_id] forward; segment_window_sum backward (equal to autograd's scatter-add, no atomics)."""

    @staticmethod
    def forward(ctx, rows: Tensor, seq_id: Tensor, starts: Tensor, lengths: Tensor, max_len: int) -> Tensor:
        ctx.save_for_backward(starts, lengths)
        ctx.max_len = max_len
        return rows[seq_id]  # (T, C)

    @staticmethod
    def backward(ctx, grad: Tensor):
        starts, lengths = ctx.saved_tensors
        return segment_window_sum(grad, starts, lengths, ctx.max_len), None, None, None, None


class TokensOfImages:
    """Repeats per-image tensors (B, C) on a stream's tokens (T, C); one per stream, shared by all blocks."""

    def __init__(self, layout: TokenLayout):
        self.seq_id = layout.seq_id
        self.max_len = layout.max_seqlen
        self.windowed = 0 < layout.max_seqlen <= SEGMENT_SUM_MAX_LEN
        if self.windowed:
            self.starts, self.lengths = layout.cu_seqlens[:-1].long(), layout.seqlens()  # (B,) each

    def __call__(self, rows: Tensor) -> Tensor:
        """(B, C) -> (T, C): row seq_id[t] for every token t."""
        if self.windowed and rows.requires_grad and (WINDOW_IN_EAGER or torch.compiler.is_compiling()):
            return _RepeatPerSegment.apply(rows, self.seq_id, self.starts, self.lengths, self.max_len)
        return rows[self.seq_id]
