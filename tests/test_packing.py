"""Packing to a constant token budget (src/maskfit/packing.py)."""
import random

import pytest
import torch

from maskfit.masking import MaskConfig, choose_keep, num_keep_for
from maskfit.packing import (
    StreamingPacker,
    dummy_grid,
    first_fit_pack,
    pad_stream_to_budget,
    padding_fraction,
    real_image_mask,
)
from maskfit.tokens import pack, patchify, segment_mean


def _fit_like_lengths(count: int, seed: int, keep_ratio: float = 1.0) -> list[int]:
    """FiT-like token counts: 128..256 per image (aspect-preserving resize to <= 256 tokens), then masked."""
    rng = random.Random(seed)
    cfg = MaskConfig(keep_ratio=keep_ratio)
    return [num_keep_for(rng.randint(128, 256), cfg) for _ in range(count)]


def _check_bins(bins, lengths, budget, max_images=None):
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths))), "every image exactly once"
    for b in bins:
        assert b and sum(lengths[i] for i in b) <= budget
        assert max_images is None or len(b) <= max_images


# ----------------------------------------------------------------------------------------------------
# first fit
# ----------------------------------------------------------------------------------------------------


def test_first_fit_respects_budget_and_uses_every_image_once():
    rng = random.Random(0)
    for _ in range(30):
        budget = rng.randint(1, 600)
        lengths = [rng.randint(1, budget) for _ in range(rng.randint(0, 200))]
        max_images = rng.choice([None, 1, 3, 8])
        bins = first_fit_pack(lengths, budget, max_images)
        _check_bins(bins, lengths, budget, max_images)


def test_first_fit_by_hand():
    # decreasing: 7 -> bin0, 5 -> bin1, 4 -> bin1? no (5 + 4 > 8) -> bin2, 3 -> bin1, 1 -> bin0
    assert first_fit_pack([3, 7, 1, 5, 4], budget=8) == [[1, 2], [3, 0], [4]]
    assert first_fit_pack([2, 2, 2], budget=8, max_images=2) == [[0, 1], [2]]
    assert first_fit_pack([], budget=8) == []


def test_first_fit_rejects_an_image_longer_than_the_budget():
    with pytest.raises(ValueError, match="image 1 has 300 tokens, more than the token budget 256"):
        first_fit_pack([10, 300], 256)
    with pytest.raises(ValueError, match="has 0 tokens"):
        first_fit_pack([0], 256)
    with pytest.raises(ValueError, match="token budget 0"):
        first_fit_pack([1], 0)


@pytest.mark.parametrize("keep_ratio,images_per_budget", [(1.0, 16), (1.0, 32), (0.5, 16), (0.5, 32)])
def test_padding_under_two_percent_on_fit_like_lengths(keep_ratio, images_per_budget):
    """NaViT §2.3: < 2 % padding. Budget = 16 or 32 images' worth of the per-image maximum."""
    lengths = _fit_like_lengths(3000, seed=1, keep_ratio=keep_ratio)
    budget = images_per_budget * max(lengths)
    offline = first_fit_pack(lengths, budget)
    _check_bins(offline, lengths, budget)
    assert padding_fraction(offline, lengths, budget) < 0.02
    packer = StreamingPacker(budget, buffer_size=64)
    streamed = list(packer.pack(enumerate(lengths)))
    _check_bins(streamed, lengths, budget)
    assert packer.padding_fraction == pytest.approx(padding_fraction(streamed, lengths, budget))
    assert packer.padding_fraction < 0.02, packer.padding_fraction


def test_padding_under_two_percent_with_beta_ratios():
    rng = random.Random(2)
    g = torch.Generator().manual_seed(2)
    cfg = MaskConfig(keep_ratio=0.5, ratio_distribution="beta")
    lengths = [num_keep_for(rng.randint(128, 256), cfg, 0, g) for _ in range(2000)]
    packer = StreamingPacker(16 * 256, buffer_size=64)
    bins = list(packer.pack(enumerate(lengths)))
    _check_bins(bins, lengths, 16 * 256)
    assert packer.padding_fraction < 0.02


# ----------------------------------------------------------------------------------------------------
# streaming
# ----------------------------------------------------------------------------------------------------


def test_streaming_keeps_the_data_order_nearly():
    lengths = _fit_like_lengths(2000, seed=3)
    budget, buffer = 4096, 32
    bins = list(StreamingPacker(budget, buffer).pack(enumerate(lengths)))
    _check_bins(bins, lengths, budget)
    out = [i for b in bins for i in b]
    most_per_bin = budget // min(lengths)
    # An item can be overtaken only by the items that were pending with it, bin by bin.
    assert max(abs(pos - i) for pos, i in enumerate(out)) <= buffer + most_per_bin
    first_bin_of = {i: k for k, b in enumerate(bins) for i in b}
    lateness = [first_bin_of[i] - first_bin_of[j] for i, j in zip(range(1, 2000), range(0, 1999))]
    assert min(lateness) >= -2  # a later item never lands more than two bins before an earlier one


def test_streaming_takes_the_oldest_while_all_fit_then_the_best_fit():
    items = [("a", 5), ("b", 6), ("c", 2), ("d", 5)]
    # a (room 5); b no longer fits, so the longest that fits: d (not the older c); then b, c.
    assert list(StreamingPacker(10, buffer_size=4).pack(items)) == [["a", "d"], ["b", "c"]]
    # A buffer of one is plain next-fit in arrival order.
    assert list(StreamingPacker(10, buffer_size=1).pack(items)) == [["a"], ["b", "c"], ["d"]]


def test_streaming_respects_max_images_and_rejects_long_items():
    lengths = [5] * 50
    bins = list(StreamingPacker(100, 8, max_images=3).pack(enumerate(lengths)))
    _check_bins(bins, lengths, 100, max_images=3)
    assert len(bins) == 17
    with pytest.raises(ValueError, match="image 'big' has 101 tokens, more than the token budget 100"):
        list(StreamingPacker(100).pack([("a", 5), ("big", 101)]))
    with pytest.raises(ValueError, match="buffer_size=0"):
        StreamingPacker(100, buffer_size=0)


# ----------------------------------------------------------------------------------------------------
# pad_stream_to_budget
# ----------------------------------------------------------------------------------------------------


def _masked_batch(grids, seed=0, D=8):
    g = torch.Generator().manual_seed(seed)
    cfg = MaskConfig(keep_ratio=0.5, strategy="uniform")
    tokens, keeps = [], []
    for h, w in grids:
        full = patchify(torch.randn(D // 4, 2 * h, 2 * w, generator=g), 2)  # (h*w, D)
        keep = choose_keep((h, w), cfg, 0, g)
        tokens.append(full[keep])
        keeps.append(keep)
    labels = torch.arange(1, len(grids) + 1)
    return pack(tokens, grids, labels, keep=keeps, max_seqlen=256)


@pytest.mark.parametrize("max_images", [None, 5, 9])
def test_pad_stream_gives_exactly_budget_tokens_and_keeps_real_ones(max_images):
    batch = _masked_batch([(16, 16), (12, 20), (9, 7)])
    lay = batch.layout
    T, B, budget = lay.num_tokens, lay.num_images, 512
    out = pad_stream_to_budget(batch, budget, max_images)
    o = out.layout
    segments = B + 1 if max_images is None else max_images + 1
    assert out.tokens.shape == (budget, batch.tokens.shape[1]) and o.num_tokens == budget
    assert o.cu_seqlens.shape == (segments + 1,) and int(o.cu_seqlens[-1]) == budget
    assert o.cu_seqlens.dtype == torch.int32
    assert out.y.shape == (segments,) and o.grid.shape == (segments, 2)
    # Real part untouched.
    assert torch.equal(out.tokens[:T], batch.tokens)
    assert torch.equal(o.pos[:T], lay.pos) and torch.equal(o.seq_id[:T], lay.seq_id)
    assert torch.equal(o.keep[:T], lay.keep) and torch.equal(o.cu_seqlens[: B + 1], lay.cu_seqlens)
    assert torch.equal(out.y[:B], batch.y) and torch.equal(o.grid[:B], lay.grid)
    # The dummy: one segment, image index B, invalid zeros, label 0, positions inside its grid.
    r = budget - T
    assert bool(o.valid[:T].all()) and not bool(o.valid[T:].any())
    assert bool((o.seq_id[T:] == B).all()) and int(o.seqlens()[B]) == r
    assert bool((out.tokens[T:] == 0).all()) and int(out.y[B]) == 0
    gh, gw = o.grid[B].tolist()
    assert (gh, gw) == dummy_grid(r) and gh * gw >= r > (gh - 1) * gw
    assert bool((o.pos[T:, 0] < gh).all()) and bool((o.pos[T:, 1] < gw).all())
    assert torch.equal(o.keep[T:], o.pos[T:, 0] * gw + o.pos[T:, 1])
    assert o.max_seqlen == max(256, r)
    # Only the real images count; per-image losses match the unpadded stream.
    assert real_image_mask(o).tolist() == [True] * B + [False] * (segments - B)
    values = torch.randn(T)
    padded_values = torch.cat([values, torch.full((r,), 1e6)])
    assert torch.allclose(segment_mean(padded_values, o)[:B], segment_mean(values, lay))


def test_pad_stream_when_already_full_adds_an_empty_dummy():
    batch = _masked_batch([(8, 8), (4, 4)])
    T = batch.layout.num_tokens
    out = pad_stream_to_budget(batch, T, max_images=4)
    assert out.layout.num_tokens == T and bool(out.layout.valid.all())
    assert out.layout.seqlens().tolist() == [32, 8, 0, 0, 0]
    assert out.layout.grid[2].tolist() == [1, 1]
    assert out.layout.max_seqlen == 256


def test_pad_stream_errors():
    batch = _masked_batch([(8, 8), (4, 4), (2, 2)])
    with pytest.raises(ValueError, match="42 tokens, more than the budget 40"):
        pad_stream_to_budget(batch, 40)
    with pytest.raises(ValueError, match="3 images, more than max_images=2"):
        pad_stream_to_budget(batch, 100, max_images=2)


def test_dummy_lengths_split_the_padding_at_the_cap():
    from maskfit.packing import dummy_lengths, max_dummy_segments

    assert dummy_lengths(0, 8) == [0] and dummy_lengths(8, 8) == [8] and dummy_lengths(20, None) == [20]
    assert dummy_lengths(20, 8) == [8, 8, 4] and dummy_lengths(16, 8) == [8, 8]
    assert max_dummy_segments(512, 64) == 8 and max_dummy_segments(512, None) == 1


@pytest.mark.parametrize("real_grids", [[(16, 16), (12, 20), (9, 7)], [(4, 4)], [(16, 16), (16, 16), (15, 17)]])
def test_capped_dummies_keep_max_seqlen_and_the_segment_count_fixed(real_grids):
    """With segment_cap the padding is split into segments no longer than the cap, so max_seqlen and (with
    max_images) the segment count are the same whatever the real images: one compiled graph, one CUDA graph."""
    batch = _masked_batch(real_grids)
    lay = batch.layout
    T, B, budget, cap, max_images = lay.num_tokens, lay.num_images, 1024, 256, 5
    out = pad_stream_to_budget(batch, budget, max_images, segment_cap=cap)
    o = out.layout
    assert o.num_tokens == budget and o.max_seqlen == 256  # the real bound: no dummy is longer
    assert o.num_images == max_images + budget // cap and out.y.shape == (max_images + budget // cap,)
    lengths = o.seqlens()[B:].tolist()
    assert sum(lengths) == budget - T and max(lengths) <= cap
    assert torch.equal(out.tokens[:T], batch.tokens) and torch.equal(o.cu_seqlens[: B + 1], lay.cu_seqlens)
    assert not bool(o.valid[T:].any()) and real_image_mask(o).tolist() == [True] * B + [False] * (o.num_images - B)
    for j, n in enumerate(lengths):  # each dummy: its own index, ordinary grid, positions inside it
        start = int(o.cu_seqlens[B + j])
        gh, gw = o.grid[B + j].tolist()
        assert (gh, gw) == dummy_grid(n)
        assert bool((o.seq_id[start:start + n] == B + j).all())
        assert bool((o.pos[start:start + n, 0] < gh).all()) and bool((o.pos[start:start + n, 1] < gw).all())
    with pytest.raises(ValueError, match="more than most_padding=10"):
        pad_stream_to_budget(batch, budget, max_images, segment_cap=cap, most_padding=10)
