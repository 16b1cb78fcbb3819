"""Time the metric computation (no sampling) for FID-50K at 256² on the current device.

Two parts, measured separately because they scale differently:

1. Inception features: random uint8 256² images go through the same ``extract_features`` path as
   ``maskfit eval`` (host batch -> pinned copy -> TF1 resize to 299² -> FP32 Inception), with random
   weights (weights do not change the time). Timed on ``num_images`` images, reported as images/s and
   extrapolated linearly to 50 000 samples + 10 000 reference images.
2. Metrics at full size: float64 statistics, FID, sFID, IS and Precision/Recall for 50 000 sample
   features against 10 000 reference features, timed directly (P/R is quadratic in the sample count,
   so it cannot be extrapolated from a small run). Random features stand in for real ones: the cost
   does not depend on their values.

Run: ``python -m maskfit.evaluate.bench --num-images 5000`` (prints JSON).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterator, Optional, Tuple, Union

import numpy as np
import torch

from maskfit.bench import sync_device
from maskfit.evaluate import metrics as M
from maskfit.evaluate.inception import NUM_LOGITS, POOL3_DIM, SPATIAL_DIM, build_random_inception, ieee_fp32
from maskfit.evaluate.report import extract_features


@dataclass
class MetricBench:
    device: str
    resolution: Tuple[int, int]
    batch_size: int
    num_images_timed: int
    images_per_s: float
    num_samples: int
    num_reference: int
    sample_features_s: float  # extrapolated to num_samples
    reference_features_s: float  # extrapolated to num_reference
    metrics_s: float  # measured at num_samples x num_reference
    total_s: float  # the three above
    breakdown_s: Dict[str, float] = field(default_factory=dict)


def _image_batches(pool, count: int, batch_size: int) -> Iterator[np.ndarray]:
    """``count`` images in batches, cycling over a small pre-made pool (image making is not timed)."""
    done = 0
    while done < count:
        batch = pool[(done // batch_size) % len(pool)][: count - done]
        done += len(batch)
        yield batch


def time_metrics(num_samples: int, num_reference: int, device: torch.device, seed: int = 0) -> Dict[str, float]:
    """Seconds of each metric step on random features of ADM's sizes."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def relu_features(n: int, d: int) -> torch.Tensor:  # non-negative like pool3, full-rank covariance
        return torch.randn(n, d, generator=gen, device=device).abs_()

    pool, spatial = relu_features(num_samples, POOL3_DIM), relu_features(num_samples, SPATIAL_DIM)
    logits = torch.randn(num_samples, NUM_LOGITS, generator=gen, device=device) * 3
    ref_pool, ref_spatial = relu_features(num_reference, POOL3_DIM), relu_features(num_reference, SPATIAL_DIM)
    ref_stats, ref_stats_s = M.feature_statistics(ref_pool), M.feature_statistics(ref_spatial)  # "stored" stats
    out: Dict[str, float] = {}
    with ieee_fp32():
        sync_device(device)
        t = time.perf_counter()
        stats = M.feature_statistics(pool)
        stats_s = M.feature_statistics(spatial)
        out["statistics_s"] = time.perf_counter() - t
        t = time.perf_counter()
        M.frechet_distance(stats, ref_stats)
        out["fid_sqrtm_s"] = time.perf_counter() - t
        t = time.perf_counter()
        M.frechet_distance(stats_s, ref_stats_s)
        out["sfid_sqrtm_s"] = time.perf_counter() - t
        t = time.perf_counter()
        M.inception_score(M.class_probabilities(logits))
        out["inception_score_s"] = time.perf_counter() - t
        t = time.perf_counter()
        M.precision_recall(ref_pool, pool, device=device)
        sync_device(device)
        out["precision_recall_s"] = time.perf_counter() - t
    return out


def bench_metrics(
    num_images: int = 2000,
    resolution: Tuple[int, int] = (256, 256),
    batch_size: int = 250,
    device: Union[str, torch.device, None] = None,
    num_samples: int = 50_000,
    num_reference: int = 10_000,
    channels_last: bool = False,
    seed: int = 0,
) -> MetricBench:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net = build_random_inception(seed).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    rng = np.random.default_rng(seed)
    pool = [rng.integers(0, 256, (batch_size, *resolution, 3), dtype=np.uint8) for _ in range(2)]
    extract_features(net, _image_batches(pool, 2 * batch_size, batch_size), device)  # warm-up (cuDNN autotune)
    sync_device(device)
    t = time.perf_counter()
    extract_features(net, _image_batches(pool, num_images, batch_size), device)
    sync_device(device)
    images_per_s = num_images / (time.perf_counter() - t)
    breakdown = time_metrics(num_samples, num_reference, device, seed)
    metrics_s = sum(breakdown.values())
    sample_s, ref_s = num_samples / images_per_s, num_reference / images_per_s
    return MetricBench(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        resolution=tuple(resolution),
        batch_size=batch_size,
        num_images_timed=num_images,
        images_per_s=images_per_s,
        num_samples=num_samples,
        num_reference=num_reference,
        sample_features_s=sample_s,
        reference_features_s=ref_s,
        metrics_s=metrics_s,
        total_s=sample_s + ref_s + metrics_s,
        breakdown_s=breakdown,
    )


def main(argv: Optional[list] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=2000)
    p.add_argument("--resolution", type=int, nargs=2, default=(256, 256), metavar=("H", "W"))
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--num-samples", type=int, default=50_000)
    p.add_argument("--num-reference", type=int, default=10_000)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    result = bench_metrics(a.num_images, tuple(a.resolution), a.batch_size, a.device, a.num_samples, a.num_reference, a.channels_last)
    print(json.dumps(asdict(result), indent=2))


if __name__ == "__main__":
    main()
