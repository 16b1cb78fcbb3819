"""Token subsampling strategies and the keep-count configuration (src/maskfit/masking.py)."""
import math
import random

import pytest
import torch

from maskfit.masking import (
    longest_full_stream,
    STRATEGIES,
    MaskConfig,
    block,
    block_cells,
    choose_keep,
    crop_window,
    keep_ratio_at,
    lattice_strides,
    mask_ratio_at,
    num_keep_for,
    per_image_generator,
    strided,
    uniform_random,
    window_shape,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cases():
    """(grid, num_keep) pairs: every k of every grid up to 4x4, plus random grids up to 8x32."""
    cases = [((h, w), k) for h in range(1, 5) for w in range(1, 5) for k in range(1, h * w + 1)]
    rng = random.Random(0)
    for _ in range(40):
        h, w = rng.randint(1, 8), rng.randint(1, 32)
        n = h * w
        for k in {1, n, rng.randint(1, n), rng.randint(1, n), (n + 1) // 2}:
            cases.append(((h, w), k))
    cases.append(((8, 32), 256))
    cases.append(((8, 32), 1))
    return cases


# ----------------------------------------------------------------------------------------------------
# Every strategy: exact count, unique, sorted, in range
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_returns_exact_sorted_unique_in_range(name):
    strategy = STRATEGIES[name]
    g = _gen(1)
    for (h, w), k in _cases():
        keep = strategy((h, w), k, g)
        assert keep.dtype == torch.int64 and keep.shape == (k,), (name, h, w, k, keep)
        assert bool((keep[1:] > keep[:-1]).all()), f"{name} {h}x{w} k={k}: not strictly increasing"
        assert int(keep.min()) >= 0 and int(keep.max()) < h * w, (name, h, w, k)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_is_reproducible_from_the_generator(name):
    a = STRATEGIES[name]((8, 12), 37, _gen(5))
    b = STRATEGIES[name]((8, 12), 37, _gen(5))
    c = STRATEGIES[name]((8, 12), 37, _gen(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("k", [0, -1, 25])
def test_strategy_rejects_impossible_counts(name, k):
    with pytest.raises(ValueError, match=f"num_keep={k}"):
        STRATEGIES[name]((4, 6), k, _gen())


# ----------------------------------------------------------------------------------------------------
# uniform: unbiased
# ----------------------------------------------------------------------------------------------------


def test_uniform_keeps_each_token_with_probability_k_over_n():
    h, w, k, draws = 4, 6, 7, 6000
    g = _gen(2)
    counts = torch.zeros(h * w)
    for _ in range(draws):
        counts[uniform_random((h, w), k, g)] += 1
    freq = counts / draws
    p = k / (h * w)
    sigma = math.sqrt(p * (1 - p) / draws)
    assert float((freq - p).abs().max()) < 5 * sigma, freq


# ----------------------------------------------------------------------------------------------------
# block: whole cells except at most one
# ----------------------------------------------------------------------------------------------------


def _partial_cells(keep, grid, b, offset):
    cell = block_cells(grid, b, offset)
    kept = torch.zeros(grid[0] * grid[1], dtype=torch.bool)
    kept[keep] = True
    partial = 0
    for c in cell.unique():
        inside = kept[cell == c]
        partial += int(inside.any() and not inside.all())
    return partial


def test_block_keeps_whole_cells_except_at_most_one():
    g = _gen(3)
    for grid, k, b in [((16, 16), 128, 4), ((8, 32), 100, 4), ((12, 20), 77, 3), ((5, 7), 11, 2)]:
        for _ in range(5):
            keep = block(grid, k, g, block_size=b)
            fewest = min(_partial_cells(keep, grid, b, (oy, ox)) for oy in range(b) for ox in range(b))
            assert fewest <= 1, (grid, k, b)


def test_block_is_spatially_clustered_unlike_uniform():
    """Kept/dropped neighbour pairs: far fewer for blocks than for a random subset of the same size."""

    def boundary(keep, h, w):
        m = torch.zeros(h * w, dtype=torch.bool)
        m[keep] = True
        m = m.view(h, w)
        return int((m[1:] != m[:-1]).sum() + (m[:, 1:] != m[:, :-1]).sum())

    g = _gen(4)
    blocky = sum(boundary(block((16, 16), 128, g, block_size=4), 16, 16) for _ in range(20))
    random_ = sum(boundary(uniform_random((16, 16), 128, g), 16, 16) for _ in range(20))
    assert blocky < 0.6 * random_, (blocky, random_)


def test_block_size_one_is_uniform_and_bad_size_errors():
    assert block((3, 3), 9, _gen(), block_size=1).tolist() == list(range(9))
    with pytest.raises(ValueError, match="block_size=0"):
        block((3, 3), 4, _gen(), block_size=0)


# ----------------------------------------------------------------------------------------------------
# crop: one window with the image's aspect ratio
# ----------------------------------------------------------------------------------------------------


def _rows_cols(keep, w):
    return keep // w, keep % w


@pytest.mark.parametrize(
    "grid,k,shape", [((8, 16), 32, (4, 8)), ((6, 6), 9, (3, 3)), ((1, 32), 5, (1, 5)), ((16, 8), 50, (10, 5))]
)
def test_crop_keeps_a_full_rectangle_when_the_count_fills_one(grid, k, shape):
    assert window_shape(grid, k) == shape
    g = _gen(7)
    for _ in range(10):
        keep = crop_window(grid, k, g)
        rows, cols = _rows_cols(keep, grid[1])
        r0, c0 = int(rows.min()), int(cols.min())
        expect = torch.tensor([(r0 + i) * grid[1] + c0 + j for i in range(shape[0]) for j in range(shape[1])])
        assert torch.equal(keep, expect)


def test_crop_trims_only_the_last_column_or_row_of_its_window():
    g = _gen(8)
    for (h, w), k in _cases():
        rows_w, cols_w = window_shape((h, w), k)
        assert rows_w <= h and cols_w <= w and rows_w * cols_w >= k
        excess = rows_w * cols_w - k
        assert excess < max(rows_w, cols_w)
        keep = crop_window((h, w), k, g)
        rows, cols = _rows_cols(keep, w)
        r0, c0 = int(rows.min()), int(cols.min())
        assert int(rows.max()) - r0 < rows_w and int(cols.max()) - c0 < cols_w
        # Everything outside the last column (or the last row) of the window is kept.
        window = torch.zeros(rows_w, cols_w, dtype=torch.bool)
        window[rows - r0, cols - c0] = True
        if excess < rows_w:
            assert bool(window[:, :-1].all()) and bool(window[: rows_w - excess, -1].all())
        else:
            assert bool(window[:-1].all()) and bool(window[-1, : cols_w - excess].all())


def test_crop_window_follows_the_image_aspect():
    assert window_shape((8, 32), 64) == (4, 16)
    assert window_shape((32, 8), 64) == (16, 4)
    assert window_shape((16, 16), 128) == (11, 12)


# ----------------------------------------------------------------------------------------------------
# strided: a regular lattice, topped up at random
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid,k,stride", [((16, 16), 64, (2, 2)), ((12, 12), 16, (3, 3)), ((8, 32), 64, (2, 2))])
def test_strided_kept_rows_and_columns_are_evenly_spaced(grid, k, stride):
    assert lattice_strides(grid, k) == (stride,)
    g = _gen(9)
    for _ in range(10):
        keep = strided(grid, k, g)
        rows, cols = _rows_cols(keep, grid[1])
        urows, ucols = rows.unique(), cols.unique()
        assert set(torch.diff(urows).tolist()) == {stride[0]}
        assert set(torch.diff(ucols).tolist()) == {stride[1]}
        assert len(urows) * len(ucols) == k  # the full product: a lattice, nothing else


def test_strided_half_is_every_other_row_or_column():
    assert set(lattice_strides((16, 16), 128)) == {(1, 2), (2, 1)}


def test_strided_contains_a_whole_lattice_of_the_best_size():
    g = _gen(10)
    for (h, w), k in _cases():
        keep = set(strided((h, w), k, g).tolist())
        sy, sx = lattice_strides((h, w), k)[0]
        rows, cols = -(-h // sy), -(-w // sx)
        found = False
        for cand_sy, cand_sx in lattice_strides((h, w), k):
            nr, nc = -(-h // cand_sy), -(-w // cand_sx)
            assert nr * nc == rows * cols <= k
            for oy in range(h - (nr - 1) * cand_sy):
                for ox in range(w - (nc - 1) * cand_sx):
                    pts = {(oy + i * cand_sy) * w + ox + j * cand_sx for i in range(nr) for j in range(nc)}
                    found = found or pts <= keep
        assert found, ((h, w), k)


# ----------------------------------------------------------------------------------------------------
# MaskConfig: counts, distributions, schedules, errors
# ----------------------------------------------------------------------------------------------------


def test_constant_ratio_rounds_half_up():
    cfg = MaskConfig(keep_ratio=0.5)
    assert num_keep_for(256, cfg) == 128
    assert num_keep_for(255, cfg) == 128  # 127.5 -> 128
    assert num_keep_for(253, cfg) == 127  # 126.5 -> 127
    assert num_keep_for(1, cfg) == 1  # 0.5 -> 1, and min_keep anyway


def test_beta_ratio_has_the_configured_mean_and_varies_per_image():
    g = _gen(11)
    for mean in (0.5, 0.3):
        cfg = MaskConfig(keep_ratio=mean, ratio_distribution="beta")
        ratios = torch.tensor([num_keep_for(1000, cfg, 0, g) / 1000 for _ in range(3000)])
        assert abs(float(ratios.mean()) - mean) < 0.015, float(ratios.mean())
        # NaViT's variance 0.3 * mu * (1 - mu).
        assert abs(float(ratios.var()) - 0.3 * mean * (1 - mean)) < 0.015


def test_resolution_dependent_counts_by_hand():
    cfg = MaskConfig(keep_ratio=0.5, resolution_dependent=True, reference_tokens=256, resolution_exponent=0.5)
    assert num_keep_for(256, cfg) == 128  # K_ref
    assert num_keep_for(64, cfg) == 64  # min(64, 128 * 0.5)
    assert num_keep_for(1024, cfg) == 256  # 128 * 2
    assert num_keep_for(144, cfg) == 96  # 128 * 0.75
    linear = MaskConfig(keep_ratio=0.5, resolution_dependent=True, resolution_exponent=1.0)
    assert num_keep_for(100, linear) == 50


def test_keep_count_constant_and_short_images():
    cfg = MaskConfig(keep_count=128)
    assert num_keep_for(256, cfg) == 128
    assert num_keep_for(200, cfg) == 128
    assert num_keep_for(64, cfg) == 64  # fewer than K: keeps all
    strict = MaskConfig(keep_count=128, allow_short_images=False)
    with pytest.raises(ValueError, match=r"64 tokens, fewer than keep_count=128.*allow_short_images=True"):
        num_keep_for(64, strict)


def test_min_keep_floor():
    cfg = MaskConfig(keep_ratio=0.1, min_keep=16)
    assert num_keep_for(64, cfg) == 16
    assert num_keep_for(8, cfg) == 8  # an image smaller than min_keep keeps all it has
    assert num_keep_for(1000, cfg) == 100


def test_linear_and_cosine_schedules_by_hand():
    lin = MaskConfig(keep_ratio=0.5, schedule="linear", schedule_steps=1000, final_unmasked_steps=200)
    # decays over D = 800 steps: keep = 1 - (1 - step / 800) * 0.5
    assert keep_ratio_at(0, lin) == pytest.approx(0.5)
    assert keep_ratio_at(400, lin) == pytest.approx(0.75)
    assert keep_ratio_at(600, lin) == pytest.approx(0.875)
    assert keep_ratio_at(800, lin) == pytest.approx(1.0)
    assert keep_ratio_at(5000, lin) == pytest.approx(1.0)
    assert mask_ratio_at(400, lin) == pytest.approx(0.25)
    cos = MaskConfig(keep_ratio=0.5, schedule="cosine", schedule_steps=800)
    assert keep_ratio_at(0, cos) == pytest.approx(0.5)
    assert keep_ratio_at(200, cos) == pytest.approx(1 - 0.5 * (1 + math.cos(math.pi / 4)) / 2)  # 0.57322
    assert keep_ratio_at(400, cos) == pytest.approx(0.75)
    assert keep_ratio_at(800, cos) == pytest.approx(1.0)
    assert num_keep_for(256, lin, 400) == 192
    assert num_keep_for(256, cos, 200) == round(256 * 0.5732233)


def test_constant_schedule_then_unmasked_fine_tune_keeps_everything():
    cfg = MaskConfig(keep_ratio=0.5, schedule_steps=1000, final_unmasked_steps=100)
    assert keep_ratio_at(0, cfg) == 0.5 and keep_ratio_at(899, cfg) == 0.5
    assert keep_ratio_at(900, cfg) == 1.0 and keep_ratio_at(999, cfg) == 1.0
    assert num_keep_for(256, cfg, 950) == 256
    for name in STRATEGIES:
        cfg = MaskConfig(strategy=name, keep_ratio=0.5, schedule_steps=1000, final_unmasked_steps=100)
        assert torch.equal(choose_keep((12, 20), cfg, 900, _gen()), torch.arange(240))
        assert choose_keep((12, 20), cfg, 899, _gen()).shape == (120,)
    counted = MaskConfig(keep_count=64, schedule_steps=10, final_unmasked_steps=5)
    assert num_keep_for(256, counted, 4) == 64 and num_keep_for(256, counted, 5) == 256
    forever = MaskConfig(keep_ratio=0.5)
    assert keep_ratio_at(10**9, forever) == 0.5


def test_interleaved_unmasked_steps_keep_everything_every_nth_step():
    cfg = MaskConfig(keep_ratio=0.5, unmasked_every=4)
    assert [keep_ratio_at(s, cfg) for s in range(8)] == [0.5, 0.5, 0.5, 1.0, 0.5, 0.5, 0.5, 1.0]
    assert torch.equal(choose_keep((12, 20), cfg, 3, _gen()), torch.arange(240))
    assert choose_keep((12, 20), cfg, 4, _gen()).shape == (120,)
    # With a fine-tune too: the interleaved steps before it, every step after it.
    both = MaskConfig(keep_ratio=0.5, unmasked_every=3, schedule_steps=10, final_unmasked_steps=2)
    assert [keep_ratio_at(s, both) for s in range(10)] == [0.5, 0.5, 1.0, 0.5, 0.5, 1.0, 0.5, 0.5, 1.0, 1.0]


def test_choose_keep_draws_count_and_positions_reproducibly():
    cfg = MaskConfig(strategy="block", keep_ratio=0.5, ratio_distribution="beta")
    a = choose_keep((16, 16), cfg, 0, per_image_generator(3, 1, 42))
    b = choose_keep((16, 16), cfg, 0, per_image_generator(3, 1, 42))
    assert torch.equal(a, b)
    # The sampler can predict the count from a fresh generator with the same seed.
    assert a.shape[0] == num_keep_for(256, cfg, 0, per_image_generator(3, 1, 42))
    assert per_image_generator(0, 1, 5).initial_seed() != per_image_generator(1, 0, 5).initial_seed()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(keep_ratio=0.0), r"keep_ratio=0.0 is outside \(0, 1\]"),
        (dict(keep_ratio=1.5), r"keep_ratio=1.5 is outside \(0, 1\]"),
        (dict(keep_ratio=-0.2), r"keep_ratio=-0.2 is outside \(0, 1\]"),
        (dict(keep_ratio=None, keep_count=-3), "keep_count=-3 must be a positive"),
        (dict(keep_count=0), "keep_count=0 must be a positive"),
        (dict(keep_ratio=0.5, keep_count=100), "both set"),
        (dict(keep_ratio=None), "neither keep_ratio nor keep_count"),
        (dict(keep_count=64, ratio_distribution="beta"), "cannot be combined"),
        (dict(strategy="checker"), "unknown masking strategy 'checker'"),
        (dict(ratio_distribution="gauss"), "unknown ratio_distribution"),
        (dict(beta_concentration=0.0), "beta_concentration=0.0"),
        (dict(schedule="exp"), "unknown mask schedule 'exp'"),
        (dict(schedule="linear"), "needs schedule_steps"),
        (dict(final_unmasked_steps=10), "needs schedule_steps"),
        (dict(schedule_steps=10, final_unmasked_steps=11), "exceeds schedule_steps=10"),
        (dict(schedule="cosine", schedule_steps=10, final_unmasked_steps=10), "no steps left"),
        (dict(min_keep=0), "min_keep=0"),
        (dict(unmasked_every=1), "unmasked_every=1: every N-th step unmasked needs N >= 2"),
        (dict(unmasked_every=-2), "unmasked_every=-2"),
        (dict(resolution_dependent=True, resolution_exponent=-1.0), "resolution_exponent=-1.0"),
    ],
)
def test_config_errors_name_the_bad_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaskConfig(**kwargs)


def test_runtime_errors():
    with pytest.raises(ValueError, match="step=-1"):
        keep_ratio_at(-1, MaskConfig())
    with pytest.raises(ValueError, match="keep_count=64"):
        keep_ratio_at(0, MaskConfig(keep_count=64))
    with pytest.raises(ValueError, match="n_tokens=0"):
        num_keep_for(0, MaskConfig())
    with pytest.raises(ValueError, match="grid 0x4 is empty"):
        choose_keep((0, 4), MaskConfig())


# --- The full stream's bound under token batching (maskfit.data.pipeline.static_full_stream) -----------------


def _full_stream(sizes, config):
    """sum n_i + (K - sum k_i) for a bin of images with n_i tokens, whose kept counts fill K exactly."""
    kept = [num_keep_for(n, config) for n in sizes]
    return sum(sizes) - sum(kept), sum(kept)


@pytest.mark.parametrize("config", [MaskConfig(keep_ratio=0.5), MaskConfig(keep_ratio=0.75), MaskConfig(keep_ratio=0.25),
                                    MaskConfig(keep_count=5), MaskConfig(keep_ratio=0.5, resolution_dependent=True,
                                                                         reference_tokens=64)],
                         ids=["half", "three_quarters", "quarter", "count", "resolution_dependent"])
def test_no_bin_of_images_exceeds_the_full_stream_bound(config):
    K, largest, cap = 96, 64, 12
    bound = longest_full_stream(config, K, largest, max_images=cap)
    unbounded = longest_full_stream(config, K, largest)
    assert K <= bound <= unbounded
    rng = random.Random(0)
    worst = 0
    for trial in range(3000):
        # Bins as the sampler closes them: whole images while their kept counts fit K and the image cap; small
        # images are favoured in a third of the trials (their rounding drops the largest share).
        small = trial % 3 == 0
        sizes, kept = [], 0
        while len(sizes) < cap:
            n = rng.randint(1, 8 if small else largest)
            k = num_keep_for(n, config)
            if kept + k > K:
                break
            sizes.append(n)
            kept += k
        dropped, kept = _full_stream(sizes, config)
        worst = max(worst, K + dropped)
    assert worst <= bound
    # Images all of one size reach it: the bound is no looser than the worst bin of equal images.
    for n in range(1, largest + 1):
        count = min(cap, K // num_keep_for(n, config))
        dropped, _ = _full_stream([n] * count, config)
        assert K + dropped <= bound


def test_full_stream_bound_by_hand():
    # Half of every image: n <= 2k(n) for every n, and images of 64 tokens reach it.
    assert longest_full_stream(MaskConfig(keep_ratio=0.5), 32768, 256, max_images=320) == 65536
    # 3/4: a 3-token image keeps 2, so without an image cap 1.5 x; 320 images of <= 256 tokens allow 43 797.
    assert longest_full_stream(MaskConfig(keep_ratio=0.75), 32768, 256) == 49152
    assert longest_full_stream(MaskConfig(keep_ratio=0.75), 32768, 256, max_images=320) == 43797
    # Sizes beyond one 256-row block of the vertex search (the whole-matrix search gave the same values)
    assert longest_full_stream(MaskConfig(keep_ratio=0.75), 32768, 700, max_images=320) == 43797
    assert longest_full_stream(MaskConfig(keep_ratio=0.6), 20000, 513, max_images=50) == 30250
    # A constant count of 64 from images of at most 256 tokens: 4 x.
    assert longest_full_stream(MaskConfig(keep_count=64), 1024, 256, max_images=100) == 4096
    # The schedule only raises kept counts: the bound is full masking's.
    decaying = MaskConfig(keep_ratio=0.5, schedule="linear", schedule_steps=10, final_unmasked_steps=2)
    assert longest_full_stream(decaying, 32768, 256, max_images=320) == 65536
    # Beta draws: no bound.
    assert longest_full_stream(MaskConfig(keep_ratio=0.5, ratio_distribution="beta"), 32768, 256) is None
