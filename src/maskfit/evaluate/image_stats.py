"""Two pixel statistics of an image set that say in which direction samples differ from real images.

A distance in a network's feature space (FID, the proxy FD) says that samples got worse, not how. Two numbers
on the pixels themselves, each reported for the samples as a ratio to the reference images' value (1 = as real):

- **detail**: the mean absolute 4-neighbour Laplacian of the luminance (the mean of R, G, B, in [0, 1]) over
  interior pixels and images, the energy of the finest scale. Blurred samples fall below 1, speckle noise rises
  above it.
- **contrast**: each image's standard deviation over its pixels and channels, averaged over images. Washed-out
  (grey) samples fall below 1.

Both are computed batch by batch (``ImageStats``), so they ride along with a feature extraction pass.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Optional, Tuple

import numpy as np


def _laplacian_and_std(images: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(N,) mean |Laplacian| of the luminance and (N,) std per image, of (N, H, W, 3) uint8 images."""
    x = images.astype(np.float64) / 255.0  # (N, H, W, 3)
    luma = x.mean(axis=-1)  # (N, H, W)
    laplacian = (4 * luma[:, 1:-1, 1:-1] - luma[:, :-2, 1:-1] - luma[:, 2:, 1:-1]
                 - luma[:, 1:-1, :-2] - luma[:, 1:-1, 2:])  # (N, H-2, W-2)
    detail = np.abs(laplacian).reshape(len(x), -1).mean(axis=1) if laplacian.size else np.zeros(len(x))
    return detail, x.reshape(len(x), -1).std(axis=1)


class ImageStats:
    """Running detail and contrast over batches of (N, H, W, 3) uint8 images; each image counts once."""

    def __init__(self) -> None:
        self.count, self._detail, self._contrast = 0, 0.0, 0.0

    def update(self, images: np.ndarray) -> None:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"image statistics take (N, H, W, 3) images, got shape {tuple(images.shape)}")
        detail, contrast = _laplacian_and_std(images)
        self.count += len(images)
        self._detail += float(detail.sum())
        self._contrast += float(contrast.sum())

    def passing(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Yield ``batches`` unchanged, counting each on the way (to ride along with another consumer)."""
        for batch in batches:
            self.update(np.asarray(batch))
            yield batch

    def result(self) -> Optional[Tuple[float, float]]:
        """(detail, contrast), or None before any image."""
        if not self.count:
            return None
        return self._detail / self.count, self._contrast / self.count


def detail_and_contrast(images: np.ndarray) -> Tuple[float, float]:
    """(detail, contrast) of (N, H, W, 3) uint8 images (see the module's docstring)."""
    stats = ImageStats()
    stats.update(images)
    result = stats.result()
    if result is None:
        raise ValueError("image statistics of an empty set")
    return result
