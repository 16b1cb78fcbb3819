"""Token batching: a constant backbone token budget per step, packed from whole images, resumable."""
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from maskfit.config import config_from_dict
from maskfit.data.datasets import SyntheticDataset
from maskfit.data.pipeline import TokenBudgetSampler, build_training_data, token_grids
from maskfit.data.synthetic import SyntheticSizes
from maskfit.masking import MaskConfig
from maskfit.packing import dummy_grid, dummy_lengths
from maskfit.tokens import patchify

PATCH = 4
BUDGET = 64  # backbone tokens per step: ~6 images of the 4..16-token synthetic sizes below


def run_config(out: Path = Path("unused"), steps=6, mask=None, **data):
    raw = {
        "model": {"preset": "FiTv2-tiny", "overrides": {"patch_size": PATCH, "num_classes": 4}},
        "data": {"source": "synthetic", "num_images": 48, "num_classes": 4, "token_budget": 16,
                 "autoencoder": "identity", "layout": "packed", "batching": "tokens", "tokens_per_step": BUDGET,
                 **data},
        "diffusion": {"objective": "flow"},
        "optim": {"lr": 1e-3, "ema_decay": 0.9},
        "train": {"out_dir": str(out), "steps": steps, "log_every": 2, "ckpt_every": 3,
                  "device": "cpu", "seed": 3},
    }
    if mask is not None:
        raw["mask"] = mask
    return config_from_dict(raw)


def backbone(batch):
    """(tokens, layout) the plain design trains on (train.training_loss)."""
    if batch.mask is None:
        return batch.tokens, batch.layout
    return batch.tokens[batch.mask.index], batch.mask.layout


def real_counts(layout):
    """(B,) real tokens of each segment."""
    valid = torch.ones(layout.num_tokens, dtype=torch.bool) if layout.valid is None else layout.valid
    return torch.zeros(layout.num_images, dtype=torch.long).index_add_(0, layout.seq_id, valid.long())


# A linear decay to an unmasked fine-tune: kept counts change every step and the last steps keep all.
DECAYING = {"keep_ratio": 0.5, "ratio_distribution": "beta", "schedule": "linear", "final_unmasked_steps": 4}


@pytest.mark.parametrize("mask", [None, DECAYING], ids=["unmasked", "masked"])
def test_every_step_has_exactly_the_budget_and_whole_images_once_per_epoch(mask):
    steps = 22  # over two epochs of 48 images
    data = build_training_data(run_config(steps=steps, mask=mask), PATCH)
    dataset = data.loader.dataloader.dataset.dataset
    seen = defaultdict(list)  # epoch -> dataset indices in the order trained
    real = 0
    masked_steps = 0
    max_seqlens = {}
    for step in range(steps):
        batch = data.next_batch(step)
        plan = data.last_plan
        tokens, layout = backbone(batch)
        assert tokens.shape[0] == layout.num_tokens == BUDGET
        # Real images first, then dummy segments holding exactly the rest, all of it padding, none longer than
        # the per-image bound: max_seqlen is one value every step (a new one would recompile the model).
        counts = real_counts(layout)
        B = len(plan.indices)
        assert layout.num_images > B and int(counts[B:].sum()) == 0
        assert counts[:B].tolist() == list(plan.counts)
        assert int(layout.seqlens()[B:].sum()) == BUDGET - sum(plan.counts)
        assert int(layout.seqlens().max()) <= layout.max_seqlen == max_seqlens.setdefault("all", layout.max_seqlen)
        seen[plan.epoch].extend(plan.indices)
        real += sum(plan.counts)
        masked_steps += batch.mask is not None
        # Whole images: every segment of the full stream is its dataset item's complete token grid.
        full = batch.layout
        for b, i in enumerate(plan.indices):
            start, end = int(full.cu_seqlens[b]), int(full.cu_seqlens[b + 1])
            x = dataset.get(i, plan.epoch).x
            assert torch.equal(batch.tokens[start:end], patchify(x, PATCH))
            assert tuple(full.grid[b].tolist()) == (x.shape[1] // PATCH, x.shape[2] // PATCH)
        assert data.last_padding_fraction == pytest.approx(1 - sum(plan.counts) / BUDGET)
    assert data.padding_fraction() == pytest.approx(1 - real / (steps * BUDGET))
    *complete, last = sorted(seen)
    assert complete == list(range(last)) and len(complete) >= 2
    for epoch in complete:  # each image exactly once
        assert sorted(seen[epoch]) == list(range(48)), f"epoch {epoch}"
    assert len(set(seen[last])) == len(seen[last])
    if mask is not None:
        assert 0 < masked_steps < steps  # the schedule ends unmasked: both kinds of step were checked


def test_masked_budget_batches_give_valid_masked_views():
    data = build_training_data(run_config(steps=12, mask={"keep_ratio": 0.5}), PATCH)
    for step in range(12):
        batch = data.next_batch(step)
        plan = data.last_plan
        full, view = batch.layout, batch.mask
        B = len(plan.indices)
        index = view.index
        assert index.dtype == torch.long and int(index.min()) >= 0 and int(index.max()) < full.num_tokens
        assert len(set(index.tolist())) == index.numel()
        kept = view.layout
        # Each kept token sits in its own image at its true (row, col), and `keep` is its raster index.
        assert torch.equal(kept.seq_id, full.seq_id[index])
        assert torch.equal(kept.pos, full.pos[index])
        cols = full.grid[kept.seq_id, 1]
        assert torch.equal(kept.pos, torch.stack([kept.keep // cols, kept.keep % cols], dim=1))
        assert torch.equal(kept.grid, full.grid)
        assert kept.seqlens()[:B].tolist() == list(plan.counts)
        assert kept.cu_seqlens[-1] == BUDGET
        # Half of each image, within rounding.
        for b, (h, w) in enumerate(plan.grids):
            assert plan.counts[b] == max(1, math.floor(h * w * 0.5 + 0.5))
            segment = kept.keep[int(kept.cu_seqlens[b]) : int(kept.cu_seqlens[b + 1])]
            assert torch.equal(segment, segment.sort().values) and int(segment.max()) < h * w
        # The dummies: all of them kept, padding in both streams, zero tokens, ordinary grids, none longer than
        # the per-image bound; their count, and so the segment count, does not depend on the step.
        remaining = BUDGET - sum(plan.counts)
        dummy = kept.seq_id >= B
        assert int(dummy.sum()) == remaining
        assert torch.equal(~kept.valid, dummy) and torch.equal(~full.valid, full.seq_id >= B)
        assert torch.count_nonzero(batch.tokens[index[dummy]]) == 0
        lengths = kept.seqlens()[B:].tolist()
        assert lengths == dummy_lengths(remaining, kept.max_seqlen) and max(lengths) <= kept.max_seqlen
        for j, n in enumerate(lengths):
            assert tuple(full.grid[B + j].tolist()) == dummy_grid(n)
        assert batch.y.shape == (B + len(lengths),)


@pytest.mark.parametrize("mask", [None, MaskConfig(keep_ratio=0.5), MaskConfig(keep_ratio=0.5, ratio_distribution="beta")],
                         ids=["unmasked", "half", "beta"])
def test_padding_under_two_percent_on_fit_like_sizes(mask):
    # FiT-like sizes: aspect 1:3..3:1 and a quarter to all of a 64-token budget (mean ~36 tokens), with
    # a step of about 16 images' worth of backbone tokens; two epochs, end-of-epoch drains included.
    sizes = SyntheticSizes(token_budget=64, patch_px=4)
    grids = token_grids(SyntheticDataset(2048, 8, seed=0, sizes=sizes), 4)
    mean_kept = np.mean([h * w for h, w in (grids[i] for i in range(len(grids)))]) * (0.5 if mask else 1.0)
    budget = int(round(16 * mean_kept))
    sampler = TokenBudgetSampler(grids, budget, mask=mask, seed=1)
    real = bins = 0
    while sampler.epoch < 2:
        plan = sampler.next_bin()
        if plan.epoch == 2:
            break
        assert plan.tokens <= budget
        real, bins = real + plan.tokens, bins + 1
    padding = 1 - real / (bins * budget)
    assert padding < 0.02, f"padding {padding:.2%} at {budget} tokens per step"


def test_bins_never_exceed_the_budget_nor_the_image_cap():
    grids = token_grids(SyntheticDataset(300, 8, seed=2, sizes=SyntheticSizes(token_budget=64, patch_px=4)), 4)
    sampler = TokenBudgetSampler(grids, 200, mask=MaskConfig(keep_ratio=0.6, ratio_distribution="beta"),
                                 seed=0, max_images=5)
    seen = []
    while sampler.epoch == 0:
        plan = sampler.next_bin()
        if plan.epoch == 0:
            assert 1 <= len(plan.indices) <= 5 and plan.tokens <= 200
            seen.extend(plan.indices)
    assert sorted(seen) == list(range(300))


def _plain_bins(grids, budget, mask, seed, max_images, buffer_size, steps):
    """The bin rule as the sampler's docstring states it, written plainly: every pending image's count re-read
    at every pick, each from its own mask generator (the sampler reads each count once per bin and draws only
    where the count is random)."""
    from maskfit.data.pipeline import mask_generator
    from maskfit.masking import num_keep_for
    from maskfit.packing import pick_next

    epoch, cursor, pending, bins = 0, 0, [], []
    for step in range(steps):
        if cursor >= len(grids) and not pending:
            epoch, cursor = epoch + 1, 0
        order = np.random.default_rng([seed, epoch]).permutation(len(grids))

        def fill():
            nonlocal cursor
            while len(pending) < buffer_size and cursor < len(order):
                pending.append(int(order[cursor]))
                cursor += 1

        def length(i):
            n = grids[i][0] * grids[i][1]
            return n if mask is None else num_keep_for(n, mask, step, mask_generator(seed, epoch, i))

        room, chosen, counts = budget, [], []
        fill()
        while pending and (max_images is None or len(chosen) < max_images):
            lengths = [length(i) for i in pending]
            pick = pick_next(lengths, room)
            if pick is None:
                break
            chosen.append(pending.pop(pick))
            counts.append(lengths[pick])
            room -= lengths[pick]
            fill()
        bins.append((epoch, step, tuple(chosen), tuple(counts)))
    return bins


@pytest.mark.parametrize("mask", [
    None,
    MaskConfig(keep_ratio=0.5),
    MaskConfig(keep_ratio=0.6, ratio_distribution="beta"),
    MaskConfig(keep_ratio=0.5, resolution_dependent=True, reference_tokens=32),
    MaskConfig(keep_ratio=0.25, schedule="linear", schedule_steps=60, final_unmasked_steps=10),
    MaskConfig(keep_ratio=0.5, unmasked_every=4),
], ids=["unmasked", "half", "beta", "resdep", "linear+finetune", "every4"])
@pytest.mark.parametrize("max_images", [None, 5])
def test_sampler_bins_equal_the_plainly_written_rule(mask, max_images):
    # Three epochs of a small set (drains at the epoch ends included), a buffer smaller than a bin's images.
    grids = token_grids(SyntheticDataset(90, 8, seed=3, sizes=SyntheticSizes(token_budget=64, patch_px=4)), 4)
    sampler = TokenBudgetSampler(grids, 120, mask=mask, seed=2, max_images=max_images, buffer_size=6)
    steps = 70
    got = []
    for _ in range(steps):
        plan = sampler.next_bin()
        got.append((plan.epoch, plan.step, plan.indices, plan.counts))
    assert got == _plain_bins(grids, 120, mask, 2, max_images, 6, steps)
    assert got[-1][0] >= 2  # the run crossed two epoch boundaries


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_reproduces_bins_and_masks(workers):
    cfg = run_config(steps=20, mask={"keep_ratio": 0.5, "ratio_distribution": "beta"}, num_workers=workers)
    straight = build_training_data(cfg, PATCH)
    first = [straight.next_batch(s) for s in range(13)]  # crosses into the second epoch
    state = straight.state_dict()  # the loader has prefetched ahead with a worker: the state must not
    rest = [(straight.next_batch(s), straight.last_plan) for s in range(13, 20)]
    resumed = build_training_data(cfg, PATCH)
    resumed.load_state_dict(state)
    for step, (batch, plan) in enumerate(rest, start=13):
        again = resumed.next_batch(step)
        assert resumed.last_plan == plan
        assert torch.equal(again.tokens, batch.tokens) and torch.equal(again.mask.index, batch.mask.index)
        assert torch.equal(again.mask.layout.pos, batch.mask.layout.pos)
    assert resumed.padding_fraction() == pytest.approx(straight.padding_fraction())
    assert first[0].mask is not None


def test_resume_with_another_budget_is_a_clear_error():
    data = build_training_data(run_config(), PATCH)
    data.next_batch(0)
    other = build_training_data(run_config(tokens_per_step=80), PATCH)
    with pytest.raises(ValueError, match="tokens_per_step.*resume with the same"):
        other.load_state_dict(data.state_dict())


def test_steps_out_of_order_are_a_clear_error():
    data = build_training_data(run_config(), PATCH)
    with pytest.raises(ValueError, match=r"next_batch\(step=5\) got the bin planned for step 0"):
        data.next_batch(5)


@pytest.mark.parametrize(
    "data, match",
    [
        ({"layout": "padded"}, "batching='tokens'.*needs data.layout='packed'"),
        ({"tokens_per_step": 0}, r"needs data.tokens_per_step > 0 \(got 0\)"),
        ({"tokens_per_step": 8}, "tokens_per_step=8 is below data.token_budget=16"),
        ({"max_images_per_step": 0}, "max_images_per_step=0 must be at least 1"),
        ({"batching": "images", "max_images_per_step": 4}, "only applies to data.batching='tokens'"),
        ({"batching": "rows"}, "data.batching='rows'"),
    ],
)
def test_config_errors(data, match):
    with pytest.raises(ValueError, match=match):
        run_config(**data)


def test_the_dummy_segment_is_left_out_of_full_grid_losses():
    from maskfit.objective import token_weights

    cfg = run_config(mask={"keep_ratio": 0.5, "design": "decoder", "aux_loss_weight": 0.1})
    data = build_training_data(cfg, PATCH)
    batches = (data.next_batch(step) for step in range(30))
    batch = next(b for b in batches if not bool(b.layout.valid.all()))  # a step whose dummy segment is not empty
    weights = token_weights(batch.layout, batch.mask, 0.1, predicts_dropped=True)
    real = batch.layout.valid
    assert bool((weights[~real] == 0).all())
    # Every real image sums to 1 (kept) + 0.1 (dropped); the dummy and empty segments to 0.
    per_image = torch.zeros(batch.layout.num_images).index_add(0, batch.layout.seq_id, weights)
    has_real = torch.zeros(batch.layout.num_images).index_add(0, batch.layout.seq_id, real.float()) > 0
    torch.testing.assert_close(per_image[has_real], torch.full((int(has_real.sum()),), 1.1))
    assert bool((per_image[~has_real] == 0).all())


@pytest.mark.parametrize(
    "mask",
    [None, {"keep_ratio": 0.5}, {"keep_ratio": 0.5, "design": "decoder", "decoder_depth": 1, "decoder_hidden": 32,
                                 "decoder_heads": 2}],
    ids=["unmasked", "masked", "masked-decoder"],
)
def test_tiny_training_run_with_a_token_budget(tmp_path, mask):
    from maskfit.train import train

    result = train(run_config(tmp_path / "run", steps=4, mask=mask), progress=False)
    assert result.step == 4
    assert result.losses and all(math.isfinite(v) for v in result.losses)


def _loaded_grid(dataset, i, patch):
    x = dataset[i].x  # (C, H, W)
    return (x.shape[1] // patch, x.shape[2] // patch)


def test_grids_read_without_decoding_match_the_loaded_images(tmp_path):
    from PIL import Image

    from maskfit.data.datasets import ImageFolderDataset, ImageListDataset, ImageTransform
    from maskfit.data.latents import IdentityAutoencoder, LatentCacheDataset, build_latent_cache

    rng = np.random.default_rng(0)
    shapes = [(37, 90), (64, 64), (120, 30), (9, 200), (50, 51)]  # (H, W): downscaled, kept, extreme
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    for i, arr in enumerate(arrays):
        (tmp_path / "imgs" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(tmp_path / "imgs" / f"c{i % 2}" / f"{i}.png")
    transform = ImageTransform(token_budget=16, patch_px=PATCH)
    folder = ImageFolderDataset(tmp_path / "imgs", transform=transform)
    images = ImageListDataset(arrays, [0] * len(arrays), transform=transform)
    synthetic = SyntheticDataset(6, 4, seed=5, sizes=SyntheticSizes(token_budget=16, patch_px=PATCH))
    build_latent_cache(synthetic, IdentityAutoencoder(), tmp_path / "cache", flips=False, progress=False)
    latents = LatentCacheDataset(tmp_path / "cache")
    for dataset in (folder, images, synthetic, latents):
        grids = token_grids(dataset, PATCH)
        read = [grids[i] for i in range(len(dataset))]
        assert read == [_loaded_grid(dataset, i, PATCH) for i in range(len(dataset))]
        assert len(set(read)) > 1  # the sizes really differ (a swapped h, w would show)


@pytest.mark.parametrize("preprocess", ["flexible", "mixed"])
def test_random_crop_grids_are_replayed_per_epoch_as_loading_draws_them(tmp_path, preprocess):
    """Random aspect crops change each image's grid every epoch; the sampler replays each epoch's crop (and
    FiTv2's mixed choice) from the image size alone and gets the grid loading produces."""
    from PIL import Image

    from maskfit.data.datasets import ImageFolderDataset, ImageListDataset, ImageTransform

    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in ((64, 64), (48, 80), (100, 40), (70, 70))]
    for i, arr in enumerate(arrays):
        (tmp_path / "imgs" / "c0").mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(tmp_path / "imgs" / "c0" / f"{i}.png")
    transform = ImageTransform(token_budget=64, patch_px=PATCH, random_crop=True, preprocess=preprocess)
    for dataset in (ImageFolderDataset(tmp_path / "imgs", transform=transform, seed=7),
                    ImageFolderDataset(tmp_path / "imgs", transform=transform, seed=7, decode_once=True),
                    ImageListDataset(arrays, [0] * len(arrays), transform=transform, seed=7)):
        grids = token_grids(dataset, PATCH)
        seen = set()
        for epoch in (0, 1, 2, 5):
            for i in range(len(dataset)):
                x = dataset.get(i, epoch).x  # (3, H, W)
                assert grids.at(i, epoch) == (x.shape[1] // PATCH, x.shape[2] // PATCH), (epoch, i)
                seen.add(grids.at(i, epoch))
        assert len(seen) > 4  # the crops really change the grids
        # "flexible" replays the epoch's first two draws at once; "mixed" needs the item's generator
        assert grids._replay is (preprocess == "flexible")


def test_an_epoch_replayed_at_once_gives_the_grids_of_one_generator_per_item():
    """The planner's vectorised replay (maskfit.data.rng_replay) against the plain rule it replaces,
    ImageTransform.output_size with the item's own generator, over many sizes, seeds and epochs."""
    from maskfit.data.datasets import ImageTransform, item_rng
    from maskfit.data.pipeline import RandomCropTokenGrids

    rng = np.random.default_rng(3)
    sizes = [tuple(int(v) for v in rng.integers(8, 300, 2)) for _ in range(1500)]  # (W, H)
    transform = ImageTransform(token_budget=256, patch_px=4, random_crop=True, crop_ratio_range=(0.25, 4.0),
                               crop_min_area=0.2)
    for seed in (0, 11, 2**32 - 1):
        grids = RandomCropTokenGrids(len(sizes), lambda i: sizes[i], transform, seed)
        for epoch in (0, 1, 9):
            for i, (w0, h0) in enumerate(sizes):
                w, h = transform.output_size(w0, h0, item_rng(seed, epoch, i))
                assert grids.at(i, epoch) == (h // 4, w // 4), (seed, epoch, i)
        assert grids._replay is True
    # a seed past 32 bits (two entropy words in numpy) takes the generators
    assert RandomCropTokenGrids(3, lambda i: (64, 64), transform, 2**32)._replay is False


def test_a_platform_whose_generators_differ_falls_back_to_them_with_a_warning(monkeypatch):
    import maskfit.data.rng_replay as rng_replay
    from maskfit.data.datasets import ImageTransform, item_rng
    from maskfit.data.pipeline import RandomCropTokenGrids

    monkeypatch.setattr(rng_replay, "agrees_with_numpy", lambda *args: False)
    transform = ImageTransform(token_budget=64, patch_px=4, random_crop=True)
    sizes = [(64, 64), (90, 40), (33, 70)]
    grids = RandomCropTokenGrids(len(sizes), lambda i: sizes[i], transform, seed=3)
    with pytest.warns(UserWarning, match="numpy's generators here differ from maskfit.data.rng_replay"):
        first = grids.at(0, 2)
    assert grids._replay is False
    for i, (w0, h0) in enumerate(sizes):
        w, h = transform.output_size(w0, h0, item_rng(3, 2, i))
        assert (first if i == 0 else grids.at(i, 2)) == (h // 4, w // 4)


def test_random_crops_of_an_unknown_dataset_cannot_be_packed_ahead():
    class Cropping(torch.utils.data.Dataset):
        from maskfit.data.datasets import ImageTransform

        transform = ImageTransform(16, PATCH, random_crop=True)

        def __len__(self):
            return 1

    with pytest.raises(ValueError, match="random_crop=True.*turn the random aspect crop off"):
        token_grids(Cropping(), PATCH)


def test_a_token_budget_run_on_randomly_cropped_images_trains_over_epochs(tmp_path):
    """A folder with random aspect crops under token batching (refused before): several epochs, each bin
    exactly what was planned (TrainingData checks every loaded grid against the plan)."""
    from PIL import Image

    from maskfit.train import train

    rng = np.random.default_rng(2)
    for i in range(8):
        (tmp_path / "imgs" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"c{i % 2}" / f"{i}.png")
    cfg = run_config(tmp_path / "run", steps=12, mask={"keep_ratio": 0.5}, source="folder",
                     root=str(tmp_path / "imgs"), num_classes=2, random_aspect_crop=True,
                     tokens_per_step=48)
    result = train(cfg, progress=False)
    assert result.step == 12 and result.images_seen > 2 * 8  # more than two epochs
    assert all(math.isfinite(v) for v in result.losses)


def test_a_resumed_token_budget_run_equals_an_uninterrupted_one(tmp_path):
    from safetensors.torch import load_file

    from maskfit import checkpoint as ckpt_io
    from maskfit.train import train

    mask = {"keep_ratio": 0.5, "ratio_distribution": "beta"}
    straight = train(run_config(tmp_path / "a", steps=6, mask=mask), progress=False)
    train(run_config(tmp_path / "b", steps=6, mask=mask), progress=False, stop_after=3)  # "crash" after 3
    resumed = train(run_config(tmp_path / "b", steps=6, mask=mask), progress=False)
    assert straight.step == resumed.step == 6
    wa = load_file(str(ckpt_io.latest_checkpoint(tmp_path / "a") / "model.safetensors"))
    wb = load_file(str(ckpt_io.latest_checkpoint(tmp_path / "b") / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_full_grid_designs_get_one_full_stream_length_every_masked_step():
    """decoder (and mixer, side-interpolator) see the full stream: under token batching it is padded to the bound
    of maskfit.masking.longest_full_stream, with the same segment count every step, so compiled steps see one
    shape; the extra padding is dropped (not kept), invalid, and changes nothing the plain design's stream holds."""
    from maskfit.data.pipeline import mask_config
    from maskfit.masking import longest_full_stream

    mask = {"keep_ratio": 0.5, "schedule": "linear", "final_unmasked_steps": 3}
    cfg = run_config(steps=12, mask={**mask, "design": "decoder"}, max_images_per_step=12)
    data = build_training_data(cfg, PATCH)
    plain = build_training_data(run_config(steps=12, mask=mask, max_images_per_step=12), PATCH)
    bound = longest_full_stream(mask_config(cfg), BUDGET, 16, max_images=12)
    assert bound > BUDGET
    shapes = set()
    for step in range(12):
        batch, reference = data.next_batch(step), plain.next_batch(step)
        B = len(data.last_plan.indices)
        if batch.mask is None:  # the unmasked fine-tune: the full stream is the backbone's, the budget
            assert batch.layout.num_tokens == BUDGET and step >= 9
            continue
        full, view = batch.layout, batch.mask
        shapes.add((full.num_tokens, full.num_images, view.layout.num_tokens, view.layout.num_images, full.max_seqlen))
        assert full.num_tokens == bound and view.layout.num_tokens == BUDGET
        # The plain design's batch of the same step: the same images, kept tokens and kept layout of real images.
        n_real = int(full.cu_seqlens[B])
        assert torch.equal(batch.tokens[:n_real], reference.tokens[:n_real])
        k_real = int(view.layout.cu_seqlens[B])
        assert torch.equal(view.index[:k_real], reference.mask.index[:k_real])
        assert torch.equal(view.layout.pos[:k_real], reference.mask.layout.pos[:k_real])
        # Padding: the kept dummies fill the budget, the rest is full-stream only; all of it invalid and zero.
        padding = full.seq_id >= B
        assert torch.equal(~full.valid, padding) and torch.count_nonzero(batch.tokens[padding]) == 0
        kept_padding = int((view.layout.seq_id >= B).sum())
        assert kept_padding == BUDGET - sum(data.last_plan.counts)
        assert bool((view.index[k_real:] >= n_real).all())
        assert int(padding.sum()) - kept_padding == bound - n_real - kept_padding >= 0
    assert len(shapes) == 1, shapes


def test_extra_full_stream_padding_changes_no_real_output_of_a_full_grid_design():
    """The same masked batch with its full stream padded to a static length and without: every design that runs
    on the full stream gives the same outputs on the real tokens (padding segments attend only to themselves)."""
    from maskfit.data.pipeline import pad_to_budget
    from maskfit.masking import choose_keep, longest_full_stream
    from maskfit.models.transformer import FiT, model_config
    from maskfit.tokens import pack

    torch.manual_seed(0)
    grids = [(4, 4), (2, 3), (3, 1), (4, 2)]
    images = [patchify(torch.randn(3, h * PATCH, w * PATCH), PATCH) for h, w in grids]  # (h*w, 48) each
    batch = pack(images, grids, torch.tensor([0, 1, 2, 3]))
    config = MaskConfig(keep_ratio=0.5)
    keep = [choose_keep(g, config, 0, torch.Generator().manual_seed(i)) for i, g in enumerate(grids)]
    budget, cap, max_images = 24, 16, 6
    bound = longest_full_stream(config, budget, cap, max_images=max_images)
    short = pad_to_budget(batch, keep, budget, max_images, segment_cap=cap)
    static = pad_to_budget(batch, keep, budget, max_images, segment_cap=cap, full_tokens=bound)
    assert static.layout.num_tokens == bound > short.layout.num_tokens
    n_real = int(batch.layout.num_tokens)
    for design in ("decoder", "mixer", "side_interp"):
        model = FiT(model_config("FiTv2-tiny", patch_size=PATCH, in_channels=3, num_classes=4, mask_design=design,
                                 decoder_depth=1, decoder_hidden=32, decoder_heads=2, mixer_depth=1, side_decode_depth=1))
        for p in model.parameters():  # adaLN-Zero and zero output layers would make every output 0
            torch.nn.init.normal_(p, std=0.05)
        outs = []
        for b in (short, static):
            t = torch.zeros(b.layout.num_images, dtype=torch.long).index_fill_(0, torch.arange(4), 500)
            y = torch.zeros(b.layout.num_images, dtype=torch.long)
            y[:4] = torch.tensor([0, 1, 2, 3])
            with torch.no_grad():
                outs.append(model(b.tokens, t, y, b.layout, mask=b.mask)[:n_real])
        assert torch.allclose(outs[0], outs[1], atol=1e-5), design
        assert outs[0].abs().max() > 0.01
    with pytest.raises(ValueError, match=r"more than full_tokens=30; compute the bound with"):
        pad_to_budget(batch, keep, budget, max_images, segment_cap=cap, full_tokens=30)


@pytest.mark.parametrize("design", ["decoder", "side_interp"])
def test_compiled_full_grid_design_compiles_once_under_token_batching(monkeypatch, tmp_path, design):
    """Dynamo traces the masked step's model once: the padded full stream brings the same shapes every step (the
    Dynamo-level recompile check needs no Inductor, so the eager backend keeps this quick on the CPU)."""
    import maskfit.runs as runs
    from maskfit.throughput import compile_stats
    from maskfit.train import build_training_run, train_step

    real_compile = torch.compile
    monkeypatch.setattr(runs.torch, "compile", lambda module, mode=None: real_compile(module, backend="eager"))
    torch._dynamo.reset()
    cfg = run_config(tmp_path, steps=6, mask={"keep_ratio": 0.5, "design": design, "side_decode_depth": 1},
                     max_images_per_step=12)
    cfg.train.compile = True
    data = build_training_data(cfg, PATCH)
    run = build_training_run(cfg, data.channels)
    lengths = set()
    for step in range(6):
        batch = data.next_batch(step)
        lengths.add(sum(data.last_plan.counts))
        train_step(run, batch, step)
        if step == 0:
            graphs = compile_stats()[0]
    assert len(lengths) > 1  # the real kept tokens differ between steps; the padded shapes do not
    assert graphs >= 1 and compile_stats()[0] == graphs


@pytest.mark.parametrize("batching", ["tokens", "images"])
def test_interleaved_unmasked_steps_train_the_decoder_on_the_full_grid_and_resume_exactly(tmp_path, batching):
    """mask.unmasked_every: every N-th step has no mask (the model sees the full grid it samples on), the others
    keep half; under token batching an unmasked step carries fewer images for the same tokens."""
    from safetensors.torch import load_file

    from maskfit import checkpoint as ckpt_io
    from maskfit.train import train

    mask = {"keep_ratio": 0.5, "design": "decoder", "decoder_hidden": 32, "decoder_heads": 2, "unmasked_every": 3}
    extra = {} if batching == "tokens" else {"batching": "images", "tokens_per_step": 0}

    def config(out):
        cfg = run_config(out, steps=6, mask=mask, **extra)
        if batching == "images":
            cfg.train.batch_size = 6
        return cfg

    data = build_training_data(config(tmp_path / "probe"), PATCH)
    masked = [data.next_batch(step).mask is not None for step in range(6)]
    assert masked == [True, True, False, True, True, False]
    straight = train(config(tmp_path / "a"), progress=False)
    train(config(tmp_path / "b"), progress=False, stop_after=3)
    resumed = train(config(tmp_path / "b"), progress=False)
    assert straight.step == resumed.step == 6
    wa = load_file(str(ckpt_io.latest_checkpoint(tmp_path / "a") / "model.safetensors"))
    wb = load_file(str(ckpt_io.latest_checkpoint(tmp_path / "b") / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_an_unreadable_file_s_size_names_the_file(tmp_path):
    """Token batching reads each image's size before loading it (the header, or the decoded array): a corrupt
    file fails there, naming the file and what to do."""
    from PIL import Image

    from maskfit.data.datasets import ImageFileError, ImageFolderDataset, ImageTransform

    (tmp_path / "imgs" / "c0").mkdir(parents=True)
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "imgs" / "c0" / "good.png")
    (tmp_path / "imgs" / "c0" / "bad.png").write_bytes(b"not an image")
    dataset = ImageFolderDataset(tmp_path / "imgs", transform=ImageTransform(token_budget=64, patch_px=PATCH,
                                                                             random_crop=True))
    assert [p.name for p, _ in dataset.samples] == ["bad.png", "good.png"]
    assert dataset.image_size(1) == (60, 40)
    grids = token_grids(dataset, PATCH)
    with pytest.raises(ImageFileError, match=r"cannot read the size of image file \S*bad.png .*replace it"):
        grids.at(0, 0)
