"""`maskfit bench` on CPU with a tiny model: the workload, token accounting and FLOPs are right."""
import pytest

from maskfit.bench import bench_sampling, bench_train_step, design_flops, imagenet_like_grids
from maskfit.models.transformer import flops_per_image, model_config


def test_imagenet_like_grids_fit_the_budget_and_mix_aspect_ratios():
    grids = imagenet_like_grids(400, token_budget=256, patch_px=16, seed=0)
    assert all(h * w <= 256 for h, w in grids)
    assert {(16, 16), (13, 18)} & set(grids)  # square and 4:3 images are both present
    fill = sum(h * w for h, w in grids) / (256 * len(grids))
    assert 0.85 < fill < 1.0  # most of the budget is real tokens (measured.md: ~95 %)


@pytest.mark.parametrize("mode,ratio", [("packed", 1.0), ("keep0.5", 0.5), ("count20", None)])
def test_train_step_counts_the_tokens_the_backbone_sees(mode, ratio):
    r = bench_train_step("FiT-tiny", mode, batch_size=6, attention="dense", compile=False, steps=1, warmup=1, device="cpu")
    if ratio is not None:
        assert abs(r.tokens_backbone - ratio * r.tokens_real) <= 6  # rounding per image
    else:
        assert r.tokens_backbone == 20 * 6
    assert r.images_per_s > 0 and r.mfu is None  # no peak FLOP/s known for a CPU


def test_design_flops_add_the_full_grid_modules():
    n_full, n_kept = 256, 128
    plain = design_flops(model_config("FiT-B/2-dit"), n_full, n_kept)
    assert plain == 3 * flops_per_image(model_config("FiT-B/2-dit"), n_kept)
    for design in ("decoder", "mixer", "side_interp"):
        assert design_flops(model_config("FiT-B/2-dit", mask_design=design), n_full, n_kept) > plain
    # Unmasked, the side-interpolator is skipped and nothing runs twice.
    cfg = model_config("FiT-B/2-dit", mask_design="side_interp")
    assert design_flops(cfg, n_full, n_full) == 3 * flops_per_image(cfg, n_full)


def test_sampling_bench_draws_every_image_in_both_layouts():
    for packed in (True, False):
        r = bench_sampling("FiTv2-tiny", num_images=10, batch=4, steps=1, packed=packed, attention="dense",
                           compile=False, device="cpu")
        assert r.num_images == 10 and r.images_per_s > 0
