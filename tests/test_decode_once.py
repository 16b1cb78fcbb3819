"""data.decode_once: an image folder decoded once into memory gives exactly the items of reading its files."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskfit.config import config_from_dict, load_config
from maskfit.data import datasets
from maskfit.data.datasets import ImageFolderDataset, ImageTransform

SIZES = [(40, 24), (17, 33), (64, 64), (23, 50), (31, 9)]  # (width, height): several aspect ratios


def make_folder(root: Path) -> Path:
    """2 classes of JPEG and PNG files of different sizes with random content (and one grayscale JPEG)."""
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for i, (w, h) in enumerate(SIZES):
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            img = Image.fromarray(arr)
            if i == 4:
                img.convert("L").save(root / f"class{c}" / f"img{i}.jpg", quality=85)
            elif i % 2:
                img.save(root / f"class{c}" / f"img{i}.png")
            else:
                img.save(root / f"class{c}" / f"img{i}.jpg", quality=85)
    return root


TRANSFORM = ImageTransform(token_budget=16, patch_px=4, random_crop=True, hflip=True, preprocess="mixed")


def test_decoded_items_equal_the_items_read_from_files(tmp_path):
    root = make_folder(tmp_path / "imgs")
    files = ImageFolderDataset(root, TRANSFORM, seed=7)
    memory = ImageFolderDataset(root, TRANSFORM, seed=7, decode_once=True)
    assert len(memory) == len(files) == 10
    for epoch in (0, 1):
        for i in range(len(files)):
            a, b = files.get(i, epoch), memory.get(i, epoch)
            assert a.label == b.label and a.x.shape == b.x.shape
            assert torch.equal(a.x, b.x), (i, epoch)
    for i in range(len(files)):  # a latent cache's versions too
        (ra, ca), (rb, cb) = files.versions(i), memory.versions(i)
        assert torch.equal(ra.x, rb.x) and (ca is None) == (cb is None) and (ca is None or torch.equal(ca, cb))


def test_decoded_images_are_uint8_arrays_aligned_with_the_samples(tmp_path):
    root = make_folder(tmp_path / "imgs")
    ds = ImageFolderDataset(root, TRANSFORM, decode_once=True)
    for (path, _), (decoded_path, arr) in zip(ds.samples, ds._decoded):
        assert decoded_path == path and arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
        assert np.array_equal(arr, np.asarray(datasets.load_rgb(path)))


def test_changing_samples_after_decoding_is_refused_not_misaligned(tmp_path):
    root = make_folder(tmp_path / "imgs")
    ds = ImageFolderDataset(root, TRANSFORM, decode_once=True)
    ds.samples = ds.samples[1:]  # what restrict_to_split does
    with pytest.raises(RuntimeError, match=r"call decode_all\(\) again"):
        ds.get(0)
    ds.decode_all()  # decodes the new list: items are again those of the files
    files = ImageFolderDataset(root, TRANSFORM)
    files.samples = files.samples[1:]
    assert torch.equal(ds.get(0, 1).x, files.get(0, 1).x)


def test_more_bytes_than_the_limit_are_refused(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "imgs")
    monkeypatch.setattr(datasets, "DECODE_ONCE_MAX_BYTES", 10_000)
    with pytest.raises(ValueError, match=r"decode_once: image folder \S*imgs is too large .* decoded from \d+ of its "
                                         r"10 images.*set data.decode_once=false .*latent cache \(maskfit prepare\)"):
        ImageFolderDataset(root, TRANSFORM, decode_once=True)
    ImageFolderDataset(root, TRANSFORM)  # reading files is not limited


@pytest.mark.parametrize("source", ["synthetic", "latents"])
def test_config_refuses_decode_once_without_an_image_folder(tmp_path, source):
    path = tmp_path / "run.toml"
    path.write_text(f'[data]\nsource = "{source}"\n')
    with pytest.raises(ValueError, match=f"data.decode_once=true decodes an image folder .*data.source='{source}'.*"
                                         "set data.decode_once=false"):
        load_config(path, overrides=["data.decode_once=true"])
    assert load_config(path).data.decode_once is False
    path.write_text(f'[data]\nsource = "folder"\nroot = {json.dumps(str(tmp_path))}\n')
    assert load_config(path, overrides=["data.decode_once=true"]).data.decode_once is True


def _run(root: Path, decode_once: bool, workers: int = 0, split: str = "all"):
    return config_from_dict({
        "model": {"preset": "FiTv2-tiny", "overrides": {"patch_size": 4, "num_classes": 4}},
        "data": {"source": "folder", "root": str(root), "token_budget": 16, "autoencoder": "identity",
                 "layout": "packed", "random_aspect_crop": True, "hflip": True, "num_workers": workers,
                 "decode_once": decode_once, "split": split, "holdout_fraction": 0.2},
        "diffusion": {"objective": "flow"},
        "mask": {"keep_ratio": 0.5},
        "train": {"steps": 4, "batch_size": 4, "device": "cpu", "seed": 3},
    })


@pytest.mark.parametrize("workers,split", [(0, "all"), (2, "all"), (0, "train")])
def test_training_batches_are_the_same_with_decode_once(tmp_path, workers, split):
    import shutil

    from maskfit.data.pipeline import build_training_data

    root = make_folder(tmp_path / "imgs")
    plain = build_training_data(_run(root, False, split=split), 4)
    want = [plain.next_batch(step) for step in range(4)]  # 10 (or 8) images / 4 per step: crosses into epoch 1
    decoded = build_training_data(_run(root, True, workers, split), 4)
    dataset = decoded.loader.dataset.dataset  # inside the loader's (index, epoch) wrapper
    assert dataset._decoded is not None and len(dataset) == (10 if split == "all" else 8)
    shutil.rmtree(root)  # the workers never read a file
    for step, a in enumerate(want):
        b = decoded.next_batch(step)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.y, b.y)
        assert torch.equal(a.layout.cu_seqlens, b.layout.cu_seqlens)
        assert torch.equal(a.mask.index, b.mask.index)


def test_workers_of_a_decoded_folder_are_forked_and_a_platform_without_fork_is_refused(tmp_path, monkeypatch):
    """Forked workers share the decoded pages; spawn or forkserver (Python 3.14's Linux default) would pickle
    every image into every worker, so the loader asks for fork, and refuses where there is none."""
    import multiprocessing

    from maskfit.data.datasets import ImageFolderDataset
    from maskfit.data.loader import worker_start_method

    root = make_folder(tmp_path / "imgs")
    decoded = ImageFolderDataset(root, decode_once=True)
    assert worker_start_method(decoded, num_workers=2) == "fork"
    assert worker_start_method(decoded, num_workers=0) is None  # no workers, nothing to share
    assert worker_start_method(ImageFolderDataset(root), num_workers=2) is None  # files: the default method
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn", "forkserver"])
    with pytest.raises(ValueError, match="this platform cannot fork; set data.decode_once=false"):
        worker_start_method(decoded, num_workers=2)
