"""`maskfit prepare CONFIG --out CACHE`: encode a run's images once into a latent cache.

FiT trains on pre-encoded latents (its encoding script is unreleased; reference/fit.md §2.4). We encode
each image after the token-budget resize (and the optional random-aspect crop, drawn once), with the
SD-VAE's posterior mean, and store the latent of the image and of its mirror image, like FiT. With
``data.preprocess="mixed"`` an image with both sides above the square side also gets its centre-crop
version (and its mirror image), FiTv2's "Mixed" data; such a cache serves "flexible" runs too. Train on
the cache with ``data.source="latents"`` and ``data.root=CACHE``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path



def add_prepare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config (JSON/TOML) whose [data] section names the images")
    p.add_argument("--out", required=True, help="cache folder to create")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--vae-path", default=None, help="local sd-vae-ft-ema folder (overrides data.vae_path)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true",
                   help="encode into --out even if it is not empty (a cache there is replaced)")


def run_prepare(args) -> int:
    from maskfit.config import load_config
    from maskfit.data.latents import SDVAE, IdentityAutoencoder, build_latent_cache
    from maskfit.data.pipeline import build_dataset
    from maskfit.runs import resolve_device, run_patch_size

    from maskfit.paths import check_output_dir

    cfg = load_config(args.config, args.set)
    check_output_dir(args.out, "--out", "latent-cache folder")  # before the VAE loads and the images encode
    out = Path(args.out)
    # Before the VAE loads: the library's own check (build_latent_cache) would come after, naming overwrite=True.
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(
            f"cache folder {out} is not empty; delete it, choose another --out, or pass --overwrite to encode into it "
            "(a cache there is replaced)"
        )
    if cfg.data.source == "latents":
        raise ValueError("data.source is already 'latents'; point the config at the images (source 'folder' or 'synthetic')")
    device = resolve_device(args.device)
    patch = run_patch_size(cfg)
    # The cache stores both orientations, so the dataset itself must not flip; the encoder is applied
    # here, so build the pixel dataset as in pixel space.
    if cfg.data.autoencoder == "identity":
        autoencoder = IdentityAutoencoder()
    else:
        autoencoder = SDVAE.from_pretrained(args.vae_path or cfg.data.vae_path, device=device)
    data = dataclasses.replace(cfg.data, hflip=False, autoencoder="identity")
    dataset = build_dataset(data, patch * autoencoder.factor, cfg.train.seed, train=True)
    manifest = build_latent_cache(
        dataset, autoencoder, args.out, batch_size=args.batch_size, flips=True, overwrite=args.overwrite
    )
    print(json.dumps({"cache": args.out, "manifest": str(manifest), "images": len(dataset)}))
    return 0
