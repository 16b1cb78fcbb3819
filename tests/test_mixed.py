"""FiTv2 "Mixed" preprocessing (FiTv2 §IV-C, Algorithm 1): resize or centre crop, 50/50, for large images."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskfit.config import config_from_dict, load_config
from maskfit.data.datasets import ImageFolderDataset, ImageListDataset, ImageTransform
from maskfit.data.latents import IdentityAutoencoder, LatentCacheDataset, build_latent_cache
from maskfit.data.loader import make_loader
from maskfit.data.pipeline import build_training_data, token_grids
from maskfit.data.resize import center_crop_to_square, has_crop_version, square_side

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PATCH = 4
BUDGET = 16  # tokens per image: the square side is 4 tokens = 16 px
# (H, W): both sides > 16 px (two versions) | one side <= 16 | both small | both > 16, portrait
SHAPES = [(30, 40), (12, 50), (10, 14), (60, 20), (17, 21), (16, 90)]
HAS_CROP = [True, False, False, True, True, False]


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SHAPES]


def _transform(preprocess, hflip=False):
    return ImageTransform(token_budget=BUDGET, patch_px=PATCH, hflip=hflip, preprocess=preprocess)


def _grid(x):
    return (x.shape[-2] // PATCH, x.shape[-1] // PATCH)


# ---------------------------------------------------------------------------------------------------
# The crop version and who gets one
# ---------------------------------------------------------------------------------------------------


def test_square_side_and_which_images_have_a_crop_version():
    assert square_side(256, 16) == 256  # FiT's S for 256 tokens of 16 px
    assert square_side(200, 16) == 14 * 16  # not a square number: the largest square grid within it
    assert has_crop_version(257, 300, 256, 16)
    assert not has_crop_version(256, 1000, 256, 16)  # a side equal to S: resized only (FiT: H > S and W > S)
    assert not has_crop_version(1000, 200, 256, 16)
    assert [has_crop_version(w, h, BUDGET, PATCH) for h, w in SHAPES] == HAS_CROP


def test_crop_version_is_the_centre_crop_of_the_resized_image():
    # 1200 x 400 px in thirds (values 10 | 200 | 90): resized to 768 x 256, its centre 256 x 256 is the
    # middle third exactly.
    arr = np.zeros((400, 1200, 3), np.uint8)
    arr[:, :400], arr[:, 400:800], arr[:, 800:] = 10, 200, 90
    crop = np.asarray(center_crop_to_square(Image.fromarray(arr), 256, 16))
    assert crop.shape == (256, 256, 3)
    assert (crop[:, 8:-8] == 200).all()  # away from the bicubic ringing at the two borders
    assert crop[:, 0].mean() < 200 and crop[:, -1].mean() < 200  # the borders of the middle third
    # Odd offsets and a portrait image: equal to resizing the short side to S, then slicing the centre.
    rng = np.random.default_rng(1)
    for h, w in [(300, 1000), (999, 301), (257, 258)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        new_w, new_h = (256, round(h * 256 / w)) if w <= h else (round(w * 256 / h), 256)
        resized = np.asarray(img.resize((new_w, new_h), Image.BICUBIC))
        y0, x0 = (new_h - 256) // 2, (new_w - 256) // 2
        assert np.array_equal(np.asarray(center_crop_to_square(img, 256, 16)), resized[y0:y0 + 256, x0:x0 + 256])
    # A square image: its centre crop is its resize to the budget (both versions coincide).
    square = Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(center_crop_to_square(square, 256, 16)), np.asarray(square.resize((256, 256), Image.BICUBIC)))
    with pytest.raises(ValueError, match="both sides must exceed the square side 256"):
        center_crop_to_square(Image.new("RGB", (256, 900)), 256, 16)


# ---------------------------------------------------------------------------------------------------
# The random choice: frequencies, only large images, never under "flexible"
# ---------------------------------------------------------------------------------------------------


def _version(x, resized, crop) -> str:
    """Which stored version sample ``x`` is: 'resize' or 'crop', with '+flip' when mirrored."""
    for name, v in (("resize", resized), ("crop", crop)):
        if v is not None and x.shape == v.shape:
            if torch.equal(x, v):
                return name
            if torch.equal(x, v.flip(-1)):
                return name + "+flip"
    raise AssertionError(f"sample of shape {tuple(x.shape)} is neither version")


def test_mixed_picks_the_crop_half_the_time_and_only_for_large_images():
    arrays = _arrays()
    mixed = ImageListDataset(arrays, [0] * len(arrays), _transform("mixed", hflip=True), seed=5)
    flexible = ImageListDataset(arrays, [0] * len(arrays), _transform("flexible", hflip=True), seed=5)
    epochs = 400
    for i in range(len(SHAPES)):
        resized, crop = mixed.versions(i)
        assert (crop is not None) == HAS_CROP[i]  # smaller images have no crop version at all
        assert torch.equal(resized.x, flexible.versions(i)[0].x)
        picks = [_version(mixed.get(i, e).x, resized.x, crop) for e in range(epochs)]
        assert {_version(flexible.get(i, e).x, resized.x, crop).split("+")[0] for e in range(epochs)} == {"resize"}
        crops = sum(p.startswith("crop") for p in picks)
        if HAS_CROP[i]:
            assert set(picks) == {"resize", "resize+flip", "crop", "crop+flip"}  # choice and flip both vary
            assert abs(crops / epochs - 0.5) < 0.08  # 400 draws: 3.2 standard deviations
        else:
            assert crops == 0


def test_v1_configs_are_flexible_and_fitv2_configs_mixed():
    assert load_config(CONFIGS / "fit_b2_imagenet.toml").data.preprocess == "flexible"
    assert load_config(CONFIGS / "masked_b2_imagenet.toml").data.preprocess == "flexible"
    fitv2 = sorted(CONFIGS.glob("fitv2_*.toml"))
    assert fitv2 and all(load_config(p).data.preprocess == "mixed" for p in fitv2)
    assert config_from_dict({}).data.preprocess == "flexible"
    with pytest.raises(ValueError, match=r"data.preprocess='crop' is not one of \('flexible', 'mixed'\)"):
        config_from_dict({"data": {"preprocess": "crop"}})
    with pytest.raises(ValueError, match="preprocess='Mixed'"):
        ImageTransform(preprocess="Mixed")


# ---------------------------------------------------------------------------------------------------
# The latent cache
# ---------------------------------------------------------------------------------------------------


def _mixed_cache(tmp_path, seed=5):
    arrays = _arrays()
    images = ImageListDataset(arrays, list(range(len(arrays))), _transform("mixed"), seed=seed)
    build_latent_cache(images, IdentityAutoencoder(), tmp_path / "cache", batch_size=2, shard_size=4, progress=False)
    return images, tmp_path / "cache"


def test_cache_stores_both_versions_and_their_flips(tmp_path):
    images, cache_dir = _mixed_cache(tmp_path)
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert (manifest["preprocess"], manifest["crops"], manifest["flips"]) == ("mixed", sum(HAS_CROP), True)
    cache = LatentCacheDataset(cache_dir, train=False, preprocess="mixed")
    for i in range(len(SHAPES)):
        resized, crop = images.versions(i)
        assert torch.equal(cache.latent(i), resized.x) and torch.equal(cache.latent(i, flipped=True), resized.x.flip(-1))
        assert cache.has_crop(i) == HAS_CROP[i] == (crop is not None)
        if HAS_CROP[i]:
            assert crop.shape == (3, 16, 16)
            assert torch.equal(cache.latent(i, crop=True), crop)
            assert torch.equal(cache.latent(i, flipped=True, crop=True), crop.flip(-1))
        else:
            with pytest.raises(ValueError, match=f"item {i} .* has no centre-crop version"):
                cache.latent(i, crop=True)
        assert torch.equal(cache[i].x, resized.x)  # train=False: always the resize, unflipped


def test_cache_picks_exactly_what_the_image_path_picks(tmp_path):
    _, cache_dir = _mixed_cache(tmp_path, seed=5)
    arrays = _arrays()
    on_the_fly = ImageListDataset(arrays, list(range(len(arrays))), _transform("mixed", hflip=True), seed=5)
    cache = LatentCacheDataset(cache_dir, train=True, seed=5, preprocess="mixed")
    flexible = LatentCacheDataset(cache_dir, train=True, seed=5)  # a mixed cache serves FiT v1 too
    crop_seen = 0
    for e in range(12):
        for i in range(len(SHAPES)):
            x = cache.get(i, e).x
            assert torch.equal(x, on_the_fly.get(i, e).x)  # same version, same flip, same (seed, epoch, index)
            crop_seen += x.shape != cache.latent(i).shape
            assert flexible.get(i, e).x.shape == cache.latent(i).shape  # flexible: never the crop
    assert 0 < crop_seen < 12 * sum(HAS_CROP)


def test_a_mixed_run_needs_a_mixed_cache(tmp_path):
    arrays = _arrays()
    flexible = ImageListDataset(arrays, [0] * len(arrays), _transform("flexible"))
    build_latent_cache(flexible, IdentityAutoencoder(), tmp_path / "flex", progress=False)
    assert json.loads((tmp_path / "flex" / "manifest.json").read_text())["crops"] == 0
    with pytest.raises(ValueError, match="built with preprocess='flexible'.*--set data.preprocess=mixed"):
        LatentCacheDataset(tmp_path / "flex", preprocess="mixed")
    assert not LatentCacheDataset(tmp_path / "flex").has_crop(0)


def test_resumed_loader_picks_the_same_versions(tmp_path):
    _, cache_dir = _mixed_cache(tmp_path)

    def signature(batch):
        return [batch.y.tolist(), batch.tokens.sum().item(), batch.layout.grid.tolist()]

    def loader():
        return make_loader(LatentCacheDataset(cache_dir, seed=2, preprocess="mixed"), 2, "packed", seed=2)

    full = loader()
    expected = [signature(b) for _ in range(3) for b in full]  # 3 epochs of 3 batches
    cache = LatentCacheDataset(cache_dir)
    large_resized = {_grid(cache.latent(i)) for i in range(len(SHAPES)) if HAS_CROP[i]}
    assert (4, 4) not in large_resized and all(_grid(cache.latent(i)) != (4, 4) for i in range(len(SHAPES)))
    loaded = [tuple(g) for s in expected for g in s[2]]
    assert (4, 4) in loaded and large_resized & set(loaded)  # large images loaded as crops and as resizes
    first = loader()
    got = []
    for b in first:
        got.append(signature(b))
        if len(got) == 2:
            break
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    for _ in range(3):
        got.extend(signature(b) for b in resumed)
    assert got == expected


# ---------------------------------------------------------------------------------------------------
# Token batching packs the version each image will be loaded as, epoch by epoch
# ---------------------------------------------------------------------------------------------------


def _token_config(source, root, preprocess="mixed"):
    return config_from_dict({
        "model": {"preset": "FiTv2-tiny", "overrides": {"patch_size": PATCH, "num_classes": 6}},
        "data": {"source": source, "root": str(root), "token_budget": BUDGET, "autoencoder": "identity",
                 "layout": "packed", "batching": "tokens", "tokens_per_step": 40, "preprocess": preprocess},
        "diffusion": {"objective": "flow"},
        "train": {"steps": 10, "device": "cpu", "seed": 3},
    })


@pytest.mark.parametrize("source", ["folder", "latents"])
def test_token_batching_plans_the_grids_it_loads_over_two_epochs(tmp_path, source):
    arrays = _arrays()
    for i, arr in enumerate(arrays):
        (tmp_path / "imgs" / f"c{i}").mkdir(parents=True)
        Image.fromarray(arr).save(tmp_path / "imgs" / f"c{i}" / "img.png")
    root = tmp_path / "imgs"
    if source == "latents":
        folder = ImageFolderDataset(root, _transform("mixed"), seed=3)
        build_latent_cache(folder, IdentityAutoencoder(), tmp_path / "cache", progress=False)
        root = tmp_path / "cache"
    data = build_training_data(_token_config(source, root), PATCH)
    grids = token_grids(data.loader.dataloader.dataset.dataset, PATCH)
    planned = {}  # (epoch, index) -> grid
    steps = 0
    while len({e for e, _ in planned}) < 3:  # two whole epochs, then the first bin of a third
        data.next_batch(steps)  # raises if a loaded grid differs from the planned one
        plan = data.last_plan
        planned.update({(plan.epoch, i): g for i, g in zip(plan.indices, plan.grids)})
        steps += 1
    for e in (0, 1):
        assert sorted(i for ep, i in planned if ep == e) == list(range(len(SHAPES)))
        assert all(planned[e, i] == grids.at(i, e) for i in range(len(SHAPES)))
    # Large images really change version between epochs (so a grid read once would be wrong).
    changed = [i for i in range(len(SHAPES)) if planned[0, i] != planned[1, i]]
    assert changed and all(HAS_CROP[i] for i in changed)
    for e in range(8):  # and only they are ever loaded as the 4 x 4 crop
        for i in range(len(SHAPES)):
            if not HAS_CROP[i]:
                assert grids.at(i, e) == grids[i] != (4, 4)


def test_prepare_stores_crop_versions_for_a_mixed_config(tmp_path):
    from maskfit.cli import main

    for i, arr in enumerate(_arrays()):
        (tmp_path / "imgs" / f"c{i}").mkdir(parents=True)
        Image.fromarray(arr).save(tmp_path / "imgs" / f"c{i}" / "img.png")
    config = tmp_path / "run.json"
    config.write_text(json.dumps({
        "model": {"preset": "FiTv2-tiny", "overrides": {"patch_size": PATCH}},
        "data": {"source": "folder", "root": str(tmp_path / "imgs"), "token_budget": BUDGET, "autoencoder": "identity"},
    }))
    assert main(["prepare", str(config), "--out", str(tmp_path / "flex"), "--device", "cpu"]) == 0
    assert main(["prepare", str(config), "--out", str(tmp_path / "mixed"), "--device", "cpu",
                 "--set", "data.preprocess=mixed"]) == 0
    flex = json.loads((tmp_path / "flex" / "manifest.json").read_text())
    mixed = json.loads((tmp_path / "mixed" / "manifest.json").read_text())
    assert (flex["preprocess"], flex["crops"]) == ("flexible", 0)
    assert (mixed["preprocess"], mixed["crops"]) == ("mixed", sum(HAS_CROP))
    cache = LatentCacheDataset(tmp_path / "mixed", preprocess="mixed")
    assert [cache.has_crop(i) for i in range(len(SHAPES))] == HAS_CROP  # class folders keep the image order
