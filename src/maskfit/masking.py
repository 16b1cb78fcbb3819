"""Which patch tokens of an image the backbone trains on (masked training), and how many.

Masked diffusion training runs the backbone on a subset of each image's tokens (MaskDiT, Zheng et al.
2023; MDT, Gao et al. 2023; MicroDiT, Sehwag et al. 2024). This module answers two questions per image,
on the CPU in the data loader:

1. **How many** tokens to keep: :class:`MaskConfig` and :func:`num_keep_for`. A constant ratio (MaskDiT's
   0.5), a ratio drawn per image from a Beta distribution (NaViT "continuous token dropping", Dehghani
   et al. 2023 §2.2, §3.3), a ratio that depends on the image's token count (NaViT's
   resolution-dependent dropping), or a constant count K per image (every image the same length, so the
   backbone can run dense (B, K) attention). A schedule lowers the masking over training and ends with an
   unmasked fine-tune (MaskDiT, MicroDiT, FLIP; NaViT Fig. 8 shows decreasing rates beat constant ones).
2. **Which** tokens: a strategy ``(grid_hw, num_keep, generator) -> keep``, the sorted raster indices
   (row * w + col) of the kept tokens in the image's full h x w grid:

   ============  ==============================================================================
   ``uniform``   a uniformly random subset (MaskDiT, MDT, MicroDiT; the published default)
   ``block``     whole b x b cells of a randomly offset cell grid, in random order (MAE/BEiT blockwise)
   ``crop``      one window with the image's aspect ratio at a random place (Patch Diffusion crops)
   ``strided``   a regular sub-grid (lattice) with a random offset, topped up at random (MAE "grid")
   ============  ==============================================================================

   MAE (He et al. 2022) and CLIPA report that random subsets beat block and grid masking at high ratios;
   the structured strategies are here for ablations.

Every function takes a ``torch.Generator`` so a run's masks are reproducible; use
:func:`per_image_generator` to give each (epoch, image) its own stream, so the packing sampler and the
dataset workers draw the same keep count for an image without talking to each other.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

GridHW = tuple[int, int]
Strategy = Callable[..., Tensor]  # (grid_hw, num_keep, generator, **options) -> (num_keep,) int64 sorted

RATIO_DISTRIBUTIONS = ("constant", "beta")
SCHEDULES = ("constant", "linear", "cosine")
# NaViT §3.3 sets the Beta variance to 0.3 * mu * (1 - mu); a Beta with mean mu and concentration
# c = a + b has variance mu * (1 - mu) / (c + 1), so c = 1 / 0.3 - 1.
NAVIT_BETA_CONCENTRATION = 1.0 / 0.3 - 1.0


# ----------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------


def _check_request(grid_hw: GridHW, num_keep: int) -> tuple[int, int, int]:
    """Validate a strategy call; returns (h, w, n = h * w)."""
    h, w = int(grid_hw[0]), int(grid_hw[1])
    if h < 1 or w < 1:
        raise ValueError(f"grid {h}x{w} is empty; an image needs at least a 1x1 token grid")
    n = h * w
    if not 1 <= num_keep <= n:
        raise ValueError(
            f"num_keep={num_keep} is outside [1, {n}] for a {h}x{w} grid; keep at least one token and at "
            f"most all {n} of them"
        )
    return h, w, n


def _randint(low: int, high: int, generator: Optional[torch.Generator]) -> int:
    """One integer uniform in [low, high] (both inclusive)."""
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def _round_half_up(x: float) -> int:
    # Python's round() rounds half to even (round(127.5) = 128 but round(126.5) = 126); half-up makes
    # the kept count a monotone function of the ratio, which the tests and the schedule rely on.
    return int(math.floor(x + 0.5))


def _first_k_by_key(key: Tensor, num_keep: int) -> Tensor:
    """Indices of the num_keep smallest integer keys, sorted ascending as raster indices."""
    order = torch.argsort(key)  # keys are unique integers, so the order is exact
    return torch.sort(order[:num_keep]).values


def per_image_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator of its own for image ``index`` in ``epoch``.

    Seeds are mixed with numpy's SeedSequence, so (seed, epoch, index) triples never collide the way
    ``seed + epoch`` would (seed 0 epoch 1 == seed 1 epoch 0). Re-creating it gives the same draws, which
    lets the sampler predict the keep count that the dataset worker will draw.
    """
    state = np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0]) & 0x7FFF_FFFF_FFFF_FFFF)


# ----------------------------------------------------------------------------------------------------
# Strategies: (grid_hw, num_keep, generator) -> (num_keep,) sorted raster indices
# ----------------------------------------------------------------------------------------------------


def uniform_random(grid_hw: GridHW, num_keep: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """A uniformly random subset of num_keep tokens (MaskDiT ``get_mask``, MDT): every subset equally likely."""
    _, _, n = _check_request(grid_hw, num_keep)
    return torch.sort(torch.randperm(n, generator=generator)[:num_keep]).values


def block_cells(grid_hw: GridHW, block_size: int, offset: tuple[int, int] = (0, 0)) -> Tensor:
    """(h*w,) int64 cell id of every token when the grid is cut into block_size x block_size cells.

    The cut lines sit at rows/cols ``k * block_size - offset``: an offset shifts the cell grid up/left,
    so cells at the borders are clipped rectangles. Cell ids are raster order over the cell grid.
    """
    h, w = grid_hw
    b = block_size
    oy, ox = offset
    rows = torch.arange(h).repeat_interleave(w)  # (n,)
    cols = torch.arange(w).repeat(h)  # (n,)
    cells_per_row = (w - 1 + ox) // b + 1
    return ((rows + oy) // b) * cells_per_row + (cols + ox) // b


def block(
    grid_hw: GridHW, num_keep: int, generator: Optional[torch.Generator] = None, *, block_size: int = 4
) -> Tensor:
    """Whole rectangular cells of tokens, taken in random order until num_keep tokens are kept.

    Definition (exact count, no rejection loop):
    1. Cut the grid into block_size x block_size cells, the cut lines shifted by a random offset
       (oy, ox) in [0, b)^2 so block borders do not always fall at the same rows (border cells are
       clipped rectangles). See :func:`block_cells`.
    2. Put the cells in a uniformly random order and the tokens inside each cell in a random order.
    3. Keep the first num_keep tokens of that sequence: every cell is kept whole or dropped whole,
       except at most one cell that is partly kept (a random subset of it).
    Because the cells partition the grid, keeping random cells is the same as masking random cells:
    the dropped part is made of whole cells too (MAE/BEiT block-wise masking). block_size=1 is uniform.
    """
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be a positive number of tokens per cell side")
    h, w, n = _check_request(grid_hw, num_keep)
    offset = (_randint(0, block_size - 1, generator), _randint(0, block_size - 1, generator))
    cell = block_cells((h, w), block_size, offset)  # (n,)
    num_cells = int(cell.max()) + 1
    cell_rank = torch.randperm(num_cells, generator=generator)  # (num_cells,) position of each cell
    within = torch.randperm(n, generator=generator)  # (n,) random order inside each cell
    key = cell_rank[cell] * n + within  # unique ints: cell order first, then the random order inside
    return _first_k_by_key(key, num_keep)


def window_shape(grid_hw: GridHW, num_keep: int) -> tuple[int, int]:
    """(rows, cols) of the crop window for num_keep tokens: area >= num_keep, aspect close to the image's.

    rows = round(sqrt(k * h / w)) clamped to [1, h] (so rows / cols ~ h / w), cols = ceil(k / rows); if
    cols exceeds w, cols = w and rows = ceil(k / w). The overfill rows * cols - k is then smaller than
    one column of the window (first case) or one row (second case), which is what :func:`crop_window`
    trims.
    """
    h, w, _ = _check_request(grid_hw, num_keep)
    rows = min(h, max(1, _round_half_up(math.sqrt(num_keep * h / w))))
    cols = -(-num_keep // rows)
    if cols > w:
        cols = w
        rows = -(-num_keep // w)
    return rows, cols


def crop_window(grid_hw: GridHW, num_keep: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """One window of ~num_keep tokens with the image's aspect ratio, at a uniformly random place.

    The window is :func:`window_shape`; its top-left corner is uniform over all positions inside the
    grid. When its area exceeds num_keep by e tokens, the rule (deterministic, so no extra randomness) is:
    drop the bottom e tokens of the window's rightmost column if e < rows, otherwise the rightmost e
    tokens of its bottom row. The kept set is then one rectangle, or a rectangle with a notch in one
    corner: still a single contiguous region (Patch Diffusion-style crops, reference/masked.md §3.3).
    """
    h, w, _ = _check_request(grid_hw, num_keep)
    rows, cols = window_shape((h, w), num_keep)
    top = _randint(0, h - rows, generator)
    left = _randint(0, w - cols, generator)
    r = torch.arange(rows)
    c = torch.arange(cols)
    excess = rows * cols - num_keep
    if excess < rows:  # column-major inside the window: the excess is the end of the last column
        local = torch.stack(torch.meshgrid(r, c, indexing="xy"), -1).reshape(-1, 2)  # (rows*cols, 2) (r, c)
    else:  # row-major: the excess is the end of the last row (only when cols == w, see window_shape)
        local = torch.stack(torch.meshgrid(r, c, indexing="ij"), -1).reshape(-1, 2)
    local = local[:num_keep]
    return torch.sort((local[:, 0] + top) * w + (local[:, 1] + left)).values


@lru_cache(maxsize=4096)
def lattice_strides(grid_hw: GridHW, num_keep: int) -> tuple[tuple[int, int], ...]:
    """The (row, col) stride pairs :func:`strided` chooses from for num_keep tokens of a grid.

    A lattice with strides (sy, sx) has ceil(h / sy) x ceil(w / sx) points whatever its offset (see
    :func:`strided`). Candidates are the pairs whose lattice has at most num_keep points and whose strides
    differ by at most a factor 2 (so the lattice looks like a down-sampled image, not thin stripes; the
    limit is waived on an axis where the lattice has a single line, since its stride is then
    meaningless). Among them, those with the most points win (the least random top-up), then the most
    isotropic ones (smallest max/min stride ratio). A pair (h, w), one point, always qualifies.
    """
    h, w, _ = _check_request(grid_hw, num_keep)
    best: list[tuple[int, int]] = []
    best_key = None
    for sy in range(1, h + 1):
        rows = -(-h // sy)
        for sx in range(1, w + 1):
            cols = -(-w // sx)
            count = rows * cols
            if count > num_keep:
                continue
            single_line = rows == 1 or cols == 1
            ratio = max(sy, sx) / min(sy, sx)
            if ratio > 2 and not single_line:
                continue
            key = (count, -ratio if not single_line else -math.inf)
            if best_key is None or key > best_key:
                best, best_key = [(sy, sx)], key
            elif key == best_key:
                best.append((sy, sx))
    return tuple(best)


def strided(grid_hw: GridHW, num_keep: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """A regular sub-grid (lattice) at a random offset, topped up with random tokens to exactly num_keep.

    The strides (sy, sx) are drawn uniformly from :func:`lattice_strides` (e.g. keep 1/4 of a 16x16 grid:
    stride 2 x 2; keep 1/2: 1 x 2 or 2 x 1). The lattice rows are oy, oy + sy, ... with ceil(h / sy) of
    them and oy uniform in [0, h - 1 - (ceil(h / sy) - 1) * sy] (the slack that keeps every row inside
    the grid); the same for columns. The remaining num_keep - count tokens are a uniformly random subset
    of the tokens off the lattice. This is MAE's grid-wise masking generalised to any ratio.
    """
    h, w, n = _check_request(grid_hw, num_keep)
    candidates = lattice_strides((h, w), num_keep)
    sy, sx = candidates[_randint(0, len(candidates) - 1, generator)]
    rows, cols = -(-h // sy), -(-w // sx)
    oy = _randint(0, h - 1 - (rows - 1) * sy, generator)
    ox = _randint(0, w - 1 - (cols - 1) * sx, generator)
    lattice_rows = oy + sy * torch.arange(rows)  # (rows,)
    lattice_cols = ox + sx * torch.arange(cols)  # (cols,)
    on_lattice = torch.zeros(h, w, dtype=torch.bool)
    on_lattice[lattice_rows[:, None], lattice_cols[None, :]] = True
    # Lattice tokens get keys below n, the rest random keys from n upward: the lattice is always kept
    # whole and the top-up is a uniformly random subset of the remaining tokens.
    key = torch.randperm(n, generator=generator) + n * (~on_lattice.reshape(-1)).long()  # (n,)
    return _first_k_by_key(key, num_keep)


STRATEGIES: dict[str, Strategy] = {
    "uniform": uniform_random,
    "block": block,
    "crop": crop_window,
    "strided": strided,
}


# ----------------------------------------------------------------------------------------------------
# How many tokens to keep
# ----------------------------------------------------------------------------------------------------


@dataclass
class MaskConfig:
    """How many tokens of each image to keep, and which, as a function of the training step.

    Exactly one of ``keep_ratio`` / ``keep_count`` chooses the mode (``keep_ratio`` may stay at its
    default 1.0 when ``keep_count`` is set; any other ratio with a count is an error):

    - ratio mode: image i keeps ``round(n_i * r_i)`` tokens (half rounds up), r_i the ratio below.
      ``ratio_distribution="beta"`` draws r_i ~ Beta(mu * c, (1 - mu) * c) per image, mean mu =
      keep_ratio and concentration c = ``beta_concentration`` (default: NaViT's variance
      0.3 * mu * (1 - mu)). ``resolution_dependent=True`` makes mu depend on the image's token count:
      ``keep(n) = min(n, round(K_ref * (n / n_ref) ** gamma))`` with ``K_ref = keep_ratio * n_ref``,
      ``n_ref = reference_tokens`` and ``gamma = resolution_exponent``: gamma = 1 is a constant ratio,
      gamma = 0 a constant count, and 0 < gamma < 1 drops a larger fraction of larger images (NaViT
      §3.3: with the default gamma 0.5 and keep_ratio 0.5 at n_ref = 256, a 64-token image keeps all,
      a 1024-token image keeps a quarter).
    - count mode (``keep_count = K``): every image keeps K tokens, so all segments have equal length.
      An image with fewer than K tokens keeps all of them when ``allow_short_images`` is True and is an
      error otherwise.

    ``min_keep`` is a floor on every image's kept count (an image smaller than it keeps all tokens).

    Schedule: a factor f(step) in [0, 1] scales how many tokens are dropped, kept(step) =
    n - f(step) * (n - kept_as_configured). ``schedule_steps`` is the length of the whole (masked +
    unmasked) run the schedule spans, and its last ``final_unmasked_steps`` are the unmasked fine-tune
    (f = 0: every image keeps all tokens). Over the first D = schedule_steps - final_unmasked_steps
    steps f is 1 (``constant``), 1 - step / D (``linear``) or (1 + cos(pi * step / D)) / 2
    (``cosine``); after the run f stays at its final value. ``schedule_steps=None`` (constant only)
    masks forever. ``unmasked_every = N`` also sets f = 0 at every N-th step (steps N-1, 2N-1, ...).
    """

    strategy: str = "uniform"  # one of STRATEGIES
    keep_ratio: Optional[float] = 1.0  # mean fraction of tokens kept, in (0, 1]; 1.0 = no masking
    keep_count: Optional[int] = None  # constant kept tokens per image (instead of a ratio)
    allow_short_images: bool = True  # count mode: images with fewer than keep_count tokens keep all
    ratio_distribution: str = "constant"  # "constant" | "beta" (per image, NaViT)
    beta_concentration: float = NAVIT_BETA_CONCENTRATION  # a + b of the Beta; larger = tighter
    resolution_dependent: bool = False  # ratio depends on the image's token count (see above)
    reference_tokens: int = 256  # n_ref: token count at which the ratio equals keep_ratio
    resolution_exponent: float = 0.5  # gamma in keep(n) = K_ref * (n / n_ref) ** gamma
    min_keep: int = 1  # no image keeps fewer tokens than this (or all it has, if fewer)
    schedule: str = "constant"  # "constant" | "linear" | "cosine": how masking decays over training
    schedule_steps: Optional[int] = None  # steps the schedule spans, unmasked fine-tune included
    final_unmasked_steps: int = 0  # last steps of schedule_steps at keep ratio 1 (unmasking fine-tune)
    # Every N-th step (steps N-1, 2N-1, ...) keeps every token, throughout training: the model keeps meeting the
    # full grid it is sampled on (0: never). A diagnostic of train/sample mismatch, not a published recipe.
    unmasked_every: int = 0
    block_size: int = 4  # cell side of the "block" strategy, in tokens

    def __post_init__(self):
        self._check_mode()
        self._check_ratio_options()
        self._check_schedule()
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown masking strategy {self.strategy!r}; choose one of {tuple(STRATEGIES)}")
        if self.min_keep < 1:
            raise ValueError(f"min_keep={self.min_keep} must be at least 1: an image with no token has no loss")
        if self.block_size < 1:
            raise ValueError(f"block_size={self.block_size} must be a positive number of tokens per cell side")

    def _check_mode(self) -> None:
        if self.keep_count is not None:
            if self.keep_ratio not in (None, 1.0):
                raise ValueError(
                    f"keep_ratio={self.keep_ratio} and keep_count={self.keep_count} are both set; keep a "
                    f"constant count with keep_count alone (leave keep_ratio at 1.0 or None) or a ratio alone"
                )
            if self.keep_count < 1:
                raise ValueError(f"keep_count={self.keep_count} must be a positive number of tokens per image")
            return
        if self.keep_ratio is None:
            raise ValueError("neither keep_ratio nor keep_count is set; set keep_ratio=1.0 to keep every token")
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(
                f"keep_ratio={self.keep_ratio} is outside (0, 1]; it is the fraction of tokens kept "
                f"(0.5 keeps half, as MaskDiT; 1.0 keeps all)"
            )

    def _check_ratio_options(self) -> None:
        if self.ratio_distribution not in RATIO_DISTRIBUTIONS:
            raise ValueError(
                f"unknown ratio_distribution {self.ratio_distribution!r}; choose one of {RATIO_DISTRIBUTIONS}"
            )
        if not self.beta_concentration > 0:
            raise ValueError(
                f"beta_concentration={self.beta_concentration} must be positive "
                f"(NaViT's variance gives {NAVIT_BETA_CONCENTRATION:.3f})"
            )
        if self.keep_count is not None and (self.ratio_distribution != "constant" or self.resolution_dependent):
            raise ValueError(
                "keep_count keeps a constant count per image; it cannot be combined with "
                f"ratio_distribution={self.ratio_distribution!r} or resolution_dependent="
                f"{self.resolution_dependent}: use keep_ratio for those"
            )
        if self.reference_tokens < 1:
            raise ValueError(f"reference_tokens={self.reference_tokens} must be a positive token count (e.g. 256)")
        if self.resolution_exponent < 0:
            raise ValueError(
                f"resolution_exponent={self.resolution_exponent} must be >= 0 (0: constant count, 1: constant ratio)"
            )

    def _check_schedule(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown mask schedule {self.schedule!r}; choose one of {SCHEDULES}")
        if self.final_unmasked_steps < 0:
            raise ValueError(f"final_unmasked_steps={self.final_unmasked_steps} must be >= 0")
        if self.unmasked_every < 0 or self.unmasked_every == 1:
            raise ValueError(
                f"unmasked_every={self.unmasked_every}: every N-th step unmasked needs N >= 2 (1 would never mask; "
                "set keep_ratio=1.0 for that), or 0 for never"
            )
        if self.schedule_steps is None:
            if self.schedule != "constant" or self.final_unmasked_steps:
                raise ValueError(
                    f"schedule={self.schedule!r} with final_unmasked_steps={self.final_unmasked_steps} needs "
                    "schedule_steps (the total training steps the schedule spans)"
                )
            return
        if self.schedule_steps < 1:
            raise ValueError(f"schedule_steps={self.schedule_steps} must be a positive number of steps")
        if self.final_unmasked_steps > self.schedule_steps:
            raise ValueError(
                f"final_unmasked_steps={self.final_unmasked_steps} exceeds schedule_steps={self.schedule_steps}; "
                "schedule_steps counts the whole run, unmasked fine-tune included"
            )
        if self.schedule != "constant" and self.final_unmasked_steps == self.schedule_steps:
            raise ValueError(
                f"schedule={self.schedule!r} has no steps left to decay over: final_unmasked_steps equals "
                f"schedule_steps={self.schedule_steps}; use schedule='constant' or fewer unmasked steps"
            )


def mask_scale_at(step: int, config: MaskConfig) -> float:
    """The schedule factor f(step) in [0, 1]: 1 = mask as configured, 0 = keep every token."""
    if step < 0:
        raise ValueError(f"step={step} is negative; steps count from 0")
    if config.unmasked_every and (step + 1) % config.unmasked_every == 0:
        return 0.0  # an interleaved unmasked step
    if config.schedule_steps is None:
        return 1.0
    decay_steps = config.schedule_steps - config.final_unmasked_steps
    if step >= decay_steps:  # the unmasked fine-tune, or past the end of a decaying schedule
        return 1.0 if config.schedule == "constant" and config.final_unmasked_steps == 0 else 0.0
    progress = step / decay_steps
    if config.schedule == "linear":
        return 1.0 - progress
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def mask_ratio_at(step: int, config: MaskConfig) -> float:
    """Mean fraction of tokens dropped at ``step`` (ratio mode; at n_ref when resolution dependent)."""
    return 1.0 - keep_ratio_at(step, config)


def keep_ratio_at(step: int, config: MaskConfig) -> float:
    """Mean fraction of tokens kept at ``step``: 1 - f(step) * (1 - keep_ratio).

    In count mode the ratio depends on each image's size: use :func:`num_keep_for` instead.
    """
    if config.keep_count is not None:
        raise ValueError(
            f"keep_ratio_at has no single answer with keep_count={config.keep_count} (the ratio is "
            "keep_count / n per image); call num_keep_for(n_tokens, config, step, generator)"
        )
    return 1.0 - mask_scale_at(step, config) * (1.0 - config.keep_ratio)


def _mean_ratio(n_tokens: int, config: MaskConfig) -> float:
    """The configured mean keep ratio of an n-token image (before the schedule)."""
    if not config.resolution_dependent:
        return config.keep_ratio
    relative = n_tokens / config.reference_tokens
    return min(1.0, config.keep_ratio * relative ** (config.resolution_exponent - 1.0))


def _sample_beta(mean: float, concentration: float, generator: Optional[torch.Generator]) -> float:
    # torch's Beta sampler takes no generator; a numpy generator seeded from the torch one keeps the
    # draw reproducible and tied to the caller's stream.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return float(np.random.default_rng(seed).beta(mean * concentration, (1.0 - mean) * concentration))


def _configured_keep(n_tokens: int, config: MaskConfig, generator: Optional[torch.Generator]) -> float:
    """Tokens an n-token image keeps under full masking (f = 1), as a real number in [0, n]."""
    if config.keep_count is not None:
        if n_tokens < config.keep_count and not config.allow_short_images:
            raise ValueError(
                f"an image has {n_tokens} tokens, fewer than keep_count={config.keep_count}; lower keep_count "
                "or set allow_short_images=True to let such images keep all their tokens"
            )
        return float(min(n_tokens, config.keep_count))
    mean = _mean_ratio(n_tokens, config)
    if config.ratio_distribution == "beta" and mean < 1.0:
        return n_tokens * _sample_beta(mean, config.beta_concentration, generator)
    return n_tokens * mean


def num_keep_for(
    n_tokens: int, config: MaskConfig, step: int = 0, generator: Optional[torch.Generator] = None
) -> int:
    """How many of an image's n_tokens to keep at ``step``: an int in [min(min_keep, n), n]."""
    if n_tokens < 1:
        raise ValueError(f"n_tokens={n_tokens}: an image needs at least one token")
    target = _configured_keep(n_tokens, config, generator)  # drawn even when f = 0: same stream use per step
    scale = mask_scale_at(step, config)
    kept = _round_half_up(n_tokens - scale * (n_tokens - target))
    return max(min(config.min_keep, n_tokens), min(kept, n_tokens))


def kept_counts_are_drawn(config) -> bool:
    """Whether an image's kept count is random (a Beta ratio) rather than a function of its token count.

    config: a :class:`MaskConfig` or the run config's mask section (the same three fields)."""
    return config.keep_count is None and config.ratio_distribution == "beta" and config.keep_ratio < 1.0


def longest_full_stream(config: MaskConfig, kept_tokens: int, largest_image: int,
                        max_images: Optional[int] = None) -> Optional[int]:
    """The most tokens a token-batching step's FULL stream can hold when its backbone stream holds ``kept_tokens``
    (real kept tokens plus kept padding); None when kept counts are drawn (no useful bound).

    A step holds at most ``max_images`` images of n_i <= ``largest_image`` tokens, each keeping k(n_i) and
    dropping d(n_i) = n_i - k(n_i), and kept padding fills the rest of the backbone budget, so its full stream is
    kept_tokens + sum d(n_i) with sum k(n_i) <= kept_tokens. The bound is kept_tokens plus the optimum of the
    linear relaxation: maximise sum_n x_n d(n) over x_n >= 0 with sum_n x_n k(n) <= kept_tokens and
    sum_n x_n <= max_images. Two constraints, so an optimal vertex uses one size, or two with both constraints
    tight; every such vertex is enumerated. k is taken at full masking: the schedule (and the unmasked
    fine-tune) only raise kept counts. For a constant ratio of 1/2 the bound is exactly 2 x kept_tokens; for 3/4
    with 320 images of at most 256 tokens, 0.5 % above kept_tokens / 0.75 (images of 3 tokens keep 2, so without
    the image cap the worst case would be 1.5 x kept_tokens).
    """
    if kept_counts_are_drawn(config):
        return None
    full_masking = dataclasses.replace(config, schedule="constant", schedule_steps=None, final_unmasked_steps=0)
    n = np.arange(1, largest_image + 1, dtype=np.float64)
    k = np.array([num_keep_for(int(m), full_masking) for m in range(1, largest_image + 1)], dtype=np.float64)
    d = n - k
    K = float(kept_tokens)
    one_size = K / k if max_images is None else np.minimum(K / k, float(max_images))
    best = float((one_size * d).max())
    if max_images is not None:
        # x_a + x_b = M and k_a x_a + k_b x_b = K: x_a = (K - k_b M) / (k_a - k_b), both counts >= 0. Rows of
        # sizes a in blocks of 256, so memory stays 256 x largest_image whatever the token budget.
        M = float(max_images)
        kb, db = k[None, :], d[None, :]
        for start in range(0, len(k), 256):
            ka, da = k[start:start + 256, None], d[start:start + 256, None]
            with np.errstate(divide="ignore", invalid="ignore"):
                xa = (K - kb * M) / (ka - kb)
            xb = M - xa
            feasible = np.isfinite(xa) & (xa >= 0) & (xb >= 0)
            if feasible.any():
                xa, xb = np.where(feasible, xa, 0.0), np.where(feasible, xb, 0.0)
                best = max(best, float((xa * da + xb * db).max()))
    # The optimum is a rational with a denominator of at most |k_a - k_b| <= largest_image, so it lies at least
    # 1 / largest_image^2 from any integer it is not: the tolerance cannot round a true value down.
    return int(kept_tokens + math.floor(best + 1e-9))


def choose_keep(
    grid_hw: GridHW, config: MaskConfig, step: int = 0, generator: Optional[torch.Generator] = None
) -> Tensor:
    """(k,) int64 sorted raster indices of the tokens of an h x w image to keep at ``step``.

    Draws the count first (:func:`num_keep_for`) and then the positions from the same generator, so a
    fresh generator with the same seed reproduces both.
    """
    h, w = int(grid_hw[0]), int(grid_hw[1])
    if h < 1 or w < 1:
        raise ValueError(f"grid {h}x{w} is empty; an image needs at least a 1x1 token grid")
    n = h * w
    k = num_keep_for(n, config, step, generator)
    if k == n:  # nothing dropped: skip the strategy (and its random draws)
        return torch.arange(n)
    strategy = STRATEGIES[config.strategy]
    if config.strategy == "block":
        return strategy((h, w), k, generator, block_size=config.block_size)
    return strategy((h, w), k, generator)
