"""From dataset items to token batches, in a seeded order that resumes mid-epoch exactly.

- :func:`patchify_item`: (C, H, W) latent -> :class:`TokenizedImage` (tokens, grid, label).
- :func:`collate_packed` / :func:`collate_padded`: tokenized images -> :class:`~maskfit.tokens.TokenBatch`
  in the packed layout (no padding) or FiT's padded layout (``seq_len`` slots per image).
- :class:`ResumableBatchSampler`: one permutation per epoch from (seed, epoch), like FiT's per-epoch
  ``randperm``; it starts at any (epoch, batch), so a resumed run sees the batches an uninterrupted
  run would. It yields ``(index, epoch)`` keys so per-item randomness (flips, crops) also repeats.
- :func:`make_loader`: a ``torch.utils.data.DataLoader`` built on those, wrapped in
  :class:`ResumableLoader`, which counts the batches handed out (workers prefetch ahead of the
  training loop, so the sampler's own position would overshoot) and saves/restores that count.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Iterator, Literal, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from maskfit.data.datasets import DataItem
from maskfit.tokens import TokenBatch, pack, patchify, to_padded

Layout = Literal["padded", "packed"]


@dataclass
class TokenizedImage:
    """One image's patch tokens in raster order."""

    tokens: Tensor  # (h*w, C*p*p)
    grid: tuple[int, int]  # (h, w) token grid
    label: int


def patchify_item(latent: Tensor, label: int, patch: int) -> TokenizedImage:
    """(C, H, W) -> TokenizedImage with (H/p * W/p, C*p*p) tokens (FiT's (c, p1, p2) order)."""
    if latent.ndim != 3:
        raise ValueError(f"expected one latent (C, H, W), got shape {tuple(latent.shape)}")
    C, H, W = latent.shape
    tokens = patchify(latent, patch)  # (h*w, C*p*p); raises when p does not divide H and W
    return TokenizedImage(tokens=tokens, grid=(H // patch, W // patch), label=int(label))


def collate_packed(items: Sequence[TokenizedImage], max_seqlen: Optional[int] = None) -> TokenBatch:
    """Packed layout: every image's tokens back to back, no padding.

    max_seqlen: a static bound on any image's tokens (the token budget). It sizes the attention kernel's
    grid; a bound that changed with every batch would make torch.compile specialise again and again.
    """
    if not items:
        raise ValueError("cannot collate an empty batch")
    labels = torch.tensor([it.label for it in items], dtype=torch.long)  # (B,)
    return pack([it.tokens for it in items], [it.grid for it in items], labels, max_seqlen=max_seqlen)


def collate_padded(items: Sequence[TokenizedImage], seq_len: int) -> TokenBatch:
    """FiT's padded layout: ``seq_len`` slots per image (the token budget), real tokens first."""
    longest = max((it.tokens.shape[0] for it in items), default=0)
    if longest > seq_len:
        raise ValueError(
            f"an image has {longest} tokens but seq_len={seq_len}; resize images to the token budget "
            f"(fit_to_token_budget) or raise seq_len"
        )
    return to_padded(collate_packed(items), seq_len)


def collate_items(items: Sequence[DataItem], patch: int, layout: Layout, seq_len: Optional[int]) -> TokenBatch:
    """DataItems -> TokenBatch (runs in the loader workers)."""
    tokenized = [patchify_item(it.x, it.label, patch) for it in items]
    if layout == "packed":
        return collate_packed(tokenized, max_seqlen=seq_len)
    return collate_padded(tokenized, seq_len)


# ----------------------------------------------------------------------------------------------------
# Order
# ----------------------------------------------------------------------------------------------------


class ResumableBatchSampler(Sampler):
    """Batches of ``(index, epoch)`` keys in a per-epoch seeded order, starting at a chosen position.

    With ``world_size > 1`` every rank computes the same permutation and takes its own slice of each
    global batch of ``batch_size * world_size`` items (so ranks never overlap and stay in step).
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        if num_items < 1:
            raise ValueError(f"num_items={num_items} must be >= 1")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if seed < 0:
            raise ValueError(f"seed={seed} must be >= 0 (it seeds numpy's generator)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
        if world_size > 1 and not drop_last:
            raise ValueError("with several ranks use drop_last=True, so every rank gets the same number of batches")
        global_batch = batch_size * world_size
        if drop_last and num_items < global_batch:
            raise ValueError(
                f"{num_items} items cannot fill one batch of {global_batch} (batch_size x world_size) with "
                f"drop_last=True; lower batch_size or use drop_last=False"
            )
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0

    def __len__(self) -> int:
        """Batches per epoch (a full epoch, whatever the start position)."""
        global_batch = self.batch_size * self.world_size
        if self.drop_last:
            return self.num_items // global_batch
        return math.ceil(self.num_items / global_batch)

    def order(self, epoch: int) -> np.ndarray:
        """(num_items,) the item order of ``epoch``: the same on every rank and every run."""
        if not self.shuffle:
            return np.arange(self.num_items)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_items)

    def set_position(self, epoch: int, batch: int = 0) -> None:
        """Start the next iteration at batch ``batch`` of ``epoch``."""
        if epoch < 0 or not 0 <= batch <= len(self):
            raise ValueError(f"position (epoch={epoch}, batch={batch}) is outside 0..{len(self)} batches per epoch")
        self.epoch, self.start_batch = epoch, batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self.order(self.epoch)
        global_batch = self.batch_size * self.world_size
        for b in range(self.start_batch, len(self)):
            chunk = order[b * global_batch : (b + 1) * global_batch]
            mine = chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            yield [(int(i), self.epoch) for i in mine]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.start_batch, "batch_size": self.batch_size,
                "world_size": self.world_size, **self._identity()}

    def load_state_dict(self, state: dict) -> None:
        if "global_batch" not in state and "batch_size" in state:  # states saved before the global batch
            state = {**state, "global_batch": state["batch_size"] * state.get("world_size", 1)}
        mismatch = {k: (state.get(k), v) for k, v in self._identity().items() if state.get(k) != v}
        if mismatch:
            raise ValueError(
                f"sampler state was saved for a different order {mismatch} (saved, now); resume with the same "
                f"dataset, seed and global batch size (train.batch_size), or start a fresh run"
            )
        self.set_position(state["epoch"], state["batch"])

    def _identity(self) -> dict:
        """What fixes the order: a state from another setting would resume at the wrong items.

        The global batch (batch_size x world_size), not its split over ranks: a position counts global
        batches, so a checkpoint of 2 ranks x B resumes on 1 rank x 2B (and back) at the same items.
        """
        return {
            "seed": self.seed,
            "num_items": self.num_items,
            "global_batch": self.batch_size * self.world_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }


def worker_start_method(dataset: Dataset, num_workers: int) -> Optional[str]:
    """The DataLoader's ``multiprocessing_context``: "fork" for a dataset that holds its images decoded in memory
    (``data.decode_once``), whose forked workers share those pages copy-on-write, where any other start method
    (spawn, forkserver: Python 3.14's Linux default) would pickle every image into every worker; None otherwise."""
    inner = getattr(dataset, "dataset", dataset)  # _KeyedDataset wraps the run's dataset
    if num_workers == 0 or not getattr(inner, "decoded_in_memory", False):
        return None
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        raise ValueError(
            f"data.decode_once=true shares the decoded images with {num_workers} loader workers by forking them, and "
            "this platform cannot fork; set data.decode_once=false (each worker then reads the files)"
        )
    return "fork"


class _KeyedDataset(Dataset):
    """Reads ``(index, epoch)`` keys: per-item randomness follows the epoch the sampler is in.

    A longer key ``(index, epoch, *rest)`` (the training path: ``rest`` starts with the step the batch is
    for) returns ``(key, item)``, so the collate function that builds the step's batch in the worker knows
    which step, epoch and image every item belongs to.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple):
        index, epoch = key[0], key[1]
        get = getattr(self.dataset, "get", None)
        item = get(index, epoch) if get is not None else self.dataset[index]
        return item if len(key) == 2 else (key, item)


class _EndlessBatches:
    """The DataLoader's batch_sampler for training: batches across epochs without end, each key
    ``(index, epoch, step)``, starting at the sampler's position and at training step ``first_step``.

    One endless iteration means the workers start once and the prefetch queue never drains at an
    epoch boundary (a per-epoch ``for`` loop restarts both).
    """

    def __init__(self, sampler: "ResumableBatchSampler", epoch: int, batch: int, first_step: int):
        self.sampler, self.epoch, self.batch, self.first_step = sampler, epoch, batch, first_step

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        step, epoch, start = self.first_step, self.epoch, self.batch
        while True:
            self.sampler.set_position(epoch, start)
            for keys in self.sampler:
                yield [(i, e, step) for i, e in keys]
                step += 1
            epoch, start = epoch + 1, 0


class ResumableLoader:
    """Iterate one epoch per ``for`` loop, or :meth:`forever`; ``state_dict()`` is the position after
    the last batch handed out (workers prefetch ahead, so the sampler's own position would overshoot)."""

    def __init__(self, dataset: Dataset, sampler: "ResumableBatchSampler", collate, *, num_workers: int = 0,
                 pin_memory: bool = False, step_collate=None):
        self.dataset = _KeyedDataset(dataset)  # (index, epoch) keys: per-item flips follow the epoch
        self.sampler = sampler
        self.collate = collate  # items -> TokenBatch (epoch iteration)
        self.step_collate = step_collate  # [(key, item)] -> the step's batch (forever); None: collate
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.epoch = 0
        self.batch = 0  # batches of the current epoch already handed to the caller

    def __len__(self) -> int:
        return len(self.sampler)

    def _dataloader(self, batch_sampler, collate) -> DataLoader:
        # Not persistent_workers: forever() is one endless iteration (workers start once), and a per-epoch
        # ``for`` builds its DataLoader afresh so it starts at the position set here.
        from maskfit.interrupt import ignore_stop_signals_in_worker

        return DataLoader(
            self.dataset, batch_sampler=batch_sampler, num_workers=self.num_workers, collate_fn=collate,
            pin_memory=self.pin_memory, persistent_workers=False,
            multiprocessing_context=worker_start_method(self.dataset, self.num_workers),
            worker_init_fn=ignore_stop_signals_in_worker,  # Ctrl-C / SIGTERM are the main process's to handle
        )

    def __iter__(self) -> Iterator[TokenBatch]:
        self.sampler.set_position(self.epoch, self.batch)
        for tb in self._dataloader(self.sampler, self.collate):
            self.batch += 1
            yield tb
        self.epoch, self.batch = self.epoch + 1, 0

    def forever(self, first_step: int = 0) -> Iterator:
        """Batches across epochs without end (step-based training), from the saved position.

        With ``step_collate`` the items arrive as ``(key, item)`` with key ``(index, epoch, step)`` and
        the batch of step ``first_step + k`` is built whole in a worker (masks included), then pinned.
        The stream is closed at interpreter exit if it is still open (maskfit.interrupt.close_at_exit).
        """
        from maskfit.interrupt import close_at_exit

        return close_at_exit(self._forever(first_step))

    def _forever(self, first_step: int) -> Iterator:
        if self.step_collate is None:
            while True:
                yield from self
        batches = _EndlessBatches(self.sampler, self.epoch, self.batch, first_step)
        for out in self._dataloader(batches, self.step_collate):
            self.batch += 1
            if self.batch == len(self.sampler):
                self.epoch, self.batch = self.epoch + 1, 0
            yield out

    def state_dict(self) -> dict:
        return {**self.sampler.state_dict(), "epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)  # checks the order matches, and the position is valid
        self.epoch, self.batch = state["epoch"], state["batch"]


def make_loader(
    dataset: Dataset,
    batch_size: int,
    layout: Layout = "padded",
    seed: int = 0,
    num_workers: int = 0,
    patch: Optional[int] = None,
    seq_len: Optional[int] = None,
    shuffle: bool = True,
    drop_last: bool = True,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    step_collate=None,
) -> ResumableLoader:
    """A resumable loader of TokenBatches.

    patch: token side in units of ``item.x`` (defaults to ``dataset.patch``: pixels for image datasets,
    latent pixels for a latent cache). seq_len: padded slots per image (defaults to
    ``dataset.token_budget``; padded layout only). step_collate: builds a training step's whole batch
    from ``(key, item)`` pairs in the workers (:meth:`ResumableLoader.forever`).
    """
    if layout not in ("padded", "packed"):
        raise ValueError(f"layout={layout!r} must be 'padded' (FiT) or 'packed'")
    if patch is None:
        patch = getattr(dataset, "patch", None)
        if patch is None:
            raise ValueError("the dataset has no `patch` attribute; pass patch= (token side in units of item.x)")
    if layout == "padded" and seq_len is None:
        seq_len = getattr(dataset, "token_budget", None)
        if seq_len is None:
            raise ValueError("the padded layout needs seq_len= (the token budget); the dataset does not say it")
    sampler = ResumableBatchSampler(len(dataset), batch_size, seed, shuffle, drop_last, rank, world_size)
    collate = functools.partial(collate_items, patch=patch, layout=layout, seq_len=seq_len)
    return ResumableLoader(dataset, sampler, collate, num_workers=num_workers, pin_memory=pin_memory,
                           step_collate=step_collate)
