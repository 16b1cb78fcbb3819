"""FID, sFID, Inception Score, Precision and Recall, computed the way ADM's evaluator computes them.

Every rule here follows OpenAI's ``guided-diffusion/evaluations/evaluator.py`` (described in
``shared/reference/eval.md`` §1.6-1.8); where this code departs from it, the comment says why.

* Fréchet distance (Heusel et al. 2017, "GANs trained by a two time-scale update rule", Eq. 6):
  ``d² = |mu1 - mu2|² + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})`` on float64 statistics, the matrix
  square root by ``scipy.linalg.sqrtm``, with ADM's two safeguards (eps on the diagonal when the root is
  not finite; reject an imaginary diagonal above 1e-3, else keep the real part).
* Inception Score (Salimans et al. 2016, "Improved techniques for training GANs", §4):
  ``exp(E_x KL(p(y|x) || p(y)))`` per contiguous, unshuffled split of 5000 samples (10 splits for
  50K), mean over splits only.
* Precision/Recall (Kynkäänniemi et al. 2019, "Improved precision and recall metric", Eq. 1-3): a
  point's manifold ball has the radius of its k-th nearest neighbour (k = 3, self excluded) in its own
  set; precision = share of samples inside some reference ball, recall = share of references inside
  some sample ball. Squared Euclidean distances, computed first in float16 and redone in float32 for a
  block that overflows (ADM's ``DistanceBlock``), in blocks of 10 000 x 10 000 on the given device.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal, Optional, Union

import numpy as np
import torch
from torch import Tensor

from maskfit.extras import require

ArrayLike = Union[np.ndarray, Tensor]
DistancePrecision = Literal["adm", "float32"]

IS_SPLIT_SIZE = 5000  # ADM: consecutive chunks of 5000 -> 10 splits for 50 000 samples
PR_NEIGHBOURHOOD = 3  # ADM/Kynkäänniemi: k = 3
PR_BLOCK_SIZE = 10_000  # ADM's row/col batch of the distance computation


def _as_tensor(x: ArrayLike, device: Union[str, torch.device, None] = None) -> Tensor:
    t = torch.from_numpy(np.asarray(x)) if isinstance(x, np.ndarray) else x
    return t.to(device) if device is not None else t


# --------------------------------------------------------------------------------------------------
# Gaussian statistics and the Fréchet distance
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GaussianStats:
    """Mean and covariance of a feature set, float64 (ADM's ``FIDStatistics``)."""

    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64, unbiased (N - 1), as np.cov
    num_samples: Optional[int] = None  # None when read from a file that does not say

    def __post_init__(self) -> None:
        d = self.mu.shape[0] if self.mu.ndim == 1 else -1
        if self.mu.ndim != 1 or self.sigma.shape != (d, d):
            raise ValueError(
                f"GaussianStats wants mu (D,) and sigma (D, D), got {self.mu.shape} and {self.sigma.shape}"
            )

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])


def check_finite_statistics(stats: GaussianStats, where: str) -> GaussianStats:
    """``stats`` unchanged, or one error naming ``where`` (a file and its keys) when mu or sigma holds NaN/inf:
    a NaN Fréchet distance would be reported as a number, and ``scipy.linalg.sqrtm`` does not return on inf."""
    bad = [f"{name} ({int((~np.isfinite(a)).sum())} of {a.size} entries)"
           for name, a in (("mu", stats.mu), ("sigma", stats.sigma)) if not np.isfinite(a).all()]
    if bad:
        raise ValueError(
            f"{where}: {' and '.join(bad)} hold NaN or infinite values; the statistics are broken. Recompute them "
            "(e.g. `maskfit train-classifier --reference-out` for a proxy reference) or use another reference"
        )
    return stats


def feature_statistics(features: ArrayLike, chunk_rows: int = 8192) -> GaussianStats:
    """Mean and unbiased covariance in float64, on the features' own device (GPU if they are there).

    Same result as ``np.mean`` / ``np.cov(rowvar=False)`` (which ADM uses), but centred chunk by chunk so
    50 000 x 2048 features never need a float64 copy in memory, and a GPU does the 2e11 MACs.
    """
    x = _as_tensor(features)  # (N, D)
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"feature_statistics needs (N >= 2, D) features, got shape {tuple(x.shape)}")
    n, d = x.shape
    mu = torch.zeros(d, dtype=torch.float64, device=x.device)
    for start in range(0, n, chunk_rows):
        mu += x[start : start + chunk_rows].to(torch.float64).sum(0)
    mu /= n  # (D,)
    scatter = torch.zeros(d, d, dtype=torch.float64, device=x.device)
    for start in range(0, n, chunk_rows):
        centred = x[start : start + chunk_rows].to(torch.float64) - mu  # (n_chunk, D)
        scatter += centred.T @ centred  # (D, D)
    sigma = scatter / (n - 1)
    return GaussianStats(mu=mu.cpu().numpy(), sigma=sigma.cpu().numpy(), num_samples=n)


def require_scipy() -> None:
    """Fail now, with the extra to install, when SciPy (FID's matrix square root, IS) is missing: commands
    call it before their sampling or feature extraction, not after."""
    require("scipy.linalg", "the Fréchet distance (FID, sFID)")
    require("scipy.special", "the Inception Score")


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    # SciPy >= 1.16 deprecates sqrtm's `disp` argument (gone in 1.18) that ADM passes; call it without
    # and accept the old tuple return too. Imported here: SciPy is optional (maskfit[eval]).
    root = require("scipy.linalg", "the Fréchet distance (FID, sFID)").sqrtm(matrix)
    return root[0] if isinstance(root, tuple) else root


def frechet_distance(sample: GaussianStats, reference: GaussianStats, eps: float = 1e-6) -> float:
    """Fréchet distance between two Gaussians (FID on pool3 statistics, sFID on spatial statistics)."""
    if sample.mu.shape != reference.mu.shape or sample.sigma.shape != reference.sigma.shape:
        raise ValueError(
            f"Statistics of different feature spaces: sample mu {sample.mu.shape} vs reference "
            f"{reference.mu.shape}; compare pool3 with pool3 (2048) and spatial with spatial (2023)"
        )
    check_finite_statistics(sample, "sample statistics")
    check_finite_statistics(reference, "reference statistics")
    mu1, mu2 = sample.mu.astype(np.float64), reference.mu.astype(np.float64)
    sigma1, sigma2 = sample.sigma.astype(np.float64), reference.sigma.astype(np.float64)
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # The product can be singular (fewer samples than dimensions); ADM retries with eps * I added.
        warnings.warn(f"Fréchet distance: singular covariance product, adding {eps} to the diagonals")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # Round-off gives tiny imaginary parts; a large one means the statistics are broken.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"Fréchet distance: imaginary component {np.max(np.abs(covmean.imag)):.3g} in sqrtm(S1 S2); "
                "the covariances are not valid (too few samples, NaN features, or mismatched files)"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


# --------------------------------------------------------------------------------------------------
# Inception Score
# --------------------------------------------------------------------------------------------------


def class_probabilities(logits: ArrayLike) -> np.ndarray:
    """Softmax of the (unbiased) logits, float64. (N, K) -> (N, K)."""
    x = _as_tensor(logits).to(torch.float64)
    return torch.softmax(x, dim=1).cpu().numpy()


def inception_score(probs: ArrayLike, split_size: int = IS_SPLIT_SIZE) -> float:
    """ADM's IS: contiguous, unshuffled splits of ``split_size`` samples; mean of exp(mean KL) over splits.

    The order of the samples therefore matters: class-sorted samples put few classes in each split and
    collapse the score. Samplers must draw labels at random (DiT) or shuffle before writing.
    """
    p = np.asarray(probs, dtype=np.float64)  # (N, K)
    if p.ndim != 2 or len(p) == 0:
        raise ValueError(f"inception_score needs (N, K) class probabilities, got shape {p.shape}")
    if split_size < 1:
        raise ValueError(f"split_size must be >= 1, got {split_size}")
    xlogy = require("scipy.special", "the Inception Score").xlogy
    scores = []
    for start in range(0, len(p), split_size):
        part = p[start : start + split_size]  # (n_split, K)
        marginal = part.mean(0, keepdims=True)  # (1, K): p(y) over the split
        # xlogy gives 0 * log 0 = 0; ADM's plain log would turn exact zeros (one-hot rows) into NaN.
        kl = xlogy(part, part) - xlogy(part, marginal)  # (n_split, K)
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


def num_is_splits(num_samples: int, split_size: int = IS_SPLIT_SIZE) -> int:
    return -(-num_samples // split_size)


# --------------------------------------------------------------------------------------------------
# Precision and Recall
# --------------------------------------------------------------------------------------------------


def _sq_distances(a: Tensor, b: Tensor) -> Tensor:
    """max(|a|² - 2 a·b + |b|², 0) in the inputs' dtype. (Na, D), (Nb, D) -> (Na, Nb)."""
    norm_a = (a * a).sum(1, keepdim=True)  # (Na, 1)
    norm_b = (b * b).sum(1)[None, :]  # (1, Nb)
    return ((norm_a - 2 * (a @ b.T)) + norm_b).clamp_min(0)


def pairwise_sq_distances(a: Tensor, b: Tensor, precision: DistancePrecision = "adm") -> Tensor:
    """Squared Euclidean distances as float32 (Na, Nb).

    ``"adm"``: cast the features to float16 and compute there; if any entry overflows, redo the block
    in float32 (ADM's ``DistanceBlock``; its float16 step explains most of the ~0.002 P/R gap between
    the TF evaluator and float32 ports). ``"float32"``: float32 only.
    """
    if precision == "adm":
        d16 = _sq_distances(a.half(), b.half())
        if bool(torch.isfinite(d16).all()):
            return d16.float()
    elif precision != "float32":
        raise ValueError(f"distance precision must be 'adm' or 'float32', got {precision!r}")
    return _sq_distances(a.float(), b.float())


def manifold_radii(
    features: Tensor,
    k: int = PR_NEIGHBOURHOOD,
    block_size: int = PR_BLOCK_SIZE,
    precision: DistancePrecision = "adm",
) -> Tensor:
    """Squared distance of each point to its k-th nearest neighbour in its own set, self excluded. (N,)

    ADM partitions whole rows of distances on the host; here each row block keeps a running
    (k+1)-smallest list over column blocks, so memory stays at one block. The (k+1)-th smallest entry
    of a row is its k-th neighbour because the point's distance to itself (0) is in the row.
    """
    n = features.shape[0]
    if n <= k:
        raise ValueError(f"manifold_radii needs more than k={k} points, got {n}")
    radii = torch.empty(n, dtype=torch.float32, device=features.device)
    for r0 in range(0, n, block_size):
        rows = features[r0 : r0 + block_size]
        best = None  # (rows, k+1) smallest distances seen so far
        for c0 in range(0, n, block_size):
            d = pairwise_sq_distances(rows, features[c0 : c0 + block_size], precision)  # (rows, cols)
            if best is not None:
                d = torch.cat([best, d], dim=1)
            best = torch.topk(d, min(k + 1, d.shape[1]), dim=1, largest=False).values  # ascending
        radii[r0 : r0 + rows.shape[0]] = best[:, k]
    return radii


@dataclass(frozen=True)
class PrecisionRecall:
    precision: float
    recall: float
    k: int
    num_reference: int
    num_samples: int


def precision_recall(
    reference_features: ArrayLike,
    sample_features: ArrayLike,
    k: int = PR_NEIGHBOURHOOD,
    block_size: int = PR_BLOCK_SIZE,
    precision: DistancePrecision = "adm",
    device: Union[str, torch.device, None] = None,
) -> PrecisionRecall:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with ADM's k = 3 and distance rule.

    ``reference_features``: pool3 of ADM's 10 000 reference images (not the training-set statistics).
    """
    ref = _as_tensor(reference_features, device).float()  # (Nr, D)
    smp = _as_tensor(sample_features, device).float()  # (Ns, D)
    if ref.dim() != 2 or smp.dim() != 2 or ref.shape[1] != smp.shape[1]:
        raise ValueError(f"precision_recall wants (N, D) features of one D, got {tuple(ref.shape)} and {tuple(smp.shape)}")
    ref_radii = manifold_radii(ref, k, block_size, precision)  # (Nr,)
    smp_radii = manifold_radii(smp, k, block_size, precision)  # (Ns,)
    ref_in = torch.zeros(ref.shape[0], dtype=torch.bool, device=ref.device)  # ref inside some sample ball
    smp_in = torch.zeros(smp.shape[0], dtype=torch.bool, device=ref.device)  # sample inside some ref ball
    for r0 in range(0, ref.shape[0], block_size):
        r1 = r0 + block_size
        for c0 in range(0, smp.shape[0], block_size):
            c1 = c0 + block_size
            d = pairwise_sq_distances(ref[r0:r1], smp[c0:c1], precision)  # (rows, cols)
            smp_in[c0:c1] |= (d <= ref_radii[r0:r1, None]).any(0)
            ref_in[r0:r1] |= (d <= smp_radii[None, c0:c1]).any(1)
    return PrecisionRecall(
        precision=float(smp_in.double().mean()),
        recall=float(ref_in.double().mean()),
        k=k,
        num_reference=int(ref.shape[0]),
        num_samples=int(smp.shape[0]),
    )
