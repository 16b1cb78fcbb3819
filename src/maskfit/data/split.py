"""A held-out split of an image folder that we make ourselves: a fixed fraction of every class.

Rule (deterministic, per class, independent of the order files are listed in): each file is keyed by
``sha256("maskfit-holdout-v1:" + <path relative to the root, with "/" separators>)``; within each class the
``round_half_up(fraction * n_class)`` files with the smallest keys are held out, the rest are the
training split. Only the relative path counts, not the bytes, so a re-encoded copy of a folder with the
same file names (``maskfit.data.reencode``) has the same split. Adding or removing one file of a class moves
at most one other file of that class across the line.

``data.split`` selects a side in a run config ("all" | "train" | "holdout", with ``data.holdout_fraction``),
``maskfit train-classifier --data-split`` for the proxy classifier, and ``maskfit experiment`` takes its
reference images from the "holdout" side of the folder a run trained on the "train" side of.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Sequence, TypeVar

SPLITS = ("all", "train", "holdout")
HOLDOUT_SALT = "maskfit-holdout-v1"

T = TypeVar("T")


def holdout_key(relpath: str) -> str:
    """The rank of a file within its class (smallest keys are held out): a salted SHA-256 of its relative path."""
    return hashlib.sha256(f"{HOLDOUT_SALT}:{relpath}".encode()).hexdigest()


def holdout_count(num_files: int, fraction: float, where: str = "a class") -> int:
    """Files of a class held out: round_half_up(fraction * n); at least one file on each side."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout_fraction={fraction} must lie in (0, 1), e.g. 0.1 (a tenth of each class)")
    k = int(math.floor(fraction * num_files + 0.5))
    if k < 1 or k > num_files - 1:
        raise ValueError(
            f"{where} has {num_files} image(s): holdout_fraction={fraction} holds out {k}, leaving "
            f"{'no held-out image' if k < 1 else 'no training image'}; every class needs at least one of each. "
            "Change holdout_fraction or add images"
        )
    return k


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}: 'train' and 'holdout' are the two sides, 'all' both")


def select_split(
    files: Sequence[tuple[Path, int]], root: Path, split: str, fraction: float
) -> list[tuple[Path, int]]:
    """The ``split`` side of ``files`` ((path, class index) pairs under ``root``), in their given order."""
    check_split(split)
    if split == "all":
        return list(files)
    root = Path(root)
    by_class: dict[int, list[tuple[str, Path]]] = {}
    for path, label in files:
        rel = Path(path).relative_to(root).as_posix()
        by_class.setdefault(int(label), []).append((holdout_key(rel), Path(path)))
    held: set[Path] = set()
    for label, keyed in by_class.items():
        k = holdout_count(len(keyed), fraction, f"class {label} of {root}")
        held.update(path for _, path in sorted(keyed)[:k])
    want_held = split == "holdout"
    return [(p, c) for p, c in files if (Path(p) in held) == want_held]


def restrict_to_split(dataset, split: str, fraction: float):
    """An :class:`~maskfit.data.datasets.ImageFolderDataset` keeping only the ``split`` side of its files.

    The dataset's ``samples`` list is replaced (class indices stay those of the whole folder), so every
    consumer of the dataset (loader, token grids, latent cache) sees only that side.
    """
    dataset.samples = select_split(dataset.samples, dataset.root, split, fraction)
    return dataset
