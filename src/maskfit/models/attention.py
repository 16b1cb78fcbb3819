"""One attention entry point over a token stream, with three backends (DESIGN.md, reference/masked.md §6).

Every backend computes, for each image, softmax(q k^T / sqrt(D_h)) v over that image's tokens only:

- ``dense``: scaled_dot_product_attention. When every segment has the same length L (FiT's padded layout,
  or a constant kept count per image) the stream is viewed as (B, L) and attention runs per image, with
  FiT's validity mask when there is padding (real tokens attend to real tokens, padding to padding, as in
  the published code, so no row is empty). Otherwise q, k, v are scattered into (B, L_max) slots for the
  attention call only (the linear layers stay packed) with a key mask: the CPU path and the reference.
- ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` (bundled FlashAttention-2, CUDA only) on the
  packed stream with ``cu_seqlens``: no compute on padding at all.
- ``flex``: FlexAttention with a document mask, compiled; the BlockMask is built once per forward.

Measured and not kept (H200, 2026-12-02, tools/probes/attention_buckets.py, BENCHMARKS.md): SDPA on nested jagged
views of the stream (6.6x to 117x slower than ``varlen`` in forward + backward, and under torch.compile its
backward fails an AOTAutograd assertion on the nested tangent), and one dense SDPA call per run of equal lengths
(2.5x slower on ImageNet-like sizes; equal on uniform ones).

A plan is prepared once per forward (masks, block masks) and shared by every layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from maskfit.tokens import TokenLayout

ATTENTION_BACKENDS = ("dense", "varlen", "flex")


@dataclass
class AttentionPlan:
    backend: str
    layout: TokenLayout
    mask: Optional[Tensor] = None  # dense: (B, 1, L, L) boolean, True = attend
    slots: Optional[Tensor] = None  # dense, unequal lengths: (T,) slot of each token in the (B * L_max) grid
    block_mask: Any = None  # flex: BlockMask over the stream


def _same_validity(valid_q: Tensor, valid_k: Tensor) -> Tensor:
    # FiT's rule (mask_i == mask_j): real tokens see real tokens, padding sees padding.
    return valid_q[..., :, None] == valid_k[..., None, :]


def prepare_attention(layout: TokenLayout, backend: str) -> AttentionPlan:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}")
    padded_in_segments = layout.valid is not None and layout.uniform_len is not None
    if backend == "varlen" and padded_in_segments:
        # Padding inside segments (FiT's layout) needs a mask; FlashAttention-varlen has none.
        backend = "dense"
    if backend == "dense":
        if layout.uniform_len is not None:
            if layout.valid is None:
                return AttentionPlan("dense", layout)
            valid = layout.valid.view(layout.num_images, layout.uniform_len)  # (B, L)
            return AttentionPlan("dense", layout, mask=_same_validity(valid, valid)[:, None])  # (B, 1, L, L)
        B, L = layout.num_images, layout.max_seqlen
        device = layout.seq_id.device
        start = layout.cu_seqlens.long()[layout.seq_id]  # (T,)
        slots = layout.seq_id * L + torch.arange(layout.num_tokens, device=device) - start  # (T,)
        exists = torch.zeros(B * L, dtype=torch.bool, device=device).index_fill(0, slots, True).view(B, L)
        mask = exists[:, None, :].expand(B, L, L)  # (B, L_q, L_k): keys of the same image
        if layout.valid is not None:
            valid = torch.zeros(B * L, dtype=torch.bool, device=device)
            valid[slots] = layout.valid
            mask = mask & _same_validity(valid.view(B, L), valid.view(B, L))
        # Empty slots query everything: never a fully masked row (NaN), and their outputs are discarded.
        mask = mask | ~exists[:, :, None]
        return AttentionPlan("dense", layout, mask=mask[:, None], slots=slots)  # (B, 1, L, L)
    if backend == "varlen":
        return AttentionPlan("varlen", layout)
    return AttentionPlan("flex", layout, block_mask=_document_block_mask(layout))


def attention(q: Tensor, k: Tensor, v: Tensor, plan: AttentionPlan) -> Tensor:
    """q, k, v: (T, H, D_h) -> (T, H, D_h), attention within each image."""
    lay = plan.layout
    T, H, Dh = q.shape
    if plan.backend == "dense":
        if lay.uniform_len is not None:
            B, L = lay.num_images, lay.uniform_len
            qb, kb, vb = (x.view(B, L, H, Dh).transpose(1, 2) for x in (q, k, v))  # (B, H, L, D_h)
            out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=plan.mask)  # (B, H, L, D_h)
            return out.transpose(1, 2).reshape(T, H, Dh)
        B, L = lay.num_images, lay.max_seqlen

        def to_slots(x: Tensor) -> Tensor:  # (T, H, D_h) -> (B, H, L, D_h)
            return x.new_zeros(B * L, H, Dh).index_copy(0, plan.slots, x).view(B, L, H, Dh).transpose(1, 2)

        out = F.scaled_dot_product_attention(to_slots(q), to_slots(k), to_slots(v), attn_mask=plan.mask)
        return out.transpose(1, 2).reshape(B * L, H, Dh)[plan.slots]  # (T, H, D_h)
    if plan.backend == "varlen":
        from torch.nn.attention.varlen import varlen_attn

        cu = lay.cu_seqlens.to(torch.int32)
        return varlen_attn(q, k, v, cu, cu, lay.max_seqlen, lay.max_seqlen)  # (T, H, D_h)
    qs, ks, vs = (x.transpose(0, 1)[None] for x in (q, k, v))  # (1, H, T, D_h)
    out = _compiled_flex()(qs, ks, vs, block_mask=plan.block_mask)  # (1, H, T, D_h)
    return out[0].transpose(0, 1)


# ----------------------------------------------------------------------------------------------------
# FlexAttention helpers (compiled once per process)
# ----------------------------------------------------------------------------------------------------
_FLEX = None
_BLOCK_MASK_BUILDER = None


def _compiled_flex():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        # Uncompiled FlexAttention materialises full score matrices; compiled it is a fused kernel.
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def _document_block_mask(layout: TokenLayout):
    from torch.nn.attention.flex_attention import create_block_mask

    global _BLOCK_MASK_BUILDER
    if _BLOCK_MASK_BUILDER is None:
        _BLOCK_MASK_BUILDER = torch.compile(create_block_mask) if layout.seq_id.is_cuda else create_block_mask
    doc = layout.seq_id
    valid = layout.valid

    if valid is None:

        def document(b, h, q_idx, kv_idx):
            return doc[q_idx] == doc[kv_idx]

    else:

        def document(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (valid[q_idx] == valid[kv_idx])

    T = layout.num_tokens
    return _BLOCK_MASK_BUILDER(document, B=None, H=None, Q_LEN=T, KV_LEN=T, device=doc.device)
