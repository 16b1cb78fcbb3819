"""Subset sampling: a masked model sampled on random subsets of each image's tokens, as it trained."""
import pytest
import torch

from maskfit.models.transformer import FiT, model_config
from maskfit.sample import SamplerOptions, subset_denoiser
from maskfit.tokens import masked_view, pack, subset_cover, to_padded
from tests.test_masked_model import _perturbed

GRIDS = [(4, 4), (2, 6), (4, 5)]  # 16, 12 and 20 tokens: half of each is a whole number


def _stream(grids=GRIDS, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = [torch.randn(h * w, dim, generator=g) for h, w in grids]
    return pack(tokens, grids, torch.arange(len(grids)))


def _segments(cover):
    cu = cover.layout.cu_seqlens.tolist()
    return [cover.index[cu[s]:cu[s + 1]] for s in range(len(cu) - 1)]


def test_half_subsets_partition_every_image_into_two_training_sized_views():
    batch = _stream()
    lay = batch.layout
    cover = subset_cover(lay, 0.5, torch.Generator().manual_seed(0))
    assert cover.subsets == 2
    assert torch.equal(cover.coverage, torch.ones(lay.num_tokens))  # each token in exactly one subset
    segments = _segments(cover)
    assert [len(s) for s in segments] == [8, 6, 10, 8, 6, 10]  # segment i*B + b: subset i of image b, n/2 tokens
    for b, (h, w) in enumerate(GRIDS):
        start, end = int(lay.cu_seqlens[b]), int(lay.cu_seqlens[b + 1])
        union = torch.cat([segments[b], segments[len(GRIDS) + b]]).sort().values
        assert torch.equal(union, torch.arange(start, end))  # the two subsets of image b are all its tokens
    # Each subset token keeps its true position, its image's full grid, and its raster index in that grid.
    seg_image = torch.arange(len(GRIDS)).repeat(2)
    assert torch.equal(cover.layout.pos, lay.pos[cover.index])
    assert torch.equal(cover.layout.grid[cover.layout.seq_id], lay.grid[seg_image[cover.layout.seq_id]])
    w = cover.layout.grid[cover.layout.seq_id, 1]
    assert torch.equal(cover.layout.keep, cover.layout.pos[:, 0] * w + cover.layout.pos[:, 1])
    assert cover.layout.max_seqlen == 10 and cover.layout.uniform_len is None


def test_three_quarter_subsets_overlap_where_they_must_and_miss_no_token():
    lay = _stream([(4, 4)]).layout
    cover = subset_cover(lay, 0.75, torch.Generator().manual_seed(1))
    # Two windows of 12 of the 16 tokens (the count 75 % masking keeps), starting at 0 and 8 of one random order.
    assert cover.subsets == 2 and [len(s) for s in _segments(cover)] == [12, 12]
    assert int(cover.coverage.min()) == 1 and int(cover.coverage.max()) == 2
    assert int((cover.coverage == 2).sum()) == 8


def test_an_odd_image_is_cut_into_the_training_count_with_one_token_shared():
    lay = _stream([(3, 5)]).layout  # 15 tokens at 50 %: masking keeps round-half-up(7.5) = 8
    cover = subset_cover(lay, 0.5, torch.Generator().manual_seed(0))
    assert [len(s) for s in _segments(cover)] == [8, 8]
    assert int((cover.coverage == 2).sum()) == 1 and int(cover.coverage.min()) == 1


def test_subsets_are_drawn_from_the_generator():
    lay = _stream().layout
    a = subset_cover(lay, 0.25, torch.Generator().manual_seed(3)).index
    b = subset_cover(lay, 0.25, torch.Generator().manual_seed(3)).index
    c = subset_cover(lay, 0.25, torch.Generator().manual_seed(4)).index
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_subset_requests_name_the_fix():
    batch = _stream()
    with pytest.raises(ValueError, match=r"keep_ratio=0.0: the fraction of tokens each subset holds is in \(0, 1\]"):
        subset_cover(batch.layout, 0.0)
    with pytest.raises(ValueError, match="needs a packed stream of full grids"):
        subset_cover(to_padded(batch, seq_len=20).layout, 0.5)
    with pytest.raises(ValueError, match=r"subset_keep=1.5: the fraction of tokens each network call sees"):
        SamplerOptions(subset_keep=1.5)


@pytest.mark.parametrize("design", ["plain", "decoder", "mixer", "side_interp"])
def test_each_token_is_predicted_as_the_masked_training_forward_predicts_it(design):
    # Subset i of every image gives, at its tokens, exactly the design's masked forward (the training step's) with
    # keep = subset i: the sampler meets the view the model learnt on, mask tokens and full-grid decoders included.
    cfg = model_config("FiT-tiny", mask_design=design, decoder_depth=1, decoder_hidden=32, decoder_heads=2,
                       mixer_depth=1, side_decode_depth=1)
    model = _perturbed(FiT(cfg))
    batch = _stream(dim=model.cfg.token_dim)
    lay = batch.layout
    t, y = torch.tensor([10.0, 400.0, 900.0]), torch.tensor([1, 5, 2])

    def model_fn(x, t_, y_, layout, mask=None):
        return model(x, t_, y_, layout, mask=mask)

    with torch.no_grad():
        out = subset_denoiser(model_fn, 0.5, torch.Generator().manual_seed(7))(batch.tokens, t, y, lay)
        cover = subset_cover(lay, 0.5, torch.Generator().manual_seed(7))  # the same draw
        segments = _segments(cover)
        B = len(GRIDS)
        for i in range(cover.subsets):
            keep = [segments[i * B + b] - lay.cu_seqlens[b] for b in range(B)]  # raster = offset in a full grid
            view = masked_view(lay, keep)
            reference = model(batch.tokens, t, y, lay, mask=view)  # (T, D): the masked training forward
            torch.testing.assert_close(out[view.index], reference[view.index], atol=1e-5, rtol=1e-5)


def test_overlapping_tokens_take_the_mean_of_their_subsets():
    lay = _stream([(4, 4)]).layout
    x = torch.zeros(lay.num_tokens, 2)
    calls = []

    def model_fn(x_, t_, y_, layout, mask=None):  # each kept token returns the number of the copy that kept it
        calls.append((layout.num_images, mask.index.shape[0]))
        out = torch.full((x_.shape[0], 2), -1.0)
        out[mask.index] = mask.layout.seq_id.to(x_.dtype)[:, None]
        return out

    out = subset_denoiser(model_fn, 0.75, torch.Generator().manual_seed(1))(x, torch.zeros(1), torch.zeros(1), lay)
    cover = subset_cover(lay, 0.75, torch.Generator().manual_seed(1))
    shared = cover.coverage == 2
    assert calls == [(2, 24)]  # one network call: two copies of the image, 12 kept tokens in each
    assert torch.all(out[shared] == 0.5) and set(out[~shared, 0].tolist()) == {0.0, 1.0}


def test_keep_one_is_the_full_grid_denoiser():
    def model_fn(x, t, y, layout, mask=None):
        return x

    assert subset_denoiser(model_fn, 1.0) is model_fn


def test_a_layout_s_windows_are_read_once_and_give_the_same_covers(monkeypatch):
    import maskfit.sample
    from maskfit.tokens import subset_windows

    lay = _stream().layout
    for keep in (0.5, 0.75, 0.3):
        windows = subset_windows(lay, keep)
        plain = subset_cover(lay, keep, torch.Generator().manual_seed(4))
        reused = subset_cover(lay, keep, torch.Generator().manual_seed(4), windows=windows)
        assert torch.equal(plain.index, reused.index) and torch.equal(plain.coverage, reused.coverage)
        assert torch.equal(plain.layout.keep, reused.layout.keep) and torch.equal(plain.layout.pos, reused.layout.pos)
        assert plain.layout.max_seqlen == reused.layout.max_seqlen and plain.subsets == reused.subsets
    # the denoiser reads the offsets (a host sync on a GPU) once per layout, not at every network call
    reads = []
    monkeypatch.setattr(maskfit.sample, "subset_windows", lambda *a: reads.append(a[0]) or subset_windows(*a))
    fn = subset_denoiser(lambda x, t, y, layout, mask=None: x[:, :3] * 0 + 1.0, 0.5, torch.Generator().manual_seed(0))
    x = torch.randn(lay.num_tokens, 8)
    for _ in range(3):
        out = fn(x, torch.zeros(3), torch.zeros(3, dtype=torch.long), lay)
        assert torch.allclose(out, torch.ones(lay.num_tokens, 3))
    other = _stream(seed=1).layout
    fn(x, torch.zeros(3), torch.zeros(3, dtype=torch.long), other)
    assert [r is lay for r in reads] == [True, False]
