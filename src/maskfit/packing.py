"""Packing images of different (kept) lengths into steps of a constant token budget.

NaViT (Dehghani et al. 2023, §2.3 and App. A.3) packs several variable-length examples into each
fixed-length sequence with a greedy first-fit rule and reports "typically less than 2 %" padding. Here the
sequence is the whole step's token stream (``TokenBatch``): every step carries ``budget`` tokens, the
real ones of several images plus dummy segments for the rest, so every dense op has a static shape for
``torch.compile`` (reference/masked.md §6.4).

- :func:`first_fit_pack`: offline first-fit decreasing over a list of lengths.
- :class:`StreamingPacker`: online packing from an iterator with a small buffer of candidates, so the
  data order stays nearly random (the NaViT data pipeline packs a stream, not a sorted list).
- the training's sampler, seeded, resumable and split across ranks, is
  :class:`maskfit.data.pipeline.TokenBudgetSampler` (the one sampler: it re-reads each image's kept count
  at the step its bin trains on, which a packer of fixed lengths cannot).
- :func:`pad_stream_to_budget`: the dummy tail segments (and empty segments up to a fixed image count).

Contract for consumers of a padded stream: tokens with ``layout.valid`` False are padding. The loss must
ignore them (``maskfit.objective`` counts real tokens only) and the mean over images must skip the
images with no real token (:func:`real_image_mask`): the dummy segments and any zero-length segments.
"""
from __future__ import annotations

import math
from typing import Generic, Hashable, Iterable, Iterator, Optional, Sequence, TypeVar

import torch
from torch import Tensor

from maskfit.tokens import TokenBatch, TokenLayout

Item = TypeVar("Item", bound=Hashable)


# ----------------------------------------------------------------------------------------------------
# Checks and statistics
# ----------------------------------------------------------------------------------------------------


def _check_budget(budget: int, max_images: Optional[int]) -> None:
    if budget < 1:
        raise ValueError(f"token budget {budget} must be a positive number of tokens per step")
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images={max_images} must be at least 1 (or None for no limit)")


def _check_length(name: object, length: int, budget: int) -> None:
    if length < 1:
        raise ValueError(f"image {name!r} has {length} tokens; every packed image needs at least one token")
    if length > budget:
        raise ValueError(
            f"image {name!r} has {length} tokens, more than the token budget {budget}; raise the budget to "
            f"at least the largest image's kept token count (e.g. 256), or keep fewer tokens per image"
        )


def padding_fraction(bins: Sequence[Sequence[int]], lengths: Sequence[int], budget: int) -> float:
    """Fraction of the budget slots of ``bins`` (lists of indices into ``lengths``) that are padding."""
    if not bins:
        return 0.0
    real = sum(lengths[i] for b in bins for i in b)
    return 1.0 - real / (len(bins) * budget)


# ----------------------------------------------------------------------------------------------------
# Offline: first-fit decreasing
# ----------------------------------------------------------------------------------------------------


def first_fit_pack(lengths: Sequence[int], budget: int, max_images: Optional[int] = None) -> list[list[int]]:
    """Pack item indices into bins of at most ``budget`` tokens (and ``max_images`` items) each.

    First-fit decreasing (NaViT §2.3 uses first fit; sorting by length first is the classic
    improvement, at most 11/9 OPT + 6/9 bins): items in decreasing length, ties by index, each into the
    first open bin with room. Bins come in the order they were opened; inside a bin, items in the order
    they were placed. Every index appears exactly once.
    """
    _check_budget(budget, max_images)
    for i, n in enumerate(lengths):
        _check_length(i, n, budget)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    smallest = min(lengths) if lengths else 0
    bins: list[list[int]] = []
    room: list[int] = []  # free tokens of each bin
    open_bins: list[int] = []  # bins that can still take the smallest item: the only ones worth scanning
    for i in order:
        n = lengths[i]
        target = next((b for b in open_bins if room[b] >= n), None)
        if target is None:
            target = len(bins)
            bins.append([])
            room.append(budget)
            open_bins.append(target)
        bins[target].append(i)
        room[target] -= n
        if room[target] < smallest or (max_images is not None and len(bins[target]) >= max_images):
            open_bins.remove(target)
    return bins


# ----------------------------------------------------------------------------------------------------
# Online: a buffer of candidates
# ----------------------------------------------------------------------------------------------------


class StreamingPacker(Generic[Item]):
    """Packs ``(item, length)`` pairs from an iterator into bins of at most ``budget`` tokens.

    It holds up to ``buffer_size`` pending items in arrival order and fills one bin at a time:
    - while the free space is at least the longest pending item, take the **oldest** pending item
      (this keeps the data order: an item waits at most until the bin after it can no longer fit it);
    - once it is not, take the **longest** pending item that still fits (best fit closes the bin
      tightly: on lengths 128..256 with a 4096 budget it cuts the padding of plain oldest-first from
      1.3 % to 0.9 %);
    - the bin is emitted when no pending item fits, or it holds ``max_images`` items.
    The buffer is refilled from the iterator after every pick. Every new bin starts with the oldest
    pending item, so nothing waits forever. At the end of the iterator the buffer drains the same way.

    ``padding_fraction`` reports the padding over all bins emitted so far.
    """

    def __init__(self, budget: int, buffer_size: int = 64, max_images: Optional[int] = None):
        _check_budget(budget, max_images)
        if buffer_size < 1:
            raise ValueError(f"buffer_size={buffer_size} must be at least 1 (64 keeps padding well under 2 %)")
        self.budget = budget
        self.buffer_size = buffer_size
        self.max_images = max_images
        self.real_tokens = 0
        self.num_bins = 0

    @property
    def padding_fraction(self) -> float:
        return 0.0 if self.num_bins == 0 else 1.0 - self.real_tokens / (self.num_bins * self.budget)

    def pack(self, items: Iterable[tuple[Item, int]]) -> Iterator[list[Item]]:
        source = iter(items)
        pending: list[tuple[Item, int]] = []
        while self._refill(pending, source) or pending:
            yield self._fill_bin(pending, source)

    __call__ = pack

    def _refill(self, pending: list[tuple[Item, int]], source: Iterator[tuple[Item, int]]) -> bool:
        """Top the buffer up to buffer_size; returns whether anything was added."""
        added = False
        while len(pending) < self.buffer_size:
            try:
                item, length = next(source)
            except StopIteration:
                break
            _check_length(item, int(length), self.budget)
            pending.append((item, int(length)))
            added = True
        return added

    def _fill_bin(self, pending: list[tuple[Item, int]], source: Iterator[tuple[Item, int]]) -> list[Item]:
        chosen: list[Item] = []
        room = self.budget
        while pending and (self.max_images is None or len(chosen) < self.max_images):
            pick = self._pick(pending, room)
            if pick is None:
                break
            item, length = pending.pop(pick)
            chosen.append(item)
            room -= length
            self._refill(pending, source)
        self.real_tokens += self.budget - room
        self.num_bins += 1
        return chosen

    @staticmethod
    def _pick(pending: list[tuple[Item, int]], room: int) -> Optional[int]:
        return pick_next([length for _, length in pending], room)


def pick_next(lengths: Sequence[int], room: int) -> Optional[int]:
    """Position in a buffer (oldest first) of the next item for a bin with ``room`` free tokens, or None.

    The oldest item while everything fits (the data order is kept), else the longest that fits, which
    closes the bin tightly (best fit).
    """
    if room >= max(lengths):
        return 0
    best, best_length = None, 0
    for j, length in enumerate(lengths):
        if best_length < length <= room:
            best, best_length = j, length
    return best


# ----------------------------------------------------------------------------------------------------
# Static shapes: the dummy tail segment
# ----------------------------------------------------------------------------------------------------


def dummy_grid(num_tokens: int) -> tuple[int, int]:
    """Grid of the dummy segment: near-square (side ceil(sqrt(r))), so its positions stay as small as a
    real image's and RoPE (or any per-image scale read from ``grid``) sees ordinary values."""
    if num_tokens <= 0:
        return (1, 1)
    cols = math.isqrt(num_tokens - 1) + 1  # ceil(sqrt(r))
    return (-(-num_tokens // cols), cols)


def real_image_mask(layout: TokenLayout) -> Tensor:
    """(B,) bool: images with at least one real token (False for the dummy and zero-length segments)."""
    lengths = layout.seqlens()
    if layout.valid is None:
        return lengths > 0
    count = torch.zeros(layout.num_images, dtype=torch.long, device=layout.valid.device)
    count.index_add_(0, layout.seq_id, layout.valid.long())
    return count > 0


def dummy_lengths(remaining: int, segment_cap: Optional[int]) -> list[int]:
    """Lengths of the dummy segments that hold ``remaining`` padding tokens: one segment (even of 0 tokens), or
    with ``segment_cap`` as many segments of at most ``segment_cap`` tokens as it takes."""
    if segment_cap is None or remaining <= segment_cap:
        return [remaining]
    full, rest = divmod(remaining, segment_cap)
    return [segment_cap] * full + ([rest] if rest else [])


def max_dummy_segments(budget: int, segment_cap: Optional[int]) -> int:
    """The most dummy segments a stream padded to ``budget`` can need (:func:`dummy_lengths` of the whole budget)."""
    return len(dummy_lengths(budget, segment_cap))


def pad_stream_to_budget(batch: TokenBatch, budget: int, max_images: Optional[int] = None,
                         segment_cap: Optional[int] = None, most_padding: Optional[int] = None) -> TokenBatch:
    """Make a packed stream exactly ``budget`` tokens long (and, with ``max_images``, a fixed number of segments)
    for static shapes.

    Appends the budget - T remaining tokens as dummy segments, image indices B, B+1, ... (right after the B real
    images): ONE segment, even of 0 tokens, or with ``segment_cap`` as many as it takes so that none is longer
    than ``segment_cap`` (:func:`dummy_lengths`). The layout is always "real images, then padding segments".
    Dummy tokens are zeros with ``valid`` False; their label is 0 (always a valid class index, unlike the
    null class whose index depends on the model); each dummy's grid is :func:`dummy_grid` of its length and its
    positions the raster cells of that grid, so per-image conditioning gathered with ``seq_id`` and RoPE read
    ordinary, finite values. With ``max_images``, zero-length segments (label 0, grid (1, 1)) follow until there
    are ``max_images + max_dummy_segments(most_padding, segment_cap)`` segments (max_images + 1 without a cap;
    ``most_padding``, the most padding tokens a stream of this kind can get, defaults to ``budget``), i.e.
    ``cu_seqlens`` has one entry more (its last offset repeated), and ``y`` and ``grid`` have that many rows.

    ``max_seqlen`` becomes max(old max_seqlen, longest dummy): the attention kernel must see the true segment
    lengths. Without a cap one dummy can exceed a real image's bound whenever a bin closes early (an epoch's
    tail, ``max_images`` reached), and each new value of that Python int recompiles a compiled model (or
    records another CUDA graph). ``segment_cap`` = the stream's static bound keeps ``max_seqlen`` at that bound.

    Consumers: the loss ignores tokens with ``valid`` False and the per-image mean skips the images of
    :func:`real_image_mask`. The real tokens, their order and their layout fields are unchanged.
    """
    lay = batch.layout
    num_real, total = lay.num_images, lay.num_tokens
    if total > budget:
        raise ValueError(
            f"the stream has {total} tokens, more than the budget {budget}; pack fewer images per step "
            "(first_fit_pack / StreamingPacker with this budget) or raise the budget"
        )
    if max_images is not None and num_real > max_images:
        raise ValueError(
            f"the stream has {num_real} images, more than max_images={max_images}; pass max_images to the "
            "packer too, or raise max_images"
        )
    if segment_cap is not None and segment_cap < 1:
        raise ValueError(f"segment_cap={segment_cap} must be a positive number of tokens (or None)")
    remaining = budget - total
    dummies = dummy_lengths(remaining, segment_cap)
    most_padding = budget if most_padding is None else most_padding
    if remaining > most_padding:
        raise ValueError(f"the stream needs {remaining} padding tokens, more than most_padding={most_padding}")
    num_segments = (num_real + len(dummies) if max_images is None
                    else max_images + max_dummy_segments(most_padding, segment_cap))
    num_empty = num_segments - num_real - len(dummies)  # zero-length segments after the dummies
    device = batch.tokens.device

    grids, pos, raster_all, seq_ids = [], [], [], []
    for j, n in enumerate(dummies):
        rows, cols = dummy_grid(n)
        raster = torch.arange(n, device=device)  # (n,) each dummy's tokens fill its own grid in raster order
        grids.append([rows, cols])
        pos.append(torch.stack([raster // cols, raster % cols], dim=1))  # (n, 2)
        raster_all.append(raster)
        seq_ids.append(torch.full((n,), num_real + j, dtype=lay.seq_id.dtype, device=device))
    real_valid = lay.valid if lay.valid is not None else torch.ones(total, dtype=torch.bool, device=device)
    grid_tail = torch.tensor(grids + [[1, 1]] * num_empty, dtype=lay.grid.dtype, device=lay.grid.device)
    lengths_tail = torch.tensor(dummies + [0] * num_empty, dtype=lay.cu_seqlens.dtype, device=lay.cu_seqlens.device)
    cu_tail = (lay.cu_seqlens[-1:] + torch.cumsum(lengths_tail, 0)).to(lay.cu_seqlens.dtype)  # (dummies + empty,)
    lengths = torch.cat([lay.seqlens(), lengths_tail.long().to(device)])
    uniform = int(lengths[0]) if bool((lengths == lengths[0]).all()) else None
    raster = torch.cat(raster_all)  # (remaining,)

    layout = TokenLayout(
        pos=torch.cat([lay.pos, *(p.to(lay.pos.dtype) for p in pos)]),
        seq_id=torch.cat([lay.seq_id, *seq_ids]),
        cu_seqlens=torch.cat([lay.cu_seqlens, cu_tail]),
        grid=torch.cat([lay.grid, grid_tail]),
        max_seqlen=max(lay.max_seqlen, max(dummies)),
        valid=torch.cat([real_valid, torch.zeros(remaining, dtype=torch.bool, device=device)]),
        uniform_len=uniform,
        keep=None if lay.keep is None else torch.cat([lay.keep, raster.to(lay.keep.dtype)]),
    )
    tokens = torch.cat([batch.tokens, batch.tokens.new_zeros(remaining, batch.tokens.shape[1])])
    y = torch.cat([batch.y, batch.y.new_zeros(num_segments - num_real)])
    return TokenBatch(tokens=tokens, y=y, layout=layout)


# ----------------------------------------------------------------------------------------------------
# A resumable sampler of packed bins
# ----------------------------------------------------------------------------------------------------
