"""Autoencoders (pixel space or SD-VAE) and the on-disk latent cache.

An autoencoder maps images (B, 3, H, W) in [-1, 1] to latents (B, C, H/f, W/f) that are already
multiplied by its scale (as FiT stores them), and back. ``IdentityAutoencoder`` is pixel space
(C = 3, f = 1, scale 1); ``SDVAE`` wraps diffusers' ``AutoencoderKL`` (stabilityai/sd-vae-ft-ema:
C = 4, f = 8, scale 0.18215) loaded from a local folder only.

The cache follows FiT's released training data (reference/fit.md section 2.4): one latent per image and
one of its horizontally flipped copy, the loader picking one with p = 0.5. A cache built with FiTv2's
"mixed" preprocessing also holds, for each image whose both sides exceed the square side, the latents
of its centre-crop version and of that version's mirror image; a "mixed" run picks the resize or the
crop with p = 0.5 per sample (FiT's ``random: 'random'``), a "flexible" run always the resize (FiT's
``random: 'resize'``), so one mixed cache serves both. Shards are safetensors
files written atomically (temporary file, then rename); ``manifest.json`` is written last, so a cache
without a manifest is an unfinished one.
"""
from __future__ import annotations

import bisect
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Optional, Protocol, Sequence, Union

import torch
from torch import Tensor

from maskfit.checkpoint import shared_mode
from maskfit.data.datasets import DataItem, item_rng, mixed_choice
from maskfit.data.resize import check_preprocess

SD_VAE_REPO = "stabilityai/sd-vae-ft-ema"
SD_VAE_SCALE = 0.18215
DEFAULT_VAE_DIR = "checkpoints/sd-vae-ft-ema"
CACHE_FORMAT = 1
MANIFEST = "manifest.json"


class Autoencoder(Protocol):
    name: str
    channels: int  # latent channels C
    factor: int  # spatial down-sampling factor f
    scale: float  # latents are stored multiplied by this

    def encode(self, images: Tensor) -> Tensor: ...  # (B, 3, H, W) in [-1, 1] -> (B, C, H/f, W/f) scaled

    def decode(self, latents: Tensor) -> Tensor: ...  # (B, C, H/f, W/f) scaled -> (B, 3, H, W) in ~[-1, 1]


def check_batch(x: Tensor, channels: int, multiple: int, what: str) -> None:
    """Raise unless ``x`` is (B, channels, H, W) with H and W multiples of ``multiple``."""
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(
            f"{what} has shape {tuple(x.shape)}, expected (B, {channels}, H, W); "
            f"add a batch dimension with x[None] or check the channel count"
        )
    H, W = x.shape[-2:]
    if H < multiple or W < multiple or H % multiple or W % multiple:
        raise ValueError(
            f"{what} size {H}x{W} is not a positive multiple of {multiple}; resize it with "
            f"maskfit.data.resize.fit_to_token_budget (patch_px a multiple of {multiple})"
        )


class IdentityAutoencoder:
    """Pixel space: latents are the images themselves (C = 3, f = 1, scale 1)."""

    name = "identity"
    channels = 3
    factor = 1
    scale = 1.0

    def encode(self, images: Tensor) -> Tensor:
        check_batch(images, 3, 1, "images")
        return images.float()

    def decode(self, latents: Tensor) -> Tensor:
        check_batch(latents, 3, 1, "latents")
        return latents.float()


class SDVAE:
    """diffusers ``AutoencoderKL`` (SD-VAE) behind the :class:`Autoencoder` interface.

    ``encode`` returns the posterior **mean** times the scale by default: deterministic, so a cache
    built twice is identical (FiT does not say which it used). ``sample=True`` draws from the
    posterior instead. Inputs are cast to the VAE's device and dtype; outputs are float32 there.
    """

    def __init__(self, vae, scale: Optional[float] = None, sample: bool = False, name: str = "sd-vae-ft-ema"):
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        self.channels = int(cfg.latent_channels)
        self.factor = 2 ** (len(cfg.block_out_channels) - 1)  # one down-sampling per block but the last
        self.scale = float(cfg.scaling_factor if scale is None else scale)
        self.sample = sample
        self.name = name

    @classmethod
    def from_pretrained(
        cls,
        local_dir: Union[str, Path] = DEFAULT_VAE_DIR,
        device: Union[str, torch.device] = "cpu",
        dtype: torch.dtype = torch.float32,
        sample: bool = False,
        scale: Optional[float] = None,
    ) -> "SDVAE":
        """Load an ``AutoencoderKL`` from a local folder (``config.json`` + weights); never from the hub."""
        local_dir = Path(local_dir)
        fetch = (
            f"download {SD_VAE_REPO} (config.json and diffusion_pytorch_model.safetensors) on a machine with "
            f"internet, e.g. `huggingface-cli download {SD_VAE_REPO} --local-dir {DEFAULT_VAE_DIR}`, and put the "
            f"folder at {local_dir}"
        )
        if not (local_dir / "config.json").is_file():
            raise FileNotFoundError(f"no VAE at {local_dir} (config.json missing); {fetch}")
        from maskfit.extras import require

        # Lazy: the package works without diffusers in pixel space.
        AutoencoderKL = require("diffusers", "loading the SD-VAE", otherwise=f"then {fetch}").AutoencoderKL
        try:
            vae = AutoencoderKL.from_pretrained(local_dir, local_files_only=True, torch_dtype=dtype)
        except (OSError, ValueError) as err:
            raise FileNotFoundError(f"cannot load the VAE from {local_dir} ({err}); {fetch}") from err
        return cls(vae.to(device), scale=scale, sample=sample, name=local_dir.name or SD_VAE_REPO)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode(self, images: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        check_batch(images, 3, self.factor, "images")
        x = images.to(self.device, self.dtype)  # (B, 3, H, W)
        posterior = self.vae.encode(x).latent_dist
        z = posterior.sample(generator) if self.sample else posterior.mean  # (B, C, H/f, W/f)
        return z.float() * self.scale

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        check_batch(latents, self.channels, 1, "latents")
        z = (latents / self.scale).to(self.device, self.dtype)  # (B, C, h, w)
        return self.vae.decode(z).sample.float()  # (B, 3, h*f, w*f)


# ----------------------------------------------------------------------------------------------------
# Latent cache
# ----------------------------------------------------------------------------------------------------


def _map_by_size(fn, tensors: Sequence[Tensor], batch_size: int) -> list[Tensor]:
    """Apply a batched ``fn`` to (C, H_i, W_i) tensors of different sizes, in batches of one size each
    (they cannot be stacked otherwise). Returns fn's per-item outputs on the CPU, in input order."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, x in enumerate(tensors):
        groups[tuple(x.shape[-2:])].append(i)
    out: list[Optional[Tensor]] = [None] * len(tensors)
    for idx in groups.values():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            result = fn(torch.stack([tensors[i] for i in chunk]))  # (b, C', H', W')
            for i, ri in zip(chunk, result.cpu()):
                out[i] = ri
    return out  # type: ignore[return-value]


def encode_by_size(autoencoder: Autoencoder, images: Sequence[Tensor], batch_size: int) -> list[Tensor]:
    """images[i]: (3, H_i, W_i) -> latents[i]: (C, H_i/f, W_i/f) on the CPU, in input order."""
    return _map_by_size(autoencoder.encode, images, batch_size)


def decode_by_size(autoencoder: Autoencoder, latents: Sequence[Tensor], batch_size: int) -> list[Tensor]:
    """latents[i]: (C, h_i, w_i) -> images[i]: (3, h_i*f, w_i*f) in [-1, 1] on the CPU, in input order."""
    return _map_by_size(autoencoder.decode, latents, batch_size)


def build_latent_cache(
    dataset,
    autoencoder: Autoencoder,
    cache_dir: Union[str, Path],
    batch_size: int = 32,
    flips: bool = True,
    shard_size: int = 1024,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Encode every item of ``dataset`` (and, with ``flips``, its mirror image) into ``cache_dir``.

    Items are read as ``dataset[i]`` (epoch 0: a random crop is drawn once and kept). The dataset must
    not flip on its own (``hflip=False``): the cache stores both orientations. Shard ``k`` holds items
    ``k*shard_size ...`` as ``latent.<i>`` / ``latent_flip.<i>`` (C, h, w) plus ``index``, ``label``
    and ``size`` (pixel H, W) tensors. With ``dataset.preprocess == "mixed"`` items are read with
    ``dataset.versions(i)`` instead, and an item with a centre-crop version also gets
    ``latent_crop.<i>`` / ``latent_crop_flip.<i>``, with a ``crop_size`` tensor (pixel H, W; 0, 0 for
    items without one). Returns the manifest path.
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    if getattr(dataset, "hflip", False):
        raise ValueError(
            "the dataset flips images itself (hflip=True); build it with hflip=False, the cache stores both "
            "orientations (flips=True)"
        )
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size} must be >= 1")
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset is empty; there is nothing to cache")
    preprocess = getattr(dataset, "preprocess", "flexible")
    check_preprocess(preprocess)
    mixed = preprocess == "mixed"
    token_budget = getattr(dataset, "token_budget", None)
    patch_px = getattr(dataset, "patch_px", None)
    if patch_px is not None and patch_px % autoencoder.factor:
        raise ValueError(
            f"patch_px={patch_px} is not a multiple of the autoencoder factor {autoencoder.factor}; "
            f"use patch_px = factor x patch size (e.g. {autoencoder.factor * 2})"
        )
    cache_dir = Path(cache_dir)
    manifest_path = cache_dir / MANIFEST
    if cache_dir.exists() and any(cache_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"cache folder {cache_dir} is not empty; delete it, choose another folder, or pass overwrite=True "
            "(`maskfit prepare --overwrite`)"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    if manifest_path.exists():
        manifest_path.unlink()  # overwrite: the cache is invalid until the new manifest lands

    shards = []
    num_crops = 0
    bar = tqdm(total=n, desc="encoding latents", unit="img", disable=not progress)
    for shard_id, start in enumerate(range(0, n, shard_size)):
        stop = min(n, start + shard_size)
        if mixed:
            pairs = [dataset.versions(i) for i in range(start, stop)]  # (resize DataItem, crop (3, S, S) or None)
            items: list[DataItem] = [item for item, _ in pairs]
            crops = {i: crop for i, (_, crop) in zip(range(start, stop), pairs) if crop is not None}
        else:
            items, crops = [dataset[i] for i in range(start, stop)], {}
        images = [item.x for item in items]
        tensors: dict[str, Tensor] = {
            "index": torch.arange(start, stop, dtype=torch.long),
            "label": torch.tensor([item.label for item in items], dtype=torch.long),
            "size": torch.tensor([list(x.shape[-2:]) for x in images], dtype=torch.long),  # (n, 2) pixel H, W
        }
        _encode_into(tensors, "latent", range(start, stop), images, autoencoder, batch_size, flips, dtype)
        if mixed:
            tensors["crop_size"] = torch.tensor(  # (n, 2) pixel H, W of the crop version, (0, 0) for none
                [list(crops[i].shape[-2:]) if i in crops else [0, 0] for i in range(start, stop)], dtype=torch.long
            )
            _encode_into(tensors, "latent_crop", crops.keys(), crops.values(), autoencoder, batch_size, flips, dtype)
            num_crops += len(crops)
        name = f"shard_{shard_id:05d}.safetensors"
        _atomic(cache_dir / name, lambda tmp: save_file(tensors, str(tmp)))
        shards.append({"file": name, "start": start, "count": stop - start})
        bar.update(stop - start)
    bar.close()

    manifest = {
        "format": CACHE_FORMAT,
        "autoencoder": autoencoder.name,
        "scale": autoencoder.scale,
        "channels": autoencoder.channels,
        "factor": autoencoder.factor,
        "token_budget": token_budget,
        "patch_px": patch_px,
        "patch": None if patch_px is None else patch_px // autoencoder.factor,  # token side in latent pixels
        "count": n,
        "flips": flips,
        "preprocess": preprocess,  # "mixed": crop versions are stored (absent in caches from before the field)
        "crops": num_crops,  # items with a centre-crop version
        "dtype": str(dtype).removeprefix("torch."),
        "shards": shards,
    }
    _atomic(manifest_path, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2)))
    return manifest_path


def _encode_into(tensors, prefix, indices, images, autoencoder, batch_size, flips, dtype) -> None:
    """Encode images (3, H_i, W_i) of items ``indices`` as ``<prefix>.<i>`` (and ``<prefix>_flip.<i>``)."""
    indices, images = list(indices), list(images)
    for i, z in zip(indices, encode_by_size(autoencoder, images, batch_size)):
        tensors[f"{prefix}.{i}"] = z.to(dtype).contiguous()  # (C, H_i/f, W_i/f)
    if flips:
        for i, z in zip(indices, encode_by_size(autoencoder, [x.flip(-1) for x in images], batch_size)):
            tensors[f"{prefix}_flip.{i}"] = z.to(dtype).contiguous()


def _atomic(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, shared_mode())  # safetensors writes 0600 whatever the umask; a cache is shared like any file
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class LatentCacheDataset(torch.utils.data.Dataset):
    """Items of a cache written by :func:`build_latent_cache`: DataItem(x = latent (C, h, w), label).

    With ``train=True`` and a cache holding flips, each item is the original or the flipped latent with
    p = 0.5, drawn from (seed, epoch, index) like the image datasets; otherwise always the original.
    With ``train=True`` and ``preprocess="mixed"`` (a cache built with "mixed"), an item with a
    centre-crop version first picks the resize or the crop with p = 0.5 (:func:`mixed_choice`, the
    first draw of its stream, as the image datasets draw it); otherwise it is always the resize.
    """

    def __init__(
        self, cache_dir: Union[str, Path], train: bool = True, seed: int = 0, preprocess: str = "flexible"
    ):
        from safetensors import safe_open

        check_preprocess(preprocess)
        self.cache_dir = Path(cache_dir)
        manifest_path = self.cache_dir / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"no {MANIFEST} in {self.cache_dir}: the cache is missing or was not finished; "
                f"build it with maskfit.data.latents.build_latent_cache"
            )
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != CACHE_FORMAT:
            raise ValueError(
                f"cache {self.cache_dir} has format {self.manifest.get('format')}, this code reads format "
                f"{CACHE_FORMAT}; rebuild the cache"
            )
        built_with = self.manifest.get("preprocess", "flexible")  # caches from before the field: flexible
        if preprocess == "mixed" and built_with != "mixed":
            raise ValueError(
                f"cache {self.cache_dir} was built with preprocess={built_with!r}: it holds no centre-crop versions "
                f"for data.preprocess='mixed' to pick from; rebuild it with `maskfit prepare CONFIG --set "
                f"data.preprocess=mixed --out {self.cache_dir} --overwrite` (a mixed cache also serves "
                f"'flexible' runs), or set data.preprocess='flexible'"
            )
        self.train = train
        self.seed = seed
        self.preprocess = preprocess
        self._starts = [s["start"] for s in self.manifest["shards"]]
        labels, sizes, crop_sizes = [], [], []
        for shard in self.manifest["shards"]:
            path = self.cache_dir / shard["file"]
            if not path.is_file():
                raise FileNotFoundError(f"cache shard {path} is missing; rebuild the cache")
            with safe_open(str(path), framework="pt") as f:
                labels.append(f.get_tensor("label"))
                sizes.append(f.get_tensor("size"))
                if built_with == "mixed":
                    crop_sizes.append(f.get_tensor("crop_size"))
        self.labels = torch.cat(labels)  # (N,) int64
        self.sizes = torch.cat(sizes)  # (N, 2) pixel (H, W) of each image's resize version
        # (N, 2) pixel (H, W) of each image's centre-crop version, (0, 0) where it has none
        self.crop_sizes = torch.cat(crop_sizes) if crop_sizes else torch.zeros_like(self.sizes)
        self._handles: dict[int, object] = {}  # open shard files, per process (dropped when pickled)

    # Properties the loader and the cache writer read.
    token_budget = property(lambda self: self.manifest["token_budget"])
    patch_px = property(lambda self: self.manifest["patch_px"])
    patch = property(lambda self: self.manifest["patch"])  # token side in latent pixels
    channels = property(lambda self: self.manifest["channels"])
    factor = property(lambda self: self.manifest["factor"])
    scale = property(lambda self: self.manifest["scale"])
    autoencoder = property(lambda self: self.manifest["autoencoder"])

    @property
    def hflip(self) -> bool:
        return self.train and bool(self.manifest["flips"])

    @property
    def mixed(self) -> bool:
        """Whether items pick between their resize and centre-crop versions (training with "mixed")."""
        return self.train and self.preprocess == "mixed"

    def has_crop(self, index: int) -> bool:
        """Whether item ``index`` has a centre-crop version in this cache."""
        return bool(self.crop_sizes[index, 0] > 0)

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}  # file handles do not cross process boundaries; workers reopen them
        return state

    def _handle(self, shard: int):
        from safetensors import safe_open

        if shard not in self._handles:
            path = self.cache_dir / self.manifest["shards"][shard]["file"]
            self._handles[shard] = safe_open(str(path), framework="pt")
        return self._handles[shard]

    def latent(self, index: int, flipped: bool = False, crop: bool = False) -> Tensor:
        """(C, h, w) float32 stored latent of item ``index``: of its mirror image with ``flipped``, of its
        centre-crop version with ``crop``."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} is out of range for a cache of {n} items")
        index %= n
        if flipped and not self.manifest["flips"]:
            raise ValueError(f"cache {self.cache_dir} was built with flips=False; it holds no flipped latents")
        if crop and not self.has_crop(index):
            raise ValueError(
                f"item {index} of cache {self.cache_dir} has no centre-crop version (only images with both sides "
                f"above the square side get one, in caches built with preprocess='mixed'); read its resize version"
            )
        shard = bisect.bisect_right(self._starts, index) - 1
        key = ("latent_crop" if crop else "latent") + ("_flip" if flipped else "")
        return self._handle(shard).get_tensor(f"{key}.{index}").float()

    def get(self, index: int, epoch: int = 0) -> DataItem:
        n = len(self)
        index = index % n if -n <= index < n else index  # out of range: latent() names it
        rng = item_rng(self.seed, epoch, index)
        # The same draws in the same order as ImageTransform: the mixed choice, then the flip.
        crop = self.mixed and 0 <= index < n and self.has_crop(index) and mixed_choice(rng)
        flip = self.hflip and rng.random() < 0.5
        return DataItem(x=self.latent(index, flip, crop), label=int(self.labels[index]))

    def __getitem__(self, index: int) -> DataItem:
        return self.get(index, epoch=0)
