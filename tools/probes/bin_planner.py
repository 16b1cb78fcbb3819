"""Probe: how long token batching's bin planner takes a step, in the training loop's main process (issue 14 item 2).

    PYTHONPATH=src python3 tools/probes/bin_planner.py [FOLDER]

The DataLoader asks its batch sampler for each step's bin in the main process, so ``TokenBudgetSampler.next_bin`` is
host time the training loop pays every step. Without FOLDER this times it on the study's shapes held fixed: 9 000
images, 5 000 of them the full 16 x 16 grid and 4 000 of random grids between 6 and 16 a side, bins of at most 320
images, 32 768 kept tokens a step at 50 % kept and 65 536 unmasked. With FOLDER (the study's re-encoded copy,
.carry/imagenette/train-128) it times the study's real grids: configs/study/base.toml's training split with its
random aspect crops, whose grids the planner replays every epoch (maskfit.data.pipeline.RandomCropTokenGrids), at
50 % kept: the first epoch (sizes read from the decoded arrays) and two later ones. Prints ms a bin and images a bin.
"""
import sys
import time

import numpy as np

from maskfit.data.pipeline import TokenBudgetSampler
from maskfit.masking import MaskConfig


def fixed_grids():
    rng = np.random.default_rng(0)
    grids = [(16, 16)] * 5000 + [tuple(int(v) for v in rng.integers(6, 17, 2)) for _ in range(4000)]
    for label, mask, budget in (("50 % kept", MaskConfig(keep_ratio=0.5), 32768), ("unmasked", None, 65536)):
        sampler = TokenBudgetSampler(grids, budget, mask=mask, seed=0, max_images=320)
        sampler.next_bin()
        start, images = time.perf_counter(), 0
        for _ in range(20):
            images += len(sampler.next_bin().indices)
        ms = (time.perf_counter() - start) / 20 * 1000
        print(f"{label:9s} {ms:6.2f} ms a bin, {images / 20:.0f} images a bin", flush=True)


def study_grids(folder: str):
    from maskfit.config import load_config
    from maskfit.data.pipeline import build_dataset, token_grids
    from maskfit.runs import run_patch_size

    cfg = load_config("configs/study/base.toml", [f'data.root="{folder}"'])
    patch = run_patch_size(cfg)
    dataset = build_dataset(cfg.data, patch, cfg.train.seed, train=True, num_classes=10, decode_once=True)
    sampler = TokenBudgetSampler(token_grids(dataset, patch), 32768, mask=MaskConfig(keep_ratio=0.5), seed=0,
                                 max_images=320)
    for label in ("epoch 0", "epoch 1", "epoch 2"):
        start, bins, images, epoch = time.perf_counter(), 0, 0, sampler.epoch
        while sampler.epoch == epoch:  # the bin that opens the next epoch is counted in that one's time
            images += len(sampler.next_bin().indices)
            bins += 1
        ms = (time.perf_counter() - start) / bins * 1000
        print(f"study folder, 50 % kept, {label}: {ms:6.2f} ms a bin, {images / bins:.0f} images a bin", flush=True)


if __name__ == "__main__":
    study_grids(sys.argv[1]) if len(sys.argv) > 1 else fixed_grids()
