"""ADM's ``.npz`` formats: sample batches and reference batches (``shared/reference/eval.md`` §1.5).

* **Sample batch**: ``arr_0`` = uint8 (N, H, W, 3) images; optional ``arr_1`` = int labels (ADM's
  ``classifier_sample.py`` writes them; the evaluator ignores them, our proxy accuracy reads them).
* **Reference batch**: ``arr_0`` = reference images (ADM: 10 000, used only for Precision/Recall) and
  precomputed statistics ``mu``, ``sigma`` (pool3, 2048) and ``mu_s``, ``sigma_s`` (spatial, 2023) over
  the whole training set. ADM uses stored statistics whenever ``mu`` is present, else computes them
  from ``arr_0``.

Images are streamed batch by batch from the zip member, as ADM's evaluator does, so a 50 000 x 256² x 3
batch (9.2 GiB) never has to sit in memory. Files we write carry one extra key, ``feature_network``,
naming the network that made the statistics; ADM's files lack it and mean the FID Inception.
"""
from __future__ import annotations

import os
import tempfile
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple, Union

import numpy as np

from maskfit.checkpoint import shared_mode
from maskfit.evaluate.metrics import GaussianStats, check_finite_statistics

PathLike = Union[str, Path]
IMAGES_KEY = "arr_0"
LABELS_KEY = "arr_1"
FEATURE_NETWORK_KEY = "feature_network"
ADM_FEATURE_NETWORK = "inception-v3-2015-12-05"  # what ADM's reference statistics were made with


def check_images(images: np.ndarray, what: str = "images") -> np.ndarray:
    """Raise unless ``images`` is uint8 (N, H, W, 3), the only layout ADM's evaluator reads."""
    if images.ndim != 4 or images.shape[-1] != 3:
        hint = " (that looks like NCHW: transpose with images.transpose(0, 2, 3, 1))" if images.ndim == 4 and images.shape[1] == 3 else ""
        raise ValueError(f"{what} must be uint8 (N, H, W, 3) NHWC, got shape {images.shape}{hint}")
    if images.dtype != np.uint8:
        raise ValueError(
            f"{what} must be uint8 0..255, got {images.dtype}; quantise samples first, e.g. "
            "np.clip(127.5 * x + 128, 0, 255).astype(np.uint8) for x in [-1, 1] (DiT/FiT's rule)"
        )
    return images


@contextmanager
def _readable(path: PathLike):
    """Turn what zipfile / numpy raise on a damaged ``.npz`` into one error naming the file and the fix."""
    try:
        yield
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(
            f"{path} is not a readable .npz ({type(err).__name__}: {reason}): the file is corrupt or truncated; "
            "write it again (a sample batch: delete it and rerun `maskfit sample`, which rebuilds it from its shards; "
            "a reference: `maskfit train-classifier --reference-out`) or copy it again from its source"
        ) from None


def _npz_keys(path: PathLike) -> Tuple[str, ...]:
    with _readable(path), zipfile.ZipFile(path) as zf:
        return tuple(name[: -len(".npy")] for name in zf.namelist() if name.endswith(".npy"))


class NpzImageReader:
    """Streams ``arr_0`` of an ``.npz`` in batches without loading the whole array.

    Reads the ``.npy`` header inside the zip member and then raw bytes, batch by batch; arrays it
    cannot stream (Fortran order, unknown header version) are loaded whole, as ADM's reader does.
    """

    def __init__(self, path: PathLike, key: str = IMAGES_KEY) -> None:
        self.path = Path(path)
        self.key = key
        if not self.path.is_file():
            raise FileNotFoundError(f"No .npz file at {self.path}")
        if key not in _npz_keys(self.path):
            raise KeyError(f"{self.path} has no '{key}' array (keys: {list(_npz_keys(self.path))})")
        with _readable(self.path), zipfile.ZipFile(self.path) as zf, zf.open(f"{key}.npy") as f:
            self.shape, self.fortran_order, self.dtype, self._data_offset = self._read_header(f)
        check_images(np.empty((0, *self.shape[1:]), dtype=self.dtype), f"{self.path}:{key}")

    @staticmethod
    def _read_header(f) -> Tuple[Tuple[int, ...], bool, np.dtype, Optional[int]]:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:  # format 3.0 (utf8 field names) never holds images; let numpy read it
            return (), False, np.dtype(np.uint8), None
        return tuple(shape), bool(fortran), np.dtype(dtype), f.tell()

    def __len__(self) -> int:
        return int(self.shape[0])

    @property
    def image_hw(self) -> Tuple[int, int]:
        return int(self.shape[1]), int(self.shape[2])

    def batches(self, batch_size: int, limit: Optional[int] = None) -> Iterator[np.ndarray]:
        """Yield uint8 (b, H, W, 3) arrays in file order; at most ``limit`` images."""
        total = len(self) if limit is None else min(limit, len(self))
        if self.fortran_order or self._data_offset is None:
            with _readable(self.path):
                images = np.load(self.path)[self.key]
            for start in range(0, total, batch_size):
                yield np.ascontiguousarray(images[start : min(start + batch_size, total)])
            return
        per_image = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        with _readable(self.path), zipfile.ZipFile(self.path) as zf, zf.open(f"{self.key}.npy") as f:
            f.read(self._data_offset)  # skip magic + header (zip members stream forward only)
            for start in range(0, total, batch_size):
                count = min(batch_size, total - start)
                data = bytearray(count * per_image)  # writable, so torch.from_numpy needs no copy
                if f.readinto(data) != len(data):
                    raise EOFError(f"{self.key} ends at image {start} of {total}")
                yield np.frombuffer(data, dtype=self.dtype).reshape(count, *self.shape[1:])


def read_labels(path: PathLike) -> Optional[np.ndarray]:
    """``arr_1`` class labels of a sample batch, or None if the file has none."""
    if LABELS_KEY not in _npz_keys(path):
        return None
    with _readable(path), np.load(path) as data:
        return data[LABELS_KEY].astype(np.int64)


def _atomic_savez(path: PathLike, arrays: Dict[str, np.ndarray]) -> Path:
    """np.savez to a temp file beside ``path`` then rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)  # a file object: numpy adds no ".npz" suffix
        os.chmod(tmp, shared_mode())  # mkstemp makes files private; the process umask decides, as for any tool
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_sample_npz(path: PathLike, images: np.ndarray, labels: Optional[np.ndarray] = None) -> Path:
    """Write a sample batch the ADM evaluator reads: ``arr_0`` uint8 NHWC (+ ``arr_1`` labels)."""
    arrays = {IMAGES_KEY: check_images(np.asarray(images), "sample images")}
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (len(images),):
            raise ValueError(f"labels must have shape ({len(images)},), got {labels.shape}")
        arrays[LABELS_KEY] = labels
    return _atomic_savez(path, arrays)


@dataclass
class ReferenceBatch:
    """What a reference ``.npz`` holds: images for P/R and/or stored statistics for FID/sFID."""

    path: Optional[Path]
    feature_network: str  # the network the stored statistics were made with
    num_images: int  # 0 when the file holds statistics only
    image_hw: Optional[Tuple[int, int]]
    pool3: Optional[GaussianStats]  # stored mu / sigma
    spatial: Optional[GaussianStats]  # stored mu_s / sigma_s
    images: Optional[np.ndarray] = None  # in-memory images (reference given as an array)

    def image_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        if self.images is not None:
            for start in range(0, len(self.images), batch_size):
                yield self.images[start : start + batch_size]
        elif self.num_images and self.path is not None:
            yield from NpzImageReader(self.path).batches(batch_size)


def _stats(data: Dict[str, np.ndarray], mu_key: str, sigma_key: str, path: Optional[Path] = None) -> Optional[GaussianStats]:
    if mu_key not in data:
        return None
    if sigma_key not in data:
        raise KeyError(f"reference file has '{mu_key}' but no '{sigma_key}'")
    where = f"reference {path} ('{mu_key}', '{sigma_key}')"
    # float64 whatever the file stores (some copies are float32): FD wants matching float64 inputs.
    try:
        stats = GaussianStats(mu=data[mu_key].astype(np.float64), sigma=data[sigma_key].astype(np.float64))
    except ValueError as err:  # shapes: mu (D,), sigma (D, D)
        raise ValueError(f"{where}: {err}") from None
    return check_finite_statistics(stats, where)


def read_reference(path: PathLike) -> ReferenceBatch:
    """Open an ADM reference batch (or one we wrote): stored stats are loaded, images streamed later."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No reference batch at {path}. ADM's are at https://openaipublic.blob.core.windows.net/"
            "diffusion/jul-2021/ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz (and 64/128/512); "
            "download one on a machine with network access and pass its local path"
        )
    with _readable(path), np.load(path) as npz:
        data = {key: npz[key] for key in npz.files if key != IMAGES_KEY}  # read here: a damaged member fails now
    pool3 = _stats(data, "mu", "sigma", path)
    spatial = _stats(data, "mu_s", "sigma_s", path)
    network = str(data[FEATURE_NETWORK_KEY]) if FEATURE_NETWORK_KEY in data else ADM_FEATURE_NETWORK
    num_images, image_hw = 0, None
    if IMAGES_KEY in _npz_keys(path):
        reader = NpzImageReader(path)
        num_images, image_hw = len(reader), reader.image_hw
    if pool3 is None and num_images == 0:
        raise ValueError(f"{path} has neither statistics ('mu', 'sigma') nor images ('arr_0'): not a reference batch")
    return ReferenceBatch(path, network, num_images, image_hw, pool3, spatial)


def reference_from_images(images: np.ndarray) -> ReferenceBatch:
    """A reference made of in-memory images (statistics computed from them)."""
    images = check_images(np.asarray(images), "reference images")
    return ReferenceBatch(None, "", len(images), tuple(images.shape[1:3]), None, None, images=images)


def write_reference_npz(
    path: PathLike,
    feature_network: str,
    pool3: Optional[GaussianStats] = None,
    spatial: Optional[GaussianStats] = None,
    images: Optional[np.ndarray] = None,
) -> Path:
    """Write a reference batch in ADM's layout (``mu, sigma, mu_s, sigma_s``, ``arr_0``) + its network."""
    arrays: Dict[str, np.ndarray] = {FEATURE_NETWORK_KEY: np.array(feature_network)}
    if images is not None:
        arrays[IMAGES_KEY] = check_images(np.asarray(images), "reference images")
    if pool3 is not None:
        arrays["mu"], arrays["sigma"] = pool3.mu, pool3.sigma
    if spatial is not None:
        arrays["mu_s"], arrays["sigma_s"] = spatial.mu, spatial.sigma
    if len(arrays) == 1:
        raise ValueError("write_reference_npz needs statistics or images to write")
    return _atomic_savez(path, arrays)
