"""From a run config to the stream of training batches: dataset, loader, masking.

Masks are drawn in the main process from a generator seeded by (seed, step), so a resumed run draws
exactly the masks an uninterrupted one would, whatever the loader's workers did.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from maskfit.config import DataConfig, RunConfig
from maskfit.masking import MaskConfig, choose_keep
from maskfit.tokens import TokenBatch, masked_view


def autoencoder_factor(data: DataConfig) -> int:
    return 1 if data.autoencoder == "identity" else 8


def build_dataset(data: DataConfig, patch_size: int, seed: int, train: bool = True):
    """The dataset of a run: items hold images in [-1, 1] (pixel space) or scaled latents (cache)."""
    from maskfit.data.datasets import ImageFolderDataset, ImageTransform, SyntheticDataset
    from maskfit.data.synthetic import SyntheticSizes

    patch_px = patch_size * autoencoder_factor(data)
    if data.source == "latents":
        from maskfit.data.latents import LatentCacheDataset

        if not data.root:
            raise ValueError("data.source='latents' needs data.root, a cache folder made by `maskfit prepare`")
        return LatentCacheDataset(data.root, train=train, seed=seed)
    if data.autoencoder != "identity":
        raise ValueError(
            f"data.source={data.source!r} with autoencoder {data.autoencoder!r}: encode the images once with "
            "`maskfit prepare CONFIG` and train on the cache (data.source='latents', data.root=<cache>), or "
            "train in pixel space (data.autoencoder='identity')"
        )
    if data.source == "synthetic":
        sizes = SyntheticSizes(token_budget=data.token_budget, patch_px=patch_px)
        return SyntheticDataset(data.num_images, data.num_classes, seed=seed, sizes=sizes, hflip=data.hflip and train)
    if not data.root:
        raise ValueError("data.source='folder' needs data.root, an image folder in ImageNet layout")
    transform = ImageTransform(
        token_budget=data.token_budget, patch_px=patch_px, random_crop=data.random_aspect_crop,
        hflip=data.hflip and train,
    )
    return ImageFolderDataset(data.root, transform=transform, seed=seed)


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
        min_keep=m.min_keep,
        block_size=m.block_size,
    )


def apply_mask(batch: TokenBatch, config: MaskConfig, step: int, seed: int) -> TokenBatch:
    """Attach a MaskedView choosing kept tokens per image; none when this step keeps every token."""
    # A seed from (seed, step) alone (not Python's salted hash()), so every process draws the same masks.
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    grids = batch.layout.grid.tolist()
    keep = [choose_keep((h, w), config, step, generator) for h, w in grids]
    if all(k.numel() == h * w for k, (h, w) in zip(keep, grids)):
        return batch  # unmasked step (e.g. the final fine-tune): the model runs the full grid
    return TokenBatch(batch.tokens, batch.y, batch.layout, mask=masked_view(batch.layout, keep))


@dataclass
class TrainingData:
    loader: object  # maskfit.data.loader.ResumableLoader
    channels: int
    mask: Optional[MaskConfig]
    seed: int
    _iterator: Optional[Iterator[TokenBatch]] = None

    def next_batch(self, step: int) -> TokenBatch:
        if self._iterator is None:
            self._iterator = self.loader.forever()
        batch = next(self._iterator)
        if self.mask is not None:
            batch = apply_mask(batch, self.mask, step, self.seed)
        return batch

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self._iterator = None


def build_training_data(cfg: RunConfig, patch_size: int) -> TrainingData:
    from maskfit.data.loader import make_loader

    dataset = build_dataset(cfg.data, patch_size, cfg.train.seed, train=True)
    if len(dataset) < cfg.train.batch_size:
        raise ValueError(
            f"the dataset has {len(dataset)} images, fewer than train.batch_size={cfg.train.batch_size}; "
            "lower the batch size or add images"
        )
    loader = make_loader(
        dataset, cfg.train.batch_size, layout=cfg.data.layout, seed=cfg.train.seed,
        num_workers=cfg.data.num_workers, patch=getattr(dataset, "patch", patch_size),
        seq_len=cfg.data.token_budget, pin_memory=torch.cuda.is_available(),
    )
    return TrainingData(loader, dataset_channels(dataset), mask_config(cfg), cfg.train.seed)
