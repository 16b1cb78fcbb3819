"""Speed accounting (maskfit.throughput) and the real training path's loader (batches built in workers)."""
import random

import pytest
import torch

from maskfit.config import config_from_dict
from maskfit.data.pipeline import apply_mask, build_training_data, mask_config
from maskfit.models.transformer import model_config
from maskfit.throughput import FlopModel, TokenSums, design_flops


@pytest.mark.parametrize("preset", ["FiT-B/2", "FiTv2-XL/2"])
@pytest.mark.parametrize("design", ["plain", "decoder", "mixer", "side_interp"])
def test_flop_model_equals_design_flops_summed_per_image(preset, design):
    cfg = model_config(preset, mask_design=design)
    model = FlopModel.of(cfg)
    rng = random.Random(0)
    pairs = [(nf, rng.randint(1, nf - 1)) for nf in (rng.randint(20, 256) for _ in range(12))]
    masked = sum((TokenSums(1, nk, nk * nk, nf, nf * nf) for nf, nk in pairs), TokenSums())
    full = sum((TokenSums(1, nf, nf * nf, nf, nf * nf) for nf, _ in pairs), TokenSums())
    assert model.step_flops(masked, True) == pytest.approx(sum(design_flops(cfg, nf, nk) for nf, nk in pairs), rel=1e-9)
    assert model.step_flops(full, False) == pytest.approx(sum(design_flops(cfg, nf, nf) for nf, _ in pairs), rel=1e-9)


def _config(workers: int, layout: str = "packed", **mask):
    return config_from_dict({
        "model": {"preset": "FiTv2-tiny", "overrides": {"patch_size": 4, "num_classes": 4}},
        "data": {"source": "synthetic", "num_images": 40, "num_classes": 4, "token_budget": 16,
                 "autoencoder": "identity", "layout": layout, "num_workers": workers},
        "diffusion": {"objective": "flow"},
        "mask": {"keep_ratio": 0.5, **mask},
        "train": {"steps": 20, "batch_size": 8, "device": "cpu", "seed": 5},
    })


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_workers_build_the_masks_the_main_process_would_draw(layout):
    """Batches built in 2 worker processes across an epoch boundary equal apply_mask on the plain collate."""
    cfg = _config(2, layout)
    data = build_training_data(cfg, 4)
    plain = build_training_data(_config(0, layout, keep_ratio=1.0), 4)  # same images, no mask
    for step in range(7):  # 40 images / 8 = 5 steps per epoch: crosses into epoch 1
        got = data.next_batch(step)
        epoch, b = divmod(step, 5)
        keys = [(int(i), epoch) for i in plain.loader.sampler.order(epoch)[b * 8 : (b + 1) * 8]]  # (index, epoch)
        want = apply_mask(plain.next_batch(step), mask_config(cfg), step, cfg.train.seed, keys)
        assert torch.equal(got.tokens, want.tokens)
        assert torch.equal(got.mask.index, want.mask.index)
        assert torch.equal(got.mask.layout.pos, want.mask.layout.pos)
        assert torch.equal(got.mask.layout.cu_seqlens, want.mask.layout.cu_seqlens)
        info = data.last_info
        assert info.step == step and info.masked and info.num_images == 8
        assert info.sums.kept == want.mask.layout.num_tokens
        assert info.sums.full == int(want.layout.grid.prod(dim=1).sum())


def test_a_resumed_loader_continues_at_the_step_it_stopped():
    cfg = _config(0)
    straight = build_training_data(cfg, 4)
    expected = [straight.next_batch(s) for s in range(9)]
    first = build_training_data(cfg, 4)
    for s in range(6):
        first.next_batch(s)
    resumed = build_training_data(cfg, 4)
    resumed.load_state_dict(first.state_dict())
    for s in range(6, 9):
        got = resumed.next_batch(s)
        assert torch.equal(got.tokens, expected[s].tokens) and torch.equal(got.mask.index, expected[s].mask.index)
