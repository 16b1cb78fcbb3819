"""Image datasets: ImageNet-layout folders (no cropping by default), in-memory images, synthetic classes.

Every dataset returns a :class:`DataItem`: an image as a float tensor (3, H, W) in [-1, 1] whose sides
are multiples of ``patch_px`` within the token budget (FiT's resize rule), and its label.

Randomness per item (FiTv2's resize-or-crop choice, random crop, flip) comes from
``numpy.random.default_rng([seed, epoch, index])``, never from a global generator: an item is the same
whichever worker loads it and in whatever order, so a run resumed mid-epoch sees exactly the images an
uninterrupted run would. ``dataset[i]`` is ``dataset.get(i, epoch=0)``; the loader passes the real epoch
(see :mod:`maskfit.data.loader`).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from maskfit.data.resize import (
    aspect_crop_size,
    center_crop_to_square,
    check_budget,
    check_preprocess,
    draw_aspect_crop,
    fit_to_token_budget,
    has_crop_version,
    random_aspect_crop,
    resize_to_token_budget,
    square_side,
)
from maskfit.data.rng_replay import uniform_from
from maskfit.data.synthetic import SyntheticSizes, check_num_classes, synthetic_sample

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# The most decoded pixel bytes ImageFolderDataset(decode_once=True) holds (H x W x 3 per image): beyond it,
# reading files in the workers or a latent cache is the better trade than the host memory.
DECODE_ONCE_MAX_BYTES = 16 * 2**30


@dataclass
class DataItem:
    """One training example: an image (3, H, W) in [-1, 1] or a scaled latent (C, H/f, W/f), and its label."""

    x: Tensor  # (C, H, W) float32
    label: int


class ImageFileError(ValueError):
    """An image file that cannot be used (empty, corrupt, not an image, zero-size)."""


# Replace, never delete: the folder's sorted file list is the dataset's index, so a deleted file shifts every
# later image and changes the data order, and a run's checkpoints then refuse to resume (their data state was
# saved for the old order). A valid file under the same name keeps the order.
REPLACE_IMAGE = (
    "copy it again from its source, or replace it with any valid image under the same name (deleting it would "
    "change the folder's order, and a training run's checkpoints could then not resume)"
)


# ----------------------------------------------------------------------------------------------------
# Conversions
# ----------------------------------------------------------------------------------------------------


def check_image_tensor(x: Tensor, channels: int = 3, what: str = "image") -> None:
    """Raise unless ``x`` is (channels, H, W) with non-empty sides."""
    if x.ndim != 3 or x.shape[0] != channels:
        fix = "convert grayscale/RGBA images to RGB, channels first" if channels == 3 else "check the channel count"
        raise ValueError(f"{what} has shape {tuple(x.shape)}, expected ({channels}, H, W); {fix}")
    if x.shape[1] < 1 or x.shape[2] < 1:
        raise ValueError(f"{what} of shape {tuple(x.shape)} is empty; it needs at least one pixel per side")


def to_tensor_image(img: Union[Image.Image, np.ndarray]) -> Tensor:
    """PIL RGB image or (H, W, 3) uint8 array -> (3, H, W) float32 in [-1, 1]."""
    arr = np.asarray(img)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(
            f"expected an RGB uint8 image of shape (H, W, 3), got {arr.dtype} {arr.shape}; call .convert('RGB') first"
        )
    x = torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1)  # (3, H, W) uint8; a copy, as PIL's is read-only
    return x.float() / 127.5 - 1.0


def to_uint8(x: Tensor) -> np.ndarray:
    """(3, H, W) float in [-1, 1] -> (H, W, 3) uint8 (values outside [-1, 1] are clamped: that is the
    meaning of saving an image, not a repair)."""
    check_image_tensor(x)
    arr = ((x.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)  # (3, H, W)
    return arr.permute(1, 2, 0).numpy()


def load_rgb(path: Union[str, Path]) -> Image.Image:
    """Open an image file as RGB, with one clear error per way it can be unusable."""
    path = Path(path)
    try:
        nbytes = path.stat().st_size
    except OSError as err:
        raise ImageFileError(f"cannot read image file {path}: {err}; check the path and its permissions") from err
    if nbytes == 0:
        raise ImageFileError(f"image file {path} is empty (0 bytes); {REPLACE_IMAGE}")
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later in a worker
            img = im.convert("RGB")  # grayscale, palette, CMYK; RGBA loses its alpha channel
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageFileError(
            f"image file {path} is corrupt or not an image ({type(err).__name__}: {err}); {REPLACE_IMAGE}"
        ) from err
    if img.width < 1 or img.height < 1:
        raise ImageFileError(f"image file {path} has zero size {img.width}x{img.height}; {REPLACE_IMAGE}")
    return img


# ----------------------------------------------------------------------------------------------------
# The shared per-image transform
# ----------------------------------------------------------------------------------------------------


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of one item in one epoch (independent of worker and order)."""
    return np.random.default_rng([seed, epoch, index])


def mixed_choice(rng: np.random.Generator) -> bool:
    """FiTv2 "Mixed" (Algorithm 1): True = this sample uses its centre-crop version, with p = 0.5.

    Drawn only for an image that has a crop version, right after its random aspect crop (if any) and
    before its flip: without a random crop it is the FIRST draw of ``item_rng(seed, epoch, index)``, so
    token batching replays it before loading (:func:`replay_mixed_choice`) to know each image's size in
    each epoch. Images without a crop version draw nothing more than under "flexible".
    """
    return bool(rng.random() < 0.5)


def replay_mixed_choice(seed: int, epoch: int, index: int) -> bool:
    """The :func:`mixed_choice` that item ``index`` (with a crop version, no random crop) draws in ``epoch``."""
    return mixed_choice(item_rng(seed, epoch, index))


@dataclass(frozen=True)
class ImageTransform:
    """Optional random-aspect crop, FiT budget resize or FiTv2 centre crop, optional horizontal flip.

    token_budget: the most tokens an image may have; patch_px: pixels per token side
    (autoencoder factor x patch size: 16 for SD-VAE with patch 2, the patch size in pixel space).
    preprocess: "flexible" resizes to the budget (FiT, no crop); "mixed" (FiTv2) gives an image whose
    both sides exceed the square side its resize or its centre crop (:func:`center_crop_to_square`),
    50/50 per sample (:func:`mixed_choice`); smaller images are resized as under "flexible".
    random_crop: for square-only sets (e.g. Imagenette's centre crops), crop to a log-uniform aspect
    ratio in ``crop_ratio_range`` first, so the model sees non-square images.
    hflip: flip with probability 0.5. Leave it off when building a latent cache: the cache stores both
    orientations itself, like FiT.
    """

    token_budget: int = 256
    patch_px: int = 16
    random_crop: bool = False
    crop_ratio_range: tuple[float, float] = (1 / 3, 3.0)
    crop_min_area: float = 0.25
    hflip: bool = False
    preprocess: str = "flexible"

    def __post_init__(self) -> None:
        check_budget(self.token_budget, self.patch_px)
        check_preprocess(self.preprocess)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Tensor:
        img, crop = self._draw(img, rng)
        x = self._crop(img) if crop else self._resize(img)  # (3, H, W)
        if self.hflip and rng.random() < 0.5:
            x = x.flip(-1)
        return x

    def versions(self, img: Image.Image, rng: np.random.Generator) -> tuple[Tensor, Optional[Tensor]]:
        """(resize version (3, H, W), centre-crop version (3, S, S) or None), unflipped: what a latent
        cache stores. The random aspect crop (if any) is the one ``__call__`` draws from the same ``rng``."""
        if self.random_crop:
            img = random_aspect_crop(img, rng, self.crop_ratio_range, self.crop_min_area)
        return self._resize(img), (self._crop(img) if self._has_crop(img) else None)

    def _draw(self, img: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, bool]:
        """The item's draws before resizing: the random aspect crop, then the mixed choice (only for an
        image with a crop version). Returns the (cropped) image and whether to use its crop version."""
        if self.random_crop:
            img = random_aspect_crop(img, rng, self.crop_ratio_range, self.crop_min_area)
        return img, self._has_crop(img) and mixed_choice(rng)

    def output_size(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int]:
        """(width, height) in pixels of what this transform makes of a ``width`` x ``height`` image, drawing
        from ``rng`` exactly as :meth:`__call__` does before its flip (the random aspect crop, then the mixed
        choice): token batching replays it from the image size alone to know an epoch's grid."""
        if self.random_crop:
            _, _, width, height = draw_aspect_crop(width, height, rng, self.crop_ratio_range, self.crop_min_area)
        if (self.preprocess == "mixed" and has_crop_version(width, height, self.token_budget, self.patch_px)
                and mixed_choice(rng)):
            side = square_side(self.token_budget, self.patch_px)
            return side, side
        return fit_to_token_budget(width, height, self.token_budget, self.patch_px)

    @property
    def size_from_first_two_draws(self) -> bool:
        """Whether :meth:`output_size` depends on the item's first two draws only (a random aspect crop and no
        mixed choice, which would follow the crop's position draws): token batching's planner then replays
        an epoch's sizes from those draws (:meth:`output_size_from_draws`)."""
        return self.random_crop and self.preprocess != "mixed"

    def output_size_from_draws(self, width: int, height: int, first: float, second: float) -> tuple[int, int]:
        """:meth:`output_size` given the item generator's first two ``random()`` values instead of the generator
        (only where :attr:`size_from_first_two_draws`): the crop's ratio and area draws, then FiT's budget rule."""
        lo, hi = self.crop_ratio_range
        log_ratio = uniform_from(first, math.log(lo), math.log(hi))
        cw, ch = aspect_crop_size(width, height, log_ratio, uniform_from(second, self.crop_min_area, 1.0))
        return fit_to_token_budget(cw, ch, self.token_budget, self.patch_px)

    def _has_crop(self, img: Image.Image) -> bool:
        return self.preprocess == "mixed" and has_crop_version(img.width, img.height, self.token_budget, self.patch_px)

    def _resize(self, img: Image.Image) -> Tensor:
        return to_tensor_image(resize_to_token_budget(img, self.token_budget, self.patch_px))

    def _crop(self, img: Image.Image) -> Tensor:
        return to_tensor_image(center_crop_to_square(img, self.token_budget, self.patch_px))


class _EpochDataset(torch.utils.data.Dataset):
    """Base: ``get(index, epoch)`` does the work; ``dataset[i]`` is epoch 0."""

    seed: int
    transform: ImageTransform

    @property
    def token_budget(self) -> int:
        return self.transform.token_budget

    @property
    def patch_px(self) -> int:
        return self.transform.patch_px

    @property
    def patch(self) -> int:
        """Token side in units of ``item.x`` (pixels here): what the loader patchifies with."""
        return self.transform.patch_px

    @property
    def hflip(self) -> bool:
        return self.transform.hflip

    @property
    def preprocess(self) -> str:
        return self.transform.preprocess

    def _load(self, index: int) -> tuple[Image.Image, int]:
        """(RGB image, label) of item ``index`` (already checked), before the transform."""
        raise NotImplementedError

    def get(self, index: int, epoch: int = 0) -> DataItem:
        index = self._check_index(index)
        img, label = self._load(index)
        return DataItem(x=self.transform(img, item_rng(self.seed, epoch, index)), label=label)  # x: (3, H, W)

    def versions(self, index: int) -> tuple[DataItem, Optional[Tensor]]:
        """Item ``index`` as a latent cache stores it: (its resize version, its centre-crop version (3, S, S)
        or None), unflipped, with the random aspect crop (if any) of epoch 0."""
        index = self._check_index(index)
        img, label = self._load(index)
        resized, crop = self.transform.versions(img, item_rng(self.seed, 0, index))
        return DataItem(x=resized, label=label), crop

    def _check_index(self, index: int) -> int:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} is out of range for a dataset of {n} items")
        return index % n

    def __getitem__(self, index: int) -> DataItem:
        return self.get(index, epoch=0)


# ----------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------


class ImageFolderDataset(_EpochDataset):
    """ImageNet layout: ``root/<class>/**/<image>``, classes sorted by folder name, no cropping by default.

    Files are found by extension (:data:`IMAGE_EXTENSIONS`, case-insensitive) and sorted; an unreadable
    file fails when it is loaded, naming the file.

    decode_once: decode every file into memory here (:meth:`decode_all`), so loading an item skips the file
    read and decode; items are bit-identical to reading the files.
    """

    def __init__(
        self, root: Union[str, Path], transform: ImageTransform = ImageTransform(), seed: int = 0,
        num_classes: Optional[int] = None, decode_once: bool = False,
    ):
        """num_classes: the model's class count; more class folders than that are refused (check_class_count)."""
        self.root = Path(root)
        self.transform = transform
        self.seed = seed
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"image folder {self.root} does not exist; pass the folder that holds one folder per class"
            )
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.classes:
            raise FileNotFoundError(
                f"image folder {self.root} has no class folders; expected ImageNet layout root/<class>/<image>.jpg "
                f"(put the images of each class in their own sub-folder)"
            )
        check_class_count(len(self.classes), num_classes, f"image folder {self.root}")
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = []
        for name in self.classes:
            files = _image_files(self.root / name)
            if not files:
                raise FileNotFoundError(
                    f"class folder {self.root / name} holds no image files ({', '.join(IMAGE_EXTENSIONS)}); "
                    f"add its images or remove the folder"
                )
            self.samples.extend((f, self.class_to_idx[name]) for f in files)
        self._decoded: Optional[list[tuple[Path, np.ndarray]]] = None  # decode_all: (path, (H, W, 3) uint8)
        if decode_once:
            self.decode_all()

    def decode_all(self) -> None:
        """Decode every file of ``samples`` now and keep it in memory; call it again after changing ``samples``
        (e.g. after :func:`maskfit.data.split.restrict_to_split`). Refuses more than DECODE_ONCE_MAX_BYTES."""
        # Arrays made before the DataLoader forks its workers (the loader asks for fork whatever the default:
        # maskfit.data.loader.worker_start_method) are shared with them copy-on-write; only the small object
        # headers get copied as refcounts change, so the pixel memory is paid once, not per worker.
        decoded: list[tuple[Path, np.ndarray]] = []
        total = 0
        for path, _ in self.samples:
            arr = np.asarray(load_rgb(path))  # (H, W, 3) uint8
            if total + arr.nbytes > DECODE_ONCE_MAX_BYTES:
                raise ValueError(
                    f"decode_once: image folder {self.root} is too large to decode into memory: {total} bytes "
                    f"({total / 2**30:.2f} GiB) decoded from {len(decoded)} of its {len(self.samples)} images, and "
                    f"the next image would pass DECODE_ONCE_MAX_BYTES={DECODE_ONCE_MAX_BYTES} bytes; "
                    "set data.decode_once=false to read files in the workers, or use a latent cache (maskfit prepare)"
                )
            total += arr.nbytes
            decoded.append((path, arr))
        self._decoded = decoded

    @property
    def decoded_in_memory(self) -> bool:
        """Whether :meth:`decode_all` holds the images (the loader then forks its workers: maskfit.data.loader)."""
        return self._decoded is not None

    def __len__(self) -> int:
        return len(self.samples)

    def image_size(self, index: int) -> tuple[int, int]:
        """(width, height) of item ``index`` before any transform: from its decoded array after :meth:`decode_all`,
        else from the file's header (PIL decodes no pixels for it; ~0.15 ms a file)."""
        if self._decoded is not None:
            h, w = self._decoded_array(index).shape[:2]
            return w, h
        path = self.samples[index][0]
        try:
            with Image.open(path) as im:
                return im.size
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise ImageFileError(
                f"cannot read the size of image file {path} ({type(err).__name__}: {err}); {REPLACE_IMAGE}"
            ) from err

    def _decoded_array(self, index: int) -> np.ndarray:
        path = self.samples[index][0]
        if index >= len(self._decoded) or self._decoded[index][0] != path:
            # samples changed after decode_all (e.g. a split applied later): never hand out another file's pixels
            raise RuntimeError(
                f"image folder {self.root}: item {index} ({path}) is not the image decoded at that position; "
                "the sample list changed after decoding: call decode_all() again after changing samples"
            )
        return self._decoded[index][1]

    def _load(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        if self._decoded is None:
            return load_rgb(path), label
        return Image.fromarray(self._decoded_array(index)), label


def check_class_count(count: int, num_classes: Optional[int], where: str) -> None:
    """Refuse data with more classes than the model embeds: label ``num_classes`` is the model's guidance null
    label (the extra embedding row) and later ones are out of range, so a class would silently train as
    "unconditional"."""
    if num_classes is not None and count > num_classes:
        raise ValueError(
            f"{where} has {count} classes but the model has num_classes={num_classes}: class index {num_classes} "
            f"would be the guidance null label. Set model.overrides.num_classes={count}, or use fewer classes"
        )


def _image_files(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in filenames if f.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(found)


class ImageListDataset(_EpochDataset):
    """Images already in memory: (3, H, W) float tensors in [-1, 1] or (H, W, 3) uint8 arrays.

    Tensors are quantised to 8 bits before the transform (what an image file would hold), so this
    dataset and an image folder of the same pictures give the same items.
    """

    def __init__(
        self,
        images: Sequence[Union[Tensor, np.ndarray]],
        labels: Sequence[int],
        transform: ImageTransform = ImageTransform(),
        seed: int = 0,
    ):
        if len(images) != len(labels):
            raise ValueError(f"got {len(images)} images but {len(labels)} labels; pass one label per image")
        self.images = [self._as_uint8(img, i) for i, img in enumerate(images)]
        self.labels = [int(label) for label in labels]
        self.transform = transform
        self.seed = seed

    @staticmethod
    def _as_uint8(img: Union[Tensor, np.ndarray], i: int) -> np.ndarray:
        if isinstance(img, Tensor):
            check_image_tensor(img, what=f"image {i}")
            return to_uint8(img)
        arr = np.asarray(img)
        if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise ValueError(
                f"image {i} is a {arr.dtype} array of shape {arr.shape}; pass (H, W, 3) uint8 arrays "
                f"or (3, H, W) float tensors in [-1, 1]"
            )
        if arr.shape[0] < 1 or arr.shape[1] < 1:
            raise ValueError(f"image {i} of shape {arr.shape} is empty; it needs at least one pixel per side")
        return arr

    def __len__(self) -> int:
        return len(self.images)

    def image_size(self, index: int) -> tuple[int, int]:
        """(width, height) of item ``index`` before any transform."""
        h, w = self.images[index].shape[:2]  # (H, W, 3) uint8
        return w, h

    def _load(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]), self.labels[index]


class SyntheticDataset(_EpochDataset):
    """The procedural classes of :mod:`maskfit.data.synthetic`, rendered directly at budget sizes.

    Image ``i`` (content, size, label ``i % num_classes``) depends only on (seed, i); with ``hflip`` its
    orientation also depends on the epoch. Sizes are drawn by ``sizes`` (aspect ratio 1:3 to 3:1,
    token budget and patch from there), so no resampling blurs the patterns.
    """

    def __init__(
        self,
        num_images: int,
        num_classes: int = 8,
        seed: int = 0,
        sizes: SyntheticSizes = SyntheticSizes(),
        hflip: bool = False,
        preprocess: str = "flexible",
    ):
        check_num_classes(num_classes)
        if num_images < 1:
            raise ValueError(f"num_images={num_images} must be >= 1")
        self.num_images = num_images
        self.num_classes = num_classes
        self.seed = seed
        self.sizes = sizes
        # The transform only flips here: images are drawn at their final size (no crop, no resize). A size
        # within the budget never has both sides above the square side, so "mixed" changes no image; it is
        # kept so a cache built from this set records the run's preprocessing.
        self.transform = ImageTransform(
            token_budget=sizes.token_budget, patch_px=sizes.patch_px, hflip=hflip, preprocess=preprocess
        )

    def __len__(self) -> int:
        return self.num_images

    def image(self, index: int) -> tuple[np.ndarray, int]:
        """((H, W, 3) uint8, label) of item ``index``, before any flip."""
        index = self._check_index(index)
        return synthetic_sample(index, self.num_classes, self.seed, self.sizes)

    def get(self, index: int, epoch: int = 0) -> DataItem:
        arr, label = self.image(index)
        x = to_tensor_image(arr)  # (3, H, W)
        if self.hflip and item_rng(self.seed, epoch, self._check_index(index)).random() < 0.5:
            x = x.flip(-1)
        return DataItem(x=x, label=label)

    def versions(self, index: int) -> tuple[DataItem, Optional[Tensor]]:
        """(the unflipped item, None): drawn within the budget, no image here has a centre-crop version."""
        arr, label = self.image(index)
        return DataItem(x=to_tensor_image(arr), label=label), None

