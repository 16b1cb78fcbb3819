"""Autoencoders (identity, SD-VAE wrapper on a tiny random AutoencoderKL) and the latent cache."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from maskfit.data.datasets import SyntheticDataset
from maskfit.data.latents import (
    SD_VAE_REPO,
    IdentityAutoencoder,
    LatentCacheDataset,
    SDVAE,
    build_latent_cache,
    encode_by_size,
)
from maskfit.data.loader import make_loader
from maskfit.data.synthetic import SyntheticSizes

diffusers = pytest.importorskip("diffusers")

SIZES = SyntheticSizes(token_budget=16, patch_px=4)  # 4 px per token = factor 2 x patch 2


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
    )
    path = tmp_path_factory.mktemp("tiny-vae")
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vae(vae_dir):
    return SDVAE.from_pretrained(vae_dir, device="cpu", dtype=torch.float32)


def test_sdvae_round_trip_shapes_and_scale(vae, vae_dir):
    assert (vae.channels, vae.factor, vae.scale) == (4, 2, 0.18215)
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    z = vae.encode(x)
    assert z.shape == (2, 4, 8, 12) and z.dtype == torch.float32
    y = vae.decode(z)
    assert y.shape == (2, 3, 16, 24)
    # The wrapper is exactly "posterior mean x 0.18215" and "decode(z / 0.18215)".
    raw = diffusers.AutoencoderKL.from_pretrained(vae_dir).eval()
    with torch.no_grad():
        mean = raw.encode(x).latent_dist.mean
        assert torch.allclose(z, mean * 0.18215, atol=1e-6)
        assert torch.allclose(y, raw.decode(z / 0.18215).sample, atol=1e-5)
    assert torch.equal(vae.encode(x), z)  # the mean is deterministic


def test_sdvae_sampling_option(vae_dir, vae):
    sampler = SDVAE.from_pretrained(vae_dir, sample=True)
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    a = sampler.encode(x, generator=torch.Generator().manual_seed(1))
    b = sampler.encode(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, vae.encode(x))


def test_autoencoder_shape_errors(vae):
    with pytest.raises(ValueError, match=r"expected \(B, 3, H, W\)"):
        vae.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"expected \(B, 4, H, W\)"):
        vae.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="not a positive multiple of 2"):
        vae.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match=r"expected \(B, 3, H, W\)"):
        IdentityAutoencoder().encode(torch.zeros(3, 8, 8))  # no batch dimension


def test_sdvae_missing_folder_or_diffusers(tmp_path, vae_dir, monkeypatch):
    with pytest.raises(FileNotFoundError, match=SD_VAE_REPO):
        SDVAE.from_pretrained(tmp_path / "nowhere")
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` fail
    with pytest.raises(ImportError, match="pip install diffusers"):
        SDVAE.from_pretrained(vae_dir)


def test_identity_autoencoder_is_pixel_space():
    ae = IdentityAutoencoder()
    x = torch.rand(2, 3, 8, 12) * 2 - 1
    assert (ae.channels, ae.factor, ae.scale) == (3, 1, 1.0)
    assert torch.equal(ae.encode(x), x) and torch.equal(ae.decode(x), x)


def test_cache_roundtrip_equals_direct_encode(vae, tmp_path):
    ds = SyntheticDataset(10, 8, seed=0, sizes=SIZES)
    assert len({tuple(ds[i].x.shape) for i in range(10)}) > 1  # several sizes, encoded per size group
    manifest_path = build_latent_cache(ds, vae, tmp_path / "cache", batch_size=3, shard_size=4, progress=False)
    manifest = json.loads(manifest_path.read_text())
    assert manifest["count"] == 10 and len(manifest["shards"]) == 3
    assert (manifest["scale"], manifest["channels"], manifest["factor"]) == (0.18215, 4, 2)
    assert (manifest["token_budget"], manifest["patch_px"], manifest["patch"]) == (16, 4, 2)
    assert not list((tmp_path / "cache").glob(".*tmp*"))  # no temporary files left behind

    cache = LatentCacheDataset(tmp_path / "cache", train=False)
    assert len(cache) == 10 and cache.patch == 2
    for i in range(10):
        x = ds[i].x[None]  # (1, 3, H, W): encoded alone, not in a size group
        item = cache[i]
        assert item.label == ds[i].label
        assert item.x.shape == (4, x.shape[2] // 2, x.shape[3] // 2)
        assert torch.allclose(item.x, vae.encode(x)[0], atol=1e-5)
        assert torch.allclose(cache.latent(i, flipped=True), vae.encode(x.flip(-1))[0], atol=1e-5)
        assert cache.sizes[i].tolist() == list(x.shape[2:])

    train = LatentCacheDataset(tmp_path / "cache", train=True, seed=1)
    seen = set()
    for epoch in range(12):
        z = train.get(3, epoch).x
        assert torch.equal(z, train.get(3, epoch).x)
        seen.add("flip" if not torch.equal(z, cache[3].x) else "plain")
    assert seen == {"plain", "flip"}


def test_cache_errors(vae, tmp_path):
    with pytest.raises(ValueError, match="hflip=False"):
        build_latent_cache(SyntheticDataset(2, sizes=SIZES, hflip=True), vae, tmp_path / "a", progress=False)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        LatentCacheDataset(tmp_path)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "old.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        build_latent_cache(SyntheticDataset(2, sizes=SIZES), vae, tmp_path / "b", progress=False)
    odd = SyntheticDataset(2, sizes=SyntheticSizes(token_budget=16, patch_px=3, min_side_px=6))
    with pytest.raises(ValueError, match="patch_px=3"):
        build_latent_cache(odd, vae, tmp_path / "c", progress=False)


def test_pixel_cache_feeds_the_loader(tmp_path):
    ds = SyntheticDataset(8, 8, seed=2, sizes=SIZES)
    build_latent_cache(ds, IdentityAutoencoder(), tmp_path, batch_size=4, progress=False)
    cache = LatentCacheDataset(tmp_path, train=False)
    assert all(torch.equal(cache[i].x, ds[i].x) for i in range(8))  # pixel space: exact
    loader = make_loader(LatentCacheDataset(tmp_path), batch_size=4, layout="padded", seed=0, num_workers=2)
    batch = next(iter(loader))
    assert batch.tokens.shape == (4 * 16, 3 * 4 * 4) and batch.layout.max_seqlen == 16
    with pytest.raises(IndexError, match="index 8"):
        cache[8]


def test_encode_by_size_keeps_order():
    ae = IdentityAutoencoder()
    images = [torch.full((3, 4 * (1 + i % 2), 4), float(i)) for i in range(5)]
    out = encode_by_size(ae, images, batch_size=2)
    assert [int(z[0, 0, 0]) for z in out] == list(range(5))
