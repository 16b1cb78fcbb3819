"""Probe: images/s one process builds (the work of one loader worker: read, decode, crop, resize, patchify,
masks, packing) for FiT-B/2's 256-token pixel batches of 256 images at 50 % kept, on the CPU.

    PYTHONPATH=src python tools/probes/loader_rate.py FOLDER

One warm-up batch, then 10 timed ones (num_workers=0, so the main process does the workers' work).
"""
import sys
import time

import torch

from maskfit.config import load_config
from maskfit.data.pipeline import build_training_data
from maskfit.runs import run_patch_size

cfg = load_config("configs/imagenette_pixels.toml", [
    f"data.root={sys.argv[1]!r}".replace("'", '"'), "data.token_budget=256", "train.batch_size=256",
    "data.num_workers=0", 'model.preset="FiT-B/2"', 'model.overrides={"patch_size": 4, "in_channels": 3, "num_classes": 10}',
    'diffusion.objective="ddpm"', "mask.keep_ratio=0.5", 'train.device="cpu"'])
data = build_training_data(cfg, run_patch_size(cfg))
data.next_device_batch(0, torch.device("cpu"))
t0 = time.perf_counter()
for step in range(1, 11):
    data.next_device_batch(step, torch.device("cpu"))
dt = time.perf_counter() - t0
print(f"{10 * 256 / dt:.0f} images/s in one process ({dt / 10 * 1000:.0f} ms per batch of 256)")
