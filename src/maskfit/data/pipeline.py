"""From a run config to the stream of training batches: dataset, loader, masking, token budget.

Two ways to batch (``data.batching``):

- ``"images"``: ``train.batch_size`` images per step (FiT). Each image's mask is drawn from a generator
  seeded by (seed, epoch, image) (:func:`mask_generator`), so a resumed run draws exactly the masks an
  uninterrupted one would, whichever worker builds the batch, and on many GPUs each rank's images get
  the masks they would get in one process's batch.

Either way the loader's workers build each step's whole batch, masks and budget padding included
(:class:`StepBatchBuilder`), and the DataLoader pins it: the training loop's main process does no
per-image work, so the real step runs at the speed of the benchmarked one.
- ``"tokens"``: a constant budget of ``data.tokens_per_step`` *backbone* tokens per step (the kept
  tokens when masking; NaViT packing). :class:`TokenBudgetSampler` packs whole images by their token
  counts, read without decoding where the dataset allows (:func:`token_grids`), and
  :func:`pad_to_budget` appends dummy segments (each at most one image's token budget long, so
  ``max_seqlen`` is one value) so every step's backbone stream is exactly
  ``tokens_per_step`` tokens long (static shapes for ``torch.compile``).

Masking with a token budget: the sampler packs each image by the kept count it WILL have at the step
its bin is trained on. It draws that count with :func:`mask_generator` (seeded by (seed, epoch, image),
never by position in a batch) and the step's schedule factor, and :meth:`TrainingData.next_batch`
draws the mask of that image from a fresh generator with the same seed at the same step, so
``choose_keep`` reproduces the count exactly: the bin fits by construction, never by luck, and a
mismatch would be a loud error, not a silent overflow. (Packing by the *expected* count instead would
need slack in every bin or dropping images when a Beta draw overshoots.) The dummy segments then sit in
the KEPT stream (all of them kept), so the backbone stream has the constant length; the full stream
(whole grids + dummies) would vary, which the plain design never feeds to a layer. The full-grid designs run
their decoder, mixer or side-interpolator on the full stream, so for them more dummy tokens, in the full stream
only, pad it to a length no step exceeds (:func:`static_full_stream`; when kept counts are a function of image
size, not Beta draws); the dummies are invalid there and are left out of their loss
(``maskfit.objective.token_weights`` counts real tokens only).
"""
from __future__ import annotations

import collections
import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from maskfit.config import DataConfig, RunConfig
from maskfit.masking import (
    MaskConfig, choose_keep, kept_counts_are_drawn, longest_full_stream, mask_scale_at, num_keep_for,
    per_image_generator,
)
from maskfit.packing import pad_stream_to_budget, pick_next
from maskfit.data.transfer import FlatBatch, flatten
from maskfit.throughput import TokenSums
from maskfit.tokens import MaskedView, TokenBatch, masked_view


def autoencoder_factor(data: DataConfig) -> int:
    return 1 if data.autoencoder == "identity" else 8


def build_dataset(data: DataConfig, patch_size: int, seed: int, train: bool = True,
                  num_classes: Optional[int] = None, decode_once: bool = False):
    """The dataset of a run: items hold images in [-1, 1] (pixel space) or scaled latents (cache).

    num_classes: the model's class count; data with more classes is refused (datasets.check_class_count).
    decode_once: an image folder decodes its (split's) files into memory first; the training loader passes
    data.decode_once, other callers (prepare, evaluation) read each file once anyway.
    """
    from maskfit.data.datasets import ImageFolderDataset, ImageTransform, SyntheticDataset, check_class_count
    from maskfit.data.synthetic import SyntheticSizes

    patch_px = patch_size * autoencoder_factor(data)
    if data.source == "latents":
        from maskfit.data.latents import LatentCacheDataset

        if not data.root:
            raise ValueError("data.source='latents' needs data.root, a cache folder made by `maskfit prepare`")
        cache = LatentCacheDataset(data.root, train=train, seed=seed, preprocess=data.preprocess)
        if cache.token_budget is not None and cache.token_budget != data.token_budget:
            # Sampling reads the RoPE base grid from data.token_budget: a mismatch extrapolates from the wrong grid.
            raise ValueError(
                f"latent cache {data.root} was built at token_budget={cache.token_budget} but data.token_budget="
                f"{data.token_budget}; set data.token_budget={cache.token_budget}, or rebuild the cache with "
                f"`maskfit prepare CONFIG --set data.token_budget={data.token_budget} --out NEW_CACHE`"
            )
        if len(cache.labels):
            check_class_count(int(cache.labels.max()) + 1, num_classes, f"latent cache {data.root}")
        return cache
    if data.autoencoder != "identity":
        raise ValueError(
            f"data.source={data.source!r} with autoencoder {data.autoencoder!r}: encode the images once with "
            "`maskfit prepare CONFIG` and train on the cache (data.source='latents', data.root=<cache>), or "
            "train in pixel space (data.autoencoder='identity')"
        )
    preprocess = data.preprocess if train else "flexible"  # like flips, the random crop version is for training
    if data.source == "synthetic":
        check_class_count(data.num_classes, num_classes, f"the synthetic set (data.num_classes={data.num_classes})")
        sizes = SyntheticSizes(token_budget=data.token_budget, patch_px=patch_px)
        return SyntheticDataset(
            data.num_images, data.num_classes, seed=seed, sizes=sizes, hflip=data.hflip and train, preprocess=preprocess
        )
    if not data.root:
        raise ValueError("data.source='folder' needs data.root, an image folder in ImageNet layout")
    transform = ImageTransform(
        token_budget=data.token_budget, patch_px=patch_px, random_crop=data.random_aspect_crop,
        hflip=data.hflip and train, preprocess=preprocess,
    )
    dataset = ImageFolderDataset(data.root, transform=transform, seed=seed, num_classes=num_classes)
    if data.split != "all":
        from maskfit.data.split import restrict_to_split

        restrict_to_split(dataset, data.split, data.holdout_fraction)  # our held-out split (maskfit.data.split)
    if decode_once:
        dataset.decode_all()  # after the split: only the files it keeps, aligned with its samples
    return dataset


def dataset_channels(dataset) -> int:
    return int(dataset[0].x.shape[0])


def mask_config(cfg: RunConfig) -> Optional[MaskConfig]:
    """The run's masking, or None when every token is always kept (no masked view is built)."""
    m = cfg.mask
    if m.keep_count is None and m.keep_ratio >= 1.0:
        return None
    return MaskConfig(
        strategy=m.strategy,
        keep_ratio=m.keep_ratio if m.keep_count is None else 1.0,
        keep_count=m.keep_count,
        ratio_distribution=m.ratio_distribution,
        resolution_dependent=m.resolution_dependent,
        reference_tokens=cfg.data.token_budget,
        schedule=m.schedule,
        schedule_steps=None if m.schedule == "constant" and m.final_unmasked_steps == 0 else cfg.train.steps,
        final_unmasked_steps=m.final_unmasked_steps,
        unmasked_every=m.unmasked_every,
        min_keep=m.min_keep,
        block_size=m.block_size,
    )


def draw_keeps(grids: Sequence[Sequence[int]], keys: Sequence[tuple], config: MaskConfig, step: int,
               seed: int) -> list[torch.Tensor]:
    """Each image's kept raster indices at ``step``, from its own :func:`mask_generator` (seed, epoch, index);
    keys are ``(index, epoch, ...)``. Image and token batching draw through here alike."""
    return [choose_keep((int(g[0]), int(g[1])), config, step, mask_generator(seed, int(k[1]), int(k[0])))
            for g, k in zip(grids, keys)]


def static_full_stream(cfg: RunConfig, mask: Optional[MaskConfig], largest_image: int) -> Optional[int]:
    """Token batching with a design whose layers see the full stream (decoder, mixer, side-interpolator): the
    length every masked step's full stream is padded to (:func:`maskfit.masking.longest_full_stream`), so the
    compiled step sees one shape; None for the plain design (only the kept stream reaches a layer), image
    batching, no masking, or kept counts drawn per image (Beta ratios: no useful bound; the full stream then
    varies and compiles with a dynamic length)."""
    if cfg.data.batching != "tokens" or mask is None or cfg.mask.design == "plain":
        return None
    return longest_full_stream(mask, cfg.data.tokens_per_step, largest_image, cfg.data.max_images_per_step)


def stream_length_varies(cfg: RunConfig, mask: Optional[MaskConfig]) -> bool:
    """Whether the backbone stream's length changes between steps: image batching of packed or masked
    streams (token batching and FiT's padded layout keep it constant), so compilation marks it dynamic."""
    return cfg.data.batching == "images" and (cfg.data.layout == "packed" or mask is not None)


def apply_mask(batch: TokenBatch, config: MaskConfig, step: int, seed: int, keys: Sequence[tuple]) -> TokenBatch:
    """Attach a MaskedView choosing kept tokens per image; none when this step keeps every token.

    keys: ``(index, epoch, ...)`` of each image: its mask comes from :func:`mask_generator` (seed, epoch,
    index), whatever batch, rank or worker it lands in.
    """
    grids = batch.layout.grid.tolist()
    if len(keys) != len(grids):
        raise ValueError(f"apply_mask got {len(keys)} image keys for a batch of {len(grids)} images")
    keep = draw_keeps(grids, keys, config, step, seed)
    if all(k.numel() == h * w for k, (h, w) in zip(keep, grids)):
        return batch  # unmasked step (e.g. the final fine-tune): the model runs the full grid
    # The full stream's static bound also bounds the kept segments (no per-batch value for torch.compile).
    view = masked_view(batch.layout, keep, max_seqlen=batch.layout.max_seqlen)
    return TokenBatch(batch.tokens, batch.y, batch.layout, mask=view)


# ----------------------------------------------------------------------------------------------------
# Token budget: per-image sizes without decoding, a resumable packing sampler, padding to the budget
# ----------------------------------------------------------------------------------------------------

# Masks draw from streams of their own, apart from the datasets' per-item flips and crops, which use
# numpy.random.default_rng([seed, epoch, index]) (maskfit.data.datasets.item_rng).
_MASK_SEED_OFFSET = 1 << 32


def mask_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator that draws image ``index``'s kept count and kept tokens in ``epoch`` (token batching).

    Seeded by the image, not its place in a batch: the sampler re-creates it to predict the kept count
    when it packs the bin, and :meth:`TrainingData.next_batch` re-creates it to draw the mask itself.
    """
    return per_image_generator(seed + _MASK_SEED_OFFSET, epoch, index)


class TokenGrids:
    """(h, w) token grid of every item of a dataset in every epoch, each read on first use and then cached.

    Reading on first use spreads the cost of a large image folder (one header read per file) over the
    first epoch instead of stalling the start of training.

    ``read(i)`` gives (item i's grid, its centre-crop grid or None). Under FiTv2's "mixed" preprocessing
    an image with both sides above the square side is loaded as one of two versions, picked per (epoch,
    item) by ``use_crop(epoch, i)``, which replays the dataset's own draw
    (:func:`maskfit.data.datasets.replay_mixed_choice`); without ``use_crop`` the crop is never used.
    ``at(i, epoch)`` is the grid loaded in that epoch; ``grids[i]`` is epoch 0's, as ``dataset[i]`` is
    ``dataset.get(i, epoch=0)``.
    """

    def __init__(
        self,
        num_items: int,
        read: Callable[[int], tuple[tuple[int, int], Optional[tuple[int, int]]]],
        use_crop: Optional[Callable[[int, int], bool]] = None,
    ):
        if num_items < 1:
            raise ValueError(f"the dataset has {num_items} items; token batching needs at least one image")
        self._read = read
        self._use_crop = use_crop
        # (resize grid, crop grid or None) per item, None until read
        self._grids: list[Optional[tuple[tuple[int, int], Optional[tuple[int, int]]]]] = [None] * num_items

    def __len__(self) -> int:
        return len(self._grids)

    def __getitem__(self, index: int) -> tuple[int, int]:
        return self.at(index, 0)

    def at(self, index: int, epoch: int) -> tuple[int, int]:
        """(h, w) of item ``index`` as loaded in ``epoch``."""
        grids = self._grids[index]
        if grids is None:
            (h, w), crop = self._read(index)
            grids = self._grids[index] = ((int(h), int(w)), None if crop is None else (int(crop[0]), int(crop[1])))
        resized, crop = grids
        if crop is not None and self._use_crop is not None and self._use_crop(epoch, index):
            return crop
        return resized


class RandomCropTokenGrids(TokenGrids):
    """:class:`TokenGrids` of an image dataset whose transform cuts a random aspect crop per (epoch, item).

    Each image's own size is read once (the file header, or the decoded array's shape); its grid in an epoch is
    the size the transform makes of it with the item's random stream of that epoch (:meth:`ImageTransform.
    output_size`, the same draws as loading). The last epoch's grid of each item is kept, since the sampler
    asks for it more than once.

    This runs in the training loop's main process, once per image and epoch. Making each item's generator was
    most of the planner's time, so where the size depends on the first two draws only (a random crop without
    FiTv2's mixed choice) those draws are replayed for the whole epoch at once (:mod:`maskfit.data.rng_replay`,
    checked against numpy's own generators on a few items first; a platform where they differ falls back to the
    generators, with a warning).
    """

    CHECKED_ITEMS = 8  # items whose replayed draws are compared with numpy's generators, once per run

    def __init__(self, num_items: int, read_size: Callable[[int], tuple[int, int]], transform, seed: int):
        super().__init__(num_items, lambda i: (read_size(i), None))  # "grid" slot: the image's (W, H)
        self._transform, self._seed = transform, seed
        self._last: list[Optional[tuple[int, tuple[int, int]]]] = [None] * num_items  # (epoch, grid)
        replayable = transform.size_from_first_two_draws and 0 <= seed < 2**32 and num_items <= 2**32
        self._replay: Optional[bool] = None if replayable else False  # None: not yet checked
        self._draws: Optional[tuple[int, np.ndarray]] = None  # (epoch, (N, 2) first two random() values)

    def _epoch_draws(self, epoch: int) -> Optional[np.ndarray]:
        """(N, 2) every item's first two draws in ``epoch``, or None where the replay does not apply."""
        from maskfit.data.rng_replay import agrees_with_numpy, first_doubles

        if self._replay is False or epoch >= 2**32:
            return None
        if self._draws is None or self._draws[0] != epoch:
            n = len(self._grids)
            if self._replay is None:
                self._replay = agrees_with_numpy(self._seed, epoch, np.arange(min(n, self.CHECKED_ITEMS)), 2)
                if not self._replay:
                    warnings.warn("token batching: numpy's generators here differ from maskfit.data.rng_replay; "
                                  "the planner makes one generator per image instead (slower, same grids)")
                    return None
            self._draws = (epoch, first_doubles(self._seed, epoch, np.arange(n), 2))
        return self._draws[1]

    def at(self, index: int, epoch: int) -> tuple[int, int]:
        from maskfit.data.datasets import item_rng

        last = self._last[index]
        if last is not None and last[0] == epoch:
            return last[1]
        if self._grids[index] is None:
            self._grids[index] = (tuple(int(v) for v in self._read(index)[0]), None)
        w0, h0 = self._grids[index][0]
        draws = self._epoch_draws(epoch)
        if draws is None:
            w, h = self._transform.output_size(w0, h0, item_rng(self._seed, epoch, index))
        else:
            w, h = self._transform.output_size_from_draws(w0, h0, float(draws[index, 0]), float(draws[index, 1]))
        p = self._transform.patch_px
        self._last[index] = (epoch, (h // p, w // p))
        return self._last[index][1]


def token_grids(dataset, patch: int) -> TokenGrids:
    """Each item's token grid in each epoch, without decoding images where the dataset allows.

    - :class:`SyntheticDataset`: the size is the first draw of the item's (seed, index) stream;
    - :class:`LatentCacheDataset`: the cache's ``sizes`` (and ``crop_sizes`` under "mixed");
    - :class:`ImageFolderDataset`: PIL reads the file header only, then FiT's budget rule
      (:func:`fit_to_token_budget`) and, under "mixed", whether the image has a centre-crop version
      (:func:`has_crop_version`), exactly what loading does;
    - :class:`ImageListDataset`: the array shapes, then the same rules;
    - any other dataset: each item is loaded once (``dataset[i]``) and its grid kept.

    Under FiTv2's "mixed" preprocessing an image with a crop version has the square grid in the epochs
    whose replayed choice picks the crop (the sampler reads :meth:`TokenGrids.at` per epoch), so the
    sampler packs exactly what will be loaded.

    An image dataset with random aspect crops changes its sizes every epoch: :class:`RandomCropTokenGrids`
    replays each epoch's crop from the image size and the item's random stream. Any other dataset with random
    crops is an error here. ``TrainingData`` checks every loaded batch against these grids, so a dataset whose
    sizes drift anyway fails loudly.
    """
    from maskfit.data.datasets import ImageFolderDataset, ImageListDataset, SyntheticDataset, replay_mixed_choice
    from maskfit.data.latents import LatentCacheDataset
    from maskfit.data.resize import fit_to_token_budget, has_crop_version, square_side

    n = len(dataset)
    transform = getattr(dataset, "transform", None)
    if isinstance(dataset, (ImageFolderDataset, ImageListDataset)) and transform.random_crop:
        return RandomCropTokenGrids(n, dataset.image_size, transform, dataset.seed)
    if transform is not None and getattr(transform, "random_crop", False):
        raise ValueError(
            "the dataset crops images at random (random_crop=True), so their token counts change every epoch "
            "and cannot be packed ahead of loading; turn the random aspect crop off (data.random_aspect_crop"
            "=false) or use data.batching='images'"
        )

    def use_crop(epoch: int, i: int) -> bool:
        # Without a random aspect crop the mixed choice is the first draw of the item's stream.
        return replay_mixed_choice(dataset.seed, epoch, i)

    if isinstance(dataset, SyntheticDataset):
        p = dataset.sizes.patch_px

        def read(i: int):
            # synthetic_sample's first draw from default_rng([seed, index]) is the size (within the budget,
            # so never with a crop version).
            w, h = dataset.sizes.draw(np.random.default_rng([dataset.seed, i]))
            return (h // p, w // p), None

        return TokenGrids(n, read)
    if isinstance(dataset, LatentCacheDataset):
        sizes, crop_sizes = dataset.sizes, dataset.crop_sizes  # (N, 2) pixel (H, W); crop (0, 0) where none
        p = dataset.patch_px

        def read_cache(i: int):
            crop = (int(crop_sizes[i, 0]) // p, int(crop_sizes[i, 1]) // p) if dataset.has_crop(i) else None
            return (int(sizes[i, 0]) // p, int(sizes[i, 1]) // p), crop

        return TokenGrids(n, read_cache, use_crop if dataset.mixed else None)
    if isinstance(dataset, (ImageFolderDataset, ImageListDataset)):
        budget, p = dataset.token_budget, dataset.patch_px
        mixed = dataset.preprocess == "mixed"
        side = square_side(budget, p) // p

        def read_image(i: int):
            w0, h0 = dataset.image_size(i)
            w, h = fit_to_token_budget(w0, h0, budget, p)
            crop = (side, side) if mixed and has_crop_version(w0, h0, budget, p) else None
            return (h // p, w // p), crop

        return TokenGrids(n, read_image, use_crop if mixed else None)

    def load(i: int):
        x = dataset[i].x  # (C, H, W)
        return (x.shape[1] // patch, x.shape[2] // patch), None

    return TokenGrids(n, load)


@dataclass(frozen=True)
class BinPlan:
    """One step's images as the sampler planned them."""

    epoch: int
    step: int  # the training step this bin is for (kept counts depend on it through the mask schedule)
    indices: tuple[int, ...]  # dataset indices, in stream order
    grids: tuple[tuple[int, int], ...]  # (h, w) token grid of each image
    counts: tuple[int, ...]  # backbone tokens of each image at ``step`` (kept count, or h * w unmasked)

    @property
    def tokens(self) -> int:
        return sum(self.counts)


class TokenBudgetSampler:
    """Bins of whole images whose backbone tokens at their step fit ``tokens_per_step``, one bin per step.

    Each epoch streams a seeded permutation of the dataset (from (seed, epoch), like the image
    batching) through a buffer of ``buffer_size`` pending images, filled with the rule of
    :class:`maskfit.packing.StreamingPacker`: the oldest pending image while the room left is at least
    the longest pending one, then the longest one that still fits; the bin closes when nothing pending
    fits (or it holds ``max_images``). Every bin starts with the oldest pending image, so nothing waits
    long, and at the end of an epoch the buffer drains: no image is split, left out or repeated within an
    epoch.

    Lengths are each image's backbone tokens at the bin's step: h * w unmasked, the kept count under
    ``mask`` (drawn with :func:`mask_generator`, the stream the mask itself is drawn from, at that step's
    schedule factor). They are re-read at every bin, so a decaying mask schedule packs each step by its
    own counts. StreamingPacker takes lengths fixed on arrival, hence this sampler of its own.

    Resume: the state after each bin is (epoch, step of the next bin, items of the epoch's order taken,
    pending images); bins are a deterministic function of it, so a restored state continues with exactly
    the bins an uninterrupted run would see, at no replay cost.
    """

    def __init__(
        self,
        grids: Sequence[tuple[int, int]],
        tokens_per_step: int,
        *,
        mask: Optional[MaskConfig] = None,
        seed: int = 0,
        max_images: Optional[int] = None,
        buffer_size: int = 64,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
        if tokens_per_step < 1:
            raise ValueError(f"tokens_per_step={tokens_per_step} must be a positive number of backbone tokens")
        if max_images is not None and max_images < 1:
            raise ValueError(f"max_images={max_images} must be at least 1 (or None for no cap)")
        if buffer_size < 1:
            raise ValueError(f"buffer_size={buffer_size} must be at least 1 (64 keeps padding well under 2 %)")
        if seed < 0:
            raise ValueError(f"seed={seed} must be >= 0 (it seeds numpy's generator)")
        if len(grids) < 1:
            raise ValueError("the dataset is empty; token batching needs at least one image")
        self.grids = grids
        self.tokens_per_step = tokens_per_step
        self.mask = mask
        self._drawn = mask is not None and kept_counts_are_drawn(mask)
        self.seed = seed
        self.max_images = max_images
        self.buffer_size = buffer_size
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.step = 0  # training step of the next bin
        self.cursor = 0  # items of this epoch's order already taken into the buffer
        self.pending: list[int] = []  # dataset indices waiting for a bin, oldest first
        self._order_cache: Optional[tuple[int, np.ndarray]] = None
        self._counts: dict[int, tuple[float, int]] = {}  # index -> (schedule factor, kept count) this epoch

    def order(self, epoch: int) -> np.ndarray:
        """(N,) the order images enter the buffer in ``epoch``: the same on every run."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            self._order_cache = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.grids)))
        return self._order_cache[1]

    def grid(self, index: int) -> tuple[int, int]:
        """(h, w) of image ``index`` in the current epoch: under FiTv2's "mixed" preprocessing an image's
        version (resize or centre crop), and so its grid, is drawn per epoch (:meth:`TokenGrids.at`)."""
        if isinstance(self.grids, TokenGrids):
            return self.grids.at(index, self.epoch)
        return self.grids[index]

    def count(self, index: int, step: int) -> int:
        """Backbone tokens of image ``index`` at ``step`` in the current epoch."""
        h, w = self.grid(index)
        n = h * w
        if self.mask is None:
            kept = n
        else:
            # num_keep_for depends on the step only through the schedule factor (its random draw comes
            # first and does not depend on the step), so a count is redrawn only when the factor moves:
            # once per image and epoch under a constant schedule.
            scale = mask_scale_at(step, self.mask)
            cached = self._counts.get(index)
            if cached is not None and cached[0] == scale:
                kept = cached[1]
            else:
                # The generator only where the count is a draw (a Beta ratio): creating one costs ~10 us, and
                # this runs for every image in the training loop's main process.
                draw = mask_generator(self.seed, self.epoch, index) if self._drawn else None
                kept = num_keep_for(n, self.mask, step, draw)
                self._counts[index] = (scale, kept)
        if kept > self.tokens_per_step:
            raise ValueError(
                f"image {index} has a {h}x{w} token grid and {kept} backbone tokens at step {step}, more than "
                f"tokens_per_step={self.tokens_per_step}; raise data.tokens_per_step to at least the token "
                f"budget of one image"
            )
        return kept

    def next_bin(self) -> BinPlan:
        """This rank's bin of step ``self.step``; the state advances past the step.

        Every rank plans the same ``world_size`` bins of the step from one shared stream (rank r's is the
        r-th), so ranks never share an image, the state is the same on every rank, and it means the same
        position in the stream for any number of ranks (a checkpoint resumes on another world size).
        """
        step = self.step
        plans = [self._plan(step) for _ in range(self.world_size)]
        self.step = step + 1
        return plans[self.rank]

    def _plan(self, step: int) -> BinPlan:
        """Plan the next bin of the stream for ``step``."""
        if self.cursor >= len(self.grids) and not self.pending:
            # The epoch is used up: this bin opens the next one (the buffer never crosses epochs).
            self.epoch, self.cursor = self.epoch + 1, 0
            self._counts.clear()
        order = self.order(self.epoch)
        room = self.tokens_per_step
        chosen: list[int] = []
        counts: list[int] = []
        self._refill(order)
        # Every count is taken at this bin's step, so each pending image's length is read once per bin and kept
        # beside it (lengths[j] is pending[j]'s), not re-read for the whole buffer at every pick: this runs in the
        # training loop's main process (the DataLoader asks for bins there), where a bin of 300 images from a
        # buffer of 64 cost ~20 000 reads per step (tools/probes/bin_planner.py: 17-19 ms a bin on a 2-core CPU,
        # now ~2).
        lengths = [self.count(i, step) for i in self.pending]
        while self.pending and (self.max_images is None or len(chosen) < self.max_images):
            pick = pick_next(lengths, room)
            if pick is None:
                break
            chosen.append(self.pending.pop(pick))
            counts.append(lengths.pop(pick))
            room -= counts[-1]
            lengths.extend(self.count(i, step) for i in self._refill(order))
        for i in chosen:
            self._counts.pop(i, None)
        return BinPlan(self.epoch, step, tuple(chosen), tuple(self.grid(i) for i in chosen), tuple(counts))

    def _refill(self, order: np.ndarray) -> list[int]:
        """Top the buffer up from the epoch's order; returns the images added, oldest first."""
        take = max(0, min(self.buffer_size - len(self.pending), len(order) - self.cursor))
        added = [int(i) for i in order[self.cursor : self.cursor + take]]
        self.cursor += take
        self.pending.extend(added)
        return added

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch, "step": self.step, "cursor": self.cursor, "pending": list(self.pending),
            **self._identity(),
        }

    def load_state_dict(self, state: dict) -> None:
        mismatch = {k: (state.get(k), v) for k, v in self._identity().items() if state.get(k) != v}
        if mismatch:
            raise ValueError(
                f"token-batching state was saved for a different setting {mismatch} (saved, now); resume with the "
                "same dataset, seed, data.tokens_per_step and data.max_images_per_step, or start a fresh run"
            )
        epoch, step, cursor = int(state["epoch"]), int(state["step"]), int(state["cursor"])
        pending = [int(i) for i in state["pending"]]
        if epoch < 0 or step < 0 or not 0 <= cursor <= len(self.grids) or len(pending) > cursor:
            raise ValueError(
                f"token-batching state epoch={epoch}, step={step}, cursor={cursor}, {len(pending)} pending is "
                f"invalid for {len(self.grids)} images; the checkpoint's data state is damaged, start a fresh run"
            )
        self.epoch, self.step, self.cursor, self.pending = epoch, step, cursor, pending
        self._counts.clear()

    def _identity(self) -> dict:
        """What fixes the bins: a state from another setting would resume at the wrong images."""
        return {
            "seed": self.seed, "num_items": len(self.grids), "tokens_per_step": self.tokens_per_step,
            "max_images": self.max_images, "buffer_size": self.buffer_size,
        }


class _PlannedBins:
    """The DataLoader's batch_sampler: asks the loader for bins as the DataLoader prefetches them."""

    def __init__(self, loader: "TokenBudgetLoader"):
        self.loader = loader

    def __iter__(self) -> Iterator[list[tuple]]:
        return self.loader._plan_bins()


class TokenBudgetLoader:
    """Loads the sampler's bins with a DataLoader; yields ``(TokenBatch, StepInfo, BinPlan)`` without end.

    The DataLoader's workers prefetch, so the sampler runs ahead of the training loop, and each worker
    builds its bin's whole batch (patchify, pack, masks, padding to the budget: :class:`StepBatchBuilder`),
    so the main process only moves pinned tensors to the device. Every bin's plan is queued with the
    sampler state after it; ``state_dict()`` is the state after the last bin handed out, which is where a
    resumed run must continue.
    """

    def __init__(self, dataset, sampler: TokenBudgetSampler, builder: "StepBatchBuilder", num_workers: int = 0,
                 pin_memory: bool = False):
        from torch.utils.data import DataLoader

        from maskfit.data.loader import _KeyedDataset, worker_start_method
        from maskfit.interrupt import ignore_stop_signals_in_worker

        self.sampler = sampler
        self._state = sampler.state_dict()  # after the last bin handed out
        self._planned: collections.deque = collections.deque()  # (plan, state after it) of bins in flight
        self.dataloader = DataLoader(
            _KeyedDataset(dataset),  # (index, epoch, ...) keys: per-item flips follow the epoch
            batch_sampler=_PlannedBins(self),
            num_workers=num_workers,
            collate_fn=builder,
            pin_memory=pin_memory,
            persistent_workers=False,  # one endless iteration: the workers start once per forever()
            worker_init_fn=ignore_stop_signals_in_worker,  # Ctrl-C / SIGTERM are the main process's to handle
            multiprocessing_context=worker_start_method(dataset, num_workers),
        )

    def _plan_bins(self) -> Iterator[list[tuple]]:
        while True:
            plan = self.sampler.next_bin()
            self._planned.append((plan, self.sampler.state_dict()))
            # Each key carries what its worker needs to build and check the bin: the step (mask schedule),
            # the planned grid and backbone count of the image.
            yield [(i, plan.epoch, plan.step, c, g[0], g[1]) for i, c, g in zip(plan.indices, plan.counts, plan.grids)]

    def forever(self) -> Iterator[tuple[TokenBatch, "StepInfo", BinPlan]]:
        """The endless stream of (batch, step info, plan); closed at interpreter exit if still open
        (maskfit.interrupt.close_at_exit)."""
        from maskfit.interrupt import close_at_exit

        return close_at_exit(self._forever())

    def _forever(self) -> Iterator[tuple[TokenBatch, "StepInfo", BinPlan]]:
        self.sampler.load_state_dict(self._state)  # drop whatever an earlier iterator prefetched
        self._planned.clear()
        for batch, info in self.dataloader:  # batches come in sampler order
            plan, self._state = self._planned.popleft()
            yield batch, info, plan

    def state_dict(self) -> dict:
        return dict(self._state)

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)  # checks the setting matches and the position is valid
        self._state = self.sampler.state_dict()


def pad_to_budget(
    batch: TokenBatch, keep: Optional[Sequence[torch.Tensor]], budget: int, max_images: Optional[int] = None,
    segment_cap: Optional[int] = None, full_tokens: Optional[int] = None,
) -> TokenBatch:
    """Make the BACKBONE stream exactly ``budget`` tokens: dummy segments, with every token of them kept.

    segment_cap: no dummy segment longer than this (the stream's static segment bound, so ``max_seqlen``
    stays one value every step; :func:`maskfit.packing.pad_stream_to_budget`); None: one dummy segment.

    Unmasked (``keep`` None): :func:`pad_stream_to_budget` on the stream itself.

    Masked (``keep[b]``: raster indices of image b's kept tokens): the backbone sees the kept tokens, so
    the kept stream is what must total ``budget``. The full stream gets dummy segments of
    R = budget - (kept tokens) zero tokens in all (``valid`` False), and the masked view keeps ALL of them:
    ``tokens[mask.index]`` then holds the real kept tokens followed by the R dummy tokens, matching
    ``mask.layout`` segment for segment. The plain design trains on exactly that pair; the full stream
    (real grids + R) varies in length, but only the kept stream reaches the backbone. ``mask.layout``
    carries ``valid`` (False on the dummies), so attention keeps each dummy to itself and the loss counts no
    dummy token; zero-length segments up to ``max_images`` keep nothing.

    ``full_tokens`` (masked only): make the FULL stream exactly this long too, for the designs whose decoder,
    mixer or side-interpolator runs on it (static shapes: no recompilation, CUDA graphs). The padding is then
    full_tokens - (real tokens) dummy tokens in segments of at most ``segment_cap``; its first R tokens (in
    segment order, raster order within each) are the kept ones, the rest appear in the full stream only, as
    dropped positions that no loss counts. :func:`maskfit.masking.longest_full_stream` gives a bound no step
    exceeds.
    """
    if keep is None:
        return pad_stream_to_budget(batch, budget, max_images, segment_cap)
    lay = batch.layout
    if len(keep) != lay.num_images:
        raise ValueError(f"pad_to_budget got keep indices for {len(keep)} images, the stream has {lay.num_images}")
    kept_total = sum(int(k.numel()) for k in keep)
    if kept_total > budget:
        raise ValueError(
            f"the images keep {kept_total} tokens, more than the budget {budget}; pack bins by the kept counts "
            "(TokenBudgetSampler) or raise data.tokens_per_step"
        )
    remaining = budget - kept_total
    if full_tokens is None:
        # Dummies of `remaining` tokens in all. The full stream's length varies, so the segment count is fixed by
        # the backbone budget (no step pads more than that), not by the full stream.
        full = pad_stream_to_budget(batch, lay.num_tokens + remaining, max_images, segment_cap, most_padding=budget)
    else:
        if lay.num_tokens + remaining > full_tokens:
            raise ValueError(
                f"the step's full stream needs {lay.num_tokens + remaining} tokens ({lay.num_tokens} of its images, "
                f"{remaining} kept padding), more than full_tokens={full_tokens}; compute the bound with "
                "maskfit.masking.longest_full_stream for this mask, budget and image cap"
            )
        full = pad_stream_to_budget(batch, full_tokens, max_images, segment_cap, most_padding=full_tokens)
    # Each dummy's tokens fill its grid in raster order, so raster index r is its r-th token: the first
    # `remaining` padding tokens are kept (all of them without full_tokens).
    extra, left = [], remaining
    for n in full.layout.seqlens()[lay.num_images:].tolist():
        extra.append(torch.arange(min(int(n), left)))
        left -= min(int(n), left)
    view = masked_view(full.layout, list(keep) + extra, max_seqlen=full.layout.max_seqlen)
    kept_layout = dataclasses.replace(view.layout, valid=full.layout.valid[view.index])  # (budget,)
    return TokenBatch(full.tokens, full.y, full.layout, mask=MaskedView(view.index, kept_layout))


# ----------------------------------------------------------------------------------------------------
# What train.py reads
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepInfo:
    """What the training loop counts about a step's batch, computed with it in the worker (no host reads
    of the batch in the main process)."""

    step: int
    num_images: int  # real images (the token budget's dummy segment is none)
    backbone_slots: int  # tokens the backbone runs on (kept stream when masked), padding included
    backbone_real: int  # of those, real image tokens
    masked: bool  # the backbone ran on a kept subset this step
    sums: TokenSums  # per-image token sums of the real images (useful FLOPs: maskfit.throughput)


@dataclass(frozen=True)
class StepBatchBuilder:
    """Builds one training step's whole batch from its ``(key, item)`` pairs; the loader's collate_fn.

    It runs in the DataLoader's workers: patchify and pack the images, draw each image's mask from its
    :func:`mask_generator` (:func:`draw_keeps`; under token batching the stream the sampler packed by) and
    pad the backbone stream to the token budget. The main process then
    only copies pinned tensors to the device, so the step the GPU runs is the benchmarked step.

    Keys: ``(index, epoch, step)`` for image batching; ``(index, epoch, step, count, h, w)`` for token
    batching, with the planned backbone count and grid of each image, checked here.
    """

    patch: int
    layout: str  # "packed" | "padded"
    seq_len: Optional[int]  # padded slots per image (padded layout)
    mask: Optional[MaskConfig]
    seed: int
    tokens_per_step: Optional[int] = None  # token batching: backbone tokens per step
    max_images: Optional[int] = None  # token batching: images per step at most
    max_seqlen: int = 0  # token batching: the static segment-length bound (the per-image token budget)
    # token batching, masked, full-grid designs: the full stream's static length (longest_full_stream), or None
    full_tokens: Optional[int] = None

    def __call__(self, pairs: Sequence[tuple[tuple, object]]) -> tuple[FlatBatch, StepInfo]:
        from maskfit.data.loader import collate_items

        keys = [k for k, _ in pairs]
        step = int(keys[0][2])
        batch = collate_items([item for _, item in pairs], self.patch, self.layout, self.seq_len)
        if self.tokens_per_step is None:
            if self.mask is not None:
                batch = apply_mask(batch, self.mask, step, self.seed, keys)
        else:
            batch = self._fill_budget(batch, keys, step)
        backbone = batch.layout if batch.mask is None else batch.mask.layout
        slots = backbone.num_tokens
        real = slots if backbone.valid is None else int(backbone.valid.sum())
        n = len(pairs)  # real images come first; the budget's dummy and empty segments follow
        full = batch.layout.grid[:n].prod(dim=1)  # (n,)
        kept = full if batch.mask is None else batch.mask.layout.seqlens()[:n]  # (n,)
        sums = TokenSums(n, int(kept.sum()), int((kept * kept).sum()), int(full.sum()), int((full * full).sum()))
        # Two tensors instead of 14 cross to the main process (maskfit.data.transfer says why).
        return flatten(batch), StepInfo(step, n, slots, real, batch.mask is not None, sums)

    def _fill_budget(self, batch: TokenBatch, keys: Sequence[tuple], step: int) -> TokenBatch:
        grids = [tuple(g) for g in batch.layout.grid.tolist()]
        planned = [(int(k[4]), int(k[5])) for k in keys]
        indices = [int(k[0]) for k in keys]
        if grids != planned:
            raise ValueError(
                f"step {step}: images {indices} loaded with token grids {grids}, but the sampler packed them by "
                f"the grids {planned} read before loading; the dataset must give each image the size it reports "
                "(no random crops or resizes that change between reads)"
            )
        # A fixed bound instead of this batch's longest image: the kernels see one value every step.
        layout = dataclasses.replace(batch.layout, max_seqlen=max(self.max_seqlen, batch.layout.max_seqlen))
        batch = TokenBatch(batch.tokens, batch.y, layout)
        keep = None
        if self.mask is not None:
            keep = draw_keeps(grids, keys, self.mask, step, self.seed)
            counts = tuple(int(k.numel()) for k in keep)
            planned_counts = tuple(int(k[3]) for k in keys)
            if counts != planned_counts:  # the sampler and the mask must draw from the same stream
                raise RuntimeError(
                    f"step {step}: the masks keep {counts} tokens but the bin was packed for {planned_counts}; "
                    "TokenBudgetSampler.count and choose_keep disagree (a bug: report it)"
                )
            if all(c == h * w for c, (h, w) in zip(counts, grids)):
                keep = None  # unmasked step (e.g. the final fine-tune): the backbone runs the full grids
        return pad_to_budget(batch, keep, self.tokens_per_step, self.max_images, segment_cap=self.max_seqlen or None,
                             full_tokens=None if keep is None else self.full_tokens)


@dataclass
class TrainingData:
    """``next_batch(step)`` for the training loop, its resumable state, and the padding it trains on.

    ``tokens_per_step`` None: image batching (``loader`` a ResumableLoader of batch_size images);
    otherwise token batching (``loader`` a :class:`TokenBudgetLoader`), every backbone stream exactly
    that long. Either way the loader's workers build each step's whole batch (:class:`StepBatchBuilder`)
    and pin it. ``padding_fraction()`` is the share of backbone token slots that were padding over the
    steps produced so far (FiT's per-image padding in the padded layout; the dummy segment with a token
    budget; 0 for packed image batches), counted across resumes; ``last_padding_fraction`` is the
    latest step's, ``last_info`` the latest step's counts, and ``last_plan`` (token batching) names the
    latest step's images.
    """

    loader: object  # maskfit.data.loader.ResumableLoader or TokenBudgetLoader
    channels: int
    mask: Optional[MaskConfig]
    seed: int
    tokens_per_step: Optional[int] = None  # token batching: backbone tokens per step
    last_padding_fraction: float = 0.0
    last_info: Optional[StepInfo] = field(default=None, init=False, repr=False)
    last_plan: Optional[BinPlan] = field(default=None, init=False, repr=False)  # token batching: the latest bin
    _real_slots: int = field(default=0, init=False, repr=False)
    _all_slots: int = field(default=0, init=False, repr=False)
    _iterator: Optional[Iterator] = field(default=None, init=False, repr=False)

    def next_batch(self, step: int) -> TokenBatch:
        """Step ``step``'s batch on the CPU (views of the pinned flat tensors the loader built)."""
        return self._next_flat(step).unflatten()

    def next_device_batch(self, step: int, device: torch.device) -> TokenBatch:
        """Step ``step``'s batch on ``device``: two asynchronous copies from pinned memory, then views."""
        return self._next_flat(step).to(device)

    def _next_flat(self, step: int) -> FlatBatch:
        if self.tokens_per_step is None:
            if self._iterator is None:
                self._iterator = self.loader.forever(first_step=step)
            batch, info = next(self._iterator)
        else:
            if self._iterator is None:
                self._iterator = self.loader.forever()
            batch, info, plan = next(self._iterator)
            if plan.step != step:
                raise ValueError(
                    f"next_batch(step={step}) got the bin planned for step {plan.step}: token batches are packed "
                    "for their step (the mask schedule sets the kept counts); ask for consecutive steps from 0, "
                    "or load the data state saved with the checkpoint before resuming at a later step"
                )
            self.last_plan = plan
        if info.step != step:  # the loader's step keys and the loop's count must agree
            raise RuntimeError(f"next_batch(step={step}) got the batch built for step {info.step} (a bug: report it)")
        self.last_info = info
        self._real_slots += info.backbone_real
        self._all_slots += info.backbone_slots
        self.last_padding_fraction = 1.0 - info.backbone_real / info.backbone_slots if info.backbone_slots else 0.0
        return batch

    def padding_fraction(self) -> float:
        """Share of the backbone token slots that were padding, over every step produced so far."""
        return 1.0 - self._real_slots / self._all_slots if self._all_slots else 0.0

    def state_dict(self) -> dict:
        return {**self.loader.state_dict(), "padding_real_slots": self._real_slots, "padding_slots": self._all_slots}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        # Checkpoints from before the padding counters start them at 0.
        self._real_slots = int(state.get("padding_real_slots", 0))
        self._all_slots = int(state.get("padding_slots", 0))
        self._iterator = None


def build_training_data(cfg: RunConfig, patch_size: int, rank: int = 0, world_size: int = 1) -> TrainingData:
    """The run's batches for rank ``rank`` of ``world_size``: its disjoint share of every step.

    Image batching: ``train.batch_size`` is the global batch, each rank takes its slice of it. Token
    batching: ``data.tokens_per_step`` is per rank; every rank plans the same bins and takes its own.
    """
    from maskfit.data.loader import make_loader

    from maskfit.models.transformer import model_config

    num_classes = cfg.model.overrides.get("num_classes", model_config(cfg.model.preset).num_classes)
    dataset = build_dataset(
        cfg.data, patch_size, cfg.train.seed, train=True, num_classes=num_classes, decode_once=cfg.data.decode_once
    )
    patch = getattr(dataset, "patch", patch_size)
    mask = mask_config(cfg)
    pin = torch.cuda.is_available()
    if cfg.data.batching == "tokens":
        return _token_batching(cfg, dataset, patch, mask, pin, rank, world_size)
    if cfg.train.batch_size % world_size:
        raise ValueError(
            f"train.batch_size={cfg.train.batch_size} (the global batch) does not split evenly over {world_size} "
            f"ranks; use a multiple of {world_size}, e.g. {world_size * max(1, cfg.train.batch_size // world_size)}"
        )
    if len(dataset) < cfg.train.batch_size:
        raise ValueError(
            f"the dataset has {len(dataset)} images, fewer than train.batch_size={cfg.train.batch_size}; "
            "lower the batch size or add images"
        )
    builder = StepBatchBuilder(patch, cfg.data.layout, cfg.data.token_budget, mask, cfg.train.seed)
    loader = make_loader(
        dataset, cfg.train.batch_size // world_size, layout=cfg.data.layout, seed=cfg.train.seed,
        num_workers=cfg.data.num_workers, patch=patch, seq_len=cfg.data.token_budget, pin_memory=pin,
        step_collate=builder, rank=rank, world_size=world_size,
    )
    return TrainingData(loader, dataset_channels(dataset), mask, cfg.train.seed)


def _token_batching(cfg: RunConfig, dataset, patch: int, mask: Optional[MaskConfig], pin: bool, rank: int = 0,
                    world_size: int = 1) -> TrainingData:
    data = cfg.data
    sampler = TokenBudgetSampler(
        token_grids(dataset, patch), data.tokens_per_step, mask=mask, seed=cfg.train.seed,
        max_images=data.max_images_per_step, rank=rank, world_size=world_size,
    )
    largest = int(getattr(dataset, "token_budget", data.token_budget))
    builder = StepBatchBuilder(
        patch, "packed", None, mask, cfg.train.seed, tokens_per_step=data.tokens_per_step,
        max_images=data.max_images_per_step, max_seqlen=largest,
        full_tokens=static_full_stream(cfg, mask, largest),
    )
    loader = TokenBudgetLoader(dataset, sampler, builder, data.num_workers, pin_memory=pin)
    return TrainingData(loader, dataset_channels(dataset), mask, cfg.train.seed, tokens_per_step=data.tokens_per_step)
