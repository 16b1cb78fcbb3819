"""Data pipeline: FiT's resize rule, synthetic classes and their classifier, image folders, loaders."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskfit.data.datasets import (
    ImageFileError,
    ImageFolderDataset,
    ImageListDataset,
    ImageTransform,
    SyntheticDataset,
    to_tensor_image,
    to_uint8,
)
from maskfit.data.loader import (
    ResumableBatchSampler,
    collate_packed,
    collate_padded,
    make_loader,
    patchify_item,
)
from maskfit.data.resize import fit_to_token_budget, random_aspect_crop
from maskfit.data.synthetic import (
    COLOURS,
    BACKGROUND,
    PATTERNS,
    SyntheticSizes,
    _pattern_mask,
    classify_synthetic,
    render,
    synthetic_class_accuracy,
)
from maskfit.tokens import from_padded, unpatchify

IMAGENETTE = Path("/work/shared/data/imagenette/train-64")

# ----------------------------------------------------------------------------------------------------
# resize
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, expected",
    [
        # 187500 px > 65536: scale sqrt(65536/187500) = 0.5912 -> 295.6 x 221.7 -> floor to 16: 288 x 208
        ((500, 375), (288, 208)),
        # under the budget area, short side 10 < 16: raised to 16, long side 1000*1.6 = 1600 (100 tokens)
        ((1000, 10), (1600, 16)),
        ((8, 8), (16, 16)),  # tiny image raised to one patch
        ((256, 256), (256, 256)),  # exactly the budget: unchanged
        # 3:1 over budget: sqrt(3)*256 = 443.4 -> 432 (27 patches), 443.4/3 = 147.8 -> 144 (9 patches)
        ((768, 256), (432, 144)),
        ((512, 128), (512, 128)),  # 32 x 8 = 256 tokens exactly: unchanged
        ((100, 60), (96, 48)),  # small image: floored, never upscaled
        ((10000, 10), (4096, 16)),  # beyond 256:1 the long side is capped at the budget (FiT would give h=0)
        ((12, 8), (16, 16)),  # tiny, short side raised (FiT raises w first and floors h to 0)
    ],
)
def test_fit_to_token_budget_hand_cases(size, expected):
    assert fit_to_token_budget(*size, token_budget=256, patch_px=16) == expected


def test_fit_to_token_budget_invariants_over_random_sizes():
    rng = np.random.default_rng(0)
    for _ in range(3000):
        p = int(rng.choice([1, 2, 4, 8, 16]))
        budget = int(rng.integers(1, 1100))
        w, h = (int(v) for v in np.exp(rng.uniform(0, math.log(3000), size=2)).round().clip(1))
        nw, nh = fit_to_token_budget(w, h, budget, p)
        assert nw % p == 0 and nh % p == 0
        assert nw >= p and nh >= p
        assert (nw // p) * (nh // p) <= budget, (w, h, budget, p, nw, nh)
        if w * h <= budget * p * p and min(w, h) >= p:  # small images are never upscaled
            assert nw <= w and nh <= h
        ratio = max(w, h) / min(w, h)
        if ratio <= budget:  # no capping needed: aspect ratio kept up to flooring each side to a patch
            err = abs(math.log((nw / nh) / (w / h)))
            assert err <= math.log1p(p / min(nw, nh)) + 1e-9, (w, h, budget, p, nw, nh)


def test_fit_to_token_budget_errors():
    with pytest.raises(ValueError, match="token_budget=0"):
        fit_to_token_budget(64, 64, token_budget=0, patch_px=16)
    with pytest.raises(ValueError, match="0x64"):
        fit_to_token_budget(0, 64, token_budget=16, patch_px=16)
    with pytest.raises(ValueError, match="patch_px"):
        fit_to_token_budget(64, 64, token_budget=16, patch_px=0)


def test_random_aspect_crop_log_uniform_ratios_inside_image():
    img = Image.new("RGB", (224, 224))
    rng = np.random.default_rng(0)
    ratios, areas = [], []
    for _ in range(300):
        c = random_aspect_crop(img, rng, ratio_range=(1 / 3, 3), min_area=0.25)
        assert 1 <= c.width <= 224 and 1 <= c.height <= 224
        ratios.append(c.width / c.height)
        areas.append(c.width * c.height / 224**2)
    logs = np.log(ratios)
    assert logs.min() >= math.log(1 / 3) - 0.02 and logs.max() <= math.log(3) + 0.02
    # log-uniform: about a third of the draws in each third of [log 1/3, log 3]
    thirds = np.histogram(logs, bins=3, range=(math.log(1 / 3), math.log(3)))[0] / len(logs)
    assert np.all(np.abs(thirds - 1 / 3) < 0.1), thirds
    assert min(areas) >= 0.25 - 0.02  # on a square every ratio in [1/3, 3] fits a quarter of the area
    a = random_aspect_crop(img, np.random.default_rng(5))
    b = random_aspect_crop(img, np.random.default_rng(5))
    assert a.size == b.size


# ----------------------------------------------------------------------------------------------------
# synthetic classes
# ----------------------------------------------------------------------------------------------------


def test_synthetic_dataset_deterministic_by_seed_and_varied_in_size():
    sizes = SyntheticSizes(token_budget=64, patch_px=4)
    a, b, c = (SyntheticDataset(64, 8, seed=s, sizes=sizes) for s in (0, 0, 1))
    for i in (0, 5, 63):
        assert torch.equal(a[i].x, b[i].x) and a[i].label == b[i].label
    assert any(a[i].x.shape != c[i].x.shape or not torch.equal(a[i].x, c[i].x) for i in range(8))
    shapes = [tuple(a[i].x.shape[1:]) for i in range(64)]
    assert len(set(shapes)) >= 10
    ratios = [w / h for h, w in shapes]
    assert min(ratios) < 0.6 and max(ratios) > 1.6  # both portrait and landscape
    for h, w in shapes:
        assert h % 4 == 0 and w % 4 == 0 and h >= 8 and w >= 8 and (h // 4) * (w // 4) <= 64
    assert sorted({a[i].label for i in range(64)}) == list(range(8))
    x = a[0].x
    assert x.dtype == torch.float32 and x.shape[0] == 3 and -1 <= x.min() and x.max() <= 1


def test_synthetic_hflip_depends_on_epoch_only():
    ds = SyntheticDataset(4, seed=0, hflip=True)
    plain = SyntheticDataset(4, seed=0)[0].x  # a disc off the centre: not its own mirror image
    assert not torch.equal(plain, plain.flip(-1))
    seen = set()
    for epoch in range(12):
        x = ds.get(0, epoch).x
        assert torch.equal(x, ds.get(0, epoch).x)
        if torch.equal(x, plain):
            seen.add("plain")
        elif torch.equal(x, plain.flip(-1)):
            seen.add("flipped")
        else:
            raise AssertionError("a flip must be the image or its mirror")
    assert seen == {"plain", "flipped"}


def test_class_accuracy_high_on_synthetic_samples_of_every_size():
    rng = np.random.default_rng(0)
    for w, h in [(8, 8), (8, 24), (24, 8), (16, 16), (32, 32), (52, 16), (64, 64), (96, 32)]:
        images = [render(k, w, h, rng) for k in range(8) for _ in range(4)]
        labels = [k for k in range(8) for _ in range(4)]
        assert synthetic_class_accuracy(images, labels) >= 0.9, (w, h)
    ds = SyntheticDataset(48, 8, seed=3, sizes=SyntheticSizes(token_budget=64, patch_px=4))
    images, labels = zip(*(ds.image(i) for i in range(48)))
    assert synthetic_class_accuracy(images, labels) >= 0.9
    # The measure is for generated images: mild pixel noise must not break it.
    noisy = [np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8) for img in images]
    assert synthetic_class_accuracy(noisy, labels) >= 0.9


def test_class_accuracy_about_chance_on_noise_and_shuffled_labels():
    rng = np.random.default_rng(1)
    noise = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(16, 16), (8, 24), (32, 32)] * 16]
    assert synthetic_class_accuracy(noise, [i % 8 for i in range(48)]) <= 0.2
    ds = SyntheticDataset(64, 8, seed=2)
    images, labels = zip(*(ds.image(i) for i in range(64)))
    assert synthetic_class_accuracy(images, [(y + 1) % 8 for y in labels]) <= 0.05  # every label wrong
    shuffled = rng.permutation(labels)
    assert synthetic_class_accuracy(images, shuffled) <= 0.35  # chance is 1/8


def test_class_accuracy_needs_pattern_not_only_colour():
    rng = np.random.default_rng(2)
    for k in range(8):
        other = (k + 3) % 8  # colour of class k, pattern of another class
        m = _pattern_mask(other, 24, 24, rng)[..., None]
        img = np.rint(BACKGROUND * (1 - m) + COLOURS[k] * m).astype(np.uint8)
        assert classify_synthetic(img) == -1, (PATTERNS[k], PATTERNS[other])
        assert classify_synthetic(render(k, 24, 24, rng)) == k


def test_class_accuracy_input_errors():
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        synthetic_class_accuracy([np.zeros((3, 8, 8), np.uint8)], [0])
    with pytest.raises(ValueError, match="2 labels"):
        synthetic_class_accuracy([np.zeros((8, 8, 3), np.uint8)], [0, 1])


# ----------------------------------------------------------------------------------------------------
# image folders
# ----------------------------------------------------------------------------------------------------


def _write(path: Path, w: int, h: int, seed: int) -> np.ndarray:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return arr


def test_image_folder_layout_resize_and_no_crop(tmp_path):
    small = _write(tmp_path / "b_cls" / "x.png", 32, 16, 0)  # 4 x 2 = 8 tokens of 8 px: fits as is
    _write(tmp_path / "a_cls" / "sub" / "y.PNG", 90, 30, 1)  # nested, upper-case extension
    (tmp_path / "a_cls" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path, ImageTransform(token_budget=16, patch_px=8))
    assert ds.classes == ["a_cls", "b_cls"] and len(ds) == 2
    big, little = ds[0], ds[1]
    assert big.label == 0 and little.label == 1
    # 2700 px > 16 * 64: scale 0.616 -> 55.4 x 18.5 -> floor to 8 px: 48 x 16 (returned as H, W)
    assert tuple(big.x.shape[1:]) == fit_to_token_budget(90, 30, 16, 8)[::-1] == (16, 48)
    assert -1 <= big.x.min() and big.x.max() <= 1
    # No crop, no resize when the image already fits: the pixels come back exactly.
    assert torch.equal(little.x, to_tensor_image(small))
    assert np.array_equal(to_uint8(little.x), small)


def test_image_folder_random_crop_and_flip_follow_epoch(tmp_path):
    _write(tmp_path / "c" / "img.png", 64, 64, 2)
    ds = ImageFolderDataset(tmp_path, ImageTransform(token_budget=64, patch_px=4, random_crop=True, hflip=True), seed=3)
    shapes = {tuple(ds.get(0, e).x.shape) for e in range(20)}
    assert len(shapes) >= 4  # the crop's aspect ratio changes with the epoch
    assert all((s[1] // 4) * (s[2] // 4) <= 64 for s in shapes)
    assert torch.equal(ds.get(0, 7).x, ds.get(0, 7).x)  # and is reproducible


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no class folders"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(FileNotFoundError, match="empty_class"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "empty_class" / "zero.jpg").write_bytes(b"")
    (tmp_path / "empty_class" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" * 10)
    buf = tmp_path / "good.jpg"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 100).save(buf, quality=90)
    (tmp_path / "empty_class" / "truncated.jpg").write_bytes(buf.read_bytes()[:300])
    buf.unlink()
    ds = ImageFolderDataset(tmp_path, ImageTransform(token_budget=16, patch_px=8))
    names = [p.name for p, _ in ds.samples]
    with pytest.raises(ImageFileError, match=r"corrupt\.jpg.*corrupt or not an image"):
        ds[names.index("corrupt.jpg")]
    with pytest.raises(ImageFileError, match=r"truncated\.jpg"):
        ds[names.index("truncated.jpg")]
    with pytest.raises(ImageFileError, match=r"zero\.jpg is empty \(0 bytes\)"):
        ds[names.index("zero.jpg")]


def test_image_list_dataset_channel_errors():
    good = torch.zeros(3, 8, 16)
    ds = ImageListDataset([good], [4], ImageTransform(token_budget=8, patch_px=4))
    assert ds[0].label == 4 and tuple(ds[0].x.shape) == (3, 8, 16)
    with pytest.raises(ValueError, match=r"image 0 has shape \(4, 8, 8\), expected \(3, H, W\)"):
        ImageListDataset([torch.zeros(4, 8, 8)], [0])
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        ImageListDataset([np.zeros((8, 8), np.uint8)], [0])
    with pytest.raises(ValueError, match="expected an RGB uint8 image"):
        to_tensor_image(np.zeros((8, 8, 4), np.uint8))


@pytest.mark.skipif(not IMAGENETTE.is_dir(), reason="shared Imagenette copy not present")
def test_imagenette_items_fit_budget_with_random_aspect():
    ds = ImageFolderDataset(IMAGENETTE, ImageTransform(token_budget=64, patch_px=4, random_crop=True))
    assert len(ds.classes) == 10
    shapes = [tuple(ds[i].x.shape[1:]) for i in range(0, len(ds), len(ds) // 6)]
    assert all((h // 4) * (w // 4) <= 64 and h % 4 == 0 and w % 4 == 0 for h, w in shapes)
    assert len(set(shapes)) > 1


# ----------------------------------------------------------------------------------------------------
# tokens and loaders
# ----------------------------------------------------------------------------------------------------


def test_patchify_item_and_collate_layouts_carry_same_tokens():
    ds = SyntheticDataset(6, 8, seed=0, sizes=SyntheticSizes(token_budget=64, patch_px=4))
    items = [patchify_item(ds[i].x, ds[i].label, 4) for i in range(6)]
    for i, it in enumerate(items):
        h, w = it.grid
        assert it.tokens.shape == (h * w, 3 * 16)
        assert torch.equal(unpatchify(it.tokens, it.grid, 4), ds[i].x)  # the tokens are the image
    packed = collate_packed(items)
    padded = collate_padded(items, seq_len=64)
    lengths = [it.tokens.shape[0] for it in items]
    assert packed.tokens.shape[0] == sum(lengths) and packed.layout.valid is None
    assert padded.tokens.shape == (6 * 64, 48) and int(padded.layout.valid.sum()) == sum(lengths)
    assert torch.equal(padded.y, packed.y) and padded.y.tolist() == [it.label for it in items]
    back = from_padded(padded)
    assert torch.equal(back.tokens, packed.tokens)
    assert torch.equal(back.layout.pos, packed.layout.pos)
    assert torch.equal(back.layout.cu_seqlens, packed.layout.cu_seqlens)
    # each image's slots in the padded stream start with its own tokens
    for b, it in enumerate(items):
        assert torch.equal(padded.tokens[b * 64 : b * 64 + lengths[b]], it.tokens)
    with pytest.raises(ValueError, match="seq_len=8"):
        collate_padded(items, seq_len=8)


def test_sampler_orders_and_ranks():
    s = ResumableBatchSampler(10, 3, seed=1)
    assert len(s) == 3
    e0 = [k for batch in s for k in batch]
    assert len({i for i, _ in e0}) == 9 and {e for _, e in e0} == {0}
    assert sorted(s.order(0).tolist()) == list(range(10))
    assert not np.array_equal(s.order(0), s.order(1))
    assert len(ResumableBatchSampler(10, 3, drop_last=False)) == 4
    r0, r1 = (list(ResumableBatchSampler(16, 2, seed=4, rank=r, world_size=2)) for r in (0, 1))
    order = ResumableBatchSampler(16, 2, seed=4).order(0)
    for b, (x, y) in enumerate(zip(r0, r1)):
        assert [i for i, _ in x + y] == order[b * 4 : b * 4 + 4].tolist()
    with pytest.raises(ValueError, match="drop_last=True"):
        ResumableBatchSampler(16, 2, rank=0, world_size=2, drop_last=False)


def _signature(batch) -> list:
    return [batch.y.tolist(), batch.tokens.sum().item(), batch.layout.grid.tolist()]


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_loader_resume_mid_epoch_reproduces_order(layout):
    ds = SyntheticDataset(20, 8, seed=0, sizes=SyntheticSizes(token_budget=16, patch_px=4), hflip=True)
    full = make_loader(ds, batch_size=3, layout=layout, seed=7)
    expected = [_signature(b) for _ in range(2) for b in full]
    assert len(expected) == 12 and full.state_dict()["epoch"] == 2
    if layout == "padded":
        assert next(iter(make_loader(ds, 3, "padded", seed=7))).tokens.shape[0] == 3 * 16

    first = make_loader(ds, batch_size=3, layout=layout, seed=7)
    got = []
    for b in first:
        got.append(_signature(b))
        if len(got) == 4:
            break
    state = first.state_dict()
    assert (state["epoch"], state["batch"]) == (0, 4)
    resumed = make_loader(ds, batch_size=3, layout=layout, seed=7, num_workers=2 if layout == "packed" else 0)
    resumed.load_state_dict(state)
    for _ in range(2):
        got.extend(_signature(b) for b in resumed)
    assert got == expected
    other = make_loader(ds, batch_size=4, layout=layout, seed=7)
    with pytest.raises(ValueError, match="batch_size"):
        other.load_state_dict(state)
