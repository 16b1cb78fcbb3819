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
    assert r.swiglu_backward == "autograd"  # the Triton backward acts in compiled CUDA steps only


def test_design_flops_add_the_full_grid_modules():
    n_full, n_kept = 256, 128
    plain = design_flops(model_config("FiT-B/2-dit"), n_full, n_kept)
    assert plain == 3 * flops_per_image(model_config("FiT-B/2-dit"), n_kept)
    for design in ("decoder", "mixer", "side_interp"):
        assert design_flops(model_config("FiT-B/2-dit", mask_design=design), n_full, n_kept) > plain
    # MaskDiT's position embedding adds no matmul: the same count
    embedded = model_config("FiT-B/2-dit", mask_design="decoder", decoder_pos_embed=True)
    assert design_flops(embedded, n_full, n_kept) == design_flops(model_config("FiT-B/2-dit", mask_design="decoder"),
                                                                  n_full, n_kept)
    # Unmasked, the side-interpolator is skipped and nothing runs twice.
    cfg = model_config("FiT-B/2-dit", mask_design="side_interp")
    assert design_flops(cfg, n_full, n_full) == 3 * flops_per_image(cfg, n_full)


def test_sampling_bench_draws_every_image_in_both_layouts():
    for packed in (True, False):
        r = bench_sampling("FiTv2-tiny", num_images=10, batch=4, steps=1, packed=packed, attention="dense",
                           compile=False, device="cpu")
        assert r.num_images == 10 and r.images_per_s > 0


def test_data_bench_times_synthetic_loader_and_real_rows_of_one_config(tmp_path):
    """`maskfit bench --data CONFIG` (issue 14 item 2): three rows of the same model and mode, the real row read
    against the synthetic one, with the real loop's split of host time."""
    from maskfit.bench_data import bench_config
    from maskfit.config import config_from_dict

    cfg = config_from_dict({
        "model": {"preset": "FiTv2-tiny", "attention": "dense", "overrides": {"patch_size": 4, "num_classes": 4}},
        "data": {"source": "synthetic", "num_images": 64, "num_classes": 4, "token_budget": 16,
                 "autoencoder": "identity", "layout": "packed", "batching": "tokens", "tokens_per_step": 64,
                 "max_images_per_step": 12},
        "diffusion": {"objective": "flow"}, "mask": {"keep_ratio": 0.5, "design": "decoder"},
        "train": {"out_dir": str(tmp_path / "unused"), "steps": 3, "device": "cpu", "seed": 0},
    })
    synthetic, loader, real = bench_config(cfg, "tiny.toml", steps=3, warmup=1)
    assert [r.path for r in (synthetic, loader, real)] == ["synthetic", "loader", "real"]
    for r in (synthetic, loader, real):
        assert (r.model, r.design, r.keep_ratio, r.batching, r.steps) == ("FiTv2-tiny", "decoder", 0.5, "tokens", 3)
        assert r.images_per_s > 0
    assert synthetic.tokens_per_s > 0 and real.tokens_per_s > 0  # the real images' kept tokens, padding excluded
    assert real.real_over_synthetic == pytest.approx(real.images_per_s / synthetic.images_per_s, abs=1e-3)
    assert 0 <= real.loader_wait_fraction <= 1 and 0 < real.host_step_fraction <= 1
    assert synthetic.loader_wait_fraction is None  # only the real loop has a host split
    assert synthetic.ms_per_step > 0 and real.ms_per_step > 0
    assert real.gpu_ms_per_step is None  # CUDA events only
    assert not (tmp_path / "unused").exists()  # the bench trains in a temporary folder
    assert real.host_profile is None  # only on request


def test_data_bench_host_profile_reports_the_real_rows_window(tmp_path, capsys):
    """`maskfit bench --data CONFIG --profile`: the real row's timed window, by where the main thread was."""
    from maskfit.bench_data import bench_config
    from maskfit.config import config_from_dict

    cfg = config_from_dict({
        "model": {"preset": "FiTv2-tiny", "attention": "dense", "overrides": {"patch_size": 4, "num_classes": 4}},
        "data": {"source": "synthetic", "num_images": 64, "num_classes": 4, "token_budget": 16,
                 "autoencoder": "identity", "layout": "packed", "batching": "tokens", "tokens_per_step": 64,
                 "max_images_per_step": 12},
        "diffusion": {"objective": "flow"}, "mask": {"keep_ratio": 0.5},
        "train": {"out_dir": str(tmp_path / "unused"), "steps": 3, "device": "cpu", "seed": 0},
    })
    *_, real = bench_config(cfg, "tiny.toml", steps=12, warmup=1, host_profile=True)  # a window of ~50 samples
    profile = real.host_profile
    assert profile["samples"] > 10
    for shares in (profile["innermost"], profile["maskfit"]):
        assert 0 < sum(shares.values()) <= 1 + 1e-9 and len(shares) <= 10
    # no workers: the main thread both builds the batches (masks drawn in the data pipeline) and runs the step
    # (backward and optimizer under train_step itself)
    assert profile["maskfit"].get("train.py:train_step", 0) > 0.1
    data_files = ("datasets.py", "synthetic.py", "masking.py", "pipeline.py", "tokens.py", "transfer.py", "packing.py")
    assert sum(v for k, v in profile["maskfit"].items() if k.startswith(data_files)) > 0
    assert "host profile:" in capsys.readouterr().out


def test_data_bench_loader_row_times_several_rounds_of_the_prefetched_batches(tmp_path):
    """With workers, the loader row's window is at least 4x the batches they hold in flight (2 each), so batches
    begun while the prefetch queue drained cannot stand for the steady rate."""
    from maskfit.bench_data import bench_config
    from maskfit.config import config_from_dict

    cfg = config_from_dict({
        "model": {"preset": "FiTv2-tiny", "attention": "dense", "overrides": {"patch_size": 4, "num_classes": 4}},
        "data": {"source": "synthetic", "num_images": 64, "num_classes": 4, "token_budget": 16,
                 "autoencoder": "identity", "layout": "packed", "num_workers": 1},
        "diffusion": {"objective": "flow"},
        "train": {"out_dir": str(tmp_path / "unused"), "steps": 3, "batch_size": 4, "device": "cpu", "seed": 0},
    })
    synthetic, loader, real = bench_config(cfg, "tiny.toml", steps=3, warmup=1)
    assert (synthetic.steps, loader.steps, real.steps) == (3, 8, 3)
    assert loader.images_per_s > 0


def test_data_bench_host_profile_of_a_window_without_samples_keeps_the_row(tmp_path, capsys, monkeypatch):
    """A timed window shorter than the sampling interval has no samples: the row is kept, the profile left out,
    and the message says to time more steps."""
    import maskfit.hostprofile as hostprofile
    from maskfit.bench_data import bench_config
    from maskfit.config import config_from_dict

    original = hostprofile.StackSampler.__init__
    monkeypatch.setattr(hostprofile.StackSampler, "__init__",
                        lambda self, thread_id=None, interval=0.005: original(self, thread_id, interval=60.0))
    cfg = config_from_dict({
        "model": {"preset": "FiTv2-tiny", "attention": "dense", "overrides": {"patch_size": 4, "num_classes": 4}},
        "data": {"source": "synthetic", "num_images": 64, "num_classes": 4, "token_budget": 16,
                 "autoencoder": "identity", "layout": "packed"},
        "diffusion": {"objective": "flow"},
        "train": {"out_dir": str(tmp_path / "unused"), "steps": 3, "batch_size": 4, "device": "cpu", "seed": 0},
    })
    *_, real = bench_config(cfg, "tiny.toml", steps=2, warmup=1, host_profile=True)
    assert real.host_profile is None and real.images_per_s > 0
    out = capsys.readouterr().out
    assert "no samples in the window" in out and "raise --steps" in out
