"""FiT's no-crop resize rule (generalised to any token budget), FiTv2's centre-crop version, random aspect crops.

FiT (``fit/data/in1k_dataset.py:resize_arr``, reference/fit.md section 2.4) resizes every image to fit a
token budget instead of cropping it to a square:

- an image larger than the budget area S^2 is scaled down, keeping its area at S^2 and its aspect ratio;
- an image with a side under one patch (16 px = VAE factor 8 x patch 2) has that side raised to one patch;
- smaller images are *not* upscaled;
- finally each side is floored to a multiple of the patch (a slight anisotropic squeeze, no crop).

Here the budget is given in tokens (S^2 = token_budget * patch_px^2), where ``patch_px`` is the
size of one token in pixels: autoencoder factor x patch size (16 for SD-VAE latents with patch 2; just
the patch size in pixel space).

FiTv2's "Mixed" preprocessing (FiTv2 paper section IV-C, Algorithm 1; reference/fit.md section 2.4) keeps,
for an image whose both sides exceed the square side S = isqrt(token_budget) * patch_px (256 px for 256
tokens of 16 px), a second version next to the resize: the image resized so its short side is S, then
centre-cropped to S x S (:func:`center_crop_to_square`). Training picks one of the two at random per
sample; "flexible" (FiT v1) always takes the resize. :data:`PREPROCESS_MODES` names the two.

Two corner cases where FiT's code breaks and this one differs, both documented on the function:
an extreme aspect ratio that would floor a side to zero pixels, and a tiny image whose *longer* side
is under one patch (FiT raises the wrong side first there).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

# "flexible": resize to the budget only (FiT, and FiTv2 Tab. II's "Flexible" rows); "mixed": images with
# both sides above the square side also get a centre-crop version, one of the two picked at random (FiTv2).
PREPROCESS_MODES = ("flexible", "mixed")


def check_budget(token_budget: int, patch_px: int) -> None:
    if not isinstance(patch_px, (int, np.integer)) or patch_px < 1:
        raise ValueError(f"patch_px={patch_px!r} must be a positive integer (autoencoder factor x patch size)")
    if not isinstance(token_budget, (int, np.integer)) or token_budget < 1:
        raise ValueError(
            f"token_budget={token_budget!r} is smaller than one patch of {patch_px}x{patch_px} px; "
            f"an image needs at least one token, so pass a token_budget >= 1"
        )


def fit_to_token_budget(width: int, height: int, token_budget: int, patch_px: int) -> tuple[int, int]:
    """(width, height) -> (new_w, new_h), multiples of ``patch_px``, by FiT's resize rule.

    Guarantees: ``(new_w/patch_px) * (new_h/patch_px) <= token_budget`` and each side >= ``patch_px``.

    Differences from FiT's code (which only met images where they do not matter):
    - if the shorter side is under one patch (before or after the down-scale), the image is scaled up
      so that side is exactly one patch; FiT checks ``w`` before ``h`` and can floor the other side to 0;
    - an aspect ratio beyond token_budget:1 cannot keep its ratio with one-patch short side, so the long
      side is then capped at ``token_budget`` patches (the image is squeezed along it).
    """
    check_budget(token_budget, patch_px)
    if width < 1 or height < 1:
        raise ValueError(f"image size {width}x{height} is empty; an image needs at least one pixel per side")
    p = float(patch_px)
    max_area = float(token_budget) * p * p
    w, h = float(width), float(height)
    if w * h > max_area:
        # Area-preserving down-scale to the budget area (FiT: new_w = sqrt(w/h) * S).
        scale = math.sqrt(max_area / (w * h))
        w, h = w * scale, h * scale
    short = min(w, h)
    if short < p:
        # Raise the short side to one patch, keeping the aspect ratio (the long side grows with it).
        scale = p / short
        w, h = w * scale, h * scale
    # Floor to whole patches; the 1e-9 keeps an exact multiple (e.g. 256.0000000001 or 255.99999999)
    # from losing a patch to floating-point error, and the loop below restores the budget bound.
    tw = max(1, int(math.floor(w / p + 1e-9)))
    th = max(1, int(math.floor(h / p + 1e-9)))
    while tw * th > token_budget:
        # Only reached by rounding error or by an aspect ratio beyond token_budget:1: trim the longer side.
        if tw >= th:
            tw = max(1, min(tw - 1, token_budget // th))
        else:
            th = max(1, min(th - 1, token_budget // tw))
    return tw * patch_px, th * patch_px


def resize_to_token_budget(img: Image.Image, token_budget: int, patch_px: int) -> Image.Image:
    """Bicubic resize of a PIL image to :func:`fit_to_token_budget`'s size (no copy when unchanged)."""
    new_w, new_h = fit_to_token_budget(img.width, img.height, token_budget, patch_px)
    if (new_w, new_h) == (img.width, img.height):
        return img
    return img.resize((new_w, new_h), resample=Image.BICUBIC)


def check_preprocess(preprocess: str) -> None:
    if preprocess not in PREPROCESS_MODES:
        raise ValueError(
            f"preprocess={preprocess!r} is not one of {PREPROCESS_MODES}: 'flexible' resizes every image to the "
            f"token budget (FiT), 'mixed' also keeps a centre crop of large images (FiTv2)"
        )


def square_side(token_budget: int, patch_px: int) -> int:
    """Side in pixels of the largest square token grid within the budget: isqrt(token_budget) * patch_px.

    256 for FiT's 256 tokens of 16 px (FiT's S); a budget that is not a square number rounds down, so the
    crop never exceeds the budget.
    """
    check_budget(token_budget, patch_px)
    return math.isqrt(int(token_budget)) * int(patch_px)


def has_crop_version(width: int, height: int, token_budget: int, patch_px: int) -> bool:
    """Whether a ``width`` x ``height`` image gets a centre-crop version under "mixed": BOTH sides exceed
    the square side (FiT's README: H > S and W > S; smaller images are only ever resized)."""
    side = square_side(token_budget, patch_px)
    return width > side and height > side


def center_crop_to_square(img: Image.Image, token_budget: int, patch_px: int) -> Image.Image:
    """FiTv2's crop version: bicubic resize so the short side is the square side S, then the centre S x S.

    Only defined for images with :func:`has_crop_version` (a smaller image would be upscaled). The
    offset is ``(side_len - S) // 2``, as ADM's ``center_crop_arr`` that FiT ships; unlike that function
    we resize in one bicubic step (PIL's bicubic already low-passes when shrinking) instead of halving
    with a box filter first. FiT's encoding script is unreleased, so which of the two it ran is unknown.
    """
    side = square_side(token_budget, patch_px)
    if not has_crop_version(img.width, img.height, token_budget, patch_px):
        raise ValueError(
            f"image size {img.width}x{img.height} has no centre-crop version: both sides must exceed the square "
            f"side {side} px (token_budget={token_budget}, patch_px={patch_px}); resize it with "
            f"resize_to_token_budget instead"
        )
    # The short side becomes exactly S; the long side is rounded (it is >= S since long >= short).
    if img.width <= img.height:
        new_w, new_h = side, max(side, int(round(img.height * side / img.width)))
    else:
        new_w, new_h = max(side, int(round(img.width * side / img.height))), side
    img = img.resize((new_w, new_h), resample=Image.BICUBIC)
    x0, y0 = (new_w - side) // 2, (new_h - side) // 2
    return img.crop((x0, y0, x0 + side, y0 + side))


def random_aspect_crop(
    img: Image.Image,
    rng: np.random.Generator,
    ratio_range: Sequence[float] = (1 / 3, 3.0),
    min_area: float = 0.25,
) -> Image.Image:
    """Random crop with a log-uniform aspect ratio (width / height), for square-only image sets.

    The area fraction is drawn uniformly from [min_area, 1] and the aspect ratio log-uniformly from
    ``ratio_range``. When the drawn crop does not fit inside the image at that ratio (e.g. ratio 3 on a
    square can cover at most 1/3 of it), the crop is shrunk to the largest one of *that ratio* that fits:
    the ratio is what the pipeline is for, so the area gives way, not the ratio.

    min_area defaults to 0.25: large enough to keep the object of an ImageNet-style centre crop,
    and below the 1/3 area that a 3:1 crop of a square can reach, so every ratio keeps its drawn area
    on square inputs.
    """
    x0, y0, cw, ch = draw_aspect_crop(img.width, img.height, rng, ratio_range, min_area)
    return img.crop((x0, y0, x0 + cw, y0 + ch))


def draw_aspect_crop(
    W: int, H: int, rng: np.random.Generator, ratio_range: Sequence[float] = (1 / 3, 3.0), min_area: float = 0.25
) -> tuple[int, int, int, int]:
    """The box (x0, y0, width, height) :func:`random_aspect_crop` cuts from a W x H image, and the same four
    draws from ``rng``: token batching replays it from the image size alone to know each epoch's grid."""
    lo, hi = float(ratio_range[0]), float(ratio_range[1])
    if not (0 < lo <= hi):
        raise ValueError(f"ratio_range={tuple(ratio_range)} must satisfy 0 < low <= high, e.g. (1/3, 3)")
    if not (0 < min_area <= 1):
        raise ValueError(f"min_area={min_area} must lie in (0, 1] (a fraction of the image area)")
    if W < 1 or H < 1:
        raise ValueError(f"image size {W}x{H} is empty; cannot crop it")
    log_ratio = rng.uniform(math.log(lo), math.log(hi))
    cw, ch = aspect_crop_size(W, H, log_ratio, rng.uniform(min_area, 1.0))
    x0 = int(rng.integers(0, W - cw + 1))
    y0 = int(rng.integers(0, H - ch + 1))
    return x0, y0, cw, ch


def aspect_crop_size(W: int, H: int, log_ratio: float, area_fraction: float) -> tuple[int, int]:
    """(width, height) of :func:`draw_aspect_crop`'s box from its first two draws (the log aspect ratio and the
    area fraction): the size does not depend on the position drawn after them, so token batching's planner
    computes it from draws replayed for a whole epoch at once (:mod:`maskfit.data.rng_replay`)."""
    ratio = math.exp(log_ratio)
    area = area_fraction * W * H
    cw, ch = math.sqrt(area * ratio), math.sqrt(area / ratio)
    shrink = min(1.0, W / cw, H / ch)  # largest crop of this ratio that fits
    return min(W, max(1, int(round(cw * shrink)))), min(H, max(1, int(round(ch * shrink))))
