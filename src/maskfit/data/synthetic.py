"""A procedural, seeded, class-conditional image set of many sizes and aspect ratios (no files).

Each class is one colour drawn with one pattern on a dark grey background. Both are defined in
relative coordinates, so a class looks the same at 8x24 px and at 256x256 px. A tiny model learns it
in minutes of CPU training, and :func:`synthetic_class_accuracy` scores without any learned weights
whether generated images resemble the classes.

Patterns (flip-invariant, since training flips images horizontally):

==  ===============  ==============================================================
 0  disc             filled circle, centre and radius jittered
 1  ring             annulus, centre, radius and thickness jittered
 2  hstripes         horizontal stripes, period and phase jittered
 3  vstripes         vertical stripes, period and phase jittered
 4  checker          checkerboard, cell size and phase jittered
 5  gradient         background-to-colour ramp along a diagonal (either one), gamma jittered
 6  cross            a plus sign: one horizontal and one vertical bar through a jittered centre
 7  solid            the whole image in the class colour
==  ===============  ==============================================================

Class k uses colour k and pattern k, so colour alone would name the class. The classifier checks
both, so an image must have the right colour and the right structure to count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from maskfit.data.resize import check_budget, fit_to_token_budget

PATTERNS = ("disc", "ring", "hstripes", "vstripes", "checker", "gradient", "cross", "solid")
NUM_PATTERNS = len(PATTERNS)

# Well-separated colours (RGB): nearest-colour classification needs distances far above the jitter.
COLOURS = np.array(
    [
        (225, 45, 45),  # red
        (45, 200, 70),  # green
        (60, 100, 235),  # blue
        (235, 215, 50),  # yellow
        (215, 55, 205),  # magenta
        (50, 215, 215),  # cyan
        (245, 140, 30),  # orange
        (235, 235, 235),  # white
    ],
    dtype=np.float64,
)
BACKGROUND = np.array((40, 40, 40), dtype=np.float64)
COLOUR_JITTER = 12.0  # per channel, uniform +-: at most 21 in RGB distance, under half the 78 between
# the closest two colours (yellow, orange), so the nearest class colour is always the right one
SUPERSAMPLE = 4  # patterns are drawn at 4x and box-filtered: clean edges at any size


def check_num_classes(num_classes: int) -> None:
    if not 1 <= num_classes <= NUM_PATTERNS:
        raise ValueError(f"num_classes={num_classes} must lie in 1..{NUM_PATTERNS} (one pattern per class)")


# ----------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------


def _pattern_mask(pattern: int, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W) float in [0, 1]: how much of each pixel is foreground."""
    ss = SUPERSAMPLE
    W, H = width * ss, height * ss
    s = min(W, H)  # lengths are relative to the short side, so a class is the same at any aspect ratio
    x = np.arange(W)[None, :] + 0.5  # (1, W)
    y = np.arange(H)[:, None] + 0.5  # (H, 1)
    cx = W / 2 + rng.uniform(-0.1, 0.1) * s
    cy = H / 2 + rng.uniform(-0.1, 0.1) * s
    name = PATTERNS[pattern]
    if name == "disc":
        r = rng.uniform(0.28, 0.4) * s
        m = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif name == "ring":
        r_out = rng.uniform(0.34, 0.45) * s
        r_in = r_out * rng.uniform(0.5, 0.62)
        d2 = (x - cx) ** 2 + (y - cy) ** 2
        m = (d2 <= r_out * r_out) & (d2 >= r_in * r_in)
    elif name in ("hstripes", "vstripes"):
        period = rng.uniform(0.4, 0.55) * s
        coord = y if name == "hstripes" else x
        m = ((coord + rng.uniform(0, period)) % period) < period / 2
    elif name == "checker":
        cell = rng.uniform(0.25, 0.34) * s
        m = (((x + rng.uniform(0, cell)) // cell + (y + rng.uniform(0, cell)) // cell) % 2) == 0
    elif name == "gradient":
        u, v = x / W, y / H
        if rng.random() < 0.5:
            u = 1 - u  # the other diagonal
        # The far sixth of the diagonal is full colour, so the class colour itself is always present.
        m = np.minimum(1.0, 0.6 * (u + v)) ** rng.uniform(0.8, 1.25)
    elif name == "cross":
        t = rng.uniform(0.2, 0.28) * s
        m = (np.abs(x - cx) <= t / 2) | (np.abs(y - cy) <= t / 2)
    elif name == "solid":
        m = np.ones((H, W), dtype=bool)
    else:  # pragma: no cover - PATTERNS and this chain are edited together
        raise AssertionError(name)
    m = np.broadcast_to(m, (H, W)).astype(np.float64)
    return m.reshape(height, ss, width, ss).mean(axis=(1, 3))  # box filter back to (height, width)


def render(label: int, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """One image of class ``label`` at (height, width): (H, W, 3) uint8."""
    if not 0 <= label < NUM_PATTERNS:
        raise ValueError(f"label={label} must lie in 0..{NUM_PATTERNS - 1} (one pattern per class)")
    if width < 1 or height < 1:
        raise ValueError(f"image size {width}x{height} is empty; pass positive width and height")
    colour = COLOURS[label] + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, size=3)
    background = BACKGROUND + rng.uniform(-COLOUR_JITTER / 2, COLOUR_JITTER / 2, size=3)
    m = _pattern_mask(label, width, height, rng)[..., None]  # (H, W, 1)
    img = background * (1 - m) + colour * m  # (H, W, 3)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class SyntheticSizes:
    """How image sizes are drawn: aspect ratio log-uniform, area a uniform fraction of the budget area,
    then FiT's budget rule snaps each side to whole patches."""

    token_budget: int = 64
    patch_px: int = 4
    ratio_range: tuple[float, float] = (1 / 3, 3.0)
    min_area_frac: float = 0.25
    min_side_px: int = 8  # patterns need a few pixels per period to be recognisable

    def __post_init__(self) -> None:
        check_budget(self.token_budget, self.patch_px)
        lo, hi = self.ratio_range
        if not 0 < lo <= hi:
            raise ValueError(f"ratio_range={self.ratio_range} must satisfy 0 < low <= high")
        if not 0 < self.min_area_frac <= 1:
            raise ValueError(f"min_area_frac={self.min_area_frac} must lie in (0, 1]")
        side_tokens = -(-self.min_side_px // self.patch_px)
        if side_tokens * side_tokens > self.token_budget:
            raise ValueError(
                f"token_budget={self.token_budget} cannot hold a {self.min_side_px}x{self.min_side_px} px image "
                f"with patch {self.patch_px}; raise token_budget to >= {side_tokens * side_tokens} or lower min_side_px"
            )

    def draw(self, rng: np.random.Generator) -> tuple[int, int]:
        """(width, height) of one image, whole patches, within the budget, both sides >= min_side_px."""
        max_area = self.token_budget * self.patch_px**2
        lo, hi = self.ratio_range
        for _ in range(100):
            ratio = math.exp(rng.uniform(math.log(lo), math.log(hi)))
            area = rng.uniform(self.min_area_frac, 1.0) * max_area
            w = max(1, round(math.sqrt(area * ratio)))
            h = max(1, round(math.sqrt(area / ratio)))
            w, h = fit_to_token_budget(w, h, self.token_budget, self.patch_px)
            if min(w, h) >= self.min_side_px:
                return w, h
        # Only reachable when the ratio range is extreme for the budget: say which knob to turn.
        raise ValueError(
            f"could not draw a size with both sides >= {self.min_side_px} px in 100 tries "
            f"(token_budget={self.token_budget}, patch_px={self.patch_px}, ratio_range={self.ratio_range}); "
            f"narrow ratio_range or raise token_budget"
        )


def synthetic_sample(index: int, num_classes: int, seed: int, sizes: SyntheticSizes) -> tuple[np.ndarray, int]:
    """Item ``index`` of the set with this seed: ((H, W, 3) uint8, label). Independent of access order."""
    check_num_classes(num_classes)
    rng = np.random.default_rng([seed, index])
    label = index % num_classes  # balanced classes
    w, h = sizes.draw(rng)
    return render(label, w, h, rng), label


# ----------------------------------------------------------------------------------------------------
# A hand-made classifier: does an image resemble the synthetic classes?
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticFeatures:
    """The simple features the classifier reads (exposed for debugging and tests)."""

    colour_class: int  # nearest class colour of the foreground, -1 if nothing stands out
    colour_error: float  # distance (0..255 RGB) between the foreground estimate and that colour
    fill: float  # fraction of pixels that are foreground
    diag_corr: float  # |correlation| of the foreground amount with the better of the two diagonals
    row_share: float  # share of foreground variance explained by row means (horizontal structure)
    col_share: float  # share explained by column means (vertical structure)
    row_runs: float  # mean number of foreground runs along a row (left to right)
    col_runs: float  # mean number of foreground runs along a column (top to bottom)
    saddles: int  # 2x2 blocks that look like a checkerboard corner
    centre_fill: float  # foreground amount around the foreground's centre of mass
    bbox_fill: float  # fraction of the foreground's bounding box that is foreground


# Real samples' foreground estimates stay within ~31 of their colour (jitter plus edge blending);
# one farther than this from every class colour shows no class colour at all.
MAX_COLOUR_ERROR = 60.0
MIN_CONTRAST = 50.0  # a foreground must differ this much from the background to count


def synthetic_features(image: np.ndarray) -> SyntheticFeatures:
    """Features of one (H, W, 3) uint8 image of any size."""
    img = _check_image(image).astype(np.float64)  # (H, W, 3)
    H, W, _ = img.shape
    dist = np.linalg.norm(img - BACKGROUND, axis=-1)  # (H, W) distance from the background
    top = float(np.percentile(dist, 98))
    if top < MIN_CONTRAST:  # nothing but background: no class
        return SyntheticFeatures(-1, float("inf"), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0, 0.0, 0.0)
    # Foreground colour: the pixels farthest from the background (the full-strength end of a ramp).
    fg = img[dist >= 0.9 * top].mean(axis=0)  # (3,)
    errors = np.linalg.norm(COLOURS - fg, axis=-1)
    colour_class = int(errors.argmin())
    # Foreground amount per pixel: projection onto the background -> foreground colour axis.
    axis = fg - BACKGROUND
    m = np.clip(((img - BACKGROUND) @ axis) / float(axis @ axis), 0.0, 1.0)  # (H, W)
    b = m > 0.5  # (H, W) foreground pixels
    fill = float(b.mean())

    yy, xx = np.mgrid[0:H, 0:W]
    u, v = (xx + 0.5) / W, (yy + 0.5) / H
    diag_corr = max(abs(_corr(m, u + v)), abs(_corr(m, u - v)))

    bf = b.astype(np.float64)
    var = float(bf.var())
    row_share = float(bf.mean(axis=1).var()) / var if var > 0 else 0.0
    col_share = float(bf.mean(axis=0).var()) / var if var > 0 else 0.0
    row_runs = float((np.diff(bf, axis=1, prepend=0) > 0).sum(axis=1).mean())
    col_runs = float((np.diff(bf, axis=0, prepend=0) > 0).sum(axis=0).mean())

    # Checkerboard corners: 2x2 blocks whose diagonal pixels agree and differ from the anti-diagonal.
    # Measured on the soft amount m so a corner that falls between pixels still counts.
    diagonal_excess = m[:-1, :-1] + m[1:, 1:] - m[:-1, 1:] - m[1:, :-1]  # (H-1, W-1)
    saddles = int((np.abs(diagonal_excess) > 1.0).sum())

    if b.any():
        # Foreground amount within ~0.1 short side (at least one pixel) of the foreground's centre of mass.
        cy, cx = float(v[b].mean()) * H, float(u[b].mean()) * W
        near = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= max(1.0, 0.1 * min(H, W)) ** 2
        centre_fill = float(m[near].mean())
        rows, cols = np.nonzero(b.any(axis=1))[0], np.nonzero(b.any(axis=0))[0]
        box = b[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        bbox_fill = float(box.mean())
    else:
        centre_fill = bbox_fill = 0.0
    return SyntheticFeatures(
        colour_class=colour_class,
        colour_error=float(errors.min()),
        fill=fill,
        diag_corr=diag_corr,
        row_share=row_share,
        col_share=col_share,
        row_runs=row_runs,
        col_runs=col_runs,
        saddles=saddles,
        centre_fill=centre_fill,
        bbox_fill=bbox_fill,
    )


def pattern_from_features(f: SyntheticFeatures) -> int:
    """Decision rules over :class:`SyntheticFeatures` -> pattern index (-1: none fits).

    Thresholds sit between the feature ranges the jitter in :func:`_pattern_mask` can produce.
    """
    if f.colour_class < 0:
        return -1
    if f.fill > 0.9:
        return PATTERNS.index("solid")
    if f.diag_corr > 0.85:
        return PATTERNS.index("gradient")
    # Stripes: one axis explains most of the variance and the other almost none (pixel noise moves
    # both by a few hundredths; a cross's bars give the other axis >= 0.11 even at 3:1), and there are
    # at least two of them (one band across a 1:3 image is a disc, not stripes).
    if f.row_share > 0.5 and f.col_share < 0.09 and f.col_runs >= 1.5:
        return PATTERNS.index("hstripes")
    if f.col_share > 0.5 and f.row_share < 0.09 and f.row_runs >= 1.5:
        return PATTERNS.index("vstripes")
    # Checkerboard: several runs per row and column (discs, rings and crosses stay under 1.5).
    if (f.row_runs + f.col_runs) / 2 >= 1.5:
        return PATTERNS.index("checker")
    # An empty centre is a ring, unless it shows checkerboard corners (a thin ring at 8 px shows a few
    # corner-like blocks too, hence corners only decide when the centre is filled).
    if f.centre_fill < 0.3:
        return PATTERNS.index("ring")
    if f.saddles >= 2:
        return PATTERNS.index("checker")
    # A disc fills ~pi/4 of its bounding box, a cross well under half of it.
    if f.bbox_fill > 0.58:
        return PATTERNS.index("disc")
    return PATTERNS.index("cross")


def classify_synthetic(image: np.ndarray) -> int:
    """Class whose colour *and* pattern the image shows, or -1 when colour and pattern disagree."""
    f = synthetic_features(image)
    if f.colour_class < 0 or f.colour_error > MAX_COLOUR_ERROR:
        return -1
    return f.colour_class if pattern_from_features(f) == f.colour_class else -1


def synthetic_class_accuracy(images: Sequence[np.ndarray], labels: Sequence[int]) -> float:
    """Fraction of images whose colour and pattern both match their label's class.

    About 1.0 on real synthetic samples of every size, about chance (<= 1/num_classes) on noise or
    on images paired with shuffled labels.
    """
    labels = [int(label) for label in labels]
    if len(images) != len(labels):
        raise ValueError(f"got {len(images)} images but {len(labels)} labels; pass one label per image")
    if not images:
        raise ValueError("no images to score; pass at least one image")
    hits = sum(classify_synthetic(img) == label for img, label in zip(images, labels))
    return hits / len(images)


def _check_image(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(
            f"expected an (H, W, 3) RGB image, got shape {arr.shape}; convert channels-first tensors with "
            f"maskfit.data.datasets.to_uint8"
        )
    if arr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {arr.dtype}; convert with maskfit.data.datasets.to_uint8")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"image of shape {arr.shape} is empty")
    return arr


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denom = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum()) / denom if denom > 0 else 0.0
