"""`make demo`: train a small FiTv2 on the built-in synthetic classes on CPU, then sample a grid.

Pixel space (identity autoencoder), a 64-token budget with 4-pixel patches (up to 32x32 px images of
aspect ratios 1:3 to 3:1), rectified flow. The learning rate (2e-3) and EMA decay (0.99) are changed
from FiT's 1e-4 / 0.9999 because the run lasts minutes, not 400K steps; demo.json records everything.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from maskfit.config import config_from_dict, to_dict

PATCH = 4  # pixels per token side (pixel space: the identity autoencoder)
TOKEN_BUDGET = 64  # up to 32x32 px images
# (height, width) in pixels: 1:1, 1:2, 2:1, 1:3 and 3:1 inside the training budget.
DEMO_RESOLUTIONS = [(32, 32), (20, 40), (40, 20), (16, 48), (48, 16)]


def demo_config(out: Path, steps: int) -> dict:
    return {
        "model": {
            "preset": "FiTv2-tiny",
            "overrides": {"depth": 4, "hidden_size": 128, "num_heads": 4, "ffn_hidden": 344, "adaln_lora_rank": 32,
                          "patch_size": PATCH, "num_classes": 8},
        },
        "data": {"source": "synthetic", "num_images": 4096, "num_classes": 8, "token_budget": TOKEN_BUDGET,
                 "autoencoder": "identity", "layout": "packed", "hflip": True},
        "diffusion": {"objective": "flow", "t_sampling": "logit_normal"},
        "optim": {"lr": 2e-3, "ema_decay": 0.99, "warmup_steps": 100},
        "train": {"out_dir": str(out / "run"), "steps": steps, "batch_size": 64, "log_every": 50,
                  "ckpt_every": 100000, "seed": 0, "device": "cpu"},
    }


def run_demo(out: Path, minutes: float = 2.5, quick: bool = False) -> dict:
    from maskfit.data.synthetic import synthetic_class_accuracy
    from maskfit.sample import SamplerOptions, image_grid, sample_tokens, tokens_to_images
    from maskfit.data.latents import IdentityAutoencoder
    from maskfit.runs import build_diffusion, load_model_from_checkpoint
    from maskfit.train import train

    from maskfit.paths import check_output_dir

    check_output_dir(out, "--out", "demo folder")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    steps = 20 if quick else 100_000  # the time budget ends the run first
    raw = demo_config(out, steps)
    cfg = config_from_dict(raw, [f"train.out_dir={json.dumps(str(out / 'run'))}"])
    t0 = time.perf_counter()
    # A rerun moves the previous demo run aside (out/run/previous_run_*) rather than mixing checkpoints.
    result = train(cfg, resume=False, fresh_into_existing=True, progress=True, max_seconds=None if quick else minutes * 60)
    train_s = time.perf_counter() - t0

    model, _ = load_model_from_checkpoint(result.run_dir, use_ema=True)
    diffusion = build_diffusion(cfg)
    num_classes = cfg.data.num_classes
    options = SamplerOptions(method="heun", steps=8 if quick else 25, cfg_scale=2.0)
    generator = torch.Generator().manual_seed(0)
    all_images, all_labels = [], []
    t1 = time.perf_counter()
    for h, w in DEMO_RESOLUTIONS:
        labels = torch.arange(num_classes)
        grids = [(h // PATCH, w // PATCH)] * num_classes
        tokens = sample_tokens(model, diffusion, grids, labels, options, generator, torch.device("cpu"))
        images = tokens_to_images(tokens, grids, PATCH, IdentityAutoencoder())
        all_images += images
        all_labels += labels.tolist()
    sample_s = time.perf_counter() - t1
    accuracy = synthetic_class_accuracy(all_images, all_labels)
    scaled = [np.kron(im, np.ones((3, 3, 1), dtype=np.uint8)) for im in all_images]  # 3x for viewing
    image_grid(scaled, columns=num_classes, pad=6).save(out / "samples.png")
    summary = {
        "what": "FiTv2-style model trained on the synthetic set on CPU, sampled at several aspect ratios",
        "samples_png": str(out / "samples.png"),
        "rows_height_x_width_px": [f"{h}x{w}" for h, w in DEMO_RESOLUTIONS],
        "columns": "class 0..7",
        "train_steps": result.step,
        "train_seconds": round(train_s, 1),
        "train_images_per_s": round(result.images_per_s, 1),
        "final_losses": result.losses[-3:],
        "num_params": result.num_params,
        "sampler": {"method": options.method, "steps": options.steps, "cfg_scale": options.cfg_scale},
        "sample_seconds": round(sample_s, 1),
        "synthetic_class_accuracy": accuracy,
        "chance_accuracy": 1.0 / num_classes,
        "config": to_dict(cfg),
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    return {k: v for k, v in summary.items() if k != "config"}
