"""Probe: how long token batching's bin planner takes a step, in the training loop's main process (issue 14 item 2).

    PYTHONPATH=src python3 tools/probes/bin_planner.py

The DataLoader asks its batch sampler for each step's bin in the main process, so ``TokenBudgetSampler.next_bin`` is
host time the training loop pays every step. This times it on the study's shapes: 9 000 images, 5 000 of them the
full 16 x 16 grid (the study's crops fill the budget) and 4 000 of random grids between 6 and 16 a side, bins of at
most 320 images, 32 768 kept tokens a step at 50 % kept and 65 536 unmasked. Prints ms a bin (mean over 20 bins,
after one) and images a bin.
"""
import time

import numpy as np

from maskfit.data.pipeline import TokenBudgetSampler
from maskfit.masking import MaskConfig


def main():
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


if __name__ == "__main__":
    main()
