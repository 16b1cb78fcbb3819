"""The token batch: one structure for every path (padded FiT, packed, masked-and-packed, sampling).

An image's latent (C, H, W) becomes a grid of h x w = (H/p) x (W/p) patch tokens of p*p*C values each,
in FiT's channel order (c, p1, p2). A batch of B images is a *stream* of T tokens:

- packed layout: the tokens of image b occupy ``cu_seqlens[b]:cu_seqlens[b+1]``; no padding anywhere.
- padded layout (FiT): every image occupies N slots, the first n_b real and the rest padding
  (``valid`` is False there). This is FiT's (B, N) tensor flattened, so the model's linear layers pay
  for padding exactly as in the published code.

``pos`` holds each token's (row, col) in its own image grid: RoPE reads it, never the stream index, so
a subset of tokens (masked training) keeps its true positions.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor


@dataclass
class TokenLayout:
    """Where each token of a stream sits: its image, its grid position, and the segment offsets."""

    pos: Tensor  # (T, 2) int64: (row, col) of each token in its own image grid
    seq_id: Tensor  # (T,) int64: image index of each token
    cu_seqlens: Tensor  # (B+1,) int32: offsets of each image's segment in the stream
    grid: Tensor  # (B, 2) int64: full (h, w) token grid of each image
    max_seqlen: int  # upper bound of a segment's length (a Python int, so kernels need no host sync)
    valid: Optional[Tensor] = None  # (T,) bool; None means every token is real (no padding)
    uniform_len: Optional[int] = None  # every segment has exactly this length: attention can run on (B, L)
    keep: Optional[Tensor] = None  # (T,) int64 raster index (row * w + col) of each token in its full grid

    @property
    def num_images(self) -> int:
        return self.grid.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.pos.shape[0]

    def to(self, device, non_blocking: bool = True) -> "TokenLayout":
        moved = {
            f.name: (v.to(device, non_blocking=non_blocking) if isinstance(v, Tensor) else v)
            for f in dataclasses.fields(self)
            for v in [getattr(self, f.name)]
        }
        return TokenLayout(**moved)

    def pin_memory(self) -> "TokenLayout":
        """Page-locked copies, so the host-to-device copy can overlap compute (DataLoader pin_memory)."""
        return dataclasses.replace(
            self, **{f.name: getattr(self, f.name).pin_memory() for f in dataclasses.fields(self)
                     if isinstance(getattr(self, f.name), Tensor)}
        )

    def seqlens(self) -> Tensor:
        """(B,) int64 number of stream slots of each image (padding included in the padded layout)."""
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()

    def repeat(self, times: int) -> "TokenLayout":
        """The same layout ``times`` times in a row (classifier-free guidance runs cond and uncond together)."""
        T, B = self.num_tokens, self.num_images
        seq_id = torch.cat([self.seq_id + i * B for i in range(times)])
        offsets = [self.cu_seqlens[:1]] + [self.cu_seqlens[1:] + i * T for i in range(times)]
        return TokenLayout(
            pos=self.pos.repeat(times, 1),
            seq_id=seq_id,
            cu_seqlens=torch.cat(offsets),
            grid=self.grid.repeat(times, 1),
            max_seqlen=self.max_seqlen,
            valid=None if self.valid is None else self.valid.repeat(times),
            uniform_len=self.uniform_len,
            keep=None if self.keep is None else self.keep.repeat(times),
        )


@dataclass
class MaskedView:
    """The kept subset of a full token stream (masked training).

    index: (T_k,) positions of the kept tokens in the full stream, grouped by image in image order;
    layout: the kept tokens' own layout (their true grid positions, cu_seqlens of the kept counts).
    """

    index: Tensor
    layout: TokenLayout

    def to(self, device, non_blocking: bool = True) -> "MaskedView":
        return MaskedView(self.index.to(device, non_blocking=non_blocking), self.layout.to(device, non_blocking))

    def pin_memory(self) -> "MaskedView":
        return MaskedView(self.index.pin_memory(), self.layout.pin_memory())


@dataclass
class TokenBatch:
    """Patch tokens of a batch of images plus their layout and labels (and the kept subset when masked)."""

    tokens: Tensor  # (T, p*p*C) patchified latents of the full grids
    y: Tensor  # (B,) int64 class labels
    layout: TokenLayout
    mask: Optional[MaskedView] = None  # masked training: which tokens the backbone sees

    def to(self, device, non_blocking: bool = True) -> "TokenBatch":
        return TokenBatch(
            tokens=self.tokens.to(device, non_blocking=non_blocking),
            y=self.y.to(device, non_blocking=non_blocking),
            layout=self.layout.to(device, non_blocking=non_blocking),
            mask=None if self.mask is None else self.mask.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> "TokenBatch":
        return TokenBatch(
            self.tokens.pin_memory(), self.y.pin_memory(), self.layout.pin_memory(),
            None if self.mask is None else self.mask.pin_memory(),
        )


# ----------------------------------------------------------------------------------------------------
# Patchify
# ----------------------------------------------------------------------------------------------------


def check_patchable(height: int, width: int, patch_size: int) -> None:
    if height <= 0 or width <= 0:
        raise ValueError(f"latent size {height}x{width} is empty; an image needs at least one patch")
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"latent size {height}x{width} is not divisible by patch size {patch_size}; "
            f"resize the image so each latent side is a multiple of {patch_size}"
        )


def patchify(latent: Tensor, patch_size: int) -> Tensor:
    """(C, H, W) -> (h*w, C*p*p) in raster order (row-major), values in FiT's (c, p1, p2) order."""
    C, H, W = latent.shape
    check_patchable(H, W, patch_size)
    p = patch_size
    h, w = H // p, W // p
    x = latent.reshape(C, h, p, w, p)  # (C, h, p1, w, p2)
    x = x.permute(1, 3, 0, 2, 4)  # (h, w, C, p1, p2)
    return x.reshape(h * w, C * p * p)


def unpatchify(tokens: Tensor, grid_hw: tuple[int, int], patch_size: int) -> Tensor:
    """(h*w, C*p*p) -> (C, H, W); the inverse of :func:`patchify`."""
    h, w = grid_hw
    p = patch_size
    n, d = tokens.shape
    if n != h * w or d % (p * p):
        raise ValueError(f"cannot unpatchify {tuple(tokens.shape)} tokens to a {h}x{w} grid with patch {p}")
    C = d // (p * p)
    x = tokens.reshape(h, w, C, p, p).permute(2, 0, 3, 1, 4)  # (C, h, p1, w, p2)
    return x.reshape(C, h * p, w * p)


# ----------------------------------------------------------------------------------------------------
# Building streams
# ----------------------------------------------------------------------------------------------------


def _segment_offsets(lengths: Tensor) -> Tensor:
    """(B,) segment lengths -> (B+1,) int32 offsets (cu_seqlens)."""
    cu = torch.zeros(lengths.shape[0] + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    return cu


def pack(
    tokens: Sequence[Tensor],
    grids: Sequence[tuple[int, int]],
    labels: Tensor,
    keep: Optional[Sequence[Tensor]] = None,
    max_seqlen: Optional[int] = None,
) -> TokenBatch:
    """Concatenate images into one stream with no padding.

    tokens[b]: (n_b, D) tokens of image b (all h*w of them, or the kept subset given by keep[b]).
    keep[b]: (n_b,) raster indices of those tokens in the full h x w grid (None: all, in raster order).
    max_seqlen: a static upper bound of n_b (defaults to the largest n_b, read on the CPU).

    Runs once per training step in the loader workers: the per-token tensors are built with one
    vectorised op each over the whole stream, not a Python loop over images.
    """
    if len(tokens) != len(grids) or len(tokens) != labels.shape[0]:
        raise ValueError(f"pack got {len(tokens)} token sets, {len(grids)} grids and {labels.shape[0]} labels")
    grid = torch.tensor([list(g) for g in grids], dtype=torch.long).reshape(-1, 2)  # (B, 2)
    lengths = torch.tensor([x.shape[0] for x in tokens], dtype=torch.long)  # (B,)
    if keep is None:
        bad = (lengths != grid[:, 0] * grid[:, 1]).nonzero()
        if bad.numel():
            b = int(bad[0])
            h, w = grids[b]
            raise ValueError(f"image {b} has {tokens[b].shape[0]} tokens but its grid is {h}x{w}; pass keep=")
        # Raster index of every token: its offset inside its own segment.
        starts = torch.cumsum(lengths, 0) - lengths  # (B,)
        seq_id = torch.repeat_interleave(torch.arange(len(tokens)), lengths)  # (T,)
        idx = torch.arange(int(lengths.sum())) - starts[seq_id]  # (T,)
    else:
        keep_lengths = torch.tensor([k.shape[0] for k in keep], dtype=torch.long)
        bad = (keep_lengths != lengths).nonzero()
        if bad.numel():
            b = int(bad[0])
            raise ValueError(f"image {b}: {tokens[b].shape[0]} tokens but {keep[b].shape[0]} keep indices")
        seq_id = torch.repeat_interleave(torch.arange(len(tokens)), lengths)  # (T,)
        idx = torch.cat([k.long().cpu() for k in keep]) if len(keep) else torch.zeros(0, dtype=torch.long)
    w_tok = grid[seq_id, 1]  # (T,) grid width of each token's image
    lengths_list = lengths.tolist()
    uniform = lengths_list[0] if lengths_list and all(n == lengths_list[0] for n in lengths_list) else None
    layout = TokenLayout(
        pos=torch.stack([idx // w_tok, idx % w_tok], dim=1),
        seq_id=seq_id,
        cu_seqlens=_segment_offsets(lengths),
        grid=grid,
        max_seqlen=int(max_seqlen if max_seqlen is not None else max(lengths_list)),
        uniform_len=uniform,
        keep=None if keep is None else idx,
    )
    return TokenBatch(tokens=torch.cat(list(tokens)), y=labels.long(), layout=layout)


def masked_view(layout: TokenLayout, keep: Sequence[Tensor], max_seqlen: Optional[int] = None) -> MaskedView:
    """The kept subset of a stream of complete grids (packed or padded, tokens in raster order).

    keep[b]: raster indices (row * w + col) of the tokens of image b that the backbone sees.
    Vectorised over the stream (one concatenation, one range check): it runs every masked step.
    """
    if len(keep) != layout.num_images:
        raise ValueError(f"masked_view got keep indices for {len(keep)} images, the stream has {layout.num_images}")
    starts = layout.cu_seqlens[:-1].long().cpu()  # (B,)
    grid = layout.grid.cpu()
    counts = torch.tensor([int(k.numel()) for k in keep], dtype=torch.long)  # (B,)
    raster = torch.cat([k.long().cpu().reshape(-1) for k in keep]) if len(keep) else torch.zeros(0, dtype=torch.long)
    owner = torch.repeat_interleave(torch.arange(len(keep)), counts)  # (T_k,) image of each kept token
    size = grid[:, 0] * grid[:, 1]  # (B,)
    out_of_range = (raster < 0) | (raster >= size[owner])
    if bool(out_of_range.any()):
        b = int(owner[out_of_range.nonzero()[0]])
        n = int(size[b])
        raise ValueError(f"image {b}: keep indices must lie in [0, {n}) for its {tuple(grid[b].tolist())} grid")
    index_t = (starts[owner] + raster).to(layout.pos.device)  # (T_k,) positions in the full stream
    counts_list = counts.tolist()
    kept = TokenLayout(
        pos=layout.pos[index_t],
        seq_id=layout.seq_id[index_t],
        cu_seqlens=_segment_offsets(counts).to(layout.pos.device),
        grid=layout.grid,
        max_seqlen=int(max_seqlen if max_seqlen is not None else max(counts_list)),
        uniform_len=counts_list[0] if all(c == counts_list[0] for c in counts_list) else None,
        keep=raster.to(layout.pos.device),
    )
    return MaskedView(index_t, kept)


@dataclass
class SubsetCover:
    """Random subsets of each image's tokens that together cover every token (sampling a masked model as it trained).

    index: (T_s,) stream position of each token of the subsets' stream, subset-major (subset 0 of every image first);
    layout: the subsets' own layout: segment i*B + b is subset i of image b, its tokens at their true positions and
        image b's full grid, so RoPE (and its extrapolation) sees what it saw in masked training;
    coverage: (T,) how many subsets hold each token of the full stream (1, or 2 where windows overlap);
    subsets: how many subsets each image is cut into.
    """

    index: Tensor
    layout: TokenLayout
    coverage: Tensor
    subsets: int


@dataclass
class SubsetWindows:
    """What :func:`subset_cover` reads from a layout's offsets on the host, on the layout's device: the same for every
    cover of one layout, so a sampler that covers the same stream at every step computes it once
    (:func:`subset_windows`) and its later covers need no host sync."""

    slot: Tensor  # (T_s,) place of each subset token in the stream sorted by (image, random key)
    seq_id: Tensor  # (T_s,) segment (subset i of image b: i*B + b) of each subset token
    cu_seqlens: Tensor  # (m*B+1,) int32 offsets of the segments
    grid: Tensor  # (m*B, 2) each segment's image grid
    max_seqlen: int
    uniform_len: Optional[int]
    subsets: int  # m


def subset_windows(layout: TokenLayout, keep_ratio: float) -> SubsetWindows:
    """The window structure of :func:`subset_cover` for ``layout`` (reads its offsets: one host sync)."""
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio={keep_ratio}: the fraction of tokens each subset holds is in (0, 1], e.g. 0.5")
    if layout.valid is not None or layout.keep is not None:
        raise ValueError("subset_cover needs a packed stream of full grids (no padding, no masked subset); "
                         "build it with maskfit.tokens.pack and no keep=")
    device = layout.pos.device
    m = math.ceil(1.0 / keep_ratio - 1e-9)
    cu = layout.cu_seqlens.long().cpu()  # (B+1,)
    n = cu[1:] - cu[:-1]  # (B,) tokens of each image
    B = n.shape[0]
    size = torch.minimum(torch.floor(n * keep_ratio + 0.5).long().clamp_min(1), n)  # (B,) tokens of each subset
    seg_image = torch.arange(B).repeat(m)  # (m*B,) image of segment i*B + b
    seg_window = torch.arange(m).repeat_interleave(B)  # (m*B,) window index i
    seg_len = size[seg_image]  # (m*B,)
    seg_of = torch.repeat_interleave(torch.arange(m * B), seg_len)  # (T_s,) segment of each subset token
    offsets = _segment_offsets(seg_len)  # (m*B+1,)
    j = torch.arange(int(offsets[-1])) - offsets[:-1].long()[seg_of]  # (T_s,) place inside its window
    img = seg_image[seg_of]  # (T_s,)
    start = (seg_window[seg_of] * n[img]) // m  # (T_s,) where its window starts in the image's random order
    slot = cu[img] + (start + j) % n[img].clamp_min(1)  # (T_s,) place in the stream sorted by (image, random key)
    lengths = seg_len.tolist()
    return SubsetWindows(
        slot=slot.to(device), seq_id=seg_of.to(device), cu_seqlens=offsets.to(device), grid=layout.grid.repeat(m, 1),
        max_seqlen=max(lengths) if lengths else 0,
        uniform_len=lengths[0] if lengths and all(v == lengths[0] for v in lengths) else None, subsets=m,
    )


def subset_cover(layout: TokenLayout, keep_ratio: float, generator: Optional[torch.Generator] = None,
                 windows: Optional[SubsetWindows] = None) -> SubsetCover:
    """Cut every image of a packed stream of full grids into ceil(1/keep_ratio) random subsets of its tokens.

    Each subset holds round(keep_ratio * n) of the image's n tokens (half up, at least 1), the count uniform masking
    keeps in training (``maskfit.masking``). The subsets are windows of one random order of the image's tokens,
    starting at i*n/m for i < m = ceil(1/keep_ratio) and wrapping around, so together they hold every token: with
    1/keep_ratio an integer they are a partition (each token once), otherwise neighbouring windows overlap (75 %
    kept: two windows of 3/4 of the tokens, half of them held twice). The draw runs on the layout's device (one sort
    of T random keys); the window structure is read from the offsets on the host, or taken from ``windows``
    (:func:`subset_windows` of this layout and ratio), and then nothing is read back.
    """
    if windows is None:
        windows = subset_windows(layout, keep_ratio)
    device = layout.pos.device
    # One random order of each image's tokens: sort by image id plus a key in [0, 1) (images stay contiguous).
    key = torch.rand(layout.num_tokens, generator=generator, device=device, dtype=torch.float64)
    order = torch.argsort(layout.seq_id.to(torch.float64) + key)  # (T,) stream positions, image by image, shuffled
    index = order[windows.slot]  # (T_s,) stream position of each subset token
    pos = layout.pos[index]  # (T_s, 2)
    seq_id, grid = windows.seq_id, windows.grid
    subsets = TokenLayout(
        pos=pos,
        seq_id=seq_id,
        cu_seqlens=windows.cu_seqlens,
        grid=grid,
        max_seqlen=windows.max_seqlen,
        uniform_len=windows.uniform_len,
        keep=pos[:, 0] * grid[seq_id, 1] + pos[:, 1],
    )
    coverage = torch.zeros(layout.num_tokens, device=device).index_add_(
        0, index, torch.ones(index.shape[0], device=device))  # (T,)
    return SubsetCover(index=index, layout=subsets, coverage=coverage, subsets=windows.subsets)


def to_padded(batch: TokenBatch, seq_len: Optional[int] = None) -> TokenBatch:
    """Packed -> padded (FiT) layout: every image gets ``seq_len`` slots, real tokens first.

    Padding tokens are zeros at position (0, 0) with ``valid`` False, exactly like FiT's data loader.
    """
    lay = batch.layout
    lengths = lay.seqlens()
    n_max = int(lengths.max()) if seq_len is None else seq_len
    if int(lengths.max()) > n_max:
        raise ValueError(f"an image has {int(lengths.max())} tokens, more than the padded length {n_max}")
    B, D = lay.num_images, batch.tokens.shape[1]
    slot = torch.arange(lay.num_tokens, device=lay.pos.device) - lay.cu_seqlens.long()[lay.seq_id]
    dest = lay.seq_id * n_max + slot  # (T,) where each token lands in the (B*N) stream
    tokens = batch.tokens.new_zeros(B * n_max, D)
    tokens[dest] = batch.tokens
    pos = lay.pos.new_zeros(B * n_max, 2)
    pos[dest] = lay.pos
    valid = torch.zeros(B * n_max, dtype=torch.bool, device=lay.pos.device)
    valid[dest] = True
    keep = None
    if lay.keep is not None:
        keep = lay.keep.new_zeros(B * n_max)
        keep[dest] = lay.keep
    layout = TokenLayout(
        pos=pos,
        seq_id=torch.arange(B, device=lay.pos.device).repeat_interleave(n_max),
        cu_seqlens=torch.arange(B + 1, dtype=torch.int32, device=lay.pos.device) * n_max,
        grid=lay.grid,
        max_seqlen=n_max,
        valid=valid,
        uniform_len=n_max,
        keep=keep,
    )
    return TokenBatch(tokens=tokens, y=batch.y, layout=layout)


def from_padded(batch: TokenBatch) -> TokenBatch:
    """Padded -> packed layout: drop the padding slots (the inverse of :func:`to_padded`)."""
    lay = batch.layout
    if lay.valid is None:
        return batch
    v = lay.valid
    lengths = torch.zeros(lay.num_images, dtype=torch.long, device=v.device)
    lengths.index_add_(0, lay.seq_id[v], torch.ones_like(lay.seq_id[v]))
    cu = torch.zeros(lay.num_images + 1, dtype=torch.int32, device=v.device)
    cu[1:] = torch.cumsum(lengths, 0)
    uniform = int(lengths[0]) if bool((lengths == lengths[0]).all()) else None
    layout = TokenLayout(
        pos=lay.pos[v],
        seq_id=lay.seq_id[v],
        cu_seqlens=cu,
        grid=lay.grid,
        max_seqlen=lay.max_seqlen,
        uniform_len=uniform,
        keep=None if lay.keep is None else lay.keep[v],
    )
    return TokenBatch(tokens=batch.tokens[v], y=batch.y, layout=layout)


# ----------------------------------------------------------------------------------------------------
# Per-image reductions over a stream
# ----------------------------------------------------------------------------------------------------


def segment_sum(values: Tensor, seq_id: Tensor, num_images: int) -> Tensor:
    """(T, ...) -> (B, ...): sum of each image's tokens."""
    out = values.new_zeros((num_images,) + tuple(values.shape[1:]))
    return out.index_add(0, seq_id, values)


def segment_mean(values: Tensor, layout: TokenLayout) -> Tensor:
    """(T,) per-token values -> (B,) mean over each image's *real* tokens (padding excluded).

    Every image then counts once in a batch mean, whatever its length (FiT, MaskDiT, MicroDiT all
    normalise this way; see reference/masked.md section 6.3).
    """
    weight = values.new_ones(values.shape[0]) if layout.valid is None else layout.valid.to(values.dtype)
    total = segment_sum(values * weight, layout.seq_id, layout.num_images)
    count = segment_sum(weight, layout.seq_id, layout.num_images)
    return total / count.clamp_min(1.0)


def split_images(tokens: Tensor, layout: TokenLayout) -> list[Tensor]:
    """Stream (T, D) -> list of (n_b, D) per image, real tokens only. Reads offsets on the host."""
    if layout.valid is not None:
        tokens = tokens[layout.valid]
        layout = from_padded(TokenBatch(tokens, torch.zeros(layout.num_images), layout)).layout
    cu = layout.cu_seqlens.tolist()
    return [tokens[cu[b] : cu[b + 1]] for b in range(layout.num_images)]
